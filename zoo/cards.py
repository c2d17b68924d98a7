"""Model cards, generated from each model's metadata.

The facts come from four places: the pretrained cfg (paper, license, origin) with its structured metadata
(`zoo.metadata`: params, GMACs, paper figures, measured figures, recipe), the record of what the weights are
(a folder's config.json: `provenance`, `weights_sha256`, `results`; for a registry name, what
`pretrained=True` loads), the family module's `card_info` (intended use, limitations, the paper's table row
for each variant, a usage snippet) and the model itself (parameters, GMACs counted on the meta device at
its input size). `model_cards/<name.tag>.md` holds one card per pretrained cfg of every zoo model (published
weights, and the `untrained` cfgs of models no one has published weights for); a test keeps them in sync.
"""
import copy
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
import yaml
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from zoo.metadata import weights_meta
from zoo.models._builder import OFFICIAL_SOURCE, holds_tagged_weights
from zoo.registry import check_model_name, is_zoo_model

CARDS_DIR = Path(__file__).resolve().parent.parent / 'model_cards'


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, input_size: Tuple[int, ...]) -> float:
    """Multiply-accumulates (conv and matmul, as FLOPs / 2) of one input of `input_size` (no batch dimension),
    counted in eval mode on a meta-device copy. The one counter of the zoo: cards, `zoo info` and `zoo bench`.

    Models whose input is not one image (a frame index, say) define `example_inputs(device)`, returning
    the keyword arguments of one forward call.
    """
    meta_model = copy.deepcopy(model).to('meta').eval()
    if hasattr(meta_model, 'fast_decode'):  # the model's MACs, not the banded decode's (it recomputes halo rows)
        meta_model.fast_decode = False
    args, kwargs = (), {}
    if hasattr(meta_model, 'example_inputs'):
        kwargs = meta_model.example_inputs(device='meta')
    else:
        args = (torch.empty((1, *input_size), device='meta'),)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta_model(*args, **kwargs)
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


def cfg_provenance(cfg: Dict) -> Dict:
    """What `pretrained=True` gives for a registry cfg: the authors' file, timm's weights, or nothing (random)."""
    where = cfg.get('hf_hub_id') or cfg.get('url')
    if not where:
        return {'kind': 'random'}
    kind = 'official' if cfg.get('source') == OFFICIAL_SOURCE else 'timm'
    return {'kind': kind, 'tag': cfg.get('tag'), 'source': where}


def _describe_provenance(provenance: Dict) -> str:
    """One sentence on where weights come from (used for `fine-tuned` weights' origin too)."""
    kind = provenance.get('kind')
    if kind == 'official':
        source = provenance.get('source') or 'an unrecorded place'
        source = source if source.startswith('a ') else f'`{source}`'
        file = f' `{provenance["file"]}`' if provenance.get('file') else ''
        release = f' (the published `{provenance["release"]}` release)' if provenance.get('release') else ''
        sha = f', sha256 `{provenance["file_sha256"]}`' if provenance.get('file_sha256') else ''
        return f"the authors' checkpoint{file}{release} from {source}{sha}, converted to the zoo's layout"
    if kind == 'timm':
        return f"timm's weights `{provenance.get('source')}`"
    if kind == 'zoo-trained':
        return 'weights trained by the zoo from random initialisation'
    if kind == 'fine-tuned':
        return f'weights fine-tuned from {_describe_provenance(provenance.get("from") or {})}'
    if kind == 'random':
        return 'random initialisation'
    return 'weights of unrecorded origin'


