"""UniRepLKNet inference speed, every side in one process, timed round-robin: the zoo's fast deploy form vs the
plain deploy form (one nn.Conv2d per large kernel, module by module, NCHW) vs the training form, optionally
vs the official code (`--official-repo`, a checkout of AILab-CVC/UniRepLKNet, run without its CUDA
extension) and vs `torch.compile` of the deploy form with inductor freezing (`--compile`).

All sides share one set of random weights with non-trivial BN statistics, so their logits must agree; the
script prints the largest difference next to the speeds.

    python benchmarks/unireplknet_speed.py --variants a t --batch 8 --size 224 --threads 2
    python benchmarks/unireplknet_speed.py --variants a --official-repo /path/to/UniRepLKNet
"""
import argparse
import contextlib
import copy
import importlib.util
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.bench import interleaved_latencies, matmul_gflops  # noqa: E402
from zoo.models import unireplknet  # noqa: E402


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics, GRN, layer scale and biases, so that every fold matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith('running_var') or name.endswith(('gamma', 'ls.gamma')):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(('running_mean', 'bias', 'beta', 'grn.weight')):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
    return model


def load_official(repo: Path):
    """The official `unireplknet.py` as a module (its factories print; keep that quiet)."""
    spec = importlib.util.spec_from_file_location('official_unireplknet', repo / 'unireplknet.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    with contextlib.redirect_stdout(io.StringIO()):
        spec.loader.exec_module(module)
    return module


def build_sides(variant: str, official, compile_deploy: bool):
    """name -> eval-mode model, all with the same function. The official file registers the same names with
    timm, so the zoo models are built from the zoo module's own factories."""
    name = f'unireplknet_{variant}'
    create = getattr(unireplknet, name)
    if official is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            off_train = getattr(official, name)(attempt_use_lk_impl=False)
        randomize_(off_train).eval()
        train = create()
        train.load_state_dict(unireplknet.checkpoint_filter_fn(off_train.state_dict(), train))
    else:
        train = randomize_(create())
    train.eval()
    fast = copy.deepcopy(train).reparameterize()
    sides = {
        'deploy fast': fast,
        'deploy plain': copy.deepcopy(fast).set_fast(False),
        'training form': train,
    }
    if official is not None:
        off_deploy = copy.deepcopy(off_train)
        with contextlib.redirect_stdout(io.StringIO()):
            off_deploy.reparameterize_unireplknet()
        sides['official deploy'] = off_deploy.eval()
        sides['official training'] = off_train
    if compile_deploy:
        # Under torch.compile the blocks take the plain path (inductor fuses it better), so one side covers both.
        sides['deploy, compiled'] = torch.compile(copy.deepcopy(fast), options={'freezing': True})
    return sides


def profile_table(model: torch.nn.Module, x: torch.Tensor, rows: int = 12) -> str:
    """The operators that take the most self CPU time in one batch (after one warm-up batch)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    return prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variants', nargs='+', default=['a', 't'])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--official-repo', type=Path, help='checkout of AILab-CVC/UniRepLKNet')
    parser.add_argument('--compile', action='store_true', help='add torch.compile (inductor freezing) of the deploy form')
    parser.add_argument('--profile', action='store_true',
                        help='print the torch.profiler operator table of each deploy side (one batch) first')
    parser.add_argument('--clock', choices=['wall', 'cpu'], default='wall',
                        help='cpu: CPU time of the process (with --threads 1, robust to other load)')
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    official = load_official(args.official_repo) if args.official_repo else None
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    print(f'# {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, float32, '
          f'batch {args.batch} at {args.size} px, {args.repeats} interleaved rounds, medians of {args.clock} time')
    print(f'# load average before: {os.getloadavg()}')
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    print(f'# float32 matmul (1024^3): {matmul_gflops(clock=clock):.0f} GFLOP/s ({args.clock} time)')
    for variant in args.variants:
        sides = build_sides(variant, official, args.compile)
        if args.profile:
            for k in ('deploy plain', 'deploy fast'):
                print(f'\n## torch.profiler, unireplknet_{variant} {k}')
                print(profile_table(sides[k], x))
        with torch.inference_mode():
            reference = sides['deploy plain'](x)
            scale = reference.abs().max().item()
            diffs = {k: (m(x) - reference).abs().max().item() for k, m in sides.items()}
            times = interleaved_latencies(
                {k: (lambda m=m: m(x)) for k, m in sides.items()}, repeats=args.repeats, warmup=args.warmup,
                clock=clock)
        plain = statistics.median(times['deploy plain'])
        print(f'\n| unireplknet_{variant} | images/s | vs deploy plain | max abs logit diff / logit scale |')
        print('|---|---:|---:|---:|')
        for k, t in times.items():
            median = statistics.median(t)
            print(f'| {k} | {args.batch / median:.1f} | {plain / median:.2f}x | {diffs[k] / scale:.1e} |')
    print(f'\n# load average after: {os.getloadavg()}')


if __name__ == '__main__':
    main()
