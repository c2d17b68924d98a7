"""UniRepLKNet: large-kernel ConvNets with structural re-parameterisation.

Papers: "UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio, Video, Point Cloud, Time-Series
and Image Recognition", Ding et al., CVPR 2024 (https://arxiv.org/abs/2311.15599), and "Scaling Up Your Kernels:
Large Kernel Design in ConvNets towards Universal Representations", Zhang, Ding, Yue, TPAMI 2025
(https://arxiv.org/abs/2410.08049). Official code (Apache-2.0): https://github.com/AILab-CVC/UniRepLKNet,
`unireplknet.py`.

A four-stage ConvNet. Each block is: depth-wise mixer -> BN -> squeeze-excitation -> (NHWC) Linear 4x ->
GELU -> GRN -> Linear back -> BN -> layer scale -> drop path -> residual add. The depth-wise mixer of a
large-kernel ("LarK") block is a `DilatedReparamConv`: a KxK conv plus parallel dilated small-kernel convs,
each with its own BN, that `reparameterize()` merges into one KxK conv with bias. Small-kernel blocks use a
plain 3x3 or 5x5 depth-wise conv.

Two forms share one class: the training form (`deploy=False`, the layout of the official checkpoints) and the
deploy form (`deploy=True`, every BN, branch, GRN bias and layer scale folded away). `model.reparameterize()`
(or `timm.utils.reparameterize_model`) turns the first into the second in place. At inference a deploy-form
block runs `UniRepLKNetBlock.forward_fast`, the same function with fewer passes over memory (`fast=False` or
`model.set_fast(False)` for the plain path). Under `torch.compile` the blocks take the plain path, which inductor
fused better on CPU (docs/benchmarks.md has the measurements).
The official flat `downsample_layers` / `stages` lists become timm-style `stem` and `stages.{i}.{downsample,
blocks}`; `checkpoint_filter_fn` maps official checkpoints (both forms) onto them.
"""
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, LayerNorm2d, LayerScale2d, NormMlpClassifierHead, SEModule, get_device_dtype, trunc_normal_,
)
from timm.models import checkpoint_seq, register_model, reparameterize_model
from timm.models._features import feature_take_indices

from zoo.layers import check_image_input, takes_device_dtype
from zoo.metadata import paper, zoo_cfgs
from zoo.models._builder import build_zoo_model

__all__ = ['UniRepLKNet', 'DilatedReparamConv', 'UniRepLKNetBlock']

_LN_EPS = 1e-6
_GRN_EPS = 1e-6

# Large kernel size K -> (branch kernel sizes, dilations) of its parallel dilated depth-wise convs (official).
DILATED_BRANCHES: Dict[int, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}

# Block kernel sizes: 0 = no spatial mixer, 3 / 5 = plain depth-wise conv, 7..17 = DilatedReparamConv.
BLOCK_KERNEL_SIZES = (0, 3, 5, 7, 9, 11, 13, 15, 17)

# Official per-block kernel sizes for each depths tuple (`kernel_sizes=None`).
DEFAULT_KERNEL_SIZES: Dict[Tuple[int, ...], Tuple[Tuple[int, ...], ...]] = {
    (2, 2, 6, 2): ((3,) * 2, (13,) * 2, (13,) * 6, (13,) * 2),
    (2, 2, 8, 2): ((3,) * 2, (13,) * 2, (13,) * 8, (13,) * 2),
    (3, 3, 18, 3): ((3,) * 3, (13,) * 3, (13, 3) * 9, (13,) * 3),
    (3, 3, 27, 3): ((3,) * 3, (13,) * 3, (13, 3, 3) * 9, (13,) * 3),
}


def _bn_scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(x) == x * scale + shift in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of conv -> bn as one conv."""
    scale, shift = _bn_scale_shift(bn)
    bias = shift if conv.bias is None else shift + conv.bias * scale
    return conv.weight * scale.reshape(-1, 1, 1, 1), bias


def _dilated_to_dense(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """The dense kernel of size (k - 1) * dilation + 1 equivalent to `kernel` applied with `dilation`."""
    if dilation == 1:
        return kernel
    c, g, kh, kw = kernel.shape
    dense = kernel.new_zeros(c, g, (kh - 1) * dilation + 1, (kw - 1) * dilation + 1)
    dense[:, :, ::dilation, ::dilation] = kernel
    return dense


def _dw_conv_reachable(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a depth-wise stride-1 'same' conv, with the kernel cropped to the taps that can reach a pixel.

    On an HxW map an offset beyond H - 1 (or W - 1) only ever meets zero padding, so e.g. a 13x13 kernel acts as
    a 7x7 one on a 4x4 map (stage 4 at 128 px): the same sums with fewer multiplies.
    """
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    rh, rw = min(ph, x.shape[-2] - 1), min(pw, x.shape[-1] - 1)
    if (rh, rw) == (ph, pw) or conv.dilation != (1, 1) or (kh, kw) != (2 * ph + 1, 2 * pw + 1):
        return conv(x)
    weight = conv.weight[:, :, ph - rh:ph + rh + 1, pw - rw:pw + rw + 1]
    return F.conv2d(x, weight, conv.bias, padding=(rh, rw), groups=conv.groups)


