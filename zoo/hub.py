"""Weights in and out: official checkpoints, Hub folders (config.json + model.safetensors + README.md).

Folders written here load with `timm.create_model("local-dir:...")`, `timm.create_model("hf-hub:...")`
and `transformers.AutoModelForImageClassification.from_pretrained(...)` once `import zoo` has run.

Every folder says what its weights are. A model built by the zoo carries a record (`model.zoo_weights`):
its provenance (`official`, `timm`, `zoo-trained`, `fine-tuned`, `random`, or `unknown` for weights of
no recorded origin), a fingerprint of the weights as built or loaded, and the measured results that belong
to them. `save_pretrained` writes that record into config.json (`provenance`, `results`) with the
`weights_sha256` of model.safetensors, and every load through the zoo refuses weights whose sha256 differs.
"""
import ctypes
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import urllib.error
from pathlib import Path
from typing import Any, Callable, Collection, Dict, List, Optional, Union

import safetensors.torch
import timm
import torch
import torch.nn as nn
import yaml
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors import SafetensorError
from timm.models import build_model_with_cfg, resolve_pretrained_cfg, save_for_hf
from timm.models._hub import download_cached_file, hf_split

from zoo._namespace import registry_name
from zoo.errors import CheckpointError, InputError, WeightsUnavailableError
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
# `pretrained_cfg.source` of a Hub folder, as timm sets it when loading `local-dir:` / `hf-hub:` names.
FOLDER_SOURCES = ('local-dir', 'hf-hub')
# The record of a model's weights, kept on the model (see the module docstring).
RECORD_ATTR = 'zoo_weights'
# What failed when weights could not be fetched: no network, offline mode, a missing file or repo.
FETCH_ERRORS = (urllib.error.URLError, LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError)


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


def weights_location(pretrained_cfg: Dict[str, Any]) -> str:
    """Where a pretrained cfg's weights are looked for: a local file, a Hub repo (and file) or a URL."""
    if pretrained_cfg.get('file'):
        return str(pretrained_cfg['file'])
    if pretrained_cfg.get('hf_hub_id'):
        filename = pretrained_cfg.get('hf_hub_filename')
        return f'Hub repo {pretrained_cfg["hf_hub_id"]}' + (f', file {filename}' if filename else '')
    return str(pretrained_cfg.get('url') or 'nowhere (no weights are declared)')


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def weights_unavailable(pretrained_cfg: Dict[str, Any], error: BaseException) -> WeightsUnavailableError:
    """The error for weights that could not be fetched: which file, where it was looked for, and the way round."""
    name = f'{pretrained_cfg.get("architecture")}.{pretrained_cfg.get("tag")}'
    filename = (pretrained_cfg.get('hf_hub_filename') or Path(str(pretrained_cfg.get('url') or '')).name
                or ('model.safetensors' if pretrained_cfg.get('hf_hub_id') else 'the weight file'))
    return WeightsUnavailableError(
        f'could not fetch the weights of {name} ({filename}) from {weights_location(pretrained_cfg)}: '
        f'{_first_line(error)}. '
        f'Download {filename} by hand and pass it with pretrained_cfg_overlay=dict(file="path/to/{filename}"), '
        'or with HF_HUB_OFFLINE=1 use what the Hugging Face cache already holds; `--random` tries the zoo CLI '
        'without weights')


def require_published_weights(model_name: str) -> None:
    """Stop at once, before any download, when `model_name` (`arch` or `arch.tag`) has no weights to load."""
    name = registry_name(model_name)
    check_model_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if not cfg.has_weights:
        raise WeightsUnavailableError(
            f'{model_name} has no published weights (`zoo card {name}` says where other weights exist): use '
            '--random to try the command with random weights, or give a Hub folder (`zoo convert` writes one '
            'from an official checkpoint)')


def download_official_weights(pretrained_cfg: Dict[str, Any], cache_dir: Optional[str] = None) -> Path:
    """The official weight file named by a pretrained cfg: a local `file` (as given by
    `pretrained_cfg_overlay=dict(file=...)`), else fetched from its Hub repo or URL through the caches."""
    if pretrained_cfg.get('file'):
        path = Path(pretrained_cfg['file']).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f'pretrained_cfg_overlay file {path} does not exist: give the path of the downloaded weight file')
        return path
    try:
        return _fetch_official_weights(pretrained_cfg, cache_dir)
    except FETCH_ERRORS as e:
        raise weights_unavailable(pretrained_cfg, e) from e


