"""The zoo's video bitstream: a fitted HNeRV / NeRV / NeRV++ model (and HNeRV's frame embeddings) as one file.

`compress` writes it, `decompress` rebuilds the model from it, `decode_video` gives its frames. The pipeline is
the HNeRV paper's (§4.4): global magnitude pruning of the decoder weights, b-bit quantisation of every decoder
tensor and of the frame embeddings, entropy coding. The quantiser is HNeRV's per-tensor one: 2^b - 1 levels
between the tensor's min and max. HNeRV keeps min and scale as fp16, which clamps values near the top of the
range once b > 8 (fp16 has an 11-bit significand), so the zoo keeps them as fp32: 8 bytes a tensor. (The
official code also tries per-axis min/scale and keeps whichever errs least; per-tensor alone is the layout of
the authors' quantized release.) Quantised symbols are range-coded with `constriction` under a per-tensor
categorical model whose table travels in the file; a tensor for which the table costs more than it saves is
stored raw.
"""
import functools
import json
import math
import re
import struct
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import timm
import torch
import torch.nn as nn

from zoo._io import check_output_dir, write_atomically
from zoo.errors import BitstreamError, CheckpointError, InputError
from zoo.registry import registry_name
from zoo.tasks.video import has_ms_ssim, ms_ssim, psnr

__all__ = [
    'compress', 'decompress', 'decode_video', 'BitstreamError', 'check_video_model', 'check_bitstream_path',
]

PathLike = Union[str, Path]


# Bitstream
#
#   magic 'ZVID' | version u16 | header length u32 | header JSON | payload | CRC-32 of all that precedes it
#
# The header names the model and its args and lists the tensors (decoder state-dict entries, then the frame
# embeddings when the model stores them). The payload holds one record per tensor, in that order:
#   fp32 min | fp32 scale | coding u8 | raw: the symbols (uint8, or uint16 above 8 bits)
#                                     | categorical: word count u32, table (2^bits uint16 symbol weights),
#                                       range-coded words (uint32)
#
# A bitstream is data from anywhere, and decoding one only decodes. The CRC covers the header too. The header
# is checked against a schema before anything is built: the model must be a zoo video model, its arguments
# come from an allow-list of architecture arguments (none loads weights, fetches or names a file), and every
# count and size is bounded. The model is then built on the meta device, which allocates nothing, to check the
# tensor table and the memory and work of decoding against the limits, and the payload's records are measured
# against the table. Only then is anything allocated or decoded. `compress` checks the header it writes with
# the same code, so the limits are the encoder's too: whatever it writes decodes.


MAGIC, VERSION = b'ZVID', 2
_PREFIX = struct.Struct('<4sHI')
_RECORD = struct.Struct('<ffB')
_TABLE = struct.Struct('<I')
RAW, CATEGORICAL = 0, 1

# Limits, each far above what the papers' largest recipe writes (UVG: HNeRV-3M, 600 frames of 960x1920).
MAX_HEADER_BYTES = 1 << 20       # the encoder's headers take a few KB: one short entry per tensor
MAX_TENSORS = 1024               # NeRV++-L has 86
MAX_TENSOR_DIMS = 4              # conv weights, and the frame embeddings (T, C, h, w)
MAX_MODEL_VALUES = 1 << 27       # values in the tensor table, and in the rebuilt model: ten times NeRV-L's 12.6M
MAX_FRAMES = 100_000             # over an hour at 25 fps; the recipes fit 132 to 600 frames
MAX_FRAME_SIDE = 8192            # 8K UHD is 7680x4320
MAX_DECODED_VALUES = 1 << 32     # T * 3 * H * W, which decode_video returns as float32 (16 GiB); UVG: 3.3e9
MAX_FRAME_ACTIVATION = 1 << 31   # the largest tensor made decoding one frame; NeRV++-L at 720x1280: 9.8e7
MAX_DECODE_MACS = 1 << 50        # multiply-accumulates to decode every frame (1.1e15); UVG: 7.2e13
MIN_BITS_PER_PIXEL = 0.003       # payload bits per decoded pixel, so that a small file cannot claim a long video;
                                 # the lowest rates in the papers' rate-distortion curves are about 0.01