def _dw_conv(dim: int, kernel_size: int, dilation: int = 1, bias: bool = False) -> nn.Conv2d:
    """Depth-wise stride-1 conv with 'same' padding."""
    padding = (dilation * (kernel_size - 1) + 1) // 2
    return nn.Conv2d(dim, dim, kernel_size, padding=padding, dilation=dilation, groups=dim, bias=bias)


class DilatedReparamConv(nn.Module):
    """Depth-wise KxK conv + BN in parallel with dilated small-kernel depth-wise convs + BN (training form),
    or one KxK depth-wise conv with bias (deploy form). Keys follow the official `DilatedReparamBlock`."""

    def __init__(self, dim: int, kernel_size: int, deploy: bool = False):
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(
                f'DilatedReparamConv supports kernel sizes {sorted(DILATED_BRANCHES)}, got {kernel_size}')
        self.kernel_size = kernel_size
        self.lk_origin = _dw_conv(dim, kernel_size, bias=deploy)
        self.branches = [] if deploy else list(zip(*DILATED_BRANCHES[kernel_size]))
        self.origin_bn = nn.Identity() if deploy else nn.BatchNorm2d(dim)
        if not deploy:
            for k, r in self.branches:
                self.add_module(f'dil_conv_k{k}_{r}', _dw_conv(dim, k, dilation=r))
                self.add_module(f'dil_bn_k{k}_{r}', nn.BatchNorm2d(dim))

    @property
    def deploy(self) -> bool:
        return isinstance(self.origin_bn, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.origin_bn(self.lk_origin(x))
        # The branches are found by walking the children, not by getattr on a built name, so TorchScript can
        # compile this; each branch's conv is registered just before its BN.
        branch = x
        for name, module in self.named_children():
            if name.startswith('dil_conv_'):
                branch = module(x)
            elif name.startswith('dil_bn_'):
                out = out + module(branch)
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge every branch and BN into `lk_origin` (a KxK conv with bias). A no-op in deploy form."""
        if self.deploy:
            return
        weight, bias = _fuse_conv_bn(self.lk_origin, self.origin_bn)
        for k, r in self.branches:
            w, b = _fuse_conv_bn(getattr(self, f'dil_conv_k{k}_{r}'), getattr(self, f'dil_bn_k{k}_{r}'))
            w = _dilated_to_dense(w, r)
            pad = self.kernel_size // 2 - w.shape[-1] // 2
            weight = weight + F.pad(w, [pad] * 4)
            bias = bias + b
            delattr(self, f'dil_conv_k{k}_{r}')
            delattr(self, f'dil_bn_k{k}_{r}')
        self.origin_bn = nn.Identity()
        self.branches = []
        dim = weight.shape[0]
        self.lk_origin = _dw_conv(dim, self.kernel_size, bias=True).to(weight.device, weight.dtype)
        self.lk_origin.weight.copy_(weight)
        self.lk_origin.bias.copy_(bias)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC input: x * (1 + weight * N(x)) (+ bias), N = L2 over H, W / its channel mean.

    timm's `GlobalResponseNorm` always has a bias; the deploy form folds it into the next Linear, so here it
    is optional.
    """

    def __init__(self, dim: int, bias: bool = True, eps: float = _GRN_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_g = x.norm(p=2, dim=(1, 2), keepdim=True)
        x_n = x_g / (x_g.mean(dim=-1, keepdim=True) + self.eps)
        x = x * (1 + self.weight * x_n)  # one pass over x: the scale is per image and channel
        return x if self.bias is None else x + self.bias


class UniRepLKNetMlp(nn.Module):
    """NCHW -> NHWC, Linear 4x, GELU, GRN, Linear back (no bias when training), -> NCHW, BN (training form)."""

    def __init__(self, dim: int, mlp_ratio: int = 4, deploy: bool = False):
        super().__init__()
        hidden = dim * mlp_ratio
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden, bias=not deploy)
        self.fc2 = nn.Linear(hidden, dim, bias=deploy)
        self.norm = nn.Identity() if deploy else nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = self.fc2(self.grn(self.act(self.fc1(x))))
        return self.norm(x.permute(0, 3, 1, 2))


class UniRepLKNetBlock(nn.Module):
    """x + DropPath(ls(mlp(se(norm(conv_dw(x)))))).

    `fast` (the default) runs a deploy-form block at inference in eager mode through `forward_fast`, the same
    function with fewer passes over memory; `fast=False` runs the plain module-by-module path.
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int,
            drop_path: float = 0.,
            layer_scale_init_value: Optional[float] = 1e-6,
            deploy: bool = False,
            fast: bool = True,
    ):
        super().__init__()
        self.fast = fast
        if kernel_size not in BLOCK_KERNEL_SIZES:
            raise ValueError(f'UniRepLKNet block kernel size must be one of {BLOCK_KERNEL_SIZES}, got {kernel_size}')
        if kernel_size == 0:
            self.conv_dw = nn.Identity()
        elif kernel_size >= 7:
            self.conv_dw = DilatedReparamConv(dim, kernel_size, deploy=deploy)
        else:
            self.conv_dw = _dw_conv(dim, kernel_size, bias=deploy)
        self.norm = nn.BatchNorm2d(dim) if kernel_size and not deploy else nn.Identity()
        self.se = SEModule(dim, rd_channels=dim // 4)
        self.mlp = UniRepLKNetMlp(dim, deploy=deploy)
        use_ls = not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0
        self.ls = LayerScale2d(dim, layer_scale_init_value) if use_ls else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    @property
    def deploy(self) -> bool:
        return isinstance(self.mlp.norm, nn.Identity) and self.mlp.grn.bias is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile the plain graph was faster (measured on CPU): inductor fuses GELU into the Linear
        # and the GRN/SE arithmetic into one loop, which the per-image weights of `forward_fast` would prevent.
        # TorchScript runs the plain path too (`forward_fast` is eager-only).
        if self.fast and not self.training and self.deploy and not torch.jit.is_scripting() \
                and not torch.compiler.is_compiling():
            return self.forward_fast(x)
        y = self.mlp(self.se(self.norm(self.conv_dw(x))))
        return x + self.drop_path(self.ls(y))

    @torch.jit.unused
    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The deploy-form block with fewer passes over memory: no BN / layer-scale modules, no NCHW <-> NHWC
        round trips of the 4x-wide hidden tensor, GRN as one scale, the residual added by the second matmul.

        SE scales the channels of each image before fc1, and GRN (x * (1 + w * N(x))) those of the hidden map
        before fc2. On maps with more pixels than channels both scales go into per-image copies of the Linear
        weights (a batched matmul on NCHW), so the hidden tensor is written once, activated, reduced once and
        read once. On smaller maps scaling the weights would cost more than scaling the activations, so those
        run as two plain matmuls over every pixel of the batch. The large kernel is cropped to what the map can
        reach (`_dw_conv_reachable`).
        """
        b, c, h, w = x.shape
        if isinstance(self.conv_dw, DilatedReparamConv):
            y = _dw_conv_reachable(self.conv_dw.lk_origin, x)
        elif isinstance(self.conv_dw, nn.Conv2d):
            y = _dw_conv_reachable(self.conv_dw, x)
        else:
            y = x
        se, mlp = self.se, self.mlp
        gate = se.gate(se.fc2(se.act(se.bn(se.fc1(y.mean((2, 3), keepdim=True))))))
        if h * w > c:
            hidden = torch.bmm(mlp.fc1.weight * gate.view(b, 1, c), y.reshape(b, c, h * w))
            hidden = mlp.act(hidden.add_(mlp.fc1.bias[:, None]))
            norm = torch.linalg.vector_norm(hidden, dim=2)
            grn_scale = 1 + mlp.grn.weight * (norm / (norm.mean(dim=1, keepdim=True) + mlp.grn.eps))
            shortcut = (x + mlp.fc2.bias[:, None, None]).reshape(b, c, h * w)
            return torch.baddbmm(shortcut, mlp.fc2.weight * grn_scale[:, None, :], hidden).view(b, c, h, w)
        y = (y * gate).permute(0, 2, 3, 1).reshape(b * h * w, c)
        hidden = mlp.act(F.linear(y, mlp.fc1.weight, mlp.fc1.bias)).view(b, h * w, -1)
        norm = torch.linalg.vector_norm(hidden, dim=1, keepdim=True)
        hidden = hidden * (1 + mlp.grn.weight * (norm / (norm.mean(dim=2, keepdim=True) + mlp.grn.eps)))
        shortcut = (x + mlp.fc2.bias[:, None, None]).permute(0, 2, 3, 1).reshape(b * h * w, c)
        out = torch.addmm(shortcut, hidden.view(b * h * w, -1), mlp.fc2.weight.t())
        return out.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold branches, both BNs, the GRN bias and the layer scale into the convs / Linear. No-op once done."""
        if isinstance(self.conv_dw, DilatedReparamConv):
            self.conv_dw.reparameterize()
        if isinstance(self.norm, nn.BatchNorm2d):
            conv = self.conv_dw.lk_origin if isinstance(self.conv_dw, DilatedReparamConv) else self.conv_dw
            weight, bias = _fuse_conv_bn(conv, self.norm)
            fused = nn.Conv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=True).to(weight.device, weight.dtype)
            fused.weight.copy_(weight)
            fused.bias.copy_(bias)
            if isinstance(self.conv_dw, DilatedReparamConv):
                self.conv_dw.lk_origin = fused
            else:
                self.conv_dw = fused
            self.norm = nn.Identity()
        if self.deploy:
            return
        mlp = self.mlp
        fc2 = mlp.fc2
        weight = fc2.weight
        bias = weight @ mlp.grn.bias
        if fc2.bias is not None:
            bias = bias + fc2.bias
        scale, shift = _bn_scale_shift(mlp.norm)
        bias = bias * scale + shift
        weight = weight * scale[:, None]
        if isinstance(self.ls, LayerScale2d):
            weight = weight * self.ls.gamma[:, None]
            bias = bias * self.ls.gamma
        new_fc2 = nn.Linear(fc2.in_features, fc2.out_features, bias=True).to(weight.device, weight.dtype)
        new_fc2.weight.copy_(weight)
        new_fc2.bias.copy_(bias)
        mlp.fc2 = new_fc2
        mlp.grn.bias = None
        mlp.norm = nn.Identity()
        self.ls = nn.Identity()


class UniRepLKNetStage(nn.Module):
    """Optional stride-2 3x3 conv -> LayerNorm downsample, then the blocks."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_sizes: Sequence[int],
            drop_path_rates: Sequence[float],
            layer_scale_init_value: Optional[float] = 1e-6,
            deploy: bool = False,
            downsample: bool = True,
            fast: bool = True,
    ):
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1),
                LayerNorm2d(out_chs, eps=_LN_EPS),
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            UniRepLKNetBlock(
                out_chs, k, drop_path=dpr, layer_scale_init_value=layer_scale_init_value, deploy=deploy, fast=fast)
            for k, dpr in zip(kernel_sizes, drop_path_rates)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


