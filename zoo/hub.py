"""Hub folders (config.json + model.safetensors + README.md): `save_pretrained`, `push_to_hub` and `load`.

Folders written here load with `timm.create_model("local-dir:...")`, `timm.create_model("hf-hub:...")`
and `transformers.AutoModelForImageClassification.from_pretrained(...)` once `import zoo` has run.

Every folder says what its weights are. A model built or loaded by the zoo carries a record of its weights
(`model.zoo_weights`, see `zoo.models._builder`). `save_pretrained` writes that record into config.json
(`provenance`, `results`) with the `weights_sha256` of model.safetensors, and every load through the zoo
refuses weights whose sha256 differs.
"""
import datetime
import json
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import timm
import torch
import torch.nn as nn
import yaml
from huggingface_hub import HfApi
from timm.models import save_for_hf

from zoo import cards
from zoo._io import write_atomically, write_folder
from zoo.errors import CheckpointError
from zoo.models._builder import (
    CONFIG_NAME, RECORD_ATTR, WEIGHTS_NAME, folder_file, holds_tagged_weights, load_state_dict_strict,
    read_folder_config, read_folder_weights, record_weights, sha256_file, weights_fingerprint)
from zoo.registry import check_model_name

CARD_NAME = 'README.md'
TRAINING_NAME, RECIPE_NAME = 'training.json', 'training_recipe.yaml'
# Every file save_pretrained may write: a save replaces all of them (and drops those it does not write now).
ZOO_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, TRAINING_NAME, RECIPE_NAME)


# ---------------------------------------------------------------------------------------------------------------
# What the weights are now


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


# ---------------------------------------------------------------------------------------------------------------
# Hub folders


def _write_config(model: nn.Module, directory: Path, training: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """timm's config.json, made loadable by transformers too, plus what the weights are; returns the config.

    timm >= 1.0.29 repeats `num_classes` inside `model_args`; transformers' TimmWrapper passes
    `num_classes` itself and fails on the duplicate. timm reads the top-level `num_classes`, so the
    copy in `model_args` is dropped and the file serves both. `weights_record` adds the provenance, the
    results and the weights' sha256.
    """
    config_path = directory / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config.get('model_args', {}).pop('num_classes', None)
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


def _drop_claims_not_held(config: Dict[str, Any]) -> None:
    """A folder keeps the pretrained tag, description and notes only when it holds those weights."""
    pretrained_cfg = config.get('pretrained_cfg', {})
    if not holds_tagged_weights(config['provenance'], pretrained_cfg.get('tag')):
        for key in ('tag', 'description', 'notes'):
            pretrained_cfg.pop(key, None)

def save_pretrained(model: nn.Module, directory: Union[str, Path], training: Optional[Dict[str, Any]] = None) -> Path:
    """Write config.json, model.safetensors and README.md (the model card) into `directory`.

    config.json records what the weights are (`provenance`), their `weights_sha256` and the measured `results`
    that belong to them; the card is rendered from it. `training` (`{'recipe': ..., 'data': ..., 'metrics':
    ...}`, from `zoo.train.trainer`) makes the weights `zoo-trained` (or `fine-tuned` from pretrained ones) and adds
    training.json and training_recipe.yaml. The folder is replaced as a whole (`write_folder`): the zoo's files
    of an earlier save that this one does not write (a training.json, a recipe) are gone, files the zoo did not
    write stay, and an interrupted save leaves the old folder as it was.
    """
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
        (staging / CARD_NAME).write_text(cards.model_card(model, config=config))

    write_folder(directory, write, owned=ZOO_FILES)
    return Path(directory)


def folder_card(directory: Union[str, Path], config: Optional[Dict[str, Any]] = None) -> str:
    """The README.md of a Hub folder, rendered from `config` (default: the folder's config.json)."""
    directory = Path(directory)
    config = config if config is not None else json.loads((directory / CONFIG_NAME).read_text())
    with torch.device('meta'):
        model = timm.create_model(f'local-dir:{directory}', pretrained=False)
    return cards.model_card(model, config=config)


def write_folder_card(directory: Union[str, Path]) -> Path:
    """Re-render a Hub folder's README.md from its config.json (after its `results` changed, say)."""
    card = folder_card(directory).encode()
    return write_atomically(Path(directory) / CARD_NAME, lambda f: f.write(card))


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
    folder = folder_file(name_or_path, CONFIG_NAME, revision, None).parent  # a Hub repo's: its HF cache snapshot
    try:
        model = timm.create_model(f'local-dir:{folder}', pretrained=False, **kwargs)
    except TypeError as e:  # a constructor argument the architecture does not take
        raise CheckpointError(f'{Path(name_or_path) / CONFIG_NAME}: its model_args do not fit {arch} ({e})') from e
    load_state_dict_strict(model, state_dict, source=f'{name_or_path} ({WEIGHTS_NAME})')
    record_weights(model, config.get('provenance') or {'kind': 'unknown'}, config.get('results'))
    return model.eval()