MAX_WIDTH, MAX_STAGES, MAX_DEPTH, MAX_STRIDE, MAX_PE_LEVELS = 4096, 8, 16, 64, 256
MAX_BITSTREAM_BYTES = _PREFIX.size + MAX_HEADER_BYTES + MAX_TENSORS * _RECORD.size + 2 * MAX_MODEL_VALUES + 4
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class _Arg(NamedTuple):
    """An allowed value: an integer, a number (integer or float) or a bool, or a name among `choices`; numbers
    within `low`..`high`. `length` (min, max) makes it a list of such values, `items` a list of exactly these
    values; `optional` admits null."""
    kind: str
    low: float = 0
    high: float = 0
    length: Optional[Tuple[int, int]] = None
    items: Tuple['_Arg', ...] = ()
    choices: Tuple[str, ...] = ()
    optional: bool = False

    def fits(self, value) -> bool:
        if value is None:
            return self.optional
        if self.items:
            return isinstance(value, list) and len(value) == len(self.items) and all(
                item.fits(v) for item, v in zip(self.items, value))
        if self.length:
            return isinstance(value, list) and self.length[0] <= len(value) <= self.length[1] and all(
                self._fits_one(v) for v in value)
        return self._fits_one(value)

    def _fits_one(self, value) -> bool:
        if self.kind == 'bool':
            return isinstance(value, bool)
        if self.kind == 'name':
            return isinstance(value, str) and value in self.choices
        if isinstance(value, bool) or not isinstance(value, int if self.kind == 'int' else (int, float)):
            return False
        return self.low <= value <= self.high  # NaN and infinities fail here

    def describe(self) -> str:
        if self.items:
            text = f'[{", ".join(item.describe() for item in self.items)}]'
        elif self.kind == 'bool':
            text = 'true or false'
        elif self.kind == 'name':
            text = f'one of {", ".join(self.choices)}'
        else:
            text = f'an integer in {self.low}..{self.high}' if self.kind == 'int' else \
                f'a number in {self.low:g}..{self.high:g}'
        if self.length:
            low, high = self.length
            text = f'a list of {low if low == high else f"{low} to {high}"} values, each {text}'
        return text + (' or null' if self.optional else '')


