"""GPU figures next to the published ones, in one run: writes gpu_suite.json and gpu_suite.md into --out.

- Every UniRepLKNet variant: deploy form, bf16 weights and inputs, channels_last, eager and `torch.compile`d,
  img/s at batch 128 and the paper's resolution, next to TPAMI Table 5's A100 img/s (the paper's figures).
- HNeRV 1.5M: decoder frames/s at 640x1280 (batch 1, fp32 as the paper, and bf16), next to the paper's
  RTX 2080 Ti figures (224.8 to 395.9 fps: Bunny, r = 1.5, PSNR 37 to 32).
- ConViT, HaloNet-H0..H3, SpaRTAN: img/s under float16 autocast in NCHW, the setting of timm's published
  inference benchmark (results/benchmark-infer-amp-nchw-pt291-cu128-4090.csv, RTX 4090), next to timm's figure
  where timm has a model of that name.
- The trainer's step time on one GPU against a bare PyTorch loop (benchmarks/train_overhead.py's method).

Paper and timm figures were measured on other GPUs: the ratio column compares machines, not implementations.
On a GPU the run keeps to --budget-s (default 420 s, so the whole script stays within 8 minutes): rows it has no time
left for are written as skipped. Compiled rows run last. `--smoke` runs tiny sizes on the CPU (compiled rows through
dynamo's graph capture only, autocast in bfloat16), so the script is known to work before a GPU is lent (the test
suite runs it).

    python benchmarks/gpu_suite.py --out results/
    python benchmarks/gpu_suite.py --smoke --out /tmp/smoke
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402
from zoo.bench import interleaved_latencies  # noqa: E402
import train_overhead  # noqa: E402

# TPAMI "Scaling Up Your Kernels", Table 5: A100 img/s (A..S at 224 px, B/L/XL at 384 px).
PAPER_A100 = {'unireplknet_a': 5942, 'unireplknet_f': 5173, 'unireplknet_p': 3949, 'unireplknet_n': 2807,
              'unireplknet_t': 1804, 'unireplknet_s': 1265, 'unireplknet_b': 314, 'unireplknet_l': 190,
              'unireplknet_xl': 131}
# Batch 128, as we read the UniRepLKNet paper's throughput caption; change with --batch.
PAPER_BATCH = 128
# HNeRV paper, Table 13: decoding fps of the r = 1.5 model on an RTX 2080 Ti, fp32, at PSNR 32 / 35 / 37.
PAPER_HNERV_FPS = {'psnr32': 395.9, 'psnr35': 332.7, 'psnr37': 224.8}
# timm results/benchmark-infer-amp-nchw-pt291-cu128-4090.csv: (img/s, batch, px) on an RTX 4090, fp16 AMP.
TIMM_4090 = {'convit_tiny': (4379.04, 1024, 224), 'convit_small': (1976.08, 1024, 224),
             'convit_base': (1048.86, 1024, 224), 'halonet_h1': (634.22, 256, 256)}
CLASSIFIERS = ['convit_tiny', 'convit_small', 'convit_base', 'halonet_h0', 'halonet_h1', 'halonet_h2', 'halonet_h3',
               'spartan_tiny']


class Budget:
    """Seconds left for the run; rows are skipped once it is spent."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _free(device):
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def images_per_s(fn, batch: int, device, repeats: int, warmup: int) -> float:
    times = interleaved_latencies({'run': fn}, repeats=repeats, warmup=warmup, device=device)['run']
    return batch / statistics.median(times)


