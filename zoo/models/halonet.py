"""HaloNet: blocked local self-attention with halos, the paper's H0-H7 family.

Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones", Vaswani et al., CVPR 2021
(https://arxiv.org/abs/2103.12731). No official code or weights were released; the models are rebuilt from
the paper's model table (block size b, halo h, value multiplier rv, block-output multiplier rb, depths, final
1x1 width df) and reproduce its published parameter counts.

A ResNet-like net (7x7/2 conv stem + 3x3/2 max-pool, four stages of depths (3, 3, l3, 3)) in which every
bottleneck block's spatial conv is halo attention:
* the map is cut into non-overlapping b x b query blocks; each block attends to its (b + 2h)^2 window
  (the block plus an h-pixel halo); keys and values outside the image are zeros and are not masked;
* query and key width is the stage width m (64, 128, 256, 512); values are rv * m wide, so the block's
  output 1x1 conv maps rv * m -> rb * m (timm's ByobNet self-attention block cannot express rv > 1);
* relative position logits q.r_h + q.r_w (separate height and width tables, shared by the heads) are
  added to the scaled q.k logits, indexed by the true key-query displacement;
* the first block of stages 2-4 downsamples with strided attention: queries are taken at every second
  pixel of each block (b/2 x b/2 query blocks), keys and values at full resolution in the same window.

`halonet_h1` is timm's own model (timm's ByobNet: ReLU, timm's strided-query position indexing, timm's
state-dict layout), registered again with zoo metadata only: a checkpoint of timm's `halonet_h1` loads into it
and gives timm's outputs, whether or not zoo was imported. The zoo's HaloNet class builds the other seven rows.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    BatchNormAct2d, ClassifierHead, ConvNormAct, DropPath, create_act_layer, get_act_layer, get_device_dtype,
    trunc_normal_,
)
from timm.layers.halo_attn import PosEmbedRel
from timm.models import (
    checkpoint_seq, register_model, register_notrace_function, register_notrace_module,
)
from timm.models._features import feature_take_indices
from timm.models.byoanet import ByobNet, model_cfgs as timm_byoanet_cfgs

from zoo.layers import check_image_input, is_traced, takes_device_dtype
from zoo.metadata import paper, zoo_cfgs
from zoo.models._builder import build_zoo_model

__all__ = ['HaloNet', 'HaloAttention']

# Without gradients, halo attention runs over chunks of blocks whose position logits stay under this many
# elements (128 MiB in float32): the logits and attention weights of all blocks at once grow with
# blocks x window^2 (6.6 GB each for H0's first stage on a 4096x4096 image).
_INFERENCE_CHUNK_ELEMENTS = 1 << 25


class HaloPosEmbedRel(PosEmbedRel):
    """timm's relative position tables (`height_rel`, `width_rel`: 2 * win - 1 rows of `dim_head`),
    indexed by the true displacement between each (possibly strided) query and each window key.

    timm's `PosEmbedRel.forward` indexes a strided query by its sub-sampled coordinate, which is not the
    displacement to its keys; here query i of a block sits at pixel `stride * i` and key j at `j - halo`.
    """

    def __init__(self, block_size: int, halo_size: int, stride: int, dim_head: int, scale: float):
        win_size = block_size + 2 * halo_size
        super().__init__(block_size // stride, win_size, dim_head, scale)
        query_pos = torch.arange(block_size // stride) * stride
        key_pos = torch.arange(win_size) - halo_size
        self.register_buffer('rel_index', key_pos[None, :] - query_pos[:, None] + win_size - 1, persistent=False)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q: (..., bq, bq, dim_head) query blocks -> (..., bq * bq, win * win) position logits."""
        rel_h = self.height_rel[self.rel_index]  # (bq, win, dim_head)
        rel_w = self.width_rel[self.rel_index]
        logits_h = torch.einsum('...yxd,ykd->...yxk', q, rel_h)
        logits_w = torch.einsum('...yxd,xkd->...yxk', q, rel_w)
        logits = logits_h.unsqueeze(-1) + logits_w.unsqueeze(-2)  # (..., bq, bq, win_h, win_w)
        return logits.flatten(-4, -3).flatten(-2)


