"""Peak memory of one no-grad forward of HaloNet-H0 at a large input: halo attention over chunks of blocks
(what the zoo runs) vs all blocks at once (the chunk limit lifted), with SpaRTAN-tiny as the reference
convolutional network, each in a fresh process. CPU: peak RSS growth; CUDA: torch.cuda.max_memory_allocated.

    python benchmarks/halonet_memory.py --size 1024
    python benchmarks/halonet_memory.py --size 4096 --device cuda
"""
import argparse
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402
from zoo.models import halonet  # noqa: E402

CASES = {'halonet_h0 (chunks)': ('halonet_h0', False), 'halonet_h0 (all blocks)': ('halonet_h0', True),
         'spartan_tiny': ('spartan_tiny', False)}


def measure(name: str, unchunked: bool, size: int, device: str) -> float:
    """MiB of memory one forward adds at its peak."""
    if unchunked:
        halonet._INFERENCE_CHUNK_ELEMENTS = 1 << 62
    model = zoo.create_model(name).eval().to(device)
    x = torch.randn(1, 3, size, size, device=device)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        model(x)
    peak = torch.cuda.max_memory_allocated() if device == 'cuda' else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - base) / 2 ** 20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--case', choices=list(CASES), help=argparse.SUPPRESS)  # one case, in a child process
    args = parser.parse_args()
    if args.case:
        print(measure(*CASES[args.case], args.size, args.device))
        return
    results = {}
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, '--size', str(args.size), '--device', args.device,
                              '--case', case], capture_output=True, text=True)
        results[case] = float(out.stdout.split()[-1]) if out.returncode == 0 else None
        print(f'{case:>24}: ' + (f'{results[case]:9.0f} MiB' if results[case] is not None else
                                 f'failed ({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode})'))
    reference = results['spartan_tiny']
    if reference:
        for case, mib in results.items():
            if mib is not None:
                print(f'{case:>24}: {mib / reference:5.2f} x spartan_tiny')


if __name__ == '__main__':
    main()
