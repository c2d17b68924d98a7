"""NeRV: neural representations for videos, the frame-index baseline of HNeRV and NeRV++.

Paper: "NeRV: Neural Representations for Videos", Chen et al., NeurIPS 2021 (https://arxiv.org/abs/2110.13903).
Official code (no license file): https://github.com/haochen-rye/NeRV, `model_nerv.py` (`Generator`) and
`utils.py` (`PositionalEncoding`).

One model represents one video: frame index i -> t = i / num_frames -> sinusoidal encoding (base 1.25, 80
levels, interleaved sin/cos) -> MLP stem (one hidden layer of 512, an activation after every layer) reshaped to
C1 x h x w -> NeRV blocks (3x3 conv -> PixelShuffle -> activation; the width halves per stage, not below 96) ->
1x1 head -> (tanh + 1) / 2. The size is every parameter; C1 = 26 / 58 / 112 give NeRV-S / M / L (3.2M / 6.3M /
12.5M at 720x1280).
"""
import math
import re
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import get_act_layer
from timm.models import register_model

from zoo.layers import takes_device_dtype
from zoo.layers.nerv import (
    NeRVBlock, NeRVPositionalEncoding, act_layer_from_official, check_frame_index, check_frame_size, check_positive)
from zoo.metadata import paper, zoo_cfgs
from zoo.models._builder import build_video_model, load_state_dict_strict

__all__ = ['NeRV']


