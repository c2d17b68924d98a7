"""Fuzz the bitstream decoder: seeded mutations of real bitstreams, every one decoded as `zoo decode` does.

Seeds are bitstreams the encoder writes for tiny HNeRV, NeRV and NeRV++ models (8 and 12 bits, raw and
range-coded records). Each case mutates one of them: a header field (the model, a model argument, an argument
off the allow-list such as `pretrained` or `checkpoint_path`, frames, bits, the tensor table, payload_bytes),
a payload record field (min, scale, coding, word count), flipped bits, a truncation, inserted or deleted bytes,
or a splice of two bitstreams. Most mutations get a valid CRC, so they reach the header schema and the payload
walk; the rest test the checksum. Every case runs what `zoo decode CASE OUT` runs, with sockets
blocked, over an existing output folder, in a folder that is also TORCH_HOME and HF_HOME. A case passes when
it ends in a decoded video (written over OUT) or in a one-line BitstreamError (what `zoo decode` prints, exit 7)
with OUT untouched, opens no socket, and writes nothing else anywhere in that folder. Anything else is counted
by its kind and printed.

    python benchmarks/bitstream_fuzz.py --cases 10000 --seed 0
"""
import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import os
import platform
import random
import socket
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import timm
import torch

from zoo import codec
from zoo.tasks import video

_NERV = dict(frame_size=[64, 96], num_frames=4, strides=[4, 2, 2], pe_levels=8, stem_dim=32, fc_dim=16, lower_width=8)
SEED_MODELS = {
    'hnerv_0_35m': dict(frame_size=[64, 96], num_frames=4, enc_strides=[4, 2, 2], fc_dim=16),
    'nerv_s': _NERV,
    'nervpp_xs': _NERV,
}
# Values a mutated field takes: boundaries, wrong types, paths and URLs.
VALUES = [
    0, -1, -5, 1, 2, 3, 7, 9, 16, 17, 64, 255, 4096, 50_000, 65_536, 100_000_000, 2 ** 31, 2 ** 63, 10 ** 30,
    0.5, 1.5, -1e-9, 1e308, float('inf'), float('nan'), True, False, None, '', 'x', 'gelu', 'tanh', '/etc/passwd',
    'http://127.0.0.1:9/weights.pth', [], [1], [1, 2], [64, 96], [-64, 96], [0, 0], [4, 2, 2], [[1]], {}, {'a': 1},
    'resnet18', 'hnerv_1_5m.bunny',
]
# Arguments off the allow-list: each would load weights, fetch, read a file or change the model.
FORBIDDEN_ARGS = {
    'pretrained': True,
    'checkpoint_path': '/etc/passwd',
    'pretrained_cfg_overlay': {'url': 'http://127.0.0.1:9/nyu_swintiny.pt', 'file': '/etc/passwd'},
    'pretrained_cfg': {'url': 'http://127.0.0.1:9/x.pth', 'hf_hub_id': 'evil/repo'},
    'file': '/etc/passwd',
    'url': 'http://127.0.0.1:9/x.pth',
    'cache_dir': '/tmp',
    'features_only': True,
    'in_chans': 1,
    'stored_frames': 100_000_000,
}
MODELS = ['resnet18', 5, None, '', 'hnerv_9m', 'nerv_l', 'nervpp_s', 'hnerv_3m', 'hnerv_1_5m.bunny', 'zoo/nerv_s',
          'spartan_tiny', 'idisc_swin_tiny', '../nerv_s']
_PREFIX = struct.Struct('<4sHI')


def seed_bitstreams(folder: Path) -> List[bytes]:
    """Real bitstreams of tiny models: default weights (mostly raw records) and Laplace ones (range-coded)."""
    blobs = []
    for name, args in SEED_MODELS.items():
        for bits, laplace in ((8, False), (8, True), (12, True)):
            torch.manual_seed(bits)
            model = timm.create_model(name, **args).eval()
            if laplace:
                with torch.no_grad():
                    for v in model.decoder_state_dict().values():
                        v.copy_(torch.distributions.Laplace(0.0, 0.1).sample(v.shape))
            frames = torch.rand(4, 3, 64, 96) if model.stored_embeddings else None
            path = folder / f'{name}-{bits}-{laplace}.zvid'
            codec.compress(model, path, frames, bits=bits)
            blobs.append(path.read_bytes())
            path.unlink()
    return blobs


def split(blob: bytes) -> Tuple[dict, bytes]:
    header_len = _PREFIX.unpack_from(blob)[2]
    return json.loads(blob[_PREFIX.size:_PREFIX.size + header_len]), blob[_PREFIX.size + header_len:-4]