def _fetch_official_weights(pretrained_cfg: Dict[str, Any], cache_dir: Optional[str] = None) -> Path:
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
    """Download an official checkpoint, verify it (when a sha256 is recorded) and read it with `weights_only=True`.

    The model's provenance gets the file's name, where it came from and its sha256 (under the key `official_file`).
    """
    path = download_official_weights(pretrained_cfg, cache_dir)
    actual = sha256_file(path)
    if sha256 and actual != sha256:
        raise CheckpointError(
            f'{path} has sha256 {actual}, but {sha256} is recorded for it: the download is corrupt or the '
            'file changed upstream. Delete it from the cache and try again')
    state_dict = read_checkpoint(path)
    return {'state_dict': state_dict, 'file': path.name, 'source': weights_location(pretrained_cfg),
            'file_sha256': actual}


def build_zoo_model(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool = False,
        weight_sha256: Optional[Dict[str, str]] = None,
        **kwargs,
) -> nn.Module:
    """timm's `build_model_with_cfg`, plus weights in an official (non-timm) layout, checked Hub folders and
    a record of what the weights are.

    A pretrained cfg with `source='official'` names the authors' file (`hf_hub_id` [+ `hf_hub_filename`],
    `url`, or a local `file` given with `pretrained_cfg_overlay`); it is read, checked against
    `weight_sha256['arch.tag']` when recorded, passed through the family's `checkpoint_filter_fn` and loaded
    strictly. A Hub folder (`local-dir:` / `hf-hub:`) whose config.json records `weights_sha256` is read once,
    checked, and loaded from memory. Everything else is timm's own path; a failed fetch raises
    `WeightsUnavailableError`.
    """
    check_model_args(variant, kwargs)
    pretrained_cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.pop('pretrained_cfg', None),
        pretrained_cfg_overlay=kwargs.pop('pretrained_cfg_overlay', None),
    )
    source = pretrained_cfg.source
    folder = {}
    if pretrained and source == OFFICIAL_SOURCE:
        # Loaded by timm's own `load_pretrained` inside `build_model_with_cfg`: it adapts num_classes / in_chans
        # and runs before a `features_only` wrap (loading into the wrapped model afterwards fails). The state
        # dict reaches it through the filter fn, not the cfg, which timm copies (deeply, via asdict) onto the model.
        tag_name = f'{pretrained_cfg.architecture}.{pretrained_cfg.tag}'
        official = read_official_weights(
            pretrained_cfg.to_dict(), sha256=(weight_sha256 or {}).get(tag_name), cache_dir=kwargs.get('cache_dir'))
        state_dict = official.pop('state_dict')
        provenance = {'kind': 'official', 'tag': pretrained_cfg.tag, **official}
    elif pretrained and source in FOLDER_SOURCES:
        # A folder written by the zoo records its weights' sha256: they are read and checked here. One without
        # the record (written by timm, say) is loaded by timm as before.
        location = pretrained_cfg.file if source == 'local-dir' else pretrained_cfg.hf_hub_id
        folder = read_folder_config(location, cache_dir=kwargs.get('cache_dir'))
        state_dict = None
        if folder.get('weights_sha256'):
            state_dict = read_folder_weights(location, folder, cache_dir=kwargs.get('cache_dir'))
        provenance = folder.get('provenance') or {'kind': 'unknown'}
    elif pretrained and pretrained_cfg.has_weights:
        state_dict = None
        provenance = {'kind': 'timm', 'tag': pretrained_cfg.tag, 'source': weights_location(pretrained_cfg.to_dict())}
    else:
        state_dict = None
        provenance = random_provenance(kwargs)
    if state_dict is not None:
        filter_fn = kwargs['pretrained_filter_fn']
        kwargs['pretrained_filter_fn'] = lambda _placeholder, model: filter_fn(state_dict, model)
        pretrained_cfg = dataclasses.replace(pretrained_cfg, source=OFFICIAL_SOURCE, state_dict={OFFICIAL_SOURCE: True})
    try:
        model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_cfg=pretrained_cfg, **kwargs)
    except FETCH_ERRORS as e:
        if pretrained:
            raise weights_unavailable(pretrained_cfg.to_dict(), e) from e
        raise WeightsUnavailableError(  # a dense model's pretrained encoder, fetched by timm inside the constructor
            f'could not fetch the pretrained encoder weights of {variant} through timm: {_first_line(e)}. Fetch them '
            'once online (then HF_HUB_OFFLINE=1 uses the cache), or build without them (--random, '
            'pretrained=False)') from e
    if state_dict is not None:
        model.pretrained_cfg.pop('state_dict', None)
        model.pretrained_cfg['source'] = source
    if pretrained and provenance['kind'] in ('official', 'timm'):
        classes = pretrained_cfg.num_classes
        if classes and getattr(model, 'num_classes', classes) != classes:
            provenance['classifier'] = f'new, randomly initialised ({model.num_classes} classes, not {classes})'
    record_weights(model, provenance, folder.get('results', []))
    return model


