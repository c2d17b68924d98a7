"""Pieces shared by the NeRV-style video decoders (HNeRV, NeRV, NeRV++).

`NeRVBlock` is the upsampling block of all three papers: a conv to C_out * s^2 channels, PixelShuffle(s), an
activation. `NeRVPositionalEncoding` is NeRV's frame-index encoding, which NeRV++ reuses unchanged.
"""
import math
import numbers
from typing import Callable, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import get_act_layer

from zoo.errors import InputError
from .input_check import nearest_multiples

# Official `--act` names -> timm activation names (timm's 'gelu' is the exact, erf-based GELU).
OFFICIAL_ACTIVATIONS = {'gelu': 'gelu', 'relu': 'relu', 'swish': 'silu', 'silu': 'silu'}


def act_layer_from_official(name: str) -> str:
    """The timm activation for an official `act` argument, or a clear error for one the zoo does not build."""
    if name not in OFFICIAL_ACTIVATIONS:
        raise ValueError(f'activation {name!r} is not supported; choose one of {", ".join(OFFICIAL_ACTIVATIONS)}')
    return OFFICIAL_ACTIVATIONS[name]


def check_frame_size(frame_size: Tuple[int, int], strides: Sequence[int]) -> None:
    """Raise a ValueError naming the sizes that work when `frame_size` is not a multiple of prod(strides)."""
    multiple = math.prod(strides)
    bad = [(name, n) for name, n in zip(('height', 'width'), frame_size) if n % multiple or n <= 0]
    if bad:
        nearest = ', '.join(f'{name} {n} -> {nearest_multiples(n, multiple)}' for name, n in bad)
        raise ValueError(
            f'frame size {frame_size[0]}x{frame_size[1]} cannot be reached with strides {tuple(strides)}: height and '
            f'width must be multiples of {multiple} (= {"*".join(map(str, strides))}); nearest valid sizes: {nearest}. '
            'Crop or resize the frames, or build the model with other strides')


def check_positive(**values) -> None:
    """Refuse, when a model is built, a count or size (or a sequence of them) that is not a positive number;
    None (derive it) passes."""
    for name, value in values.items():
        items = value if isinstance(value, (tuple, list)) else (value,)
        if any(v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0) for v in items):
            raise InputError(f'{name} must be positive; got {value!r}')


def check_frame_index(index: torch.Tensor, num_frames: int, interpolate: bool = False) -> None:
    """Refuse frame indices a model was not fitted to: outside 0..num_frames - 1, or between two frames unless
    `interpolate` asks for in-between times. Skipped where index values are unknown (tracing, compiling, meta)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or isinstance(index, torch.fx.Proxy) \
            or index.device.type == 'meta':
        return
    outside = (index < 0) | (index > num_frames - 1)
    if index.is_floating_point():
        outside |= ~torch.isfinite(index)
        between = ~outside & (index != index.round()) if not interpolate else torch.zeros_like(outside)
        if between.any():
            raise InputError(f'frame index {index[between][0].item()} lies between two frames; pass interpolate=True '
                             'to decode in-between times')
    if outside.any():
        raise InputError(f'frame index {index[outside][0].item()} is outside the {num_frames} frames the model was '
                         f'fitted to (0..{num_frames - 1})')


class NeRVBlock(nn.Module):
    """Conv(k x k, C_in -> C_out * s^2, 'same' padding) -> PixelShuffle(s) -> activation.

    With stride 1 the shuffle is an identity, which makes the block a plain conv + activation (HNeRV's
    1x1 "FC" stem).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            kernel_size: int = 3,
            act_layer: Union[str, Callable] = 'gelu',
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs * stride * stride, kernel_size, padding=(kernel_size - 1) // 2)
        self.shuffle = nn.PixelShuffle(stride) if stride > 1 else nn.Identity()
        self.act = get_act_layer(act_layer)()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shuffle(self.conv(x)))


class NeRVPositionalEncoding(nn.Module):
    """NeRV's encoding of t = index / num_frames: [sin(b^0 pi t), cos(b^0 pi t), sin(b^1 pi t), ...].

    Interleaved sines and cosines, each argument computed in float32 as (t * b^k) * pi, left to right,
    as the official `PositionalEncoding` does: at 80 levels the arguments reach ~1e7 and float32 rounding
    changes the values, so this order is part of what trained weights expect.
    """

    def __init__(self, base: float = 1.25, levels: int = 80):
        super().__init__()
        self.base = base
        self.levels = levels
        self.embed_dim = 2 * levels

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        values = []
        for k in range(self.levels):
            arg = t * self.base ** k * math.pi
            values += [torch.sin(arg), torch.cos(arg)]
        return torch.stack(values, 1)