def join(header: dict, payload: bytes, version: int = codec.VERSION) -> bytes:
    body = json.dumps(header, separators=(',', ':')).encode()
    return with_crc(_PREFIX.pack(codec.MAGIC, version, len(body)) + body + payload)


def with_crc(body: bytes) -> bytes:
    return body + struct.pack('<I', zlib.crc32(body))


def _record_offsets(header: dict, payload: bytes) -> List[int]:
    """Where each record of a well-formed payload starts."""
    bits, offsets, offset = header['bits'], [], 0
    for _, shape in header['tensors']:
        offsets.append(offset)
        coding = payload[offset + 8]
        numel = 1
        for d in shape:
            numel *= d
        offset += 9 + (numel * (1 if bits <= 8 else 2) if coding == codec.RAW else
                       4 + 2 * 2 ** bits + 4 * struct.unpack_from('<I', payload, offset + 9)[0])
    return offsets


def mutate_header(blob: bytes, rng: random.Random) -> bytes:
    header, payload = split(blob)
    header = copy.deepcopy(header)
    op = rng.randrange(9)
    if op == 0:  # a top-level field set, removed or added
        key = rng.choice(list(header) + ['extra'])
        if rng.random() < 0.2:
            header.pop(key, None)
        else:
            header[key] = rng.choice(VALUES)
    elif op == 1:  # the model
        header['model'] = rng.choice(MODELS)
    elif op == 2:  # a model argument set to any value
        header['model_args'][rng.choice(list(header['model_args']))] = rng.choice(VALUES)
    elif op == 3:  # an argument off the allow-list
        key = rng.choice(list(FORBIDDEN_ARGS))
        header['model_args'][key] = FORBIDDEN_ARGS[key]
    elif op == 4:  # the frame count, alone or with num_frames
        header['frames'] = rng.choice([0, -5, 1, 3, 5, 50_000, 100_000_000, 2 ** 40])
        if rng.random() < 0.5:
            header['model_args']['num_frames'] = header['frames']
    elif op == 5:
        header['bits'] = rng.choice([0, 1, 2, 7, 9, 15, 16, 17, 32, 64, -1, 8.0, '8'])
    elif op == 6:  # one dimension of one tensor
        entry = rng.choice(header['tensors'])
        if entry[1]:
            i = rng.randrange(len(entry[1]))
            entry[1][i] = rng.choice([0, -1, entry[1][i] + 1, entry[1][i] * 2, 2 ** 31, 10 ** 12, 1.5, None])
        else:
            entry[1].append(rng.choice([1, 2, 0]))
    elif op == 7:  # the tensor table: an entry dropped, duplicated, renamed or broken; or the order changed
        tensors, kind = header['tensors'], rng.randrange(5)
        i = rng.randrange(len(tensors))
        if kind == 0:
            tensors.pop(i)
        elif kind == 1:
            tensors.insert(i, copy.deepcopy(tensors[i]))
        elif kind == 2:
            tensors[i][0] = rng.choice(['embeddings', 'x', '', tensors[i][0] + '.weight', 5])
        elif kind == 3:
            tensors[i] = rng.choice(VALUES)
        else:
            rng.shuffle(tensors)
    else:
        header['payload_bytes'] += rng.choice([-100, -1, 1, 100, 10 ** 9])
    result = join(header, payload)
    return result if rng.random() < 0.9 else result[:-4] + blob[-4:]  # sometimes the old CRC


def mutate_record(blob: bytes, rng: random.Random) -> bytes:
    """A field of one payload record: min, scale, coding, or a range-coded record's word count."""
    header, payload = split(blob)
    payload = bytearray(payload)
    offset = rng.choice(_record_offsets(header, bytes(payload)))
    field = rng.randrange(4)
    if field < 2:
        struct.pack_into('<f', payload, offset + 4 * field,
                         rng.choice([float('nan'), float('inf'), -float('inf'), 3e38, -3e38, -1.0, 0.0, 1e-30]))
    elif field == 2:
        payload[offset + 8] = rng.choice([0, 1, 2, 255])
    elif payload[offset + 8] == codec.CATEGORICAL:
        words = struct.unpack_from('<I', payload, offset + 9)[0]
        struct.pack_into('<I', payload, offset + 9, rng.choice([0, 1, words - 1, words + 1, 2 ** 32 - 1]) % 2 ** 32)
    else:
        payload[min(offset + 9 + rng.randrange(4), len(payload) - 1)] ^= 0xFF  # a raw symbol
    return join(header, bytes(payload))


