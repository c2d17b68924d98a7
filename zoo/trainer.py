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
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import safetensors
import safetensors.torch
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
from zoo.errors import CheckpointError, RecipeError
from zoo.hub import RECIPE_NAME

CHECKPOINT_PREFIX, STAGING_PREFIX = 'step_', '.staging-'
CHECKPOINT_FORMAT = 'zoo-checkpoint/1'
MANIFEST_NAME, TRAINER_STATE_NAME, EMA_NAME = 'manifest.json', 'trainer_state.json', 'ema.safetensors'
RNG_STATE_NAME = 'random_states_{}.safetensors'
PICKLE_SUFFIXES = ('.bin', '.pkl', '.pt', '.pth')

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
    """Checkpoint folders under `output_dir/checkpoints`, oldest first (complete or not: see `resume_checkpoint`)."""
    root = Path(output_dir) / 'checkpoints'
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def _rng_state() -> Dict[str, torch.Tensor]:
    """This process's Python, NumPy, torch and CUDA random states as tensors (what safetensors can hold)."""
    version, python_state, gauss = random.getstate()
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    tensors = {
        'python': torch.tensor([version, *python_state], dtype=torch.int64),
        'python_gauss': torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        'numpy': torch.from_numpy(numpy_keys.astype(np.int64)),
        'numpy_pos': torch.tensor([numpy_pos, numpy_has_gauss], dtype=torch.int64),
        'numpy_gauss': torch.tensor([numpy_gauss], dtype=torch.float64),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors.update({f'cuda_{i}': s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def _set_rng_state(tensors: Dict[str, torch.Tensor]) -> None:
    version, *python_state = tensors['python'].tolist()
    has_gauss, gauss = tensors['python_gauss'].tolist()
    random.setstate((version, tuple(python_state), gauss if has_gauss else None))
    pos, has_gauss = tensors['numpy_pos'].tolist()
    np.random.set_state(('MT19937', tensors['numpy'].numpy().astype(np.uint32), pos, has_gauss,
                         tensors['numpy_gauss'].item()))
    torch.set_rng_state(tensors['torch'])
    cuda = [tensors[f'cuda_{i}'] for i in range(sum(k.startswith('cuda_') for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int, state: TrainState,
                     scheduler, ema: Optional[ModelEmaV3]) -> Path:
    """One checkpoint folder, written in a staging folder and renamed into place once every rank has written.

    Accelerate writes the model (safetensors), the optimizer and (with fp16) the grad scaler; the zoo writes the
    progress and the schedule as JSON, the EMA weights and each process's random states as safetensors, and
    `manifest.json` (size and sha256 of every file) last. Accelerate's own random-state pickle is removed:
    nothing in the folder needs an unpickler beyond `weights_only=True`.
    """
    root = output_dir / 'checkpoints'
    final = root / f'{CHECKPOINT_PREFIX}{step:08d}'
    staging = root / f'{STAGING_PREFIX}{CHECKPOINT_PREFIX}{step:08d}'
    if accelerator.is_main_process:
        for leftover in root.glob(f'{STAGING_PREFIX}*') if root.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)  # from a killed save
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    (staging / f'random_states_{accelerator.process_index}.pkl').unlink(missing_ok=True)
    safetensors.torch.save_file(_rng_state(), staging / RNG_STATE_NAME.format(accelerator.process_index))
    if accelerator.is_main_process:
        progress = dict(progress=state.state_dict(), scheduler=scheduler.state_dict(), accelerator_step=accelerator.step)
        (staging / TRAINER_STATE_NAME).write_text(json.dumps(progress, indent=2) + '\n')
        if ema is not None:
            safetensors.torch.save_model(ema, str(staging / EMA_NAME))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = sorted(p for p in staging.rglob('*') if p.is_file())
        manifest = {str(p.relative_to(staging)): dict(bytes=p.stat().st_size, sha256=hub.sha256_file(p)) for p in files}
        (staging / MANIFEST_NAME).write_text(json.dumps(dict(format=CHECKPOINT_FORMAT, files=manifest), indent=2) + '\n')
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(folder: Union[str, Path]) -> Dict[str, Any]:
    """Check a checkpoint folder against its manifest before anything in it is read; returns the manifest.

    Every listed file must be there with its recorded size and sha256, no unlisted file may be there, the
    safetensors and JSON files must parse and the pickles must load with `weights_only=True`. A `CheckpointError`
    names the first file that fails.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest['files']
        if manifest.get('format') != CHECKPOINT_FORMAT or not isinstance(files, dict):
            raise ValueError(f'format {manifest.get("format")!r}')
    except FileNotFoundError as e:
        raise CheckpointError(f'{manifest_path} is missing: the save did not finish, or the folder was not '
                              'written by this version of the zoo') from e
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{manifest_path} is not a zoo checkpoint manifest ({e})') from e
    present = {str(p.relative_to(folder)): p for p in folder.rglob('*') if p.is_file() or p.is_symlink()}
    present.pop(MANIFEST_NAME)
    unlisted = sorted(set(present) - set(files))
    if unlisted:
        raise CheckpointError(f'{folder / unlisted[0]} is not listed in {MANIFEST_NAME}: the zoo did not write it; '
                              'remove it to resume from this checkpoint')
    for name, record in sorted(files.items()):
        path = folder / name
        if name not in present:  # also keeps a crafted name (`../x`) from reading anything outside the folder
            raise CheckpointError(f'{path} is missing from the checkpoint ({MANIFEST_NAME} lists it)')
        if path.is_symlink():
            raise CheckpointError(f'{path} is a link; a checkpoint holds only plain files')
        if not isinstance(record, dict) or path.stat().st_size != record.get('bytes') or \
                hub.sha256_file(path) != record.get('sha256'):
            raise CheckpointError(f'{path} does not match {MANIFEST_NAME} (size or sha256 differs): '
                                  'the file is truncated, corrupt or was replaced')
        _check_state_file(path)
    return manifest


def _check_state_file(path: Path) -> None:
    """Parse one checkpoint file the way resume will read it, without running anything it holds."""
    try:
        if path.suffix == '.json':
            json.loads(path.read_text())
        elif path.suffix == '.safetensors':
            with safetensors.safe_open(path, framework='pt'):
                pass
        elif path.suffix in PICKLE_SUFFIXES:  # accelerate's (optimizer, scaler, sampler); mmap reads only the pickle
            torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:  # json, safetensors and the weights_only unpickler each raise their own kinds
        raise CheckpointError(f'{path} cannot be read safely ({type(e).__name__}: {e}); the zoo unpickles '
                              'nothing beyond tensors and plain containers') from e


def resume_checkpoint(accelerator: Accelerator, output_dir: Path, state: TrainState, scheduler,
                      ema: Optional[ModelEmaV3], skip_damaged: bool = False) -> Optional[Path]:
    """Load the newest complete checkpoint of `output_dir`; None when there is none.

    A folder without a manifest (a save that did not finish) is passed over with a log line. A damaged one
    (a file missing, truncated, changed or added) stops the resume naming the file, unless `skip_damaged`,
    which passes over it to the next older checkpoint as well.
    """
    checkpoints = list_checkpoints(output_dir)
    for folder in reversed(checkpoints):
        if not (folder / MANIFEST_NAME).is_file():
            accelerator.print(f'--resume: passing over {folder}: no {MANIFEST_NAME} (an unfinished save)')
            continue
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            if not skip_damaged:
                raise CheckpointError(f'{e}. Use --skip-damaged-checkpoints to resume from an older checkpoint') from e
            accelerator.print(f'--resume: passing over {folder}: {e}')
            continue
        accelerator.load_state(str(folder))
        progress = json.loads((folder / TRAINER_STATE_NAME).read_text())
        state.load_state_dict(progress['progress'])
        scheduler.load_state_dict(progress['scheduler'])
        accelerator.step = progress['accelerator_step']
        if ema is not None:
            if not (folder / EMA_NAME).is_file():
                raise CheckpointError(f'{folder} has no {EMA_NAME}: it was saved by a run without train.ema_decay')
            safetensors.torch.load_model(ema, str(folder / EMA_NAME), device=str(accelerator.device))
        rng_path = folder / RNG_STATE_NAME.format(accelerator.process_index)
        if rng_path.is_file():
            _set_rng_state(safetensors.torch.load_file(rng_path))
        else:
            accelerator.print(f'--resume: {folder} has no random state for process {accelerator.process_index} '
                              '(saved with fewer processes): random numbers will differ from an uninterrupted run')
        return folder
    if checkpoints:
        raise CheckpointError(f'--resume: no complete checkpoint in {output_dir / "checkpoints"} '
                              f'({len(checkpoints)} unfinished or damaged)')
    return None


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
        skip_damaged_checkpoints: bool = False,
) -> Optional[Dict[str, Any]]:
    """Train `recipe` into `output_dir`; returns the final metrics (None when stopped by `exit_after_steps`).

    `output_dir` receives `checkpoints/step_<N>/` (Accelerate state, written atomically), `model/` (the Hub
    folder: config.json, model.safetensors, the card, the recipe) and whatever the task's report writes.
    `resume` continues from the newest complete checkpoint (`resume_checkpoint`); `exit_after_steps` saves a checkpoint and stops after that
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

    if resume:
        folder = resume_checkpoint(accelerator, output_dir, state, scheduler, ema, skip_damaged_checkpoints)
        if folder is not None:
            accelerator.print(f'resumed from {folder} (step {state.step})')
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
                _save_checkpoint(accelerator, output_dir, state.step, cfg['keep_checkpoints'], state, scheduler, ema)
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