def unireplknet_rows(cfg, budget, compiled: bool):
    rows = []
    for name in cfg.unireplknet:
        row = dict(section='unireplknet', model=name, mode='compiled' if compiled else 'eager', batch=cfg.batch,
                   dtype='bfloat16', layout='channels_last', form='deploy')
        if budget.left() < cfg.min_left:
            rows.append(dict(row, skipped='time budget'))
            continue
        size = cfg.size or timm.models.get_pretrained_cfg(name).input_size[-1]
        model = timm.utils.reparameterize_model(zoo.create_model(name)).eval()
        model = model.to(cfg.device, torch.bfloat16, memory_format=torch.channels_last)
        x = torch.randn(cfg.batch, 3, size, size, device=cfg.device, dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        run_model = torch.compile(model, backend=cfg.compile_backend) if compiled else model

        def step():
            with torch.inference_mode():
                run_model(x)
        start = time.monotonic()
        value = images_per_s(step, cfg.batch, cfg.device, cfg.repeats, cfg.warmup)
        paper = PAPER_A100.get(name)
        rows.append(dict(row, size=size, img_s=value, seconds=time.monotonic() - start, reference=paper,
                         reference_source='TPAMI Table 5, A100 (paper)', vs_reference=value / paper if paper else None))
        del model, run_model, x
        _free(cfg.device)
    return rows


def hnerv_rows(cfg, budget):
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        row = dict(section='hnerv', model='hnerv_1_5m', mode='eager', batch=1, dtype=str(dtype).split('.')[-1],
                   form='decoder (embeddings -> frames)')
        if budget.left() < cfg.min_left:
            rows.append(dict(row, skipped='time budget'))
            continue
        model = zoo.create_model('hnerv_1_5m', **cfg.hnerv_args).eval().to(cfg.device, dtype)
        embeddings = torch.randn(1, *model.embed_shape, device=cfg.device, dtype=dtype)

        def step():
            with torch.inference_mode():
                model.decode(embeddings)
        start = time.monotonic()
        value = images_per_s(step, 1, cfg.device, cfg.repeats, cfg.warmup)
        rows.append(dict(row, size='x'.join(map(str, model.frame_size)), img_s=value,
                         seconds=time.monotonic() - start, reference=PAPER_HNERV_FPS['psnr37'],
                         reference_high=PAPER_HNERV_FPS['psnr32'], reference_source='HNeRV paper, RTX 2080 Ti fp32',
                         vs_reference=value / PAPER_HNERV_FPS['psnr37']))
        del model
        _free(cfg.device)
    return rows


def classifier_rows(cfg, budget):
    rows = []
    for name in cfg.classifiers:
        timm_figure = TIMM_4090.get(name)
        batch = cfg.classifier_batch or (timm_figure[1] if timm_figure else 256)
        row = dict(section='classifiers', model=name, mode='eager', batch=batch, dtype=f'{cfg.amp_dtype} autocast',
                   layout='nchw')
        if budget.left() < cfg.min_left:
            rows.append(dict(row, skipped='time budget'))
            continue
        kwargs = dict(cfg.classifier_args.get(name.split('_')[0], {}))
        model = zoo.create_model(name, **kwargs).eval().to(cfg.device)
        size = model.pretrained_cfg['input_size'][-1] if not cfg.size else cfg.size
        x = torch.randn(batch, 3, size, size, device=cfg.device)

        def step():
            with torch.inference_mode(), torch.autocast(cfg.device.type, dtype=getattr(torch, cfg.amp_dtype)):
                model(x)
        start = time.monotonic()
        try:
            value = images_per_s(step, batch, cfg.device, cfg.repeats, cfg.warmup)
        except torch.OutOfMemoryError:
            rows.append(dict(row, size=size, skipped=f'out of memory at batch {batch}'))
            continue
        finally:
            del model
            _free(cfg.device)
        rows.append(dict(row, size=size, img_s=value, seconds=time.monotonic() - start,
                         reference=timm_figure[0] if timm_figure else None,
                         reference_source='timm benchmark-infer-amp-nchw-pt291-cu128-4090.csv (RTX 4090)'
                         if timm_figure else 'timm has no model of this name',
                         vs_reference=value / timm_figure[0] if timm_figure else None))
    return rows


def trainer_rows(cfg, budget):
    row = dict(section='trainer', model=cfg.trainer.model, mode='train', batch=cfg.trainer.batch,
               size=cfg.trainer.size, dtype='float32')
    if budget.left() < cfg.min_left:
        return [dict(row, skipped='time budget')]
    start = time.monotonic()
    result = train_overhead.step_times(cfg.trainer)
    return [dict(row, trainer_step_ms=result['trainer_step_s'] * 1e3, bare_step_ms=result['bare_step_s'] * 1e3,
                 overhead=result['overhead'], seconds=time.monotonic() - start)]


def config(args):
    device = torch.device('cpu' if args.smoke else args.device)
    if args.smoke:
        return SimpleNamespace(
            device=device, batch=2, size=32, repeats=2, warmup=1, min_left=0,
            compile_backend='eager', amp_dtype='bfloat16',  # dynamo's graph capture without inductor; CPU autocast
            unireplknet=['unireplknet_a'], classifiers=['convit_tiny', 'halonet_h0', 'spartan_tiny'],
            classifier_batch=2, classifier_args={'convit': dict(img_size=32), 'halonet': dict(pad_to_block=True)},
            hnerv_args=dict(frame_size=(80, 160), num_frames=8, enc_strides=(5, 4, 2), dec_strides=(5, 2, 2, 2)),
            trainer=SimpleNamespace(model='spartan_tiny', size=32, batch=2, steps=1, repeats=1))
    return SimpleNamespace(
        device=device, batch=args.batch, size=None, repeats=args.repeats, warmup=3, min_left=20,
        compile_backend='inductor', amp_dtype='float16',
        unireplknet=list(PAPER_A100), classifiers=CLASSIFIERS, classifier_batch=None, classifier_args={},
        hnerv_args={}, trainer=SimpleNamespace(model='spartan_tiny', size=224, batch=64, steps=20, repeats=1))


def markdown(result) -> str:
    lines = [f'GPU suite: {result["device"]}, torch {result["torch"]}, timm {result["timm"]}, {result["date"]}',
             f'command: `{result["command"]}`', '']
    lines += ['| section | model | mode | batch | size | dtype | img/s | reference | measured / reference | note |',
              '|---|---|---|---:|---|---|---:|---|---:|---|']
    for r in result['rows']:
        if r['section'] == 'trainer':
            continue
        value = f'{r["img_s"]:.1f}' if 'img_s' in r else ''
        ref = r.get('reference')
        ref_text = '' if ref is None else f'{ref:g}' + (f' to {r["reference_high"]:g}' if r.get('reference_high') else '')
        ratio = f'{r["vs_reference"]:.2f}' if r.get('vs_reference') else ''
        note = r.get('skipped') or r.get('reference_source', '')
        lines.append(f'| {r["section"]} | {r["model"]} | {r["mode"]} | {r["batch"]} | {r.get("size", "")} | '
                     f'{r["dtype"]} | {value} | {ref_text} | {ratio} | {note} |')
    for r in result['rows']:
        if r['section'] == 'trainer':
            lines += ['', f'Trainer ({r["model"]}, {r["size"]} px, batch {r["batch"]}): ' + (
                f'skipped ({r["skipped"]})' if 'skipped' in r else
                f'zoo.train.trainer {r["trainer_step_ms"]:.1f} ms/step, bare loop {r["bare_step_ms"]:.1f} ms/step '
                f'({100 * r["overhead"]:+.1f}%)')]
    return '\n'.join(lines) + '\n'


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('.'), help='folder for gpu_suite.json and gpu_suite.md')
    parser.add_argument('--smoke', action='store_true', help='tiny sizes on the CPU: checks the script, not speed')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--batch', type=int, default=PAPER_BATCH, help='UniRepLKNet batch (default: the paper\'s)')
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--budget-s', type=float, default=420.0)
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error('no CUDA device: run on a GPU, or use --smoke to check the script on the CPU')
    cfg = config(args)
    budget = Budget(float('inf') if args.smoke else args.budget_s)
    if cfg.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    rows = unireplknet_rows(cfg, budget, compiled=False)
    rows += hnerv_rows(cfg, budget)
    rows += classifier_rows(cfg, budget)
    rows += trainer_rows(cfg, budget)
    rows += unireplknet_rows(cfg, budget, compiled=True)
    result = dict(
        device=torch.cuda.get_device_name(cfg.device) if cfg.device.type == 'cuda' else f'cpu ({platform.processor()})',
        smoke=args.smoke, torch=torch.__version__, timm=timm.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        load_average=os.getloadavg(), command='python ' + ' '.join(sys.argv), rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'gpu_suite.json').write_text(json.dumps(result, indent=2) + '\n')
    (args.out / 'gpu_suite.md').write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == '__main__':
    main()