def mutate_bytes(blob: bytes, rng: random.Random, other: bytes) -> bytes:
    """Flipped bits, random bytes, a truncation, an insertion or deletion, or a splice with another bitstream;
    half of them with the CRC made valid again."""
    data, op = bytearray(blob[:-4]), rng.randrange(6)
    if op == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == 1:
        start = rng.randrange(len(data))
        data[start:start + rng.randint(1, 16)] = bytes(rng.randrange(256) for _ in range(16))
    elif op == 2:
        del data[rng.randrange(len(data)):]
    elif op == 3:
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif op == 4:
        start = rng.randrange(len(data))
        del data[start:start + rng.randint(1, 64)]
    else:
        data = data[:rng.randrange(len(data))] + other[rng.randrange(len(other)):-4]
    return with_crc(bytes(data)) if rng.random() < 0.5 else bytes(data) + blob[-4:]


def cases(seeds: List[bytes], count: int, seed: int) -> Iterator[Tuple[str, bytes]]:
    """`count` (kind, mutated bitstream) pairs, the same for the same seed."""
    rng = random.Random(seed)
    for _ in range(count):
        blob, kind = rng.choice(seeds), rng.choice(['header', 'header', 'record', 'bytes', 'bytes'])
        if kind == 'header':
            yield kind, mutate_header(blob, rng)
        elif kind == 'record':
            yield kind, mutate_record(blob, rng)
        else:
            yield kind, mutate_bytes(blob, rng, rng.choice(seeds))


def _refuse(*args, **kwargs):
    raise ConnectionRefusedError('network access during a bitstream decode')


@contextlib.contextmanager
def network_blocked() -> Iterator[None]:
    """socket connect / create_connection / getaddrinfo raise while inside, as a sandbox without network would."""
    saved = socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo
    socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = _refuse
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo = saved


def _snapshot(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def run(seeds: List[bytes], count: int, seed: int, folder: Path,
        progress: Callable[[int], None] = lambda done: None) -> Tuple[Counter, List[str]]:
    """Decode `count` mutated bitstreams as `zoo decode CASE OUT` does, into an existing output folder; returns the
    outcome counts ('decoded', 'BitstreamError', anything else by kind) and a description of each failure."""
    out, case = folder / 'out', folder / 'case.zvid'
    video.write_frames(torch.zeros(1, 3, 8, 8), out)  # the existing output every failed decode must leave alone
    (folder / 'keep.txt').write_text('a file nothing may touch\n')
    outcomes, failures = Counter(), []
    expected = _snapshot(folder)
    for i, (kind, blob) in enumerate(cases(seeds, count, seed)):
        case.write_bytes(blob)
        expected['case.zvid'] = hashlib.sha256(blob).hexdigest()
        message = ''
        try:
            with network_blocked():
                video.check_frames_path(out)
                video.write_frames(codec.decode_video(case), out)  # what zoo decode runs
            outcome = 'decoded'
            expected = dict(_snapshot(folder), **{'case.zvid': expected['case.zvid']})
        except codec.BitstreamError as e:
            outcome, message = 'BitstreamError', str(e)
            if '\n' in message:
                outcome = 'BitstreamError of more than one line'
        except Exception as e:  # noqa: BLE001 -- what the fuzzer looks for
            outcome, message = type(e).__name__, str(e)
        if outcome in ('decoded', 'BitstreamError') and _snapshot(folder) != expected:
            outcome = 'touched an existing file'
        outcomes[outcome] += 1
        if outcome not in ('decoded', 'BitstreamError'):
            failures.append(f'case {i} ({kind}): {outcome}: {message[:300]}')
        progress(i + 1)
    return outcomes, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--cases', type=int, default=10_000)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ['TORCH_HOME'] = os.environ['HF_HOME'] = str(folder / 'cache')  # anything fetched would land here
        seeds = seed_bitstreams(folder)
        start = time.perf_counter()

        def progress(done):
            if done % 1000 == 0:
                print(f'  {done} cases, {time.perf_counter() - start:.0f} s', file=sys.stderr)

        outcomes, failures = run(seeds, args.cases, args.seed, folder, progress)
        seconds = time.perf_counter() - start
    print(f'# bitstream fuzz: {args.cases} cases, seed {args.seed}, {len(seeds)} seed bitstreams')
    print(f'# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, '
          f'torch {torch.__version__}, load average {" ".join(f"{x:.2f}" for x in os.getloadavg())}')
    print(f'time: {seconds:.1f} s ({1000 * seconds / args.cases:.1f} ms a case)')
    for outcome, n in outcomes.most_common():
        print(f'{outcome}: {n}')
    for failure in failures[:50]:
        print(failure)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
