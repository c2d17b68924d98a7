"""Video tasks for the neural video representations (HNeRV, NeRV, NeRV++): frames in and out, metrics,
fitting losses and the downstream uses of the HNeRV paper. The bitstream that stores a fitted model is
`zoo.codec`.

Frames are float32 tensors (T, 3, H, W) in [0, 1] throughout. Metrics follow the official HNeRV code
(`hnerv_utils.py`): one value per frame, reported as the mean over frames.
"""
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_msssim import ms_ssim as _ms_ssim
from pytorch_msssim import ssim as _ssim

from zoo._io import check_output_dir, replace_file
from zoo.errors import InputError
from zoo.tasks import rgb_array

__all__ = [
    'read_frames', 'write_frames', 'psnr', 'ssim', 'ms_ssim', 'has_ms_ssim', 'fitting_loss', 'interpolate_embeddings',
    'check_frames_path',
]

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
VIDEO_FORMATS = {'.mp4': 'mp4', '.mkv': 'matroska', '.mov': 'mov'}  # all written as H.264
FRAME_NAME = re.compile(r'frame_\d{5,}\.png')
MS_SSIM_MIN_SIZE = 160  # MS-SSIM's five scales of an 11-tap window need frames larger than this on each side
PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------------------------
# Frames in and out


def _natural_key(name: str):
    """Sort frame_2.png before frame_10.png."""
    return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def _fit_frame(frame: torch.Tensor, frame_size: Tuple[int, int]) -> torch.Tensor:
    """Resize (bicubic, keeping the aspect ratio) until the frame covers `frame_size`, then centre-crop to it.

    A 720x1280 Bunny frame becomes the paper's 640x1280 by the crop alone, as HNeRV's `--crop_list` does.
    """
    height, width = frame_size
    h, w = frame.shape[-2:]
    scale = max(height / h, width / w)
    if scale != 1:
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        frame = F.interpolate(frame[None], size=size, mode='bicubic', antialias=scale < 1, align_corners=False)[0]
        frame = frame.clamp(0, 1)
        h, w = size
    top, left = (h - height) // 2, (w - width) // 2
    return frame[:, top:top + height, left:left + width]


def _image_arrays(folder: Path) -> Iterator[Tuple[str, np.ndarray]]:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: _natural_key(p.name))
    if not files:
        raise ValueError(f'no frames in {folder}: it holds no image files ({", ".join(IMAGE_SUFFIXES)})')
    for path in files:
        try:
            with Image.open(path) as image:
                yield path.name, rgb_array(image)
        except OSError as e:
            raise ValueError(f'cannot read frame {path}: {e}') from e


def _video_arrays(path: Path) -> Iterator[Tuple[str, np.ndarray]]:
    import av  # optional extra: video (PyAV), only for video files

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f'{path} holds no video stream')
            for i, frame in enumerate(container.decode(video=0)):
                yield f'frame {i} of {path.name}', frame.to_ndarray(format='rgb24').astype(np.float32) / 255
    except av.FFmpegError as e:
        raise ValueError(f'cannot read {path} as a video: {e}') from e


def read_frames(path: PathLike, frame_size: Optional[Tuple[int, int]] = None,
                max_frames: Optional[int] = None) -> torch.Tensor:
    """Frames (T, 3, H, W) float32 in [0, 1] from a folder of images (natural name order) or a video file.

    Video files are decoded with PyAV, whose wheel carries ffmpeg. 16-bit greyscale images are scaled by their
    full range (65535). With `frame_size=(H, W)` every frame is resized to cover it and centre-cropped;
    `max_frames` keeps the first frames only. All frames must have the same size before any resize.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'no frames at {path}: give a folder of images or a video file')
    arrays = _image_arrays(path) if path.is_dir() else _video_arrays(path)
    frames, first = [], None
    for name, array in arrays:
        if max_frames is not None and len(frames) >= max_frames:
            break
        if first is None:
            first = (name, array.shape[:2])
        elif array.shape[:2] != first[1]:
            raise ValueError(
                f'frames of different sizes in {path}: {name} is {array.shape[0]}x{array.shape[1]}, but '
                f'{first[0]} is {first[1][0]}x{first[1][1]}; a video must keep one frame size')
        frame = torch.from_numpy(array).permute(2, 0, 1)
        frames.append(_fit_frame(frame, frame_size) if frame_size is not None else frame)
    if not frames:
        raise ValueError(f'no frames in {path}')
    return torch.stack(frames)


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f'frames must be (T, 3, H, W); got {tuple(frames.shape)}')
    return frames.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _write_video(arrays: np.ndarray, path: Path, fps: int, crf: int) -> None:
    import av  # optional extra: video (PyAV), only for video files

    height, width = arrays.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(
            f'{path.suffix} (H.264, yuv420p) needs an even frame height and width; got {height}x{width}. '
            'Write a folder of PNGs instead')
    with av.open(str(path), mode='w', format=VIDEO_FORMATS[path.suffix.lower()]) as container:
        stream = container.add_stream('libx264', rate=fps, options={'crf': str(crf)})
        stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
        for array in arrays:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format='rgb24')))
        container.mux(stream.encode())


def check_frames_path(path: PathLike) -> Path:
    """Refuse, before any work, a place `write_frames` cannot write to: a video name that is a folder, a folder
    name that is a file or a folder holding other files than frames (only our own frames are ever replaced),
    a path under a file, an unknown extension."""
    path = Path(path)
    if path.suffix and path.suffix.lower() not in VIDEO_FORMATS:
        raise InputError(f'cannot write {path}: give a folder (no extension) or a {"/".join(VIDEO_FORMATS)} video')
    check_output_dir(path.parent)
    if path.suffix and path.is_dir():
        raise InputError(f'{path} is a folder: give a video file name, or a name without extension for a folder of '
                         'PNG frames')
    if not path.suffix and path.exists():
        if not path.is_dir():
            raise InputError(f'{path} exists and is not a folder')
        others = [p.name for p in path.iterdir() if not FRAME_NAME.fullmatch(p.name)]
        if others:
            raise InputError(f'{path} holds files other than frame_NNNNN.png (first: {sorted(others)[0]}); '
                             'give a new or empty folder')
    return path


def _replace_folder(staging: Path, target: Path) -> None:
    """Swap a finished folder of frames into place; only a folder of our own frame files is ever replaced."""
    if target.exists():
        check_frames_path(target)  # again: the folder may have changed while the frames were written
        old = Path(tempfile.mkdtemp(prefix=f'.{target.name}.old-', dir=target.parent))
        os.replace(target, old / target.name)
        try:
            os.replace(staging, target)
        except OSError:
            os.replace(old / target.name, target)  # put the good frames back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def write_frames(frames: torch.Tensor, path: PathLike, fps: int = 25, crf: int = 18) -> Path:
    """Write frames (T, 3, H, W) in [0, 1] as a video (.mp4/.mkv/.mov: H.264 at `crf`) or a folder of PNGs
    (a path without extension).

    Atomic: everything is written beside `path` first and moved over it only when complete, so a failed
    write never leaves a half video (or half a folder) in place of a good one.
    """
    path = check_frames_path(path)
    arrays = _to_uint8(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in VIDEO_FORMATS:
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.stem}-', suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            _write_video(arrays, Path(tmp), fps, crf)
            replace_file(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path
    staging = Path(tempfile.mkdtemp(prefix=f'.{path.name}-', dir=path.parent))
    try:
        for i, array in enumerate(arrays):
            Image.fromarray(array).save(staging / f'frame_{i:05d}.png')
        _replace_folder(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Metrics and losses (as hnerv_utils.py computes them)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB, -10 log10(MSE over C, H, W + 1e-9) (HNeRV; NeRV's batch PSNR differs)."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse + 1e-9)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM (11-tap Gaussian window, sigma 1.5, data range 1)."""
    return _ssim(pred.float(), target.float(), data_range=1, size_average=False)


