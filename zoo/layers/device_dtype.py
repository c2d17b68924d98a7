"""timm's `device=` / `dtype=` model arguments for zoo model classes."""
import functools
import inspect
from contextlib import nullcontext
from typing import Type, TypeVar

import torch
import torch.nn as nn

ModelT = TypeVar('ModelT', bound=Type[nn.Module])


def takes_device_dtype(cls: ModelT) -> ModelT:
    """Class decorator: the constructor also takes `device=` and `dtype=`, as timm's models do.

    Parameters and buffers are created on `device` (`'meta'` allocates nothing) and floating-point ones are
    then cast to `dtype`. The constructor body stays as written: it runs inside `torch.device(device)`.
    """
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, device=None, dtype=None, **kwargs):
        with torch.device(device) if device is not None else nullcontext():
            init(self, *args, **kwargs)
        if dtype is not None:
            self.to(dtype=dtype)

    signature = inspect.signature(init)
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ('device', 'dtype')]
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    __init__.__signature__ = signature.replace(parameters=params[:at] + extra + params[at:])
    cls.__init__ = __init__
    return cls
