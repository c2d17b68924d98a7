"""HNeRV: a hybrid neural representation for videos.

Paper: "HNeRV: A Hybrid Neural Representation for Videos", Chen et al., CVPR 2023
(https://arxiv.org/abs/2304.02633). Official code (no license file): https://github.com/haochen-rye/HNeRV,
`model_all.py` (`HNeRV`, `ConvNeXt`, `NeRVBlock`) and `train_nerv_all.py` (the sizing rule).

One model represents one video. A ConvNeXt encoder maps each frame to a tiny embedding (16x2x4 for a
640x1280 frame); a decoder of HNeRV blocks (conv -> PixelShuffle -> GELU, kernels 1, 3, 5, 5, ..., widths
divided by 1.2 per stage) turns an embedding back into the frame, through a 3x3 head and 0.5*tanh+0.5.
A compressed video is the decoder plus one embedding per frame; the encoder is only needed to make them.

The first decoder width (`fc_dim`, the paper's c2) is solved from a target size in millions of parameters
(decoder without head + all frame embeddings) with the official quadratic; for Bunny (640x1280, 132 frames)
it gives Table 17's 32 / 48 / 68 / 97 for 0.35 / 0.75 / 1.5 / 3M.

The official code also runs NeRV's frame-index input through the same decoder ("NeRV mode", the paper's
NeRV baseline): `pe=(base, levels)` builds that, so such checkpoints convert too.
"""
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d, trunc_normal_
from timm.models import register_model
from timm.models._input import update_model_args
from timm.models.convnext import ConvNeXtBlock

from zoo.layers import takes_device_dtype
from zoo.layers.nerv import NeRVBlock, act_layer_from_official, check_frame_index, check_frame_size, check_positive
from zoo.metadata import paper, zoo_cfgs
from zoo.models._builder import build_video_model, load_state_dict_strict, mark_official, read_checkpoint

__all__ = ['HNeRV', 'hnerv_fc_dim', 'load_quantized_release', 'dequantize_tensor']


# ---------------------------------------------------------------------------------------------------------------
# Sizing


def decoder_widths(fc_dim: int, num_stages: int, reduce: float, lower_width: int) -> List[int]:
    """Width after each decoder stage: max(round(C / reduce), lower_width), Python's banker's rounding as in
    the official code (it makes 57 -> 48 from round(47.5))."""
    widths, width = [], fc_dim
    for _ in range(num_stages):
        width = int(max(round(width / reduce), lower_width))
        widths.append(width)
    return widths


def decoder_kernels(num_stages: int, kernel_sizes: Tuple[int, int]) -> List[int]:
    """Kernel of stage i: min(k_min + 2i, k_max), e.g. 1, 3, 5, 5, 5 for (1, 5)."""
    k_min, k_max = kernel_sizes
    return [min(k_min + 2 * i, k_max) for i in range(num_stages)]


