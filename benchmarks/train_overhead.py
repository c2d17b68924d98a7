"""The trainer's cost: step time of `zoo.train.trainer` against a bare PyTorch loop, and grad checkpointing's memory.

Step time: the same model, batch, optimizer (timm AdamW) and per-step cosine schedule, on in-memory random
images, run through `zoo.train.trainer.train` (Accelerate, progress bar, checkpoint bookkeeping) and through a plain
`for` loop. Each side runs twice, with `--steps` and with 2x`--steps` steps, and the step time is the difference
divided by the extra steps, so set-up, evaluation and saving cancel out. Sides alternate over `--repeats`
rounds; medians are reported.

Memory: peak resident memory of one forward + backward pass, with and without `set_grad_checkpointing()`,
each in a fresh process: the peak during the pass (VmHWM, reset just before it) minus the resident memory
before it (VmRSS). Linux only.

    python benchmarks/train_overhead.py --model spartan_tiny --size 128 --batch 16
    python benchmarks/train_overhead.py --memory-only --memory-models unireplknet_b convit_base --size 224 --batch 8
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402
from zoo.train import trainer  # noqa: E402
from zoo.train.task import Task  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402

NUM_CLASSES = 10


class SyntheticTask(Task):
    """A task for zoo.train.trainer over in-memory random images, evaluated by nothing (the step time is measured)."""
    data_schema = dict(size=(int,), samples=(int,))
    separate_eval_split = False

    def datasets(self, recipe, model, data=None, output_dir=None):
        size = recipe['data']['size']
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(recipe['data']['samples'], 3, size, size, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (len(images),), generator=generator)
        dataset = torch.utils.data.TensorDataset(images, labels)
        return dataset, torch.utils.data.Subset(dataset, range(recipe['train']['batch_size'])), None

    def make_loss(self, recipe, model):
        return lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])

    def evaluate(self, recipe, model, eval_set, accelerator):
        return {'loss': 0.0}


def _model_args(model_name: str, size: int) -> dict:
    """Random-weight classifier arguments; models with a fixed input size (ConViT's position table) get `size`."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    fixed = cfg is not None and cfg.fixed_input_size and cfg.input_size[-1] != size
    return dict(num_classes=NUM_CLASSES, **({'img_size': size} if fixed else {}))


def _recipe(model_name: str, size: int, batch: int, steps: int):
    trainer.TASKS['synthetic'] = SyntheticTask()
    return trainer.check_recipe(dict(
        model=model_name, model_args=_model_args(model_name, size), task='synthetic',
        data=dict(size=size, samples=batch * steps),
        train=dict(epochs=1, batch_size=batch, opt='adamw', lr=1e-3, weight_decay=0.05, log_every=10**9,
                   eval_every=0)))


def trainer_seconds(model_name: str, size: int, batch: int, steps: int) -> float:
    recipe = _recipe(model_name, size, batch, steps)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        trainer.train(recipe, out, quiet=True)
        return time.perf_counter() - start


def bare_seconds(model_name: str, size: int, batch: int, steps: int) -> float:
    start = time.perf_counter()
    torch.manual_seed(0)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')  # where Accelerate puts the trainer's
    model = zoo.create_model(model_name, **_model_args(model_name, size)).train().to(device)
    recipe = _recipe(model_name, size, batch, steps)
    dataset, _, _ = SyntheticTask().datasets(recipe, model)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)
    optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=1, step_on_epochs=False,
                                       updates_per_epoch=len(loader))
    for step, (images, labels) in enumerate(loader, 1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step_update(step)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def step_times(args) -> dict:
    times = {'trainer': [], 'bare': []}
    for _ in range(args.repeats):
        for side, run in (('trainer', trainer_seconds), ('bare', bare_seconds)):
            short = run(args.model, args.size, args.batch, args.steps)
            long = run(args.model, args.size, args.batch, 2 * args.steps)
            times[side].append((long - short) / args.steps)
    trainer_step, bare_step = (statistics.median(times[k]) for k in ('trainer', 'bare'))
    return dict(model=args.model, size=args.size, batch=args.batch, trainer_step_s=trainer_step,
                bare_step_s=bare_step, overhead=trainer_step / bare_step - 1, samples=times)


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in KiB: VmRSS (now) or VmHWM (peak)."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise RuntimeError(f'no {field} in /proc/self/status')


def _peak_memory_child(model_name: str, size: int, batch: int, checkpointing: bool) -> None:
    model = zoo.create_model(model_name, **_model_args(model_name, size)).train()
    model.set_grad_checkpointing(checkpointing)
    images = torch.rand(batch, 3, size, size)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    Path('/proc/self/clear_refs').write_text('5')  # reset the peak (VmHWM) to the memory in use now
    before = _status_kib('VmRSS')
    F.cross_entropy(model(images), labels).backward()
    print(json.dumps({'peak_mib': (_status_kib('VmHWM') - before) / 1024}))


def peak_memory(model_name: str, size: int, batch: int, checkpointing: bool) -> float:
    out = subprocess.run(
        [sys.executable, __file__, '--memory-child', model_name, '--size', str(size), '--batch', str(batch)]
        + (['--checkpointing'] if checkpointing else []), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f'{model_name} at {size}px failed:\n{out.stderr[-2000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])['peak_mib']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='spartan_tiny')
    parser.add_argument('--size', type=int, default=128)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--memory-only', action='store_true')
    parser.add_argument('--memory-models', nargs='*', default=['unireplknet_b', 'convit_base', 'spartan_tiny'],
                        help='models for the memory table; HaloNet needs --size a multiple of 256')
    parser.add_argument('--memory-child', help=argparse.SUPPRESS)
    parser.add_argument('--checkpointing', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        _peak_memory_child(args.memory_child, args.size, args.batch, args.checkpointing)
        return
    if not args.memory_only:
        result = step_times(args)
        print(f'{args.model} {args.size}px batch {args.batch}, {args.threads} threads: trainer '
              f'{result["trainer_step_s"] * 1e3:.0f} ms/step, bare loop {result["bare_step_s"] * 1e3:.0f} ms/step, '
              f'overhead {100 * result["overhead"]:+.1f}%')
    for name in args.memory_models:
        plain = peak_memory(name, args.size, args.batch, False)
        saved = peak_memory(name, args.size, args.batch, True)
        print(f'{name} {args.size}px batch {args.batch}: forward+backward peak {plain:.0f} MiB, with grad '
              f'checkpointing {saved:.0f} MiB ({100 * (1 - saved / plain):.0f}% less)')


if __name__ == '__main__':
    main()
