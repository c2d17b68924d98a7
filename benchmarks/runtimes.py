"""Every runtime side by side in one run: eager, eager deploy, torch.compile (inductor freezing), ONNX Runtime fp32
and ONNX Runtime int8 (dynamic quantisation), with ratios to eager and each side as a fraction of the rate of a
1024^3 fp32 matmul timed in the same rounds.

Sides (and the matmul) alternate round-robin (A, B, C, A, B, C, ...) on the same weights and input; medians are reported. The
ONNX files are made by `zoo.export` (deploy form, fixed batch), so they are checked against eager before they are
timed. Where the best side reaches less than --profile-below of the matmul rate, the eager deploy form is profiled
and its five most expensive operators are printed: where the time goes.

`--digits` adds the int8 accuracy check on real data: a small UniRepLKNet (in_chans=1, 10 classes) trained for a
few epochs on scikit-learn's digits (8x8 images upsampled to 32x32; 1437 train / 360 test, split seed 0), then
its test accuracy eager, in ONNX Runtime fp32 and in ONNX Runtime int8, and the int8 speed-up on that model.

    python benchmarks/runtimes.py --threads 2 --repeats 7
    python benchmarks/runtimes.py --models unireplknet_a --digits
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402
from zoo import export  # noqa: E402
from zoo.bench import interleaved_latencies  # noqa: E402
from zoo.cards import count_gmacs  # noqa: E402

MATMUL_N = 1024
MODELS = ['unireplknet_a', 'unireplknet_t', 'spartan_tiny', 'convit_tiny', 'halonet_h0', 'hnerv_1_5m']


def ort_runner(path, threads):
    return export.load_runner(path, 'onnx', threads=threads)


def sides_for(name, batch, threads, folder):
    """{side: (callable, module-or-None)} for one model, its input, and its GFLOP per image."""
    torch.manual_seed(0)
    model = zoo.create_model(name).eval()
    deploy = export.exportable(model, deploy=True)  # a re-parameterised copy
    eager = export.exportable(model)
    if hasattr(model, 'fast_decode'):
        model.fast_decode = True  # eager runs the zoo's default (fast) decode path
    x = export.random_input(eager, 1 if isinstance(eager, export.Decoder) else batch)
    if isinstance(eager, export.Decoder):
        gflop = 2 * count_gmacs(eager.model.decoder, tuple(x.shape[1:]))
    else:
        gflop = 2 * count_gmacs(deploy, tuple(x.shape[1:]))
    onnx_path = Path(folder) / f'{name}.onnx'
    export.export(model, onnx_path, format='onnx', deploy=True, batch=x.shape[0])
    int8_path = onnx_path.with_name(f'{name}.int8.onnx')
    int8_path.write_bytes(export.quantize_int8(onnx_path))
    compiled = torch.compile(deploy, options={'freezing': True})
    has_deploy = any(hasattr(m, 'reparameterize') or hasattr(m, 'fuse') for m in model.modules())
    fns = {'eager': eager}
    if has_deploy:
        fns['eager deploy'] = deploy
    fns['torch.compile (freezing)'] = compiled
    fns['onnxruntime fp32'] = ort_runner(onnx_path, threads)
    fns['onnxruntime int8'] = ort_runner(int8_path, threads)
    return fns, x, gflop, deploy


def profile(module, x, top=5):
    with torch.inference_mode():
        module(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            module(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, e.self_cpu_time_total / total) for e in events[:top]]


def run_model(name, args, folder):
    fns, x, gflop, deploy = sides_for(name, args.batch, args.threads, folder)

    def call(fn):
        with torch.inference_mode():
            return fn(x)
    with torch.inference_mode():
        reference = fns['eager'](x).float()
    diffs = {side: ((call(fn).float() - reference).abs().max() / reference.abs().max()).item() for side, fn in fns.items()}
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    sides = {side: (lambda fn=fn: call(fn)) for side, fn in fns.items()}
    times = interleaved_latencies(dict(sides, matmul=lambda: a @ b), repeats=args.repeats, warmup=2)
    matmul_rate = 2 * MATMUL_N ** 3 / statistics.median(times.pop('matmul')) / 1e9
    medians = {side: statistics.median(t) for side, t in times.items()}
    return dict(model=name, input=tuple(x.shape), gflop=gflop, medians=medians, diffs=diffs, deploy=deploy, x=x,
                matmul_rate=matmul_rate)


def digits_check(args, folder):
    """Accuracy of eager, ORT fp32 and ORT int8 on the digits test split, and the int8 speed-up."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode='bilinear', align_corners=False)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(digits.target)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.2, random_state=0, stratify=digits.target)
    torch.manual_seed(0)
    model = zoo.create_model('unireplknet_a', in_chans=1, num_classes=10, drop_path_rate=0.)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    train_x, train_y = images[train_idx], labels[train_idx]
    model.train()
    for _ in range(args.digits_epochs):
        order = torch.randperm(len(train_x))
        for i in range(0, len(order), 64):
            batch = order[i:i + 64]
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test_x, test_y = images[test_idx], labels[test_idx]
    path = Path(folder) / 'digits.onnx'
    export.export(model, path, format='onnx', deploy=True, batch=len(test_x), size=(32, 32))
    int8_path = path.with_name('digits.int8.onnx')
    int8_path.write_bytes(export.quantize_int8(path))
    with torch.inference_mode():
        eager = model(test_x)
    runs = {'eager': lambda: model(test_x), 'onnxruntime fp32': ort_runner(path, args.threads),
            'onnxruntime int8': ort_runner(int8_path, args.threads)}
    outputs = {'eager': eager, 'onnxruntime fp32': runs['onnxruntime fp32'](test_x),
               'onnxruntime int8': runs['onnxruntime int8'](test_x)}
    accuracy = {k: (v.argmax(-1) == test_y).float().mean().item() for k, v in outputs.items()}
    fp32_fn, int8_fn = runs['onnxruntime fp32'], runs['onnxruntime int8']
    times = interleaved_latencies({'fp32': lambda: fp32_fn(test_x), 'int8': lambda: int8_fn(test_x)},
                                  repeats=args.repeats, warmup=2)
    speedup = statistics.median(times['fp32']) / statistics.median(times['int8'])
    print(f'\ndigits (scikit-learn load_digits, 32x32, {len(train_idx)} train / {len(test_idx)} test, '
          f'{args.digits_epochs} epochs, unireplknet_a in_chans=1):')
    for k, v in accuracy.items():
        print(f'  {k:18s} top-1 {100 * v:.2f}%')
    agree = (outputs['onnxruntime int8'].argmax(-1) == eager.argmax(-1)).float().mean().item()
    print(f'  int8 vs eager: accuracy change {100 * (accuracy["onnxruntime int8"] - accuracy["eager"]):+.2f} points, '
          f'same top-1 on {100 * agree:.1f}% of the test images; int8 speed-up over onnxruntime fp32 '
          f'(batch {len(test_x)}): {speedup:.2f}x')