# The architecture arguments a bitstream may give a video model; nothing else reaches the constructor.
_SHARED_ARGS = {
    'frame_size': _Arg('int', 1, MAX_FRAME_SIDE, length=(2, 2)),
    'num_frames': _Arg('int', 1, MAX_FRAMES),
    'fc_dim': _Arg('int', 1, MAX_WIDTH),
    'lower_width': _Arg('int', 1, MAX_WIDTH),
    'act_layer': _Arg('name', choices=('gelu', 'relu', 'silu')),
    'out_act': _Arg('name', choices=('tanh', 'sigmoid')),
    'num_classes': _Arg('int', 0, 0),  # timm records it; a video model has no classifier
}
_HNERV_ARGS = dict(
    _SHARED_ARGS,
    model_size=_Arg('number', 1e-3, MAX_MODEL_VALUES / 1e6),
    fc_dim=_Arg('int', 1, MAX_WIDTH, optional=True),
    enc_strides=_Arg('int', 1, MAX_STRIDE, length=(0, MAX_STAGES)),
    dec_strides=_Arg('int', 1, MAX_STRIDE, length=(1, MAX_STAGES), optional=True),
    enc_dim=_Arg('int', 1, MAX_WIDTH),
    embed_dim=_Arg('int', 1, MAX_WIDTH),
    enc_depth=_Arg('int', 1, MAX_DEPTH),
    dec_depth=_Arg('int', 1, MAX_DEPTH),
    kernel_sizes=_Arg('int', 1, 2 * MAX_DEPTH + 1, length=(2, 2)),
    reduce=_Arg('number', 0.1, MAX_STRIDE),
    pe=_Arg('pe', items=(_Arg('number', 1e-3, 4), _Arg('int', 1, MAX_PE_LEVELS)), optional=True),
    fc_hw=_Arg('int', 1, MAX_FRAME_SIDE, length=(2, 2), optional=True),
)
_NERV_ARGS = dict(
    _SHARED_ARGS,
    strides=_Arg('int', 1, MAX_STRIDE, length=(1, MAX_STAGES)),
    pe_base=_Arg('number', 1e-3, 4),
    pe_levels=_Arg('int', 1, MAX_PE_LEVELS),
    stem_dim=_Arg('int', 1, MAX_WIDTH),
    stem_depth=_Arg('int', 1, MAX_DEPTH),
    expansion=_Arg('number', 0.1, MAX_STRIDE),
    reduction=_Arg('int', 1, MAX_STRIDE),
    multi_head=_Arg('bool'),
)
_VIDEO_FAMILIES = {'zoo.models.hnerv': _HNERV_ARGS, 'zoo.models.nerv': _NERV_ARGS, 'zoo.models.nervpp': _NERV_ARGS}
_HEADER_NUMBERS = {
    'bits': _Arg('int', 1, 16),
    'prune': _Arg('number', 0, 1),
    'frames': _Arg('int', 1, MAX_FRAMES),
    'payload_bytes': _Arg('int', 0, MAX_BITSTREAM_BYTES),
}
_HEADER_FIELDS = {'model', 'model_args', 'tensors', *_HEADER_NUMBERS}


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + '...'


def _video_model_args(name, where: str, error=InputError) -> Dict[str, _Arg]:
    """The allowed arguments of zoo video model `name` (an architecture, no tag), or `error`."""
    if isinstance(name, str) and re.fullmatch(r'[a-z0-9_]+', name) and timm.is_model(name):
        family = _VIDEO_FAMILIES.get(timm.models.model_entrypoint(name).__module__)
        if family is not None:
            return family
    raise error(f'{where}: model {_shown(name)} is not a zoo video model; bitstreams hold hnerv_*, nerv_* and nervpp_* '
                'models (`zoo list "*nerv*"`)')


def check_video_model(model) -> str:
    """The architecture of `model` (a model or a name, with or without a tag) if it is a zoo video model, which
    `compress` takes; else an InputError."""
    name = model if isinstance(model, str) else getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
    name = timm.models.split_model_name_tag(registry_name(name))[0]
    _video_model_args(name, 'compress takes a video model', InputError)
    return name


