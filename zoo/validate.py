"""`zoo validate`: timm's validate.py for every zoo task, through the task code the trainer uses.

The evaluation split is read by the trainer's own task modules (`zoo.train.trainer.TASKS`: the same folders, Hub
datasets, transforms and crops as training), and scored by the task's metrics:

* classification: top-1 / top-5 accuracy (%), timm's `accuracy`.
* depth: the iDisc protocol (`zoo.tasks.depth`): ground truth / depth_scale (1000 NYU, 256 KITTI), valid
  between min and max depth, the Eigen (NYU) or Garg (KITTI) crop, the prediction resized to the ground
  truth (bilinear, align_corners=True), and iDisc's averaging: delta1-3, AbsRel, SqRel and log10 over the
  pixels of a batch, RMSE, RMSE log and SIlog per image, batches weighted by their image count.
* segmentation: mIoU and mean Dice from a bincount confusion matrix over the dataset (classes neither
  predicted nor labelled left out), HD95 (pixels) per image and class where both masks hold the class.
* video: the model is written as a real bitstream (`zoo.codec.compress`), decoded back, and scored per frame
  (PSNR, and MS-SSIM for frames large enough for it: `has_ms_ssim`); bpp is the bitstream's bytes * 8 /
  (T * H * W).

Every run gives one result: the model, its tag and weights sha256, the data, the protocol, the metrics and
when. `write_results` appends it to a CSV or JSON file; `update_card` adds it to a Hub folder's config.json
`results` and re-renders its card.
"""
import csv
import io
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from timm.utils import accuracy
from tqdm import tqdm

import zoo
from zoo import hub
from zoo._io import write_atomically
from zoo.codec import compress, decode_video
from zoo.errors import InputError
from zoo.models._builder import download_official_weights, sha256_file
from zoo.tasks.depth import EVAL_SETTINGS, DepthMetrics, eval_mask
from zoo.tasks.segmentation import IGNORE_INDEX, hd95
from zoo.tasks.video import has_ms_ssim, ms_ssim, psnr
from zoo.train import trainer

__all__ = [
    'validate', 'check_card_folder', 'depth_protocol', 'load_model', 'model_task', 'update_card', 'write_results']

# The ground truth's unit per benchmark (16-bit PNGs: millimetres for NYU, metres x 256 for KITTI).
DEPTH_SCALES = {'nyu': 1000., 'kitti': 256.}
UPSAMPLE_MODES = ('bilinear_align_corners', 'bilinear', 'nearest')
TASKS = ('classification', 'depth', 'segmentation', 'video')
# Batch size when none is given (16 otherwise): depth's averaging depends on it, and 8 is iDisc's test batch.
DEFAULT_BATCH = dict(depth=8)
# The keys of a config.json `results` entry (the format agreed with the card renderer).
RESULT_KEYS = ('task', 'dataset', 'split', 'metrics', 'protocol', 'weights_sha256', 'date', 'command')


def model_task(model: nn.Module) -> str:
    """'video' for a neural video representation, else the model's `task` (classification by default)."""
    if hasattr(model, 'decoder_state_dict'):
        return 'video'
    return getattr(model, 'task', 'classification')


def depth_protocol(benchmark: str = 'nyu', crop: Optional[str] = None, min_depth: Optional[float] = None,
                   max_depth: Optional[float] = None, depth_scale: Optional[float] = None,
                   upsample: str = 'bilinear_align_corners') -> Dict[str, Any]:
    """The iDisc evaluation settings of `benchmark`, each one overridable; what a depth result records."""
    if benchmark not in EVAL_SETTINGS:
        raise InputError(f'unknown depth benchmark {benchmark!r}; known: {", ".join(EVAL_SETTINGS)}')
    if upsample not in UPSAMPLE_MODES:
        raise InputError(f'unknown upsampling {upsample!r}; known: {", ".join(UPSAMPLE_MODES)}')
    setting = EVAL_SETTINGS[benchmark]
    protocol = dict(
        benchmark=benchmark, crop=crop or setting['crop'],
        min_depth=setting['min_depth'] if min_depth is None else min_depth,
        max_depth=setting['max_depth'] if max_depth is None else max_depth,
        depth_scale=DEPTH_SCALES[benchmark] if depth_scale is None else depth_scale,
        upsample=upsample, averaging='idisc')
    if not 0 <= protocol['min_depth'] < protocol['max_depth']:
        raise InputError(f'need 0 <= min_depth < max_depth; got {protocol["min_depth"]} and {protocol["max_depth"]}')
    if protocol['depth_scale'] <= 0:
        raise InputError(f'depth_scale must be positive; got {protocol["depth_scale"]}')
    return protocol


