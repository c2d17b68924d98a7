"""MACMD: Multi-dilated Contextual Attention and Channel Mixer Decoding for medical image segmentation.

Paper: "MACMD: Multi-dilated Contextual Attention and Channel Mixer Decoding for Medical Image
Segmentation", Maurya, Liu, Zwiggelaar (https://arxiv.org/abs/2511.05803). Official test code (no licence
file): https://github.com/lalitmaurya47/MACMD, `MACMD.py`, `ccm/ccm.py`, `network.py`.

A PVTv2-B2 encoder (timm's `pvt_v2_b2`, stages at strides 4..32) and a decoder built from:
* MCAG, a multi-dilated contextual attention gate on every encoder level (`HDConv`: four grouped 3x3
  convs at dilations 1, 2, 3, 5 whose channel quarters are summed diagonally);
* MEAB, an enhanced attention block (two HDConvs, channel and spatial attention) on the deepest level;
* APM, attention pooling modulation of the four gated levels, brought to stride 4;
* MSCCM, a cross channel-mix (VRWKV channel mix with a one-pixel quad shift) on the raw skip features;
* four up-blocks (1x1, depth-wise 9x9, 1x1, bilinear x2), a feature-fusion block before the last one,
  and deep-supervision heads at strides 2 (main), 4 and 8, each upsampled to the input size.

Deviations from the official code, all deliberate:
* The official APM builds a new `EfficientUpConvBlock` with fresh random weights for levels 2-4 on every
  forward call (never trained, never saved, BatchNorm on batch statistics). Here they are registered,
  trainable modules `decoder.apm.up_blocks.{1,2,3}` (27 state-dict entries, 14,784 parameters at C1=64).
  Official checkpoints do not hold them: `checkpoint_filter_fn` keeps the model's own (PyTorch default)
  initialisation for them and says so in a warning.
* The official channel mixer is tied to one square `img_size`; here every size comes from the features,
  so any height and width that are multiples of 32 work.
* The model returns logits (the official one returns `sigmoid(logits)` even for multi-class outputs);
  `predict_proba` gives softmax probabilities, or sigmoid ones for a single class.
* The up-blocks' LayerNorm `ln1`, built but never used by the official code, is left out.
"""
import logging
import re
from typing import Dict, List, Sequence, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct, DropPath, register_notrace_function
from timm.models import register_model
from timm.models.pvt_v2 import checkpoint_filter_fn as _pvt_v2_filter_fn

from zoo.layers import check_image_input, check_multiple_of, takes_device_dtype
from zoo.metadata import paper, zoo_cfgs
from zoo.models._builder import build_zoo_model

__all__ = ['MACMD', 'MACMDDecoder']

_logger = logging.getLogger(__name__)

_UPBLOCK_BN_EPS = 1e-6  # the official UpBlock's ConvNormAct; every other BatchNorm keeps PyTorch's 1e-5
OUTPUT_STRIDE = 32


def _conv_bn_act(
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        bias: bool = False,
        bn_eps: float = 1e-5,
        act_layer=nn.ReLU,
        **kwargs,
) -> ConvNormAct:
    """Conv -> BatchNorm -> activation, as timm's `ConvNormAct` (keys `conv.*`, `bn.*`)."""
    return ConvNormAct(
        in_chs, out_chs, kernel_size, bias=bias, norm_layer=nn.BatchNorm2d, norm_kwargs=dict(eps=bn_eps),
        act_layer=act_layer, **kwargs)