# ---------------------------------------------------------------------------------------------------------------
# What the weights are: provenance, fingerprint, integrity


def random_provenance(model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """`random`, naming the pretrained encoder of a dense model built with `pretrained_encoder=True` (or
    `pretrained_backbones=True`)."""
    provenance = {'kind': 'random'}
    if model_kwargs.get('pretrained_encoder'):
        encoder = model_kwargs.get('encoder')
        provenance['encoder'] = f'timm {encoder} weights' if isinstance(encoder, str) else "timm's ImageNet weights"
    if model_kwargs.get('pretrained_backbones'):
        provenance['encoder'] = "timm's ImageNet classifiers, for the encoder and the decoder"
    return provenance


def weights_fingerprint(model: nn.Module) -> Optional[str]:
    """A cheap digest of the weights (each tensor's sum and 64 sampled values), to tell at save time whether they
    changed since they were built or loaded; None on the meta device."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:
            return None
        flat = tensor.detach().reshape(-1)
        sample = flat[torch.linspace(0, flat.numel() - 1, min(64, flat.numel()), device=flat.device).long()]
        total = flat.sum(dtype=torch.float64) if flat.is_floating_point() else flat.long().sum()
        digest.update(f'{name}|{tensor.dtype}|{tuple(tensor.shape)}|{total.item()!r}|'.encode())
        digest.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def record_weights(model: nn.Module, provenance: Dict[str, Any], results: Optional[List[Dict]] = None) -> nn.Module:
    """Set what `model`'s weights are now: their provenance and the measured results that belong to them."""
    setattr(model, RECORD_ATTR, {
        'provenance': provenance, 'results': list(results or []), 'fingerprint': weights_fingerprint(model)})
    return model


def mark_official(model: nn.Module, path: Optional[Union[str, Path]] = None,
                  releases: Optional[Dict[str, str]] = None) -> nn.Module:
    """Record that `model` holds weights converted from an official-layout checkpoint: the file at `path` (with
    its sha256, and the published `arch.tag` whose recorded sha256 in `releases` it matches), or a state dict."""
    if path is None:
        return record_weights(model, {'kind': 'official', 'source': 'a state dict in the official layout'})
    sha = sha256_file(path)
    provenance = {'kind': 'official', 'file': Path(path).name, 'source': 'a local file', 'file_sha256': sha}
    release = [name for name, digest in (releases or {}).items() if digest == sha]
    if release:
        provenance.update(release=release[0], tag=release[0].split('.', 1)[1])
    return record_weights(model, provenance)


def weights_provenance(model: nn.Module, training: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What `model`'s weights are now, from its record: as built or loaded, `fine-tuned` from that when they have
    changed since, and `zoo-trained` / `fine-tuned` with the recipe, data and metrics when `training` is given."""
    record = getattr(model, RECORD_ATTR, None)
    start = record['provenance'] if record else {'kind': 'unknown'}
    fingerprint = record and record['fingerprint']
    changed = bool(fingerprint) and weights_fingerprint(model) != fingerprint
    if training is not None:
        recipe = training.get('recipe') or {}
        trained = {'recipe': recipe, 'data': training.get('data'), 'metrics': training.get('metrics') or {}}
        if start['kind'] == 'random':
            extra = {k: v for k, v in start.items() if k != 'kind'}
            return {'kind': 'zoo-trained', **extra, **trained}
        return {'kind': 'fine-tuned', 'from': start, **trained}
    if not changed:
        return start
    how = 'the weights changed after they were built or loaded, outside training/train.py: how is not recorded'
    if start['kind'] in ('random', 'unknown'):
        return {'kind': 'unknown', 'from': start, 'how': how}
    return {'kind': 'fine-tuned', 'from': start, 'how': how}


def weights_results(model: nn.Module, provenance: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The measured results recorded for `model`'s weights; none once they have changed."""
    record = getattr(model, RECORD_ATTR, None)
    if not record or provenance is not record['provenance']:
        return []
    return list(record['results'])


def check_weights_sha256(data: bytes, expected: Optional[str], where: Union[str, Path]) -> str:
    """sha256 of `data`; a CheckpointError naming both digests when config.json records another."""
    actual = hashlib.sha256(data).hexdigest()
    if expected and actual != expected:
        raise CheckpointError(
            f'{where} has sha256 {actual}, but its config.json records weights_sha256 {expected}: the file is '
            'truncated or corrupt, or holds other weights. Download the folder again (or re-save it)')
    return actual


def _hub_file(location: str, filename: str, revision: Optional[str], cache_dir: Optional[str]) -> Path:
    repo_id, split_revision = hf_split(location)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or split_revision, cache_dir=cache_dir))
    except FETCH_ERRORS as e:
        raise weights_unavailable({'architecture': repo_id, 'tag': revision or split_revision or 'main',
                                   'hf_hub_id': repo_id, 'hf_hub_filename': filename}, e) from e