@takes_device_dtype
class UniRepLKNet(nn.Module):
    """UniRepLKNet classifier with the timm model interface.

    Args:
        in_chans: Input image channels.
        num_classes: Classifier outputs (0 for no classifier).
        global_pool: Head pooling type ('avg' as in the paper).
        depths: Blocks per stage.
        dims: Width of each stage (the stem's first conv makes dims[0] // 2).
        kernel_sizes: Per stage, one depth-wise kernel size per block (0, 3, 5, or 7..17 odd for a dilated
            re-parameterisable large kernel). None looks up the official schedule for `depths`.
        layer_scale_init_value: Initial layer scale (None or <= 0: no layer scale).
        head_init_scale: Multiplies the initial classifier weight and bias.
        drop_rate: Dropout before the classifier (the official model has none).
        drop_path_rate: Stochastic depth, linearly spaced from 0 over all blocks.
        deploy: Build the re-parameterised inference form (load deploy checkpoints, or use `reparameterize()`).
        fast: Run deploy-form blocks at inference through `UniRepLKNetBlock.forward_fast` (same outputs, fewer
            passes over memory). False keeps the plain module-by-module path; see also `set_fast()`.
    """
    __jit_unused_properties__ = ['deploy', '_model_args']  # Python-side state, not part of the scripted forward

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Sequence[int] = (3, 3, 27, 3),
            dims: Sequence[int] = (96, 192, 384, 768),
            kernel_sizes: Optional[Sequence[Sequence[int]]] = None,
            layer_scale_init_value: Optional[float] = 1e-6,
            head_init_scale: float = 1.,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            deploy: bool = False,
            fast: bool = True,
    ):
        super().__init__()
        depths, dims = tuple(depths), tuple(dims)
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f'UniRepLKNet has 4 stages: depths and dims need 4 entries, got {depths} and {dims}')
        if kernel_sizes is None:
            if depths not in DEFAULT_KERNEL_SIZES:
                raise ValueError(
                    f'no official kernel-size schedule for depths {depths} (known: {list(DEFAULT_KERNEL_SIZES)}); '
                    'pass kernel_sizes explicitly')
            kernel_sizes = DEFAULT_KERNEL_SIZES[depths]
        kernel_sizes = tuple(tuple(k) for k in kernel_sizes)
        if tuple(len(k) for k in kernel_sizes) != depths:
            raise ValueError(f'kernel_sizes {kernel_sizes} needs one entry per block of depths {depths}')
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.min_input_size = 1  # stride-2 pad-1 convs take any size

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1),
            LayerNorm2d(dims[0] // 2, eps=_LN_EPS),
            nn.GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1),
            LayerNorm2d(dims[0], eps=_LN_EPS),
        )

        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.feature_info = []
        stages = []
        for i in range(4):
            first = sum(depths[:i])
            stages.append(UniRepLKNetStage(
                dims[i - 1] if i else dims[0],
                dims[i],
                kernel_sizes=kernel_sizes[i],
                drop_path_rates=dpr[first:first + depths[i]],
                layer_scale_init_value=layer_scale_init_value,
                deploy=deploy,
                downsample=i > 0,
                fast=fast,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = dims[-1]
        self.head = NormMlpClassifierHead(
            dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=_LN_EPS))
        self.apply(self._init_weights)
        if isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)
        self.register_load_state_dict_pre_hook(_check_form_on_load)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The official init: truncated normal (std .02) for every conv and linear, zero biases."""
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def deploy(self) -> bool:
        """True once every block is in the re-parameterised form."""
        return all(block.deploy for stage in self.stages for block in stage.blocks)

    @property
    def _model_args(self) -> Dict:
        """timm's record of the factory kwargs (written to config.json), with the form the model is in now."""
        return {**self.__dict__.get('_factory_args', {}), 'deploy': self.deploy}

    @_model_args.setter
    def _model_args(self, value: Dict) -> None:
        self.__dict__['_factory_args'] = dict(value)

    @torch.no_grad()
    def reparameterize(self) -> 'UniRepLKNet':
        """Turn the training form into the deploy form in place (same outputs in eval mode). Idempotent."""
        for module in self.modules():
            if isinstance(module, UniRepLKNetBlock):
                module.reparameterize()
        return self

    def set_fast(self, enable: bool = True) -> 'UniRepLKNet':
        """Choose the fast inference path of deploy-form blocks (default) or the plain one (to compare)."""
        for module in self.modules():
            if isinstance(module, UniRepLKNetBlock):
                module.fast = enable
        return self

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^head\.norm', (99999,)),
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
        """Forward features that returns the outputs of the selected stages (strides 4, 8, 16, 32).

        Args:
            x: Input image batch.
            indices: Take the last n stages if int, all if None, these stages if a sequence.
            norm: Unused (the final norm is part of the head, after pooling); kept for the timm interface.
            stop_early: Stop after the last requested stage.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediate features.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"UniRepLKNet features are NCHW, got output_fmt='{output_fmt}'")
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
            if prune_norm or max_index < len(self.feature_info) - 1:
                self.head.norm = nn.Identity()
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


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint forms and the official layout

# Keys that only one form has, in the official (`pwconv2.*`) and the zoo (`mlp.*`) layouts.
_TRAIN_MARKERS = ('.pwconv2.2.running_var', '.mlp.norm.running_var', '.act.1.beta', '.mlp.grn.bias')
_DEPLOY_MARKERS = ('.pwconv2.0.bias', '.mlp.fc2.bias')
_HOW_TO_DEPLOY = (
    'build the model in training form (deploy=False), load the checkpoint, then call model.reparameterize() '
    '(or timm.utils.reparameterize_model) to get the deploy form')


def checkpoint_form(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """'train' or 'deploy' for a UniRepLKNet state dict (official or zoo layout), None if it shows neither."""
    keys = list(state_dict)
    if any(k.endswith(_TRAIN_MARKERS) for k in keys):
        return 'train'
    if any(k.endswith(_DEPLOY_MARKERS) for k in keys):
        return 'deploy'
    return None


def _check_form(state_dict: Dict[str, torch.Tensor], model_deploy: bool) -> None:
    """Raise a clear error when a checkpoint's form (training / deploy) differs from the model's."""
    form = checkpoint_form(state_dict)
    if form == 'deploy' and not model_deploy:
        raise ValueError(
            'this UniRepLKNet checkpoint is in the deploy (re-parameterised) form, but the model is in training '
            'form: build the model with deploy=True (e.g. timm.create_model(name, deploy=True)) to load it. A '
            'deploy checkpoint cannot be turned back into the training form; for training or fine-tuning, load a '
            'training-form checkpoint (the official .pth files are in training form)')
    if form == 'train' and model_deploy:
        raise ValueError(
            'this UniRepLKNet checkpoint is in the training form, but the model is in deploy '
            f'(re-parameterised) form: {_HOW_TO_DEPLOY}')


def _check_form_on_load(module: nn.Module, state_dict, prefix, *args) -> None:
    """`load_state_dict` pre-hook of `UniRepLKNet`: the form check, on the keys under this model's prefix."""
    own = {k[len(prefix):]: None for k in state_dict if k.startswith(prefix)}
    _check_form(own, module.deploy)