def load_model(name: str) -> Tuple[nn.Module, str]:
    """(model in eval mode, sha256 of its weight file) for a Hub folder (`DIR` or `local-dir:DIR`), a Hub repo
    (`hf-hub:ID`), or a zoo `name.tag` with published weights."""
    if name.startswith('local-dir:') or Path(name).is_dir():
        folder = Path(name[len('local-dir:'):] if name.startswith('local-dir:') else name)
        return hub.load(folder), sha256_file(folder / hub.WEIGHTS_NAME)
    if name.startswith('hf-hub:'):
        repo_id = name[len('hf-hub:'):]
        model = hub.load(repo_id)
        return model, sha256_file(hf_hub_download(repo_id, hub.WEIGHTS_NAME))
    model = zoo.create_model(name, pretrained=True).eval()
    cfg = model.pretrained_cfg
    weights = cfg.get('file') or download_official_weights(cfg)  # already in the cache: the file just loaded
    return model, sha256_file(weights)


# ---------------------------------------------------------------------------------------------------------------
# The evaluation split, through the trainer's task code (the one place this module calls it)


def _eval_set(task: str, model: nn.Module, data: str, split: str, limit: Optional[int], data_spec: Dict[str, Any]):
    """The `split` of `data` (a local folder / video, or a Hub dataset id) as the trainer's task reads it."""
    if task == 'video':
        if not Path(data).exists():
            raise FileNotFoundError(f'no video at {data}: give the folder of frames or the video file the model fits')
        recipe = dict(task=task, data=dict(path=data, max_frames=limit),
                      model_args=dict(frame_size=list(model.frame_size)))
    else:
        if Path(data).expanduser().exists():
            source = dict(data_dir=data)
        elif data.startswith(('/', '.', '~')):  # a path, not a Hub id (`org/name`)
            raise FileNotFoundError(f'no data at {data}: give a folder laid out as for training, or a Hub dataset id')
        else:
            source = dict(dataset=data)
        recipe = dict(model=model.pretrained_cfg.get('architecture'), task=task, model_args={},
                      data=dict(source, train_split=split, eval_split=split, **data_spec), train=dict(seed=0))
    _, eval_set, _ = trainer.task_module(recipe).datasets(recipe, model)
    if task != 'video' and limit is not None:
        eval_set = torch.utils.data.Subset(eval_set, range(min(limit, len(eval_set))))
    return eval_set


# ---------------------------------------------------------------------------------------------------------------
# Metrics per task


