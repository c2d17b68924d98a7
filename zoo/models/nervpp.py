"""NeRV++: NeRV with separable conv residual blocks around the upsampler and a bilinear skip.

Paper: "NeRV++: An Enhanced Implicit Neural Video Representation", Ghorbel & Hamidouche, 2024
(https://arxiv.org/abs/2402.18305). Official code (MIT): https://github.com/ahmedgh970/NeRV-,
`models/model_best.py` (`Generator`, `NervPlusBlock`) and `models/layers.py` (`Gmlp`, `GatedCNNBlock`,
`ResidualFFN`).

NeRV's frame-index input and its widths, with two changes:
* the stem is a gated MLP (Linear to 2 x 512, value * GELU_tanh(gate), Linear), with no activation after it;
* each block is 1x1 projection -> gated depthwise-conv block (the "SCRB" before the upsampler; timm's MambaOut
  `GatedConvBlock` without its norm, 5x5 kernel) -> conv + PixelShuffle + activation -> residual FFN (depthwise
  3x3, 1x1, GELU, 1x1: the SCRB after it) -> + the projection upsampled bilinearly.
XS / S / M / L are the official README's Bunny commands (C1 8 / 26 / 58 / 112, 40-level encoding, swish, lower
width 80): 1,902,725 / 3,379,541 / 6,382,533 / 12,546,111 parameters at 720x1280.
"""
from functools import partial
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GluMlp, trunc_normal_
from timm.models import register_model
from timm.models.mambaout import GatedConvBlock

from zoo.layers import takes_device_dtype
from zoo.layers.nerv import NeRVBlock
from zoo.metadata import zoo_cfgs
from zoo.models._builder import build_video_model
from zoo.models.nerv import NeRV, model_args_from_official as _nerv_args_from_official, rename_official_keys

__all__ = ['NeRVPlusPlus']