def hnerv_fc_dim(
        frame_size: Tuple[int, int],
        num_frames: int,
        model_size: float,
        enc_strides: Sequence[int] = (5, 4, 4, 2, 2),
        dec_strides: Optional[Sequence[int]] = None,
        embed_dim: int = 16,
        kernel_sizes: Tuple[int, int] = (1, 5),
        reduce: float = 1.2,
) -> int:
    """The first decoder width c2 for a target size of `model_size` million parameters (official rule).

    The embeddings take d * H * W / prod(enc_strides)^2 * num_frames of the budget; the decoder gets the rest,
    and c2 is the floor of the positive root of a*x^2 + b*x = budget, with
    a = (1/r) * sum_i (1/r)^(2i) * s_i^2 * k_i^2 and b = 9 * d * (prod(enc) / prod(dec))^2.
    """
    dec_strides = tuple(dec_strides or enc_strides)
    check_frame_size(frame_size, enc_strides)
    embed_params = embed_dim * frame_size[0] * frame_size[1] / math.prod(enc_strides) ** 2 * num_frames
    budget = model_size * 1e6 - embed_params
    if budget <= 0:
        raise ValueError(
            f'a {model_size}M model cannot hold {num_frames} frame embeddings of {int(embed_params / num_frames)} '
            f'values ({embed_params / 1e6:.3f}M): raise model_size or lower embed_dim')
    kernels = decoder_kernels(len(dec_strides), kernel_sizes)
    r = 1. / reduce
    a = r * sum(r ** (2 * i) * s ** 2 * k ** 2 for i, (s, k) in enumerate(zip(dec_strides, kernels)))
    b = embed_dim * (math.prod(enc_strides) // math.prod(dec_strides)) ** 2 * 9
    return int((-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a))


# ---------------------------------------------------------------------------------------------------------------
# Blocks


class ConvNeXtEncoder(nn.Module):
    """The official HNeRV encoder: a ConvNeXt with one stage per stride, downsampling by kernel = stride convs.

    Stage 0 downsamples with conv -> LayerNorm (the stem), later stages with LayerNorm -> conv; every stage
    then has `depth` timm ConvNeXt blocks (7x7 depthwise, 4x MLP, layer scale). No final norm.
    """

    def __init__(self, strides: Sequence[int], dims: Sequence[int], depth: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], strides[0], stride=strides[0]), LayerNorm2d(dims[0]))
        stages = []
        for i, (stride, dim) in enumerate(zip(strides, dims)):
            stage = nn.Module()
            stage.downsample = nn.Identity() if i == 0 else nn.Sequential(
                LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, stride, stride=stride))
            stage.blocks = nn.Sequential(*[ConvNeXtBlock(dim, ls_init_value=1e-6) for _ in range(depth)])
            stages.append(stage)
        self.stages = nn.ModuleList(stages)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The official encoder init: truncated normal (std 0.02) conv / linear weights, zero biases."""
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage.blocks(stage.downsample(x))
        return x


class HNeRVDecoder(nn.Module):
    """Embedding -> frame: a 1x1 conv + act ("FC"), HNeRV blocks, a 3x3 head and the output activation.

    The stem's output channels are unfolded into an fc_h x fc_w grid (a no-op for HNeRV, where fc_h = fc_w = 1;
    NeRV mode's 1x1 positional encoding becomes the first feature map here).
    """

    def __init__(
            self,
            in_chs: int,
            fc_dim: int,
            fc_hw: Tuple[int, int],
            strides: Sequence[int],
            widths: Sequence[int],
            kernels: Sequence[int],
            depth: int = 1,
            act_layer: str = 'gelu',
            out_act: str = 'tanh',
    ):
        super().__init__()
        if out_act not in ('tanh', 'sigmoid'):
            raise ValueError(f"out_act must be 'tanh' (0.5*tanh+0.5) or 'sigmoid', got {out_act!r}")
        self.fc_hw = tuple(fc_hw)
        self.out_act = out_act
        self.stem = NeRVBlock(in_chs, fc_dim * fc_hw[0] * fc_hw[1], stride=1, kernel_size=1, act_layer=act_layer)
        blocks, width = [], fc_dim
        for stride, out_width, kernel in zip(strides, widths, kernels):
            for j in range(depth):  # extra blocks of a stage keep its width at stride 1
                blocks.append(NeRVBlock(width, out_width, 1 if j else stride, kernel, act_layer=act_layer))
                width = out_width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(width, 3, 3, padding=1)

    band_pixels = 16384  # output pixels per band of the fast path's last block: a few MB, within the L3 cache

    def forward_features(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        return self.blocks(self._first_map(x, channels_last))

    def _first_map(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        x = self.stem(x)
        fc_h, fc_w = self.fc_hw
        if fc_h * fc_w > 1:
            n, _, h, w = x.shape
            x = x.view(n, -1, fc_h, fc_w, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, -1, fc_h * h, fc_w * w)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def _banded_last_block_and_head(self, x: torch.Tensor) -> torch.Tensor:
        """head(blocks[-1](x)) by bands of output rows (a one-row halo for the 3x3 head), so the last block's
        full-resolution output never makes a trip to memory; the same values up to float rounding."""
        last = self.blocks[-1]
        s = getattr(last.shuffle, 'upscale_factor', 1)
        up = last.conv(x)
        B, _, H, W = up.shape
        out = up.new_empty(B, 3, s * H, s * W)
        band = max(1, self.band_pixels // (s * s * W))
        for b in range(B):
            for r0 in range(0, H, band):
                r1 = min(r0 + band, H)
                lo, hi = max(r0 - 1, 0), min(r1 + 1, H)
                y = self.head(last.act(last.shuffle(up[b:b + 1, :, lo:hi])))
                out[b:b + 1, :, s * r0:s * r1] = y[:, :, s * (r0 - lo):s * (r1 - lo)]
        return out

    def forward(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """Frames in [0, 1]; `channels_last` runs the blocks and head in NHWC memory layout, the last block and
        the head by bands of rows (same values up to float rounding, faster on CPU), and returns contiguous
        frames."""
        if channels_last:
            x = self._banded_last_block_and_head(self.blocks[:-1](self._first_map(x, True)))
        else:
            x = self.head(self.forward_features(x))
        return torch.tanh(x) * 0.5 + 0.5 if self.out_act == 'tanh' else torch.sigmoid(x)


# ---------------------------------------------------------------------------------------------------------------
# Model


@takes_device_dtype
class HNeRV(nn.Module):
    """HNeRV for one video of `num_frames` frames of `frame_size` (H, W).

    Args:
        frame_size: (H, W) of the frames; multiples of prod(enc_strides).
        num_frames: Frames in the video (the embeddings of all of them count towards the size).
        model_size: Target size in millions (decoder without head + all embeddings); solves `fc_dim`.
        fc_dim: First decoder width (c2); overrides `model_size` when given.
        enc_strides: Encoder downsampling per ConvNeXt stage (their product maps the frame to the embedding).
        dec_strides: Decoder upsampling per stage (default: `enc_strides`).
        enc_dim: Width of every encoder stage but the last.
        embed_dim: Channels of the frame embedding (the last encoder stage's width).
        enc_depth, dec_depth: ConvNeXt blocks per encoder stage, HNeRV blocks per decoder stage.
        kernel_sizes: (k_min, k_max): decoder stage i uses min(k_min + 2i, k_max).
        reduce: Width divisor per decoder stage.
        lower_width: Smallest decoder width.
        act_layer: Decoder activation (timm name).
        out_act: 'tanh' (0.5*tanh+0.5) or 'sigmoid'.
        pe: (base, levels) builds the official NeRV mode instead: no encoder, frame index in, the embedding is
            the sinusoidal encoding of t = index / num_frames (all sines, then all cosines, in float64).
        fc_hw: NeRV mode only: the grid the stem output is unfolded to.
        stored_frames: Carry that many frame embeddings in the model (`frame_embeddings`, saved with it), as a
            release without an encoder does (the official quantized Bunny); set when such a release is loaded.
    """

    def __init__(
            self,
            frame_size: Tuple[int, int] = (640, 1280),
            num_frames: int = 132,
            model_size: float = 1.5,
            fc_dim: Optional[int] = None,
            enc_strides: Sequence[int] = (5, 4, 4, 2, 2),
            dec_strides: Optional[Sequence[int]] = None,
            enc_dim: int = 64,
            embed_dim: int = 16,
            enc_depth: int = 1,
            dec_depth: int = 1,
            kernel_sizes: Tuple[int, int] = (1, 5),
            reduce: float = 1.2,
            lower_width: int = 12,
            act_layer: str = 'gelu',
            out_act: str = 'tanh',
            pe: Optional[Tuple[float, int]] = None,
            fc_hw: Optional[Tuple[int, int]] = None,
            stored_frames: int = 0,
    ):
        super().__init__()
        check_positive(num_frames=num_frames, frame_size=tuple(frame_size), model_size=model_size, fc_dim=fc_dim,
                       enc_strides=tuple(enc_strides), dec_strides=dec_strides and tuple(dec_strides), enc_dim=enc_dim,
                       embed_dim=embed_dim, enc_depth=enc_depth, dec_depth=dec_depth, kernel_sizes=tuple(kernel_sizes),
                       reduce=reduce, lower_width=lower_width, pe=pe and tuple(pe), fc_hw=fc_hw and tuple(fc_hw))
        self.frame_size = tuple(frame_size)
        self.num_frames = num_frames
        dec_strides = tuple(dec_strides or enc_strides)
        if pe is None:
            if not enc_strides:
                raise ValueError('HNeRV needs enc_strides (one per encoder stage), or pe=(base, levels) for NeRV mode')
            check_frame_size(self.frame_size, enc_strides)
            if math.prod(enc_strides) % math.prod(dec_strides):
                raise ValueError(
                    f'prod(enc_strides) = {math.prod(enc_strides)} must be a multiple of prod(dec_strides) = '
                    f'{math.prod(dec_strides)}, so that the decoder restores the frame size')
            self.input_kind, self.stored_embeddings = 'frames', True
            self.enc_strides = tuple(enc_strides)
            hw = math.prod(enc_strides) // math.prod(dec_strides)
            fc_hw = (hw, hw)
            if fc_dim is None:
                fc_dim = hnerv_fc_dim(
                    self.frame_size, num_frames, model_size, enc_strides, dec_strides, embed_dim, kernel_sizes, reduce)
            self.encoder = ConvNeXtEncoder(enc_strides, [enc_dim] * (len(enc_strides) - 1) + [embed_dim], enc_depth)
            self.embed_shape = (embed_dim, self.frame_size[0] // math.prod(enc_strides),
                                self.frame_size[1] // math.prod(enc_strides))
            self.pe_base, self.pe_levels = None, 0
        else:
            if fc_hw is None or fc_dim is None:
                raise ValueError('NeRV mode (pe=...) needs fc_hw and fc_dim')
            out_size = (fc_hw[0] * math.prod(dec_strides), fc_hw[1] * math.prod(dec_strides))
            if self.frame_size != out_size:
                raise ValueError(
                    f'in NeRV mode the frame size is fc_hw * prod(dec_strides) = {out_size[0]}x{out_size[1]}, '
                    f'got frame_size {self.frame_size}')
            self.input_kind, self.stored_embeddings = 'index', False
            self.encoder = None
            self.pe_base, self.pe_levels = float(pe[0]), int(pe[1])
            self.embed_shape = (2 * self.pe_levels, 1, 1)
        self.fc_dim = fc_dim
        widths = decoder_widths(fc_dim, len(dec_strides), reduce, lower_width)
        self.num_classes, self.num_features = 0, widths[-1]  # timm's Hub export reads both
        self.fast_decode = True
        self.decoder = HNeRVDecoder(
            self.embed_shape[0], fc_dim, fc_hw, dec_strides, widths, decoder_kernels(len(dec_strides), kernel_sizes),
            depth=dec_depth, act_layer=act_layer, out_act=out_act)
        if stored_frames:
            self.register_buffer('frame_embeddings', torch.zeros(stored_frames, *self.embed_shape))

    def example_inputs(self, device: Union[str, torch.device] = 'cpu') -> Dict[str, torch.Tensor]:
        """Forward kwargs for one frame."""
        if self.input_kind == 'index':
            return dict(index=torch.zeros(1, dtype=torch.long, device=device))
        return dict(frames=torch.zeros(1, 3, *self.frame_size, device=device))

    def _positional_encoding(self, index: torch.Tensor) -> torch.Tensor:
        """The official NeRV-mode encoding: float32 bases b^k * pi, evaluated on float64 t, then cast."""
        bases = self.pe_base ** torch.arange(self.pe_levels) * math.pi
        values = (index.to(torch.float64) / self.num_frames)[:, None] * bases.to(index.device, torch.float64)
        return torch.cat([torch.sin(values), torch.cos(values)], dim=-1).float().view(-1, 2 * self.pe_levels, 1, 1)

    def encode(self, frames: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None,
               interpolate: bool = False) -> torch.Tensor:
        """Frame embeddings (B, embed_dim, H/P, W/P) of frames (B, 3, H, W) in [0, 1] (P = prod(enc_strides)),
        or in NeRV mode the encodings (B, 2*levels, 1, 1) of frame indices (B,): fitted frames 0..num_frames - 1,
        or with `interpolate` fractional indices between them."""
        if self.input_kind == 'index':
            if index is None:
                raise ValueError('this HNeRV runs in NeRV mode: encode(index=...) takes frame indices (B,)')
            check_frame_index(index, self.num_frames, interpolate)
            return self._positional_encoding(index)
        if frames is None:
            raise ValueError('HNeRV encodes frames: pass encode(frames=...) with a (B, 3, H, W) batch in [0, 1]')
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f'expected frames of shape (B, 3, H, W), got {tuple(frames.shape)}')
        check_frame_size(tuple(frames.shape[-2:]), self.enc_strides)
        return self.encoder(frames)

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Frames (B, 3, H, W) in [0, 1] from embeddings (B, C, h, w), e.g. ones stored in a bitstream.

        Without autograd (inference, evaluation) and with `fast_decode` (the default) the decoder runs in
        channels-last layout, its last block and head by bands of rows: the same frames up to float rounding,
        faster. Set `model.fast_decode = False` for the plain path.
        """
        if embeddings.ndim != 4 or embeddings.shape[1] != self.embed_shape[0]:
            raise ValueError(
                f'expected embeddings of shape (B, {", ".join(map(str, self.embed_shape))}), got {tuple(embeddings.shape)}')
        return self.decoder(embeddings, channels_last=self.fast_decode and not torch.is_grad_enabled())

    def forward(self, frames: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None,
                interpolate: bool = False) -> torch.Tensor:
        return self.decode(self.encode(frames=frames, index=index, interpolate=interpolate))

    def decoder_state_dict(self) -> Dict[str, torch.Tensor]:
        """What a bitstream carries besides the embeddings: every tensor but the encoder's (and the stored
        embeddings, which a bitstream keeps as its own section)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(('encoder.', 'frame_embeddings'))}

    def load_decoder_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Load `decoder_state_dict()`-keyed tensors, all of them or nothing."""
        stray = [k for k in state_dict if not k.startswith('decoder.')]
        if stray:
            raise ValueError(f'a decoder state dict holds only decoder.* keys; got {", ".join(stray[:3])}')
        load_state_dict_strict(
            self.decoder, {k[len('decoder.'):]: v for k, v in state_dict.items()}, source='decoder state dict')

    def size_params(self) -> int:
        """The paper's size: decoder parameters without the 3x3 head, plus the embeddings of all frames
        (the encoder is not stored, so it is not counted). In NeRV mode nothing is stored per frame."""
        decoder = sum(p.numel() for n, p in self.decoder.named_parameters() if not n.startswith('head.'))
        return decoder + (math.prod(self.embed_shape) * self.num_frames if self.stored_embeddings else 0)


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoints


_OFFICIAL_KEY_RENAMES = (
    (r'^encoder\.downsample_layers\.0\.', 'encoder.stem.'),
    (r'^encoder\.downsample_layers\.(\d+)\.', r'encoder.stages.\1.downsample.'),
    (r'^encoder\.stages\.(\d+)\.(\d+)\.dwconv\.', r'encoder.stages.\1.blocks.\2.conv_dw.'),
    (r'^encoder\.stages\.(\d+)\.(\d+)\.pwconv(\d)\.', r'encoder.stages.\1.blocks.\2.mlp.fc\3.'),
    (r'^encoder\.stages\.(\d+)\.(\d+)\.', r'encoder.stages.\1.blocks.\2.'),
    (r'^decoder\.0\.conv\.downconv\.', 'decoder.stem.conv.'),
    (r'^head_layer\.', 'decoder.head.'),
)


def dequantize_tensor(quantized: Dict[str, torch.Tensor]) -> torch.Tensor:
    """min + scale * quant, in float32, as the official `efficient_nvloader.dequant_tensor` does."""
    quant, t_min, scale = quantized['quant'], quantized['min'].float(), quantized['scale'].float()
    return t_min.expand_as(quant) + scale.expand_as(quant) * quant


def is_quantized_release(checkpoint: Dict[str, Any]) -> bool:
    """The layout of the official `quant_vid.pth`: {'embed': {quant, min, scale}, 'model': {key: {...}}}."""
    return isinstance(checkpoint.get('embed'), dict) and 'quant' in checkpoint['embed'] and \
        isinstance(checkpoint.get('model'), dict)


def _dequantize_release(checkpoint: Dict[str, Any], model: HNeRV) -> Dict[str, torch.Tensor]:
    """Decoder weights of a quantized release, with the model's own encoder (the release holds none), and the
    dequantized embeddings of every frame as `frame_embeddings`, a buffer saved with the model."""
    try:
        state_dict = {k: dequantize_tensor(v) for k, v in checkpoint['model'].items()}
        embeddings = dequantize_tensor(checkpoint['embed'])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f'not an HNeRV quantized release: each entry needs quant / min / scale tensors ({e})') from e
    if embeddings.shape[1:] != model.embed_shape:
        raise ValueError(
            f'the release stores embeddings of shape {tuple(embeddings.shape[1:])}, this model takes '
            f'{model.embed_shape}: build it with the frame size and strides the release was made with')
    if getattr(model, 'frame_embeddings', torch.empty(0)).shape != embeddings.shape:
        model.register_buffer('frame_embeddings', torch.zeros_like(embeddings))  # the strict load fills it
        update_model_args(model, stored_frames=len(embeddings))  # a Hub folder of the model rebuilds the buffer
    state_dict = _rename_official(state_dict)
    state_dict.update({k: v for k, v in model.state_dict().items() if k.startswith('encoder.')})
    state_dict['frame_embeddings'] = embeddings
    return state_dict


