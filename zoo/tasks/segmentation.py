"""Semantic segmentation: the CE + Dice loss, Dice and HD95 metrics, and the mask overlay of `zoo predict`.

Masks are integer class maps (background 0, unless a model's `background_class` says otherwise). Models give
logits (B, K, H, W); K = 1 means a binary mask read through a sigmoid, K > 1 classes read through a softmax.
Mask value 255 (`IGNORE_INDEX`, mmseg's) marks pixels that neither the loss nor the metrics see.
"""
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from zoo.tasks import figure, image_to_input, predict_padded, save_figure

ArrayLike = Union[np.ndarray, torch.Tensor]

IGNORE_INDEX = 255

# Class colours in order, cycled: class 1 takes the first when 0 is background (left uncoloured), else class 0.
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------
# Loss


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                   valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 - soft Dice per class, averaged over classes (background included), as the official `DiceLoss_`.

    Per class, sums run over the batch and the pixels: (2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s).
    `probs` and the one-hot `target` are (B, K, H, W); `valid` (B, H, W), if given, leaves the other pixels out.
    """
    if valid is not None:
        probs, target = probs * valid[:, None], target * valid[:, None]
    dims = (0, 2, 3)
    intersection = (probs * target).sum(dims)
    denominator = probs.square().sum(dims) + target.square().sum(dims)
    return (1 - (2 * intersection + smooth) / (denominator + smooth)).mean()


class CeDiceLoss(nn.Module):
    """0.4 cross-entropy + 0.6 soft Dice, the MACMD recipe (official `CeDiceLoss`).

    Takes logits (B, K, H, W) and an integer mask (B, H, W); K = 1 uses binary cross-entropy and sigmoid
    probabilities. A list of logits (deep supervision, `MACMD.forward_train`) gives the sum of their losses,
    equal weights as in the official training loop. The official code feeds the model's sigmoid outputs to
    this loss; the zoo feeds logits, so CE is a proper log-likelihood. Pixels labelled `IGNORE_INDEX` count in
    neither term.
    """

    def __init__(self, ce_weight: float = 0.4, dice_weight: float = 0.6, smooth: float = 1e-5):
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth

    def forward(self, logits: Union[torch.Tensor, Sequence[torch.Tensor]], target: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, (list, tuple)):
            return sum(self(output, target) for output in logits)
        if logits.shape[-2:] != target.shape[-2:]:
            raise ValueError(
                f'logits {tuple(logits.shape)} and mask {tuple(target.shape)} differ in size; upsample the '
                'logits to the mask size first (MACMD outputs are at the input size)')
        num_classes = logits.shape[1]
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f'mask {tuple(target.shape)} does not fit logits {tuple(logits.shape)}: give class '
                             'indices (B, H, W) or (B, 1, H, W) for a batch of B images')
        ignored = target == IGNORE_INDEX
        valid = (~ignored).float()  # float32 sums: a float16 count overflows past 65,504 pixels
        target = target.long().masked_fill(ignored, 0)  # any class will do: `valid` masks these pixels out
        if num_classes == 1:
            one_hot = target.to(logits.dtype)[:, None]
            ce = F.binary_cross_entropy_with_logits(logits, one_hot, reduction='none')[:, 0]
            probs = logits.sigmoid()
        else:
            ce = F.cross_entropy(logits, target, reduction='none')
            one_hot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(logits.dtype)
            probs = logits.softmax(dim=1)
        ce = (ce * valid).sum() / valid.sum().clamp(min=1)
        return self.ce_weight * ce + self.dice_weight * soft_dice_loss(probs, one_hot, self.smooth, valid)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def _as_bool(mask: ArrayLike) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool)


def dice_coefficient(pred: ArrayLike, target: ArrayLike) -> float:
    """2 |P and T| / (|P| + |T|) of two binary masks; 1.0 when both are empty."""
    pred, target = _as_bool(pred), _as_bool(target)
    total = pred.sum() + target.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, target).sum() / total)


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: Optional[Sequence[float]]) -> np.ndarray:
    """Distance from every border pixel of `a` to the nearest border pixel of `b` (borders: the mask minus
    its erosion by the cross-shaped structuring element, as medpy)."""
    structure = ndimage.generate_binary_structure(a.ndim, 1)
    border_a = a ^ ndimage.binary_erosion(a, structure=structure)
    border_b = b ^ ndimage.binary_erosion(b, structure=structure)
    return ndimage.distance_transform_edt(~border_b, sampling=spacing)[border_a]


def hd95(pred: ArrayLike, target: ArrayLike, spacing: Optional[Sequence[float]] = None) -> float:
    """95th percentile of the symmetric surface distances of two binary masks (medpy's `hd95`).

    `spacing` is the pixel (voxel) size per axis, e.g. millimetres; distances are in pixels without it.
    Empty masks: 0.0 when both are empty (they agree); `inf` when exactly one is (no surface to measure
    to). `synapse_case_metrics` applies the official evaluation's convention instead.
    """
    pred, target = _as_bool(pred), _as_bool(target)
    if pred.shape != target.shape:
        raise ValueError(f'masks differ in shape: {pred.shape} vs {target.shape}')
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        return float('inf')
    distances = np.concatenate([_surface_distances(pred, target, spacing), _surface_distances(target, pred, spacing)])
    return float(np.percentile(distances, 95))


def synapse_case_metrics(
        prediction: ArrayLike,
        label: ArrayLike,
        num_classes: int,
        spacing: Optional[Sequence[float]] = None,
) -> List[Tuple[float, float]]:
    """(Dice, HD95) of classes 1..num_classes-1 of one case, by the official (TransUNet) evaluation.

    Its convention for empty masks differs from `dice_coefficient` / `hd95`: a class present in the
    prediction but absent from the label scores (1, 0); a class absent from the prediction scores (0, 0),
    even when the label lacks it too. Use it to compare with the paper's Synapse numbers.
    """
    prediction = np.asarray(prediction.cpu() if isinstance(prediction, torch.Tensor) else prediction)
    label = np.asarray(label.cpu() if isinstance(label, torch.Tensor) else label)
    scores = []
    for c in range(1, num_classes):
        pred, gt = prediction == c, label == c
        if pred.any() and gt.any():
            scores.append((dice_coefficient(pred, gt), hd95(pred, gt, spacing)))
        elif pred.any():
            scores.append((1.0, 0.0))
        else:
            scores.append((0.0, 0.0))
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Pictures


def predict_mask(model: nn.Module, image: Image.Image) -> np.ndarray:
    """Class map (H, W) of a PIL image at its own size (padded as `zoo.tasks.predict_padded` does), scaled to
    [0, 1] and normalised with the model's mean / std; argmax of the logits, or sigmoid > 0.5 for one class."""
    cfg = model.pretrained_cfg
    in_chans = getattr(model, 'in_chans', cfg.get('input_size', (3,))[0])
    x = image_to_input(image, cfg.get('mean', 0.), cfg.get('std', 1.), in_chans)
    logits = predict_padded(model, x.unsqueeze(0).to(next(model.parameters()).device))
    mask = (logits[:, 0] > 0) if logits.shape[1] == 1 else logits.argmax(dim=1)
    return mask[0].long().numpy()


def overlay_mask(
        image: Image.Image, mask: np.ndarray, alpha: float = 0.5, background: Optional[int] = 0) -> Image.Image:
    """The image (as RGB) with each pixel not of the `background` class blended with its class colour.

    With background 0 (Synapse) class 1 takes the first colour; with `background=None` (ADE20K's classes
    as mmseg numbers them, where 0 is wall) every class is coloured, class 0 with the first colour.
    """
    rgb = np.asarray(image.convert('RGB'), dtype=np.float64)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f'mask {mask.shape} and image {rgb.shape[:2]} differ in size')
    coloured = np.ones(mask.shape, dtype=bool) if background is None else mask != background
    colours = class_colour(mask[coloured], background)
    rgb[coloured] = (1 - alpha) * rgb[coloured] + alpha * colours
    return Image.fromarray(np.rint(rgb).astype(np.uint8))