class ResidualFFN(nn.Module):
    """x + 1x1(GELU(1x1(depthwise 3x3(x)))): the separable conv residual block after the upsampler."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.fc1 = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.conv_dw(x))))


class NeRVPlusBlock(nn.Module):
    """1x1 projection, gated conv block, NeRV upsampling block, residual FFN, plus a bilinear skip."""
    band_pixels = 16384  # pixels per chunk / band of `forward_fast`: 5-15 MB of activations, within the L3 cache

    def __init__(self, in_chs: int, out_chs: int, stride: int, act_layer: str = 'silu'):
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_chs, out_chs, 1)
        self.gcnn = GatedConvBlock(out_chs, expansion_ratio=8 / 3, kernel_size=5, norm_layer=nn.Identity)
        self.up = NeRVBlock(out_chs, out_chs, stride, kernel_size=3, act_layer=act_layer)
        self.rffn = ResidualFFN(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        skip = F.interpolate(x, scale_factor=self.stride, mode='bilinear', align_corners=False)
        x = self.gcnn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.rffn(self.up(x)) + skip

    def forward_fast(self, x: torch.Tensor, head: Optional[nn.Conv2d] = None) -> torch.Tensor:
        """`forward` for inference on NHWC tensors (B, H, W, C), the same values up to float rounding.

        The 1x1 convs and linears run as matrix products on NHWC rows, with no permute copies; the gated block's
        per-pixel work goes in chunks of `band_pixels` pixels and everything after the upsampling conv in bands
        of about `band_pixels` output pixels (with a one-row halo for the depthwise conv), so the large
        full-resolution tensors between those ops stay in cache instead of each making a trip to memory. With
        `head` (a 1x1 conv) the head runs inside the bands too and its output (B, 3, sH, sW) is returned in place
        of the features.
        """
        s, gcnn, band_pixels = self.stride, self.gcnn, self.band_pixels
        x = F.linear(x, self.proj.weight.flatten(1), self.proj.bias)
        hidden, split = gcnn.fc2.in_features, gcnn.split_indices[1]
        conv = F.linear(x, gcnn.fc1.weight[hidden + split:], gcnn.fc1.bias[hidden + split:])
        conv = gcnn.conv(conv.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        gated = torch.empty_like(x)
        pixels = x.shape[0] * x.shape[1] * x.shape[2]
        for start in range(0, pixels, band_pixels):
            stop = min(start + band_pixels, pixels)
            xi = x.flatten(0, 2)[start:stop]
            g = gcnn.act(F.linear(xi, gcnn.fc1.weight[:hidden], gcnn.fc1.bias[:hidden]))
            g[:, :split] *= F.linear(xi, gcnn.fc1.weight[hidden:hidden + split], gcnn.fc1.bias[hidden:hidden + split])
            g[:, split:] *= conv.flatten(0, 2)[start:stop]
            torch.addmm(gcnn.fc2.bias, g, gcnn.fc2.weight.t(), out=gated.flatten(0, 2)[start:stop]).add_(xi)
        up = self.up.conv(gated.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        B, H, W, C = x.shape
        out = x.new_empty((B, 3, s * H, s * W) if head is not None else (B, s * H, s * W, C))
        band = max(1, band_pixels // (s * s * W))
        for b in range(B):
            for r0 in range(0, H, band):
                r1 = min(r0 + band, H)
                lo, hi = max(r0 - 1, 0), min(r1 + 1, H)  # the halo: one low-res row each side
                crop = slice(s * (r0 - lo), s * (r1 - lo))
                y = self.up.act(self.up.shuffle(up[b:b + 1, lo:hi].permute(0, 3, 1, 2)))
                skip = F.interpolate(x[b:b + 1, lo:hi].permute(0, 3, 1, 2), scale_factor=s, mode='bilinear',
                                     align_corners=False)
                ffn = self.rffn.conv_dw(y).permute(0, 2, 3, 1)[:, crop]
                ffn = self.rffn.act(F.linear(ffn, self.rffn.fc1.weight.flatten(1), self.rffn.fc1.bias))
                ffn = F.linear(ffn, self.rffn.fc2.weight.flatten(1), self.rffn.fc2.bias)
                ffn = ffn.add_(y.permute(0, 2, 3, 1)[:, crop]).add_(skip.permute(0, 2, 3, 1)[:, crop])
                if head is None:
                    out[b, s * r0:s * r1] = ffn[0]
                else:
                    out[b, :, s * r0:s * r1] = F.linear(ffn[0], head.weight.flatten(1), head.bias).permute(2, 0, 1)
        return out


@takes_device_dtype
class NeRVPlusPlus(NeRV):
    """NeRV++ for one video; the arguments are NeRV's (`zoo.models.nerv.NeRV`), with NeRV++'s defaults."""

    def __init__(self, pe_levels: int = 40, lower_width: int = 80, act_layer: str = 'silu', **kwargs):
        super().__init__(pe_levels=pe_levels, lower_width=lower_width, act_layer=act_layer, **kwargs)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The official init: xavier-uniform convs, truncated-normal (0.02) linear layers, zero biases."""
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
        elif isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=.02)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.zeros_(module.bias)

    def forward_heads(self, embeddings: torch.Tensor) -> List[torch.Tensor]:
        """The image of every head, coarse to fine. Without autograd and with `fast_decode` (the default) the
        blocks run `NeRVPlusBlock.forward_fast` one frame at a time (a batch's full-resolution activations would
        not fit in cache): the same frames up to float rounding, faster on CPU; `model.fast_decode = False`
        gives the plain path."""
        if not self.fast_decode or torch.is_grad_enabled():
            return super().forward_heads(embeddings)
        x = self.stem_features(embeddings).permute(0, 2, 3, 1).contiguous()
        return [torch.cat(images) for images in zip(*(self._fast_heads(frame) for frame in x.split(1)))]

    def _fast_heads(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The images of every head from an NHWC first feature map, through `NeRVPlusBlock.forward_fast`."""
        images = []
        for i, block in enumerate(self.blocks):
            head = self.heads[str(i)] if str(i) in self.heads else None
            if i == len(self.blocks) - 1:
                images.append(self.to_image(block.forward_fast(x, head)))
            else:
                x = block.forward_fast(x)
                if head is not None:
                    images.append(self.to_image(head(x.permute(0, 3, 1, 2))).contiguous())
        return images

    @staticmethod
    def _make_stem(in_dim: int, hidden: int, depth: int, out_dim: int, act_layer: str) -> nn.Module:
        """Gated MLP: fc1 to 2 * hidden, first half * GELU_tanh(second half), fc2; `depth` is unused, as in
        the official code."""
        return GluMlp(in_dim, 2 * hidden, out_dim, act_layer=partial(nn.GELU, approximate='tanh'), gate_last=True)

    @staticmethod
    def _make_block(in_chs: int, out_chs: int, stride: int, act_layer: str) -> nn.Module:
        return NeRVPlusBlock(in_chs, out_chs, stride, act_layer)


_OFFICIAL_KEY_RENAMES = (
    (r'^layers\.(\d+)\.proj\.conv_block\.0\.', r'blocks.\1.proj.'),
    (r'^layers\.(\d+)\.nerv_block\.0\.conv\.', r'blocks.\1.up.conv.'),
    (r'^layers\.(\d+)\.rffn\.ffn\.0\.', r'blocks.\1.rffn.conv_dw.'),
    (r'^layers\.(\d+)\.rffn\.ffn\.2\.', r'blocks.\1.rffn.fc1.'),
    (r'^layers\.(\d+)\.rffn\.ffn\.5\.', r'blocks.\1.rffn.fc2.'),
    (r'^layers\.(\d+)\.gcnn\.', r'blocks.\1.gcnn.'),
    (r'^head_layers\.(\d+)\.', r'heads.\1.'),
)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: NeRVPlusPlus) -> Dict[str, torch.Tensor]:
    """Accept an official NeRV++ checkpoint (state dict or training checkpoint) or a zoo one."""
    state_dict = rename_official_keys(state_dict, _OFFICIAL_KEY_RENAMES)
    if any(k.endswith(('weight_orig', 'weight_mask')) for k in state_dict):
        raise ValueError(
            'this NeRV++ checkpoint is pruned (weight_orig / weight_mask keys): fold the masks in first, '
            'weight = weight_orig * weight_mask, as torch.nn.utils.prune.remove does')
    if 'stem.fc1.weight' not in state_dict or not any(k.startswith('blocks.') for k in state_dict):
        raise ValueError(
            'not a NeRV++ checkpoint: expected the official layout (stem.fc1.*, layers.N.gcnn.*, head_layers.N.*) or '
            f'the zoo layout (stem.*, blocks.*, heads.*); its first keys are {list(state_dict)[:5]}')
    return state_dict


def create_from_official(**official_kwargs) -> NeRVPlusPlus:
    """The (untrained) zoo model matching the official NeRV++ `Generator(**official_kwargs)` (NeRV's arguments;
    `norm` is accepted and unused there, as here)."""
    official_kwargs = dict(official_kwargs, norm='none')
    return NeRVPlusPlus(**_nerv_args_from_official(**official_kwargs))


def _create_nervpp(variant: str, pretrained: bool = False, **kwargs) -> NeRVPlusPlus:
    return build_video_model(NeRVPlusPlus, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


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
        'license': 'mit',
        'paper_ids': 'arXiv:2402.18305',
        'paper_name': 'NeRV++: An Enhanced Implicit Neural Video Representation',
        'origin_url': 'https://github.com/ahmedgh970/NeRV-',
        'description': 'Untrained: one model represents one video, and the authors published no checkpoints.',
        **kwargs,
    }


def _meta(size: str, params_m: float, gmacs: float) -> Dict:
    """Params (M) and GMACs of one 720x1280 frame, and the recipe (no paper figure could be read offline)."""
    return dict(params_m=params_m, gmacs=gmacs, recipe=f'training/recipes/nervpp_{size}_bunny.yaml')


default_cfgs = zoo_cfgs({
    'nervpp_xs.untrained': _cfg(meta=_meta('xs', 1.9, 105.47)),
    'nervpp_s.untrained': _cfg(meta=_meta('s', 3.38, 105.5)),
    'nervpp_m.untrained': _cfg(meta=_meta('m', 6.38, 105.62)),
    'nervpp_l.untrained': _cfg(meta=_meta('l', 12.55, 106.02)),
})

card_info = dict(
    pipeline_tag='other',
    intended_use=(
        'Representing one video as a network from frame index to frame, like NeRV, with more capacity per '
        'parameter: fit it to the video, then decode any frame from its index.'),
    limitations=(
        'A model represents only the video it was fitted to. Size is every parameter (`size_params()`), as for '
        'NeRV. Only the paper\'s abstract could be read: the variants are the official README\'s Bunny commands '
        '(C1 8 / 26 / 58 / 112), not a table of the paper, and no reported PSNR is quoted. The defaults are the '
        'official 720x1280 Bunny frame (9x16 first feature map); frame height and width must be multiples of '
        'prod(strides) (80 by default). The stem\'s `stem_depth` is ignored, as in the official code.'),
    variants={
        f'nervpp_{name}': f'C1 {c1}, 40-level encoding, strides 5-2-2-2-2, lower width 80, swish; {params:,} params '
                          f'at 720x1280 (official README Bunny command)'
        for name, c1, params in (('xs', 8, 1_902_725), ('s', 26, 3_379_541), ('m', 58, 6_382_533), ('l', 112, 12_546_111))
    },
    usage=(
        'with torch.no_grad():\n'
        '    frames = model(index=torch.arange(4))  # frames 0-3, (4, 3, {height}, {width}) in [0, 1]'),
)


def _variant(variant: str, fc_dim: int, pretrained: bool, kwargs: Dict) -> NeRVPlusPlus:
    return _create_nervpp(variant, pretrained=pretrained, **dict(dict(fc_dim=fc_dim), **kwargs))


@register_model
def nervpp_xs(pretrained: bool = False, **kwargs) -> NeRVPlusPlus:
    """NeRV++ XS: C1 8 (1.90M params at 720x1280)."""
    return _variant('nervpp_xs', 8, pretrained, kwargs)


@register_model
def nervpp_s(pretrained: bool = False, **kwargs) -> NeRVPlusPlus:
    """NeRV++ S: C1 26 (3.38M params at 720x1280)."""
    return _variant('nervpp_s', 26, pretrained, kwargs)


@register_model
def nervpp_m(pretrained: bool = False, **kwargs) -> NeRVPlusPlus:
    """NeRV++ M: C1 58 (6.38M params at 720x1280)."""
    return _variant('nervpp_m', 58, pretrained, kwargs)


@register_model
def nervpp_l(pretrained: bool = False, **kwargs) -> NeRVPlusPlus:
    """NeRV++ L: C1 112 (12.55M params at 720x1280)."""
    return _variant('nervpp_l', 112, pretrained, kwargs)
