"""Video tasks for the neural video representations (HNeRV, NeRV, NeRV++): frames in and out, metrics,
fitting losses, compression to a real bitstream, and the downstream uses of the HNeRV paper.

Frames are float32 tensors (T, 3, H, W) in [0, 1] throughout. Metrics follow the official HNeRV code
(`hnerv_utils.py`): one value per frame, reported as the mean over frames.

The bitstream (`compress` / `decompress`) is the paper's pipeline (§4.4): global magnitude pruning of the
decoder weights, b-bit quantisation of every decoder tensor and of the frame embeddings, entropy coding. The
quantiser is HNeRV's per-tensor one: 2^b - 1 levels between the tensor's min and max. HNeRV keeps min and
scale as fp16, which clamps values near the top of the range once b > 8 (fp16 has an 11-bit significand), so
the zoo keeps them as fp32: 8 bytes a tensor. (The official code also tries per-axis min/scale and keeps
whichever errs least; per-tensor alone is the layout of the authors' quantized release.) Quantised
symbols are range-coded with `constriction` under a per-tensor categorical model whose table travels in the
file; a tensor for which the table costs more than it saves is stored raw.
"""
import json
import os
import re
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim as _ms_ssim
from pytorch_msssim import ssim as _ssim

from zoo.errors import BitstreamError
from zoo.hub import replace_file, write_atomically

__all__ = [
    'read_frames', 'write_frames', 'psnr', 'ssim', 'ms_ssim', 'fitting_loss', 'compress', 'decompress',
    'decode_video', 'interpolate_embeddings', 'BitstreamError',
]

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
VIDEO_FORMATS = {'.mp4': 'mp4', '.mkv': 'matroska', '.mov': 'mov'}  # all written as H.264
FRAME_NAME = re.compile(r'frame_\d{5,}\.png')
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
    from PIL import Image

    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: _natural_key(p.name))
    if not files:
        raise ValueError(f'no frames in {folder}: it holds no image files ({", ".join(IMAGE_SUFFIXES)})')
    for path in files:
        try:
            with Image.open(path) as image:
                yield path.name, np.array(image.convert('RGB'))
        except OSError as e:
            raise ValueError(f'cannot read frame {path}: {e}') from e


def _video_arrays(path: Path) -> Iterator[Tuple[str, np.ndarray]]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f'{path} holds no video stream')
            for i, frame in enumerate(container.decode(video=0)):
                yield f'frame {i} of {path.name}', frame.to_ndarray(format='rgb24')
    except av.FFmpegError as e:
        raise ValueError(f'cannot read {path} as a video: {e}') from e


def read_frames(path: PathLike, frame_size: Optional[Tuple[int, int]] = None,
                max_frames: Optional[int] = None) -> torch.Tensor:
    """Frames (T, 3, H, W) float32 in [0, 1] from a folder of images (natural name order) or a video file.

    Video files are decoded with PyAV, whose wheel carries ffmpeg. With `frame_size=(H, W)` every frame is
    resized to cover it and centre-cropped; `max_frames` keeps the first frames only. All frames must have
    the same size before any resize.
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
        frame = torch.from_numpy(array).permute(2, 0, 1).float().div_(255)
        frames.append(_fit_frame(frame, frame_size) if frame_size is not None else frame)
    if not frames:
        raise ValueError(f'no frames in {path}')
    return torch.stack(frames)


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f'frames must be (T, 3, H, W); got {tuple(frames.shape)}')
    return frames.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _write_video(arrays: np.ndarray, path: Path, fps: int, crf: int) -> None:
    import av

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


def _replace_folder(staging: Path, target: Path) -> None:
    """Swap a finished folder of frames into place; only a folder of our own frame files is ever replaced."""
    if target.exists():
        if not target.is_dir():
            raise ValueError(f'{target} exists and is not a folder')
        others = [p.name for p in target.iterdir() if not FRAME_NAME.fullmatch(p.name)]
        if others:
            raise ValueError(
                f'{target} holds files other than frame_NNNNN.png (first: {sorted(others)[0]}); '
                'give a new or empty folder')
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
    path = Path(path)
    if path.suffix and path.suffix.lower() not in VIDEO_FORMATS:
        raise ValueError(f'cannot write {path}: give a folder (no extension) or a {"/".join(VIDEO_FORMATS)} video')
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
    from PIL import Image

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


def ms_ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame MS-SSIM (five scales, the standard weights, data range 1)."""
    if min(pred.shape[-2:]) <= 160:
        raise ValueError(
            f'MS-SSIM needs frames larger than 160 px on the smaller side (five scales of an 11-tap window); '
            f'got {pred.shape[-2]}x{pred.shape[-1]}')
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