def _folder_file(location: Union[str, Path], filename: str, revision: Optional[str],
                 cache_dir: Optional[str]) -> Path:
    """`filename` of a Hub folder: in a local directory, or downloaded from a Hub repo id."""
    path = Path(location)
    if not path.is_dir():
        return _hub_file(str(location), filename, revision, cache_dir)
    if not (path / filename).is_file():
        raise FileNotFoundError(f'{path} is not a zoo Hub folder: {filename} is missing')
    return path / filename


def read_folder_config(location: Union[str, Path], revision: Optional[str] = None,
                       cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """config.json of a Hub folder: a local directory, or a Hub repo id (`repo@revision` allowed)."""
    config_path = _folder_file(location, CONFIG_NAME, revision, cache_dir)
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise CheckpointError(f'{config_path} is not a timm config.json (not valid JSON: {e})') from e
    if not isinstance(config, dict):
        raise CheckpointError(f'{config_path} is not a timm config.json (not a JSON object)')
    return config


def read_folder_weights(location: Union[str, Path], config: Dict[str, Any], revision: Optional[str] = None,
                        cache_dir: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """model.safetensors of a Hub folder, read once and checked against config.json's `weights_sha256` (when it
    records one) before any tensor is made from it."""
    weights_path = _folder_file(location, WEIGHTS_NAME, revision, cache_dir)
    data = weights_path.read_bytes()
    check_weights_sha256(data, config.get('weights_sha256'), weights_path)
    try:
        return dict(sorted(safetensors.torch.load(data).items()))  # in key order, as `load_file` gives them
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f'{weights_path} is not a readable safetensors file (truncated or corrupt: {e}); download it again') from e


# ---------------------------------------------------------------------------------------------------------------
# Hub folders


def _write_config(model: nn.Module, directory: Path, training: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """timm's config.json, made loadable by transformers too, plus what the weights are; returns the config.

    timm >= 1.0.29 repeats `num_classes` inside `model_args`; transformers' TimmWrapper passes
    `num_classes` itself and fails on the duplicate. timm reads the top-level `num_classes`, so the
    copy in `model_args` is dropped and the file serves both. A model's `export_model_args()`, if it has
    one, adds the constructor arguments of state it took on after construction. `weights_record` adds
    the provenance, the results and the weights' sha256.
    """
    config_path = directory / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config.get('model_args', {}).pop('num_classes', None)
    if hasattr(model, 'export_model_args'):
        config.setdefault('model_args', {}).update(model.export_model_args())
    config.update(weights_record(model, sha256_file(directory / WEIGHTS_NAME), training))
    _drop_claims_not_held(config)
    config_path.write_text(json.dumps(config, indent=2, default=str) + '\n')
    return config


def weights_record(model: nn.Module, weights_sha256: str, training: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """config.json's `provenance`, `weights_sha256` and `results` for `model` as it is now."""
    provenance = weights_provenance(model, training)
    results = weights_results(model, provenance)
    if training is not None:
        results.append(training_result(training, weights_sha256))
    return {'provenance': provenance, 'weights_sha256': weights_sha256, 'results': results}


def training_result(training: Dict[str, Any], weights_sha256: str) -> Dict[str, Any]:
    """The final evaluation of `training/train.py` as a `results` entry (the agreed config.json schema)."""
    recipe = training.get('recipe') or {}
    spec = recipe.get('data') or {}
    metrics = {k: v for k, v in (training.get('metrics') or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    data = training.get('data')
    dataset = data if isinstance(data, str) else (
        spec.get('dataset') or spec.get('data_dir') or spec.get('path') or json.dumps(spec, sort_keys=True))
    # a video model is fitted to its frames and measured on the same frames
    split = spec.get('eval_split') or ('the fitted frames' if recipe.get('task') == 'video' else 'eval')
    protocol = {'evaluation': "the recipe's own, during training"}
    checkpoint = training.get('checkpoint')
    if checkpoint:
        protocol['checkpoint'] = f'{checkpoint.get("kind")}, step {checkpoint.get("step")}: {checkpoint.get("reason")}'
    return {
        'task': recipe.get('task'), 'dataset': dataset, 'split': split, 'metrics': metrics, 'protocol': protocol,
        'weights_sha256': weights_sha256, 'date': datetime.date.today().isoformat(),
        'command': 'accelerate launch training/train.py --recipe training_recipe.yaml',
    }


def holds_tagged_weights(provenance: Dict[str, Any], tag: Optional[str]) -> bool:
    """True when the weights are exactly the published ones of `tag` (official or timm's, classifier included)."""
    return (bool(tag) and provenance.get('kind') in ('official', 'timm') and provenance.get('tag') == tag
            and 'classifier' not in provenance)


def _drop_claims_not_held(config: Dict[str, Any]) -> None:
    """A folder keeps the pretrained tag, description and notes only when it holds those weights."""
    pretrained_cfg = config.get('pretrained_cfg', {})
    if not holds_tagged_weights(config['provenance'], pretrained_cfg.get('tag')):
        for key in ('tag', 'description', 'notes'):
            pretrained_cfg.pop(key, None)


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

    config.json records what the weights are (`provenance`), their `weights_sha256` and the measured `results`
    that belong to them; the card is rendered from it. `training` (`{'recipe': ..., 'data': ..., 'metrics':
    ...}`, from `zoo.trainer`) makes the weights `zoo-trained` (or `fine-tuned` from pretrained ones) and adds
    training.json and training_recipe.yaml. The folder is replaced as a whole (`write_folder`): the zoo's files
    of an earlier save that this one does not write (a training.json, a recipe) are gone, files the zoo did not
    write stay, and an interrupted save leaves the old folder as it was.
    """
    from zoo.cards import model_card  # zoo.cards imports this module

    def write(staging: Path) -> None:
        # Class names at the top level, where transformers' TimmWrapperConfig reads them (timm moves them back
        # into the pretrained cfg on load).
        label_names = getattr(model, 'pretrained_cfg', {}).get('label_names')
        save_for_hf(model, staging, model_config={'label_names': label_names} if label_names else None,
                    safe_serialization=True)
        config = _write_config(model, staging, training)
        if training is not None:
            record = dict(training, weights_sha256=config['weights_sha256'])
            (staging / TRAINING_NAME).write_text(json.dumps(record, indent=2, default=str) + '\n')
            (staging / RECIPE_NAME).write_text(yaml.safe_dump(record['recipe'], sort_keys=False))
        (staging / CARD_NAME).write_text(model_card(model, config=config))

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
    weight file, weights whose sha256 differs from the one config.json records, or weights of another
    architecture each stop with an error that says what is wrong. The model keeps the folder's provenance
    and results (see `save_pretrained`).
    """
    config = read_folder_config(name_or_path, revision=revision)
    arch = config.get('architecture')
    if not isinstance(arch, str) or not isinstance(config.get('model_args', {}), dict):
        raise CheckpointError(
            f'{Path(name_or_path) / CONFIG_NAME} is not a timm config.json (no readable "architecture", or "model_args" '
            'that is not an object)')
    try:
        check_model_name(arch)
    except RuntimeError as e:
        raise CheckpointError(
            f'{name_or_path}: config.json describes architecture {arch!r}, which is not registered with timm: {e}. '
            'If it is a zoo model, `import zoo` first; otherwise import the package that registers it') from e
    state_dict = read_folder_weights(name_or_path, config, revision=revision)
    folder = _folder_file(name_or_path, CONFIG_NAME, revision, None).parent  # a Hub repo's: its HF cache snapshot
    try:
        model = timm.create_model(f'local-dir:{folder}', pretrained=False, **kwargs)
    except TypeError as e:  # a constructor argument the architecture does not take
        raise CheckpointError(f'{Path(name_or_path) / CONFIG_NAME}: its model_args do not fit {arch} ({e})') from e
    load_state_dict_strict(model, state_dict, source=f'{name_or_path} ({WEIGHTS_NAME})')
    record_weights(model, config.get('provenance') or {'kind': 'unknown'}, config.get('results'))
    return model.eval()
