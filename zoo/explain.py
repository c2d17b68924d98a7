"""See inside a zoo model: feature maps, attention, attribution, activation maximisation, linear interpreter.

`explain(model, image, method=...)` writes pictures a person can read (PNG, each with a title, a colour bar
and the layer it shows) and returns them with the numbers behind them. `zoo explain` is its command line.

- `features`: the output of each stage (`forward_intermediates`): the channel mean and the top-k channels by
  mean activation, on one colour scale.
- `attention`: the architecture's own attention. ConViT: each GPSA head's gate sigma(lambda), the share of
  positional attention in its mix (1 - sigma(lambda) is the content share), and the attention map of chosen
  query patches in every block. HaloNet: the block-local attention of a chosen pixel over its halo window.
- `gradcam`, `integrated-gradients`: attribution through captum (PyTorch's own attribution library; it has
  both methods, and integrated gradients report their completeness error).
- `maximize`: activation maximisation of a class logit or of a channel of a layer, from noise, with the usual
  regularisers: random jitter, Gaussian blur every few steps and total variation.
- `linear`: the linear interpreter of "A Tour of Convolutional Networks Guided by Linear Interpreters"
  (Navarrete Michelini et al., ICCV 2019). Every non-linearity is frozen at its value for the image, which
  leaves an affine map z -> A z + c: A is the linear map, c the bias path (the interpreter's output for a zero
  input). ReLU-like units become 0/1 gates (exact); GELU, SiLU and other smooth units use the input-dependent
  slope f(a) / a, so the frozen net still gives the model's output at the image; softmax, sigmoid and norms
  become constants; a product of two input-dependent tensors keeps its right factor's value. Rows of A
  (per-class templates) and columns (the effect of one pixel on every logit) are drawn, and the bias path's
  share of each logit is reported. The map is checked: A x + c must give the model's logits.

matplotlib is imported here only, so `import zoo` stays free of it.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from torch.utils._pytree import tree_flatten, tree_map
from torchvision.transforms.functional import gaussian_blur

import zoo
from zoo.errors import InputError
from zoo._io import write_atomically

__all__ = ['METHODS', 'Explanation', 'explain', 'LinearInterpreter', 'load_input']

METHODS = ('features', 'attention', 'gradcam', 'integrated-gradients', 'maximize', 'linear')


@dataclass
class Explanation:
    """What `explain` made: the pictures it wrote and the numbers behind them (tensors on the CPU)."""
    method: str
    pictures: List[Path] = field(default_factory=list)
    values: Dict[str, Any] = field(default_factory=dict)


# Input and pictures


def load_input(model: nn.Module, image: Union[str, Path, Image.Image, torch.Tensor],
               input_size: Optional[int] = None) -> torch.Tensor:
    """An image path, a PIL image or a (3, H, W) / (1, 3, H, W) normalised tensor -> a (1, 3, H, W) batch,
    transformed as the model's data config says (at `input_size` when given)."""
    if isinstance(image, torch.Tensor):
        return (image if image.ndim == 4 else image[None]).float()
    if not isinstance(image, Image.Image):
        try:
            image = Image.open(image).convert('RGB')
        except (OSError, ValueError) as e:
            raise InputError(f'cannot read image {image}: {e}') from e
    config = timm.data.resolve_model_data_config(model)
    if input_size:
        config.update(input_size=(3, input_size, input_size), crop_pct=1.0)
    return timm.data.create_transform(**config, is_training=False)(image.convert('RGB'))[None]


def _to_rgb(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) tensor -> an (H, W, 3) array in [0, 1], with the model's mean and std."""
    config = timm.data.resolve_model_data_config(model)
    mean = torch.tensor(config['mean']).view(3, 1, 1)
    std = torch.tensor(config['std']).view(3, 1, 1)
    return (x.detach().cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: fig.savefig(f, format='png', dpi=100))
    return path