# ---------------------------------------------------------------------------------------------------------------
# Bitstream
#
#   magic 'ZVID' | version u16 | header length u32 | header JSON | payload | CRC-32 of all that precedes it
#
# The header names the model and its args and lists the tensors (decoder state-dict entries, then the frame
# embeddings when the model stores them). The payload holds one record per tensor, in that order:
#   fp32 min | fp32 scale | coding u8 | raw: the symbols (uint8, or uint16 above 8 bits)
#                                     | categorical: word count u32, table (2^bits uint16 symbol weights),
#                                       range-coded words (uint32)


MAGIC, VERSION = b'ZVID', 2
_PREFIX = struct.Struct('<4sHI')
_RECORD = struct.Struct('<ffB')
_TABLE = struct.Struct('<I')
RAW, CATEGORICAL = 0, 1


def _prune(state: Dict[str, torch.Tensor], amount: float) -> Dict[str, torch.Tensor]:
    """Global magnitude pruning: zero the `amount` fraction of smallest-magnitude weights (ndim > 1) overall."""
    weights = [k for k, v in state.items() if v.ndim > 1]
    magnitudes = torch.cat([state[k].abs().flatten() for k in weights])
    count = int(amount * magnitudes.numel())
    if count == 0:
        return state
    threshold = magnitudes.kthvalue(count).values
    return {k: v.masked_fill(v.abs() <= threshold, 0) if k in weights else v for k, v in state.items()}


def _quantize(tensor: torch.Tensor, bits: int) -> Tuple[np.ndarray, float, float]:
    """HNeRV's per-tensor quantiser, with fp32 min and scale: symbols in [0, 2^bits - 1]."""
    tensor = tensor.detach().float().cpu()
    levels = 2 ** bits - 1
    t_min = float(np.float32(tensor.min()))
    scale = float(np.float32((tensor.max() - t_min) / levels))
    if scale == 0:
        return np.zeros(tensor.numel(), dtype=np.int32), t_min, scale
    symbols = ((tensor - t_min) / scale).round().clamp(0, levels)
    return symbols.flatten().to(torch.int32).numpy(), t_min, scale


