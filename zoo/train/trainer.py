"""One training loop for every zoo model, driven by a recipe and run by Accelerate.

`training/train.py` is the command-line face of `train()`. A recipe (YAML, `training/recipes/`) names the model,
the task, the data and the paper's hyperparameters; the task (a plug-in in `zoo.train`) supplies the data, the loss, the
metrics and the final report, and this module supplies everything the tasks share: Accelerate (devices, mixed
precision, gradient accumulation, DDP / FSDP / DeepSpeed), timm's optimizers and schedulers (stepped every
optimizer step or every epoch), EMA, atomic checkpoints with exact resume, and the Hub folder at the end.

Batches are global: `batch_size` in a recipe is the batch of one optimizer step summed over processes, split
evenly between them (Accelerate's `split_batches`), so a recipe means the same run at any world size.
"""
import contextlib
import copy
import difflib
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import safetensors
import safetensors.torch
import timm
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from safetensors.torch import load_file
from timm.utils import ModelEmaV3
from tqdm import tqdm

import zoo
from zoo import hub
from zoo._io import write_atomically
from zoo.errors import CheckpointError, InputError, RecipeError, ZooError
from zoo.hub import RECIPE_NAME
from zoo.models._builder import load_state_dict_strict, sha256_file
from zoo.train import tract
from zoo.train.classification import Classification
from zoo.train.dense import Depth, Segmentation
from zoo.train.task import Task
from zoo.train.video_fitting import VideoFitting

CHECKPOINT_PREFIX, STAGING_PREFIX = 'step_', '.staging-'
CHECKPOINT_FORMAT = 'zoo-checkpoint/1'
MANIFEST_NAME, TRAINER_STATE_NAME, EMA_NAME = 'manifest.json', 'trainer_state.json', 'ema.safetensors'
RNG_STATE_NAME = 'random_states_{}.safetensors'
PICKLE_SUFFIXES = ('.bin', '.pkl', '.pt', '.pth')

# A recipe's `task` -> the `zoo.train.task.Task` that supplies its data, loss, evaluation and report.
TASKS: Dict[str, Task] = {
    'classification': Classification(),
    'video': VideoFitting(),
    'depth': Depth(),
    'segmentation': Segmentation(),
}

TRAIN_DEFAULTS = dict(
    epochs=1, batch_size=32, opt='adamw', lr=1e-3, weight_decay=0.05, opt_args={}, sched='cosine',
    warmup_epochs=0, warmup_lr=0.0, min_lr=0.0, grad_accum=1, clip_grad=None, mixed_precision='no', seed=0,
    checkpoint_every=0, keep_checkpoints=2, log_every=10, log_with=None, num_workers=0, ema_decay=None,
    grad_checkpointing=False, lr_groups={}, warmup_prefix=False, decay_epochs=None, decay_rate=0.1,
    sched_on_epochs=False, fresh=False, tract=None, eval_every=None, best_metric=None, best_mode=None,
)

# Recipe schemas: key -> accepted types. `float` accepts an int too; `bool` is never taken for a number.
NONE = type(None)
RECIPE_SCHEMA = dict(source=(str,), model=(str,), task=(str,), model_args=(dict,), data=(dict,), train=(dict,),
                     aug=(dict,), loss=(str,))
TRAIN_SCHEMA = dict(
    epochs=(int,), batch_size=(int,), opt=(str,), lr=(float,), weight_decay=(float,), opt_args=(dict,), sched=(str,),
    warmup_epochs=(float,), warmup_lr=(float,), min_lr=(float,), grad_accum=(int,), clip_grad=(float, NONE),
    mixed_precision=(str, NONE), seed=(int,), checkpoint_every=(int,), keep_checkpoints=(int,), log_every=(int,),
    log_with=(str, list, NONE), num_workers=(int,), ema_decay=(float, NONE), grad_checkpointing=(bool,),
    lr_groups=(dict,), warmup_prefix=(bool,), decay_epochs=(float, list, NONE), decay_rate=(float,),
    sched_on_epochs=(bool,), eval_every=(int, str, NONE), best_metric=(str, NONE), best_mode=(str, NONE),
    fresh=(bool, dict), tract=(bool, dict, NONE),
)
# Lower bounds of the numbers a run cannot start without (timm's scheduler asserts deep inside otherwise).
TRAIN_MINIMUM = dict(epochs=1, batch_size=1, grad_accum=1, log_every=1, lr=0.0, weight_decay=0.0, warmup_epochs=0,
                     warmup_lr=0.0, min_lr=0.0, checkpoint_every=0, keep_checkpoints=0, num_workers=0)