def _weights_lines(provenance: Dict, cfg: Dict, held: bool, weights_sha256: Optional[str]) -> list:
    kind = provenance.get('kind')
    if kind == 'random':
        text = ('**Random initialisation: these weights are untrained.** Train them with a recipe in '
                '`training/recipes/`, or load published weights (`zoo list --pretrained` lists them).')
        if provenance.get('encoder'):
            text += f' Only the encoder starts from pretrained weights ({provenance["encoder"]}).'
    elif kind == 'unknown':
        text = ('Where these weights come from was not recorded: they were not built or loaded by the zoo, came '
                'from a folder without a `provenance` record, or changed after random initialisation outside '
                '`training/train.py`.')
    elif kind == 'zoo-trained':
        text = ('**Trained by the zoo** from random initialisation with `accelerate launch training/train.py`; '
                'the recipe, data and metrics are below.')
        if provenance.get('encoder'):
            text += f' The encoder started from {provenance["encoder"]}.'
    elif kind == 'fine-tuned':
        text = f'**Fine-tuned** from {_describe_provenance(provenance.get("from") or {})}.'
        if provenance.get('how'):
            text += f' {provenance["how"][0].upper()}{provenance["how"][1:]}.'
    else:
        label = {'official': 'Official weights', 'timm': "timm's weights"}[kind]
        text = f'**{label}:** {_describe_provenance(provenance)}.'
        if provenance.get('classifier'):
            text += f' The classifier is {provenance["classifier"]}.'
        if held and cfg.get('description'):
            text += f' {cfg["description"]}'
    lines = [text, '']
    if weights_sha256:
        lines += [f'- **Weights sha256:** `{weights_sha256}` (of `model.safetensors`; loading through the zoo '
                  'checks it)', '']
    return lines


def _results_lines(measured: list, paper: list, published: bool) -> list:
    """Measured figures, then the paper's, labelled so; `published`: the weights are those the paper's are for."""
    if not measured and not paper:
        return []
    lines = ['## Results', '']
    if paper and not published:
        lines += ["The paper's figures are for the authors' trained model, not for these weights.", '']
    lines += ['| figure | task | dataset | split | metrics | protocol |', '|---|---|---|---|---|---|']
    for r in measured:
        by = f'measured ({r["by"]})' if r.get('by') else 'measured'
        protocol = ', '.join(f'{k}: {v}' for k, v in (r.get('protocol') or {}).items()) or '-'
        lines.append(f'| {by} | {r.get("task")} | {r.get("dataset")} | '
                     f'{r.get("split")} | {_metrics_text(r.get("metrics") or {})} | {protocol} |')
    for r in paper:
        lines.append(f'| paper ({r.get("source")}) | {r.get("task")} | {r.get("dataset")} | {r.get("split")} | '
                     f'{_metrics_text(r.get("metrics") or {})} | as published |')
    return lines + ['']


def _metrics_text(metrics: Dict) -> str:
    return ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in metrics.items())


def _model_index(name: str, pipeline_tag: str, results: list) -> list:
    """The Hub's `model-index` block (front matter) for measured results."""
    entries = []
    for r in results:
        by = f'measured by {r["by"]}' if r.get('by') else 'measured with the zoo'
        entries.append({
            'task': {'type': r.get('task') or pipeline_tag},
            'dataset': {'name': str(r.get('dataset')), 'type': str(r.get('dataset')), 'split': str(r.get('split'))},
            'metrics': [{'type': k, 'value': v, 'name': f'{k} ({by})'} for k, v in (r.get('metrics') or {}).items()],
        })
    return [{'name': name, 'results': entries}] if entries else []


def _training_lines(provenance: Dict, weights_sha256: Optional[str]) -> list:
    recipe = provenance.get('recipe')
    if provenance.get('kind') not in ('zoo-trained', 'fine-tuned') or recipe is None:
        return []
    metrics = provenance.get('metrics') or {}
    lines = [
        '## Training',
        '',
        'Trained by zoo with `accelerate launch training/train.py`; the full recipe is in `training_recipe.yaml`.',
        '',
        f'- **Recipe source:** {recipe.get("source", "not stated")}',
        f'- **Data:** `{provenance.get("data")}`',
    ]
    if weights_sha256:
        lines.append(f'- **Weights sha256:** `{weights_sha256}`')
    lines += ['', '| metric | value |', '|---|---|']
    lines += [f'| {k} | {v:.4f} |' if isinstance(v, float) else f'| {k} | {v} |' for k, v in metrics.items()]
    return lines + ['']