def model_args_from_official(
        in_chans: int = 3,
        num_classes: Optional[int] = 1000,
        depths: Sequence[int] = (3, 3, 27, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.,
        layer_scale_init_value: Optional[float] = 1e-6,
        head_init_scale: float = 1.,
        kernel_sizes: Optional[Sequence[Sequence[int]]] = None,
        deploy: bool = False,
        with_cp: bool = False,
        init_cfg=None,
        attempt_use_lk_impl: bool = True,
        use_sync_bn: bool = False,
) -> Dict:
    """Zoo `UniRepLKNet` kwargs for the official `UniRepLKNet(...)` call.

    `attempt_use_lk_impl` (an optional CUDA kernel) and `use_sync_bn` change neither keys nor numerics and are
    dropped (convert BNs with `torch.nn.SyncBatchNorm.convert_sync_batchnorm` if needed); `with_cp` becomes
    `set_grad_checkpointing()` in `create_from_official`.
    """
    if init_cfg is not None or num_classes is None:
        raise ValueError(
            'the official downstream-backbone mode (init_cfg / num_classes=None) is not a classifier; build the '
            'classifier and use features_only=True or forward_intermediates() for the four stage outputs')
    return dict(
        in_chans=in_chans,
        num_classes=num_classes,
        depths=tuple(depths),
        dims=tuple(dims),
        kernel_sizes=kernel_sizes,
        layer_scale_init_value=layer_scale_init_value,
        head_init_scale=head_init_scale,
        drop_path_rate=drop_path_rate,
        deploy=deploy,
    )


def create_from_official(**official_kwargs) -> UniRepLKNet:
    """The (untrained) zoo model matching the official `UniRepLKNet(**official_kwargs)`."""
    model = UniRepLKNet(**model_args_from_official(**official_kwargs))
    if official_kwargs.get('with_cp'):
        model.set_grad_checkpointing(True)
    return model


# Official key piece -> zoo key piece, below a block prefix.
_OFFICIAL_BLOCK_RENAMES = (
    ('gamma', 'ls.gamma'),
    ('dwconv.', 'conv_dw.'),
    ('se.down.', 'se.fc1.'),
    ('se.up.', 'se.fc2.'),
    ('pwconv1.1.', 'mlp.fc1.'),
    ('act.1.gamma', 'mlp.grn.weight'),
    ('act.1.beta', 'mlp.grn.bias'),
    ('pwconv2.0.', 'mlp.fc2.'),
    ('pwconv2.2.', 'mlp.norm.'),
)


def _official_key_to_zoo(key: str) -> str:
    parts = key.split('.')
    if parts[0] == 'downsample_layers':
        stage, rest = parts[1], '.'.join(parts[2:])
        return f'stem.{rest}' if stage == '0' else f'stages.{stage}.downsample.{rest}'
    if parts[0] == 'stages':
        stage, block, rest = parts[1], parts[2], '.'.join(parts[3:])
        for old, new in _OFFICIAL_BLOCK_RENAMES:
            if rest == old or (old.endswith('.') and rest.startswith(old)):
                rest = new + rest[len(old):]
                break
        return f'stages.{stage}.blocks.{block}.{rest}'
    if parts[0] in ('norm', 'head'):
        return f'head.{"fc" if parts[0] == "head" else "norm"}.{".".join(parts[1:])}'
    return key  # left as is, so that strict loading names it


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: UniRepLKNet) -> Dict[str, torch.Tensor]:
    """Accept an official UniRepLKNet checkpoint (training or deploy form; raw, or a training dict with a
    `model` entry) or a zoo one, for a model of the same form."""
    if 'model' in state_dict and isinstance(state_dict['model'], dict):
        state_dict = state_dict['model']
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    _check_form(state_dict, model.deploy)
    if 'stem.0.weight' in state_dict:
        return state_dict
    if 'downsample_layers.0.0.weight' not in state_dict:
        raise ValueError(
            'not a UniRepLKNet checkpoint: expected the official layout (downsample_layers.*, stages.*, norm.*, '
            f'head.*) or the zoo layout (stem.*, stages.*, head.*); its first keys are {list(state_dict)[:5]}')
    out = {}
    for key, value in state_dict.items():
        new_key = _official_key_to_zoo(key)
        if new_key.endswith(('mlp.grn.weight', 'mlp.grn.bias')):
            value = value.reshape(-1)
        out[new_key] = value
    return out


