"""One training loop for every zoo model, driven by a recipe and run by Accelerate.

`training/train.py` is the command-line face of `train()`. A recipe (YAML, `training/recipes/`) names the model,
the task, the data and the paper's hyperparameters; the task (`zoo.tasks.<task>`) supplies the data, the loss, the
metrics and the final report, and this module supplies everything the tasks share: Accelerate (devices, mixed
precision, gradient accumulation, DDP / FSDP / DeepSpeed), timm's optimizers and schedulers (stepped every
optimizer step or every epoch), EMA, atomic checkpoints with exact resume, and the Hub folder at the end.

Batches are global: `batch_size` in a recipe is the batch of one optimizer step summed over processes, split
evenly between them (Accelerate's `split_batches`), so a recipe means the same run at any world size.
"""
import copy
import importlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

import zoo
from zoo import hub, tract
from zoo.errors import RecipeError
from zoo.hub import RECIPE_NAME

CHECKPOINT_PREFIX = 'step_'

# Each task is a module (or `module:attribute`) with datasets(), make_loss(), evaluate() and optionally
# model_kwargs() (model arguments that depend on the data) and report() (what to show after saving).
TASKS = {
    'classification': 'zoo.tasks.classification',
    'video': 'zoo.tasks.video_fitting',
    'depth': 'zoo.tasks.dense:depth',
    'segmentation': 'zoo.tasks.dense:segmentation',
}

TRAIN_DEFAULTS = dict(
    epochs=1, batch_size=32, opt='adamw', lr=1e-3, weight_decay=0.05, opt_args={}, sched='cosine',
    warmup_epochs=0, warmup_lr=0.0, min_lr=0.0, grad_accum=1, clip_grad=None, mixed_precision='no', seed=0,
    checkpoint_every=0, keep_checkpoints=2, log_every=10, log_with=None, num_workers=0, ema_decay=None,
    grad_checkpointing=False, lr_groups={}, warmup_prefix=False, decay_epochs=None, decay_rate=0.1,
    sched_on_epochs=False, fresh=False, tract=None,
)


