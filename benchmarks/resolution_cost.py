"""How the cost of UniRepLKNet-A, ConViT-Ti and HaloNet-H0 grows with the input resolution: GMACs (counted on
the meta device) and CPU latency at batch 1 (the models timed round-robin at each size, medians), as a table
and a plot.

UniRepLKNet runs in its deploy form. ConViT is built for each size (its position embedding has the image's
grid). HaloNet needs multiples of 256 px (its 8x8 attention blocks at stride 32), so it has fewer points.

    python benchmarks/resolution_cost.py --out docs/cost_vs_resolution.png
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402
from zoo.bench import interleaved_latencies  # noqa: E402
from zoo.cards import count_gmacs  # noqa: E402

MODELS = {
    'UniRepLKNet-A (deploy)': ('unireplknet_a', lambda s: dict(deploy=True), lambda s: True),
    'ConViT-Ti': ('convit_tiny', lambda s: dict(img_size=s), lambda s: True),
    'HaloNet-H0': ('halonet_h0', lambda s: {}, lambda s: s % 256 == 0),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=int, nargs='+', default=[128, 192, 256, 320, 384, 448, 512])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--clock', choices=['wall', 'cpu'], default='wall')
    parser.add_argument('--out', type=Path, default=Path('docs/cost_vs_resolution.png'))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    print(f'# {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, batch 1, float32, medians of {args.repeats} rounds of {args.clock} time; '
          f'load average before: {os.getloadavg()}')
    gmacs = {label: {} for label in MODELS}
    latency_ms = {label: {} for label in MODELS}
    for size in args.sizes:
        models = {}
        for label, (name, kwargs, fits) in MODELS.items():
            if fits(size):
                models[label] = zoo.create_model(name, **kwargs(size)).eval()
                gmacs[label][size] = count_gmacs(models[label], (3, size, size))
        x = torch.randn(1, 3, size, size)
        with torch.inference_mode():
            times = interleaved_latencies(
                {label: (lambda m=m: m(x)) for label, m in models.items()}, repeats=args.repeats, clock=clock)
        for label, t in times.items():
            latency_ms[label][size] = statistics.median(t) * 1e3
    print(f'# load average after: {os.getloadavg()}')

    print('\n| model | ' + ' | '.join(f'{s} px' for s in args.sizes) + ' |')
    print('|---|' + '---:|' * len(args.sizes))
    for label in MODELS:
        cells = [f'{gmacs[label][s]:.2f} G / {latency_ms[label][s]:.0f} ms' if s in gmacs[label] else '-'
                 for s in args.sizes]
        print(f'| {label} | ' + ' | '.join(cells) + ' |')

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_macs, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for label in MODELS:
        sizes = sorted(gmacs[label])
        ax_macs.plot(sizes, [gmacs[label][s] for s in sizes], 'o-', label=label)
        ax_time.plot(sizes, [latency_ms[label][s] for s in sizes], 'o-', label=label)
    ax_macs.set(xlabel='input resolution (px)', ylabel='GMACs per image', title='Compute', yscale='log')
    ax_time.set(xlabel='input resolution (px)', ylabel='ms per image',
                title=f'CPU latency, batch 1, {torch.get_num_threads()} thread(s)', yscale='log')
    for ax in (ax_macs, ax_time):
        ax.grid(True, which='both', alpha=0.3)
        ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix('.tmp.png')
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, args.out)
    print(f'\nwrote {args.out}')


if __name__ == '__main__':
    main()