def _usage(info: Dict, input_size: Tuple[int, int, int], load_line: str) -> str:
    """The usage snippet: imports, a load line, then the family's usage (`card_info['usage']`, which may use
    `{channels}`, `{height}` and `{width}`) with the model's real input size."""
    default = (
        'x = torch.rand(1, {channels}, {height}, {width})  # or: transform(pil_image).unsqueeze(0)\n'
        'config = timm.data.resolve_model_data_config(model)\n'
        'transform = timm.data.create_transform(**config, is_training=False)\n'
        'with torch.no_grad():\n'
        '    probs = model(x).softmax(-1)\n'
        'top5 = probs.topk(min(5, probs.shape[-1]))')
    usage = info.get('usage') or default
    for key, value in zip(('{channels}', '{height}', '{width}'), input_size):
        usage = usage.replace(key, str(value))
    return f'import torch, timm, zoo\n{load_line}\n{usage}'


def _import_zoo_line(arch: str, pipeline_tag: str) -> str:
    """What a user of timm or transformers must do first: transformers' own error does not say it."""
    line = (f'`{arch}` is a zoo model: `import zoo` (`pip install zoo`) registers it with timm, and timm '
            '(`local-dir:` / `hf-hub:`) loads a Hub folder of it only in a process that has imported zoo.')
    if pipeline_tag in ('image-classification', 'image-feature-extraction'):
        line += (' So does transformers (`AutoModelForImageClassification.from_pretrained`): without `import zoo` '
                 f"it stops with \"The model architecture '{arch}' is not supported in your version of timm\" "
                 f"(older transformers: timm's \"Unknown model ({arch})\"), which no timm upgrade fixes.")
    return line


