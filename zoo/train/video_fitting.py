"""Fitting a neural video representation (HNeRV, NeRV, NeRV++) to one video, for `zoo.train.trainer`.

The data is the video itself: `--data` or the recipe's `data.path` names a folder of frames or a video file,
resized to `model_args.frame_size` when the recipe sets one. `data.demo_clip` instead makes a clip from one of
scikit-image's sample photographs (a slow pan and zoom), so a fit can run with no download at all. The frame
count and size of the video become the model's `num_frames` and `frame_size`, so one recipe fits any video.
`data.inpaint_box` fits the video with five boxes of every frame hidden (HNeRV's inpainting).

After training, `report` does what a user of a fitted video wants to see: it loads the Hub folder back through
`timm.create_model("local-dir:...")`, decodes every frame, compresses the model to a bitstream, and prints PSNR,
MS-SSIM, bits per pixel and decode speed, with a side-by-side PNG of original and decoded frames.
"""
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F

from zoo._io import write_atomically
from zoo.codec import compress, decode_video
from zoo.errors import InputError
from zoo.tasks import figure, save_figure
from zoo.tasks.video import fitting_loss, has_ms_ssim, ms_ssim, psnr, read_frames, write_frames
from zoo.train import fresh
from zoo.train.task import Task, eval_loader

_frames_cache: Dict[Tuple, torch.Tensor] = {}
DATA_SCHEMA = dict(path=(str, type(None)), demo_clip=(dict,), max_frames=(int, type(None)), inpaint_box=(int,))


def make_demo_clip(image: str = 'astronaut', num_frames: int = 16, frame_size: Tuple[int, int] = (96, 192),
                   zoom: float = 0.35, pan: float = 1.0) -> torch.Tensor:
    """A clip (T, 3, H, W) in [0, 1]: a window that pans down and zooms in across a scikit-image photograph.

    The window keeps the frame's aspect ratio, starts as the widest the photo allows and shrinks by `zoom`;
    it travels down `pan` of the way from the top of the photo to the bottom. The motion is eased with a
    cosine so it starts and ends slowly, and sampling is bilinear, so the motion is sub-pixel.
    """
    import skimage.data  # optional extra: video, only for the demo clip

    if not hasattr(skimage.data, image):
        raise ValueError(f'scikit-image has no sample image {image!r}; try astronaut, chelsea, coffee, rocket')
    photo = np.asarray(getattr(skimage.data, image)())
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=-1)
    photo = torch.from_numpy(photo[..., :3].copy()).permute(2, 0, 1).float().div(255)[None]
    photo_h, photo_w = photo.shape[-2:]
    height, width = frame_size
    t = 0.5 - 0.5 * torch.cos(torch.linspace(0, math.pi, num_frames))
    window_w = min(photo_w, photo_h * width / height) * (1 - zoom * t)
    window_h = window_w * height / width
    centre_x = torch.full_like(t, photo_w / 2)
    centre_y = window_h / 2 + pan * t * (photo_h - window_h)
    theta = torch.zeros(num_frames, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = window_w / photo_w, window_h / photo_h
    theta[:, 0, 2], theta[:, 1, 2] = 2 * centre_x / photo_w - 1, 2 * centre_y / photo_h - 1
    grid = F.affine_grid(theta, [num_frames, 3, height, width], align_corners=False)
    frames = F.grid_sample(photo.expand(num_frames, -1, -1, -1), grid, mode='bilinear', align_corners=False)
    return frames.clamp(0, 1)


def load_video(recipe: Dict[str, Any], data: Optional[str] = None) -> torch.Tensor:
    """The frames a recipe (or `--data`) names, read once per process."""
    spec = recipe['data']
    frame_size = recipe['model_args'].get('frame_size')
    frame_size = tuple(frame_size) if frame_size else None
    source = data or spec.get('path')
    if source is None and 'demo_clip' not in spec:
        raise InputError('no video: give --data (a folder of frames or a video file), or data.path or '
                         'data.demo_clip in the recipe')
    key = (source, json.dumps(spec.get('demo_clip'), sort_keys=True), frame_size, spec.get('max_frames'))
    if key not in _frames_cache:
        if source is not None:
            frames = read_frames(source, frame_size=frame_size, max_frames=spec.get('max_frames'))
        else:
            clip = dict(spec['demo_clip'])
            clip.setdefault('frame_size', frame_size or (96, 192))
            frames = make_demo_clip(**clip)
        _frames_cache[key] = frames
    return _frames_cache[key]


def model_kwargs(recipe: Dict[str, Any], data: Optional[str] = None) -> Dict[str, Any]:
    """The recipe's model arguments, with `frame_size` and `num_frames` taken from the video, and with
    `train.fresh` the positional encoding FreSh chooses for it (written back into the recipe)."""
    frames = load_video(recipe, data)
    args = {**recipe['model_args'], 'frame_size': tuple(frames.shape[-2:]), 'num_frames': len(frames)}
    settings = recipe['train'].get('fresh')
    if settings:  # true, or {bases: [...], levels: [...], seeds: [...]} to search another grid
        args, table = fresh.choose_encoding(recipe['model'], args, frames, **({} if settings is True else settings))
        best = min(table, key=lambda row: row['distance'])
        print(f'FreSh: positional encoding base {best["base"]}, {best["levels"]} levels (spectrum distance '
              f'{best["distance"]:.4f}, of {len(table)} candidates)')
        recipe['model_args'] = {**recipe['model_args'], **{k: args[k] for k in ('pe', 'pe_base', 'pe_levels') if k in args}}
    return args


def inpainting_mask(frame_size: Tuple[int, int], box: int) -> torch.Tensor:
    """HNeRV's inpainting mask (1, H, W): 0 in five `box`-pixel squares centred at (1/2, 1/2) and the four
    (1/4 | 3/4, 1/4 | 3/4) points of the frame, 1 elsewhere."""
    height, width = frame_size
    mask = torch.ones(1, height, width)
    for fy, fx in ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)):
        top, left = round(fy * height) - box // 2, round(fx * width) - box // 2
        mask[:, max(top, 0):top + box, max(left, 0):left + box] = 0
    return mask