def _check_header(header, where: str, error=BitstreamError) -> None:
    """Check a header against the schema: the fields, the model, its arguments (allow-list), every bound."""
    if not isinstance(header, dict):
        raise error(f'{where} is corrupt: its header is {type(header).__name__}, not a JSON object')
    missing, unknown = sorted(_HEADER_FIELDS - header.keys()), sorted(header.keys() - _HEADER_FIELDS)
    if missing or unknown:
        raise error(f'{where} is corrupt: its header ' + '; '.join(
            f'{what} {", ".join(map(repr, keys))}' for what, keys in (('lacks', missing), ('has unknown fields', unknown))
            if keys))
    allowed, args = _video_model_args(header['model'], where, error), header['model_args']
    if not isinstance(args, dict):
        raise error(f'{where}: model_args must be a JSON object; got {_shown(args)}')
    for key, value in args.items():
        if key not in allowed:
            raise error(f'{where}: model argument {_shown(key)} is not allowed in a bitstream; {header["model"]} takes '
                        f'{", ".join(sorted(allowed))}')
        if not allowed[key].fits(value):
            raise error(f'{where}: model_args.{key} must be {allowed[key].describe()}; got {_shown(value)}')
    for key in ('frame_size', 'num_frames'):
        if key not in args:
            raise error(f'{where}: model_args lacks {key!r}, which the encoder always records')
    for key, spec in _HEADER_NUMBERS.items():
        if not spec.fits(header[key]):
            raise error(f'{where}: {key} must be {spec.describe()}; got {_shown(header[key])}')
    tensors = header['tensors']
    if not isinstance(tensors, list) or not 1 <= len(tensors) <= MAX_TENSORS:
        raise error(f'{where}: tensors must be a list of 1 to {MAX_TENSORS} [name, shape] entries (MAX_TENSORS); '
                    f'got {_shown(tensors) if not isinstance(tensors, list) else f"{len(tensors)} entries"}')
    names, values = set(), 0
    shape_spec = _Arg('int', 1, MAX_MODEL_VALUES, length=(0, MAX_TENSOR_DIMS))
    for entry in tensors:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and 1 <= len(entry[0]) <= 256 and shape_spec.fits(entry[1])):
            raise error(f'{where}: every tensor entry must be [name, shape], shape {shape_spec.describe()}; '
                        f'got {_shown(entry)}')
        if entry[0] in names:
            raise error(f'{where} is corrupt: tensor {entry[0]!r} is listed twice')
        names.add(entry[0])
        values += math.prod(entry[1])
        if values > MAX_MODEL_VALUES:
            raise error(f'{where}: its tensors hold more than {MAX_MODEL_VALUES} values (MAX_MODEL_VALUES)')
    height, width = args['frame_size']
    decoded = header['frames'] * 3 * height * width
    if decoded > MAX_DECODED_VALUES:
        raise error(f'{where}: {header["frames"]} frames of {height}x{width} decode to {decoded} values, above the '
                    f'limit of {MAX_DECODED_VALUES} (MAX_DECODED_VALUES, 16 GiB as float32)')
    rate = 8 * header['payload_bytes'] / (header['frames'] * height * width)
    if rate < MIN_BITS_PER_PIXEL:
        raise error(f'{where}: {header["payload_bytes"]} payload bytes cannot hold {header["frames"]} frames of '
                    f'{height}x{width}: {rate:.2g} bits per pixel, below the floor of {MIN_BITS_PER_PIXEL} '
                    '(MIN_BITS_PER_PIXEL)')


class _Plan(NamedTuple):
    """What building and running a model on the meta device tells about decoding with it."""
    values: int                      # parameters and buffers
    model: nn.Module                 # the model itself, on the meta device: its decoder takes the tensor table
    embed_shape: Optional[Tuple[int, ...]]  # one frame's stored embedding (None: frame-index models)
    num_frames: int
    frame_shape: Tuple[int, ...]     # what decoding one frame gives
    largest: int                     # values of the largest tensor decoding one frame makes
    macs: int                        # multiply-accumulates of its convolutions and linear layers for one frame


@functools.lru_cache(maxsize=64)
def _plan(name: str, args_json: str) -> Union[_Plan, str]:
    """Build `name` with the (checked) arguments on the meta device, where nothing is allocated, and decode one
    frame there (the plain path: the largest activations, the model's own MACs); a message if either fails."""
    args, largest, macs = json.loads(args_json), [0], [0]

    def track(module, inputs, output):
        for tensor in output if isinstance(output, (list, tuple)) else (output,):
            if isinstance(tensor, torch.Tensor):
                largest[0] = max(largest[0], tensor.numel())
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            macs[0] += output.numel() * module.weight[0].numel()

    try:
        with torch.device('meta'):
            model = timm.create_model(name, pretrained=False, **args).eval()
        values = sum(v.numel() for v in model.state_dict().values())
        if values > MAX_MODEL_VALUES:
            return f'{name} built with {_shown(args)} holds {values} values, above the limit of {MAX_MODEL_VALUES} ' \
                   '(MAX_MODEL_VALUES)'
        model.fast_decode = False
        with torch.no_grad(), nn.modules.module.register_module_forward_hook(track):
            if model.input_kind == 'index':
                embedding = model.encode(index=torch.zeros(1, dtype=torch.long, device='meta'))
            else:
                embedding = torch.empty(1, *model.embed_shape, device='meta')
            frame = model.decode(embedding)
    except (ValueError, TypeError, LookupError, ArithmeticError, RuntimeError) as e:
        return f'{name} cannot be built and run with {_shown(args)}: {e}'
    return _Plan(values, model, tuple(model.embed_shape) if model.stored_embeddings else None, model.num_frames, tuple(frame.shape),
                 largest[0], macs[0])