def _categorical(table: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(table.astype(np.float64), perfect=False)


def _encode_symbols(symbols: np.ndarray, bits: int) -> Tuple[int, bytes]:
    """The cheaper of a range-coded record (with its table) and the raw symbols."""
    import constriction

    raw = symbols.astype(np.uint8 if bits <= 8 else '<u2').tobytes()
    counts = np.bincount(symbols, minlength=2 ** bits)
    table = np.where(counts > 0, np.maximum(1, np.round(counts * 65535 / counts.max())), 0).astype('<u2')
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(symbols, _categorical(table))
    words = encoder.get_compressed().astype('<u4')
    coded = _TABLE.pack(len(words)) + table.tobytes() + words.tobytes()
    return (CATEGORICAL, coded) if len(coded) < len(raw) else (RAW, raw)


def _decode_record(payload: memoryview, offset: int, numel: int, bits: int) -> Tuple[np.ndarray, float, float, int]:
    import constriction

    t_min, scale, coding = _RECORD.unpack_from(payload, offset)
    offset += _RECORD.size
    if coding == RAW:
        dtype = np.dtype(np.uint8 if bits <= 8 else '<u2')
        symbols = np.frombuffer(payload, dtype=dtype, count=numel, offset=offset).astype(np.int64)
        return symbols, t_min, scale, offset + numel * dtype.itemsize
    (num_words,) = _TABLE.unpack_from(payload, offset)
    offset += _TABLE.size
    table = np.frombuffer(payload, dtype='<u2', count=2 ** bits, offset=offset)
    offset += 2 * 2 ** bits
    words = np.frombuffer(payload, dtype='<u4', count=num_words, offset=offset).astype(np.uint32)
    decoder = constriction.stream.queue.RangeDecoder(words)
    symbols = decoder.decode(_categorical(table), numel).astype(np.int64)
    return symbols, t_min, scale, offset + 4 * num_words


def _model_args(model) -> Dict[str, object]:
    """The timm factory kwargs that rebuild `model`, checked to give the same decoder tensors."""
    import timm

    name = model.pretrained_cfg['architecture']
    args = dict(timm.models.get_model_args(model), frame_size=list(model.frame_size), num_frames=model.num_frames)
    try:
        args = json.loads(json.dumps(args))
    except TypeError as e:
        raise ValueError(f'{name} was created with an argument a bitstream cannot record ({e})') from e
    with torch.device('meta'):
        rebuilt = timm.create_model(name, **args).decoder_state_dict()
    shapes = {k: tuple(v.shape) for k, v in model.decoder_state_dict().items()}
    if {k: tuple(v.shape) for k, v in rebuilt.items()} != shapes:
        raise ValueError(
            f'timm.create_model({name!r}, **{args}) does not rebuild this model\'s decoder, so a bitstream of it '
            'could not be decoded. Create the model with timm.create_model (its keyword arguments are recorded)')
    return args


@torch.no_grad()
def _encode_frames(model, frames: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The embeddings of `frames` in eval mode, leaving the model's mode as it was."""
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    try:
        return torch.cat([model.encode(frames=frames[i:i + batch_size].to(device)).cpu()
                          for i in range(0, len(frames), batch_size)])
    finally:
        model.train(was_training)


@torch.no_grad()
def _decode_batches(model, embeddings: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(embeddings), batch_size):
        yield model.decode(embeddings[i:i + batch_size]).float()


def compress(model, path: PathLike, frames: Optional[torch.Tensor] = None, prune: float = 0.1, bits: int = 8,
             embeddings: Optional[torch.Tensor] = None, batch_size: int = 8) -> Dict[str, object]:
    """Write `model` (and, for HNeRV, the frame embeddings) as a bitstream at `path`; measure it.

    HNeRV's embeddings are `embeddings` when given, else `model.frame_embeddings` when the model carries them
    (the official Bunny release, whose encoder was not published), else the encoder's embeddings of `frames`.

    The model itself is left untouched: pruning (fraction `prune` of the decoder weights, by global magnitude;
    fine-tune after pruning for the paper's numbers) and quantisation work on a copy. Returns the file size in
    bytes (total and per section), bits per pixel (file bits / (T * H * W)), and, when `frames` are given, the
    per-frame-mean PSNR and MS-SSIM of the video decoded from the written file (MS-SSIM is None for frames of
    160 px or less).
    """
    path = Path(path)
    if not 1 <= bits <= 16:
        raise ValueError(f'bits must be in 1..16; got {bits}')
    if not 0 <= prune < 1:
        raise ValueError(f'prune is the fraction of decoder weights set to zero, in [0, 1); got {prune}')
    name = model.pretrained_cfg['architecture']
    height, width = model.frame_size
    if frames is not None and tuple(frames.shape[1:]) != (3, height, width):
        raise ValueError(f'{name} was built for {height}x{width} frames; got frames of shape {tuple(frames.shape)}. '
                         'Read them with read_frames(path, frame_size=model.frame_size)')
    model_args = _model_args(model)
    tensors = _prune({k: v.detach().float().cpu() for k, v in model.decoder_state_dict().items()}, prune)
    if model.stored_embeddings:
        if embeddings is None:
            embeddings = getattr(model, 'frame_embeddings', None)
        if embeddings is None and frames is None:
            raise ValueError(f'{name} stores one embedding per frame: pass the frames (or their embeddings)')
        if embeddings is None:
            embeddings = _encode_frames(model, frames, batch_size)
        num_frames = len(embeddings)
        if frames is not None and len(frames) != num_frames:
            raise ValueError(f'{name} has {num_frames} frame embeddings; got {len(frames)} frames to compare with')
        tensors['embeddings'] = embeddings.detach().float().cpu()
    else:
        num_frames = model.num_frames
        if frames is not None and len(frames) != num_frames:
            raise ValueError(f'{name} represents {num_frames} frames; got {len(frames)} frames to compare with')
    payload, sizes = bytearray(), {'decoder_bytes': 0, 'embedding_bytes': 0}
    for key, tensor in tensors.items():
        symbols, t_min, scale = _quantize(tensor, bits)
        coding, data = _encode_symbols(symbols, bits)
        record = _RECORD.pack(t_min, scale, coding) + data
        sizes['embedding_bytes' if key == 'embeddings' else 'decoder_bytes'] += len(record)
        payload += record
    header = json.dumps({
        'model': name,
        'model_args': model_args,
        'bits': bits,
        'prune': prune,
        'frames': num_frames,
        'tensors': [[key, list(tensor.shape)] for key, tensor in tensors.items()],
        'payload_bytes': len(payload),
    }, separators=(',', ':')).encode()
    blob = _PREFIX.pack(MAGIC, VERSION, len(header)) + header + payload
    blob += struct.pack('<I', zlib.crc32(blob))
    write_atomically(path, lambda f: f.write(blob))

    result = {
        'path': str(path), 'model': name, 'frames': num_frames, 'frame_size': (height, width),
        'bytes': len(blob), 'header_bytes': _PREFIX.size + len(header) + 4, **sizes,
        'bpp': len(blob) * 8 / (num_frames * height * width), 'psnr': None, 'ms_ssim': None,
    }
    if frames is not None:
        decoded_model, embeddings = decompress(path, device=next(model.parameters()).device)
        scores, structure = [], []
        for i, decoded in enumerate(_decode_batches(decoded_model, embeddings, batch_size)):
            decoded, target = decoded.cpu(), frames[i * batch_size:i * batch_size + len(decoded)].float().cpu()
            scores.append(psnr(decoded, target))
            if min(height, width) > 160:
                structure.append(ms_ssim(decoded, target))
        result['psnr'] = torch.cat(scores).mean().item()
        result['ms_ssim'] = torch.cat(structure).mean().item() if structure else None
    return result


def _read_bitstream(path: Path) -> Tuple[dict, memoryview]:
    """Header and payload of a bitstream, after checking its magic, version, length and checksum."""
    if not path.is_file():
        raise FileNotFoundError(f'no bitstream at {path}')
    data = path.read_bytes()
    if len(data) < _PREFIX.size + 4:
        raise BitstreamError(f'{path} is truncated: {len(data)} bytes, shorter than any zoo video bitstream')
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise BitstreamError(f'{path} is not a zoo video bitstream (it starts with {magic!r}, not {MAGIC!r})')
    if version != VERSION:
        raise BitstreamError(f'{path} is bitstream format version {version}; this zoo reads version {VERSION}')
    end_of_header = _PREFIX.size + header_len
    if len(data) < end_of_header + 4:
        raise BitstreamError(f'{path} is truncated: {len(data)} bytes, its header alone needs {end_of_header}')
    try:
        header = json.loads(data[_PREFIX.size:end_of_header])
        expected = end_of_header + header['payload_bytes'] + 4
    except (ValueError, KeyError, TypeError) as e:
        raise BitstreamError(f'{path} is corrupt: its header cannot be read ({e})') from e
    if len(data) < expected:
        raise BitstreamError(f'{path} is truncated: {len(data)} bytes of the {expected} its header declares')
    if len(data) > expected:
        raise BitstreamError(f'{path} is corrupt: {len(data) - expected} bytes follow the end of the bitstream')
    (stored,) = struct.unpack_from('<I', data, expected - 4)
    if zlib.crc32(data[:expected - 4]) != stored:
        raise BitstreamError(f'{path} is corrupt: checksum mismatch (the file changed after it was written)')
    return header, memoryview(data)[end_of_header:expected - 4]


def decompress(path: PathLike, device: Union[str, torch.device] = 'cpu'):
    """Rebuild the model a bitstream was made from (with timm) and return `(model, embeddings)`, in eval mode.

    The model carries the dequantised decoder; HNeRV's encoder is not in the bitstream and keeps its initial
    weights. `embeddings` are the stored ones (HNeRV) or the model's encoding of every frame index (NeRV).
    """
    import timm

    from zoo.registry import check_model_name

    path = Path(path)
    header, payload = _read_bitstream(path)
    check_model_name(header['model'])
    try:
        model = timm.create_model(header['model'], **header['model_args'])
    except (TypeError, ValueError) as e:
        raise BitstreamError(f'{path} was written for {header["model"]} with arguments it does not take: {e}') from e
    expected = model.decoder_state_dict()
    table = {key: tuple(shape) for key, shape in header['tensors']}
    stored = table.pop('embeddings', None)
    missing = [k for k in expected if k not in table]
    unexpected = [k for k in table if k not in expected]
    mismatched = [f'{k} {table[k]} vs {tuple(v.shape)}' for k, v in expected.items()
                  if k in table and table[k] != tuple(v.shape)]
    if missing or unexpected or mismatched:
        problems = [f'{len(keys)} tensors {what} (first: {", ".join(keys[:3])})'
                    for what, keys in (('missing', missing), ('unexpected', unexpected),
                                       ('of another shape', mismatched)) if keys]
        raise BitstreamError(f'{path} does not fit {header["model"]} {header["model_args"]}: '
                             f'{"; ".join(problems)}. It was written for another model')

    tensors, offset = {}, 0
    for key, shape in header['tensors']:
        numel = int(np.prod(shape))
        symbols, t_min, scale, offset = _decode_record(payload, offset, numel, header['bits'])
        tensors[key] = (t_min + scale * torch.from_numpy(symbols).float()).reshape(shape)
    embeddings = tensors.pop('embeddings', None)
    model.load_decoder_state_dict(tensors)
    model.to(device).eval()
    if stored is None:
        with torch.no_grad():
            embeddings = model.encode(index=torch.arange(header['frames'], device=device))
    return model, embeddings.to(device)


def decode_video(path: PathLike, batch_size: int = 8, device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """The frames (T, 3, H, W) in [0, 1] a bitstream decodes to (decoded on `device`, returned on the CPU)."""
    model, embeddings = decompress(path, device=device)
    return torch.cat([frames.cpu() for frames in _decode_batches(model, embeddings, batch_size)])
