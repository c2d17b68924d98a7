"""A clear error for images a model cannot take, before a convolution fails deep inside it."""
from typing import Optional

import torch
from timm.layers import register_notrace_function


@register_notrace_function
def check_image_input(x: torch.Tensor, in_chans: int, min_size: int = 1, channel_hint: Optional[str] = None) -> None:
    """Raise ``ValueError`` unless ``x`` is an (N, in_chans, H, W) batch with H, W >= ``min_size``.

    ``channel_hint`` replaces the advice to rebuild with another ``in_chans``, for models that cannot.
    An eager-mode check only: skipped while TorchScript compiles, FX traces, or dynamo / torch.export
    capture the model, so scripted, traced and exported graphs carry no data-dependent branches.
    """
    if not torch.jit.is_scripting():
        if not is_traced(x):
            _check_image_input(x, in_chans, min_size, channel_hint)


def is_traced(x: torch.Tensor) -> bool:
    """True while FX traces `x` or dynamo / torch.export capture the model: skip eager-only input checks.

    Call it inside `if not torch.jit.is_scripting():`, which TorchScript does not compile.
    """
    return isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling()


@torch.jit.unused
def _check_image_input(x: torch.Tensor, in_chans: int, min_size: int, channel_hint: Optional[str]) -> None:
    if x.ndim != 4:
        raise ValueError(
            f'expected a 4-D image batch (N, {in_chans}, H, W), got a {x.ndim}-D tensor of shape {tuple(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'expected {in_chans} input channels (N, {in_chans}, H, W), got shape {tuple(x.shape)}; '
            + (channel_hint or f'build the model with in_chans={x.shape[1]} to take {x.shape[1]}-channel images'))
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f'expected images of at least {min_size}x{min_size} pixels, got {x.shape[2]}x{x.shape[3]}')


@register_notrace_function
def check_multiple_of(x: torch.Tensor, multiple: int, model_name: str, why: str) -> None:
    """Raise ``ValueError`` unless the sides of ``x`` are multiples of ``multiple`` (``why``: the stride that needs
    it), naming the nearest sizes to resize or pad to. Eager only, as ``check_image_input``."""
    if not torch.jit.is_scripting():
        if not is_traced(x):
            _check_multiple_of(x, multiple, model_name, why)


@torch.jit.unused
def _check_multiple_of(x: torch.Tensor, multiple: int, model_name: str, why: str) -> None:
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f'{model_name} needs height and width that are multiples of {multiple} ({why}), got {h}x{w}; resize or '
            f'pad to {nearest_multiples(h, multiple)} x {nearest_multiples(w, multiple)}')


def nearest_multiples(n: int, multiple: int) -> str:
    """The positive multiples of `multiple` nearest to `n`, for an error message: 'n' itself, 'below or above',
    or the smallest one when none is below."""
    below, above = n // multiple * multiple, max(-(-n // multiple), 1) * multiple
    return str(above) if below <= 0 or below == above else f'{below} or {above}'