def class_colour(index: int, background: Optional[int] = 0) -> np.ndarray:
    """The RGB colour (0-255) `overlay_mask` gives class `index`."""
    first = 0 if background is None else background + 1
    return PALETTE[(index - first) % len(PALETTE)]


def save_mask_overlay(model: nn.Module, image: Image.Image, out_path: Union[str, Path]) -> Path:
    """Predict a mask for `image` and write it blended over the image as a PNG at `out_path`, with a legend of
    the classes present (the model's `label_names`, else "class i") beside it.

    The model's `background_class` (0 unless it says otherwise) is left uncoloured and out of the legend. The
    PNG is written beside `out_path` first and moved into place, so a failure never leaves half a file.
    """
    from matplotlib.patches import Patch  # slow to import and needed only to draw: `import zoo` never loads it

    background = getattr(model, 'background_class', 0)
    mask = predict_mask(model, image)
    names = model.pretrained_cfg.get('label_names') or []
    present = [int(i) for i in np.unique(mask) if i != background]
    legend = [Patch(color=class_colour(i, background) / 255, label=names[i] if i < len(names) else f'class {i}')
              for i in present]
    fig = figure(image.height, image.width, extra_width=1.8)
    ax = fig.add_subplot()
    ax.imshow(overlay_mask(image, mask, background=background), interpolation='nearest')
    ax.set_axis_off()
    fig.legend(handles=legend or [Patch(color='none', label='no class found')], loc='outside right upper',
               fontsize='small', frameon=False)
    return save_figure(fig, Path(out_path))
