"""TrAct: train the first layer as if its pre-activations were embeddings.

"TrAct: Making First-layer Pre-Activations Trainable" (Petersen, Borgelt, Ermon, NeurIPS 2024). The first
layer maps each input patch x (a row of X, b patches in the batch) to z = W x. Its ordinary gradient G^T X is
proportional to pixel values; TrAct instead takes a gradient step on z and finds the W whose outputs are closest
to that proposal, regularised towards the current W. The closed form replaces the weight gradient by

    G^T X (X^T X / b + lambda I)^{-1}

which is what `TrAct` does, as a hook on the first layer's weight gradient (the optimizer is unchanged). The
first layer must be a convolution on the input (a stem or patchify conv); its patches come from `F.unfold`
with the conv's own kernel, stride, padding and dilation. The bias gradient is left as it is.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import RecipeError


def first_conv(model: nn.Module) -> Tuple[str, nn.Conv2d]:
    """The model's first parameterised module, which must be an ungrouped Conv2d (a stem or patchify conv)."""
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            if isinstance(module, nn.Conv2d) and module.groups == 1:
                return name, module
            raise RecipeError(f'train.tract needs a first layer that is a stem or patchify Conv2d; '
                              f'{type(model).__name__} starts with {name} ({type(module).__name__})')
    raise RecipeError(f'{type(model).__name__} has no parameters for train.tract to act on')


def tract_gradient(grad: torch.Tensor, inputs: torch.Tensor, conv: nn.Conv2d, lam: float) -> torch.Tensor:
    """The TrAct weight gradient for `conv` given its ordinary gradient and the batch it saw."""
    patches = F.unfold(inputs.float(), conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                       stride=conv.stride)  # (B, n, L), n = in_chans * kh * kw
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (b, n)
    n = patches.shape[1]
    gram = patches.T @ patches / patches.shape[0] + lam * torch.eye(n, device=patches.device)
    flat = grad.float().reshape(grad.shape[0], n)
    return torch.linalg.solve(gram, flat.T).T.reshape(grad.shape).to(grad.dtype)  # gram is symmetric


class TrAct:
    """Attach TrAct to `model`'s first conv: `TrAct(model, lam=0.1)`; `remove()` detaches it."""

    def __init__(self, model: nn.Module, lam: float = 0.1):
        if lam <= 0:
            raise RecipeError(f'train.tract lambda must be > 0, got {lam}')
        self.name, self.conv = first_conv(model)
        if isinstance(self.conv.padding, str):
            raise RecipeError(f'train.tract: {self.name} uses padding={self.conv.padding!r}; it needs explicit padding')
        self.lam = lam
        self._inputs: Optional[torch.Tensor] = None
        self._handles = [
            self.conv.register_forward_pre_hook(self._keep_input),
            self.conv.weight.register_hook(self._transform),
        ]

    def _keep_input(self, module: nn.Module, args) -> None:
        if torch.is_grad_enabled():
            self._inputs = args[0].detach()

    def _transform(self, grad: torch.Tensor) -> torch.Tensor:
        inputs, self._inputs = self._inputs, None
        return grad if inputs is None else tract_gradient(grad, inputs, self.conv, self.lam)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def attach(model: nn.Module, settings) -> Optional[TrAct]:
    """TrAct as a recipe's `train.tract` asks: None or false for off, `{lambda: 0.1}` (or true) for on."""
    if not settings:
        return None
    settings = {} if settings is True else dict(settings)
    lam = settings.pop('lambda', 0.1)
    if settings:
        raise RecipeError(f'train.tract takes only `lambda`, got {sorted(settings)}')
    return TrAct(model, lam=float(lam))
