"""Weights in and out: official checkpoints, Hub folders (config.json + model.safetensors + README.md).

Folders written here load with `timm.create_model("local-dir:...")`, `timm.create_model("hf-hub:...")`
and `transformers.AutoModelForImageClassification.from_pretrained(...)` once `import zoo` has run.
"""
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import safetensors.torch
import timm
import torch
import torch.nn as nn
import yaml
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from safetensors import SafetensorError
from timm.models import build_model_with_cfg, resolve_pretrained_cfg, save_for_hf
from timm.models._hub import download_cached_file, hf_split

from zoo.errors import CheckpointError
from zoo.registry import check_model_name

_logger = logging.getLogger(__name__)

# `pretrained_cfg.source` of weights published by a paper's authors in their own layout, converted on load.
OFFICIAL_SOURCE = 'official'
WEIGHT_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin', '.pth.tar', '.ckpt')
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = 'config.json', 'model.safetensors', 'README.md'
TRAINING_NAME, RECIPE_NAME = 'training.json', 'training_recipe.yaml'


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints


def sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Tensors of a .safetensors file, or a .pth/.pt/.bin checkpoint unpickled with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint file at {path}')
    if path.suffix == '.safetensors':
        try:
            return safetensors.torch.load_file(path, device='cpu')
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f'{path} is not a readable safetensors file (truncated or corrupt: {e}); download it again') from e
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError for bad files
        raise CheckpointError(
            f'{path} could not be read as a PyTorch checkpoint with weights_only=True ({type(e).__name__}: {e}). '
            'It is truncated, corrupt, or holds objects other than tensors and plain containers; the zoo never '
            'unpickles arbitrary objects') from e


def load_state_dict_strict(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = 'checkpoint') -> None:
    """Load all of `state_dict` into `model` or nothing, naming what does not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}'
        for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        arch = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
        problems = []
        for what, keys in (('missing', missing), ('unexpected', unexpected), ('of another shape', mismatched)):
            if keys:
                problems.append(f'{len(keys)} keys {what} (first: {", ".join(keys[:3])})')
        raise CheckpointError(
            f'{source} does not fit {arch}: {"; ".join(problems)}. It was made for another architecture or config')
    model.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# Official weights, converted on load


def download_official_weights(pretrained_cfg: Dict[str, Any], cache_dir: Optional[str] = None) -> Path:
    """Fetch an official weight file named by a pretrained cfg (Hub repo or URL), through the caches."""
    if pretrained_cfg.get('hf_hub_id'):
        repo_id, revision = hf_split(pretrained_cfg['hf_hub_id'])
        if pretrained_cfg.get('hf_hub_filename'):
            return Path(hf_hub_download(
                repo_id, pretrained_cfg['hf_hub_filename'], revision=revision, cache_dir=cache_dir))
        # the official repo's file name is not recorded: take its one weight file
        folder = Path(snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=[f'*{s}' for s in WEIGHT_SUFFIXES]))
        files = sorted(p for p in folder.rglob('*') if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        safe = [p for p in files if p.suffix == '.safetensors']
        files = safe or files
        if len(files) != 1:
            names = [str(p.relative_to(folder)) for p in files]
            raise CheckpointError(
                f'{repo_id} holds {len(files)} weight files ({", ".join(names) or "none"}); name one with '
                "pretrained_cfg_overlay=dict(hf_hub_filename=...)")
        return files[0]
    if pretrained_cfg.get('url'):
        return Path(download_cached_file(pretrained_cfg['url'], progress=True, cache_dir=cache_dir))
    raise CheckpointError(f'no official weights are declared for {pretrained_cfg.get("architecture")}')


def read_official_weights(
        pretrained_cfg: Dict[str, Any],
        sha256: Optional[str] = None,
        cache_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """Download an official checkpoint, verify it (when a sha256 is recorded) and read it with `weights_only=True`."""
    path = download_official_weights(pretrained_cfg, cache_dir)
    if sha256:
        actual = sha256_file(path)
        if actual != sha256:
            raise CheckpointError(
                f'{path} has sha256 {actual}, but {sha256} is recorded for it: the download is corrupt or the '
                'file changed upstream. Delete it from the cache and try again')
    return read_checkpoint(path)


def build_zoo_model(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool = False,
        weight_sha256: Optional[Dict[str, str]] = None,
        **kwargs,
) -> nn.Module:
    """timm's `build_model_with_cfg`, plus weights in an official (non-timm) layout.

    A pretrained cfg with `source='official'` names the authors' file (`hf_hub_id` [+ `hf_hub_filename`]
    or `url`); it is downloaded, checked against `weight_sha256['arch.tag']` when recorded, passed through
    the family's `checkpoint_filter_fn` and loaded strictly. Everything else is timm's own path.
    """
    pretrained_cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.pop('pretrained_cfg', None),
        pretrained_cfg_overlay=kwargs.pop('pretrained_cfg_overlay', None),
    )
    official = pretrained and pretrained_cfg.source == OFFICIAL_SOURCE
    if official:
        # Loaded by timm's own `load_pretrained` inside `build_model_with_cfg`: it adapts num_classes / in_chans
        # and runs before a `features_only` wrap (loading into the wrapped model afterwards fails). The state
        # dict reaches it through the filter fn, not the cfg, which timm copies (deeply, via asdict) onto the model.
        tag_name = f'{pretrained_cfg.architecture}.{pretrained_cfg.tag}'
        state_dict = read_official_weights(
            pretrained_cfg.to_dict(), sha256=(weight_sha256 or {}).get(tag_name), cache_dir=kwargs.get('cache_dir'))
        filter_fn = kwargs['pretrained_filter_fn']
        kwargs['pretrained_filter_fn'] = lambda _placeholder, model: filter_fn(state_dict, model)
        pretrained_cfg = dataclasses.replace(pretrained_cfg, state_dict={OFFICIAL_SOURCE: True})
    model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_cfg=pretrained_cfg, **kwargs)
    if official:
        model.pretrained_cfg.pop('state_dict', None)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Hub folders


def _write_config(model: nn.Module, directory: Path) -> None:
    """timm's config.json, made loadable by transformers too.

    timm >= 1.0.29 repeats `num_classes` inside `model_args`; transformers' TimmWrapper passes
    `num_classes` itself and fails on the duplicate. timm reads the top-level `num_classes`, so the
    copy in `model_args` is dropped and the file serves both. A model's `export_model_args()`, if it has
    one, adds the constructor arguments of state it took on after construction.
    """
    config_path = directory / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config.get('model_args', {}).pop('num_classes', None)
    if hasattr(model, 'export_model_args'):
        config.setdefault('model_args', {}).update(model.export_model_args())
    config_path.write_text(json.dumps(config, indent=2) + '\n')


def _file_mode() -> int:
    """The mode a plain `open(..., 'w')` gives (0o666 less the umask); temp files are made 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def replace_file(finished: Union[str, Path], target: Union[str, Path]) -> None:
    """Move a completely written temp file over `target`, readable like any file the user writes."""
    os.chmod(finished, _file_mode())
    os.replace(finished, target)


