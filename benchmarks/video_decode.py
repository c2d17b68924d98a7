"""Video decoding speed: frames per second of HNeRV at each size, of the NeRV baseline at equal size, and of NeRV++.

Decoding from stored embeddings is what a neural video codec does at play time, so the timed call is
`model.decode(embeddings)`: embeddings are made once, outside the clock. For each size it times

* HNeRV, plain eager decoder (`fast_decode = False`: the straightforward NCHW path, autograd off);
* HNeRV, the zoo's default decode (channels-last layout, same frames up to float rounding);
* the NeRV baseline of the HNeRV paper at the same size (the official code's NeRV mode: 80-level frame-index
  encoding, 1x1 "FC" to an 8x16 grid, 3x3 NeRV blocks, strides 5-4-2-2), with the same decode path;
* with `--family nervpp`: NeRV++ XS (the official README's smallest Bunny command, C1 8, built for 640x1280
  frames: 1.84M parameters), plain eager decoder against the zoo's default (NHWC matmuls, banded tail).

Every number of a table comes from one run, so ratios compare like with like on a shared machine.

    python benchmarks/video_decode.py --family hnerv nervpp --batch 1 4 --repeats 5
"""
import argparse
import datetime
import platform
import statistics
import time
from typing import Callable, Dict

import timm
import torch

from zoo.models import hnerv

SIZES = ('0_35m', '0_75m', '1_5m', '3m')
# fc_dim of the README NeRV baseline at each size (official sizing rule, 640x1280, 132 frames).
NERV_FC_DIM = {'0_35m': 15, '0_75m': 30, '1_5m': 54, '3m': 91}


def nerv_baseline(size: str) -> torch.nn.Module:
    """The HNeRV paper's NeRV baseline (README command of the official HNeRV code) at the given size."""
    return hnerv.create_from_official(
        embed='pe_1.25_80', ks='0_3_3', enc_strds=[], fc_hw='8_16', reduce=2, lower_width=12, dec_strds=[5, 4, 2, 2],
        fc_dim=NERV_FC_DIM[size]).eval()


def frames_per_second(runs: Dict[str, Callable[[], torch.Tensor]], batch: Dict[str, int], repeats: int) -> Dict[str, float]:
    """Frames/s of each decode: batch / its median of `repeats` timings, after one warm-up each.

    The decodes take turns (round robin) so that load from other processes falls on all of them alike.
    """
    times = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: batch[name] / statistics.median(t) for name, t in times.items()}


def decode_fn(model: torch.nn.Module, embeddings: torch.Tensor, fast: bool) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        model.fast_decode = fast
        return model.decode(embeddings)
    return run


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or 'unknown CPU'


def hnerv_table(args: argparse.Namespace) -> None:
    b0 = args.batch[0]
    header = ['model', 'counted size (M)']
    header += [col for b in args.batch for col in (f'HNeRV plain b{b}', f'HNeRV zoo b{b}', f'zoo / plain b{b}')]
    header += [f'NeRV b{b}' for b in args.batch] + [f'HNeRV / NeRV b{b0}']
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '---|' * len(header))
    for size in args.sizes:
        model = timm.create_model(f'hnerv_{size}').eval()
        baseline = nerv_baseline(size)
        row = [f'hnerv_{size}', f'{model.size_params() / 1e6:.3f} (NeRV {baseline.size_params() / 1e6:.3f})']
        runs, batch = {}, {}
        for b in args.batch:
            embeddings = torch.randn(b, *model.embed_shape)
            runs[f'plain{b}'] = decode_fn(model, embeddings, fast=False)
            runs[f'fast{b}'] = decode_fn(model, embeddings, fast=True)
            runs[f'nerv{b}'] = decode_fn(baseline, baseline.encode(index=torch.arange(b)), fast=True)
            batch[f'plain{b}'] = batch[f'fast{b}'] = batch[f'nerv{b}'] = b
        fps = frames_per_second(runs, batch, args.repeats)
        for b in args.batch:
            row += [f'{fps[f"plain{b}"]:.2f}', f'{fps[f"fast{b}"]:.2f}', f'{fps[f"fast{b}"] / fps[f"plain{b}"]:.2f}x']
        row += [f'{fps[f"nerv{b}"]:.2f}' for b in args.batch] + [f'{fps[f"fast{b0}"] / fps[f"nerv{b0}"]:.2f}x']
        print('| ' + ' | '.join(row) + ' |', flush=True)


def nervpp_table(args: argparse.Namespace) -> None:
    header = ['model', 'counted size (M)']
    header += [col for b in args.batch for col in (f'plain b{b}', f'zoo b{b}', f'zoo / plain b{b}')]
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '---|' * len(header))
    model = timm.create_model('nervpp_xs', frame_size=(640, 1280)).eval()
    runs, batch = {}, {}
    for b in args.batch:
        embeddings = model.encode(index=torch.arange(b))
        runs[f'plain{b}'] = decode_fn(model, embeddings, fast=False)
        runs[f'fast{b}'] = decode_fn(model, embeddings, fast=True)
        batch[f'plain{b}'] = batch[f'fast{b}'] = b
    fps = frames_per_second(runs, batch, args.repeats)
    row = ['nervpp_xs, 640x1280', f'{model.size_params() / 1e6:.3f}']
    for b in args.batch:
        row += [f'{fps[f"plain{b}"]:.2f}', f'{fps[f"fast{b}"]:.2f}', f'{fps[f"fast{b}"] / fps[f"plain{b}"]:.2f}x']
    print('| ' + ' | '.join(row) + ' |', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--family', nargs='+', default=['hnerv'], choices=('hnerv', 'nervpp'))
    parser.add_argument('--sizes', nargs='+', default=list(SIZES), choices=SIZES, help='HNeRV sizes')
    parser.add_argument('--batch', nargs='+', type=int, default=[1, 4], help='batch sizes; the first is the reference')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f'{datetime.date.today()}, {cpu_name()}, {args.threads} threads, torch {torch.__version__}, '
          f'640x1280 frames, median of {args.repeats} (round robin), frames/s\n')
    for family in args.family:
        (hnerv_table if family == 'hnerv' else nervpp_table)(args)
        print()


if __name__ == '__main__':
    main()
