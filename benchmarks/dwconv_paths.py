"""Ways to run UniRepLKNet's large depth-wise convolution, on the shapes of A and T at 224 px (batch 8), timed
round-robin: `conv2d(groups=C)` on NCHW (what the zoo runs) and on channels_last, an FFT convolution, and an
unfold + multiply-sum. GFLOP/s count the direct convolution's 2*K*K multiply-adds per output, so the columns
compare like for like; the last line is a float32 matmul in the same process.

    python benchmarks/dwconv_paths.py --threads 1 --clock cpu
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.bench import interleaved_latencies, matmul_gflops  # noqa: E402

SHAPES = [(80, 28), (160, 14), (320, 7), (160, 28), (320, 14), (640, 7)]  # (channels, map): A stages 2-4, T


def fft_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """'same' depth-wise correlation through a real 2-D FFT of size H + K - 1."""
    h, w = x.shape[-2:]
    k = weight.shape[-1]
    size = (h + k - 1, w + k - 1)
    spectrum = torch.fft.rfft2(x, size) * torch.fft.rfft2(weight.flip(-1, -2)[:, 0], size)
    full = torch.fft.irfft2(spectrum, size)
    return full[..., k // 2:k // 2 + h, k // 2:k // 2 + w]


def unfold_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    k = weight.shape[-1]
    cols = F.unfold(x, k, padding=k // 2).view(b, c, k * k, h * w)
    return (cols * weight.view(1, c, k * k, 1)).sum(2).view(b, c, h, w)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--kernel', type=int, default=13)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=9)
    parser.add_argument('--clock', choices=['wall', 'cpu'], default='cpu')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    print(f'# {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, {args.clock} time, {args.kernel}x{args.kernel} depth-wise, '
          f'batch {args.batch}; load average {os.getloadavg()}')
    print('\n| channels x map | NCHW conv2d | channels_last conv2d | FFT | unfold |')
    print('|---|---:|---:|---:|---:|')
    k = args.kernel
    for c, hw in SHAPES:
        x = torch.randn(args.batch, c, hw, hw)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c, 1, k, k)
        expected = F.conv2d(x, weight, padding=k // 2, groups=c)
        for fn in (fft_conv, unfold_conv):
            torch.testing.assert_close(fn(x, weight), expected, atol=1e-3, rtol=1e-3)
        sides = {
            'nchw': lambda: F.conv2d(x, weight, padding=k // 2, groups=c),
            'channels_last': lambda: F.conv2d(x_cl, weight, padding=k // 2, groups=c),
            'fft': lambda: fft_conv(x, weight),
            'unfold': lambda: unfold_conv(x, weight),
        }
        times = interleaved_latencies(sides, repeats=args.repeats, clock=clock)
        flops = 2 * args.batch * c * hw * hw * k * k
        cells = [f'{statistics.median(t) * 1e3:.2f} ms ({flops / statistics.median(t) / 1e9:.0f} GFLOP/s)'
                 for t in times.values()]
        print(f'| {c} x {hw}x{hw} | ' + ' | '.join(cells) + ' |')
    print(f'\nfloat32 matmul 1024^3: {matmul_gflops(clock=clock):.0f} GFLOP/s')


if __name__ == '__main__':
    main()