def _create_unireplknet(variant: str, pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """Build a variant. Official weights are in training form: with `deploy=True` they are loaded into the
    training form, which is then re-parameterised."""
    deploy = kwargs.pop('deploy', False)
    model = build_zoo_model(
        UniRepLKNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        weight_sha256=WEIGHT_SHA256,
        deploy=deploy and not pretrained,
        **kwargs,
    )
    if deploy and pretrained:
        reparameterize_model(model, inplace=True)
    return model


def _cfg(url: str = '', **kwargs) -> Dict:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0',
        'classifier': 'head.fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2311.15599',
        'paper_name': 'UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio, Video, Point Cloud, '
                      'Time-Series and Image Recognition',
        'origin_url': 'https://github.com/AILab-CVC/UniRepLKNet',
        'notes': (
            'Variant table from the TPAMI version, "Scaling Up Your Kernels: Large Kernel Design in ConvNets towards '
            'Universal Representations" (arXiv:2410.08049, Tables 4-5); its params and GMACs are for the deploy form.',
            'Loads in training form; build with deploy=True (or call model.reparameterize()) for the faster, '
            'numerically equivalent inference form.',
        ),
        **kwargs,
    }


# Params (M) and GMACs of each cfg at its input size (training form, as loaded), and the recipe.
_COUNTS = {
    'a.in1k': (4.65, 0.67), 'f.in1k': (6.49, 0.95), 'p.in1k': (11.08, 1.63), 'n.in1k': (18.82, 2.85),
    't.in1k': (31.69, 5.0), 's.in1k': (56.46, 9.22), 's.in22k_ft_in1k_384': (56.46, 27.09),
    'b.in22k_ft_in1k_384': (99.09, 47.67), 'l.in22k_ft_in1k_384': (220.08, 106.16),
    'xl.in22k_ft_in1k_384': (388.69, 187.76), 's.in22k': (72.48, 9.24), 'b.in22k': (120.45, 16.25),
    'l.in22k': (252.11, 26.58), 'xl.in22k': (431.39, 47.0),
}
_RECIPES = {'a.in1k': 'a', 'f.in1k': 'f', 'p.in1k': 'p', 'n.in1k': 'n', 't.in1k': 't', 's.in1k': 's_in1k'}