def write_atomically(path: Union[str, Path], write: Callable[[Any], None]) -> Path:
    """`write(binary_file)` into a temp file beside `path`, moved over it only once complete: a failed or
    interrupted write never leaves half a file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}-', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
        replace_file(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def save_pretrained(model: nn.Module, directory: Union[str, Path], training: Optional[Dict[str, Any]] = None) -> Path:
    """Write config.json, model.safetensors and README.md (the model card) into `directory`.

    `training` (`{'recipe': ..., 'data': ..., 'metrics': ...}`, from `zoo.trainer`) adds training.json and
    training_recipe.yaml, and a card section with the recipe, the data, the metrics and the weights' sha256.
    The files are written into a temporary folder beside `directory` and moved into place only once
    all of them are complete, so an interrupted save never leaves a half-written file behind.
    """
    from zoo.cards import model_card, training_section

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix='.zoo-save-', dir=directory.parent))
    try:
        # Class names at the top level, where transformers' TimmWrapperConfig reads them (timm moves them back
        # into the pretrained cfg on load).
        label_names = getattr(model, 'pretrained_cfg', {}).get('label_names')
        save_for_hf(model, staging, model_config={'label_names': label_names} if label_names else None,
                    safe_serialization=True)
        _write_config(model, staging)
        names = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]
        card = model_card(model)
        if training is not None:
            training = dict(training, weights_sha256=sha256_file(staging / WEIGHTS_NAME))
            (staging / TRAINING_NAME).write_text(json.dumps(training, indent=2, default=str) + '\n')
            (staging / RECIPE_NAME).write_text(yaml.safe_dump(training['recipe'], sort_keys=False))
            card += training_section(training)
            names += [TRAINING_NAME, RECIPE_NAME]
        (staging / CARD_NAME).write_text(card)
        for name in names:
            replace_file(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def push_folder(
        directory: Union[str, Path],
        repo_id: str,
        commit_message: str = 'Add model',
        private: bool = False,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
):
    """Upload a folder written by `save_pretrained` to a Hub model repo (created if missing)."""
    directory = Path(directory)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f'{directory} is not a zoo Hub folder: {", ".join(missing)} missing')
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=directory,
        allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, TRAINING_NAME, RECIPE_NAME],
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
    )


def push_to_hub(model: nn.Module, repo_id: str, **kwargs):
    """`save_pretrained` into a temporary folder, then `push_folder` it; kwargs go to `push_folder`."""
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        return push_folder(tmp, repo_id, **kwargs)


def load(name_or_path: Union[str, Path], revision: Optional[str] = None, **kwargs) -> nn.Module:
    """A model from a Hub folder (local directory or Hub repo id), in eval mode, checked on the way.

    Unlike plain `timm.create_model("local-dir:...")`, a config for an unregistered architecture, a corrupt
    weight file or weights of another architecture each stop with an error that says what is wrong.
    """
    path = Path(name_or_path)
    if path.is_dir():
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        for p in (config_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f'{path} is not a zoo Hub folder: {p.name} is missing')
    else:
        config_path = Path(hf_hub_download(str(name_or_path), CONFIG_NAME, revision=revision))
        weights_path = Path(hf_hub_download(str(name_or_path), WEIGHTS_NAME, revision=revision))
    try:
        config = json.loads(config_path.read_text())
        arch = config['architecture']
    except (ValueError, KeyError) as e:
        raise CheckpointError(f'{config_path} is not a timm config.json (no readable "architecture")') from e
    try:
        check_model_name(arch)
    except RuntimeError as e:
        raise CheckpointError(
            f'{config_path} describes architecture {arch!r}, which is not registered with timm: {e}. If it is a '
            'zoo model, `import zoo` first; otherwise import the package that registers it') from e
    state_dict = read_checkpoint(weights_path)
    model = timm.create_model(f'local-dir:{config_path.parent}', pretrained=False, **kwargs)
    load_state_dict_strict(model, state_dict, source=str(weights_path))
    return model.eval()