class VideoFrames(torch.utils.data.Dataset):
    """(frame, frame index) pairs of one video, and the mask of the pixels that may be seen (all, unless
    the recipe inpaints: `data.inpaint_box`)."""

    def __init__(self, frames: torch.Tensor, mask: Optional[torch.Tensor] = None):
        self.frames = frames
        self.mask = torch.ones(1, *frames.shape[-2:]) if mask is None else mask

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int):
        return self.frames[index], index


def datasets(recipe: Dict[str, Any], model: torch.nn.Module, data: Optional[str] = None, output_dir=None):
    """The video is both the training set and the evaluation set: a representation is fitted to it.

    With `data.inpaint_box: B` (HNeRV's inpainting, paper Table 8: B = 50), five BxB boxes of every frame are
    hidden: the encoder sees the masked frame and the loss counts only the visible pixels, while evaluation
    compares the output with the whole true frame, holes included.
    """
    frames = load_video(recipe, data)
    box = recipe['data'].get('inpaint_box')
    video = VideoFrames(frames, inpainting_mask(frames.shape[-2:], box) if box else None)
    return video, video, None


def make_loss(recipe: Dict[str, Any], model: torch.nn.Module):
    """The recipe's `loss` ('l2' for HNeRV, 'fusion6' for NeRV / NeRV++) between decoded and true frames."""
    loss = fitting_loss(recipe.get('loss', 'l2'))
    box = recipe['data'].get('inpaint_box')

    def loss_fn(model, batch):
        frames, index = batch
        if not box:
            return loss(model(frames=frames, index=index), frames)
        mask = inpainting_mask(frames.shape[-2:], box).to(frames.device).expand(len(frames), 1, -1, -1)
        return loss(model(frames=frames * mask, index=index), frames, mask=mask)
    return loss_fn


def _quality(decoded: torch.Tensor, frames: torch.Tensor, per_frame: bool = False) -> Dict[str, Any]:
    """Per-frame-mean PSNR (dB), as HNeRV reports it, and MS-SSIM where frames are large enough for it
    (with `per_frame`, the per-frame tensors instead of their means)."""
    metrics = {'psnr': psnr(decoded, frames)}
    if has_ms_ssim(frames):
        metrics['ms_ssim'] = ms_ssim(decoded, frames)
    return metrics if per_frame else {k: v.mean().item() for k, v in metrics.items()}


@torch.no_grad()
def evaluate(recipe: Dict[str, Any], model: torch.nn.Module, eval_set: VideoFrames, accelerator) -> Dict[str, float]:
    """Per-frame-mean PSNR (and MS-SSIM) of the whole frames decoded from the visible pixels, the frames
    sharded over the processes."""
    model = model.to(accelerator.device)
    mask = eval_set.mask.to(accelerator.device)
    rows = []
    for frames, index in eval_loader(eval_set, accelerator.num_processes * 2, accelerator):
        decoded = model(frames=frames * mask, index=index).float()
        quality = _quality(decoded.cpu(), frames.float().cpu(), per_frame=True)
        row = torch.stack([quality[k] for k in sorted(quality)], dim=1).to(accelerator.device, torch.float64)
        rows.append(accelerator.gather_for_metrics(row).cpu())
    metrics = dict(zip(sorted(quality), torch.cat(rows).mean(0).tolist()))
    if not eval_set.mask.all():  # inpainting: the masked input's own PSNR, for comparison (paper Table 8)
        metrics['input_psnr'] = psnr(eval_set.frames * eval_set.mask, eval_set.frames).mean().item()
    return metrics