@register_notrace_module
class HaloAttention(nn.Module):
    """Blocked local multi-head self-attention with a halo, and values wider than queries and keys.

    Args:
        dim: Input channels.
        dim_qk: Query and key channels (all heads).
        dim_v: Value channels (all heads), the output width; `dim_v > dim_qk` is the paper's rv > 1.
        num_heads: Attention heads.
        block_size: Query block side b.
        halo_size: Halo h around each block; the key/value window is b + 2h.
        stride: 1, or 2 for strided attention (queries at every second pixel of each block).
        pad_to_block: Zero-pad (bottom, right) an input whose sides are not multiples of b and crop the
            output back; otherwise such an input is a `ValueError`.
    """

    def __init__(
            self,
            dim: int,
            dim_qk: int,
            dim_v: int,
            num_heads: int = 8,
            block_size: int = 8,
            halo_size: int = 3,
            stride: int = 1,
            pad_to_block: bool = False,
    ):
        super().__init__()
        if dim_qk % num_heads or dim_v % num_heads:
            raise ValueError(f'dim_qk ({dim_qk}) and dim_v ({dim_v}) must be multiples of num_heads ({num_heads})')
        if stride not in (1, 2) or block_size % stride:
            raise ValueError(
                f'stride must be 1 or 2 and divide the block size, got stride {stride}, block size {block_size}')
        self.num_heads = num_heads
        self.dim_head_qk = dim_qk // num_heads
        self.dim_head_v = dim_v // num_heads
        self.scale = self.dim_head_qk ** -0.5
        self.block_size = block_size
        self.halo_size = halo_size
        self.win_size = block_size + 2 * halo_size
        self.stride = stride
        self.pad_to_block = pad_to_block
        self.q = nn.Conv2d(dim, dim_qk, 1, stride=stride, bias=False)
        # channels per head: [keys (dim_head_qk), values (dim_head_v)], the layout of timm's HaloAttn
        self.kv = nn.Conv2d(dim, dim_qk + dim_v, 1, bias=False)
        self.pos_embed = HaloPosEmbedRel(block_size, halo_size, stride, self.dim_head_qk, self.scale)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.q.weight.shape[1] ** -0.5  # fan-in
        trunc_normal_(self.q.weight, std=std)
        trunc_normal_(self.kv.weight, std=std)
        trunc_normal_(self.pos_embed.height_rel, std=self.scale)
        trunc_normal_(self.pos_embed.width_rel, std=self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        b, h, s, nh = self.block_size, self.halo_size, self.stride, self.num_heads
        pad_h, pad_w = -H % b, -W % b
        if (pad_h or pad_w) and not self.pad_to_block:
            raise ValueError(
                f'halo attention with block size {b} needs a feature map whose height and width are multiples '
                f'of {b}, got {H}x{W}; resize the input or build the model with pad_to_block=True')
        nbh, nbw = (H + pad_h) // b, (W + pad_w) // b
        bq = b // s

        q = self.q(x)
        Hq, Wq = q.shape[-2:]
        q = F.pad(q, [0, nbw * bq - Wq, 0, nbh * bq - Hq])
        q = q.reshape(B * nh, self.dim_head_qk, nbh, bq, nbw, bq).permute(0, 2, 4, 3, 5, 1)
        q = q.reshape(B * nh, nbh * nbw, bq, bq, self.dim_head_qk)

        kv = F.pad(self.kv(x), [h, h + pad_w, h, h + pad_h])
        kv = kv.unfold(2, self.win_size, b).unfold(3, self.win_size, b)  # (B, C, nbh, nbw, win, win)
        kv = kv.reshape(B * nh, self.dim_head_qk + self.dim_head_v, nbh * nbw, -1).permute(0, 2, 3, 1)
        k, v = kv.split([self.dim_head_qk, self.dim_head_v], dim=-1)

        blocks = nbh * nbw
        chunk = blocks if torch.is_grad_enabled() else max(
            1, _INFERENCE_CHUNK_ELEMENTS // (B * nh * bq * bq * self.win_size * self.win_size))
        if chunk >= blocks:
            out = self._attend(q, k, v)
        else:
            out = torch.cat([self._attend(q[:, i:i + chunk], k[:, i:i + chunk], v[:, i:i + chunk])
                             for i in range(0, blocks, chunk)], dim=1)
        out = out.reshape(B, nh, nbh, nbw, bq, bq, self.dim_head_v).permute(0, 1, 6, 2, 4, 3, 5)
        out = out.reshape(B, nh * self.dim_head_v, nbh * bq, nbw * bq)
        return out[:, :, :Hq, :Wq]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Query blocks q (B * nh, n, bq, bq, dim_head_qk) over their windows k, v (B * nh, n, win * win, dim_head)."""
        pos_logits = self.pos_embed(q)
        # softmax(q.k * scale + q.r): the position logits enter as the additive mask, unscaled
        return F.scaled_dot_product_attention(
            q.flatten(2, 3), k, v, attn_mask=pos_logits.to(q.dtype), scale=self.scale)


class HaloBlock(nn.Module):
    """Bottleneck block with halo attention as its spatial op.

    1x1 conv (in -> m) + BN + act -> halo attention (q, k: m; v: rv * m) -> BN + act -> 1x1 conv
    (rv * m -> rb * m) + BN -> drop path -> + shortcut (1x1 conv + BN when the shape changes) -> act.
    """

    def __init__(
            self,
            in_chs: int,
            mid_chs: int,
            value_chs: int,
            out_chs: int,
            stride: int = 1,
            num_heads: int = 8,
            block_size: int = 8,
            halo_size: int = 3,
            pad_to_block: bool = False,
            act_layer: Type[nn.Module] = nn.SiLU,
            drop_path: float = 0.,
    ):
        super().__init__()
        if in_chs != out_chs or stride != 1:
            self.shortcut = ConvNormAct(in_chs, out_chs, 1, stride=stride, apply_act=False)
        else:
            self.shortcut = nn.Identity()
        self.conv1_1x1 = ConvNormAct(in_chs, mid_chs, 1, act_layer=act_layer)
        self.self_attn = HaloAttention(
            mid_chs, mid_chs, value_chs, num_heads=num_heads, block_size=block_size, halo_size=halo_size,
            stride=stride, pad_to_block=pad_to_block)
        self.post_attn = BatchNormAct2d(value_chs, act_layer=act_layer)
        self.conv3_1x1 = ConvNormAct(value_chs, out_chs, 1, apply_act=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act = create_act_layer(act_layer, inplace=True)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3_1x1.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.conv1_1x1(x)
        x = self.post_attn(self.self_attn(x))
        x = self.conv3_1x1(x)
        return self.act(self.drop_path(x) + shortcut)


class HaloStage(nn.Module):
    """`depth` halo blocks; the first one strides."""

    def __init__(self, in_chs: int, depth: int, stride: int, drop_path_rates: Sequence[float], **block_kwargs):
        super().__init__()
        self.grad_checkpointing = False
        blocks = []
        for i in range(depth):
            blocks.append(HaloBlock(
                in_chs, stride=stride if i == 0 else 1, drop_path=drop_path_rates[i], **block_kwargs))
            in_chs = block_kwargs['out_chs']
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


@register_notrace_function
def check_halo_input_size(
        x: torch.Tensor, attn_reductions: Sequence[Tuple[int, int]], block_size: int, size_multiple: int) -> None:
    """Raise unless every attention layer receives whole `block_size` blocks from this image size."""
    H, W = x.shape[-2:]
    for i, reductions in enumerate(attn_reductions):
        for reduction in reductions:
            h, w = -(-H // reduction), -(-W // reduction)  # the stem and strided layers round up
            if h % block_size or w % block_size:
                raise ValueError(
                    f'HaloNet with block size {block_size} needs image height and width that are multiples of '
                    f'{size_multiple} (every attention layer takes whole {block_size}x{block_size} blocks); got '
                    f'{H}x{W}, which reaches an attention layer of stage {i} as {h}x{w}. Resize the image, or build '
                    f'the model with pad_to_block=True to zero-pad each attention input to a multiple of {block_size}')


@takes_device_dtype
class HaloNet(nn.Module):
    """HaloNet classifier with the timm model interface.

    Args:
        in_chans: Input image channels.
        num_classes: Classifier outputs (0 for no classifier).
        global_pool: Head pooling type.
        depths: Blocks per stage (the paper's (3, 3, l3, 3)).
        widths: Stage widths m (query/key channels of the attention).
        block_size: Query block side b.
        halo_size: Halo h.
        value_ratio: rv, value channels = rv * m.
        out_ratio: rb, block output channels = rb * m.
        final_chs: df, width of a final 1x1 conv + BN + act before pooling (0: none, as in H0-H2).
        stem_chs: Width of the 7x7/2 stem conv.
        num_heads: Attention heads in every layer.
        act_layer: Activation.
        pad_to_block: Zero-pad every attention input to a multiple of b (bottom/right) instead of raising.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth; block i of n gets rate * i / (n - 1).
        zero_init_last: Zero-init the last BN of every block.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Sequence[int] = (3, 3, 10, 3),
            widths: Sequence[int] = (64, 128, 256, 512),
            block_size: int = 8,
            halo_size: int = 3,
            value_ratio: float = 1.,
            out_ratio: float = 1.,
            final_chs: int = 0,
            stem_chs: int = 64,
            num_heads: int = 8,
            act_layer: Union[str, Type[nn.Module]] = 'silu',
            pad_to_block: bool = False,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
    ):
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f'depths and widths need one entry per stage, got {len(depths)} and {len(widths)}')
        value_chs = [value_ratio * m for m in widths]
        out_chs = [out_ratio * m for m in widths]
        if any(c != int(c) for c in value_chs + out_chs):
            raise ValueError(
                f'value_ratio * width and out_ratio * width must be whole channel counts, got values {value_chs} '
                f'and outputs {out_chs}')
        if block_size % 2:
            raise ValueError(
                f'strided attention takes every second query of a block: block_size must be even, got {block_size}')
        act_layer = get_act_layer(act_layer)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.block_size = block_size
        self.pad_to_block = pad_to_block
        self.grad_checkpointing = False

        self.stem = nn.Sequential()
        self.stem.add_module('conv', ConvNormAct(in_chans, stem_chs, 7, stride=2, padding=3, act_layer=act_layer))
        self.stem.add_module('pool', nn.MaxPool2d(3, stride=2, padding=1))

        total_blocks = sum(depths)
        rates = [drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]
        self.feature_info = []
        # (first block, other blocks) input reductions of each stage's attention layers, for the size check
        self.attn_reductions = []
        stages = []
        prev_chs, reduction = stem_chs, 4
        for i, depth in enumerate(depths):
            stride = 1 if i == 0 else 2
            self.attn_reductions.append((reduction, reduction * stride))
            first = sum(depths[:i])
            stages.append(HaloStage(
                prev_chs, depth, stride, rates[first:first + depth],
                mid_chs=widths[i], value_chs=int(value_chs[i]), out_chs=int(out_chs[i]), num_heads=num_heads,
                block_size=block_size, halo_size=halo_size, pad_to_block=pad_to_block, act_layer=act_layer))
            prev_chs = int(out_chs[i])
            reduction *= stride
            self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        if final_chs:
            self.final_conv = ConvNormAct(prev_chs, final_chs, 1, act_layer=act_layer)
            prev_chs = final_chs
        else:
            self.final_conv = nn.Identity()
        self.num_features = self.head_hidden_size = prev_chs
        self.head = ClassifierHead(prev_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)

        self.zero_init_last = zero_init_last
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """timm ByobNet init: He-normal (fan-out) convs, N(0, 0.01) linear; attention keeps its own init.

        `apply` visits children first, so an attention layer's own init and a block's zeroed last BN win.
        """
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0., (2. / fan_out) ** 0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0., 0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, HaloAttention):
            module.reset_parameters()
        elif isinstance(module, HaloBlock) and self.zero_init_last:
            module.zero_init_last()

    @property
    def size_multiple(self) -> int:
        """Image sides that are multiples of this reach every attention layer as multiples of the block size."""
        return self.attn_reductions[len(self.stages) - 1][1] * self.block_size

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self.in_chans)
        if not torch.jit.is_scripting():  # eager only: TorchScript skips this block, FX / export skip the check
            if not self.pad_to_block and not is_traced(x):
                check_halo_input_size(x, self.attn_reductions[:len(self.stages)], self.block_size, self.size_multiple)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^final_conv', (99999,)),
            ],
        )

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
            norm: Unused (no final norm; the final 1x1 conv belongs to `forward_features`' output).
            stop_early: Stop after the last requested stage.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediate features.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"HaloNet features are NCHW, got output_fmt={output_fmt!r}")
        self._check_input(x)
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
        if len(stages) == len(self.stages):
            x = self.final_conv(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and final conv and head) that the selected intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.final_conv = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_head = True
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.final_conv(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: HaloNet) -> Dict[str, torch.Tensor]:
    """Zoo-layout checkpoints only (no official HaloNet checkpoints exist); unwraps a training dict."""
    if 'model' in state_dict and isinstance(state_dict['model'], dict):
        state_dict = state_dict['model']
    return {k.removeprefix('module.'): v for k, v in state_dict.items()}


