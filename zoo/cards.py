"""Model cards, generated from each model's metadata.

The facts come from three places: the pretrained cfg (paper, license, origin, how the weights were
made), the family module's `card_info` (intended use, limitations, the paper's table row for each
variant) and the model itself (parameters, GMACs counted on the meta device at the cfg's input size).
`model_cards/<name.tag>.md` holds one card per pretrained cfg of every zoo model (published weights, and
the `untrained` cfgs of models no one has published weights for); a test keeps them in sync.
"""
import copy
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from zoo.registry import check_model_name, is_zoo_model

CARDS_DIR = Path(__file__).resolve().parent.parent / 'model_cards'


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, input_size: Tuple[int, int, int]) -> float:
    """Multiply-accumulates (conv and matmul, as FLOPs / 2) of one input, counted on the meta device.

    Models whose input is not one image (a frame index, say) define `example_inputs(device)`, returning
    the keyword arguments of one forward call.
    """
    meta_model = copy.deepcopy(model).to('meta').eval()
    if hasattr(meta_model, 'fast_decode'):  # the model's MACs, not the banded decode's (it recomputes halo rows)
        meta_model.fast_decode = False
    if hasattr(meta_model, 'example_inputs'):
        inputs = meta_model.example_inputs(device='meta')
    else:
        inputs = dict(x=torch.empty((1, *input_size), device='meta'))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta_model(**inputs)
    return counter.get_total_flops() / 2e9


def _family_card_info(model: nn.Module) -> Dict:
    module = sys.modules.get(type(model).__module__)
    arch = model.pretrained_cfg.get('architecture')
    if arch and timm.is_model(arch):
        module = sys.modules[timm.models.model_entrypoint(arch).__module__]
    return getattr(module, 'card_info', {})


def _pipeline_tag(model: nn.Module, info: Dict) -> str:
    """The Hub task tag: the family's own (`card_info['pipeline_tag']`), else classification or features."""
    if info.get('pipeline_tag'):
        return info['pipeline_tag']
    return 'image-classification' if getattr(model, 'num_classes', 0) else 'image-feature-extraction'


def _weights_section(cfg: Dict) -> str:
    if cfg.get('hf_hub_id') or cfg.get('url'):
        where = cfg.get('hf_hub_id') or cfg.get('url')
        made = cfg.get('description') or 'Weights published by the authors.'
        return f'{made} Source: `{where}`.'
    return ('No weights are published under this tag: the model starts from random initialisation (the notes '
            'below say where other weights exist). The training recipes are in `training/recipes/`.')


def model_card(model: nn.Module) -> str:
    """The model card (Hub README.md, with YAML front matter) for a built model."""
    cfg = dict(model.pretrained_cfg)
    arch = cfg.get('architecture') or type(model).__name__
    tag = cfg.get('tag')
    name = f'{arch}.{tag}' if tag else arch
    info = _family_card_info(model)
    input_size = tuple(cfg.get('input_size', (3, 224, 224)))
    params = count_params(model)
    gmacs = count_gmacs(model, input_size)
    license_ = cfg.get('license') or 'unknown'
    paper_ids = cfg.get('paper_ids') or ''
    arxiv = paper_ids.split(':', 1)[1] if paper_ids.startswith('arXiv:') else ''
    notes = cfg.get('notes') or ()
    if isinstance(notes, str):
        notes = (notes,)

    lines = [
        '---',
        'tags:',
        f'- {_pipeline_tag(model, info)}',
        '- timm',
        '- zoo',
    ]
    if arxiv:
        lines.append(f'- arxiv:{arxiv}')
    lines += [
        'library_name: timm',
        f'license: {license_}',
        '---', f'# Model card for {name}', '']
    if cfg.get('paper_name'):
        lines += [f'{arch} from "{cfg["paper_name"]}"' + (f' (https://arxiv.org/abs/{arxiv}).' if arxiv else '.'), '']
    lines += [
        '## Model details',
        '',
        f'- **Architecture:** `{arch}`' + (f' ({info["variants"][arch]})' if arch in info.get('variants', {}) else ''),
        f'- **Params (M):** {params / 1e6:.2f}',
        f'- **GMACs:** {gmacs:.2f} at {input_size[1]}x{input_size[2]} (conv and matmul MACs, counted with '
        '`torch.utils.flop_counter`)',
        f'- **Input:** {input_size[0]}x{input_size[1]}x{input_size[2]}, {cfg.get("interpolation", "bicubic")} '
        f'resize, crop_pct {cfg.get("crop_pct")}, mean {tuple(cfg.get("mean", ()))}, std {tuple(cfg.get("std", ()))}',
    ]
    if getattr(model, 'num_classes', 0):  # video models carry num_classes = 0 for timm's Hub export only
        lines.append(f'- **Classes:** {model.num_classes}')
    lines += [f'- **License:** {license_}']
    if cfg.get('origin_url'):
        lines.append(f'- **Original code:** {cfg["origin_url"]}')
    lines += ['', '## Weights', '', _weights_section(cfg), '']
    for note in notes:
        lines += [f'> {note}', '']
    pretrained = bool(tag and (cfg.get('hf_hub_id') or cfg.get('url')))
    usage = info.get('usage') or (
        'config = timm.data.resolve_model_data_config(model)\n'
        'transform = timm.data.create_transform(**config, is_training=False)')
    lines += [
        '## Usage',
        '',
        '```python',
        'import timm, zoo',
        f'model = timm.create_model("zoo/{name}", pretrained={pretrained}).eval()',
        usage,
        '```',
        '',
    ]
    if info.get('intended_use'):
        lines += ['## Intended use', '', info['intended_use'], '']
    if info.get('limitations'):
        lines += ['## Limitations', '', info['limitations'], '']
    return '\n'.join(lines)


def training_section(training: Dict) -> str:
    """The card section of a zoo-trained model: recipe, data, measured metrics, weights' sha256."""
    recipe = training['recipe']
    metrics = training.get('metrics') or {}
    lines = [
        '## Training',
        '',
        'Trained by zoo with `accelerate launch training/train.py`; the full recipe is in `training_recipe.yaml`.',
        '',
        f'- **Recipe source:** {recipe.get("source", "not stated")}',
        f'- **Data:** `{training.get("data")}`',
        *([f'- **Classes:** {", ".join(map(str, training["label_names"]))}'] if training.get('label_names') else []),
        f'- **Weights sha256:** `{training["weights_sha256"]}`',
        '',
        '| metric | value |',
        '|---|---|',
    ]
    lines += [f'| {k} | {v:.4f} |' if isinstance(v, float) else f'| {k} | {v} |' for k, v in metrics.items()]
    return '\n'.join(lines) + '\n'


def card_for_name(model_name: str) -> str:
    """The card of a registered `name` or `name.tag`, built without weights."""
    check_model_name(model_name)
    with torch.device('meta'):
        model = timm.create_model(model_name, pretrained=False)
    return model_card(model)


def card_names() -> list:
    """Every zoo `name.tag`, with weights or without: the models that get a card in model_cards/."""
    return [n for n in timm.list_models(include_tags=True) if is_zoo_model(n)]


def write_cards(directory: Optional[Union[str, Path]] = None) -> list:
    """Regenerate model_cards/<name.tag>.md for every published weight; returns the paths written."""
    directory = Path(directory or CARDS_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in tqdm(card_names(), desc='cards', file=sys.stderr):
        path = directory / f'{name}.md'
        path.write_text(card_for_name(name))
        written.append(path)
    return written
