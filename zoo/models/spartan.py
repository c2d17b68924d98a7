"""SpaRTAN: Spatial Reinforcement Token-based Aggregation Network.

Paper: "SpaRTAN: Spatial Reinforcement Token-based Aggregation Network for Visual Recognition",
Pay et al., IJCNN 2025 (https://arxiv.org/abs/2507.10999). Official code (Apache-2.0):
https://github.com/henry-pay/SpaRTAN, `src/model/spartan.py`.

A four-stage conv net. Each block is a pre-norm pair of residual branches with layer scale:
* SMixer: a spatial mixer with two receptive fields (3x3, and two stacked 3x3 dilation-2 convs),
  each gated by squeeze-excitation, after a global-contrast re-weighting of its input.
* CMixer: a channel mixer that expands to r*C channels, adds the product of the two 1x1 projections
  at each pixel's arg-max channel, modulates channel pairs by a learned complex number (the
  "wave" step), then a 3x3 conv, squeeze-excitation and a 1x1 projection back to C.

The block norm is a 1-group GroupNorm (over C, H, W per sample), every BatchNorm uses eps 1e-6,
and the convs switch from dense to grouped at the middle stage, all as in the official code.
The official flat `layers` Sequential becomes timm-style `stages.{i}.{downsample,blocks}`;
`checkpoint_filter_fn` maps official checkpoints onto it.
"""
import re
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead, ConvNormAct, DropPath, GroupNorm1, LayerScale2d, SEModule, create_conv2d, get_device_dtype,
    trunc_normal_,
)
from timm.models import checkpoint_seq, register_model
from timm.models._features import feature_take_indices

from zoo.layers import check_image_input, takes_device_dtype
from zoo.metadata import paper, zoo_cfgs
from zoo.models._builder import build_zoo_model

__all__ = ['SpaRTAN']

_BN_EPS = 1e-6
_NORM_EPS = 1e-6
_LAYER_SCALE_INIT = 1e-5


def _conv_bn_gelu(in_chs: int, out_chs: int, kernel_size: int, **kwargs) -> ConvNormAct:
    """Conv (no bias) -> BatchNorm(eps 1e-6) -> exact GELU, the official `ConvNormAct` default."""
    return ConvNormAct(
        in_chs, out_chs, kernel_size, norm_layer=nn.BatchNorm2d, act_layer=nn.GELU,
        norm_kwargs=dict(eps=_BN_EPS), **kwargs)