def _rename_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r'^(module\.|blocks\.0\.)+', '', key)  # as the official `--weight` loading strips them
        for pattern, replacement in _OFFICIAL_KEY_RENAMES:
            key, n = re.subn(pattern, replacement, key)
            if n:
                break
        match = re.match(r'^decoder\.(\d+)\.conv\.upconv\.0\.(.*)$', key)
        if match:
            key = f'decoder.blocks.{int(match.group(1)) - 1}.conv.{match.group(2)}'
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: HNeRV) -> Dict[str, torch.Tensor]:
    """Accept an official HNeRV checkpoint (state dict, training checkpoint with `state_dict`, or the quantized
    release `quant_vid.pth`) or a zoo one.

    The quantized release has no encoder: the model keeps its own (untrained) encoder, and the release's
    dequantized frame embeddings are set as `model.frame_embeddings` (N, C, h, w) for `model.decode`.
    """
    if is_quantized_release(state_dict):
        return _dequantize_release(state_dict, model)
    if isinstance(state_dict.get('state_dict'), dict):
        state_dict = state_dict['state_dict']
    if 'decoder.stem.conv.weight' in state_dict:
        return state_dict
    if not any(k.endswith('decoder.0.conv.downconv.weight') for k in state_dict):
        raise ValueError(
            'not an HNeRV checkpoint: expected the official layout (decoder.0.conv.downconv.*, decoder.N.conv.upconv.0.*, '
            f'head_layer.*) or the zoo layout (decoder.stem.*, decoder.blocks.*); its first keys are {list(state_dict)[:5]}')
    return _rename_official(state_dict)


