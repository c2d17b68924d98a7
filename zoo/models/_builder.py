"""Building zoo models (timm's `build_model_with_cfg`) and reading their weights: official checkpoints,
training checkpoints and Hub folders (config.json + model.safetensors).

Every family's `_create_*` builds through `build_zoo_model`. A model built by the zoo carries a record
(`model.zoo_weights`): its provenance (`official`, `timm`, `zoo-trained`, `fine-tuned`, `random`, or `unknown` for
weights of no recorded origin), a fingerprint of the weights as built or loaded, and the measured results that
belong to them. `zoo.hub.save_pretrained` writes that record into config.json with the `weights_sha256` of
model.safetensors, and every load through the zoo refuses weights whose sha256 differs.
"""
import dataclasses
import hashlib
import json
import urllib.error
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import safetensors.torch
import timm
import torch
import torch.nn as nn
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors import SafetensorError
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from timm.models._hub import download_cached_file, hf_split

from zoo.errors import CheckpointError, InputError, WeightsUnavailableError
from zoo.registry import check_model_args, check_model_name, registry_name

# `pretrained_cfg.source` of weights published by a paper's authors in their own layout, converted on load.
OFFICIAL_SOURCE = 'official'
WEIGHT_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin', '.pth.tar', '.ckpt')
CONFIG_NAME, WEIGHTS_NAME = 'config.json', 'model.safetensors'
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
        filename = pretrained_cfg.get('hf_hub_filename') or official_hub_filename(pretrained_cfg, cache_dir)
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
    if pretrained_cfg.get('url'):
        return Path(download_cached_file(pretrained_cfg['url'], progress=True, cache_dir=cache_dir))
    raise CheckpointError(f'no official weights are declared for {pretrained_cfg.get("architecture")}')


def official_hub_filename(pretrained_cfg: Dict[str, Any], cache_dir: Optional[str] = None) -> str:
    """The one weight file of an official Hub repo whose file name the cfg does not record (a .safetensors one
    first), as a path inside the repo."""
    repo_id, revision = hf_split(pretrained_cfg['hf_hub_id'])
    try:
        folder = Path(snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=[f'*{s}' for s in WEIGHT_SUFFIXES]))
    except FETCH_ERRORS as e:
        raise weights_unavailable(pretrained_cfg, e) from e
    files = sorted(p for p in folder.rglob('*') if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    safe = [p for p in files if p.suffix == '.safetensors']
    names = [p.relative_to(folder).as_posix() for p in safe or files]
    if len(names) != 1:
        raise CheckpointError(
            f'{repo_id} holds {len(names)} weight files ({", ".join(names) or "none"}); name one with '
            "pretrained_cfg_overlay=dict(hf_hub_filename=...)")
    return names[0]


def check_official_weights(
        pretrained_cfg: Dict[str, Any],
        sha256: Optional[str] = None,
        cache_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """Fetch an official checkpoint into the cache timm loads it from, and check its sha256 (when one is
    recorded) before timm reads it.

    Returns the provenance of the file (`file`, `source`, `file_sha256`) and its `path`.
    """
    path = download_official_weights(pretrained_cfg, cache_dir)
    actual = sha256_file(path)
    if sha256 and actual != sha256:
        raise CheckpointError(
            f'{path} has sha256 {actual}, but {sha256} is recorded for it: the download is corrupt or the '
            'file changed upstream. Delete it from the cache and try again')
    return {'path': path, 'file': path.name, 'source': weights_location(pretrained_cfg), 'file_sha256': actual}


def _check_tensors_only(path: Path) -> None:
    """Refuse a pickled checkpoint that names any global `torch.load(weights_only=True)` does not allow, before
    anything is unpickled (a .safetensors file holds only tensors)."""
    if path.suffix == '.safetensors' or not zipfile.is_zipfile(path):  # a legacy pickle: weights_only refuses it
        return
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # torch raises RuntimeError or pickle errors for a damaged archive
        raise CheckpointError(f'{path} is not a readable PyTorch checkpoint (truncated or corrupt: {e})') from e
    if unsafe:
        raise CheckpointError(
            f'{path} holds objects other than tensors and plain containers ({", ".join(unsafe[:3])}). The zoo reads '
            'checkpoints with weights_only=True and never unpickles arbitrary objects')


def build_zoo_model(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool = False,
        weight_sha256: Optional[Dict[str, str]] = None,
        **kwargs,
) -> nn.Module:
    """timm's `build_model_with_cfg`, with official weights and Hub folders checked before timm loads them, and a
    record of what the weights are.

    Weights load through timm's `load_pretrained` (which adapts num_classes and in_chans, and runs before a
    `features_only` wrap) and the family's `checkpoint_filter_fn`, strictly. A pretrained cfg with
    `source='official'` names the authors' file (`url`, `hf_hub_id` [+ `hf_hub_filename`], or a local `file`
    given with `pretrained_cfg_overlay`): it is fetched into timm's cache and checked against
    `weight_sha256['arch.tag']` when recorded. A Hub folder (`local-dir:` / `hf-hub:`) whose config.json records
    `weights_sha256` has its model.safetensors checked. A failed fetch raises `WeightsUnavailableError`.
    """
    check_model_args(variant, kwargs)
    if kwargs.get('features_only') and not hasattr(model_cls, 'forward_intermediates'):
        raise InputError(
            f"{variant} has no features_only form: timm's feature wrappers take a backbone's stages, and this "
            'model is a whole dense or video model. Build its timm encoder with features_only=True instead, or '
            "use this model's forward_features")
    pretrained_cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.pop('pretrained_cfg', None),
        pretrained_cfg_overlay=kwargs.pop('pretrained_cfg_overlay', None),
    )
    folder = {}
    if pretrained and pretrained_cfg.source == OFFICIAL_SOURCE:
        if pretrained_cfg.hf_hub_id and not (pretrained_cfg.hf_hub_filename or pretrained_cfg.file):
            filename = official_hub_filename(pretrained_cfg.to_dict(), kwargs.get('cache_dir'))
            pretrained_cfg = dataclasses.replace(pretrained_cfg, hf_hub_filename=filename)
        tag_name = f'{pretrained_cfg.architecture}.{pretrained_cfg.tag}'
        official = check_official_weights(
            pretrained_cfg.to_dict(), sha256=(weight_sha256 or {}).get(tag_name), cache_dir=kwargs.get('cache_dir'))
        path = official.pop('path')
        if pretrained_cfg.file:
            # timm's own reader of a `file` keeps one entry of a checkpoint dict (EMA weights first) and drops the
            # rest (an HNeRV release's frame embeddings): the file is read whole and given to timm as a state dict.
            # `read_checkpoint` (weights_only) refuses anything but tensors itself.
            pretrained_cfg = dataclasses.replace(pretrained_cfg, state_dict=read_checkpoint(path))
        else:
            _check_tensors_only(path)  # timm reads this file: anything but tensors is refused first, by name
        provenance = {'kind': 'official', 'tag': pretrained_cfg.tag, **official}
    elif pretrained and pretrained_cfg.source in FOLDER_SOURCES:
        # A folder written by the zoo records its weights' sha256. One without the record (written by timm, say)
        # loads as timm loads it.
        location = pretrained_cfg.file if pretrained_cfg.source == 'local-dir' else pretrained_cfg.hf_hub_id
        folder = read_folder_config(location, cache_dir=kwargs.get('cache_dir'))
        if folder.get('weights_sha256'):
            weights_path = folder_file(location, WEIGHTS_NAME, None, kwargs.get('cache_dir'))
            check_weights_sha256(sha256_file(weights_path), folder['weights_sha256'], weights_path)
        provenance = folder.get('provenance') or {'kind': 'unknown'}
    elif pretrained and pretrained_cfg.has_weights:
        provenance = {'kind': 'timm', 'tag': pretrained_cfg.tag, 'source': weights_location(pretrained_cfg.to_dict())}
    else:
        provenance = random_provenance(kwargs)
    try:
        model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_cfg=pretrained_cfg, **kwargs)
    except FETCH_ERRORS as e:
        if pretrained:
            raise weights_unavailable(pretrained_cfg.to_dict(), e) from e
        raise WeightsUnavailableError(  # a dense model's pretrained encoder, fetched by timm inside the constructor
            f'could not fetch the pretrained encoder weights of {variant} through timm: {_first_line(e)}. Fetch them '
            'once online (then HF_HUB_OFFLINE=1 uses the cache), or build without them (--random, '
            'pretrained=False)') from e
    model.pretrained_cfg.pop('state_dict', None)  # the weights are in the model now, not kept twice
    if pretrained and provenance['kind'] in ('official', 'timm'):
        classes = pretrained_cfg.num_classes
        if classes and getattr(model, 'num_classes', classes) != classes:
            provenance['classifier'] = f'new, randomly initialised ({model.num_classes} classes, not {classes})'
    record_weights(model, provenance, folder.get('results', []))
    return model