def _check_model(header, where: str, error=BitstreamError) -> None:
    """Check the header against its model as built on the meta device: the tensor table, the frame count, the
    frame it decodes, and the memory and work of decoding."""
    name, args, frames = header['model'], header['model_args'], header['frames']
    plan = _plan(name, json.dumps(args, sort_keys=True))
    if isinstance(plan, str):
        raise error(f'{where}: {plan}')
    height, width = args['frame_size']
    if plan.frame_shape != (1, 3, height, width):
        raise error(f'{where}: {name} with these arguments decodes {plan.frame_shape[-2:]} frames, not the '
                    f'{height}x{width} of its frame_size')
    if plan.largest > MAX_FRAME_ACTIVATION:
        raise error(f'{where}: decoding one frame makes a tensor of {plan.largest} values, above the limit of '
                    f'{MAX_FRAME_ACTIVATION} (MAX_FRAME_ACTIVATION)')
    if frames * plan.macs > MAX_DECODE_MACS:
        raise error(f'{where}: decoding {frames} frames takes {frames * plan.macs:.3g} multiply-accumulates, above '
                    f'the limit of {MAX_DECODE_MACS:.3g} (MAX_DECODE_MACS)')
    table = {key: torch.empty(shape, device='meta') for key, shape in header['tensors']}
    if plan.embed_shape is not None:
        expected, embeddings = (frames, *plan.embed_shape), table.pop('embeddings', None)
        if embeddings is None or tuple(embeddings.shape) != expected:
            found = 'none' if embeddings is None else tuple(embeddings.shape)
            raise error(f'{where} does not fit {name} {_shown(args)}: its frame embeddings are {found}, not '
                        f'{expected}. It was written for another model')
    elif frames != plan.num_frames:
        raise error(f'{where}: it declares {frames} frames, but its {name} represents num_frames={plan.num_frames}')
    try:  # the decoder's own strict load, on the meta device: the one diagnosis of what does not fit
        plan.model.load_decoder_state_dict(table)
    except (CheckpointError, ValueError) as e:
        raise error(f'{where}: {e}') from None


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
    import constriction  # optional extra: video

    return constriction.stream.model.Categorical(table.astype(np.float64), perfect=False)


def _encode_symbols(symbols: np.ndarray, bits: int) -> Tuple[int, bytes]:
    """The cheaper of a range-coded record (with its table) and the raw symbols."""
    import constriction  # optional extra: video

    raw = symbols.astype(np.uint8 if bits <= 8 else '<u2').tobytes()
    counts = np.bincount(symbols, minlength=2 ** bits)
    table = np.where(counts > 0, np.maximum(1, np.round(counts * 65535 / counts.max())), 0).astype('<u2')
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(symbols, _categorical(table))
    words = encoder.get_compressed().astype('<u4')
    coded = _TABLE.pack(len(words)) + table.tobytes() + words.tobytes()
    return (CATEGORICAL, coded) if len(coded) < len(raw) else (RAW, raw)


class _Record(NamedTuple):
    key: str
    shape: Tuple[int, ...]
    t_min: float
    scale: float
    coding: int
    start: int  # where the symbols (raw) or the word count (categorical) begin in the payload