def _create_halonet(variant: str, pretrained: bool = False, **kwargs) -> HaloNet:
    return build_zoo_model(
        HaloNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


def _cfg(img_size: int, block_size: int, **kwargs) -> Dict:
    pool = -(-img_size // 32)
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, img_size, img_size),
        'pool_size': (pool, pool),
        'min_input_size': (3, 32 * block_size, 32 * block_size),
        'crop_pct': 0.95,
        'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv.conv',
        'classifier': 'head.fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2103.12731',
        'paper_name': 'Scaling Local Self-Attention for Parameter Efficient Visual Backbones',
        'description': (
            'Untrained architecture (no weights): the authors released no code or checkpoints. Built from the '
            'paper\'s model table.'),
        **kwargs,
    }


def _arch(b: int, h: int, rv: float, rb: float, l3: int, df: int, img_size: int, **kwargs) -> Dict:
    return dict(
        block_size=b, halo_size=h, value_ratio=rv, out_ratio=rb, depths=(3, 3, l3, 3), final_chs=df,
        img_size=img_size, **kwargs)


# The paper's model table: block size b, halo h, rv, rb, l3 (depths 3, 3, l3, 3), final 1x1 width df, image size.
_ARCHS = {
    'halonet_h0': _arch(8, 3, 1.0, 0.5, 7, 0, 256),
    'halonet_h1': _arch(8, 3, 1.0, 1.0, 10, 0, 256),
    'halonet_h2': _arch(8, 3, 1.0, 1.25, 11, 0, 256),
    'halonet_h3': _arch(10, 3, 1.0, 1.5, 12, 1024, 320),
    'halonet_h4': _arch(12, 2, 1.0, 3.0, 12, 1280, 384),
    'halonet_h5': _arch(14, 2, 2.5, 2.0, 23, 1536, 448),
    'halonet_h6': _arch(8, 4, 3.0, 2.75, 24, 1536, 512),
    # 600 px is not a multiple of 32 * b = 320: the paper's size is kept and every attention input is zero-padded
    'halonet_h7': _arch(10, 3, 4.0, 3.5, 26, 2048, 600, pad_to_block=True),
}