TRAIN_CHOICES = dict(mixed_precision=('no', 'fp16', 'bf16', 'fp8', None), best_mode=('max', 'min', None))
# Metrics where lower is better, for a `train.best_metric` given without `best_mode`.
LOWER_IS_BETTER = ('loss', 'abs_rel', 'sq_rel', 'rmse', 'rmse_log', 'log10', 'silog')


def _type_name(types: tuple) -> str:
    names = {int: 'an integer', float: 'a number', str: 'a string', bool: 'true or false', dict: 'a mapping',
             list: 'a list', NONE: 'null'}
    return ' or '.join(names[t] for t in types)


def _fits(value: Any, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def check_section(values: Any, schema: Dict[str, tuple], section: str, source: str = 'recipe') -> None:
    """Refuse a section that is not a mapping, a key not in `schema` (suggesting the close one) and a value of
    the wrong type (naming the key)."""
    if not isinstance(values, dict):
        raise RecipeError(f'{source}: {section} must be a mapping of keys to values, got {values!r}')
    for key, value in values.items():
        name = f'{section}.{key}' if section else str(key)
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f'did you mean {close[0]!r}?' if close else f'known keys: {", ".join(sorted(schema))}'
            raise RecipeError(f'{source}: unknown key {name!r}; {hint}')
        if not _fits(value, schema[key]):
            raise RecipeError(f'{source}: {name} must be {_type_name(schema[key])}, got {value!r}')


# Recipes


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Read a recipe and apply `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f'recipe {path} not found; recipes live in training/recipes/<model>.yaml')
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f'recipe {path} is not valid YAML: {e}') from e
    if not isinstance(recipe, dict):
        raise RecipeError(f'recipe {path} must be a mapping (model: ..., task: ..., train: ...), got {recipe!r}')
    for override in overrides:
        key, sep, value = override.partition('=')
        if not sep or not key:
            raise RecipeError(f'override {override!r} is not KEY=VALUE (for example train.lr=5e-4)')
        node = recipe
        *parents, leaf = key.split('.')
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f'override {override!r}: {".".join(parents[:depth + 1])} is {node!r}, '
                                  'not a section with keys')
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
    """Check every section against its schema, fill the training defaults, and stop early on what cannot work
    (unknown task, model or key, a value of the wrong type or out of range)."""
    check_section(recipe, RECIPE_SCHEMA, '', source)
    for key in ('model', 'task'):
        if key not in recipe:
            raise RecipeError(f'{source} has no {key!r}; a recipe names the model, the task, the data and `train`')
    if recipe['task'] not in TASKS:
        raise RecipeError(f'{source}: unknown task {recipe["task"]!r}; known tasks: {", ".join(TASKS)}')
    zoo.registry.check_model_name(recipe['model'])
    task = TASKS[recipe['task']]
    train = dict(recipe.get('train') or {})
    check_section(train, TRAIN_SCHEMA, 'train', source)
    for key, minimum in TRAIN_MINIMUM.items():
        if key in train and train[key] < minimum:
            raise RecipeError(f'{source}: train.{key} must be at least {minimum}, got {train[key]!r}')
    for key, choices in TRAIN_CHOICES.items():
        if key in train and train[key] not in choices:
            raise RecipeError(f'{source}: train.{key} must be one of {", ".join(map(str, choices))}, got {train[key]!r}')
    check_section(recipe.get('data') or {}, task.data_schema, 'data', source)
    check_section(recipe.get('aug') or {}, task.aug_schema, 'aug', source)
    if 'loss' in recipe and not task.named_loss:
        raise RecipeError(f'{source}: task {recipe["task"]!r} has no choice of loss; remove the `loss` key')
    if train.get('eval_every') is not None:
        _eval_interval(train['eval_every'], source)
    if train.get('lr_groups') and (train.get('opt_args') or {}).get('layer_decay'):
        raise RecipeError(f'{source}: train.lr_groups and opt_args.layer_decay cannot be combined (timm skips layer '
                          'decay when parameter groups are given); use one of them')
    recipe = dict(recipe)
    recipe['train'] = {**TRAIN_DEFAULTS, **train}
    recipe.setdefault('model_args', {})
    recipe.setdefault('data', {})
    return recipe


def _eval_interval(every: Union[int, str, None], source: str = 'recipe') -> Tuple[int, str]:
    """`train.eval_every` as (count, 'epoch' | 'step'): `2` or `'2 epochs'` every two epochs, `'500 steps'`
    every 500 optimizer steps, 0 never (the run is still evaluated at its end)."""
    if isinstance(every, int):
        count, unit = every, 'epoch'
    else:
        match = re.fullmatch(r'\s*(\d+)\s*(epoch|step)s?\s*', str(every))
        if match is None:
            raise RecipeError(f"{source}: train.eval_every must be a number of epochs or '<N> steps', got {every!r}")
        count, unit = int(match.group(1)), match.group(2)
    if count < 0:
        raise RecipeError(f'{source}: train.eval_every must be at least 0, got {every!r}')
    return count, unit


def task_module(recipe: Dict[str, Any]) -> Task:
    """The task a (checked) recipe names."""
    return TASKS[recipe['task']]


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
        manifest = {str(p.relative_to(staging)): dict(bytes=p.stat().st_size, sha256=sha256_file(p)) for p in files}
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
                sha256_file(path) != record.get('sha256'):
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


# Evaluation during the run: the metrics history, the learning curve, the best checkpoint


@contextlib.contextmanager
def _rng_kept():
    """Run the block without touching the random state the training goes on with."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=None if torch.cuda.is_available() else []):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


class RunHistory:
    """`metrics.jsonl` (one JSON object per logged step: step, epoch, lr, train loss, throughput, eval metrics)
    and `learning_curve.png` in the run folder, written by the main process as the run goes."""

    def __init__(self, output_dir: Path, best_metric: str, enabled: bool):
        self.path, self.picture = output_dir / 'metrics.jsonl', output_dir / 'learning_curve.png'
        self.best_metric, self.enabled = best_metric, enabled
        self.records: List[Dict[str, Any]] = []

    def resume(self, step: int) -> None:
        """Keep the records of the steps a resumed run does not repeat."""
        if self.enabled and self.path.is_file():
            self.records = [r for r in map(json.loads, self.path.read_text().splitlines()) if r['step'] <= step]
            write_atomically(self.path, lambda f: f.write(''.join(json.dumps(r) + '\n' for r in self.records).encode()))

    def append(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        if any(k.startswith('eval_') for k in record):
            self.draw()

    def draw(self) -> None:
        """Training loss and the evaluated best metric against optimizer steps."""
        train = [(r['step'], r['train_loss']) for r in self.records if 'train_loss' in r]
        key = f'eval_{self.best_metric}'
        evals = [(r['step'], r[key]) for r in self.records if key in r]
        figure = Figure(figsize=(9, 3.5), layout='constrained')
        loss_axes, eval_axes = figure.subplots(1, 2)
        for axes, points, title in ((loss_axes, train, 'training loss'), (eval_axes, evals, f'eval {self.best_metric}')):
            if points:
                axes.plot(*zip(*points), marker='o' if len(points) < 30 else None)
            axes.set(title=title, xlabel='optimizer step')
            axes.grid(alpha=0.3)
        FigureCanvasAgg(figure)
        write_atomically(self.picture, lambda f: figure.savefig(f, format='png', dpi=80))


class BestCheckpoint:
    """The best evaluated weights by `metric` ('max' or 'min'), kept as a Hub folder in `directory`."""

    def __init__(self, directory: Path, metric: str, mode: str):
        self.directory, self.metric, self.mode = directory, metric, mode
        self.value: Optional[float] = None
        self.step = self.epoch = None

    def better(self, metrics: Dict[str, Any]) -> bool:
        if self.metric not in metrics:
            raise RecipeError(f'train.best_metric {self.metric!r} is not among the evaluated metrics '
                              f'{", ".join(metrics)}')
        value = metrics[self.metric]
        return self.value is None or (value > self.value if self.mode == 'max' else value < self.value)

    def update(self, metrics: Dict[str, Any], state: 'TrainState', save: Optional[Callable[[Path], Any]]) -> bool:
        """Remember `metrics` if better than the best so far, and `save(directory)` the weights then."""
        if not self.better(metrics):
            return False
        self.value, self.step, self.epoch = metrics[self.metric], state.step, state.epoch
        if save is not None:
            save(self.directory)
        return True

    def resume(self, step: int) -> None:
        """Pick up the best folder of an interrupted run, unless it comes from steps the resumed run repeats."""
        record = self.directory / hub.TRAINING_NAME
        if record.is_file():
            checkpoint = json.loads(record.read_text()).get('checkpoint', {})
            if checkpoint.get('step', math.inf) <= step:
                self.value, self.step, self.epoch = checkpoint['value'], checkpoint['step'], checkpoint['epoch']

    def describe(self) -> Dict[str, Any]:
        return dict(kind='best', metric=self.metric, mode=self.mode, value=self.value, step=self.step, epoch=self.epoch)


def _best_metric(cfg: Dict[str, Any], task: Task) -> Tuple[str, str]:
    """`train.best_metric` and its direction (`train.best_mode`, or from the metric's name), or the task's."""
    metric = cfg['best_metric'] or task.best_metric[0]
    if cfg['best_mode']:
        return metric, cfg['best_mode']
    if metric == task.best_metric[0]:
        return task.best_metric
    return metric, 'min' if metric in LOWER_IS_BETTER else 'max'


def _evaluate(task: Task, recipe: Dict[str, Any], model: torch.nn.Module, eval_set, accelerator) -> Dict[str, Any]:
    """The task's evaluation of `model` in eval mode, leaving its mode and the random state as they were."""
    was_training = model.training
    with _rng_kept():
        model.eval()
        try:
            return task.evaluate(recipe, model, eval_set, accelerator)
        finally:
            model.train(was_training)


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

    model = _create_model(recipe, _reading_data(task.model_kwargs, recipe, data))
    tract.attach(model, cfg['tract'])  # train.tract: TrAct's hook on the first layer's weight gradient
    if cfg['grad_checkpointing']:
        model.set_grad_checkpointing(True)
    train_set, eval_set, collate = _reading_data(task.datasets, recipe, model, data=data, output_dir=output_dir)
    label_names = task.label_names(train_set)
    if label_names and len(label_names) == model.num_classes:  # saved with the weights: zoo predict, the card
        model.pretrained_cfg = dict(model.pretrained_cfg, label_names=label_names, num_classes=model.num_classes)
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
    eval_every = cfg['eval_every'] if cfg['eval_every'] is not None else int(task.separate_eval_split)
    eval_count, eval_unit = _eval_interval(eval_every)
    best = BestCheckpoint(output_dir / 'best', *_best_metric(cfg, task))
    history = RunHistory(output_dir, best.metric, accelerator.is_main_process)
    history.resume(state.step)
    best.resume(state.step)
    meter = TrainMeter(accelerator, cfg['batch_size'] * cfg['grad_accum'])
    last_eval: Optional[Tuple[int, Dict[str, Any]]] = None

    def log_step(lr: float, epoch_ended: bool) -> None:
        """Log the training loss at `log_every` steps; evaluate at `eval_every` ones, keeping the best."""
        nonlocal last_eval
        due = eval_count and (state.step % eval_count == 0 if eval_unit == 'step'
                              else epoch_ended and state.epoch % eval_count == 0)
        if not due and state.step % cfg['log_every'] and state.step != total_steps:
            return
        record = dict(step=state.step, epoch=round(state.epoch + state.batch_in_epoch / len(train_loader), 4), lr=lr,
                      **meter.read())
        progress.set_postfix(loss=f'{record["train_loss"]:.4g}', lr=f'{lr:.3g}')
        if due:
            eval_model = ema.module if ema is not None else accelerator.unwrap_model(model)
            metrics = _evaluate(task, recipe, eval_model, eval_set, accelerator)
            last_eval = (state.step, metrics)
            record.update({f'eval_{k}': v for k, v in metrics.items()})
            save = (lambda folder: save_trained(
                eval_model, folder, recipe, metrics, data=data, environment=run_environment(accelerator),
                checkpoint=dict(best.describe(), reason=f'best {best.metric} ({best.mode}) so far'))
            ) if accelerator.is_main_process else None
            if best.update(metrics, state, save):
                accelerator.print(f'step {state.step}: best {best.metric} so far, {best.value:.6g}')
            meter.restart()  # throughput counts training time only
        history.append(record)
        if cfg['log_with']:
            accelerator.log({k: v for k, v in record.items() if k != 'step'}, step=state.step)

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
                meter.add(loss)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg['clip_grad']:
                    accelerator.clip_grad_norm_(model.parameters(), cfg['clip_grad'])
                optimizer.step()
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            lr = optimizer.param_groups[0]['lr']  # the lr of this step
            scheduler.step_update(state.step)  # epoch-wise schedules ignore this, and per-step ones .step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=state.step)
            progress.update(1)
            epoch_ended = state.batch_in_epoch == len(train_loader)
            if epoch_ended:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                scheduler.step(state.epoch)
            log_step(lr, epoch_ended)
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
            log_step(optimizer.param_groups[0]['lr'], epoch_ended=True)
    progress.close()

    final_model = accelerator.unwrap_model(model)
    if ema is not None:
        final_model = copy.deepcopy(final_model)
        final_model.load_state_dict(ema.module.state_dict())
    final_model.eval()
    if last_eval is not None and last_eval[0] == state.step:
        metrics = last_eval[1]
    else:
        metrics = task.evaluate(recipe, final_model, eval_set, accelerator)
        history.append(dict(step=state.step, epoch=state.epoch, **{f'eval_{k}': v for k, v in metrics.items()}))
        if cfg['log_with']:
            accelerator.log({f'eval_{k}': v for k, v in metrics.items()}, step=state.step)
    if accelerator.is_main_process:
        final_model, metrics, checkpoint = _final_checkpoint(final_model, metrics, best, state, eval_every)
        folder = save_trained(final_model, output_dir / 'model', recipe, metrics, data=data, checkpoint=checkpoint,
                              environment=run_environment(accelerator))
        accelerator.print(f'wrote {folder} ({checkpoint["kind"]} checkpoint: {checkpoint["reason"]})')
        accelerator.print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}))
        metrics = task.report(recipe, folder, eval_set, metrics, output_dir)
        if push_to_hub:
            commit = hub.push_folder(folder, push_to_hub, commit_message=f'Train {recipe["model"]} with zoo')
            accelerator.print(f'pushed to {getattr(commit, "commit_url", push_to_hub)}')
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also shuts down the process group
    return metrics


class TrainMeter:
    """Mean training loss over processes and samples per second since the last `read`."""

    def __init__(self, accelerator: Accelerator, samples_per_step: int):
        self.accelerator, self.samples_per_step = accelerator, samples_per_step
        self.loss_sum, self.batches = torch.zeros((), device=accelerator.device), 0
        self.restart()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach().float()
        self.batches += 1

    def restart(self) -> None:
        self.start, self.steps_at_start = time.perf_counter(), None

    def read(self) -> Dict[str, float]:
        """{'train_loss', 'samples_per_s'} since the last read (all processes must call it together)."""
        loss = (self.accelerator.gather(self.loss_sum[None]).mean() / max(self.batches, 1)).item()
        steps = max(1, self.batches // self.accelerator.gradient_accumulation_steps)
        seconds = time.perf_counter() - self.start
        self.loss_sum.zero_()
        self.batches = 0
        self.restart()
        return dict(train_loss=loss, samples_per_s=round(steps * self.samples_per_step / max(seconds, 1e-9), 3))


def _final_checkpoint(model: torch.nn.Module, last: Dict[str, Any], best: BestCheckpoint, state: TrainState,
                      eval_every: Union[int, str]) -> Tuple[torch.nn.Module, Dict[str, Any], Dict[str, Any]]:
    """The weights to publish and why: the best evaluated ones when they beat the last step's, else the last."""
    where = dict(step=state.step, epoch=state.epoch)
    if best.value is None:
        return model, last, dict(kind='last', **where, reason=f'no evaluation during the run (train.eval_every: {eval_every})')
    value = last[best.metric]
    beaten = best.value > value if best.mode == 'max' else best.value < value
    if not beaten or best.step == state.step:
        return model, last, dict(kind='last', **where, metric=best.metric, mode=best.mode, value=value,
                                 reason=f'the last step has the best {best.metric} ({best.mode}) of the run')
    model = copy.deepcopy(model)
    load_state_dict_strict(model, load_file(best.directory / hub.WEIGHTS_NAME), source=str(best.directory))
    published = json.loads((best.directory / hub.TRAINING_NAME).read_text())['metrics']
    return model, published, dict(
        best.describe(), last_step_metrics=last,
        reason=f'best {best.metric} ({best.mode}) of the run, {best.value:.6g} at step {best.step}, '
               f'against {value:.6g} at the last step {state.step}')


def _reading_data(read, *args, **kwargs):
    """`read(*args, **kwargs)`, a task reading its data: a file it cannot find or read is an InputError (one
    line on the command line), whatever library raised it."""
    try:
        return read(*args, **kwargs)
    except ZooError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(str(e)) from e


def _create_model(recipe: Dict[str, Any], model_args: Dict[str, Any]) -> torch.nn.Module:
    """The recipe's model; a model argument its constructor does not take is a recipe error naming it."""
    try:
        return zoo.create_model(recipe['model'], **model_args)
    except TypeError as e:
        match = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if match is None:
            raise
        raise RecipeError(f'model_args.{match.group(1)} is not an argument of {recipe["model"]} ({e})') from e


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
                 metrics: Dict[str, Any], data: Optional[str] = None,
                 checkpoint: Optional[Dict[str, Any]] = None, environment: Optional[Dict[str, Any]] = None) -> Path:
    """`zoo.hub.save_pretrained` plus the recipe, the data, the metrics and the weights' sha256 in the card;
    `checkpoint` says which weights these are (last or best) and why, `environment` what they were made with
    (`run_environment`)."""
    directory = Path(directory)
    training = dict(recipe=recipe, data=data or recipe.get('data'), data_path=data, metrics=metrics,
                    checkpoint=checkpoint, label_names=model.pretrained_cfg.get('label_names'),
                    environment=environment)
    hub.save_pretrained(model, directory, training=training)
    return directory


def run_environment(accelerator: Accelerator) -> Dict[str, Any]:
    """What a bit-exact re-run depends on besides the recipe: software versions, device, world size, CPU threads
    (reductions split differently over another thread count) and the deterministic flags."""
    return dict(
        torch=torch.__version__, timm=timm.__version__, zoo=zoo.__version__, python=platform.python_version(),
        machine=platform.machine(), device_type=accelerator.device.type, world_size=accelerator.num_processes,
        torch_threads=torch.get_num_threads(), deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        cudnn_deterministic=torch.backends.cudnn.deterministic, cudnn_benchmark=torch.backends.cudnn.benchmark)


@contextlib.contextmanager
def _recreated(environment: Dict[str, Any]):
    """Run the block with the recorded CPU thread count and deterministic flags, restoring the current ones."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if environment.get('torch_threads'):
            torch.set_num_threads(environment['torch_threads'])
        torch.use_deterministic_algorithms(environment.get('deterministic_algorithms', saved[1]))
        torch.backends.cudnn.deterministic = environment.get('cudnn_deterministic', saved[2])
        torch.backends.cudnn.benchmark = environment.get('cudnn_benchmark', saved[3])
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


def reproduce(folder: Union[str, Path], output_dir: Union[str, Path], data: Optional[str] = None,
              rtol: float = 0.01) -> Dict[str, Any]:
    """Re-run the recipe stored in a zoo-trained Hub folder and compare the result with its weights.

    The recorded thread count and deterministic flags are re-created (the seed is in the recipe). Returns
    `{'verdict': 'bit-exact' | 'within tolerance' | 'differs', 'published': ..., 'reproduced': ...,
    'environment_differences': {key: [recorded, now]}, 'metric_differences': {...}}`: bit-exact when the weight
    files hash the same, otherwise the recorded metrics are compared with relative tolerance `rtol`.
    """
    folder = Path(folder)
    recipe_path = folder / RECIPE_NAME
    if not recipe_path.is_file():
        raise InputError(
            f'{folder} has no {RECIPE_NAME}: it was not made by a zoo recipe (official weights cannot be re-run)')
    published = json.loads((folder / hub.TRAINING_NAME).read_text())
    recipe = check_recipe(yaml.safe_load(recipe_path.read_text()), source=str(recipe_path))
    recorded = published.get('environment') or {}
    with _recreated(recorded):
        metrics = train(recipe, output_dir, data=data or published.get('data_path'), quiet=True)
    new_folder = Path(output_dir) / 'model'
    new_sha = sha256_file(new_folder / hub.WEIGHTS_NAME)
    now = json.loads((new_folder / hub.TRAINING_NAME).read_text()).get('environment') or {}
    environment_differences = {k: [v, now.get(k)] for k, v in recorded.items() if now.get(k) != v}
    metric_differences = {k: [v, metrics.get(k)] for k, v in published['metrics'].items()
                          if isinstance(v, (int, float)) and metrics.get(k) != v}
    if new_sha == published['weights_sha256']:
        verdict = 'bit-exact'
    else:
        close = all(math.isclose(new, old, rel_tol=rtol) if new is not None else False
                    for old, new in metric_differences.values())
        verdict = 'within tolerance' if close else 'differs'
    return dict(verdict=verdict, published=published['metrics'], reproduced=metrics,
                published_sha256=published['weights_sha256'], reproduced_sha256=new_sha,
                environment_differences=environment_differences, metric_differences=metric_differences)