def _meta(filename: str) -> Dict:
    """Params, GMACs, recipe, and the top-1 the authors give in the checkpoint's file name (IN-1k val, %)."""
    name = filename[len('unireplknet_'):].replace('_in1k_224', '.in1k').replace('_in22k_to_in1k_384', '.in22k_ft_in1k_384')
    name = name.split('_acc')[0].replace('_in22k_pretrain.pth', '.in22k')
    params_m, gmacs = _COUNTS[name]
    recipe = _RECIPES.get(name, name.replace('.', '_'))
    meta = dict(params_m=params_m, gmacs=gmacs, recipe=f'training/recipes/unireplknet_{recipe}.yaml')
    if '_acc' in filename:
        top1 = float(filename.split('_acc')[1][:-len('.pth')])
        meta['paper'] = [paper('ImageNet-1k', "authors' checkpoint name (DingXiaoH/UniRepLKNet)", top1=top1)]
    return meta


def _official(filename: str, description: str, **kwargs) -> Dict:
    return _cfg(
        meta=_meta(filename),
        hf_hub_id='DingXiaoH/UniRepLKNet',
        hf_hub_filename=filename,
        source='official',
        description=description,
        **kwargs,
    )


def _in1k(filename: str) -> Dict:
    return _official(filename, 'Official ImageNet-1k checkpoint (300 epochs at 224 px), converted on load.')