_H7_NOTE = (
    'The paper trains and evaluates H7 at 600 px, which does not reach every attention layer as whole 10x10 '
    'blocks; this model zero-pads each attention input at the bottom and right to a multiple of 10 and crops '
    'the output (pad_to_block=True). How the paper handled it is not known.'
)

# Params (M) and GMACs at each model's image size, and the paper's ImageNet-1k top-1 (%) from its model table.
_META = {
    'halonet_h0': (5.5, 2.31, 77.9), 'halonet_h1': (8.1, 2.99, 79.9), 'halonet_h2': (9.4, 3.26, 80.4),
    'halonet_h3': (11.84, 6.08, 81.9), 'halonet_h4': (19.1, 11.86, 83.3), 'halonet_h5': (30.72, 31.96, 84.0),
    'halonet_h6': (43.46, 52.45, 84.4), 'halonet_h7': (67.43, 110.16, 84.9),
}

default_cfgs = zoo_cfgs({
    f'{name}.untrained': _cfg(
        arch['img_size'], arch['block_size'],
        meta=dict(params_m=_META[name][0], gmacs=_META[name][1], recipe=f'training/recipes/{name}.yaml',
                  paper=[paper('ImageNet-1k', 'arXiv:2103.12731 model table', top1=_META[name][2])]),
        **(dict(min_input_size=(3, 32, 32), notes=(_H7_NOTE,)) if arch.get('pad_to_block') else {}),
        **(dict(first_conv='stem.conv1.conv') if name == 'halonet_h1' else {}),
    )
    for name, arch in _ARCHS.items()
})