class HDConv(nn.Module):
    """Hierarchical dilated conv: grouped 3x3 convs at dilations (1, 2, 3, 5), quarters mixed diagonally.

    Output quarter k is the sum over branches j of quarter (j + k) mod 4 of branch j.
    """

    def __init__(self, in_chs: int, out_chs: int, dilations: Sequence[int] = (1, 2, 3, 5)):
        super().__init__()
        if in_chs % 4 or out_chs % 4:
            raise ValueError(f'HDConv needs channel counts divisible by 4 (groups=4), got {in_chs} -> {out_chs}')
        for i, d in enumerate(dilations):  # official names dilation_1..dilation_4
            self.add_module(f'dilation_{i + 1}', nn.Conv2d(in_chs, out_chs, 3, padding=d, dilation=d, groups=4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        mixed = self.dilation_1(x).reshape(B, 4, -1, H, W)
        # the children are dilation_1, dilation_2, ... in order (TorchScript cannot getattr a name built at run time)
        for j, conv in enumerate(self.children()):
            if j > 0:  # position k now holds quarter (k + j) mod 4
                mixed = mixed + conv(x).reshape(B, 4, -1, H, W).roll(-j, dims=1)
        return mixed.reshape(B, -1, H, W)


class MCAG(nn.Module):
    """Multi-dilated contextual attention gate: g = relu(BN(HDConv(x))); g * sigmoid(BN(conv1x1(g))).

    The official code applies an in-place ReLU to BN(HDConv(x)) before gating, so the gated tensor is the
    rectified one too.
    """

    def __init__(self, chs: int):
        super().__init__()
        self.W_g = nn.Sequential(HDConv(chs, chs), nn.BatchNorm2d(chs))
        self.psi = nn.Sequential(nn.Conv2d(chs, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.relu(self.W_g(x))
        return g * self.psi(g)


class ChannelAttention(nn.Module):
    """x * sigmoid(MLP(spatial mean of x)), bias-free MLP with a C/16 bottleneck."""

    def __init__(self, chs: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(chs, chs // reduction, bias=False), nn.ReLU(inplace=True),
            nn.Linear(chs // reduction, chs, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]


class SpatialAttention(nn.Module):
    """x * sigmoid(conv7x7([channel mean, channel max]))."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * self.conv(pooled).sigmoid()


class MEAB(nn.Module):
    """Multi-dilated enhanced attention block: (HDConv, BN, ReLU) x2, channel then spatial attention."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Sequential(
            HDConv(in_chs, out_chs), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True),
            HDConv(out_chs, out_chs), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True))
        self.ca = ChannelAttention(out_chs)
        self.sa = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sa(self.ca(self.conv(x)))


class EfficientUpConvBlock(nn.Module):
    """Nearest upsample by `scale`, depth-wise 3x3 -> BN -> ReLU -> point-wise 1x1 (both convs with bias).

    The official APM creates this block anew, randomly initialised, on every call; here it is a module.
    """

    def __init__(self, chs: int, scale: int):
        super().__init__()
        self.scale = float(scale)
        self.block = nn.Sequential(
            nn.Conv2d(chs, chs, 3, padding=1, groups=chs), nn.BatchNorm2d(chs), nn.ReLU(inplace=True),
            nn.Conv2d(chs, chs, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.interpolate(x, scale_factor=self.scale, mode='nearest'))


class APM(nn.Module):
    """Attention pooling modulation of feature levels at strides s, 2s, 4s, ... into `out_chs` at stride s.

    Each level is projected to `out_chs` and brought to the finest level's size; per-pixel softmax weights
    across levels pool them; each level is then modulated by the pool and the results are averaged.
    """

    def __init__(self, in_chs: Sequence[int], out_chs: int):
        super().__init__()
        self.num_levels = len(in_chs)
        self.channel_proj = nn.ModuleList([_conv_bn_act(c, out_chs) for c in in_chs])
        self.up_blocks = nn.ModuleList(
            [nn.Identity()] + [EfficientUpConvBlock(out_chs, 2 ** i) for i in range(1, len(in_chs))])
        self.attention_proj = nn.Sequential(
            nn.Conv2d(out_chs, out_chs // 8, 1), nn.ReLU(inplace=True), nn.Conv2d(out_chs // 8, 1, 1))
        self.modulation_proj = _conv_bn_act(out_chs, out_chs, act_layer=nn.Sigmoid)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        # loops over the module lists, indexing the features: TorchScript zips no list with a module list
        projected = []
        for i, proj in enumerate(self.channel_proj):
            projected.append(proj(features[i]))
        resized = []
        for i, up in enumerate(self.up_blocks):
            resized.append(up(projected[i]))
        levels = torch.stack(resized, dim=1)  # B,N,C,H,W
        scores = torch.stack([self.attention_proj(levels[:, i]) for i in range(self.num_levels)], dim=1)
        pooled = (scores.softmax(dim=1) * levels).sum(1)
        pooled_gate = pooled.sigmoid()
        out = torch.zeros_like(pooled)
        for i in range(self.num_levels):
            x = levels[:, i]
            out = out + self.modulation_proj((x.sigmoid() * pooled) * (pooled_gate * x)) * x
        return out / self.num_levels


@register_notrace_function  # FX: the split sizes come from the shape
def q_shift(x: torch.Tensor) -> torch.Tensor:
    """Shift four channel quarters of an NCHW map one pixel right, left, down and up (zero fill)."""
    q = x.shape[1] // 4
    right, left, down, up, rest = x.split([q, q, q, q, x.shape[1] - 4 * q], dim=1)
    return torch.cat([
        F.pad(right[..., :, :-1], (1, 0)),
        F.pad(left[..., :, 1:], (0, 1)),
        F.pad(down[..., :-1, :], (0, 0, 1, 0)),
        F.pad(up[..., 1:, :], (0, 0, 0, 1)),
        rest,
    ], dim=1)


class ChannelMix(nn.Module):
    """VRWKV channel mix on tokens: quad-shift lerp, squared-ReLU key with LayerNorm, sigmoid receptance."""

    def __init__(self, dim: int, hidden_ratio: int = 2):
        super().__init__()
        hidden = hidden_ratio * dim
        self.spatial_mix_k = nn.Parameter(torch.full((1, 1, dim), 0.5))
        self.spatial_mix_r = nn.Parameter(torch.full((1, 1, dim), 0.5))
        self.key = nn.Linear(dim, hidden, bias=False)
        self.key_norm = nn.LayerNorm(hidden)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H*W, C) tokens."""
        shifted = q_shift(x).flatten(2).transpose(1, 2)
        x = x.flatten(2).transpose(1, 2)
        xk = x * self.spatial_mix_k + shifted * (1 - self.spatial_mix_k)
        xr = x * self.spatial_mix_r + shifted * (1 - self.spatial_mix_r)
        k = self.key_norm(F.relu(self.key(xk)).square())
        return self.receptance(xr).sigmoid() * self.value(k)


class MSCCM(nn.Module):
    """Multi-scale cross channel-mix of skip features (official `CCMix`), deepest level first.

    Every level is resized to the last (finest) level's size and projected to `dim` channels; the
    concatenation gets a residual channel mix; each part is projected back and resized to its level's size.
    """

    def __init__(self, in_chs: Sequence[int], dim: int, drop_path_rate: float = 0.05):
        super().__init__()
        self.dim = dim
        self.projections = nn.ModuleList([nn.Conv2d(c, dim, 1) for c in in_chs])
        self.ln1 = nn.LayerNorm(dim * len(in_chs))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.channel = ChannelMix(dim * len(in_chs))
        self.final_projections = nn.ModuleList([nn.Conv2d(dim, c, 1) for c in in_chs])

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        size = features[-1].shape[-2:]
        projected = []
        for i, proj in enumerate(self.projections):  # indexing the features: TorchScript zips no list with modules
            projected.append(proj(F.interpolate(features[i], size=size, mode='bilinear', align_corners=False)))
        x = torch.cat(projected, dim=1)
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2) + self.drop_path(self.ln1(self.channel(x)))
        parts = tokens.transpose(1, 2).reshape(B, C, H, W).split(self.dim, dim=1)
        out = []
        for i, proj in enumerate(self.final_projections):
            out.append(F.interpolate(proj(parts[i]), size=features[i].shape[-2:], mode='bilinear', align_corners=False))
        return out


class UpBlock(nn.Module):
    """1x1 conv -> depth-wise 9x9 (SiLU) -> 1x1 projection, each with BN(eps 1e-6), then bilinear x2."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 9):
        super().__init__()
        self.conv = _conv_bn_act(in_chs, in_chs, bn_eps=_UPBLOCK_BN_EPS)
        self.conv_local = _conv_bn_act(
            in_chs, in_chs, kernel_size, groups=in_chs, act_layer=nn.SiLU, bn_eps=_UPBLOCK_BN_EPS)
        self.proj = _conv_bn_act(in_chs, out_chs, bn_eps=_UPBLOCK_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.conv_local(self.conv(x)))
        return F.interpolate(x, scale_factor=2.0, mode='bilinear', align_corners=False)


class FeatureFusionBlock(nn.Module):
    """Fuse three C-channel maps into 2C: 1x1 conv + BN, channel and spatial attention, 1x1 conv."""

    def __init__(self, chs: int):
        super().__init__()
        self.fusion_conv = nn.Conv2d(3 * chs, 2 * chs, 1, bias=False)
        self.bn = nn.BatchNorm2d(2 * chs)
        self.channel_attention = ChannelAttention(2 * chs)
        self.spatial_attention = SpatialAttention()
        self.output_conv = nn.Conv2d(2 * chs, 2 * chs, 1, bias=False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.fusion_conv(torch.cat([x1, x2, x3], dim=1)))
        return self.output_conv(self.spatial_attention(self.channel_attention(x)))


class MACMDDecoder(nn.Module):
    """The MACMD decoder on four encoder levels (strides 4, 8, 16, 32; channels `embed_dims`).

    Returns [dec0, dec1, dec2]: `out_chs` channels at stride 2, embed_dims[0] at stride 4, embed_dims[1]
    at stride 8, the inputs of the three deep-supervision heads.
    """

    def __init__(self, embed_dims: Sequence[int], out_chs: int = 32):
        super().__init__()
        if len(embed_dims) != 4:
            raise ValueError(f'MACMD decodes four encoder levels, got embed_dims={list(embed_dims)}')
        c1, c2, c3, c4 = embed_dims
        self.mcag = nn.ModuleList([MCAG(c) for c in embed_dims])
        self.meab = MEAB(c4, c4)
        self.apm = APM(embed_dims, c1)
        self.msccm = MSCCM([c3, c2, c1], c1)
        self.blocks = nn.ModuleList([
            UpBlock(c4, c3), UpBlock(2 * c3, c2), UpBlock(2 * c2, c1), UpBlock(2 * c1, out_chs)])
        self.ffb = FeatureFusionBlock(c1)

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        enc1, enc2, enc3 = features[0], features[1], features[2]
        gated = []
        for i, gate in enumerate(self.mcag):  # indexing the features: TorchScript zips no list with modules
            gated.append(gate(features[i]))
        gated[3] = self.meab(gated[3])
        pooled = self.apm(gated)
        skip3, skip2, skip1 = self.msccm([enc3, enc2, enc1])  # the raw features, not the gated ones
        dec2 = self.blocks[1](torch.cat([self.blocks[0](gated[3]), skip3], dim=1))
        dec1 = self.blocks[2](torch.cat([dec2, skip2], dim=1))
        dec0 = self.blocks[3](self.ffb(dec1, skip1, pooled))
        return [dec0, dec1, dec2]


@takes_device_dtype
class MACMD(nn.Module):
    """MACMD segmentation model: timm encoder, MACMD decoder, deep-supervision heads.

    `forward(x)` returns the main head's logits (B, num_classes, H, W) at the input size; `forward_train(x)`
    returns all three heads' logits [main, stride-4 head, stride-8 head] for deep supervision (the official
    recipe sums one loss per head, equal weights). After `set_deep_supervision()`, `forward` in training mode
    returns `forward_train`'s list, so a training loop reaches the three heads through a DDP / Accelerate wrapper
    (as timm's distilled models do with `set_distilled_training`). `num_classes=0` builds no
    heads: `forward` then returns the main head's input, the decoder's stride-2 map (B, num_features, H/2, W/2).

    Args:
        num_classes: Output classes, background included (Synapse: 9). 1 gives a binary mask (sigmoid).
        in_chans: 1 or 3. One-channel input (CT) first goes through the official Conv1x1(1->3)+BN+ReLU stem.
        encoder: timm model name of the encoder (the paper's: `pvt_v2_b2`); it must have
            `forward_intermediates` and four stages.
        pretrained_encoder: Load the encoder's ImageNet weights through timm.
        drop_path_rate: Encoder stochastic depth (official PVTv2-B2: 0.1).
    """
    task = 'segmentation'
    # What forward returns in training mode after set_deep_supervision(), for a training loop's loss
    # (zoo.train.dense).
    deep_supervision_outputs = ('main', 'stride 4', 'stride 8')

    def __init__(
            self,
            num_classes: int = 9,
            in_chans: int = 1,
            encoder: str = 'pvt_v2_b2',
            pretrained_encoder: bool = False,
            drop_path_rate: float = 0.1,
    ):
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f'MACMD takes 1-channel (CT, MRI) or 3-channel (RGB) images, got in_chans={in_chans}')
        self.in_chans = in_chans
        self.output_stride = OUTPUT_STRIDE  # an instance attribute: TorchScript takes no global ints
        self.stem = _conv_bn_act(1, 3, bias=True) if in_chans == 1 else nn.Identity()
        self.encoder = timm.create_model(
            encoder, pretrained=pretrained_encoder, num_classes=0, drop_path_rate=drop_path_rate)
        self.embed_dims = [info['num_chs'] for info in self.encoder.feature_info][-4:]
        self.decoder = MACMDDecoder(self.embed_dims)
        # channels of the main head's input (timm's names; config.json records num_features)
        self.num_features = self.head_hidden_size = 32
        self.deep_supervision = False
        self.reset_classifier(num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self.in_chans, self.output_stride)
        check_multiple_of(x, self.output_stride, 'MACMD', 'the encoder stride, which the decoder undoes in steps of 2')

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    @torch.jit.ignore
    def set_deep_supervision(self, enable: bool = True) -> None:
        """In training mode, `forward` returns the three heads' logits (`forward_train`) when enabled."""
        self.deep_supervision = enable

    def reset_classifier(self, num_classes: int) -> None:
        """New, randomly initialised main and deep-supervision heads with `num_classes` outputs (0: none)."""
        like = next(self.decoder.parameters())
        device, dtype = like.device, like.dtype
        self.num_classes = num_classes
        if num_classes:
            self.head = nn.Conv2d(self.num_features, num_classes, 1, device=device, dtype=dtype)
            self.aux_heads = nn.ModuleList(  # strides 4, 8
                [nn.Conv2d(c, num_classes, 1, device=device, dtype=dtype) for c in self.embed_dims[:2]])
        else:
            self.head, self.aux_heads = nn.Identity(), nn.ModuleList()

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The decoder outputs [dec0, dec1, dec2] (strides 2, 4, 8) for an image batch."""
        self._check_input(x)
        features = self.encoder.forward_intermediates(self.stem(x), intermediates_only=True)
        assert isinstance(features, list)  # for TorchScript: intermediates_only gives the list alone
        return self.decoder(features[-4:])

    def forward_head(self, features: List[torch.Tensor], size: List[int]) -> torch.Tensor:
        """The main head's logits at `size` (H, W); with no heads, the decoder's stride-2 map."""
        if self.num_classes == 0:
            return features[0]
        return F.interpolate(self.head(features[0]), size=size, mode='bilinear', align_corners=False)

    def forward_train(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Logits of the three heads, each at the input size: [main (stride 2), stride 4, stride 8]."""
        if self.num_classes == 0:
            raise ValueError('this MACMD was built with num_classes=0: it has no heads to supervise')
        size = x.shape[-2:]
        features = self.forward_features(x)
        logits = [self.head(features[0])]
        for i, head in enumerate(self.aux_heads):
            logits.append(head(features[i + 1]))
        return [F.interpolate(y, size=size, mode='bilinear', align_corners=False) for y in logits]

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Main-head logits at the input size; in training mode after `set_deep_supervision()`, the three heads'."""
        if self.deep_supervision and self.training and not torch.jit.is_scripting():
            return self.forward_train(x)
        return self.forward_head(self.forward_features(x), x.shape[-2:])

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class probabilities: softmax over classes, or sigmoid for a single-class model."""
        logits = self(x)
        return logits.sigmoid() if self.num_classes == 1 else logits.softmax(dim=1)


def create_from_official(**official_kwargs) -> nn.Module:
    """The (untrained) zoo module matching an official constructor called with `official_kwargs`.

    `network.PVT_B2_MACMD(n_classes, n_channels, img_size, encoder, pretrain, ...)` gives a `MACMD`;
    `MACMD.MACMD(embed_dims, img_size)` (the decoder alone) gives a `MACMDDecoder`. `img_size` is not
    needed (sizes come from the input) and `pretrain` does not matter (the checkpoint brings the weights).
    """
    if 'embed_dims' in official_kwargs:
        return MACMDDecoder(official_kwargs['embed_dims'])
    encoder = official_kwargs.get('encoder', 'pvt_v2_b2')
    if not re.fullmatch(r'pvt_v2_b[0-5]', encoder):
        raise ValueError(
            f'only the official PVTv2 encoders (pvt_v2_b0 ... pvt_v2_b5) are built; network.py\'s MaxViT branch '
            f'is broken and its ResNet channel lists are wrong. Got encoder={encoder!r}')
    return MACMD(
        num_classes=official_kwargs.get('n_classes', 9), in_chans=official_kwargs.get('n_channels', 1), encoder=encoder)


# Official decoder key -> zoo decoder key, applied in order.
_DECODER_RENAMES = (
    (r'^ag(\d)\.', lambda m: f'mcag.{int(m.group(1)) - 1}.'),
    (r'^acb\.conv\.conv\.', 'meab.conv.'),
    (r'^acb\.', 'meab.'),
    (r'^ccm\.', 'msccm.'),
    (r'^decoder(\d)\.', lambda m: f'blocks.{int(m.group(1)) - 1}.'),
    (r'^(blocks\.\d\.\w+)\.norm\.', r'\1.bn.'),
    (r'^apm\.(channel_proj\.\d|modulation_proj)\.0\.', r'apm.\1.conv.'),
    (r'^apm\.(channel_proj\.\d|modulation_proj)\.1\.', r'apm.\1.bn.'),
)
_TOP_RENAMES = (
    (r'^conv\.0\.', 'stem.conv.'),
    (r'^conv\.1\.', 'stem.bn.'),
    (r'^out_head\.', 'head.'),
    (r'^out_head3\.', 'aux_heads.0.'),
    (r'^out_head2\.', 'aux_heads.1.'),
)
# Keys that official checkpoints lack: the APM up-blocks, created afresh on every official forward call.
RUNTIME_BLOCK_PATTERN = re.compile(r'(^|\.)apm\.up_blocks\.')


def _rename(key: str, renames) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def _official_decoder_to_zoo(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Decoder keys (no `decoder.` prefix) from the official layout, without the unused UpBlock `ln1`."""
    return {
        _rename(k, _DECODER_RENAMES): v for k, v in state_dict.items()
        if not re.match(r'^decoder\d\.ln1\.', k)}


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Accept an official MACMD checkpoint (`PVT_B2_MACMD` or decoder-only `MACMD`, raw or DDP-prefixed)
    or a zoo one, for a `MACMD` or `MACMDDecoder`.

    From the official layout: the encoder keys go through timm's PVTv2 filter; the stem `conv.*` is dropped
    for a 3-channel model (the official forward uses it only on 1-channel input); the unused UpBlock `ln1`
    is dropped. The APM up-blocks (`decoder.apm.up_blocks.{1,2,3}.*`) are not in any official checkpoint:
    unless the state dict brings them, the model's own initialisation is kept for them, with a warning.
    """
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    decoder_only = isinstance(model, MACMDDecoder)
    zoo_marker = 'mcag.0.W_g.1.weight' if decoder_only else 'decoder.mcag.0.W_g.1.weight'
    if zoo_marker in state_dict:
        return state_dict
    official_marker = 'ag1.W_g.1.weight' if decoder_only else 'decoder.ag1.W_g.1.weight'
    if official_marker not in state_dict:
        layout = 'MACMD.MACMD (ag1.*, acb.*, apm.*, ccm.*, decoder1.*, ffb.*)' if decoder_only else \
            'PVT_B2_MACMD (conv.*, backbone.*, decoder.*, out_head*.*)'
        raise ValueError(
            f'not a MACMD checkpoint for a {type(model).__name__}: expected the official {layout} or the zoo '
            f'layout; its first keys are {list(state_dict)[:5]}')

    if decoder_only:
        out = _official_decoder_to_zoo(state_dict)
    else:
        parts = {'backbone.': {}, 'decoder.': {}, '': {}}
        for k, v in state_dict.items():
            prefix = next(p for p in parts if k.startswith(p))
            parts[prefix][k[len(prefix):]] = v
        out = {}
        for k, v in parts[''].items():
            if k.startswith('conv.') and model.in_chans != 1:
                continue
            out[_rename(k, _TOP_RENAMES)] = v
        out.update({f'encoder.{k}': v for k, v in _pvt_v2_filter_fn(parts['backbone.'], model.encoder).items()})
        out.update({f'decoder.{k}': v for k, v in _official_decoder_to_zoo(parts['decoder.']).items()})

    runtime_keys = [k for k in model.state_dict() if RUNTIME_BLOCK_PATTERN.search(k) and k not in out]
    if runtime_keys:
        blocks = sorted({k.split('.block.')[0] for k in runtime_keys})
        _logger.warning(
            'The official MACMD checkpoint has no weights for the APM up-blocks %s (%d entries), which the '
            'official code creates with fresh random weights on every forward call; they keep this model\'s '
            'initialisation: fine-tune before use', ', '.join(blocks), len(runtime_keys))
        out.update({k: v.detach().clone() for k, v in model.state_dict().items() if k in runtime_keys})
    return out


def _create_macmd(variant: str, pretrained: bool = False, **kwargs) -> MACMD:
    """Build a variant; `pretrained` loads the encoder's ImageNet weights through timm (no published
    weights exist for the whole zoo model; official checkpoints convert with `zoo convert macmd`)."""
    kwargs.setdefault('pretrained_encoder', pretrained)
    return build_zoo_model(MACMD, variant, False, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 9,
        'input_size': (1, 224, 224),
        'crop_pct': 1.0,
        'interpolation': 'bicubic',
        'mean': (0.,),
        'std': (1.,),
        'first_conv': 'stem.conv',
        'classifier': ('head', 'aux_heads.0', 'aux_heads.1'),
        'license': 'unknown',
        'paper_ids': 'arXiv:2511.05803',
        'paper_name': 'MACMD: Multi-dilated Contextual Attention and Channel Mixer Decoding for Medical Image '
                      'Segmentation',
        'origin_url': 'https://github.com/lalitmaurya47/MACMD',
        **kwargs,
    }


default_cfgs = zoo_cfgs({
    'macmd_pvt_v2_b2.untrained': _cfg(
        meta=dict(params_m=34.61, gmacs=6.13, recipe='training/recipes/macmd_pvt_v2_b2_synapse.yaml',
                  paper=[paper('Synapse multi-organ CT', "authors' test log (lalitmaurya47/MACMD)",
                               task='image-segmentation', split='test (12 cases)', dice=83.27, hd95_mm=14.92)]),
        notes=(
            'Official weights do exist, but not in a form the zoo can fetch: the authors\' Synapse checkpoint '
            'is on Google Drive (id 132wfiwJYy1BGdl4b1mjUanG7LzwDrIj2, `best.pth`). Download it by hand, then '
            '`zoo convert macmd best.pth --out DIR` writes a Hub folder for `timm.create_model("local-dir:DIR")`. '
            'It holds no weights for the APM up-blocks, which the official code re-creates at random on every '
            'call: they keep their initialisation, so fine-tune before trusting its outputs.',
            'pretrained=True loads only the PVTv2-B2 encoder (timm `pvt_v2_b2.in1k`), as the official training '
            'does; the decoder starts at PyTorch\'s default initialisation. Input: 1-channel slices scaled '
            'to [0, 1] (Synapse preprocessing: HU clipped to [-125, 275]).',
        ),
    ),
})

card_info = dict(
    pipeline_tag='image-segmentation',
    intended_use=(
        '2-D medical image segmentation: multi-organ CT slices (Synapse, 9 classes with background), and '
        'binary lesion masks (ISIC skin lesions, BUSI ultrasound) with `num_classes=1, in_chans=3`. '
        '`forward` gives logits at the input size, `predict_proba` probabilities, `forward_train` the three '
        'deep-supervision outputs; `zoo.tasks.segmentation` has the loss (0.4 CE + 0.6 Dice per head), Dice '
        'and HD95.'),
    limitations=(
        'Height and width must be multiples of 32. The APM up-blocks are trainable modules here, where the '
        'official code draws them at random on every call (outputs of the official model are not even '
        'repeatable), so official weights reproduce every other part of the decoder but not the APM branch '
        'until fine-tuned. Outputs are logits, not the official sigmoid outputs, and the official loss applies '
        'CE and softmax-Dice to those sigmoid outputs. The MaxViT variant named in the paper is not built: '
        'its official code path is broken. The paper\'s tables could not be read offline; the Synapse figures '
        'above come from the official test log. No licence file in the official repository.'),
    variants={
        'macmd_pvt_v2_b2': 'PVTv2-B2 encoder; official model 34.60M params, 6.14 GMACs at 224x224 (computed); '
                           'Synapse test (official log): mean Dice 83.27%, HD95 14.92 mm',
    },
    usage=(
        'x = torch.rand(1, {channels}, {height}, {width})  # a CT slice scaled to [0, 1]\n'
        'with torch.no_grad():\n'
        '    mask = model.predict_proba(x).argmax(1)  # (1, {height}, {width}) class indices'),
)


@register_model
def macmd_pvt_v2_b2(pretrained: bool = False, **kwargs) -> MACMD:
    """MACMD with a PVTv2-B2 encoder, the official Synapse config (9 classes, 1-channel input)."""
    return _create_macmd('macmd_pvt_v2_b2', pretrained=pretrained, **kwargs)
