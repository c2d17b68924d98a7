"""Video decoding speed: frames per second of HNeRV at each size, and of the NeRV baseline at equal size.

Decoding from stored embeddings is what a neural video codec does at play time, so the timed call is
`model.decode(embeddings)`: embeddings are made once, outside the clock. For each size it times

* HNeRV, plain eager decoder (`fast_decode = False`: the straightforward NCHW path, autograd off);
* HNeRV, the zoo's default decode (channels-last layout, same frames up to float rounding);
* the NeRV baseline of the HNeRV paper at the same size (the official code's NeRV mode: 80-level frame-index
  encoding, 1x1 "FC" to an 8x16 grid, 3x3 NeRV blocks, strides 5-4-2-2), with the same decode path.

Every number of a table comes from one run, so ratios compare like with like on a shared machine.

    python benchmarks/video_decode.py --batch 1 4 --repeats 3
"""
import argparse
import datetime
import platform
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
    """Frames/s of each decode: batch / its fastest of `repeats` timings, after one warm-up each.

    The decodes take turns (round robin) so that load from other processes falls on all of them alike.
    """
    best = {name: float('inf') for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: batch[name] / t for name, t in best.items()}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', nargs='+', default=list(SIZES), choices=SIZES)
    parser.add_argument('--batch', nargs='+', type=int, default=[1, 4], help='batch sizes; the first is the reference')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f'{datetime.date.today()}, {cpu_name()}, {args.threads} threads, torch {torch.__version__}, '
          f'640x1280 frames, best of {args.repeats} (round robin), frames/s\n')
    b0 = args.batch[0]
    header = ['model', 'counted size (M)', f'HNeRV plain b{b0}', f'HNeRV zoo b{b0}', 'zoo / plain']
    header += [f'HNeRV zoo b{b}' for b in args.batch[1:]]
    header += [f'NeRV b{b}' for b in args.batch] + [f'HNeRV / NeRV b{b0}']
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '---|' * len(header))
    for size in args.sizes:
        model = timm.create_model(f'hnerv_{size}').eval()
        baseline = nerv_baseline(size)
        row = [f'hnerv_{size}', f'{model.size_params() / 1e6:.3f} (NeRV {baseline.size_params() / 1e6:.3f})']
        runs, batch = {}, {}
        for b in args.batch:
            runs[f'fast{b}'] = decode_fn(model, torch.randn(b, *model.embed_shape), fast=True)
            runs[f'nerv{b}'] = decode_fn(baseline, baseline.encode(index=torch.arange(b)), fast=True)
            batch[f'fast{b}'] = batch[f'nerv{b}'] = b
        runs['plain'], batch['plain'] = decode_fn(model, torch.randn(b0, *model.embed_shape), fast=False), b0
        fps = frames_per_second(runs, batch, args.repeats)
        plain = fps['plain']
        fast = {b: fps[f'fast{b}'] for b in args.batch}
        nerv = {b: fps[f'nerv{b}'] for b in args.batch}
        row += [f'{plain:.2f}', f'{fast[b0]:.2f}', f'{fast[b0] / plain:.2f}x']
        row += [f'{fast[b]:.2f}' for b in args.batch[1:]]
        row += [f'{nerv[b]:.2f}' for b in args.batch] + [f'{fast[b0] / nerv[b0]:.2f}x']
        print('| ' + ' | '.join(row) + ' |', flush=True)


if __name__ == '__main__':
    main()
