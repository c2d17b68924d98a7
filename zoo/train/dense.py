"""Depth and segmentation training for `zoo.train.trainer`: paired image / target data, the losses, the metrics.

Data is a folder of pairs, matched by file stem:

    DATA/train/images/0001.jpg        DATA/train/depth/0001.png     (depth: 16-bit PNG, metres x depth_scale)
    DATA/validation/images/0001.jpg   DATA/validation/masks/0001.png (segmentation: class index per pixel)

or a Hub dataset (`data.dataset`) with an image column and a target column (`image_column`, `target_column`).
Training crops `data.crop_size` at a random place and flips half the samples, image and target together, with
random state seeded per (seed, epoch, index) as in classification; evaluation runs on whole images, centre-
cropped to a multiple of `data.eval_multiple` (32 by default), or KITTI's bottom-centre 352x1216 benchmark crop.
Images are read as RGB, or grey for a model built with `in_chans=1` (MACMD's default).

Depth: SIlog loss (iDisc: weight 10, lambda 0.15) on pixels inside the dataset's depth caps, metrics by the
dataset's protocol (`zoo.tasks.depth`: NYU Eigen crop, KITTI Garg crop). Segmentation: 0.4 CE + 0.6 Dice
summed over the deep-supervision heads when the model declares them (`deep_supervision_outputs`, MACMD),
mean Dice and mean IoU over the foreground classes. Evaluation is sharded over the processes, one image per
process at a time (images may differ in size), and the per-image sums are gathered.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import resolve_model_data_config

from zoo.errors import InputError
from zoo.tasks import image_to_input
from zoo.tasks.depth import EVAL_SETTINGS, SILogLoss, depth_metrics, eval_mask, kitti_benchmark_crop
from zoo.tasks.segmentation import IGNORE_INDEX, CeDiceLoss
from zoo.train.task import Task, eval_loader

_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
DATA_SCHEMA = dict(
    data_dir=(str,), dataset=(str,), train_split=(str,), eval_split=(str,), image_column=(str,),
    target_column=(str,), cache_dir=(str,), load_args=(dict,), target_dir=(str,), depth_scale=(float,),
    reduce_zero_label=(bool,), crop_size=(list,), hflip=(float,), eval_multiple=(int,), benchmark=(str,),
    eval_crop=(str,))


def _pairs(root: Path, split: str, target_dir: str) -> List[Tuple[Path, Path]]:
    images, targets = root / split / 'images', root / split / target_dir
    for folder in (images, targets):
        if not folder.is_dir():
            raise InputError(
                f'no folder {folder}: expected {root}/{split}/images/<name>.jpg with {root}/{split}/{target_dir}/<name>.png')
    by_stem = {p.stem: p for p in targets.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES}
    pairs, unmatched = [], []
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
        if image.stem in by_stem:
            pairs.append((image, by_stem[image.stem]))
        else:
            unmatched.append(image.name)
    if unmatched:
        raise InputError(f'{len(unmatched)} images in {images} have no {target_dir} file of the same name, '
                         f'e.g. {unmatched[0]}')
    if not pairs:
        raise InputError(f'no images in {images}')
    return pairs


class _HubPairs:
    """(image, target) pairs of a `datasets` split, decoded one row at a time when indexed."""

    def __init__(self, split, image_column: str, target_column: str):
        self.split, self.columns = split, (image_column, target_column)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        row = self.split[index]
        return row[self.columns[0]], row[self.columns[1]]


class PairedImages(torch.utils.data.Dataset):
    """(normalised image (3, H, W), target (1, H, W) float depth or (H, W) long mask) pairs, seeded augmentation.

    `reduce_zero_label` (mmseg's, for ADE20K) ignores mask label 0 and moves labels 1..K to 0..K-1.
    """

    def __init__(self, samples, kind: str, mean, std, in_chans: int = 3, depth_scale: float = 1.0, crop_size=None,
                 hflip: float = 0.0, multiple: int = 1, kitti_crop: bool = False, seed: int = 0,
                 reduce_zero_label: bool = False):
        self.samples, self.kind, self.depth_scale, self.in_chans = samples, kind, depth_scale, in_chans
        self.reduce_zero_label = reduce_zero_label
        self.mean, self.std = mean, std
        self.crop_size, self.hflip, self.multiple, self.seed = crop_size, hflip, multiple, seed
        self.kitti_crop = kitti_crop
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Tuple[Image.Image, Image.Image]:
        sample = self.samples[index]
        return (Image.open(sample[0]), Image.open(sample[1])) if isinstance(sample[0], Path) else sample

    def __getitem__(self, index: int):
        image, target = self._load(index)
        x = image_to_input(image, self.mean, self.std, self.in_chans)
        if self.kind == 'depth':
            y = torch.from_numpy(np.asarray(target, dtype=np.float32) / self.depth_scale)[None]
        else:
            y = torch.from_numpy(np.asarray(target, dtype=np.int64))
            if self.reduce_zero_label:
                y = torch.where((y == 0) | (y == IGNORE_INDEX), IGNORE_INDEX, y - 1)
        if x.shape[-2:] != y.shape[-2:]:
            raise ValueError(f'sample {index}: image {tuple(x.shape[-2:])} and target {tuple(y.shape[-2:])} differ in size')
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.crop_size is not None:
            (h, w), (ch, cw) = x.shape[-2:], self.crop_size
            if h < ch or w < cw:
                raise ValueError(f'sample {index} is {h}x{w}, smaller than the {ch}x{cw} training crop')
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            x, y = x[..., top:top + ch, left:left + cw], y[..., top:top + ch, left:left + cw]
        elif self.kitti_crop:
            x, y = kitti_benchmark_crop(x), kitti_benchmark_crop(y)
        elif self.multiple > 1:  # centred, to a size the model takes
            (h, w), m = x.shape[-2:], self.multiple
            top, left = (h % m) // 2, (w % m) // 2
            x, y = x[..., top:top + h - h % m, left:left + w - w % m], y[..., top:top + h - h % m, left:left + w - w % m]
        if self.hflip and rng.random() < self.hflip:
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y.contiguous()


def datasets(recipe: Dict[str, Any], model: torch.nn.Module, data: Optional[str] = None, output_dir=None):
    spec, kind = recipe['data'], recipe['task']
    config = resolve_model_data_config(model)
    in_chans = getattr(model, 'in_chans', None) or config['input_size'][0]
    common = dict(kind=kind, mean=config['mean'], std=config['std'], in_chans=in_chans,
                  depth_scale=spec.get('depth_scale', 1.0), seed=recipe['train']['seed'],
                  reduce_zero_label=spec.get('reduce_zero_label', False))
    train_split, eval_split = spec.get('train_split', 'train'), spec.get('eval_split', 'validation')
    source = data or spec.get('data_dir')
    if source:
        target_dir = spec.get('target_dir', 'depth' if kind == 'depth' else 'masks')
        train, evaluation = (_pairs(Path(source).expanduser(), s, target_dir) for s in (train_split, eval_split))
    elif spec.get('dataset'):
        import datasets as hf_datasets  # optional extra: train, only for Hub datasets

        splits = hf_datasets.load_dataset(spec['dataset'], cache_dir=spec.get('cache_dir'), **spec.get('load_args', {}))
        columns = spec.get('image_column', 'image'), spec.get('target_column', 'depth' if kind == 'depth' else 'label')
        train, evaluation = (_HubPairs(splits[s], *columns) for s in (train_split, eval_split))
    else:
        raise InputError(f'no data: give --data DIR ({train_split}/images + {train_split}/'
                         f'{"depth" if kind == "depth" else "masks"}) or data.data_dir / data.dataset in the recipe')
    crop = tuple(spec['crop_size']) if spec.get('crop_size') else None
    train_set = PairedImages(train, crop_size=crop, hflip=spec.get('hflip', 0.5), **common)
    eval_set = PairedImages(evaluation, multiple=spec.get('eval_multiple', 32),
                            kitti_crop=spec.get('benchmark') == 'kitti', **common)
    return train_set, eval_set, None


def _depth_loss(recipe, model):
    setting = EVAL_SETTINGS[recipe['data'].get('benchmark', 'nyu')]
    silog = SILogLoss()

    def loss_fn(model, batch):
        images, depth = batch
        valid = (depth > setting['min_depth']) & (depth < setting['max_depth'])
        return silog(model(images), depth, valid)
    return loss_fn


@torch.no_grad()
def _depth_evaluate(recipe, model, eval_set, accelerator) -> Dict[str, float]:
    benchmark, crop = recipe['data'].get('benchmark', 'nyu'), recipe['data'].get('eval_crop')
    model = model.to(accelerator.device)
    names, rows = None, []
    for image, depth in eval_loader(eval_set, accelerator.num_processes, accelerator):  # one image per process
        depth = depth.cpu()
        metrics = depth_metrics(model(image).float().cpu(), depth, eval_mask(depth, benchmark, crop=crop))
        names = names or sorted(metrics)
        row = torch.tensor([[metrics[k] for k in names]], dtype=torch.float64, device=accelerator.device)
        rows.append(accelerator.gather_for_metrics(row).cpu())
    per_image = torch.cat(rows)
    return dict(zip(names, per_image.mean(0).tolist()))


def _segmentation_loss(recipe, model):
    criterion = CeDiceLoss()
    # A model that declares deep-supervision outputs returns them all from forward in training mode once
    # switched on, through the DDP / Accelerate wrapper (MACMD: the main head and two auxiliary ones).
    if getattr(model, 'deep_supervision_outputs', ()):
        model.set_deep_supervision(True)

    def loss_fn(model, batch):
        images, masks = batch
        return criterion(model(images), masks)
    return loss_fn


@torch.no_grad()
def _segmentation_evaluate(recipe, model, eval_set, accelerator) -> Dict[str, float]:
    """Mean Dice and mean IoU over the classes present in the prediction or the truth, pixels labelled
    `IGNORE_INDEX` left out: the foreground classes 1..K-1, or all K with `data.reduce_zero_label` (label 0 was
    "other", now ignored, so no class is background)."""
    model = model.to(accelerator.device)
    num_classes = max(model.num_classes, 2)
    first = 0 if recipe['data'].get('reduce_zero_label') else 1
    rows = []
    for image, mask in eval_loader(eval_set, accelerator.num_processes, accelerator):
        logits = model(image).float()[0]
        pred = (logits[0] > 0).long() if logits.shape[0] == 1 else logits.argmax(0)
        pred, mask = pred.masked_fill(mask[0] == IGNORE_INDEX, -1), mask[0]
        counts = torch.zeros(3, num_classes, device=logits.device)
        for k in range(first, num_classes):
            p, t = pred == k, mask == k
            counts[:, k] = torch.stack([(p & t).sum(), p.sum(), t.sum()])
        rows.append(accelerator.gather_for_metrics(counts[None]).cpu())
    intersection, pred_area, true_area = torch.cat(rows).sum(0)
    present = (pred_area + true_area)[first:] > 0
    if not present.any():
        raise InputError('no labelled pixel of the evaluated classes in the evaluation masks or predictions')
    dice = (2 * intersection / (pred_area + true_area).clamp(min=1))[first:][present]
    iou = (intersection / (pred_area + true_area - intersection).clamp(min=1))[first:][present]
    return {'mean_dice': dice.mean().item(), 'mean_iou': iou.mean().item()}


class Depth(Task):
    """Monocular depth from paired folders or a Hub dataset: SIlog loss, the benchmark's metrics."""
    data_schema = DATA_SCHEMA
    best_metric = ('abs_rel', 'min')

    datasets = staticmethod(datasets)
    make_loss = staticmethod(_depth_loss)
    evaluate = staticmethod(_depth_evaluate)


class Segmentation(Task):
    """Semantic segmentation from paired folders or a Hub dataset: CE + Dice, mean Dice and mean IoU."""
    data_schema = DATA_SCHEMA
    best_metric = ('mean_dice', 'max')

    datasets = staticmethod(datasets)
    make_loss = staticmethod(_segmentation_loss)
    evaluate = staticmethod(_segmentation_evaluate)