# Recipes


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Read a recipe and apply `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'recipe {path} not found; recipes live in training/recipes/<model>.yaml')
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f'recipe {path} is not valid YAML: {e}') from e
    for override in overrides:
        key, sep, value = override.partition('=')
        if not sep or not key:
            raise RecipeError(f'override {override!r} is not KEY=VALUE (for example train.lr=5e-4)')
        node = recipe
        *parents, leaf = key.split('.')
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _parse_override(value)
    return check_recipe(recipe, source=str(path))


def _parse_override(text: str) -> Any:
    """A command-line value as YAML, except that `2e-3` is a number and `no` / `off` stay strings.

    YAML 1.1 (PyYAML) reads a float only with a dot before the exponent, and yes/no/on/off as booleans,
    which would turn `train.lr=2e-3` into a string and `train.mixed_precision=no` into False.
    """
    value = yaml.safe_load(text)
    if isinstance(value, bool) and text.strip().lower() not in ('true', 'false'):
        return text.strip()
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_recipe(recipe: Dict[str, Any], source: str = 'recipe') -> Dict[str, Any]:
    """Fill the training defaults and stop early on what cannot work (unknown task, model or key)."""
    for key in ('model', 'task'):
        if key not in recipe:
            raise RecipeError(f'{source} has no {key!r}; a recipe names the model, the task, the data and `train`')
    if recipe['task'] not in TASKS:
        raise RecipeError(f'{source}: unknown task {recipe["task"]!r}; known tasks: {", ".join(TASKS)}')
    zoo.registry.check_model_name(recipe['model'])
    train = dict(recipe.get('train') or {})
    unknown = sorted(set(train) - set(TRAIN_DEFAULTS))
    if unknown:
        raise RecipeError(f'{source}: unknown train keys {unknown}; known: {", ".join(sorted(TRAIN_DEFAULTS))}')
    if train.get('lr_groups') and (train.get('opt_args') or {}).get('layer_decay'):
        raise RecipeError(f'{source}: train.lr_groups and opt_args.layer_decay cannot be combined (timm skips layer '
                          'decay when parameter groups are given); use one of them')
    recipe = dict(recipe)
    recipe['train'] = {**TRAIN_DEFAULTS, **train}
    recipe.setdefault('model_args', {})
    recipe.setdefault('data', {})
    return recipe


def task_module(recipe: Dict[str, Any]):
    module_name, _, attribute = TASKS[recipe['task']].partition(':')
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


# Checkpoints


@dataclass
class TrainState:
    """Progress saved with every checkpoint: optimizer steps done, epoch, batches done in that epoch."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def state_dict(self) -> Dict[str, int]:
        return dict(step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch)

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.step, self.epoch, self.batch_in_epoch = state['step'], state['epoch'], state['batch_in_epoch']


def list_checkpoints(output_dir: Union[str, Path]) -> List[Path]:
    """Complete checkpoints under `output_dir/checkpoints`, oldest first."""
    root = Path(output_dir) / 'checkpoints'
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """`accelerator.save_state` into a staging folder, renamed into place once every rank has written."""
    root = output_dir / 'checkpoints'
    final = root / f'{CHECKPOINT_PREFIX}{step:08d}'
    staging = root / f'.staging-{CHECKPOINT_PREFIX}{step:08d}'
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# The loop


def _lr_groups(lr_groups: Dict[str, float], base_lr: float, weight_decay: float):
    """timm `param_group_fn`: parameters under a name prefix of `lr_groups` train at that lr (e.g. a pre-trained
    encoder's lower one), set as timm's `lr_scale` relative to `base_lr`, so that warmup and the minimum lr
    scale with it; biases, norms and the model's `no_weight_decay()` names get no weight decay, as timm's
    default grouping does."""
    def group(model: torch.nn.Module):
        skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
        groups: Dict[tuple, Dict[str, Any]] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            lr = next((lr for prefix, lr in lr_groups.items() if name.startswith(prefix)), base_lr)
            decay = 0.0 if param.ndim <= 1 or name in skip else weight_decay
            entry = groups.setdefault((lr, decay), {'params': [], 'weight_decay': decay, 'lr_scale': lr / base_lr})
            entry['params'].append(param)
        unused = [prefix for prefix in lr_groups if not any(n.startswith(prefix) for n, _ in model.named_parameters())]
        if unused:
            raise RecipeError(f'train.lr_groups prefixes {unused} match no parameter of {type(model).__name__}')
        return list(groups.values())
    return group


def build_optimizer(cfg: Dict[str, Any], model: torch.nn.Module, updates_per_epoch: int):
    """The recipe's timm optimizer and timm schedule, stepped per optimizer step, or per epoch with
    `sched_on_epochs` (DeiT's way): (optimizer, scheduler, epochs incl. warmup)."""
    groups = {'param_group_fn': _lr_groups(cfg['lr_groups'], cfg['lr'], cfg['weight_decay'])} if cfg['lr_groups'] else {}
    optimizer = create_optimizer_v2(
        model, opt=cfg['opt'], lr=cfg['lr'], weight_decay=cfg['weight_decay'], **cfg['opt_args'], **groups)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=cfg['sched'], num_epochs=cfg['epochs'], warmup_epochs=cfg['warmup_epochs'],
        warmup_lr=cfg['warmup_lr'], warmup_prefix=cfg['warmup_prefix'], min_lr=cfg['min_lr'],
        decay_epochs=cfg['decay_epochs'], decay_rate=cfg['decay_rate'], step_on_epochs=cfg['sched_on_epochs'],
        updates_per_epoch=updates_per_epoch)
    return optimizer, scheduler, num_epochs


def _updates_per_epoch(num_batches: int, grad_accum: int) -> int:
    return max(1, math.ceil(num_batches / grad_accum))


def train(
        recipe: Dict[str, Any],
        output_dir: Union[str, Path],
        data: Optional[str] = None,
        resume: bool = False,
        exit_after_steps: Optional[int] = None,
        push_to_hub: Optional[str] = None,
        quiet: bool = False,
) -> Optional[Dict[str, Any]]:
    """Train `recipe` into `output_dir`; returns the final metrics (None when stopped by `exit_after_steps`).

    `output_dir` receives `checkpoints/step_<N>/` (Accelerate state, written atomically), `model/` (the Hub
    folder: config.json, model.safetensors, the card, the recipe) and whatever the task's report writes.
    `resume` continues from the newest checkpoint; `exit_after_steps` saves a checkpoint and stops after that
    many optimizer steps in total, for jobs that run in time-limited slots.
    """
    output_dir = Path(output_dir)
    cfg = recipe['train']
    task = task_module(recipe)
    accelerator = Accelerator(
        mixed_precision=cfg['mixed_precision'],
        gradient_accumulation_steps=cfg['grad_accum'],
        log_with=cfg['log_with'],
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / 'logs')),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=cfg['seed']),
    )
    if cfg['batch_size'] % accelerator.num_processes:
        raise RecipeError(
            f'batch_size {cfg["batch_size"]} does not split evenly over {accelerator.num_processes} processes')
    set_seed(cfg['seed'])
    accelerator.print(f'training {recipe["model"]} on {accelerator.num_processes} process(es), {accelerator.device}, '
                      f'global batch {cfg["batch_size"]} x {cfg["grad_accum"]} accumulation steps')

    model_args = task.model_kwargs(recipe, data) if hasattr(task, 'model_kwargs') else recipe['model_args']
    model = zoo.create_model(recipe['model'], **model_args)
    tract.attach(model, cfg['tract'])  # train.tract: TrAct's hook on the first layer's weight gradient
    if cfg['grad_checkpointing']:
        model.set_grad_checkpointing(True)
    train_set, eval_set, collate = task.datasets(recipe, model, data=data, output_dir=output_dir)
    # The loader's own generator keeps the global RNG (augmentation, dropout) untouched by starting an
    # iterator, so a run resumed mid-epoch draws the same random numbers as an uninterrupted one.
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg['batch_size'], shuffle=True, drop_last=True, collate_fn=collate,
        num_workers=cfg['num_workers'], generator=torch.Generator().manual_seed(cfg['seed']))
    if len(train_loader) == 0:
        raise RecipeError(f'{len(train_set)} training samples make no full batch of {cfg["batch_size"]}')
    optimizer, scheduler, num_epochs = build_optimizer(
        cfg, model, _updates_per_epoch(len(train_loader), cfg['grad_accum']))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # The EMA copy is made from the prepared model, so it lives on the same device.
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg['ema_decay']) if cfg['ema_decay'] else None
    loss_fn = task.make_loss(recipe, accelerator.unwrap_model(model))
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state, *([ema] if ema is not None else []))

    if resume:
        checkpoints = list_checkpoints(output_dir)
        if checkpoints:
            accelerator.load_state(str(checkpoints[-1]))
            accelerator.print(f'resumed from {checkpoints[-1]} (step {state.step})')
        else:
            accelerator.print(f'--resume: no checkpoint in {output_dir / "checkpoints"}, starting afresh')
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RECIPE_NAME).write_text(yaml.safe_dump(recipe, sort_keys=False))
    if cfg['log_with']:
        accelerator.init_trackers(recipe['model'], config=_flat(recipe))

    total_steps = num_epochs * _updates_per_epoch(len(train_loader), cfg['grad_accum'])
    progress = tqdm(total=total_steps, initial=state.step, desc=f'train {recipe["model"]}', unit='step',
                    disable=quiet or not accelerator.is_local_main_process, file=sys.stderr)
    model.train()
    while state.epoch < num_epochs:
        train_loader.set_epoch(state.epoch)
        if hasattr(train_set, 'set_epoch'):
            train_set.set_epoch(state.epoch)
        loader = accelerator.skip_first_batches(train_loader, state.batch_in_epoch) if state.batch_in_epoch else train_loader
        for batch in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg['clip_grad']:
                    accelerator.clip_grad_norm_(model.parameters(), cfg['clip_grad'])
                optimizer.step()
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            scheduler.step_update(state.step)  # epoch-wise schedules ignore this, and per-step ones .step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=state.step)
            progress.update(1)
            if state.step % cfg['log_every'] == 0 or state.step == total_steps:
                loss_value = accelerator.gather(loss.detach()).mean().item()
                progress.set_postfix(loss=f'{loss_value:.4g}', lr=f'{optimizer.param_groups[0]["lr"]:.3g}')
                if cfg['log_with']:
                    accelerator.log({'train/loss': loss_value, 'train/lr': optimizer.param_groups[0]['lr']}, step=state.step)
            if state.batch_in_epoch == len(train_loader):
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                scheduler.step(state.epoch)
            stopping = exit_after_steps is not None and state.step >= exit_after_steps
            if stopping or (cfg['checkpoint_every'] and state.step % cfg['checkpoint_every'] == 0):
                _save_checkpoint(accelerator, output_dir, state.step, cfg['keep_checkpoints'])
            if stopping:
                progress.close()
                accelerator.print(f'stopped after step {state.step}; continue with --resume')
                accelerator.end_training()  # last: it also shuts down the process group
                return None
        if state.batch_in_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            scheduler.step(state.epoch)
    progress.close()

    final_model = accelerator.unwrap_model(model)
    if ema is not None:
        final_model = copy.deepcopy(final_model)
        final_model.load_state_dict(ema.module.state_dict())
    final_model.eval()
    metrics = task.evaluate(recipe, final_model, eval_set, accelerator)
    if cfg['log_with']:
        accelerator.log({f'eval/{k}': v for k, v in metrics.items()}, step=state.step)
    if accelerator.is_main_process:
        folder = save_trained(final_model, output_dir / 'model', recipe, metrics, data=data)
        accelerator.print(f'wrote {folder}')
        accelerator.print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}))
        if hasattr(task, 'report'):
            metrics = task.report(recipe, folder, eval_set, metrics, output_dir)
        if push_to_hub:
            commit = hub.push_folder(folder, push_to_hub, commit_message=f'Train {recipe["model"]} with zoo')
            accelerator.print(f'pushed to {getattr(commit, "commit_url", push_to_hub)}')
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also shuts down the process group
    return metrics


def _flat(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    """Nested recipe -> flat `a/b` keys with scalar values, as trackers want their config."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f'{prefix}{key}/'))
        else:
            flat[f'{prefix}{key}'] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


# The Hub folder of a trained model


def save_trained(model: torch.nn.Module, directory: Union[str, Path], recipe: Dict[str, Any],
                 metrics: Dict[str, Any], data: Optional[str] = None) -> Path:
    """`zoo.hub.save_pretrained` plus the recipe, the data, the metrics and the weights' sha256 in the card."""
    directory = Path(directory)
    training = dict(recipe=recipe, data=data or recipe.get('data'), data_path=data, metrics=metrics)
    hub.save_pretrained(model, directory, training=training)
    return directory


def reproduce(folder: Union[str, Path], output_dir: Union[str, Path], data: Optional[str] = None,
              rtol: float = 0.01) -> Dict[str, Any]:
    """Re-run the recipe stored in a zoo-trained Hub folder and compare the result with its weights.

    Returns `{'verdict': 'bit-exact' | 'within tolerance' | 'differs', 'published': ..., 'reproduced': ...}`:
    bit-exact when the weight files hash the same (same hardware and software), otherwise the recorded metrics
    are compared with relative tolerance `rtol`.
    """
    folder = Path(folder)
    recipe_path = folder / RECIPE_NAME
    if not recipe_path.is_file():
        raise FileNotFoundError(
            f'{folder} has no {RECIPE_NAME}: it was not made by a zoo recipe (official weights cannot be re-run)')
    published = json.loads((folder / hub.TRAINING_NAME).read_text())
    recipe = check_recipe(yaml.safe_load(recipe_path.read_text()), source=str(recipe_path))
    metrics = train(recipe, output_dir, data=data or published.get('data_path'), quiet=True)
    new_folder = Path(output_dir) / 'model'
    new_sha = hub.sha256_file(new_folder / hub.WEIGHTS_NAME)
    if new_sha == published['weights_sha256']:
        verdict = 'bit-exact'
    else:
        close = all(
            math.isclose(metrics.get(k, math.nan), v, rel_tol=rtol)
            for k, v in published['metrics'].items() if isinstance(v, (int, float)))
        verdict = 'within tolerance' if close else 'differs'
    return dict(verdict=verdict, published=published['metrics'], reproduced=metrics,
                published_sha256=published['weights_sha256'], reproduced_sha256=new_sha)