@torch.inference_mode()
def decode_speed(model: torch.nn.Module, embeddings: torch.Tensor, repeats: int = 1) -> float:
    """Frames per second of `model.decode`, one frame at a time, after one warm-up frame."""
    model.decode(embeddings[:1])
    start = time.perf_counter()
    for _ in range(repeats):
        for embedding in embeddings.split(1):
            model.decode(embedding)
    return repeats * len(embeddings) / (time.perf_counter() - start)


def side_by_side(original: torch.Tensor, decoded: torch.Tensor, path: Path, columns: int = 4) -> Path:
    """A PNG with `columns` frames spread over the video, each row labelled: the original frames on top, the
    frames decoded from the bitstream below, with each frame's number and PSNR."""
    picks = torch.linspace(0, len(original) - 1, min(columns, len(original))).round().long().tolist()
    height, width = original.shape[-2:]
    fig = figure(2 * height, len(picks) * width, extra_width=0.4, extra_height=0.8)
    axes = fig.subplots(2, len(picks), squeeze=False)
    for column, index in enumerate(picks):
        for row, frames in enumerate((original, decoded)):
            ax = axes[row, column]
            ax.imshow(frames[index].clamp(0, 1).permute(1, 2, 0).numpy(), interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, column].set_title(f'frame {index}', fontsize='small')
        axes[1, column].set_xlabel(f'PSNR {psnr(decoded[index:index + 1], original[index:index + 1]).item():.1f} dB',
                                   fontsize='small')
    axes[0, 0].set_ylabel('original')
    axes[1, 0].set_ylabel('decoded')
    return save_figure(fig, path)


def report(recipe: Dict[str, Any], folder: Path, eval_set: VideoFrames, metrics: Dict[str, Any],
           output_dir: Path) -> Dict[str, Any]:
    """Load the Hub folder back with timm, decode, compress, and print what the fit achieved."""
    frames = eval_set.frames
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    with torch.no_grad():
        if model.stored_embeddings:
            embeddings = torch.cat([model.encode(frames=batch * eval_set.mask) for batch in frames.split(4)])
        else:
            embeddings = model.encode(index=torch.arange(len(frames)))
    reloaded = _quality(torch.cat([model.decode(e) for e in embeddings.split(4)]).float(), frames)
    fps = decode_speed(model, embeddings)
    bitstream = output_dir / 'video.zvid'
    compressed = compress(model, bitstream, frames=frames, embeddings=embeddings if model.stored_embeddings else None)
    decoded = decode_video(bitstream)
    picture = side_by_side(frames, decoded, output_dir / 'side_by_side.png')
    if recipe['data'].get('demo_clip') is not None:
        write_frames(frames, output_dir / 'clip')
    height, width = frames.shape[-2:]
    summary = {
        **metrics,
        'reloaded_psnr': reloaded['psnr'],
        'decode_fps': fps,
        'bitstream_bytes': compressed['bytes'],
        'bpp': compressed['bpp'],
        'bitstream_psnr': compressed['psnr'],
        'bitstream_ms_ssim': compressed['ms_ssim'],
    }
    write_atomically(output_dir / 'report.json', lambda f: f.write((json.dumps(summary, indent=2) + '\n').encode()))
    print(f'\n{recipe["model"]} fitted to {len(frames)} frames of {height}x{width} '
          f'({model.size_params() / 1e6:.3f}M params by the paper\'s size convention)')
    print(f'  reloaded with timm.create_model("local-dir:{folder}")')
    print(f'  PSNR          {reloaded["psnr"]:.2f} dB (per-frame mean, float weights)')
    print(f'  bitstream     {compressed["bytes"]:,} bytes = {compressed["bpp"]:.4f} bits per pixel '
          f'({compressed["prune"]:.0%} pruned, {compressed["bits"]}-bit, entropy coded): {bitstream}')
    print(f'  PSNR          {compressed["psnr"]:.2f} dB decoded from the bitstream'
          + (f', MS-SSIM {compressed["ms_ssim"]:.4f}' if compressed['ms_ssim'] is not None else ''))
    print(f'  decode speed  {fps:.1f} frames/s (batch 1, {torch.get_num_threads()} CPU threads)')
    print(f'  side by side  {picture} (original frames over those decoded from the bitstream)')
    return summary


class VideoFitting(Task):
    """A neural representation fitted to one video: the video is the training and the evaluation set."""
    data_schema = DATA_SCHEMA
    named_loss = True
    best_metric = ('psnr', 'max')
    separate_eval_split = False

    model_kwargs = staticmethod(model_kwargs)
    datasets = staticmethod(datasets)
    make_loss = staticmethod(make_loss)
    evaluate = staticmethod(evaluate)
    report = staticmethod(report)