@takes_device_dtype
class NeRV(nn.Module):
    """NeRV for one video of `num_frames` frames of `frame_size` (H, W); the input is the frame index.

    Args:
        frame_size: (H, W); multiples of prod(strides). The first feature map is H/prod x W/prod.
        num_frames: Frames in the video (t = index / num_frames).
        fc_dim: Channels of the first feature map (C1).
        strides: Upsampling per stage.
        pe_base, pe_levels: The positional encoding of t (2 * pe_levels values).
        stem_dim, stem_depth: Width and number of the stem's hidden layers.
        expansion: The first stage's width is int(fc_dim * expansion).
        reduction: Width divisor of later stages (floor division), not below `lower_width`.
        act_layer: Activation of the stem and blocks (timm name; the paper's best is GELU).
        out_act: 'tanh' ((tanh + 1) / 2) or 'sigmoid'.
        multi_head: A head after every stage (the official default) instead of only the last (`--single_res`).
    """
    input_kind = 'index'
    stored_embeddings = False

    def __init__(
            self,
            frame_size: Tuple[int, int] = (720, 1280),
            num_frames: int = 132,
            fc_dim: int = 26,
            strides: Sequence[int] = (5, 2, 2, 2, 2),
            pe_base: float = 1.25,
            pe_levels: int = 80,
            stem_dim: int = 512,
            stem_depth: int = 1,
            expansion: float = 1.,
            reduction: int = 2,
            lower_width: int = 96,
            act_layer: str = 'gelu',
            out_act: str = 'tanh',
            multi_head: bool = False,
    ):
        super().__init__()
        if out_act not in ('tanh', 'sigmoid'):
            raise ValueError(f"out_act must be 'tanh' ((tanh+1)/2) or 'sigmoid', got {out_act!r}")
        check_positive(num_frames=num_frames, frame_size=tuple(frame_size), fc_dim=fc_dim, strides=tuple(strides),
                       pe_base=pe_base, pe_levels=pe_levels, stem_dim=stem_dim, stem_depth=stem_depth,
                       expansion=expansion, reduction=reduction, lower_width=lower_width)
        check_frame_size(tuple(frame_size), strides)
        self.frame_size = tuple(frame_size)
        self.num_frames = num_frames
        self.fc_dim = fc_dim
        self.fc_hw = (frame_size[0] // math.prod(strides), frame_size[1] // math.prod(strides))
        self.out_act = out_act
        self.pos_embed = NeRVPositionalEncoding(pe_base, pe_levels)
        self.stem = self._make_stem(
            self.pos_embed.embed_dim, stem_dim, stem_depth, fc_dim * self.fc_hw[0] * self.fc_hw[1], act_layer)
        blocks, heads, width = [], {}, fc_dim
        for i, stride in enumerate(strides):
            out_width = int(width * expansion) if i == 0 else max(width // (1 if stride == 1 else reduction), lower_width)
            blocks.append(self._make_block(width, out_width, stride, act_layer))
            width = out_width
            if multi_head or i == len(strides) - 1:
                heads[str(i)] = nn.Conv2d(width, 3, 1)
        self.blocks = nn.Sequential(*blocks)
        self.heads = nn.ModuleDict(heads)
        self.num_classes, self.num_features = 0, width  # timm's Hub export reads both
        self.fast_decode = True

    @staticmethod
    def _make_stem(in_dim: int, hidden: int, depth: int, out_dim: int, act_layer: str) -> nn.Module:
        """Linear layers with an activation after every one, the last included (official `MLP`)."""
        dims = [in_dim] + [hidden] * depth + [out_dim]
        layers = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), get_act_layer(act_layer)()]
        return nn.Sequential(*layers)

    @staticmethod
    def _make_block(in_chs: int, out_chs: int, stride: int, act_layer: str) -> nn.Module:
        return NeRVBlock(in_chs, out_chs, stride, kernel_size=3, act_layer=act_layer)

    def example_inputs(self, device: Union[str, torch.device] = 'cpu') -> Dict[str, torch.Tensor]:
        """Forward kwargs for one frame."""
        return dict(index=torch.zeros(1, dtype=torch.long, device=device))

    def encode(self, frames: torch.Tensor = None, index: torch.Tensor = None, interpolate: bool = False) -> torch.Tensor:
        """The positional encodings (B, 2 * pe_levels) of frame indices (B,): t = index / num_frames in float32,
        as the official data loader makes it. Indices must be fitted frames, 0..num_frames - 1; with
        `interpolate`, fractional indices between them give in-between times."""
        if index is None:
            raise ValueError(f'{type(self).__name__} is driven by frame indices: pass encode(index=...) (B,) int64')
        check_frame_index(index, self.num_frames, interpolate)
        t = (index.to(torch.float64) / self.num_frames).float()
        return self.pos_embed(t)

    def stem_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The first feature map (B, C1, h, w) of positional encodings (B, 2 * pe_levels)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.pos_embed.embed_dim:
            raise ValueError(
                f'expected embeddings of shape (B, {self.pos_embed.embed_dim}), got {tuple(embeddings.shape)}')
        return self.stem(embeddings).view(-1, self.fc_dim, *self.fc_hw)

    def to_image(self, y: torch.Tensor) -> torch.Tensor:
        """A head's output mapped to [0, 1]."""
        return torch.tanh(y) * 0.5 + 0.5 if self.out_act == 'tanh' else torch.sigmoid(y)

    def forward_heads(self, embeddings: torch.Tensor) -> List[torch.Tensor]:
        """The image of every head, coarse to fine (one image unless built with multi_head=True)."""
        x = self.stem_features(embeddings)
        channels_last = self.fast_decode and not torch.is_grad_enabled()
        if channels_last:  # NHWC convolutions: the same frames up to float rounding, faster on CPU
            x = x.contiguous(memory_format=torch.channels_last)
        images = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if str(i) in self.heads:
                images.append(self.to_image(self.heads[str(i)](x)).contiguous())
        return images

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Frames (B, 3, H, W) in [0, 1] from positional encodings (B, 2 * pe_levels).

        Without autograd and with `fast_decode` (the default) the blocks run in channels-last layout, as in
        HNeRV; `model.fast_decode = False` gives the plain path.
        """
        return self.forward_heads(embeddings)[-1]

    def forward(self, index: torch.Tensor = None, frames: torch.Tensor = None, interpolate: bool = False) -> torch.Tensor:
        return self.decode(self.encode(frames=frames, index=index, interpolate=interpolate))

    def decoder_state_dict(self) -> Dict[str, torch.Tensor]:
        """Everything: the encoding has no parameters, so the whole model is what a bitstream carries."""
        return self.state_dict()

    def load_decoder_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        load_state_dict_strict(self, state_dict, source='decoder state dict')

    def size_params(self) -> int:
        """The paper's size: every parameter (stem, blocks and heads)."""
        return sum(p.numel() for p in self.parameters())