def _loader(eval_set, batch_size: int, num_workers: int):
    return torch.utils.data.DataLoader(eval_set, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _progress(loader, task: str, quiet: bool):
    return tqdm(loader, desc=f'validate {task}', unit='batch', file=sys.stderr, disable=quiet)


@torch.no_grad()
def _classification(model, eval_set, device, batch_size, num_workers, quiet) -> Dict[str, Any]:
    correct1 = correct5 = total = 0
    for images, labels in _progress(_loader(eval_set, batch_size, num_workers), 'classification', quiet):
        logits = model(images.to(device)).float()
        labels = labels.to(device)
        top1, top5 = accuracy(logits, labels, topk=(1, 5))  # percentages of the batch: back to exact counts
        correct1 += round(top1.item() * len(labels) / 100)
        correct5 += round(top5.item() * len(labels) / 100)
        total += len(labels)
    return dict(metrics=dict(top1=100 * correct1 / total, top5=100 * correct5 / total), samples=total)


def _resize_prediction(pred: torch.Tensor, size, mode: str) -> torch.Tensor:
    if pred.shape[-2:] == tuple(size):
        return pred
    if mode == 'nearest':
        return F.interpolate(pred, size=size, mode='nearest')
    return F.interpolate(pred, size=size, mode='bilinear', align_corners=mode == 'bilinear_align_corners')


@torch.no_grad()
def _depth(model, eval_set, device, batch_size, num_workers, quiet, protocol) -> Dict[str, Any]:
    metrics, total = DepthMetrics(), 0
    for images, depth in _progress(_loader(eval_set, batch_size, num_workers), 'depth', quiet):
        pred = _resize_prediction(model(images.to(device)).float().cpu(), depth.shape[-2:], protocol['upsample'])
        mask = eval_mask(depth, protocol['benchmark'], crop=protocol['crop'], min_depth=protocol['min_depth'],
                         max_depth=protocol['max_depth'])
        metrics.update(pred, depth, mask)
        total += len(depth)
    return dict(metrics=metrics.compute(), samples=total)


@torch.no_grad()
def _segmentation(model, eval_set, device, batch_size, num_workers, quiet) -> Dict[str, Any]:
    num_classes = max(model.num_classes, 2)
    background = getattr(model, 'background_class', 0)
    classes = [k for k in range(num_classes) if k != background]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # rows: truth, columns: prediction
    distances, total = [], 0
    for images, masks in _progress(_loader(eval_set, batch_size, num_workers), 'segmentation', quiet):
        logits = model(images.to(device)).float().cpu()
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits, size=masks.shape[-2:], mode='bilinear', align_corners=False)
        preds = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
        valid = masks != IGNORE_INDEX
        confusion += torch.bincount(masks[valid] * num_classes + preds[valid],
                                    minlength=num_classes ** 2).reshape(num_classes, num_classes)
        for pred, mask, keep in zip(preds.numpy(), masks.numpy(), valid.numpy()):
            for k in classes:
                p, t = (pred == k) & keep, (mask == k) & keep
                if p.any() and t.any():
                    distances.append(hd95(p, t))
        total += len(masks)
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    seen = [k for k in classes if union[k] > 0]
    if not seen:
        raise InputError('no labelled pixel of an evaluated class in the masks or the predictions')
    iou = {k: (tp[k] / union[k]).item() for k in seen}
    dice = {k: (2 * tp[k] / (union[k] + tp[k])).item() for k in seen}
    metrics = dict(miou=float(np.mean(list(iou.values()))), mean_dice=float(np.mean(list(dice.values()))))
    if distances:
        metrics['hd95'] = float(np.mean(distances))
    return dict(metrics=metrics, samples=total, per_class=dict(iou=iou, dice=dice), hd95_cases=len(distances),
                classes=classes)