def model_card(model: nn.Module, config: Optional[Dict] = None, counts: Optional[Tuple[float, float]] = None) -> str:
    """The model card (Hub README.md, with YAML front matter).

    Without `config`, the card of a registered `name.tag`: its weights are what `pretrained=True` loads. With
    `config` (a folder's config.json), the card of that folder: every claim comes from its record
    (`provenance`, `weights_sha256`, `results`), never from the registry tag alone, and the usage snippet
    loads the folder. `counts` (params in M, GMACs) replaces counting them on the model.
    """
    folder = config is not None
    cfg = dict(config.get('pretrained_cfg', {}), architecture=config['architecture']) if folder else dict(
        model.pretrained_cfg)
    arch = cfg.get('architecture') or type(model).__name__
    provenance = (config.get('provenance') or {'kind': 'unknown'}) if folder else cfg_provenance(cfg)
    tag = cfg.get('tag')
    held = holds_tagged_weights(provenance, tag) or (not folder and provenance['kind'] == 'random')
    name = f'{arch}.{tag}' if tag and held else arch
    meta = weights_meta(f'{arch}.{tag}') if tag else {}
    info = _family_card_info(model)
    input_size = tuple(cfg.get('input_size', (3, 224, 224)))
    params_m, gmacs = counts or (count_params(model) / 1e6, count_gmacs(model, input_size))
    license_ = cfg.get('license') or 'unknown'
    paper_ids = cfg.get('paper_ids') or ''
    arxiv = paper_ids.split(':', 1)[1] if paper_ids.startswith('arXiv:') else ''
    notes = cfg.get('notes') or ()
    if isinstance(notes, str):
        notes = (notes,)
    measured = list(config.get('results') or []) if folder else list(meta.get('measured') or [])
    if folder:
        measured = [r for r in measured if r.get('weights_sha256') in (None, config.get('weights_sha256'))]
    pipeline_tag = _pipeline_tag(model, info)

    front = {'tags': [pipeline_tag, 'timm', 'zoo'] + ([f'arxiv:{arxiv}'] if arxiv else []),
             'library_name': 'timm', 'license': license_, 'pipeline_tag': pipeline_tag}
    model_index = _model_index(name, pipeline_tag, measured)
    if model_index:
        front['model-index'] = model_index
    lines = ['---', yaml.safe_dump(front, sort_keys=False).rstrip(), '---', f'# Model card for {name}', '']
    if cfg.get('paper_name'):
        lines += [f'{arch} from "{cfg["paper_name"]}"' + (f' (https://arxiv.org/abs/{arxiv}).' if arxiv else '.'), '']
    lines += [
        '## Model details',
        '',
        f'- **Architecture:** `{arch}`' + (f' ({info["variants"][arch]})' if arch in info.get('variants', {}) else ''),
        f'- **Weights:** {provenance.get("kind")}',
        f'- **Params (M):** {params_m:.2f}',
        f'- **GMACs:** {gmacs:.2f} at {input_size[1]}x{input_size[2]} (conv and matmul MACs, counted with '
        '`torch.utils.flop_counter`)',
        f'- **Input:** {input_size[0]}x{input_size[1]}x{input_size[2]}, {cfg.get("interpolation", "bicubic")} '
        f'resize, crop_pct {cfg.get("crop_pct")}, mean {tuple(cfg.get("mean", ()))}, std {tuple(cfg.get("std", ()))}',
    ]
    if getattr(model, 'num_classes', 0):  # video models carry num_classes = 0 for timm's Hub export only
        lines.append(f'- **Classes:** {model.num_classes}')
    lines += [f'- **License:** {license_}']
    if meta.get('recipe'):
        lines.append(f'- **Recipe:** `{meta["recipe"]}`')
    if cfg.get('origin_url'):
        lines.append(f'- **Original code:** {cfg["origin_url"]}')
    label_names = (config.get('label_names') or cfg.get('label_names')) if folder else None
    if label_names:
        lines.append(f'- **Classes:** {", ".join(map(str, label_names))}')
    lines += ['', '## Weights', '']
    lines += _weights_lines(provenance, cfg, held, config.get('weights_sha256') if folder else None)
    for note in notes if held else ():
        lines += [f'> {note}', '']
    published = held and provenance['kind'] in ('official', 'timm')
    lines += _results_lines(measured, list(meta.get('paper') or []), published)
    lines += _training_lines(provenance, config.get('weights_sha256') if folder else None)
    if folder:
        load_line = 'model = zoo.hub.load(".")  # run from this folder; or give its path, or its Hub repo id'
    else:
        pretrained = provenance['kind'] != 'random'
        load_line = f'model = timm.create_model("zoo/{name}", pretrained={pretrained}).eval()'
    lines += [
        '## Usage',
        '',
        '```python',
        _usage(info, input_size, load_line),
        '```',
        '',
        _import_zoo_line(arch, pipeline_tag),
        '',
    ]
    if info.get('intended_use'):
        lines += ['## Intended use', '', info['intended_use'], '']
    if info.get('limitations'):
        lines += ['## Limitations', '', info['limitations'], '']
    return '\n'.join(lines)


def card_for_name(model_name: str) -> str:
    """The card of a registered `name` or `name.tag`, built without weights; params and GMACs from its metadata
    where recorded (tests/test_metadata.py checks them against the model)."""
    check_model_name(model_name)
    with torch.device('meta'):
        model = timm.create_model(model_name, pretrained=False)
    cfg = model.pretrained_cfg
    meta = weights_meta(f'{cfg["architecture"]}.{cfg["tag"]}')
    counts = (meta['params_m'], meta['gmacs']) if 'params_m' in meta and 'gmacs' in meta else None
    return model_card(model, counts=counts)


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