def load_quantized_release(
        checkpoint: Union[str, Path, Dict[str, Any]],
        model_name: str = 'hnerv_1_5m',
        **model_kwargs,
) -> Tuple[HNeRV, torch.Tensor]:
    """A zoo model (eval mode) and the frame embeddings (N, C, h, w) from an official quantized release.

    `checkpoint` is the file (e.g. the official `checkpoints/quant_vid.pth`, read with `weights_only=True`) or its
    contents; `model_name` and `model_kwargs` build the matching zoo model (default: the Bunny 1.5M model).
    Weights and embeddings are dequantized as min + scale * quant; the encoder is not part of the release.
    """
    path = None
    if not isinstance(checkpoint, dict):
        path, checkpoint = checkpoint, read_checkpoint(checkpoint)
    if not is_quantized_release(checkpoint):
        raise ValueError(
            "not an HNeRV quantized release: expected {'embed': {quant, min, scale}, 'model': {...}}, got keys "
            f'{list(checkpoint)[:5]}')
    model = timm.create_model(model_name, **model_kwargs)
    load_state_dict_strict(model, checkpoint_filter_fn(checkpoint, model), source='HNeRV quantized release')
    mark_official(model, path, WEIGHT_SHA256)
    return model.eval(), model.frame_embeddings