class SMixer(nn.Module):
    """Spatial mixer: 1x1 down to C/2, contrast re-weighting, short and long 3x3 branches with SE."""

    def __init__(self, dim: int, grouped: bool):
        super().__init__()
        mid = dim // 2
        groups = mid if grouped else 1
        self.gamma = nn.Parameter(torch.full((1, mid, 1, 1), _LAYER_SCALE_INIT))
        self.proj_in = nn.Conv2d(dim, mid, 1)
        self.h_conv = _conv_bn_gelu(mid, mid, 3, padding=1, groups=groups)
        self.l_conv = nn.Sequential(
            create_conv2d(mid, mid, 3, padding=2, dilation=2, groups=groups),
            _conv_bn_gelu(mid, mid, 3, padding=2, dilation=2, groups=groups),
        )
        self.h_attn = SEModule(mid, rd_channels=mid // 4)
        self.l_attn = SEModule(mid, rd_channels=mid // 4)
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        x = x + self.gamma * (x - x.mean((2, 3), keepdim=True))
        x = torch.cat([self.h_attn(self.h_conv(x)), self.l_attn(self.l_conv(x))], dim=1)
        return self.proj_out(x)


class CMixer(nn.Module):
    """Channel mixer: expand to r*C, arg-max channel reinforcement, complex modulation, conv + SE."""

    def __init__(self, dim: int, expand_ratio: int, grouped: bool):
        super().__init__()
        hidden = dim * expand_ratio
        self.theta = nn.Conv2d(dim, hidden, 1)
        self.proj = nn.Conv2d(dim, hidden, 1)
        # one complex number (real, imag) per channel pair (2k, 2k+1), official shape
        self.complex = nn.Parameter(torch.randn(1, 1, 1, hidden // 2, 2))
        self.conv = _conv_bn_gelu(hidden, hidden, 3, padding=1, groups=dim if grouped else hidden)
        self.attn = SEModule(hidden, rd_channels=dim // 4)
        self.proj_out = nn.Conv2d(hidden, dim, 1)

    def _modulate(self, x: torch.Tensor) -> torch.Tensor:
        """Multiply channel pairs (2k, 2k+1), read as complex numbers, by `complex[k]`, in float32."""
        B, C, H, W = x.shape
        pairs = x.float().reshape(B, C // 2, 2, H, W)
        real, imag = pairs.unbind(2)
        weight = self.complex.float().reshape(1, C // 2, 2, 1, 1)
        w_real, w_imag = weight.unbind(2)
        out = torch.stack((real * w_real - imag * w_imag, real * w_imag + imag * w_real), dim=2)
        return out.reshape(B, C, H, W).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = x.argmax(dim=1, keepdim=True)  # per pixel, in [0, C): addresses the first C hidden channels
        theta = F.gelu(self.theta(x))
        weight = self.proj(x)
        x = weight * theta + weight.gather(1, index) * theta.gather(1, index)
        x = self._modulate(x)
        x = self.attn(self.conv(x))
        return self.proj_out(x)


class SpaRTANBlock(nn.Module):
    """x + DropPath(ls1 * SMixer(norm1(x))), then the same with CMixer."""

    def __init__(self, dim: int, expand_ratio: int, grouped: bool, drop_path: float = 0.):
        super().__init__()
        self.norm1 = GroupNorm1(dim, eps=_NORM_EPS)
        self.smixer = SMixer(dim, grouped)
        self.ls1 = LayerScale2d(dim, _LAYER_SCALE_INIT)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = GroupNorm1(dim, eps=_NORM_EPS)
        self.cmixer = CMixer(dim, expand_ratio, grouped)
        self.ls2 = LayerScale2d(dim, _LAYER_SCALE_INIT)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.smixer(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.cmixer(self.norm2(x))))
        return x


class SpaRTANStage(nn.Module):
    """Optional 2x2 stride-2 downsample (conv -> BN -> SiLU), then `depth` blocks."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            expand_ratio: int,
            grouped: bool,
            drop_path_rates: Sequence[float],
            downsample: bool = True,
    ):
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = ConvNormAct(
                in_chs, out_chs, 2, stride=2, padding=0, norm_layer=nn.BatchNorm2d, act_layer=nn.SiLU,
                norm_kwargs=dict(eps=_BN_EPS))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            SpaRTANBlock(out_chs, expand_ratio, grouped, drop_path=dpr) for dpr in drop_path_rates])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


@takes_device_dtype
class SpaRTAN(nn.Module):
    """SpaRTAN classifier with the timm model interface.

    Args:
        in_chans: Input image channels.
        num_classes: Classifier outputs (0 for no classifier).
        global_pool: Head pooling type ('avg' as in the paper).
        dims: Width of each stage; the first is the stem width (official `init_dim`). Multiples of 8.
        depths: Blocks per stage (official `layer_depths`).
        expand_ratios: CMixer expansion r per stage (official `expand_ratios`), each >= 2.
        drop_rate: Dropout before the classifier (the official model has none).
        drop_path_rate: Stochastic depth; block i of n gets rate * i / n, as in the official code.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            dims: Sequence[int] = (32, 64, 128, 256),
            depths: Sequence[int] = (3, 3, 12, 2),
            expand_ratios: Sequence[int] = (4, 4, 2, 2),
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        if not len(dims) == len(depths) == len(expand_ratios):
            raise ValueError(
                f'dims, depths and expand_ratios need one entry per stage, got {len(dims)}, {len(depths)} '
                f'and {len(expand_ratios)}')
        if any(d % 8 for d in dims):
            raise ValueError(f'every stage width must be a multiple of 8 (SMixer halves it, SE quarters that), got {dims}')
        if any(d < 1 for d in depths):
            raise ValueError(f'every stage needs at least one block, got depths {depths}')
        if any(r < 2 for r in expand_ratios):
            raise ValueError(f'every CMixer expand ratio must be at least 2, got {expand_ratios}')
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        num_stages = len(depths)
        self.min_input_size = 4 * 2 ** (num_stages - 1)

        self.stem = nn.Sequential(
            _conv_bn_gelu(in_chans, dims[0] // 2, 3, stride=2, padding=1),
            _conv_bn_gelu(dims[0] // 2, dims[0], 3, stride=2, padding=1),
        )

        total_blocks = sum(depths)
        block_rates = [drop_path_rate * i / total_blocks for i in range(total_blocks)]
        self.feature_info = []
        stages = []
        prev_chs = dims[0]
        for i in range(num_stages):
            first = sum(depths[:i])
            stages.append(SpaRTANStage(
                prev_chs,
                dims[i],
                depth=depths[i],
                expand_ratio=expand_ratios[i],
                grouped=i >= num_stages // 2,
                drop_path_rates=block_rates[first:first + depths[i]],
                downsample=i > 0,
            ))
            prev_chs = dims[i]
            self.feature_info.append(dict(num_chs=prev_chs, reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = prev_chs
        self.head = ClassifierHead(prev_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The official init: He-normal (fan-out) convs, truncated-normal linear, zero biases."""
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0., (2. / fan_out) ** 0.5)
        elif isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=.02)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The 4-D SMixer `gamma` scales, which the official optimizer exempts from weight decay by name (timm
        exempts 1-D parameters and biases by itself)."""
        return {name for name, _ in self.named_parameters() if name.endswith('smixer.gamma')}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))  # on the model's device / dtype

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns the outputs of the selected stages.

        Args:
            x: Input image batch.
            indices: Take the last n stages if int, all if None, these stages if a sequence.
            norm: Unused (SpaRTAN has no final norm); kept for the timm interface.
            stop_early: Stop after the last requested stage.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediate features.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"SpaRTAN features are NCHW, got output_fmt={output_fmt!r}")
        check_image_input(x, self.in_chans, self.min_input_size)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and head) that the selected intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_head = True
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_chans, self.min_input_size)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def model_args_from_official(
        num_classes: int,
        num_layer: int,
        layer_depths: Sequence[int],
        expand_ratios: Sequence[int] = (),
        dims: Sequence[int] = (),
        init_dim: int = 32,
        dropout: float = 0.,
) -> Dict:
    """Zoo `SpaRTAN` kwargs for the official `SpaRTAN(num_classes, num_layer, layer_depths, ...)` call."""
    if not num_layer == len(layer_depths) == len(dims) + 1:
        raise ValueError(
            f'official SpaRTAN needs num_layer == len(layer_depths) == len(dims) + 1, '
            f'got {num_layer}, {len(layer_depths)}, {len(dims) + 1}')
    return dict(
        num_classes=num_classes,
        dims=(init_dim, *dims),
        depths=tuple(layer_depths),
        expand_ratios=tuple(expand_ratios) if expand_ratios else (1,) * num_layer,
        drop_path_rate=dropout,
    )


def create_from_official(**official_kwargs) -> SpaRTAN:
    """The (untrained) zoo model matching the official constructor called with `official_kwargs`."""
    return SpaRTAN(**model_args_from_official(**official_kwargs))


# Official key -> zoo key, applied in order to each key below its block / stem / downsample prefix.
_OFFICIAL_KEY_RENAMES = (
    (r'\.norm\.', '.bn.'),  # official ConvNormAct's BatchNorm is timm ConvNormAct's `bn`
    (r'^norm_(\d)\.', r'norm\1.'),
    (r'^scale_(\d)$', r'ls\1.gamma'),
    (r'^smixer\.l_conv\.0\.conv\.', 'smixer.l_conv.0.'),
    (r'(attn)\.squeeze\.', r'\1.fc1.'),
    (r'(attn)\.expand\.', r'\1.fc2.'),
)


def _official_layer_prefixes(model: SpaRTAN) -> List[str]:
    """Zoo module prefix of each official flat `layers.{j}` entry (blocks, with a downsample after each stage)."""
    prefixes = []
    for i, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            prefixes.append(f'stages.{i}.downsample.')
        prefixes.extend(f'stages.{i}.blocks.{j}.' for j in range(len(stage.blocks)))
    return prefixes


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SpaRTAN) -> Dict[str, torch.Tensor]:
    """Accept an official SpaRTAN checkpoint (raw, or the training dict with a `model` entry) or a zoo one."""
    if 'model' in state_dict and isinstance(state_dict['model'], dict):
        state_dict = state_dict['model']
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    if 'stem.0.conv.weight' in state_dict:
        return state_dict
    if 'conv.0.conv.weight' not in state_dict or 'linear.weight' not in state_dict:
        keys = list(state_dict)
        raise ValueError(
            'not a SpaRTAN checkpoint: expected the official layout (conv.*, layers.*, linear.*) or the zoo '
            f'layout (stem.*, stages.*, head.fc.*); its first keys are {keys[:5]}')

    layer_prefixes = _official_layer_prefixes(model)
    out = {}
    for key, value in state_dict.items():
        if key.startswith('conv.'):
            prefix, rest = 'stem.', key[len('conv.'):]
        elif key.startswith('linear.'):
            prefix, rest = 'head.fc.', key[len('linear.'):]
        elif key.startswith('layers.'):
            index, rest = key[len('layers.'):].split('.', 1)
            if int(index) >= len(layer_prefixes):
                raise ValueError(
                    f'official key {key} has no place in this model ({len(layer_prefixes)} blocks and downsamples); '
                    'the checkpoint was made with other layer_depths')
            prefix = layer_prefixes[int(index)]
            if prefix.endswith('downsample.'):
                rest = re.sub(r'^norm\.', 'bn.', rest)
        else:
            prefix, rest = '', key  # left as is, so that strict loading names it
        for pattern, replacement in _OFFICIAL_KEY_RENAMES:
            rest = re.sub(pattern, replacement, rest)
        if rest.startswith('ls') and rest.endswith('.gamma'):
            value = value.reshape(-1)
        out[prefix + rest] = value
    return out


def _create_spartan(variant: str, pretrained: bool = False, **kwargs) -> SpaRTAN:
    return build_zoo_model(
        SpaRTAN,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 256, 256),
        'pool_size': (8, 8),
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0.conv',
        'classifier': 'head.fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2507.10999',
        'paper_name': 'SpaRTAN: Spatial Reinforcement Token-based Aggregation Network for Visual Recognition',
        'origin_url': 'https://github.com/henry-pay/SpaRTAN',
        **kwargs,
    }


default_cfgs = zoo_cfgs({
    'spartan_tiny.in1k': _cfg(
        meta=dict(params_m=3.82, gmacs=1.04, recipe='training/recipes/spartan_tiny.yaml',
                  paper=[paper('ImageNet-1k', 'arXiv:2507.10999 abstract', top1=77.7)]),
        hf_hub_id='henry-pay/SpaRTAN-S',
        source='official',
        description='Official ImageNet-1k checkpoint from the SpaRTAN authors, converted on load.',
        notes=(
            'The Hub repo names the model SpaRTAN-S but the official code ships one config, the one built here '
            '(3.82M params). That the two agree could not be confirmed offline: loading is strict, so a '
            'checkpoint of another config fails loudly instead of loading half.',
        ),
    ),
})

card_info = dict(
    intended_use=(
        'ImageNet-1k classification at 256 px, and a light backbone for dense prediction through '
        '`features_only=True` (four stages, strides 4 to 32; the paper pairs it with RT-DETR on COCO).'),
    limitations=(
        'The paper\'s variant table could not be read offline; only the official repo config (SpaRTAN-T) is '
        'built. CMixer picks a channel by arg-max, so outputs are discontinuous where two channels nearly tie; '
        'its complex modulation runs in float32 even under autocast, as in the official code. LayerScale '
        'parameters are stored with shape (C,) instead of the official (1, C, 1, 1), so an optimizer rule '
        'that skips 1-D parameters must list them to reproduce the official weight decay.'),
    variants={
        'spartan_tiny': 'dims 32-64-128-256, depths 3-3-12-2, CMixer ratios 4-4-2-2; paper abstract: 3.8M params, '
                        '~1.0 GFLOPs, 77.7% ImageNet-1k top-1',
    },
)


@register_model
def spartan_tiny(pretrained: bool = False, **kwargs) -> SpaRTAN:
    """SpaRTAN-T, the official repo config (3.82M params, 1.04 GMACs at 256 px)."""
    model_args = dict(dims=(32, 64, 128, 256), depths=(3, 3, 12, 2), expand_ratios=(4, 4, 2, 2), drop_path_rate=0.1)
    return _create_spartan('spartan_tiny', pretrained=pretrained, **dict(model_args, **kwargs))