def has_ms_ssim(frames: torch.Tensor) -> bool:
    """Whether frames (..., H, W) are large enough for MS-SSIM: both sides over `MS_SSIM_MIN_SIZE`."""
    return min(frames.shape[-2:]) > MS_SSIM_MIN_SIZE


def ms_ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame MS-SSIM (five scales, the standard weights, data range 1)."""
    if not has_ms_ssim(pred):
        raise ValueError(
            f'MS-SSIM needs frames larger than {MS_SSIM_MIN_SIZE} px on the smaller side (five scales of an 11-tap '
            f'window); got {pred.shape[-2]}x{pred.shape[-1]}')
    return _ms_ssim(pred.float(), target.float(), data_range=1, size_average=False)


def _per_frame_error(name: str, pred: torch.Tensor, target: torch.Tensor,
                     mask: Optional[torch.Tensor]) -> torch.Tensor:
    error = (pred - target).abs() if name == 'l1' else (pred - target).pow(2)
    if mask is None:
        return error.flatten(1).mean(1)
    mask = mask.expand_as(error)
    return (error * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)


def fitting_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss `loss(pred, target, mask=None)` for fitting a video: 'l2', 'l1' or 'fusion6'.

    Values match HNeRV's `loss_fn` (per-frame mean, then batch mean); 'fusion6' = 0.7 L1 + 0.3 (1 - SSIM),
    NeRV's loss. With a `mask` (B, 1 or 3, H, W), for inpainting, only pixels where mask == 1 count: L1 and
    L2 average over them, and SSIM compares the target with the prediction pasted into it, so the prediction
    outside the mask has no influence.
    """
    if name not in ('l2', 'l1', 'fusion6'):
        raise ValueError(f'unknown fitting loss {name!r}; known: l2, l1, fusion6')

    def loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if name != 'fusion6':
            return _per_frame_error(name, pred, target, mask).mean()
        pasted = pred if mask is None else pred * mask + target * (1 - mask)
        structure = 1 - _ssim(pasted, target, data_range=1, size_average=False)
        return (0.7 * _per_frame_error('l1', pred, target, mask) + 0.3 * structure).mean()

    return loss


# ---------------------------------------------------------------------------------------------------------------
# Downstream: interpolation


def interpolate_embeddings(embeddings: torch.Tensor, factor: int) -> torch.Tensor:
    """Frame embeddings (T, ...) -> ((T - 1) * factor + 1, ...) linearly interpolated between neighbours.

    HNeRV's frame interpolation (paper Table 7): decoding the in-between embeddings gives the in-between
    frames; every `factor`-th output is an original embedding. For NeRV / NeRV++ encode fractional times instead.
    """
    if factor < 1 or embeddings.shape[0] < 2:
        raise ValueError(f'need factor >= 1 and at least two embeddings; got factor {factor}, '
                         f'{embeddings.shape[0]} embeddings')
    steps = (embeddings.shape[0] - 1) * factor + 1
    flat = embeddings.flatten(1).T[None]
    return F.interpolate(flat, size=steps, mode='linear', align_corners=True)[0].T.reshape(steps, *embeddings.shape[1:])
