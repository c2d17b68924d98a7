"""Every runtime side by side in one run: eager, eager deploy, torch.compile (inductor freezing), ONNX Runtime fp32
and ONNX Runtime int8 (dynamic quantisation), with ratios to eager and each side as a fraction of the rate of a
1024^3 fp32 matmul timed in the same rounds.

Sides (and the matmul) alternate round-robin (A, B, C, A, B, C, ...) on the same weights and input; medians are reported. The
ONNX files are made by `zoo.export` (deploy form, fixed batch), so they are checked against eager before they are
timed. Where the best side reaches less than --profile-below of the matmul rate, the eager deploy form is profiled
and its five most expensive operators are printed: where the time goes.

`--digits FOLDER` adds the int8 accuracy check on real data: the model that `training/recipes/spartan_tiny_digits.yaml`
trained (its Hub folder), on that recipe's 450 test digits (`--digits-data`, written by `training/digits.py`):
top-1 eager, in ONNX Runtime fp32 and in ONNX Runtime int8, and the int8 speed-up on that model.

    python benchmarks/runtimes.py --threads 2 --repeats 7
    python benchmarks/runtimes.py --models unireplknet_a --digits runs/digits/model --digits-data data/digits
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402
from zoo import export, hub  # noqa: E402
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
    """Top-1 of the digits recipe's model (its Hub folder) on the recipe's 450 test digits, eager, in ONNX Runtime
    fp32 and int8, and the int8 speed-up over fp32 on that batch."""
    model = hub.load(args.digits).eval()
    config = timm.data.resolve_model_data_config(model)
    test_set = timm.data.ImageDataset(str(Path(args.digits_data) / 'validation'),
                                      transform=timm.data.create_transform(**config))
    test_x = torch.stack([x for x, _ in test_set])
    test_y = torch.tensor([y for _, y in test_set])
    path = Path(folder) / 'digits.onnx'
    export.export(model, path, format='onnx', batch=len(test_x), size=tuple(config['input_size'][1:]))
    int8_path = path.with_name('digits.int8.onnx')
    int8_path.write_bytes(export.quantize_int8(path))
    runs = {'eager': export.exportable(model), 'onnxruntime fp32': ort_runner(path, args.threads),
            'onnxruntime int8': ort_runner(int8_path, args.threads)}
    with torch.inference_mode():
        outputs = {side: run(test_x) for side, run in runs.items()}
    accuracy = {side: (v.argmax(-1) == test_y).float().mean().item() for side, v in outputs.items()}
    fp32_fn, int8_fn = runs['onnxruntime fp32'], runs['onnxruntime int8']
    times = interleaved_latencies({'fp32': lambda: fp32_fn(test_x), 'int8': lambda: int8_fn(test_x)},
                                  repeats=args.repeats, warmup=2)
    speedup = statistics.median(times['fp32']) / statistics.median(times['int8'])
    print(f'\ndigits: {args.digits} ({model.pretrained_cfg.get("architecture")}, input {tuple(test_x.shape)}) on '
          f'{len(test_x)} test images of {args.digits_data}; load average {os.getloadavg()[0]:.1f}')
    for side, value in accuracy.items():
        print(f'  {side:18s} top-1 {100 * value:.2f}%')
    agree = (outputs['onnxruntime int8'].argmax(-1) == outputs['eager'].argmax(-1)).float().mean().item()
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
    parser.add_argument('--digits', metavar='FOLDER',
                        help="the digits recipe's Hub folder (runs/digits/model): int8 accuracy on its test split")
    parser.add_argument('--digits-data', default='data/digits', help='the folder training/digits.py wrote')
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
