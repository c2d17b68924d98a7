"""Monocular depth (and surface normals): loss, metrics, the evaluation protocol and pictures.

Everything follows the iDisc code (SysCV/idisc), which follows the usual NYU / KITTI practice:
* `SILogLoss`: scale-invariant log loss, 10 * sqrt(Var(g) + 0.15 * mean(g)^2), g = log pred - log gt.
* `depth_metrics` / `DepthMetrics`: delta < 1.25^k, AbsRel, SqRel and log10 averaged over the valid
  pixels of a batch; RMSE, RMSE log and SIlog per image, then averaged; batches weighted by their size.
* `eval_mask`: valid depth caps (0.01-10 m NYU, 0.01-80 m KITTI) and the Eigen (NYU) or Garg (KITTI) crop.
"""
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import resolve_model_data_config

from zoo.tasks import figure, image_to_input, predict_padded, save_figure

__all__ = [
    'EVAL_SETTINGS', 'DepthMetrics', 'SILogLoss', 'depth_metrics', 'eval_mask', 'image_to_tensor',
    'kitti_benchmark_crop', 'save_depth_picture', 'save_normals_picture',
]

# Depth caps and crop of each benchmark (official dataset classes).
EVAL_SETTINGS = {
    'nyu': dict(min_depth=0.01, max_depth=10., crop='eigen_nyu'),
    'kitti': dict(min_depth=0.01, max_depth=80., crop='garg'),
}
# Crop boxes as fractions (top, bottom, left, right) of the map, as the KITTI code computes them.
_KITTI_CROPS = {
    'garg': (0.40810811, 0.99189189, 0.03594771, 0.96405229),
    'eigen': (0.3324324, 0.91351351, 0.03594771, 0.96405229),
}
_NYU_EIGEN_BOX = (45, 471, 41, 601)  # rows, cols of the 480x640 NYU frame
_EPS = 1e-6


