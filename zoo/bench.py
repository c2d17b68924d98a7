"""Speed and memory of a model (`zoo bench NAME`): images/s, latency percentiles, peak memory and the achieved
GFLOP/s as a fraction of a plain matmul measured in the same process (what this machine can do right now).

`interleaved_latencies` times several sides round-robin (A, B, A, B, ...), so that load from other processes
hits every side alike; the scripts in `benchmarks/` use it to print ratios from one run.
"""
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import timm
import torch

import zoo
from zoo.cards import count_gmacs
from zoo.errors import InputError

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def interleaved_latencies(
        sides: Dict[str, Callable[[], object]],
        repeats: int = 10,
        warmup: int = 2,
        device: torch.device = torch.device('cpu'),
        clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, List[float]]:
    """Seconds per call of each side, timed round-robin after `warmup` untimed rounds.

    `clock=time.process_time` counts the CPU time of this process instead of wall time: with one thread it is
    the compute cost alone, nearly blind to other processes sharing the cores.
    """
    times = {name: [] for name in sides}
    for i in range(warmup + repeats):
        for name, fn in sides.items():
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(clock() - start)
    return times


def percentile(values: List[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def matmul_gflops(
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device('cpu'),
        n: int = 1024,
        repeats: int = 10,
        clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median GFLOP/s of an n x n matmul: the reference rate for 'fraction of what the machine can do'."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = interleaved_latencies({'mm': lambda: a @ b}, repeats=repeats, warmup=2, device=device, clock=clock)['mm']
    return 2 * n ** 3 / statistics.median(times) / 1e9


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2 ** 20 if sys.platform == 'darwin' else kib / 2 ** 10  # bytes on macOS, KiB on Linux


@dataclass
class BenchResult:
    name: str
    device: str
    dtype: str
    batch: int
    size: int
    deploy: bool
    channels_last: bool
    compile: bool
    train: bool
    threads: int
    images_per_s: float
    latency_p50_ms: float
    latency_p90_ms: float
    peak_memory_mb: float
    peak_memory_kind: str
    gflop_per_image: float
    achieved_gflops: float
    matmul_gflops: float

    @property
    def matmul_fraction(self) -> float:
        return self.achieved_gflops / self.matmul_gflops

    def as_dict(self) -> Dict:
        return {**asdict(self), 'matmul_fraction': self.matmul_fraction}

    def __str__(self) -> str:
        form = ', '.join(k for k in ('deploy', 'channels_last', 'compile', 'train') if getattr(self, k)) or 'eager'
        return '\n'.join([
            f'{self.name} ({form}) on {self.device}, {self.dtype}, batch {self.batch} at {self.size} px, '
            f'{self.threads} threads',
            f'  images/s        {self.images_per_s:10.1f}',
            f'  latency p50     {self.latency_p50_ms:10.1f} ms / batch',
            f'  latency p90     {self.latency_p90_ms:10.1f} ms / batch',
            f'  peak memory     {self.peak_memory_mb:10.0f} MiB ({self.peak_memory_kind})',
            f'  GFLOP / image   {self.gflop_per_image:10.2f}',
            f'  achieved        {self.achieved_gflops:10.1f} GFLOP/s = {self.matmul_fraction:.0%} of a '
            f'{self.dtype} matmul ({self.matmul_gflops:.0f} GFLOP/s)',
        ])


def _device(name: Optional[str]) -> torch.device:
    """`name` as a torch device this machine has (default: cuda if available, else cpu)."""
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise InputError(f'unknown device {name!r}: give cpu or cuda[:i]') from e
    backend = getattr(torch, dev.type, None)
    if dev.type != 'cpu' and not (hasattr(backend, 'is_available') and backend.is_available()):
        raise InputError(f'device {name!r} is not available on this machine; use cpu')
    if dev.index is not None and dev.type != 'cpu' and dev.index >= backend.device_count():
        raise InputError(f'device {name!r}: this machine has {backend.device_count()} {dev.type} device(s)')
    return dev


def bench_model(
        name: str,
        batch: int = 8,
        size: Optional[int] = None,
        deploy: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        dtype: str = 'float32',
        train: bool = False,
        device: Optional[str] = None,
        threads: Optional[int] = None,
        repeats: int = 10,
        warmup: int = 2,
) -> BenchResult:
    """Build `name` with random weights and time `repeats` batches (inference, or forward + backward + SGD step
    with `train`). `deploy` re-parameterises (timm's `reparameterize_model`); `size` defaults to the model's
    input size."""
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {", ".join(DTYPES)}, got {dtype!r}')
    for what, value, least in (('batch', batch, 1), ('repeats', repeats, 1), ('warmup', warmup, 0),
                               ('size', size or 1, 1), ('threads', threads or 1, 1)):
        if value < least:
            raise InputError(f'{what} must be at least {least}, got {value}')
    saved_threads = torch.get_num_threads()  # restored: a library call leaves the process's thread count alone
    if threads:
        torch.set_num_threads(threads)
    try:
        dev = _device(device)
        model = zoo.create_model(name)
        if hasattr(model, 'example_inputs'):
            raise ValueError(f'zoo bench times image classifiers and backbones; {name} does not take an image batch')
        if deploy:
            model = timm.utils.reparameterize_model(model)
        chans, height, width = model.pretrained_cfg.get('input_size', (3, 224, 224))
        if size:
            height = width = size
        input_shape = (batch, chans, height, width)
        # FLOPs are 2x the MACs. A training step is taken as 3x the forward: the backward computes the gradients of
        # the inputs and of the weights, each about a forward (torch's counter counts a grouped convolution's
        # backward as a dense one, groups times too much).
        gflop_per_image = 2 * count_gmacs(model, input_shape[1:]) * (3 if train else 1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(dev, DTYPES[dtype], memory_format=memory_format).train(train)
        x = torch.randn(input_shape, device=dev, dtype=DTYPES[dtype]).contiguous(memory_format=memory_format)
        run_model = model
        if compile:
            # At inference the weights are constants: inductor's freezing folds them into the graph and prepacks
            # them for oneDNN (UniRepLKNet-A deploy, 2 CPU threads: 1.2x its eager fast path; about 1.04x without).
            run_model = torch.compile(model, options=None if train else {'freezing': True})
        if train:
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

            def step():
                optimizer.zero_grad(set_to_none=True)
                run_model(x).float().mean().backward()
                optimizer.step()
        else:
            def step():
                with torch.inference_mode():
                    run_model(x)

        if dev.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(dev)
        times = interleaved_latencies({'model': step}, repeats=repeats, warmup=warmup, device=dev)['model']
        p50 = statistics.median(times)
        return BenchResult(
            name=name, device=str(dev) if dev.type == 'cpu' else torch.cuda.get_device_name(dev), dtype=dtype,
            batch=batch, size=height, deploy=deploy, channels_last=channels_last, compile=compile, train=train,
            threads=torch.get_num_threads(), images_per_s=batch / p50, latency_p50_ms=p50 * 1e3,
            latency_p90_ms=percentile(times, 90) * 1e3, peak_memory_mb=_peak_memory_mb(dev),
            peak_memory_kind='allocated by torch' if dev.type == 'cuda' else 'peak RSS of the process',
            gflop_per_image=gflop_per_image, achieved_gflops=gflop_per_image * batch / p50,
            matmul_gflops=matmul_gflops(DTYPES[dtype], dev),
        )
    finally:
        torch.set_num_threads(saved_threads)
