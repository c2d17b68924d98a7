"""iDisc: Internal Discretization for monocular depth estimation (and surface normals).

Paper: "iDisc: Internal Discretization for Monocular Depth Estimation", Piccinelli, Sakaridis and Yu,
CVPR 2023 (https://arxiv.org/abs/2304.06334). Official code and weights (CC BY-NC 4.0):
https://github.com/SysCV/idisc.

An image encoder from timm (ResNet, EfficientNet or Swin) gives four maps at strides 4..32, then:
* Pixel decoder: a deformable-attention FPN. Each map is projected to `hidden_dim` channels, the four
  levels attend to each other through pre-norm multi-scale deformable attention layers, and an FPN
  top-down path adds lateral projections of the encoder maps. It returns, per level, the attention
  output ("raw") and the FPN output.
* Adaptive Feature Partitioning (AFP): per scale (strides 16, 8, 4), `num_latents` learned internal
  discretized representations (IDRs) gather the raw decoder features by cross-attention whose
  softmax runs over the IDRs (they compete for pixels). Its iterations share weights.
* Internal Scale Discretization (ISD): per scale, the FPN features attend to that scale's IDRs and
  are projected to log-depth (or 4 normal channels: xyz and a concentration kappa).
* Depth: exp() of each scale, resized to stride 4, averaged, resized to the input size. Normals:
  each scale normalised, averaged, resized bicubically.

The official Swin (mmdet style) pads a stage to whole windows before the cyclic shift; timm shifts
first. At sizes whose stage maps are not multiples of 7 (480x640, 352x1216) the two disagree, so the
Swin blocks here pad first, as the official ones do. `checkpoint_filter_fn` maps official
checkpoints onto this layout.
"""
import math
import re
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvNormAct, Mlp, register_notrace_module
from timm.models import register_model, resolve_pretrained_cfg
from timm.models._input import update_model_args
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse

from zoo.layers import MSDeformAttn, check_image_input, multi_scale_reference_points, takes_device_dtype
from zoo.metadata import paper, zoo_cfgs
from zoo.models._builder import build_zoo_model

__all__ = ['IDisc']

# Official encoder names (config `pixel_encoder.name`) -> timm models with the same weights.
OFFICIAL_ENCODERS = {
    'resnet50': 'resnet50.tv_in1k',
    'resnet101': 'resnet101.tv_in1k',
    'efficientnet_b5': 'tf_efficientnet_b5.ap_in1k',
    'swin_tiny': 'swin_tiny_patch4_window7_224.ms_in1k',
    'swin_small': 'swin_small_patch4_window7_224.ms_in1k',
    'swin_base': 'swin_base_patch4_window7_224.ms_in1k',
    'swin_large_22k': 'swin_large_patch4_window7_224.ms_in22k',
}
# Stochastic depth of the official Swin encoders (T, S, B, L).
_SWIN_DROP_PATH = {'swin_tiny': 0.2, 'swin_small': 0.3, 'swin_base': 0.5, 'swin_large': 0.2}

# Model arguments of the official config of each dataset, chosen by the pretrained tag (depth caps and
# evaluation crops are in `zoo.tasks.depth.EVAL_SETTINGS`).
SETTINGS = {
    'nyu': dict(decoder_depth=4, decoder_points=4),
    'kitti': dict(decoder_depth=6, decoder_points=8),
    'nyu_normals': dict(decoder_depth=4, decoder_points=4, output_dim=4),
}


def sine_position_embedding(x: torch.Tensor, num_feats: int, temperature: float = 1e4) -> torch.Tensor:
    """DETR sine embedding of the (H, W) grid of `x`: (1, 2 * num_feats, H, W), y channels then x channels.

    Positions are 1..H divided by H (not centred) times 2 pi; each frequency gives a sin and a cos channel.
    """
    h, w = x.shape[-2:]
    device = x.device
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + 1e-6) * (2 * math.pi)
    x_pos = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + 1e-6) * (2 * math.pi)
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode='floor') / num_feats)
    pos_y = _sin_cos(y, dim_t)[:, None, :].expand(h, w, num_feats)
    pos_x = _sin_cos(x_pos, dim_t)[None, :, :].expand(h, w, num_feats)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)[None].to(x.dtype)


def _sin_cos(pos: torch.Tensor, dim_t: torch.Tensor) -> torch.Tensor:
    """(L,) positions -> (L, len(dim_t)) embedding, sin and cos interleaved."""
    pos = pos[:, None] / dim_t
    return torch.stack((pos[:, 0::2].sin(), pos[:, 1::2].cos()), dim=2).flatten(1)


# ---------------------------------------------------------------------------------------------------------------
# Encoders: timm models, tapped where the official iDisc taps them


