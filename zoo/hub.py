"""Weights in and out: official checkpoints, Hub folders (config.json + model.safetensors + README.md).

Folders written here load with `timm.create_model("local-dir:...")`, `timm.create_model("hf-hub:...")`
and `transformers.AutoModelForImageClassification.from_pretrained(...)` once `import zoo` has run.
"""
import ctypes
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Optional, Union

import safetensors.torch
import timm
import torch
import torch.nn as nn
import yaml
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from safetensors import SafetensorError
from timm.models import build_model_with_cfg, resolve_pretrained_cfg, save_for_hf
from timm.models._hub import download_cached_file, hf_split

from zoo.errors import CheckpointError, InputError
from zoo.registry import check_model_args, check_model_name

_logger = logging.getLogger(__name__)

# `pretrained_cfg.source` of weights published by a paper's authors in their own layout, converted on load.
OFFICIAL_SOURCE = 'official'
WEIGHT_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin', '.pth.tar', '.ckpt')
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = 'config.json', 'model.safetensors', 'README.md'
TRAINING_NAME, RECIPE_NAME = 'training.json', 'training_recipe.yaml'
# Every file save_pretrained may write: a save replaces all of them (and drops those it does not write now).
ZOO_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, TRAINING_NAME, RECIPE_NAME)
SAVE_PREFIX = '.zoo-save-'


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
    check_model_args(variant, kwargs)
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


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    """The mode a plain `open(..., 'w')` gives (0o666 less the umask); temp files are made 0o600."""
    return 0o666 & ~_umask()


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


def check_output_dir(path: Union[str, Path]) -> Path:
    """`path` as a folder to write into (new or existing); an `InputError` when it, or a folder above it, is a file."""
    path = Path(path)
    for existing in (path, *path.parents):
        if existing.is_dir():
            break
        if existing.exists() or existing.is_symlink():
            where = 'is a file' if existing == path else f'is under {existing}, which is a file'
            raise InputError(f'{path} {where}; give a folder (new, or one to update)')
    return path


def _linux_renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2 if sys.platform.startswith('linux') else None
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return None


_RENAMEAT2 = _linux_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _swap_folders(new: Path, target: Path) -> None:
    """Put folder `new` at `target` with one rename (Linux `renameat2(RENAME_EXCHANGE)`); the old `target` ends up
    at `new`'s path. Where the exchange is missing, two renames leave `target` absent for a moment."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # anything but "not supported here"
            raise OSError(code, os.strerror(code), str(target))
    old = new.with_name(new.name + '-old')
    os.rename(target, old)
    os.rename(new, target)
    os.rename(old, new)


def _is_stale(save: Path) -> bool:
    """A `.zoo-save-<pid>.<host>.*` folder left by a save that is no longer running (or by an older zoo)."""
    pid, _, rest = save.name[len(SAVE_PREFIX):].partition('.')
    host = rest.rpartition('.')[0]
    if not pid.isdigit():
        return True  # written before the pid was recorded
    if host != socket.gethostname():
        return False  # another machine's save on a shared filesystem: it cannot be checked from here
    if int(pid) == os.getpid():
        return True  # an earlier save of this process, which raised before cleaning up
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def write_folder(directory: Union[str, Path], write: Callable[[Path], None],
                 owned: Collection[str] = ZOO_FILES) -> Path:
    """Replace folder `directory` all at once: the old folder or the new one, never a mix.

    `write(staging)` fills a new folder beside `directory`; the entries of the old folder not named in `owned`
    (files the zoo did not write) are hard-linked (or copied) into it; one rename swaps it in. A failed or
    killed write leaves the old folder as it was, and its leftovers (`.zoo-save-*` beside `directory`) are
    removed by the next write into the same parent.
    """
    target = check_output_dir(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f'{SAVE_PREFIX}*'):
        if _is_stale(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f'{SAVE_PREFIX}{os.getpid()}.{socket.gethostname()}.', dir=target.parent))
    try:
        write(staging)
        for written in staging.rglob('*'):
            if written.is_file():
                os.chmod(written, _file_mode())  # some writers (safetensors) make files 0o600
        if target.is_dir():
            for entry in target.iterdir():
                kept = staging / entry.name
                if entry.name in owned or kept.exists() or kept.is_symlink():
                    continue
                if entry.is_symlink():
                    os.symlink(os.readlink(entry), kept)
                elif entry.is_dir():
                    shutil.copytree(entry, kept, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(entry, kept)
            os.chmod(staging, target.stat().st_mode)
            _swap_folders(staging, target)
        else:
            os.chmod(staging, 0o777 & ~_umask())
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def save_pretrained(model: nn.Module, directory: Union[str, Path], training: Optional[Dict[str, Any]] = None) -> Path:
    """Write config.json, model.safetensors and README.md (the model card) into `directory`.

    `training` (`{'recipe': ..., 'data': ..., 'metrics': ...}`, from `zoo.trainer`) adds training.json and
    training_recipe.yaml, and a card section with the recipe, the data, the metrics and the weights' sha256.
    The folder is replaced as a whole (`write_folder`): the zoo's files of an earlier save that this one does
    not write (a training.json, a recipe) are gone, files the zoo did not write stay, and an interrupted save
    leaves the old folder as it was.
    """
    from zoo.cards import model_card, training_section

    def write(staging: Path) -> None:
        save_for_hf(model, staging, safe_serialization=True)
        _write_config(model, staging)
        card = model_card(model)
        if training is not None:
            record = dict(training, weights_sha256=sha256_file(staging / WEIGHTS_NAME))
            (staging / TRAINING_NAME).write_text(json.dumps(record, indent=2, default=str) + '\n')
            (staging / RECIPE_NAME).write_text(yaml.safe_dump(record['recipe'], sort_keys=False))
            card += training_section(record)
        (staging / CARD_NAME).write_text(card)

    write_folder(directory, write)
    return Path(directory)


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
        if not isinstance(arch, str) or not isinstance(config.get('model_args', {}), dict):
            raise TypeError('architecture must be a name, model_args an object')
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f'{config_path} is not a timm config.json (no readable "architecture")') from e
    try:
        check_model_name(arch)
    except RuntimeError as e:
        raise CheckpointError(
            f'{config_path} describes architecture {arch!r}, which is not registered with timm: {e}. If it is a '
            'zoo model, `import zoo` first; otherwise import the package that registers it') from e
    state_dict = read_checkpoint(weights_path)
    try:
        model = timm.create_model(f'local-dir:{config_path.parent}', pretrained=False, **kwargs)
    except TypeError as e:  # a constructor argument the architecture does not take
        raise CheckpointError(f'{config_path}: its model_args do not fit {arch} ({e})') from e
    load_state_dict_strict(model, state_dict, source=str(weights_path))
    return model.eval()