def build_video_model(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool = False,
                      **kwargs) -> nn.Module:
    """`build_zoo_model` for a per-video representation (HNeRV, NeRV, NeRV++): it takes no num_classes,
    global_pool or in_chans, and its pretrained cfg's input size is the frame size it was built for."""
    model = build_zoo_model(
        model_cls, variant, pretrained, kwargs_filter=('num_classes', 'global_pool', 'in_chans'), **kwargs)
    model.pretrained_cfg['input_size'] = (3, *model.frame_size)
    return model


# ---------------------------------------------------------------------------------------------------------------
# What the weights are: provenance and fingerprint


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
        # evenly spaced indices in integer arithmetic: float32 linspace rounds past the end above 2**24 elements
        count = min(64, flat.numel())
        sample = flat[torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)]
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


def holds_tagged_weights(provenance: Dict[str, Any], tag: Optional[str]) -> bool:
    """True when the weights are exactly the published ones of `tag` (official or timm's, classifier included)."""
    return (bool(tag) and provenance.get('kind') in ('official', 'timm') and provenance.get('tag') == tag
            and 'classifier' not in provenance)


# ---------------------------------------------------------------------------------------------------------------
# Reading Hub folders


def check_weights_sha256(actual: str, expected: Optional[str], where: Union[str, Path]) -> str:
    """`actual`, the sha256 of a folder's weights; a CheckpointError naming both digests when config.json records
    another."""
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


def folder_file(location: Union[str, Path], filename: str, revision: Optional[str],
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
    config_path = folder_file(location, CONFIG_NAME, revision, cache_dir)
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
    weights_path = folder_file(location, WEIGHTS_NAME, revision, cache_dir)
    data = weights_path.read_bytes()
    check_weights_sha256(hashlib.sha256(data).hexdigest(), config.get('weights_sha256'), weights_path)
    try:
        return dict(sorted(safetensors.torch.load(data).items()))  # in key order, as `load_file` gives them
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f'{weights_path} is not a readable safetensors file (truncated or corrupt: {e}); download it again') from e