card_info = dict(
    intended_use=(
        'Image classification backbone and feature extractor (features_only / forward_intermediates) to train '
        'from scratch: HaloNet-H0..H7 as specified in the paper, for research on local self-attention.'),
    limitations=(
        'No weights: the authors released neither code nor checkpoints, so every model here is untrained. The '
        'architecture follows the paper\'s model table (b, h, rv, rb, l3, df, image size; transcribed by third '
        'parties, the paper itself was not re-read) and reproduces its parameter counts (each published count is '
        'the exact count truncated to 0.1M). These details are not fixed by the paper and were chosen here: '
        '8 heads in every attention layer (keras-cv-attention-models uses 4 in stage 1; only the shared position '
        'tables change size); SiLU activations (timm\'s own halonet_h1 uses ReLU); ResNet stem (7x7/2 conv 64 + '
        'BN + act + 3x3/2 max-pool); block = 1x1 conv to m + BN + act, halo attention with q/k width m and value '
        'width rv*m, BN + act, 1x1 conv to rb*m + BN (zero-initialised), residual add (1x1 conv + BN projection '
        'when the shape changes), act; H3-H7 end with a 1x1 conv to df + BN + act before pooling. Relative '
        'position tables have 2(b+2h)-1 rows per axis as in timm (2(b+h)-1 of them reachable), are shared by the '
        'heads and are indexed by the true key-query displacement; their logits are added after the q.k scaling. '
        'Strided attention (first block of stages 2-4) keeps the query at the top-left pixel of every 2x2 cell of '
        'a block and the full-resolution key/value window; its shortcut is a stride-2 1x1 conv + BN. Keys and '
        'values beyond the image are zeros and are not masked. Image sides must be multiples of 32*b (the '
        'paper\'s sizes for H0-H6), else a ValueError names the multiple; with pad_to_block=True every attention '
        'input is instead zero-padded at the bottom and right to a multiple of b and the output cropped to '
        'ceil(size / stride). halonet_h7 pads by default because its 600 px does not divide. The training recipe '
        '(dropout, stochastic depth, schedule) is not reproduced. halonet_h1 is timm\'s own model (timm\'s ByobNet: '
        'ReLU, strided queries indexed by their sub-sampled coordinate in the position tables, timm\'s key '
        'layout), so that checkpoints of timm\'s halonet_h1 keep loading with the same outputs; the details above '
        'describe the other seven models.'),
    variants={
        'halonet_h0': 'b=8, h=3, rv=1.0, rb=0.5, depths 3/3/7/3, no df, 256 px, 5.5M params, 77.9% top-1',
        'halonet_h1': (
            'b=8, h=3, rv=1.0, rb=1.0, depths 3/3/10/3, no df, 256 px, 8.1M params, 79.9% top-1 (timm\'s '
            'ByobNet implementation)'),
        'halonet_h2': 'b=8, h=3, rv=1.0, rb=1.25, depths 3/3/11/3, no df, 256 px, 9.4M params, 80.4% top-1',
        'halonet_h3': 'b=10, h=3, rv=1.0, rb=1.5, depths 3/3/12/3, df=1024, 320 px, 11.8M params, 81.9% top-1',
        'halonet_h4': (
            'b=12, h=2, rv=1.0, rb=3.0, depths 3/3/12/3, df=1280, 384 px, 19.1M params, 83.3% top-1 '
            '(85.5% with ImageNet-21k pretraining)'),
        'halonet_h5': 'b=14, h=2, rv=2.5, rb=2.0, depths 3/3/23/3, df=1536, 448 px, 30.7M params, 84.0% top-1',
        'halonet_h6': 'b=8, h=4, rv=3.0, rb=2.75, depths 3/3/24/3, df=1536, 512 px, 43.4M params, 84.4% top-1',
        'halonet_h7': 'b=10, h=3, rv=4.0, rb=3.5, depths 3/3/26/3, df=2048, 600 px, 67.4M params, 84.9% top-1',
    },
)