def _split(value: str, cast=int) -> List:
    return [cast(x) for x in str(value).split('_')]


def model_args_from_official(
        embed: str = '',
        ks: str = '0_3_3',
        enc_strds: Sequence[int] = (),
        enc_dim: str = '64_16',
        fc_hw: str = '9_16',
        reduce: float = 1.2,
        lower_width: int = 32,
        dec_strds: Sequence[int] = (5, 3, 2, 2, 2),
        num_blks: str = '1_1',
        conv_type: Sequence[str] = ('convnext', 'pshuffel'),
        norm: str = 'none',
        act: str = 'gelu',
        out_bias: str = 'tanh',
        fc_dim: int = None,
        frame_size: Optional[Tuple[int, int]] = None,
        num_frames: int = 132,
) -> Dict[str, Any]:
    """HNeRV keyword arguments for the official `HNeRV(args)` fields (the CLI defaults where one is left out).

    `frame_size` and `num_frames` are zoo extras: the official model takes any frame size its strides divide
    and a normalized index t. Left out, `frame_size` is 640x1280 (HNeRV) or fc_hw * prod(dec_strds) (NeRV mode).
    """
    if fc_dim is None:
        raise ValueError('fc_dim is required: the official training script solves it before building the model')
    if tuple(conv_type)[-1] != 'pshuffel' or (enc_strds and tuple(conv_type)[0] != 'convnext'):
        raise ValueError(f"only conv_type ['convnext', 'pshuffel'] (the published recipe) is built, got {conv_type}")
    if norm != 'none':
        raise ValueError(f"only norm 'none' (the published recipe) is built, got {norm!r}")
    if out_bias not in ('tanh', 'sigmoid'):
        raise ValueError(f"only out_bias 'tanh' or 'sigmoid' is built, got {out_bias!r}")
    if reduce <= 0:
        raise ValueError(f'reduce must be positive (the sqrt(stride) rule, -1, is not built), got {reduce}')
    _, k_min, k_max = _split(ks)
    enc_depth, dec_depth = _split(num_blks)
    enc_c1, embed_dim = _split(enc_dim)
    args = dict(
        num_frames=num_frames, fc_dim=fc_dim, dec_strides=tuple(dec_strds), enc_dim=enc_c1, embed_dim=embed_dim,
        enc_depth=enc_depth, dec_depth=dec_depth, kernel_sizes=(k_min, k_max), reduce=float(reduce),
        lower_width=lower_width, act_layer=act_layer_from_official(act), out_act=out_bias)
    if enc_strds:
        return dict(args, enc_strides=tuple(enc_strds), frame_size=tuple(frame_size or (640, 1280)))
    match = re.fullmatch(r'pe_([\d.]+)_(\d+)', embed)
    if not match:
        raise ValueError(f"NeRV mode (empty enc_strds) needs embed 'pe_<base>_<levels>', got {embed!r}")
    grid = tuple(_split(fc_hw))
    out = (grid[0] * math.prod(dec_strds), grid[1] * math.prod(dec_strds))
    return dict(args, enc_strides=(), pe=(float(match.group(1)), int(match.group(2))), fc_hw=grid,
                frame_size=tuple(frame_size or out))