@register_notrace_module  # reason: the shifted-window mask is built for each input size by item assignment
class _PadThenShiftSwinBlock(SwinTransformerBlock):
    """timm's Swin block with the official (mmdet) window order: pad to whole windows, then shift.

    timm shifts first and pads after; where a map is not a multiple of the window the two orders put
    different pixels into the boundary windows. The mask is computed on the padded map, as officially.
    """

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, C = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, (-W) % win_w, 0, (-H) % win_h))
        _, Hp, Wp, _ = x.shape
        has_shift = any(self.shift_size)
        if has_shift:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_area, C)
        windows = self.attn(windows, mask=self.get_attn_mask(x) if has_shift else None)
        x = window_reverse(windows.view(-1, win_h, win_w, C), self.window_size, Hp, Wp)
        if has_shift:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :H, :W].contiguous()


class SwinEncoder(nn.Module):
    """timm Swin stages (LayerNorm eps 1e-6, always 7x7 windows) with a LayerNorm on each stage output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.patch_size = model.patch_embed.patch_size
        self.patch_embed = model.patch_embed
        self.layers = model.layers
        for block in self.layers.modules():
            if isinstance(block, SwinTransformerBlock):
                block.__class__ = _PadThenShiftSwinBlock
        self.channels = [info['num_chs'] for info in model.feature_info]
        self.norms = nn.ModuleList([nn.LayerNorm(c, eps=1e-6) for c in self.channels])

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        ph, pw = self.patch_size
        x = F.pad(x, (0, (-x.shape[-1]) % pw, 0, (-x.shape[-2]) % ph))  # zero-pad to whole patches
        x = self.patch_embed(x)
        features = []
        for layer, norm in zip(self.layers, self.norms):
            x = layer(x)
            features.append(norm(x).permute(0, 3, 1, 2).contiguous())
        return features


class EfficientNetEncoder(nn.Module):
    """timm EfficientNet tapped after blocks 1, 2 and 4, plus the conv head (2048 channels for B5) at stride 32."""

    taps = (1, 2, 4)
    __constants__ = ['taps']  # so TorchScript reads the class attribute

    def __init__(self, model: nn.Module):
        super().__init__()
        self.conv_stem = model.conv_stem
        self.bn1 = model.bn1
        self.blocks = model.blocks
        self.conv_head = model.conv_head
        self.bn2 = model.bn2
        block_chs = {info['module']: info['num_chs'] for info in model.feature_info}
        self.channels = [block_chs[f'blocks.{i}'] for i in self.taps] + [model.num_features]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.bn1(self.conv_stem(x))
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                features.append(x)
        features.append(self.bn2(self.conv_head(x)))
        return features


class ResNetEncoder(nn.Module):
    """timm ResNet `features_only` at strides 4..32 (the official torchvision layout has the same keys)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.body = model
        self.channels = model.feature_info.channels()

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.body(x)


def create_encoder(name: str, pretrained: bool = False, drop_path_rate: Optional[float] = None, **kwargs) -> nn.Module:
    """An iDisc encoder from a timm model name (`name[.tag]`): ResNet, EfficientNet or Swin; kwargs go to timm."""
    arch = timm.models.split_model_name_tag(name)[0]
    if arch.startswith('swin_'):
        if drop_path_rate is None:
            drop_path_rate = next((r for k, r in _SWIN_DROP_PATH.items() if arch.startswith(k)), 0.)
        return SwinEncoder(timm.create_model(
            name, pretrained=pretrained, num_classes=0, strict_img_size=False, always_partition=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=drop_path_rate, **kwargs))
    if drop_path_rate is not None:
        kwargs['drop_path_rate'] = drop_path_rate
    if 'efficientnet' in arch:
        return EfficientNetEncoder(timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs))
    if arch.startswith('resnet'):
        return ResNetEncoder(timm.create_model(
            name, pretrained=pretrained, features_only=True, out_indices=(1, 2, 3, 4), **kwargs))
    raise ValueError(f'iDisc takes a ResNet, EfficientNet or Swin encoder from timm, got {name!r}')


# ---------------------------------------------------------------------------------------------------------------
# Pixel decoder


class DeformableEncoderLayer(nn.Module):
    """Pre-norm deformable self-attention over all levels, then a pre-norm MLP.

    The query is norm1(x) + pos; the attended values are projected from the un-normalised x.
    """

    def __init__(self, dim: int, mlp_dim: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MSDeformAttn(dim, n_levels, n_heads, n_points)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, act_layer=nn.GELU)

    def forward(
            self,
            x: torch.Tensor,
            pos: torch.Tensor,
            reference_points: torch.Tensor,
            spatial_shapes: List[Tuple[int, int]],
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x) + pos, reference_points, x, spatial_shapes)
        return x + self.mlp(self.norm2(x))


def _conv_bn_gelu(in_chs: int, out_chs: int, kernel_size: int) -> ConvNormAct:
    return ConvNormAct(in_chs, out_chs, kernel_size, bias=False, norm_layer=nn.BatchNorm2d, act_layer=nn.GELU)


