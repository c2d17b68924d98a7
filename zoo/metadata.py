"""Structured facts about each pretrained cfg, as torchvision's weights carry them.

A cfg dict in a family's `default_cfgs` may hold `meta=dict(...)`:

- `params_m`, `gmacs`: parameters (millions) and multiply-accumulates (billions) at the cfg's `input_size`,
  as `zoo.cards.count_params` / `count_gmacs` give them (tests/test_metadata.py recomputes both);
- `paper`: the paper's (or the official README's) figures, each `{task, dataset, split, metrics, source}`;
  they are claims, and cards label them so;
- `measured`: figures measured on these exact weights, each with its `protocol` and who measured it (`by`);
  absent where nobody has, since a number not measured is not written down;
- `recipe`: the zoo recipe that trains the model (`training/recipes/...`).

The license is the cfg's own `license`. timm's `PretrainedCfg` has no free-form field, so `zoo_cfgs` takes
`meta` out of each cfg before timm's `generate_default_cfgs` sees it and keeps it here, under `arch.tag`.
"""
from typing import Any, Dict

from timm.models import generate_default_cfgs

WEIGHTS_META: Dict[str, Dict[str, Any]] = {}


def zoo_cfgs(cfgs: Dict[str, Dict[str, Any]]):
    """timm's `generate_default_cfgs`, after moving each cfg's `meta` into `WEIGHTS_META`."""
    plain = {}
    for name, cfg in cfgs.items():
        cfg = dict(cfg)
        meta = cfg.pop('meta', None)
        if meta is not None:
            WEIGHTS_META[name.rstrip('*')] = meta
        plain[name] = cfg
    return generate_default_cfgs(plain)


def weights_meta(name_tag: str) -> Dict[str, Any]:
    """The structured metadata of `arch.tag` (empty when none is recorded)."""
    return WEIGHTS_META.get(name_tag, {})


def paper(dataset: str, source: str, task: str = 'image-classification', split: str = 'val', **metrics) -> Dict:
    """One figure set as the paper (or the official README, named in `source`) gives it."""
    return {'task': task, 'dataset': dataset, 'split': split, 'metrics': metrics, 'source': source}