# Official key -> zoo key.
_OFFICIAL_KEY_RENAMES = (
    (r'^layers\.(\d+)\.conv\.conv\.', r'blocks.\1.conv.'),
    (r'^head_layers\.(\d+)\.', r'heads.\1.'),
)


def rename_official_keys(state_dict: Dict[str, torch.Tensor], renames: Sequence[Tuple[str, str]]) -> Dict[str, torch.Tensor]:
    """Unwrap a training checkpoint (`state_dict` entry, `module.` prefixes) and apply the first matching rename."""
    if isinstance(state_dict.get('state_dict'), dict):
        state_dict = state_dict['state_dict']
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix('module.')
        for pattern, replacement in renames:
            key, n = re.subn(pattern, replacement, key)
            if n:
                break
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: NeRV) -> Dict[str, torch.Tensor]:
    """Accept an official NeRV checkpoint (state dict or training checkpoint) or a zoo one."""
    state_dict = rename_official_keys(state_dict, _OFFICIAL_KEY_RENAMES)
    if any(k.endswith(('weight_orig', 'weight_mask')) for k in state_dict):
        raise ValueError(
            'this NeRV checkpoint is pruned (weight_orig / weight_mask keys): fold the masks in first, '
            'weight = weight_orig * weight_mask, as torch.nn.utils.prune.remove does')
    if 'stem.0.weight' not in state_dict or not any(k.startswith('blocks.') for k in state_dict):
        raise ValueError(
            'not a NeRV checkpoint: expected the official layout (stem.0.*, layers.N.conv.conv.*, head_layers.N.*) or '
            f'the zoo layout (stem.*, blocks.*, heads.*); its first keys are {list(state_dict)[:5]}')
    return state_dict


def model_args_from_official(
        embed_length: int,
        stem_dim_num: str,
        fc_hw_dim: str,
        expansion: float = 1.,
        num_blocks: int = 1,
        norm: str = 'none',
        act: str = 'gelu',
        bias: bool = True,
        reduction: int = 2,
        conv_type: str = 'conv',
        stride_list: Sequence[int] = (5, 2, 2, 2, 2),
        sin_res: bool = False,
        lower_width: int = 32,
        sigmoid: bool = False,
        pe_base: float = 1.25,
        num_frames: int = 132,
) -> Dict[str, Any]:
    """Zoo keyword arguments for the official `Generator(**kwargs)`.

    `pe_base` and `num_frames` are zoo extras: the official model takes the encoding, computed outside it (base
    1.25 in every official recipe), of t = index / num_frames. The frame size is fc_hw * prod(stride_list).
    """
    for name, value, built in (('num_blocks', num_blocks, 1), ('norm', norm, 'none'), ('bias', bias, True),
                               ('conv_type', conv_type, 'conv')):
        if value != built:
            raise ValueError(f'only {name}={built!r} (the published recipe) is built, got {value!r}')
    if embed_length % 2:
        raise ValueError(f'embed_length is 2 * levels of the positional encoding, got an odd {embed_length}')
    stem_dim, stem_depth = (int(x) for x in stem_dim_num.split('_'))
    fc_h, fc_w, fc_dim = (int(x) for x in fc_hw_dim.split('_'))
    scale = math.prod(stride_list)
    return dict(
        frame_size=(fc_h * scale, fc_w * scale), num_frames=num_frames, fc_dim=fc_dim, strides=tuple(stride_list),
        pe_base=pe_base, pe_levels=embed_length // 2, stem_dim=stem_dim, stem_depth=stem_depth,
        expansion=float(expansion), reduction=reduction, lower_width=lower_width, act_layer=act_layer_from_official(act),
        out_act='sigmoid' if sigmoid else 'tanh', multi_head=not sin_res)


def create_from_official(**official_kwargs) -> NeRV:
    """The (untrained) zoo model matching the official `Generator(**official_kwargs)`."""
    return NeRV(**model_args_from_official(**official_kwargs))