def print_table(r, profile_below):
    rate = r['matmul_rate']
    eager = r['medians']['eager']
    batch = r['input'][0]
    print(f'\n{r["model"]}: {r["gflop"]:.2f} GFLOP per image; the 1024^3 fp32 matmul, timed in the same rounds, '
          f'{rate:.0f} GFLOP/s; load average {os.getloadavg()[0]:.1f}')
    print(f'| {r["model"]} {tuple(r["input"])} | images/s | vs eager | GFLOP/s | of matmul | max abs diff / scale |')
    print('|---|---:|---:|---:|---:|---:|')
    for side, t in r['medians'].items():
        achieved = r['gflop'] * batch / t
        print(f'| {side} | {batch / t:.2f} | {eager / t:.2f}x | {achieved:.1f} | {achieved / rate:.0%} | '
              f'{r["diffs"][side]:.1e} |')
    fraction = r['gflop'] * batch / min(r['medians'].values()) / rate
    if fraction < profile_below:
        top = ', '.join(f'{k} {v:.0%}' for k, v in profile(r['deploy'], r['x']))
        print(f'best at {fraction:.0%} of the matmul rate; eager deploy profile (self CPU time): {top}')
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='*', default=MODELS)
    parser.add_argument('--batch', type=int, default=8, help='image batch (the HNeRV decoder runs batch 1)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--profile-below', type=float, default=0.7)
    parser.add_argument('--digits', action='store_true', help='int8 accuracy on scikit-learn digits')
    parser.add_argument('--digits-epochs', type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'load average before: {os.getloadavg()}; {args.threads} threads; torch {torch.__version__}')
    with tempfile.TemporaryDirectory() as folder:
        if args.digits:
            digits_check(args, folder)
        for name in args.models:
            print_table(run_model(name, args, folder), args.profile_below)
    print(f'\nload average after: {os.getloadavg()}')


if __name__ == '__main__':
    main()