@torch.no_grad()
def _video(model, eval_set, device, batch_size, quiet, prune: float, bits: int,
           bitstream: Optional[Union[str, Path]]) -> Dict[str, Any]:
    frames = eval_set.frames
    if not model.stored_embeddings and len(frames) != model.num_frames:
        raise InputError(f'the model represents {model.num_frames} frames; the video has {len(frames)}')
    embeddings = None
    if model.stored_embeddings and getattr(model, 'frame_embeddings', None) is None:
        embeddings = torch.cat([model.encode(frames=b.to(device)).cpu() for b in frames.split(batch_size)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(bitstream) if bitstream else Path(tmp) / 'video.zoo'
        written = compress(model, path, embeddings=embeddings, prune=prune, bits=bits, batch_size=batch_size)
        decoded = decode_video(path, batch_size=batch_size, device=device)
    if len(decoded) != len(frames):
        raise InputError(f'the bitstream decodes to {len(decoded)} frames; the video has {len(frames)}')
    per_frame = dict(psnr=[], ms_ssim=[])
    for start in _progress(range(0, len(frames), batch_size), 'video', quiet):
        pred, true = decoded[start:start + batch_size], frames[start:start + batch_size]
        per_frame['psnr'] += psnr(pred, true).tolist()
        if has_ms_ssim(frames):
            per_frame['ms_ssim'] += ms_ssim(pred, true).tolist()
    metrics = dict(psnr=float(np.mean(per_frame['psnr'])), bpp=written['bpp'], bytes=written['bytes'])
    if per_frame['ms_ssim']:
        metrics['ms_ssim'] = float(np.mean(per_frame['ms_ssim']))
    else:
        del per_frame['ms_ssim']
    return dict(metrics=metrics, samples=len(frames), per_frame=per_frame)


# ---------------------------------------------------------------------------------------------------------------
# One run


def validate(model: nn.Module, data: Union[str, Path], split: str = 'validation', batch_size: Optional[int] = None,
             limit: Optional[int] = None, device: Union[str, torch.device] = 'cpu', num_workers: int = 0,
             depth: Optional[Dict[str, Any]] = None, reduce_zero_label: bool = False, prune: float = 0.1, bits: int = 8,
             bitstream: Optional[Union[str, Path]] = None, weights_sha256: Optional[str] = None,
             source: Optional[str] = None, command: Optional[str] = None, quiet: bool = False) -> Dict[str, Any]:
    """Evaluate `model` on the `split` of `data` by its task's protocol; returns the result (a dict).

    `batch_size` defaults to `DEFAULT_BATCH` of the task (depth: 8, as iDisc's test runs, which matters because
    iDisc averages pixel metrics over each batch).
    `depth` overrides the depth protocol (`depth_protocol` keyword arguments); `reduce_zero_label` (mmseg's, for
    ADE20K) ignores mask label 0 and moves 1..K to 0..K-1; `prune`, `bits` and `bitstream` (a path to keep the
    bitstream at) are the video compression's. `weights_sha256`, `source` (how the model
    was named) and `command` are recorded as given.
    """
    task = model_task(model)
    if task not in TASKS:
        raise InputError(f'zoo validate has no protocol for task {task!r}; it measures {", ".join(TASKS)} models')
    batch_size = DEFAULT_BATCH.get(task, 16) if batch_size is None else batch_size
    if batch_size < 1 or (limit is not None and limit < 1):
        raise InputError(f'batch and limit must be at least 1; got batch {batch_size}, limit {limit}')
    data = str(data)
    split = None if task == 'video' else split  # a video model is measured on the whole video it fits
    model = model.to(device).eval()
    protocol: Dict[str, Any] = dict(split=split, limit=limit)
    data_spec: Dict[str, Any] = {}
    if task == 'depth':
        protocol.update(depth_protocol(**(depth or {})), batch_size=batch_size)
        data_spec = dict(depth_scale=protocol['depth_scale'], benchmark=protocol['benchmark'])
    elif task == 'segmentation':
        protocol.update(reduce_zero_label=reduce_zero_label)
        data_spec = dict(reduce_zero_label=reduce_zero_label)
    start = time.perf_counter()
    eval_set = _eval_set(task, model, data, split, limit, data_spec)
    if task == 'classification':
        protocol.update(timm.data.resolve_model_data_config(model), metric='timm accuracy, top-1 / top-5 (%)')
        scored = _classification(model, eval_set, device, batch_size, num_workers, quiet)
    elif task == 'depth':
        scored = _depth(model, eval_set, device, batch_size, num_workers, quiet, protocol)
    elif task == 'segmentation':
        scored = _segmentation(model, eval_set, device, batch_size, num_workers, quiet)
        protocol.update(classes=scored.pop('classes'), ignore_index=IGNORE_INDEX, hd95_unit='pixels',
                        hd95_cases=scored.pop('hd95_cases'))
    else:
        scored = _video(model, eval_set, device, batch_size, quiet, prune, bits, bitstream)
        protocol.update(frame_size=list(model.frame_size), prune=prune, bits=bits, per_frame_mean=True)
    cfg = model.pretrained_cfg
    return dict(
        model=cfg.get('architecture') or type(model).__name__, tag=cfg.get('tag'),
        source=source or cfg.get('architecture'),
        weights_sha256=weights_sha256, task=task, dataset=data, split=split,
        protocol=json.loads(json.dumps(protocol, default=list)), metrics=scored.pop('metrics'),
        samples=scored.pop('samples'), **scored,
        date=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        seconds=round(time.perf_counter() - start, 3), command=command)


# ---------------------------------------------------------------------------------------------------------------
# Where results go


_CSV_FIRST = ('model', 'tag', 'task', 'dataset', 'split', 'weights_sha256', 'samples', 'date', 'seconds')


def _csv_row(result: Dict[str, Any]) -> Dict[str, Any]:
    row = {k: result.get(k) for k in _CSV_FIRST}
    row.update(result['metrics'])
    row['protocol'] = json.dumps(result['protocol'], sort_keys=True)
    row['command'] = result.get('command')
    return row


def write_results(result: Dict[str, Any], path: Union[str, Path]) -> Path:
    """Append `result` to a results file: a CSV row (`.csv`, one column per metric, as timm's validate.py
    writes) or an entry of a JSON list (`.json`). The file is rewritten atomically: a CSV gains the columns
    of a new task's metrics, earlier rows keep theirs empty."""
    path = Path(path)
    if path.suffix.lower() not in ('.csv', '.json'):
        raise InputError(f'results file {path} must end in .csv or .json')
    if path.suffix.lower() == '.json':
        try:
            rows = json.loads(path.read_text()) if path.exists() else []
        except ValueError as e:
            raise InputError(f'{path} is not a JSON results file ({e}); give a new file') from e
        if not isinstance(rows, list):
            raise InputError(f'{path} does not hold a JSON list of results; give a new file')
        text = json.dumps(rows + [result], indent=2) + '\n'
    else:
        with open(path, newline='') if path.exists() else io.StringIO() as f:
            rows = list(csv.DictReader(f))
        new = _csv_row(result)
        columns = list(dict.fromkeys([*(rows[0].keys() if rows else []), *new]))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval='')
        writer.writeheader()
        writer.writerows(rows + [new])
        text = buffer.getvalue()
    return write_atomically(path, lambda f: f.write(text.encode()))


def check_card_folder(folder: Union[str, Path], weights_sha256: Optional[str]) -> None:
    """Refuse a card update unless `folder` is a Hub folder whose model.safetensors has `weights_sha256`."""
    folder = Path(folder)
    for name in (hub.CONFIG_NAME, hub.WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f'{folder} is not a zoo Hub folder: {name} is missing')
    actual = sha256_file(folder / hub.WEIGHTS_NAME)
    if weights_sha256 != actual:
        raise InputError(f'the result is of weights with sha256 {weights_sha256}, but {folder / hub.WEIGHTS_NAME} '
                         f'has sha256 {actual}: a card records only what was measured on its own weights')


def update_card(folder: Union[str, Path], result: Dict[str, Any]) -> Path:
    """Append `result` to the Hub folder's config.json `results` and re-render its README.md.

    Refused unless the result was measured on this folder's weights (same sha256 of model.safetensors).
    """
    folder = Path(folder)
    check_card_folder(folder, result.get('weights_sha256'))
    config_path = folder / hub.CONFIG_NAME
    config = json.loads(config_path.read_text())
    config.setdefault('results', []).append({k: result.get(k) for k in RESULT_KEYS})
    card = hub.folder_card(folder, config)  # rendered before anything is written: a failure changes nothing
    write_atomically(config_path, lambda f: f.write((json.dumps(config, indent=2) + '\n').encode()))
    write_atomically(folder / hub.CARD_NAME, lambda f: f.write(card.encode()))
    return folder