class PixelDecoder(nn.Module):
    """Deformable-attention FPN over the encoder levels, given coarsest first.

    Returns the FPN outputs and the raw (attention + 1x1 conv) outputs of every level, coarsest first.
    """

    def __init__(
            self,
            in_channels: Sequence[int],
            dim: int = 256,
            depth: int = 4,
            num_heads: int = 4,
            num_points: int = 4,
            mlp_ratio: float = 4.,
    ):
        super().__init__()
        self.dim = dim
        levels = len(in_channels)
        self.input_proj = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(1, dim)) for c in in_channels])
        self.level_embed = nn.Parameter(torch.randn(levels, dim))
        self.layers = nn.ModuleList([
            DeformableEncoderLayer(dim, int(dim * mlp_ratio), levels, num_heads, num_points) for _ in range(depth)])
        self.out_convs = nn.ModuleList([_conv_bn_gelu(dim, dim, 1) for _ in in_channels])
        self.lateral_convs = nn.ModuleList([_conv_bn_gelu(c, dim, 1) for c in in_channels])
        self.fpn_convs = nn.ModuleList([_conv_bn_gelu(dim, dim, 3) for _ in in_channels])
        self._init_weights()

    def _init_weights(self) -> None:
        """The official init: xavier for the input projections and MLPs, kaiming-uniform (a=1) for the FPN convs."""
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        for layer in self.layers:
            for fc in (layer.mlp.fc1, layer.mlp.fc2):
                nn.init.xavier_uniform_(fc.weight)
        for convs in (self.out_convs, self.lateral_convs, self.fpn_convs):
            for conv in convs:
                nn.init.kaiming_uniform_(conv.conv.weight, a=1)

    def forward(self, features: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        shapes = [(f.shape[-2], f.shape[-1]) for f in features]
        tokens, pos = [], []
        for i, proj in enumerate(self.input_proj):
            tokens.append(proj(features[i]).flatten(2).transpose(1, 2))
            pe = sine_position_embedding(features[i], self.dim // 2).flatten(2).transpose(1, 2)
            pos.append(pe + self.level_embed[i].view(1, 1, -1))
        x, pos = torch.cat(tokens, 1), torch.cat(pos, 1)
        reference_points = multi_scale_reference_points(shapes, device=x.device, dtype=x.dtype)
        reference_points = reference_points.expand(-1, -1, len(shapes), -1)
        for layer in self.layers:
            x = layer(x, pos, reference_points, shapes)

        levels = x.split([h * w for h, w in shapes], dim=1)
        raw = []
        for i, conv in enumerate(self.out_convs):
            h, w = shapes[i]
            raw.append(conv(levels[i].transpose(1, 2).reshape(x.shape[0], self.dim, h, w)))
        fpn = []
        for i, (lateral_conv, fpn_conv) in enumerate(zip(self.lateral_convs, self.fpn_convs)):
            y = lateral_conv(features[i])
            if i == 0:
                y = y + F.interpolate(raw[0], size=y.shape[-2:], mode='nearest')
            else:
                y = y + raw[i] + F.interpolate(fpn[-1], size=y.shape[-2:], mode='nearest')
            fpn.append(fpn_conv(y))
        return fpn, raw


# ---------------------------------------------------------------------------------------------------------------
# Internal discretization: AFP and ISD


class CrossAttention(nn.Module):
    """Pre-norm cross-attention of `x` (queries) to `context` (keys and values).

    With `competition`, the softmax runs over the queries (they compete for each key), then +1e-6 and a
    renormalisation over the keys, as in AFP; otherwise it is the usual softmax over the keys.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int = 1, competition: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.competition = competition
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.norm_context = nn.LayerNorm(context_dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(self.norm(x)).view(B, N, self.num_heads, -1).transpose(1, 2)
        k, v = self.kv(self.norm_context(context)).view(B, context.shape[1], 2, self.num_heads, -1).permute(
            2, 0, 3, 1, 4).unbind(0)
        if self.competition:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-2) + 1e-6
            out = (attn / attn.sum(dim=-1, keepdim=True)) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class AFPScale(nn.Module):
    """Adaptive Feature Partitioning at one scale: learned IDRs refined `depth` times by the same weights."""

    def __init__(self, dim: int, latent_dim: int, num_latents: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.depth = depth
        self.latents = nn.Parameter(torch.randn(1, num_latents, latent_dim))
        self.attn = CrossAttention(latent_dim, dim, num_heads, competition=True)
        self.norm = nn.LayerNorm(latent_dim)
        self.mlp = Mlp(latent_dim, int(latent_dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        idrs = self.latents.repeat(pixels.shape[0], 1, 1)
        for _ in range(self.depth):
            idrs = idrs + self.attn(idrs, pixels)
            idrs = idrs + self.mlp(self.norm(idrs))
        return idrs


class ISDBlock(nn.Module):
    """Pixels attend to the IDRs of their scale, then a pre-norm MLP."""

    def __init__(self, dim: int, latent_dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.attn = CrossAttention(dim, latent_dim, num_heads)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, idrs: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, idrs)
        return x + self.mlp(self.norm(x))


class ISDHead(nn.Module):
    """Internal Scale Discretization at one scale: `depth` blocks, then LN-Linear-LN-Linear to the output."""

    def __init__(
            self, dim: int, latent_dim: int, depth: int, num_heads: int, mlp_ratio: float, output_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList([ISDBlock(dim, latent_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.proj_out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.LayerNorm(dim), nn.Linear(dim, output_dim))

    def forward(self, pixels: torch.Tensor, idrs: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            pixels = block(pixels, idrs)
        return self.proj_out(pixels)


# ---------------------------------------------------------------------------------------------------------------
# Model


@takes_device_dtype
class IDisc(nn.Module):
    """iDisc: encoder -> deformable FPN -> AFP + ISD per scale -> depth (metres) or normals at input size.

    Args:
        encoder: timm model name (`name[.tag]`) of a ResNet, EfficientNet or Swin; None for the head alone
            (then `forward_head` takes the features and `encoder_channels` gives their widths).
        encoder_channels: Widths of the four encoder maps (strides 4..32), when `encoder` is None.
        pretrained_encoder: Load the encoder's ImageNet weights from timm (to train from them).
        in_chans: Image channels.
        hidden_dim: Width of the pixel decoder, AFP pixel side and ISD (official `pixel_decoder.hidden_dim`).
        decoder_depth: Deformable attention layers (4 for NYU, 6 for KITTI).
        decoder_heads: Deformable attention heads.
        decoder_points: Sampling points per head and level (4 for NYU, 8 for KITTI).
        latent_dim: IDR width (official `afp.latent_dim`).
        num_latents: IDRs per scale.
        afp_depth: AFP iterations (shared weights).
        isd_depth: ISD blocks per scale.
        num_resolutions: Scales that get IDRs, finest last (3: strides 16, 8, 4).
        num_heads: AFP / ISD attention heads.
        mlp_ratio: MLP expansion everywhere in the head.
        output_dim: 1 for depth (log-depth per scale), 4 for normals (xyz + kappa).
        drop_path_rate: Encoder stochastic depth (None: the official value for the encoder).
        num_classes: Always 0 (timm passes it; there is no classifier).
    """

    def __init__(
            self,
            encoder: Optional[str] = 'resnet101.tv_in1k',
            encoder_channels: Optional[Sequence[int]] = None,
            pretrained_encoder: bool = False,
            in_chans: int = 3,
            hidden_dim: int = 256,
            decoder_depth: int = 4,
            decoder_heads: int = 4,
            decoder_points: int = 4,
            latent_dim: int = 128,
            num_latents: int = 32,
            afp_depth: int = 2,
            isd_depth: int = 2,
            num_resolutions: int = 3,
            num_heads: int = 1,
            mlp_ratio: float = 4.,
            output_dim: int = 1,
            drop_path_rate: Optional[float] = None,
            num_classes: int = 0,
    ):
        super().__init__()
        if num_classes:
            raise ValueError(f'iDisc predicts depth or normals, not classes: num_classes must be 0, got {num_classes}')
        if output_dim not in (1, 4):
            raise ValueError(f'output_dim is 1 (depth) or 4 (normals: xyz and kappa), got {output_dim}')
        if in_chans != 3:
            raise ValueError(f'iDisc takes RGB images (in_chans=3), got in_chans={in_chans}')
        self.in_chans = in_chans
        self.output_dim = output_dim
        self.task = 'depth' if output_dim == 1 else 'normals'
        self.num_classes = 0
        self.num_features = self.head_hidden_size = hidden_dim  # the width the ISD heads predict from
        if encoder is None:
            if encoder_channels is None or len(encoder_channels) != 4:
                raise ValueError('without an encoder, give the widths of its four maps as encoder_channels')
            self.encoder = None
            channels = list(encoder_channels)
        else:
            self.encoder = create_encoder(encoder, pretrained_encoder, drop_path_rate)
            channels = self.encoder.channels
        if not 1 <= num_resolutions < len(channels):
            raise ValueError(f'num_resolutions must be 1..{len(channels) - 1}, got {num_resolutions}')
        self.num_resolutions = num_resolutions
        self.decoder = PixelDecoder(
            channels[::-1], hidden_dim, decoder_depth, decoder_heads, decoder_points, mlp_ratio)
        self.afp = nn.ModuleList([
            AFPScale(hidden_dim, latent_dim, num_latents, afp_depth, num_heads, mlp_ratio)
            for _ in range(num_resolutions)])
        self.isd = nn.ModuleList([
            ISDHead(hidden_dim, latent_dim, isd_depth, num_heads, mlp_ratio, output_dim)
            for _ in range(num_resolutions)])

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The encoder's four maps, stride 4 first."""
        if self.encoder is None:
            raise RuntimeError('this iDisc has no encoder (built with encoder=None): call forward_head(features, size)')
        check_image_input(x, self.in_chans, channel_hint='iDisc takes RGB images (its encoders are RGB-trained)')
        return self.encoder(x)

    def forward_head(
            self,
            features: Sequence[torch.Tensor],
            output_size: Sequence[int],
            return_intermediates: bool = False,
    ):
        """Prediction at `output_size` from the encoder maps (stride 4 first).

        With `return_intermediates`, also a dict of the decoder's `fpn` and `raw` outputs (coarsest first),
        the `idrs` and the raw per-scale head outputs `outs` (strides 16, 8, 4).
        """
        prediction, intermediates = self._forward_head(list(features), list(output_size))
        return (prediction, intermediates) if return_intermediates else prediction

    def _forward_head(
            self,
            features: List[torch.Tensor],
            output_size: List[int],
    ) -> Tuple[torch.Tensor, Dict[str, List[torch.Tensor]]]:
        """`forward_head` with its intermediates always returned: one return type, as TorchScript needs."""
        fpn, raw = self.decoder(features[::-1])
        first = len(raw) - self.num_resolutions  # the coarsest levels feed the decoder only
        idrs, outs = [], []
        for i, (afp, isd) in enumerate(zip(self.afp, self.isd)):
            r, f = raw[first + i], fpn[first + i]
            idr = afp((r + sine_position_embedding(r, r.shape[1] // 2)).flatten(2).transpose(1, 2))
            h, w = f.shape[-2:]
            out = isd((f + sine_position_embedding(f, f.shape[1] // 2)).flatten(2).transpose(1, 2), idr)
            idrs.append(idr)
            outs.append(out.transpose(1, 2).reshape(f.shape[0], self.output_dim, h, w))
        prediction = self._assemble(outs, output_size)
        return prediction, {'fpn': fpn, 'raw': raw, 'idrs': idrs, 'outs': outs}

    def _assemble(self, outs: List[torch.Tensor], output_size: List[int]) -> torch.Tensor:
        """Depth: exp, resize to the finest scale, average, resize. Normals: normalise per scale, average, bicubic."""
        size = outs[-1].shape[-2:]
        maps = []
        for out in outs:
            if self.task == 'depth':
                maps.append(F.interpolate(out.exp(), size=size, mode='bilinear', align_corners=True))
            else:
                out = F.interpolate(out, size=size, mode='bilinear', align_corners=True)
                xyz, kappa = out[:, :3], out[:, 3:]
                xyz = xyz / torch.sqrt(xyz.pow(2).sum(1, keepdim=True) + 1e-6)
                maps.append(torch.cat([xyz, F.elu(kappa) + 1.01], dim=1))
        mean = torch.stack(maps).mean(0)
        if self.task == 'depth':
            return F.interpolate(mean, size=output_size, mode='bilinear', align_corners=True)
        return F.interpolate(mean, size=output_size, mode='bicubic', align_corners=True)[:, :3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Depth (B, 1, H, W) in metres, or unit-ish normals (B, 3, H, W), at the input size."""
        return self._forward_head(self.forward_features(x), x.shape[-2:])[0]


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoints


def model_args_from_official(config: Dict) -> Dict:
    """Zoo `IDisc` kwargs for the official `IDisc.build(config)` (the json config of the official repo)."""
    model = config['model']
    encoder, decoder, afp, isd = (model[k] for k in ('pixel_encoder', 'pixel_decoder', 'afp', 'isd'))
    if not model.get('attn_dec', True):
        raise ValueError('only the deformable-attention pixel decoder (attn_dec true, every official config) is built')
    if model.get('activation', 'gelu') != 'gelu':
        raise ValueError(f'only GELU (every official config) is built, got activation {model["activation"]!r}')
    num_levels = 4
    if num_levels - afp['context_low_resolutions_skip'] != isd['num_resolutions']:
        raise ValueError('AFP and ISD must cover the same scales (4 - afp.context_low_resolutions_skip == '
                         'isd.num_resolutions)')
    args = dict(
        hidden_dim=decoder['hidden_dim'],
        decoder_depth=decoder['depths'],
        decoder_heads=decoder['heads'],
        decoder_points=decoder['anchor_points'],
        latent_dim=afp['latent_dim'],
        num_latents=afp['num_latents'],
        afp_depth=afp['depths'],
        isd_depth=isd['depths'],
        num_resolutions=isd['num_resolutions'],
        num_heads=model['num_heads'],
        mlp_ratio=model['expansion'],
        output_dim=model['output_dim'],
    )
    if encoder.get('name'):
        if encoder['name'] not in OFFICIAL_ENCODERS:
            raise ValueError(f'unknown official encoder {encoder["name"]!r}; known: {", ".join(OFFICIAL_ENCODERS)}')
        args['encoder'] = OFFICIAL_ENCODERS[encoder['name']]
    else:
        args.update(encoder=None, encoder_channels=list(encoder['embed_dims']))
    return args


def create_from_official(config: Dict, **kwargs) -> IDisc:
    """The (untrained) zoo model matching the official `IDisc.build(config)`; kwargs override its args."""
    return IDisc(**{**model_args_from_official(config), **kwargs})


# Official key -> zoo key, applied in order; `{n}` indices are 1-based officially, 0-based here.
_OFFICIAL_KEY_RENAMES = (
    (r'^pixel_encoder\.layers\.(\d+)\.downsample\.', lambda m: f'encoder.layers.{int(m[1]) + 1}.downsample.'),
    (r'^pixel_encoder\.norm(\d)\.', r'encoder.norms.\1.'),
    (r'^pixel_encoder\.', 'encoder.'),
    (r'^pixel_decoder\.input_adapter_(\d+)\.', lambda m: f'decoder.input_proj.{int(m[1]) - 1}.'),
    (r'^pixel_decoder\.transformer\.level_embed$', 'decoder.level_embed'),
    (r'^pixel_decoder\.transformer\.encoder\.layer_(\d+)\.', lambda m: f'decoder.layers.{int(m[1]) - 1}.'),
    (r'^(decoder\.layers\.\d+)\.self_attn\.', r'\1.attn.'),
    (r'^(decoder\.layers\.\d+)\.linear(\d)\.', r'\1.mlp.fc\2.'),
    (r'^pixel_decoder\.(lateral|out|fpn)(?:_fpn)?_conv_(\d+)\.norm\.',
     lambda m: f'decoder.{m[1]}_convs.{int(m[2]) - 1}.bn.'),
    (r'^pixel_decoder\.(lateral|out|fpn)(?:_fpn)?_conv_(\d+)\.weight$',
     lambda m: f'decoder.{m[1]}_convs.{int(m[2]) - 1}.conv.weight'),
    (r'^afp\.mu_(\d+)$', lambda m: f'afp.{int(m[1]) - 1}.latents'),
    (r'^afp\.cross_attn_(\d+)_d1\.', lambda m: f'afp.{int(m[1]) - 1}.attn.'),
    (r'^afp\.mlp_cross_(\d+)_d1\.', lambda m: f'afp.{int(m[1]) - 1}.mlp_seq.'),
    (r'^isd\.head_(\d+)\.cross_attn_(\d+)\.', lambda m: f'isd.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.attn.'),
    (r'^isd\.head_(\d+)\.mlp_(\d+)\.', lambda m: f'isd.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.mlp_seq.'),
    (r'^isd\.head_(\d+)\.proj_output\.', lambda m: f'isd.{int(m[1]) - 1}.proj_out.'),
    # official LN -> Linear -> GELU -> Linear sequences are a norm and a timm Mlp here
    (r'\.mlp_seq\.0\.', '.norm.'),
    (r'\.mlp_seq\.1\.', '.mlp.fc1.'),
    (r'\.mlp_seq\.3\.', '.mlp.fc2.'),
    (r'\.attn\.to_q\.', '.attn.q.'),
    (r'\.attn\.to_kv\.', '.attn.kv.'),
    (r'\.attn\.to_out\.', '.attn.proj.'),
)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: IDisc) -> Dict[str, torch.Tensor]:
    """Accept an official iDisc checkpoint (plain or `module.`-prefixed state dict) or a zoo one.

    Dropped on the way: the official ResNet's ImageNet classifier `fc` (stored, never used) and Swin's
    `relative_position_index` buffers (rebuilt by timm).
    """
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    if any(k.startswith('decoder.') for k in state_dict):
        return state_dict
    if not any(k.startswith('pixel_decoder.') for k in state_dict):
        raise ValueError(
            'not an iDisc checkpoint: expected the official layout (pixel_encoder.*, pixel_decoder.*, afp.*, isd.*) '
            f'or the zoo layout (encoder.*, decoder.*, afp.*, isd.*); its first keys are {list(state_dict)[:5]}')
    resnet = isinstance(model.encoder, ResNetEncoder)
    out = {}
    for key, value in state_dict.items():
        zoo_key = rename_official_key(key, resnet)
        if zoo_key is not None:
            out[zoo_key] = value
    return out


def rename_official_key(key: str, resnet: bool = False) -> Optional[str]:
    """The zoo key of an official iDisc key, or None for what the zoo drops (see `checkpoint_filter_fn`)."""
    if key.endswith('relative_position_index') or (resnet and key.startswith('pixel_encoder.fc.')):
        return None
    if resnet and key.startswith('pixel_encoder.'):
        return 'encoder.body.' + key.removeprefix('pixel_encoder.')
    for pattern, replacement in _OFFICIAL_KEY_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


# ---------------------------------------------------------------------------------------------------------------
# Registration


def _create_idisc(variant: str, pretrained: bool = False, **kwargs) -> IDisc:
    """Build `variant` with the settings of its pretrained tag (NYU, KITTI, NYU normals); kwargs win."""

    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    setting_args = SETTINGS.get(cfg.tag, SETTINGS['nyu'])
    model = build_zoo_model(
        IDisc, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **{**setting_args, **kwargs})
    update_model_args(model, **setting_args)  # written to config.json, so a saved KITTI model reloads as one
    return model


def _cfg(url: str = '', **kwargs) -> Dict:
    return {
        'url': url,
        'num_classes': 0,
        'input_size': (3, 480, 640),
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'classifier': '',
        'license': 'cc-by-nc-4.0',
        'paper_ids': 'arXiv:2304.06334',
        'paper_name': 'iDisc: Internal Discretization for Monocular Depth Estimation',
        'origin_url': 'https://github.com/SysCV/idisc',
        'source': 'official',
        **kwargs,
    }


_CHECKPOINTS = 'https://dl.cv.ethz.ch/idisc/checkpoints/'
_ENCODER_FILE_NAMES = {
    'resnet101': 'resnet101', 'efficientnet_b5': 'effnetb5', 'swin_tiny': 'swintiny', 'swin_base': 'swinbase',
    'swin_large': 'swinlarge',
}


_README = 'official README model zoo (SysCV/idisc)'
# Per encoder: params (M) and GMACs at the NYU (480x640) and KITTI (352x1216) input sizes, and the README's
# NYU figures (delta1, delta2, delta3, RMSE, AbsRel, log10) and KITTI Eigen-split figures (AbsRel, RMSE).
_META = {
    'resnet101': ((55.18, 180.32), (56.89, 311.76), (.892, .983, .995, .380, .109, .046), (.059, 2.362)),
    'efficientnet_b5': ((40.25, 143.21), (41.96, 260.06), (.903, .986, .997, .369, .104, .044), (.063, 2.510)),
    'swin_tiny': ((38.97, 159.07), (40.69, 282.47), (.894, .983, .996, .377, .109, .045), (.058, 2.291)),
    'swin_base': ((98.44, 231.68), (100.16, 385.29), (.926, .989, .997, .327, .091, .039), (.054, 2.149)),
    'swin_large': ((207.19, 357.97), (208.9, 563.64), (.940, .993, .999, .313, .086, .037), (.050, 2.067)),
}


def _meta(encoder: str, dataset: str) -> Dict:
    (nyu_params, nyu_gmacs), (kitti_params, kitti_gmacs), nyu, kitti = _META[encoder]
    if dataset == 'nyu':
        d1, d2, d3, rmse, abs_rel, log10 = nyu
        figures = paper('NYU Depth v2', _README, task='depth-estimation', split='test (654 images)',
                        d1=d1, d2=d2, d3=d3, rmse=rmse, abs_rel=abs_rel, log10=log10)
        params_m, gmacs = nyu_params, nyu_gmacs
    else:
        figures = paper('KITTI', _README, task='depth-estimation', split='Eigen test', abs_rel=kitti[0], rmse=kitti[1])
        params_m, gmacs = kitti_params, kitti_gmacs
    return dict(params_m=params_m, gmacs=gmacs, recipe=f'training/recipes/idisc_{encoder}_{dataset}.yaml',
                paper=[figures])


def _dataset_cfgs(encoder: str, first_conv: str) -> Dict[str, Dict]:
    file_name = _ENCODER_FILE_NAMES[encoder]
    return {
        f'idisc_{encoder}.nyu': _cfg(
            _CHECKPOINTS + f'nyu_{file_name}.pt', first_conv=first_conv, meta=_meta(encoder, 'nyu'),
            description='Official NYU Depth v2 checkpoint from the iDisc authors (640x480), converted on load.'),
        f'idisc_{encoder}.kitti': _cfg(
            _CHECKPOINTS + f'kitti_{file_name}.pt', first_conv=first_conv, input_size=(3, 352, 1216),
            meta=_meta(encoder, 'kitti'),
            description='Official KITTI (Eigen split, 1216x352 crops) checkpoint from the iDisc authors, converted '
                        'on load.'),
    }


default_cfgs = zoo_cfgs({
    **_dataset_cfgs('resnet101', 'encoder.body.conv1'),
    **_dataset_cfgs('efficientnet_b5', 'encoder.conv_stem'),
    **_dataset_cfgs('swin_tiny', 'encoder.patch_embed.proj'),
    **_dataset_cfgs('swin_base', 'encoder.patch_embed.proj'),
    **_dataset_cfgs('swin_large', 'encoder.patch_embed.proj'),
    'idisc_swin_large.nyu_normals': _cfg(
        _CHECKPOINTS + 'nyunormals_swinlarge.pt', first_conv='encoder.patch_embed.proj',
        meta=dict(params_m=207.19, gmacs=357.98, paper=[paper(
            'NYU Depth v2 surface normals', _README, task='surface-normals', split='test',
            mean_deg=14.6, median_deg=7.3, rmse_deg=22.9, within_11_25=.637)]),
        description='Official NYU surface-normals checkpoint (GeoNet annotations, 640x480) from the iDisc authors, '
                    'converted on load.'),
})

card_info = dict(
    pipeline_tag='depth-estimation',
    intended_use=(
        'Monocular metric depth estimation: indoor scenes up to 10 m with the `.nyu` weights (640x480 input), '
        'driving scenes up to 80 m with the `.kitti` weights (1216x352 crops); surface normals with '
        '`idisc_swin_large.nyu_normals`. `forward(x)` takes an ImageNet-normalised RGB batch of any size and returns '
        'depth in metres (B, 1, H, W) at that size; `zoo predict` writes a colourised depth picture. Research and '
        'non-commercial use only (the official weights are CC BY-NC 4.0).'),
    limitations=(
        'Trained on one dataset each (NYU or KITTI): metric scale does not transfer across cameras and scenes. '
        'The `.kitti` tag builds the KITTI decoder (6 deformable layers, 8 points) and `.nyu` the NYU one '
        '(4 and 4); both have the same encoder. The ResNet-101 checkpoints carry the unused ImageNet classifier, '
        'which is dropped on load (55.2M params here, 57.2M in the official count). The deformable attention runs '
        'on plain PyTorch (grid_sample), slower than the official CUDA op.'),
    usage=(
        'x = torch.rand(1, 3, {height}, {width})  # or: zoo.tasks.depth.image_to_tensor(model, pil_image)\n'
        'with torch.no_grad():\n'
        '    depth = model(x)  # (1, 1, {height}, {width}) in metres, at the input size\n'
        '# zoo.tasks.depth.save_depth_picture(model, pil_image, "depth.png") writes a colourised picture'),
    variants={
        'idisc_resnet101': 'ResNet-101 encoder (torchvision ImageNet weights); README: NYU AbsRel .109, RMSE .380; '
                           'KITTI AbsRel .059, RMSE 2.362',
        'idisc_efficientnet_b5': 'EfficientNet-B5 AdvProp encoder; README: NYU AbsRel .104, RMSE .369; KITTI AbsRel '
                                 '.063, RMSE 2.510',
        'idisc_swin_tiny': 'Swin-T encoder (IN-1k); README: NYU AbsRel .109, RMSE .377; KITTI AbsRel .058, RMSE 2.291',
        'idisc_swin_base': 'Swin-B encoder (IN-1k); README: NYU AbsRel .091, RMSE .327; KITTI AbsRel .054, RMSE 2.149',
        'idisc_swin_large': 'Swin-L encoder (IN-22k); README: NYU AbsRel .086, RMSE .313; KITTI AbsRel .050, '
                            'RMSE 2.067; NYU normals mean 14.6 deg',
    },
)


@register_model
def idisc_resnet101(pretrained: bool = False, **kwargs) -> IDisc:
    """iDisc with a ResNet-101 encoder."""
    return _create_idisc('idisc_resnet101', pretrained, **dict(dict(encoder='resnet101.tv_in1k'), **kwargs))


@register_model
def idisc_efficientnet_b5(pretrained: bool = False, **kwargs) -> IDisc:
    """iDisc with an EfficientNet-B5 (AdvProp) encoder tapped at its 2048-channel head."""
    return _create_idisc('idisc_efficientnet_b5', pretrained, **dict(dict(encoder='tf_efficientnet_b5.ap_in1k'), **kwargs))


@register_model
def idisc_swin_tiny(pretrained: bool = False, **kwargs) -> IDisc:
    """iDisc with a Swin-T encoder."""
    return _create_idisc('idisc_swin_tiny', pretrained, **dict(dict(encoder='swin_tiny_patch4_window7_224.ms_in1k'), **kwargs))


@register_model
def idisc_swin_base(pretrained: bool = False, **kwargs) -> IDisc:
    """iDisc with a Swin-B encoder (ImageNet-1k weights, as officially)."""
    return _create_idisc('idisc_swin_base', pretrained, **dict(dict(encoder='swin_base_patch4_window7_224.ms_in1k'), **kwargs))


@register_model
def idisc_swin_large(pretrained: bool = False, **kwargs) -> IDisc:
    """iDisc with a Swin-L encoder (ImageNet-22k weights)."""
    return _create_idisc('idisc_swin_large', pretrained, **dict(dict(encoder='swin_large_patch4_window7_224.ms_in22k'), **kwargs))