def _records(payload: memoryview, header: dict, where: str) -> List[_Record]:
    """Where each tensor's record lies in the payload, checked against the tensor table before anything is
    decoded: every record whole, a finite range, a known coding, a coded record smaller than the raw symbols
    (the encoder writes it only then), and nothing after the last one."""
    bits = header['bits']
    levels, itemsize, table_bytes = 2 ** bits - 1, 1 if bits <= 8 else 2, 2 * 2 ** bits
    records, offset = [], 0
    for key, shape in header['tensors']:
        if offset + _RECORD.size > len(payload):
            raise BitstreamError(f'{where} is corrupt: its payload ends before the record of {key}')
        t_min, scale, coding = _RECORD.unpack_from(payload, offset)
        start = offset + _RECORD.size
        raw_end = start + math.prod(shape) * itemsize
        if not (math.isfinite(t_min) and math.isfinite(scale) and scale >= 0
                and abs(t_min) + scale * levels <= _FLOAT32_MAX):
            raise BitstreamError(f'{where} is corrupt: tensor {key} has the range min {t_min}, scale {scale}')
        if coding == RAW:
            end = raw_end
        elif coding == CATEGORICAL and start + _TABLE.size <= len(payload):
            (num_words,) = _TABLE.unpack_from(payload, start)
            end = start + _TABLE.size + table_bytes + 4 * num_words
            if num_words == 0 or end >= raw_end:
                raise BitstreamError(f'{where} is corrupt: the coded record of {key} declares {num_words} words, '
                                     'which the encoder never writes')
        else:
            raise BitstreamError(f'{where} is corrupt: the record of {key} has coding {coding}, not raw ({RAW}) or '
                                 f'categorical ({CATEGORICAL}), or ends early')
        if end > len(payload):
            raise BitstreamError(f'{where} is corrupt: the record of {key} runs past the end of the payload')
        records.append(_Record(key, tuple(shape), t_min, scale, coding, start))
        offset = end
    if offset != len(payload):
        raise BitstreamError(f'{where} is corrupt: {len(payload) - offset} payload bytes follow the last tensor')
    return records


def _decode_record(payload: memoryview, record: _Record, bits: int, where: str) -> torch.Tensor:
    """The dequantised tensor of a record that `_records` checked."""
    import constriction  # optional extra: video

    numel, levels = math.prod(record.shape), 2 ** bits - 1
    if record.coding == RAW:
        symbols = np.frombuffer(payload, dtype=np.uint8 if bits <= 8 else '<u2', count=numel, offset=record.start)
    else:
        (num_words,) = _TABLE.unpack_from(payload, record.start)
        table = np.frombuffer(payload, dtype='<u2', count=2 ** bits, offset=record.start + _TABLE.size)
        words = np.frombuffer(payload, dtype='<u4', count=num_words, offset=record.start + _TABLE.size + 2 * 2 ** bits)
        if not table.any():
            raise BitstreamError(f'{where} is corrupt: the symbol table of {record.key} is empty')
        try:
            symbols = constriction.stream.queue.RangeDecoder(words.astype(np.uint32)).decode(_categorical(table), numel)
        except (ValueError, RuntimeError, AssertionError) as e:
            raise BitstreamError(f'{where} is corrupt: the coded symbols of {record.key} cannot be decoded ({e})') from e
    if numel and int(symbols.max()) > levels:
        raise BitstreamError(f'{where} is corrupt: tensor {record.key} has symbols above {levels}, the top of {bits} bits')
    return (record.t_min + record.scale * torch.from_numpy(symbols.astype(np.int64)).float()).reshape(record.shape)


def _model_args(model) -> Dict[str, object]:
    """The timm factory kwargs that rebuild `model`, checked to give the same decoder tensors."""
    name = model.pretrained_cfg['architecture']
    args = dict(timm.models.get_model_args(model), frame_size=list(model.frame_size), num_frames=model.num_frames)
    args.pop('stored_frames', None)  # a release's own embeddings: a bitstream carries them as its own section
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