def _halonet(variant: str, pretrained: bool, **kwargs) -> HaloNet:
    model_args = {k: v for k, v in _ARCHS[variant].items() if k != 'img_size'}
    return _create_halonet(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def halonet_h0(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H0 (b8 h3, rv 1, rb 0.5, 5.50M params, 256 px)."""
    return _halonet('halonet_h0', pretrained, **kwargs)


@register_model
def halonet_h1(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H1 (b8 h3, rv 1, rb 1, 8.10M params, 256 px): timm's own ByobNet `halonet_h1`, zoo metadata."""
    return build_zoo_model(
        ByobNet, 'halonet_h1', pretrained, cfg=timm_byoanet_cfgs['halonet_h1'],
        pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=dict(flatten_sequential=True), **kwargs)


@register_model
def halonet_h2(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H2 (b8 h3, rv 1, rb 1.25, 9.40M params, 256 px)."""
    return _halonet('halonet_h2', pretrained, **kwargs)


@register_model
def halonet_h3(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H3 (b10 h3, rv 1, rb 1.5, df 1024, 11.84M params, 320 px)."""
    return _halonet('halonet_h3', pretrained, **kwargs)


@register_model
def halonet_h4(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H4 (b12 h2, rv 1, rb 3, df 1280, 19.10M params, 384 px)."""
    return _halonet('halonet_h4', pretrained, **kwargs)


@register_model
def halonet_h5(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H5 (b14 h2, rv 2.5, rb 2, df 1536, 30.72M params, 448 px)."""
    return _halonet('halonet_h5', pretrained, **kwargs)


@register_model
def halonet_h6(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H6 (b8 h4, rv 3, rb 2.75, df 1536, 43.46M params, 512 px)."""
    return _halonet('halonet_h6', pretrained, **kwargs)


@register_model
def halonet_h7(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H7 (b10 h3, rv 4, rb 3.5, df 2048, 67.43M params, 600 px with block padding)."""
    return _halonet('halonet_h7', pretrained, **kwargs)