def _resize_like(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if pred.shape[-2:] != target.shape[-2:]:
        pred = F.interpolate(pred, size=target.shape[-2:], mode='bilinear', align_corners=True)
    return pred


class SILogLoss(nn.Module):
    """Scale-invariant log loss, `weight * sqrt(Var(g) + lam * mean(g)^2 + 1e-6)` over the valid pixels.

    g = log(pred + 1e-6) - log(gt + 1e-6) over all valid pixels of the batch; Var is unbiased. The
    prediction is bilinearly resized (align_corners=True) to the target first. lam = 0.15 and weight 10
    as in iDisc (AdaBins' formulation).
    """

    def __init__(self, weight: float = 10., lam: float = 0.15):
        super().__init__()
        self.weight = weight
        self.lam = lam

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        pred = _resize_like(pred, target)
        if mask is not None:
            pred, target = pred[mask.bool()], target[mask.bool()]
        if target.numel() < 2:  # no variance to take (sparse LiDAR under a small crop): no signal, no NaN
            return pred.sum() * 0
        g = torch.log(pred + _EPS) - torch.log(target + _EPS)
        return self.weight * torch.sqrt(g.var() + self.lam * g.mean() ** 2 + _EPS)


def eval_mask(gt: torch.Tensor, dataset: str = 'nyu', crop: Optional[str] = None,
              min_depth: Optional[float] = None, max_depth: Optional[float] = None) -> torch.Tensor:
    """Pixels that count in the official evaluation: min_depth < gt < max_depth, inside the crop.

    `crop`: 'eigen_nyu' (rows 45:471, cols 41:601 of a 480x640 frame), 'garg' or 'eigen' (KITTI, as
    fractions of the map) or 'none'; by default the benchmark's own (`EVAL_SETTINGS`).
    """
    if dataset not in EVAL_SETTINGS:
        raise ValueError(f'unknown dataset {dataset!r}; known: {", ".join(EVAL_SETTINGS)}')
    setting = EVAL_SETTINGS[dataset]
    min_depth = setting['min_depth'] if min_depth is None else min_depth
    max_depth = setting['max_depth'] if max_depth is None else max_depth
    crop = crop or setting['crop']
    valid = (gt > min_depth) & (gt < max_depth)
    h, w = gt.shape[-2:]
    box = torch.zeros(h, w, dtype=torch.bool, device=gt.device)
    if crop == 'eigen_nyu':
        if (h, w) != (480, 640):
            raise ValueError(f'the NYU Eigen crop is defined on 480x640 frames, got {h}x{w}')
        top, bottom, left, right = _NYU_EIGEN_BOX
    elif crop in _KITTI_CROPS:
        t, b, lft, r = _KITTI_CROPS[crop]
        top, bottom, left, right = int(t * h), int(b * h), int(lft * w), int(r * w)
    elif crop == 'none':
        top, bottom, left, right = 0, h, 0, w
    else:
        raise ValueError(f'unknown crop {crop!r}; known: eigen_nyu, garg, eigen, none')
    box[top:bottom, left:right] = True
    return valid & box


def kitti_benchmark_crop(x: torch.Tensor, height: int = 352, width: int = 1216) -> torch.Tensor:
    """The bottom-centre 352x1216 crop that KITTI images and depth maps are evaluated on."""
    h, w = x.shape[-2:]
    if h < height or w < width:
        raise ValueError(f'KITTI frames are at least {height}x{width}, got {h}x{w}')
    top, left = h - height, (w - width) // 2
    return x[..., top:top + height, left:left + width]


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """The iDisc depth metrics of one batch (B, 1, H, W); `pred` is resized to `gt` if needed.

    delta1/2/3 (share of pixels with max(pred/gt, gt/pred) < 1.25^k), abs_rel, sq_rel and log10 are
    means over every valid pixel of the batch; rmse, rmse_log and silog (100 * std of the log error)
    are computed per image and averaged over the images.
    """
    pred = _resize_like(pred, gt).float()
    gt = gt.float()
    mask = (gt > 0) if mask is None else mask.bool()
    p, g = pred[mask], gt[mask]
    if p.numel() == 0:
        raise ValueError('no valid pixel to evaluate: the mask is empty')
    ratio = torch.maximum(p / g, g / p)
    out = {f'delta{k}': (ratio < 1.25 ** k).float().mean().item() for k in (1, 2, 3)}
    out['abs_rel'] = ((p - g).abs() / g).mean().item()
    out['sq_rel'] = ((p - g) ** 2 / g).mean().item()
    out['log10'] = (torch.log10(p) - torch.log10(g)).abs().mean().item()
    per_image = {'rmse': [], 'rmse_log': [], 'silog': []}
    for pi, gi, mi in zip(pred, gt, mask):
        pi, gi = pi[mi], gi[mi]
        if pi.numel() == 0:
            continue
        log_err = torch.log(pi) - torch.log(gi)
        per_image['rmse'].append(torch.sqrt(((pi - gi) ** 2 + _EPS).mean()))
        per_image['rmse_log'].append(torch.sqrt((log_err ** 2 + _EPS).mean()))
        per_image['silog'].append(100 * torch.sqrt(log_err.var()))
    out.update({k: torch.stack(v).mean().item() for k, v in per_image.items()})
    return out


class DepthMetrics:
    """Running `depth_metrics` over a dataset: each batch weighs by its number of images, as in iDisc."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.num_images = 0
        self.sums: Dict[str, float] = {}

    def update(self, pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Dict[str, float]:
        batch = depth_metrics(pred, gt, mask)
        for k, v in batch.items():
            self.sums[k] = self.sums.get(k, 0.) + v * gt.shape[0]
        self.num_images += gt.shape[0]
        return batch

    def compute(self) -> Dict[str, float]:
        if not self.num_images:
            raise ValueError('no batch was evaluated')
        return {k: v / self.num_images for k, v in self.sums.items()}


# ---------------------------------------------------------------------------------------------------------------
# Pictures for `zoo predict`


def image_to_tensor(model: nn.Module, image) -> torch.Tensor:
    """A PIL image as a (1, 3, H, W) batch normalised with the model's mean and std, at its own size (no crop),
    on the model's device and in its dtype."""
    config = resolve_model_data_config(model)
    x = image_to_input(image, config['mean'], config['std'])
    param = next(model.parameters())
    return x[None].to(device=param.device, dtype=param.dtype)


def _predict(model: nn.Module, image) -> torch.Tensor:
    return predict_padded(model, image_to_tensor(model, image))[0]


def save_depth_picture(model: nn.Module, image, out_path: Union[str, Path]) -> Path:
    """Predict depth for a PIL `image` and write it at `out_path` as a PNG with a colour bar in metres: the map
    at the image's own size (shown at least 256 px tall), near bright and far dark, the colours spread over the
    2nd to 98th percentile of the depths."""
    depth = _predict(model, image)[0].numpy()
    lo, hi = np.percentile(depth, (2, 98))
    fig = figure(*depth.shape, extra_width=1.4)
    ax = fig.add_subplot()
    shown = ax.imshow(depth, cmap='magma_r', vmin=lo, vmax=max(hi, lo + 1e-6), interpolation='nearest')
    ax.set_axis_off()
    fig.colorbar(shown, ax=ax, extend='both', label='depth (m)')
    return save_figure(fig, out_path)


def save_normals_picture(model: nn.Module, image, out_path: Union[str, Path]) -> Path:
    """Predict surface normals for a PIL `image` and write them at `out_path` as colours, RGB = (xyz + 1) / 2,
    with that key written under the picture."""
    normals = _predict(model, image).permute(1, 2, 0).numpy()
    normals = normals / np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-6)
    fig = figure(*normals.shape[:2], extra_height=0.5)
    ax = fig.add_subplot()
    ax.imshow(((normals + 1) / 2).clip(0, 1), interpolation='nearest')
    ax.set_axis_off()
    fig.supxlabel('surface normals: (R, G, B) = ((x, y, z) + 1) / 2', fontsize='small')
    return save_figure(fig, out_path)