def create_from_official(**official_kwargs) -> HNeRV:
    """The (untrained) zoo model matching the official `HNeRV(args)` with these `args` fields."""
    return HNeRV(**model_args_from_official(**official_kwargs))


# ---------------------------------------------------------------------------------------------------------------
# Registration


def _create_hnerv(variant: str, pretrained: bool = False, **kwargs) -> HNeRV:
    return build_video_model(
        HNeRV, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, weight_sha256=WEIGHT_SHA256, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict:
    return {
        'url': url,
        'num_classes': 0,
        'input_size': (3, 640, 1280),
        'crop_pct': 1.0,
        'interpolation': 'bicubic',
        'mean': (0., 0., 0.),
        'std': (1., 1., 1.),
        'first_conv': 'encoder.stem.0',
        'classifier': '',
        'license': 'unknown',
        'paper_ids': 'arXiv:2304.02633',
        'paper_name': 'HNeRV: A Hybrid Neural Representation for Videos',
        'origin_url': 'https://github.com/haochen-rye/HNeRV',
        **kwargs,
    }


_UNTRAINED = dict(description='Untrained: one model represents one video, so weights come from fitting it.')


def _meta(size: str, params_m: float, gmacs: float, psnr: float, **kwargs) -> Dict:
    """Params (M, whole model with encoder) and GMACs of one 640x1280 frame (Bunny), the recipe, and paper
    Table 2's Bunny PSNR (132 frames, 300 epochs, before quantization)."""
    return dict(params_m=params_m, gmacs=gmacs, recipe=f'training/recipes/hnerv_{size}_bunny.yaml',
                paper=[paper('Big Buck Bunny (640x1280, 132 frames)', 'arXiv:2304.02633 Table 2',
                             task='video-representation', split='all frames', psnr=psnr)], **kwargs)


default_cfgs = zoo_cfgs({
    'hnerv_0_35m.untrained': _cfg(meta=_meta('0_35m', 0.62, 7.41, 30.15), **_UNTRAINED),
    'hnerv_0_75m.untrained': _cfg(meta=_meta('0_75m', 1.03, 15.44, 32.81), **_UNTRAINED),
    'hnerv_1_5m.bunny': _cfg(
        meta=_meta('1_5m', 1.79, 30.39, 35.57, measured=[dict(
            task='video-representation', dataset='Big Buck Bunny (official frames, centre-cropped to 640x1280)',
            split='all 132 frames', metrics={'psnr': 33.54},
            protocol={'decoded': 'the quantized release, dequantized', 'psnr': 'mean of per-frame PSNRs'},
            by='zoo')]),
        url='https://github.com/haochen-rye/HNeRV/raw/main/checkpoints/quant_vid.pth',
        source='official',
        description=(
            'The authors\' quantized Big Buck Bunny model (checkpoints/quant_vid.pth, 640x1280 crop, 132 frames, '
            '300 epochs; 8-bit decoder, 6-bit embeddings), dequantized on load.'),
        notes=(
            'The release holds the decoder and the 132 frame embeddings, not the encoder: after loading, '
            '`model.frame_embeddings` (132, 16, 2, 4) holds the embeddings and `model.decode(...)` turns them into '
            'frames; the encoder keeps its random init. `zoo.models.hnerv.load_quantized_release` returns both.',
            'Decoded with the zoo, the release gives 33.54 dB PSNR (mean of per-frame PSNRs, all 132 frames) against '
            'the official Bunny frames centre-cropped to 640x1280 (measured here). The paper\'s 35.57 dB for 1.5M '
            'is before quantization.',
        ),
    ),
    'hnerv_3m.untrained': _cfg(meta=_meta('3m', 3.32, 60.89, 37.43), **_UNTRAINED),
})

# sha256 of the official files ('arch.tag' -> hex digest); quant_vid.pth as of haochen-rye/HNeRV commit 4872129.
WEIGHT_SHA256: Dict[str, str] = {
    'hnerv_1_5m.bunny': '88832be650c4e74e27266b7b05ce9beda83245c25214335029082be3620f80f1',
}

card_info = dict(
    pipeline_tag='image-to-image',
    intended_use=(
        'Representing and compressing one video: fit the model to the video\'s frames, then store the decoder and '
        'one tiny embedding per frame; `decode(embeddings)` gives the frames back. Also frame interpolation '
        '(decode interpolated embeddings) and inpainting (fit with masked losses), as in the paper.'),
    limitations=(
        'A model represents only the video it was fitted to; it does not generalise to other videos. Size follows '
        'the paper: decoder without its 3x3 head plus all frame embeddings (`size_params()`); the encoder (0.31M at '
        'Bunny strides) is not counted. The first decoder width is solved from the target size, the frame size and '
        'the frame count with the official quadratic, so widths change with the video. Frame height and width must '
        'be multiples of prod(enc_strides) (320 by default). The official quantized Bunny release has no encoder.'),
    variants={
        f'hnerv_{name}': (
            f'{size}M target (Bunny 640x1280, 132 frames): c2 {c2}, strides 5-4-4-2-2, kernels 1-3-5-5-5, r 1.2; '
            f'paper Table 2 Bunny PSNR {psnr} (300 epochs)')
        for name, size, c2, psnr in (('0_35m', 0.35, 32, 30.15), ('0_75m', 0.75, 48, 32.81), ('1_5m', 1.5, 68, 35.57),
                                     ('3m', 3, 97, 37.43))
    },
    usage=(
        'frames = torch.rand(2, 3, {height}, {width})  # frames of the video the model was fitted to, RGB in [0, 1]\n'
        'with torch.no_grad():\n'
        '    embeddings = model.encode(frames)  # what a compressed video stores per frame\n'
        '    reconstruction = model.decode(embeddings)  # (2, 3, {height}, {width}) in [0, 1]\n'
        '# hnerv_1_5m.bunny: the release\'s own embeddings are model.frame_embeddings (132, 16, 2, 4)'),
)


@register_model
def hnerv_0_35m(pretrained: bool = False, **kwargs) -> HNeRV:
    """HNeRV, 0.35M (decoder + embeddings) for the given video; c2 = 32 on Bunny."""
    return _create_hnerv('hnerv_0_35m', pretrained=pretrained, **dict(dict(model_size=0.35), **kwargs))


@register_model
def hnerv_0_75m(pretrained: bool = False, **kwargs) -> HNeRV:
    """HNeRV, 0.75M (decoder + embeddings) for the given video; c2 = 48 on Bunny."""
    return _create_hnerv('hnerv_0_75m', pretrained=pretrained, **dict(dict(model_size=0.75), **kwargs))


@register_model
def hnerv_1_5m(pretrained: bool = False, **kwargs) -> HNeRV:
    """HNeRV, 1.5M (decoder + embeddings) for the given video; c2 = 68 on Bunny."""
    return _create_hnerv('hnerv_1_5m', pretrained=pretrained, **dict(dict(model_size=1.5), **kwargs))


@register_model
def hnerv_3m(pretrained: bool = False, **kwargs) -> HNeRV:
    """HNeRV, 3M (decoder + embeddings) for the given video; c2 = 97 on Bunny."""
    return _create_hnerv('hnerv_3m', pretrained=pretrained, **dict(dict(model_size=3.), **kwargs))