def _create_nerv(variant: str, pretrained: bool = False, **kwargs) -> NeRV:
    return build_video_model(NeRV, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 0,
        'input_size': (3, 720, 1280),
        'crop_pct': 1.0,
        'interpolation': 'bicubic',
        'mean': (0., 0., 0.),
        'std': (1., 1., 1.),
        'first_conv': '',
        'classifier': '',
        'license': 'unknown',
        'paper_ids': 'arXiv:2110.13903',
        'paper_name': 'NeRV: Neural Representations for Videos',
        'origin_url': 'https://github.com/haochen-rye/NeRV',
        'description': 'Untrained: one model represents one video, so weights come from fitting it.',
        **kwargs,
    }


def _meta(size: str, params_m: float, gmacs: float, psnr: float) -> Dict:
    """Params (M) and GMACs of one 720x1280 frame, the recipe, and paper Table 2's Bunny PSNR (1200 epochs)."""
    return dict(params_m=params_m, gmacs=gmacs, recipe=f'training/recipes/nerv_{size}_bunny.yaml',
                paper=[paper('Big Buck Bunny (720x1280)', 'arXiv:2110.13903 Table 2', task='video-representation',
                             split='all frames', psnr=psnr)])


default_cfgs = zoo_cfgs({
    'nerv_s.untrained': _cfg(meta=_meta('s', 3.24, 100.94, 34.21)),
    'nerv_m.untrained': _cfg(meta=_meta('m', 6.32, 101.43, 38.14)),
    'nerv_l.untrained': _cfg(meta=_meta('l', 12.57, 102.4, 41.29)),
})

card_info = dict(
    pipeline_tag='other',
    intended_use=(
        'Representing one video as a network from frame index to frame: fit it to the video, then decode any frame '
        'from its index. The baseline HNeRV and NeRV++ compare with.'),
    limitations=(
        'A model represents only the video it was fitted to, and does not interpolate between frames well. Size '
        'follows the paper: every parameter (`size_params()`). Built to the paper: 80-level encoding and GELU; the '
        'official README commands use 40 levels and swish (pe_levels=40, act_layer="silu"), which take 40,960 fewer '
        'stem parameters. The defaults are the NeRV paper\'s Bunny frame, 720x1280 (9x16 first feature map); HNeRV '
        'crops Bunny to 640x1280 (frame_size=(640, 1280) gives an 8x16 map and a smaller stem). Frame height and '
        'width must be multiples of prod(strides) (80 by default). Pruned official checkpoints (weight_orig / '
        'weight_mask) must have their masks folded in first.'),
    variants={
        f'nerv_{name}': (
            f'NeRV-{name.upper()}: C1 {c1}, strides 5-2-2-2-2, widths halving to 96; paper Table 2 (720x1280 Bunny, '
            f'1200 epochs): {size}M params, PSNR {psnr}')
        for name, c1, size, psnr in (('s', 26, 3.2, 34.21), ('m', 58, 6.3, 38.14), ('l', 112, 12.5, 41.29))
    },
    usage=(
        'with torch.no_grad():\n'
        '    frames = model(index=torch.arange(4))  # frames 0-3, (4, 3, {height}, {width}) in [0, 1]'),
)


@register_model
def nerv_s(pretrained: bool = False, **kwargs) -> NeRV:
    """NeRV-S: C1 26 (3.24M params at 720x1280 with the paper's 80-level encoding)."""
    return _create_nerv('nerv_s', pretrained=pretrained, **dict(dict(fc_dim=26), **kwargs))


@register_model
def nerv_m(pretrained: bool = False, **kwargs) -> NeRV:
    """NeRV-M: C1 58 (6.32M params at 720x1280)."""
    return _create_nerv('nerv_m', pretrained=pretrained, **dict(dict(fc_dim=58), **kwargs))


@register_model
def nerv_l(pretrained: bool = False, **kwargs) -> NeRV:
    """NeRV-L: C1 112 (12.57M params at 720x1280)."""
    return _create_nerv('nerv_l', pretrained=pretrained, **dict(dict(fc_dim=112), **kwargs))