def _in22k_ft_in1k_384(filename: str) -> Dict:
    return _official(
        filename,
        'Official checkpoint pretrained on ImageNet-22k and fine-tuned on ImageNet-1k at 384 px, converted on load.',
        input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, crop_mode='squash')


def _in22k(filename: str, size: int = 224) -> Dict:
    return _official(
        filename,
        f'Official ImageNet-22k (21841 classes) pretraining checkpoint ({size} px), converted on load.',
        num_classes=21841, input_size=(3, size, size), pool_size=(size // 32, size // 32))


default_cfgs = zoo_cfgs({
    'unireplknet_a.in1k': _in1k('unireplknet_a_in1k_224_acc77.03.pth'),
    'unireplknet_f.in1k': _in1k('unireplknet_f_in1k_224_acc78.58.pth'),
    'unireplknet_p.in1k': _in1k('unireplknet_p_in1k_224_acc80.23.pth'),
    'unireplknet_n.in1k': _in1k('unireplknet_n_in1k_224_acc81.64.pth'),
    'unireplknet_t.in1k': _in1k('unireplknet_t_in1k_224_acc83.21.pth'),
    'unireplknet_s.in1k': _in1k('unireplknet_s_in1k_224_acc83.91.pth'),
    'unireplknet_s.in22k_ft_in1k_384': _in22k_ft_in1k_384('unireplknet_s_in22k_to_in1k_384_acc86.44.pth'),
    'unireplknet_b.in22k_ft_in1k_384': _in22k_ft_in1k_384('unireplknet_b_in22k_to_in1k_384_acc87.40.pth'),
    'unireplknet_l.in22k_ft_in1k_384': _in22k_ft_in1k_384('unireplknet_l_in22k_to_in1k_384_acc87.88.pth'),
    'unireplknet_xl.in22k_ft_in1k_384': _in22k_ft_in1k_384('unireplknet_xl_in22k_to_in1k_384_acc87.96.pth'),
    'unireplknet_s.in22k': _in22k('unireplknet_s_in22k_pretrain.pth'),
    'unireplknet_b.in22k': _in22k('unireplknet_b_in22k_pretrain.pth'),
    'unireplknet_l.in22k': _in22k('unireplknet_l_in22k_pretrain.pth', size=192),
    'unireplknet_xl.in22k': _in22k('unireplknet_xl_in22k_pretrain.pth', size=192),
})

# No sha256 of the official files could be read offline; add them here ('arch.tag' -> hex digest) once known.
WEIGHT_SHA256: Dict[str, str] = {}

card_info = dict(
    intended_use=(
        'ImageNet classification and a large-kernel ConvNet backbone (features_only / forward_intermediates give '
        'the four stages at strides 4, 8, 16, 32) for detection and segmentation. Use the deploy form '
        '(deploy=True or model.reparameterize()) for inference.'),
    limitations=(
        'Official checkpoints are pickled .pth files in the training form; they are read with '
        'torch.load(weights_only=True) and converted on load. No sha256 of them was available offline, so '
        'downloads are not checksum-verified. The optional CUDA implicit-GEMM depth-wise kernel of the official '
        'code is not used (numerics are identical, speed differs). The official downstream backbone adds a '
        'LayerNorm on each stage output; features_only returns the raw stage outputs. The 22k checkpoints of L and '
        'XL were trained at 192 px; their cfgs use 192 px with crop_pct 0.875 (inferred from the training '
        'resolution, not stated as an eval setting by the authors).'),
    variants={
        f'unireplknet_{v}': (
            f'{v.upper()}: depths {depths}, widths {widths}, {params}M params (deploy form; {train}M training form), '
            f'{gmacs} GMACs, ImageNet-1k top-1 {top1}')
        for v, depths, widths, params, train, gmacs, top1 in (
            ('a', '2-2-6-2', '40-80-160-320', 4.4, 4.65, '0.6 @224', '77.0 (IN-1k)'),
            ('f', '2-2-6-2', '48-96-192-384', 6.2, 6.49, '0.9 @224', '78.6 (IN-1k)'),
            ('p', '2-2-6-2', '64-128-256-512', 10.7, 11.08, '1.6 @224', '80.2 (IN-1k)'),
            ('n', '2-2-8-2', '80-160-320-640', 18.3, 18.82, '2.8 @224', '81.6 (IN-1k)'),
            ('t', '3-3-18-3', '80-160-320-640', 31.0, 31.69, '4.9 @224', '83.2 (IN-1k)'),
            ('s', '3-3-27-3', '96-192-384-768', 55.6, 56.46, '9.1 @224 / 26.7 @384',
             '83.9 (IN-1k) / 86.4 (IN-22k -> 1k @384)'),
            ('b', '3-3-27-3', '128-256-512-1024', 97.9, 99.09, '47.2 @384', '87.4 (IN-22k -> 1k @384)'),
            ('l', '3-3-27-3', '192-384-768-1536', 218.3, 220.08, '105.4 @384', '87.9 (IN-22k -> 1k @384)'),
            ('xl', '3-3-27-3', '256-512-1024-2048', 386.4, 388.69, '187 @384', '88.0 (IN-22k -> 1k @384)'),
        )
    },
)


def _variant(variant: str, depths: Tuple[int, ...], width: int, pretrained: bool, kwargs: Dict) -> UniRepLKNet:
    model_args = dict(depths=depths, dims=tuple(width * m for m in (1, 2, 4, 8)))
    return _create_unireplknet(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def unireplknet_a(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-A (4.4M params, 0.6 GMACs)."""
    return _variant('unireplknet_a', (2, 2, 6, 2), 40, pretrained, kwargs)


@register_model
def unireplknet_f(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-F (6.2M params, 0.9 GMACs)."""
    return _variant('unireplknet_f', (2, 2, 6, 2), 48, pretrained, kwargs)


@register_model
def unireplknet_p(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-P (10.7M params, 1.6 GMACs)."""
    return _variant('unireplknet_p', (2, 2, 6, 2), 64, pretrained, kwargs)


@register_model
def unireplknet_n(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-N (18.3M params, 2.8 GMACs)."""
    return _variant('unireplknet_n', (2, 2, 8, 2), 80, pretrained, kwargs)


@register_model
def unireplknet_t(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-T (31.0M params, 4.9 GMACs)."""
    return _variant('unireplknet_t', (3, 3, 18, 3), 80, pretrained, kwargs)


@register_model
def unireplknet_s(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-S (55.6M params, 9.1 GMACs at 224)."""
    return _variant('unireplknet_s', (3, 3, 27, 3), 96, pretrained, kwargs)


@register_model
def unireplknet_b(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-B (98.0M params, 47.2 GMACs at 384)."""
    return _variant('unireplknet_b', (3, 3, 27, 3), 128, pretrained, kwargs)


@register_model
def unireplknet_l(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-L (218.3M params, 105.4 GMACs at 384)."""
    return _variant('unireplknet_l', (3, 3, 27, 3), 192, pretrained, kwargs)


@register_model
def unireplknet_xl(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-XL (386.4M params, 187 GMACs at 384)."""
    return _variant('unireplknet_xl', (3, 3, 27, 3), 256, pretrained, kwargs)