def _heat(ax, data, fig: Figure, title: str, cmap: str = 'viridis', vmin=None, vmax=None, label: str = ''):
    """One heat map with its colour bar."""
    im = ax.imshow(np.asarray(data), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
    return im


def _grid_figure(panels: int, columns: int = 4, size: float = 2.6) -> Tuple[Figure, List]:
    rows = -(-panels // columns)
    cols = min(columns, panels)
    fig = Figure(figsize=(size * cols + 0.6, size * rows + 0.8), layout='constrained')
    axes = list(np.atleast_1d(fig.subplots(rows, cols)).ravel())
    for ax in axes[panels:]:
        ax.axis('off')
    return fig, axes


def _name(model: nn.Module) -> str:
    return model.pretrained_cfg.get('architecture', type(model).__name__) if hasattr(model, 'pretrained_cfg') else type(model).__name__


def _labels(model: nn.Module) -> Optional[List[str]]:
    names = getattr(model, 'pretrained_cfg', {}).get('label_names')
    return list(names) if names else None


def _class_name(model: nn.Module, k: int) -> str:
    names = _labels(model)
    return f'{k} {names[k]}' if names else f'class {k}'


# Feature maps


def _backbone(model: nn.Module) -> nn.Module:
    """The module whose `forward_intermediates` gives the stages: the model, or a dense model's encoder."""
    for candidate in (model, getattr(model, 'encoder', None)):
        if candidate is not None and hasattr(candidate, 'forward_intermediates') and hasattr(candidate, 'feature_info'):
            return candidate
    raise InputError(f'{_name(model)} has no forward_intermediates (neither it nor an encoder): no stage features to show')


def _feature_names(backbone: nn.Module) -> List[str]:
    info = backbone.feature_info
    return [f['module'] for f in (info.get_dicts() if hasattr(info, 'get_dicts') else info)]


def _layer_indices(names: List[str], layer: Optional[Union[str, Sequence[str]]]) -> List[int]:
    if layer is None:
        return list(range(len(names)))
    wanted = [layer] if isinstance(layer, str) else list(layer)
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise InputError(f'no layer {", ".join(unknown)}; the layers are {", ".join(names)}')
    return [names.index(w) for w in wanted]


def feature_maps(model: nn.Module, x: torch.Tensor, out_dir: Path, layer=None, top_k: int = 8, **_) -> Explanation:
    """One picture per stage: the channel mean and the `top_k` channels of highest mean activation."""
    backbone = _backbone(model)
    names = _feature_names(backbone)
    indices = _layer_indices(names, layer)
    with torch.no_grad():
        maps = backbone.forward_intermediates(x, indices=indices, intermediates_only=True)
    result = Explanation('features')
    for index, fmap in zip(indices, maps):
        fmap = fmap[0].float().cpu()
        if fmap.ndim != 3:
            raise InputError(f'{names[index]} gives {tuple(fmap.shape)} features, not a (C, H, W) map')
        k = min(top_k, fmap.shape[0])
        top = fmap.mean((1, 2)).topk(k).indices
        panels = [('channel mean', fmap.mean(0))] + [(f'channel {c}', fmap[c]) for c in top.tolist()]
        vmin = min(p.min().item() for _, p in panels)
        vmax = max(p.max().item() for _, p in panels)
        fig, axes = _grid_figure(len(panels))
        for ax, (title, data) in zip(axes, panels):
            _heat(ax, data, fig, title, vmin=vmin, vmax=vmax, label='activation')
        fig.suptitle(f'{_name(model)}, layer {names[index]} ({fmap.shape[0]} ch, {fmap.shape[1]}x{fmap.shape[2]}): '
                     f'channel mean and top {k} channels by mean activation', fontsize=9)
        result.pictures.append(_save(fig, out_dir / f'features_{names[index]}.png'))
        result.values[names[index]] = {'mean': fmap.mean(0), 'top_channels': top, 'top_maps': fmap[top]}
    return result


# Attention


def _attention_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in ('GPSA', 'MHSA', 'HaloAttention')]


def convit_attention(model: nn.Module, x: torch.Tensor, out_dir: Path, layer=None,
                     queries: Optional[Sequence[Tuple[int, int]]] = None) -> Explanation:
    """ConViT: the per-head gates sigma(lambda) of the GPSA blocks, and the attention rows of chosen query
    patches (default: the centre patch) in each block, one map per head."""
    modules = _attention_modules(model)
    captured: Dict[str, torch.Tensor] = {}
    handles = [m.attn_drop.register_forward_hook(
        lambda mod, inp, out, name=name: captured.__setitem__(name, out.detach().float().cpu()))
        for name, m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    grid_h, grid_w = x.shape[-2] // model.patch_embed.patch_size[0], x.shape[-1] // model.patch_embed.patch_size[1]
    queries = list(queries) if queries else [(grid_h // 2, grid_w // 2)]
    result = Explanation('attention')

    gpsa = [(n, m) for n, m in modules if type(m).__name__ == 'GPSA']
    gates = torch.stack([torch.sigmoid(m.gating_param.detach().float().cpu()) for _, m in gpsa])
    fig = Figure(figsize=(max(5.0, 1.0 + 0.5 * gates.shape[1]), 1.4 + 0.35 * len(gpsa)), layout='constrained')
    ax = fig.subplots()
    _heat(ax, gates, fig, '', cmap='coolwarm', vmin=0, vmax=1, label='sigma(lambda): positional share')
    ax.set_yticks(range(len(gpsa)), [n.rsplit('.', 1)[0] for n, _ in gpsa], fontsize=7)
    ax.set_xticks(range(gates.shape[1]), [f'h{i}' for i in range(gates.shape[1])], fontsize=7)
    fig.suptitle(f'{_name(model)}: GPSA gate per head\n(1 = positional attention, 0 = content)', fontsize=9)
    result.pictures.append(_save(fig, out_dir / 'attention_gates.png'))
    result.values['gates'] = gates

    names = [n for n, _ in modules]
    wanted = names if layer is None else [layer if layer in names else f'{layer}.attn']
    for name in wanted:
        if name not in captured:
            raise InputError(f'no attention layer {name}; the attention layers are {", ".join(names)}')
        attn = captured[name][0]  # (heads, N, N)
        prefix = attn.shape[-1] - grid_h * grid_w
        result.values[name] = attn
        for qy, qx in queries:
            if not (0 <= qy < grid_h and 0 <= qx < grid_w):
                raise InputError(f'query ({qy}, {qx}) is outside the {grid_h}x{grid_w} patch grid')
            rows = attn[:, prefix + qy * grid_w + qx, prefix:].reshape(-1, grid_h, grid_w)
            fig, axes = _grid_figure(len(rows))
            for head, (ax, row) in enumerate(zip(axes, rows)):
                _heat(ax, row, fig, f'head {head}', cmap='magma', vmin=0, label='attention')
                ax.plot([qx], [qy], marker='+', color='cyan')
            fig.suptitle(f'{_name(model)}, layer {name}: attention of query patch ({qy}, {qx})'
                         + (' (the class token\'s share left out)' if prefix else ''), fontsize=9)
            result.pictures.append(_save(fig, out_dir / f'attention_{name}_q{qy}_{qx}.png'))
    return result


class _SdpaRecorder(torch.overrides.TorchFunctionMode):
    """Records the attention probabilities of every `scaled_dot_product_attention` call."""

    def __init__(self):
        super().__init__()
        self.probs: List[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.probs.append(_sdpa_probs(*args, **kwargs).detach().float().cpu())
        return func(*args, **kwargs)


def _sdpa_probs(q, k, v=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_) -> torch.Tensor:
    """softmax(q k^T * scale + mask): the weights `F.scaled_dot_product_attention` applies (no dropout)."""
    logits = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        raise InputError('causal attention is not drawn')
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float('-inf')) if attn_mask.dtype == torch.bool else logits + attn_mask
    return logits.softmax(-1)


def halo_attention(model: nn.Module, x: torch.Tensor, out_dir: Path, layer=None,
                   pixel: Optional[Tuple[float, float]] = None) -> Explanation:
    """HaloNet: for a chosen pixel (fractions of height and width; default the centre), each head's attention
    over the block's halo window, placed where the window lies on the layer's input map."""
    modules = _attention_modules(model)
    names = [n for n, _ in modules]
    if layer is not None and layer not in names:
        raise InputError(f'no attention layer {layer}; the attention layers are {", ".join(names)}')
    name, module = modules[names.index(layer)] if layer else modules[-1]
    inputs = {}
    handle = module.register_forward_pre_hook(lambda mod, inp: inputs.__setitem__('x', inp[0]))
    recorder = _SdpaRecorder()
    try:
        with torch.no_grad(), recorder:
            model(x)
    finally:
        handle.remove()
    probs = recorder.probs[names.index(name)]  # (heads, blocks, bq*bq, win*win) for batch 1
    H, W = inputs['x'].shape[-2:]
    b, h, s, win = module.block_size, module.halo_size, module.stride, module.win_size
    fy, fx = pixel or (0.5, 0.5)
    py, px = min(int(fy * H), H - 1), min(int(fx * W), W - 1)
    nbw = -(-W // b)
    block = (py // b) * nbw + px // b
    bq = b // s
    query = ((py % b) // s) * bq + (px % b) // s
    rows = probs[:, block, query].reshape(-1, win, win)
    top, left = (py // b) * b - h, (px // b) * b - h
    maps = torch.zeros(len(rows), H, W)
    for dy in range(win):
        for dx in range(win):
            y, x_ = top + dy, left + dx
            if 0 <= y < H and 0 <= x_ < W:
                maps[:, y, x_] = rows[:, dy, dx]
    fig, axes = _grid_figure(len(maps))
    for head, (ax, m) in enumerate(zip(axes, maps)):
        _heat(ax, m, fig, f'head {head}', cmap='magma', vmin=0, label='attention')
        ax.plot([px], [py], marker='+', color='cyan')
    fig.suptitle(f'{_name(model)}, layer {name}: attention of pixel ({py}, {px}) over its {win}x{win} halo window '
                 f'on the {H}x{W} map (block {b}, halo {h})', fontsize=9)
    result = Explanation('attention', values={name: rows, 'pixel': (py, px)})
    result.pictures.append(_save(fig, out_dir / f'attention_{name}_p{py}_{px}.png'))
    return result


def attention(model: nn.Module, x: torch.Tensor, out_dir: Path, layer=None, **kwargs) -> Explanation:
    kinds = {type(m).__name__ for _, m in _attention_modules(model)}
    if 'GPSA' in kinds:
        return convit_attention(model, x, out_dir, layer=layer, queries=kwargs.get('queries'))
    if 'HaloAttention' in kinds:
        return halo_attention(model, x, out_dir, layer=layer, pixel=kwargs.get('pixel'))
    raise InputError(f'{_name(model)} has no attention of its own to draw (ConViT and HaloNet do); '
                     'try --method gradcam')


# Attribution (captum)


class _GridProbe(nn.Module):
    """An identity on a (B, C, H, W) view of a token layer's output, for Grad-CAM to hook."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _target(model: nn.Module, x: torch.Tensor, target_class: Optional[int]) -> int:
    if target_class is None:
        with torch.no_grad():
            return int(model(x).argmax(-1)[0])
    if not 0 <= target_class < model.num_classes:
        raise InputError(f'--target-class {target_class} is not one of the {model.num_classes} classes')
    return target_class


def gradcam(model: nn.Module, x: torch.Tensor, out_dir: Path, layer=None, target_class=None, **_) -> Explanation:
    """Grad-CAM (captum `LayerGradCam`, ReLU'd as in the paper) at the last stage, or `layer`, upsampled."""
    names = _feature_names(model)
    name = layer or names[-1]
    if name not in dict(model.named_modules()):
        raise InputError(f'no layer {name}; the stages are {", ".join(names)}')
    target = _target(model, x, target_class)
    module = model.get_submodule(name)
    probe, handle = _GridProbe(), None
    with torch.no_grad():
        out = {}
        h = module.register_forward_hook(lambda m, i, o: out.__setitem__('o', o))
        model(x)
        h.remove()
    if out['o'].ndim == 3:  # tokens: Grad-CAM on the patch grid, class token left as it is
        reduction = dict((f['module'], f['reduction']) for f in model.feature_info)[name]
        gh, gw = x.shape[-2] // reduction, x.shape[-1] // reduction

        def to_grid(m, i, o):
            prefix = o.shape[1] - gh * gw
            grid = probe(o[:, prefix:].transpose(1, 2).reshape(o.shape[0], -1, gh, gw))
            return torch.cat([o[:, :prefix], grid.flatten(2).transpose(1, 2)], 1)
        handle = module.register_forward_hook(to_grid)
        hooked = probe
    else:
        hooked = module
    try:
        cam = LayerGradCam(model, hooked).attribute(x, target=target, relu_attributions=True)
    finally:
        if handle is not None:
            handle.remove()
    cam_small = cam[0, 0].detach().float().cpu()
    cam = LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), 'bilinear')[0, 0].float().cpu()
    fig = Figure(figsize=(8, 3.6), layout='constrained')
    ax0, ax1 = fig.subplots(1, 2)
    ax0.imshow(_to_rgb(model, x[0]))
    ax0.set_title('input', fontsize=8)
    ax0.axis('off')
    ax1.imshow(_to_rgb(model, x[0]))
    im = ax1.imshow(cam.numpy(), cmap='jet', alpha=0.5)
    ax1.set_title('Grad-CAM overlay', fontsize=8)
    ax1.axis('off')
    fig.colorbar(im, ax=ax1, fraction=0.046, pad=0.04, label='Grad-CAM')
    fig.suptitle(f'{_name(model)}: Grad-CAM at layer {name} for {_class_name(model, target)} (captum)', fontsize=9)
    result = Explanation('gradcam', values={'cam': cam, 'cam_layer': cam_small, 'target': target, 'layer': name})
    result.pictures.append(_save(fig, out_dir / f'gradcam_{name}_{target}.png'))
    return result


def integrated_gradients(model: nn.Module, x: torch.Tensor, out_dir: Path, target_class=None,
                         steps: int = 32, **_) -> Explanation:
    """Integrated gradients (captum) from a zero (mean-colour) baseline; the completeness error
    sum(attributions) - (f(x) - f(baseline)) is reported as `delta`."""
    target = _target(model, x, target_class)
    attr, delta = IntegratedGradients(model).attribute(
        x, baselines=torch.zeros_like(x), target=target, n_steps=steps, internal_batch_size=8,
        return_convergence_delta=True)
    attr = attr[0].detach().float().cpu()
    per_pixel = attr.sum(0)
    bound = per_pixel.abs().max().item() or 1.0
    fig = Figure(figsize=(8, 3.6), layout='constrained')
    ax0, ax1 = fig.subplots(1, 2)
    ax0.imshow(_to_rgb(model, x[0]))
    ax0.set_title('input', fontsize=8)
    ax0.axis('off')
    _heat(ax1, per_pixel, fig, 'attribution summed over channels', cmap='RdBu_r', vmin=-bound, vmax=bound,
          label='contribution to the logit')
    fig.suptitle(f'{_name(model)}: integrated gradients ({steps} steps, zero baseline) at the input '
                 f'for {_class_name(model, target)} (captum)', fontsize=9)
    result = Explanation('integrated-gradients', values={'attributions': attr, 'delta': float(delta), 'target': target})
    result.pictures.append(_save(fig, out_dir / f'integrated_gradients_{target}.png'))
    return result


# Activation maximisation


def _total_variation(img: torch.Tensor) -> torch.Tensor:
    return (img[..., 1:, :] - img[..., :-1, :]).abs().mean() + (img[..., :, 1:] - img[..., :, :-1]).abs().mean()


def maximize(model: nn.Module, x: torch.Tensor, out_dir: Path, layer=None, target_class=None,
             channel: Optional[int] = None, steps: int = 64, lr: float = 0.05, jitter: int = 8,
             blur_every: int = 4, blur_sigma: float = 0.5, tv_weight: float = 0.05, l2_weight: float = 1e-3,
             seed: int = 0, **_) -> Explanation:
    """An image (the size of `x`) that raises a class logit (default: the class `x` is given) or, with
    `channel`, the mean of one channel of `layer` (default: the last stage). Adam on the normalised image,
    a random roll of up to `jitter` pixels each step, a Gaussian blur every `blur_every` steps, and total
    variation and L2 penalties."""
    by_channel = channel is not None
    names = _feature_names(model)
    name = (layer or names[-1]) if by_channel else 'logits'
    captured = {}
    if by_channel:
        if name not in dict(model.named_modules()):
            raise InputError(f'no layer {name}; the stages are {", ".join(names)}')
        handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: captured.__setitem__('o', o))
    else:
        target_class = _target(model, x, target_class)

    def objective(img: torch.Tensor) -> torch.Tensor:
        logits = model(img)
        if not by_channel:
            return logits[0, target_class]
        out = captured['o']
        width = out.shape[1] if out.ndim == 4 else out.shape[-1]
        if not 0 <= channel < width:
            raise InputError(f'channel {channel} is not one of the {width} channels of {name}')
        return out[0, channel].mean() if out.ndim == 4 else out[0, :, channel].mean()

    generator = torch.Generator().manual_seed(seed)
    img = (0.1 * torch.randn(x.shape, generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([img], lr=lr)
    try:
        with torch.no_grad():
            start = objective(img).item()
        for step in range(steps):
            dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
            value = objective(torch.roll(img, (dy, dx), dims=(-2, -1)))
            loss = -value + tv_weight * _total_variation(img) + l2_weight * img.pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if blur_every and (step + 1) % blur_every == 0:
                with torch.no_grad():
                    img.copy_(gaussian_blur(img, kernel_size=3, sigma=blur_sigma))
        with torch.no_grad():
            end = objective(img).item()
    finally:
        if by_channel:
            handle.remove()
    what = f'channel {channel} of {name}' if by_channel else _class_name(model, target_class)
    picture = img.detach()[0]
    fig = Figure(figsize=(8, 3.6), layout='constrained')
    ax0, ax1 = fig.subplots(1, 2)
    ax0.imshow(_to_rgb(model, picture))
    ax0.set_title('image (de-normalised)', fontsize=8)
    ax0.axis('off')
    _heat(ax1, picture.norm(dim=0), fig, 'per-pixel magnitude', label='|image| (normalised units)')
    fig.suptitle(f'{_name(model)}: activation maximisation of {what}, layer {name} ({steps} steps; objective '
                 f'{start:.3g} -> {end:.3g}; jitter {jitter}px, blur every {blur_every}, TV {tv_weight})', fontsize=9)
    stem = f'maximize_{name}_ch{channel}' if by_channel else f'maximize_class{target_class}'
    result = Explanation('maximize', values={'image': picture.cpu(), 'start': start, 'end': end, 'layer': name})
    result.pictures.append(_save(fig, out_dir / f'{stem}.png'))
    return result


# The linear interpreter


_SLOPE = {'relu', 'relu_', 'relu6', 'gelu', 'silu', 'leaky_relu', 'leaky_relu_', 'hardswish', 'hardtanh', 'elu',
          'mish', 'abs'}
_CONSTANT = {'softmax', 'log_softmax', 'sigmoid', 'sigmoid_', 'tanh', 'exp', 'sqrt', 'rsqrt', 'reciprocal', 'norm',
             'vector_norm', 'std', 'var', 'hardsigmoid', 'argmax', 'argmin', 'pow', '__pow__', 'erf', 'log'}
_PRODUCT = {'mul', '__mul__', '__rmul__', '__imul__', 'mul_', 'matmul', '__matmul__', '__rmatmul__', 'bmm', 'einsum'}
_QUOTIENT = {'div', '__truediv__', '__itruediv__', 'div_'}


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor) if isinstance(t, _Scoped) else t


def _halves(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    t = _plain(t)
    return t[:t.shape[0] // 2], t[t.shape[0] // 2:]


def _wrap(t: torch.Tensor, frozen: bool = False) -> '_Scoped':
    out = t.as_subclass(_Scoped)
    out.frozen = frozen
    return out


def _constant(t: torch.Tensor) -> '_Scoped':
    """The first half's value in both halves: a constant of the interpreter."""
    first, _ = _halves(t)
    return _wrap(torch.cat([first, first.detach()]), frozen=True)


class _Scoped(torch.Tensor):
    """A doubled batch [x; z]: the first half runs the model on the image x, the second half runs the linear
    interpreter on z with every non-linearity frozen at its value on x (a LinearScope, as a tensor subclass)."""
    frozen = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        scoped = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, _Scoped)]
        name = getattr(func, '__name__', '')
        if scoped and not all(a.frozen for a in scoped):
            with torch._C.DisableTorchFunctionSubclass():
                if name in _SLOPE:
                    return _wrap(_slope(func, *args, **kwargs))
                if name in _CONSTANT:
                    return tree_map(lambda t: _constant(t) if isinstance(t, torch.Tensor) else t,
                                    func(*tree_map(_plain, args), **tree_map(_plain, kwargs)))
                if name in ('layer_norm', 'group_norm'):
                    return _wrap(_frozen_norm(name, *args, **kwargs))
                if name in ('max_pool2d', '_max_pool2d', 'max_pool2d_with_indices'):
                    return _wrap(_frozen_max_pool(*args, **kwargs))
                if name == 'scaled_dot_product_attention':
                    return _wrap(_frozen_sdpa(*args, **kwargs))
            live = [a for a in scoped if not a.frozen]
            if len(live) > 1 and name in _PRODUCT:  # keep the right factor's value: the product stays linear
                last = max(i for i, a in enumerate(args) if isinstance(a, _Scoped))
                args = tuple(_constant(a) if i == last else a for i, a in enumerate(args))
            elif name in _QUOTIENT and isinstance(args[1], _Scoped) or name == '__rtruediv__':
                index = 0 if name == '__rtruediv__' else 1
                args = tuple(_constant(a) if i == index else a for i, a in enumerate(args))
        out = super().__torch_function__(func, types, args, kwargs)
        frozen = all(a.frozen for a in tree_flatten((args, kwargs))[0] if isinstance(a, _Scoped))
        return tree_map(lambda t: _wrap(_plain(t), frozen) if isinstance(t, _Scoped) else t, out)


def _slope(func: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """f(a) on the first half; f(a0) / a0 * z on the second: the input-dependent slope (0/1 for ReLU)."""
    a0, a1 = _halves(x)
    args, kwargs = tree_map(_plain, args), tree_map(_plain, kwargs)
    y0 = func(a0.clone(), *args, **kwargs)
    at_zero = func(torch.full_like(a0[:1], 1e-6), *args, **kwargs) / 1e-6
    slope = torch.where(a0 != 0, y0 / torch.where(a0 != 0, a0, 1.0), at_zero)
    return torch.cat([y0, slope.detach() * a1])


def _frozen_norm(name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """LayerNorm / GroupNorm with the first half's standard deviation: (a - mean(a)) / sigma(x) * w + b."""
    x = _plain(x)
    args, kwargs = tree_map(_plain, args), tree_map(_plain, kwargs)
    if name == 'layer_norm':
        shape, weight, bias, eps = (list(args) + [None, None, None, 1e-5])[:4]
        shape = kwargs.get('normalized_shape', shape)
        weight, bias, eps = kwargs.get('weight', weight), kwargs.get('bias', bias), kwargs.get('eps', eps)
        dims = tuple(range(-len(shape), 0))
        grouped = x
    else:
        groups, weight, bias, eps = (list(args) + [None, None, None, 1e-5])[:4]
        groups = kwargs.get('num_groups', groups)
        weight, bias, eps = kwargs.get('weight', weight), kwargs.get('bias', bias), kwargs.get('eps', eps)
        grouped = x.reshape(x.shape[0], groups, -1)
        dims = (-1,)
    first, _ = _halves(grouped)
    sigma = torch.sqrt(first.var(dims, unbiased=False, keepdim=True) + eps).detach()
    centred = grouped - grouped.mean(dims, keepdim=True)
    out = (centred / torch.cat([sigma, sigma])).reshape(x.shape)
    if name == 'group_norm':
        view = (1, -1) + (1,) * (x.ndim - 2)
        weight = None if weight is None else weight.view(view)
        bias = None if bias is None else bias.view(view)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _frozen_max_pool(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                     return_indices=False) -> torch.Tensor:
    """Max-pooling that picks, in the second half, the positions the first half picked."""
    a0, a1 = _halves(x)
    y0, index = F.max_pool2d(a0, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
    y1 = a1.flatten(2).gather(2, index.flatten(2)).view_as(y0)
    return torch.cat([y0, y1])


def _frozen_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs) -> torch.Tensor:
    """Attention whose weights are the first half's, applied to both halves' values."""
    q0, _ = _halves(q)
    k0, _ = _halves(k)
    v = _plain(v)
    if attn_mask is not None and attn_mask.shape[0] == v.shape[0]:
        attn_mask, _ = _halves(attn_mask)
    probs = _sdpa_probs(q0, k0, attn_mask=_plain(attn_mask) if attn_mask is not None else None,
                        is_causal=is_causal, scale=scale).detach()
    return torch.cat([probs, probs]) @ v


class LinearInterpreter:
    """The linear interpreter of `model` at image `x` (1, 3, H, W): `self(z)` is the frozen network's output
    A z + c, `bias` is c (the bias path, the output for z = 0), `rows(classes)` are rows of A as images."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model, self.x = model, x.detach()
        self.logits = self(self.x, with_model=True)[0]
        self.bias = self(torch.zeros_like(self.x))

    def __call__(self, z: torch.Tensor, with_model: bool = False):
        out = _plain(self.model(_wrap(torch.cat([self.x.expand(len(z), -1, -1, -1), z]))))
        first, second = out[:len(z)], out[len(z):]
        return (first, second) if with_model else second

    def rows(self, classes: Sequence[int]) -> torch.Tensor:
        """(len(classes), 3, H, W): d(interpreter logit k) / dz, which is row k of A exactly."""
        z = self.x.clone().requires_grad_(True)
        out = self(z)[0]
        return torch.stack([torch.autograd.grad(out[k], z, retain_graph=True)[0][0] for k in classes])

    def column(self, pixel: Tuple[int, int]) -> torch.Tensor:
        """A times a unit white pixel at `pixel` (1 in every channel): that pixel's effect on every logit."""
        impulse = torch.zeros_like(self.x)
        impulse[..., pixel[0], pixel[1]] = 1.0
        with torch.no_grad():
            return (self(impulse) - self.bias)[0]


def linear_interpreter(model: nn.Module, x: torch.Tensor, out_dir: Path, target_class=None, top_k: int = 3,
                       pixel: Optional[Tuple[float, float]] = None, **_) -> Explanation:
    """Rows of the linear interpreter (per-class templates and their pixel-wise votes) for the target and the
    top classes, one column (the effect of one pixel) and the bias path's share of each logit."""
    interpreter = LinearInterpreter(model, x)
    logits, bias = interpreter.logits[0].detach(), interpreter.bias[0].detach()
    target = _target(model, x, target_class)
    classes = [target] + [k for k in logits.topk(min(top_k + 1, len(logits))).indices.tolist() if k != target][:top_k]
    rows = interpreter.rows(classes).detach()
    linear = (rows * x[0]).flatten(1).sum(1)
    error = (linear + bias[classes] - logits[classes]).abs().max().item()
    result = Explanation('linear', values={
        'classes': classes, 'rows': rows, 'logits': logits, 'bias': bias, 'linear': linear,
        'bias_share': (bias[classes] / logits[classes]), 'max_error': error})
    layer = 'whole network (input -> logits)'
    for k, row, lin in zip(classes, rows, linear.tolist()):
        vote = (row * x[0]).sum(0)
        bound = row.abs().max().item() or 1.0
        vbound = vote.abs().max().item() or 1.0
        fig = Figure(figsize=(11, 3.6), layout='constrained')
        ax0, ax1, ax2 = fig.subplots(1, 3)
        ax0.imshow(_to_rgb(model, x[0]))
        ax0.set_title('input', fontsize=8)
        ax0.axis('off')
        ax1.imshow((row / (2 * bound) + 0.5).clamp(0, 1).permute(1, 2, 0).numpy())
        ax1.set_title('row of A as RGB (grey = 0)', fontsize=8)
        ax1.axis('off')
        fig.colorbar(ScalarMappable(Normalize(-bound, bound), 'gray'), ax=ax1, fraction=0.046, pad=0.04,
                     label='weight, each of R, G, B')
        _heat(ax2, vote, fig, 'pixel-wise vote: row * input, summed over RGB', cmap='RdBu_r', vmin=-vbound,
              vmax=vbound, label='contribution to the logit')
        share = bias[k].item() / logits[k].item() if logits[k].item() else float('nan')
        fig.suptitle(f'{_name(model)}, linear interpreter, {layer}: {_class_name(model, k)}: logit {logits[k]:.3g} '
                     f'= A x {lin:.3g} + bias path {bias[k]:.3g} (bias share {share:.0%})', fontsize=9)
        result.pictures.append(_save(fig, out_dir / f'linear_row_{k}.png'))
    H, W = x.shape[-2:]
    fy, fx = pixel or (0.5, 0.5)
    py, px = min(int(fy * H), H - 1), min(int(fx * W), W - 1)
    column = interpreter.column((py, px)).detach()
    shown = column.abs().topk(min(10, len(column))).indices
    bound = column[shown].abs().max().item() or 1.0
    fig = Figure(figsize=(6.4, 4.6), layout='constrained')
    ax = fig.subplots()
    _heat(ax, column[shown][:, None], fig, '', cmap='RdBu_r', vmin=-bound, vmax=bound, label='change of the logit')
    ax.set_yticks(range(len(shown)), [_class_name(model, k) for k in shown.tolist()], fontsize=7)
    fig.suptitle(f'{_name(model)}, linear interpreter, {layer}:\ncolumn of A at pixel ({py}, {px}) '
                 f'(a unit white pixel):\nits {len(shown)} largest logit changes', fontsize=9)
    result.pictures.append(_save(fig, out_dir / f'linear_column_{py}_{px}.png'))
    result.values['column'] = column
    return result


_METHODS = {
    'features': feature_maps,
    'attention': attention,
    'gradcam': gradcam,
    'integrated-gradients': integrated_gradients,
    'maximize': maximize,
    'linear': linear_interpreter,
}


def explain(model: Union[str, nn.Module], image, method: str = 'features', out_dir: Union[str, Path] = 'explain',
            input_size: Optional[int] = None, **kwargs) -> Explanation:
    """Make `method`'s pictures (one of METHODS) for `model` (a module, or a zoo name built with random weights)
    on `image` (path, PIL image or normalised tensor) into `out_dir`. Keyword arguments go to the method:
    `layer`, `target_class`, `top_k`, `queries`, `pixel`, `channel`, `steps`."""
    if method not in _METHODS:
        raise InputError(f'unknown method {method!r}; choose from {", ".join(METHODS)}')
    if isinstance(model, str):
        model = zoo.create_model(model)
    model.eval()
    classifier = getattr(model, 'task', 'classification') == 'classification' and hasattr(model, 'num_classes')
    if method != 'features' and not classifier:
        raise InputError(f'{method} explains a class score; {_name(model)} is a {getattr(model, "task", "dense")} '
                         'model: use --method features')
    x = load_input(model, image, input_size)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return _METHODS[method](model, x, Path(out_dir), **kwargs)