def check_bitstream_path(path: PathLike) -> Path:
    """Refuse, before any work, a bitstream path that cannot be written: a folder, or a path under a file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f'{path} is a folder: give the bitstream file to write, e.g. {path / "video.zvid"}')
    check_output_dir(path.parent)
    return path


def compress(model, path: PathLike, frames: Optional[torch.Tensor] = None, prune: float = 0.1, bits: int = 8,
             embeddings: Optional[torch.Tensor] = None, batch_size: int = 8) -> Dict[str, object]:
    """Write `model` (and, for HNeRV, the frame embeddings) as a bitstream at `path`; measure it.

    HNeRV's embeddings are `embeddings` when given, else `model.frame_embeddings` when the model carries them
    (the official Bunny release, whose encoder was not published), else the encoder's embeddings of `frames`.

    The model itself is left untouched: pruning (fraction `prune` of the decoder weights, by global magnitude;
    fine-tune after pruning for the paper's numbers) and quantisation work on a copy. Returns `prune` and
    `bits`, the file size in bytes (total and per section), bits per pixel (file bits / (T * H * W)), and, when
    `frames` are given, the per-frame-mean PSNR and MS-SSIM of the video decoded from the written file (MS-SSIM
    is None for frames too small for it: `has_ms_ssim`). A model the decoder's limits refuse (the `MAX_*`
    constants) is refused here, before writing.
    """
    path = check_bitstream_path(path)
    name = check_video_model(model)
    if not 1 <= bits <= 16:
        raise ValueError(f'bits must be in 1..16; got {bits}')
    if not 0 <= prune < 1:
        raise ValueError(f'prune is the fraction of decoder weights set to zero, in [0, 1); got {prune}')
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
    header = {
        'model': name,
        'model_args': model_args,
        'bits': bits,
        'prune': prune,
        'frames': num_frames,
        'tensors': [[key, list(tensor.shape)] for key, tensor in tensors.items()],
    }
    payload, sizes = bytearray(), {'decoder_bytes': 0, 'embedding_bytes': 0}
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise InputError(f'{name}: tensor {key} holds NaN or infinite values, which cannot be quantised')
        symbols, t_min, scale = _quantize(tensor, bits)
        coding, data = _encode_symbols(symbols, bits)
        record = _RECORD.pack(t_min, scale, coding) + data
        sizes['embedding_bytes' if key == 'embeddings' else 'decoder_bytes'] += len(record)
        payload += record
    header['payload_bytes'] = len(payload)
    where = f'a bitstream of this {name}'
    _check_header(header, where, InputError)
    _check_model(header, where, InputError)
    header = json.dumps(header, separators=(',', ':')).encode()
    blob = _PREFIX.pack(MAGIC, VERSION, len(header)) + header + payload
    blob += struct.pack('<I', zlib.crc32(blob))
    write_atomically(path, lambda f: f.write(blob))

    result = {
        'path': str(path), 'model': name, 'frames': num_frames, 'frame_size': (height, width), 'prune': prune,
        'bits': bits, 'bytes': len(blob), 'header_bytes': _PREFIX.size + len(header) + 4, **sizes,
        'bpp': len(blob) * 8 / (num_frames * height * width), 'psnr': None, 'ms_ssim': None,
    }
    if frames is not None:
        decoded_model, embeddings = decompress(path, device=next(model.parameters()).device)
        scores, structure = [], []
        for i, decoded in enumerate(_decode_batches(decoded_model, embeddings, batch_size)):
            decoded, target = decoded.cpu(), frames[i * batch_size:i * batch_size + len(decoded)].float().cpu()
            scores.append(psnr(decoded, target))
            if has_ms_ssim(target):
                structure.append(ms_ssim(decoded, target))
        result['psnr'] = torch.cat(scores).mean().item()
        result['ms_ssim'] = torch.cat(structure).mean().item() if structure else None
    return result


def _no_constant(name: str):
    raise ValueError(f'{name} is not a number a bitstream holds')


def _read_bitstream(path: Path) -> Tuple[dict, memoryview]:
    """Header and payload of a bitstream, after checking its size, magic, version, length, checksum and header."""
    try:
        if path.is_dir():
            raise BitstreamError(f'{path} is a folder, not a bitstream')
        size = path.stat().st_size
        if size > MAX_BITSTREAM_BYTES:
            raise BitstreamError(f'{path} is {size} bytes, above the {MAX_BITSTREAM_BYTES} bytes a bitstream can take '
                                 '(MAX_BITSTREAM_BYTES): it is not a zoo video bitstream')
        with open(path, 'rb') as f:
            data = f.read(MAX_BITSTREAM_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f'no bitstream at {path}') from None
    except OSError as e:
        raise BitstreamError(f'cannot read {path}: {e.strerror or e}') from e
    if len(data) < _PREFIX.size + 4:
        raise BitstreamError(f'{path} is truncated: {len(data)} bytes, shorter than any zoo video bitstream')
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise BitstreamError(f'{path} is not a zoo video bitstream (it starts with {magic!r}, not {MAGIC!r})')
    if version != VERSION:
        raise BitstreamError(f'{path} is bitstream format version {version}; this zoo reads version {VERSION}')
    if header_len > MAX_HEADER_BYTES:
        raise BitstreamError(f'{path} is corrupt: it declares a header of {header_len} bytes, above the limit of '
                             f'{MAX_HEADER_BYTES} (MAX_HEADER_BYTES)')
    end_of_header = _PREFIX.size + header_len
    if len(data) < end_of_header + 4:
        raise BitstreamError(f'{path} is truncated: {len(data)} bytes, its header alone needs {end_of_header}')
    try:
        header, problem = json.loads(data[_PREFIX.size:end_of_header], parse_constant=_no_constant), None
    except (ValueError, RecursionError) as e:
        header, problem = None, str(e)
    declared = header.get('payload_bytes') if isinstance(header, dict) else None
    if _HEADER_NUMBERS['payload_bytes'].fits(declared):
        expected = end_of_header + declared + 4
        if len(data) < expected:
            raise BitstreamError(f'{path} is truncated: {len(data)} bytes of the {expected} its header declares')
        if len(data) > expected:
            raise BitstreamError(f'{path} is corrupt: {len(data) - expected} bytes follow the end of the bitstream')
    (stored,) = struct.unpack_from('<I', data, len(data) - 4)
    if zlib.crc32(memoryview(data)[:-4]) != stored:
        raise BitstreamError(f'{path} is corrupt: checksum mismatch (the file changed after it was written)')
    if problem is not None:
        raise BitstreamError(f'{path} is corrupt: its header cannot be read ({problem})')
    _check_header(header, str(path))
    return header, memoryview(data)[end_of_header:-4]


def decompress(path: PathLike, device: Union[str, torch.device] = 'cpu'):
    """Rebuild the model a bitstream was made from (with timm) and return `(model, embeddings)`, in eval mode.

    The model carries the dequantised decoder; HNeRV's encoder is not in the bitstream and keeps its initial
    weights. `embeddings` are the stored ones (HNeRV) or the model's encoding of every frame index (NeRV).
    Anything malformed raises a BitstreamError before anything is allocated (see the checks above).
    """
    path = Path(path)
    header, payload = _read_bitstream(path)
    _check_model(header, str(path))
    records = _records(payload, header, str(path))
    tensors = {record.key: _decode_record(payload, record, header['bits'], str(path)) for record in records}
    embeddings = tensors.pop('embeddings', None)
    model = timm.create_model(header['model'], pretrained=False, **header['model_args'])
    model.load_decoder_state_dict(tensors)
    model.to(device).eval()
    if embeddings is None:
        with torch.no_grad():
            embeddings = model.encode(index=torch.arange(header['frames'], device=device))
    return model, embeddings.to(device)


def decode_video(path: PathLike, batch_size: int = 8, device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """The frames (T, 3, H, W) in [0, 1] a bitstream decodes to (decoded on `device`, returned on the CPU)."""
    model, embeddings = decompress(path, device=device)
    return torch.cat([frames.cpu() for frames in _decode_batches(model, embeddings, batch_size)])
