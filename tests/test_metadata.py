"""Every pretrained cfg carries structured metadata (zoo.metadata), and its params and GMACs are what the model has."""
import math
from pathlib import Path

import pytest
import timm
import torch

from zoo import cards
from zoo.metadata import weights_meta

REPO = Path(__file__).resolve().parent.parent
NAMES = cards.card_names()


@pytest.mark.parametrize('name', NAMES)
def test_params_and_gmacs_match_the_model(name):
    meta = weights_meta(name)
    with torch.device('meta'):
        model = timm.create_model(name)
    input_size = tuple(model.pretrained_cfg['input_size'])
    assert math.isclose(cards.count_params(model) / 1e6, meta['params_m'], abs_tol=0.0051), 'params_m'
    assert math.isclose(cards.count_gmacs(model, input_size), meta['gmacs'], abs_tol=0.0051), f'gmacs at {input_size}'


@pytest.mark.parametrize('name', NAMES)
def test_figures_are_labelled_and_the_recipe_exists(name):
    meta = weights_meta(name)
    if 'recipe' in meta:
        assert (REPO / meta['recipe']).is_file()
    for figure in meta.get('paper', []):
        assert figure['source'] and figure['dataset'] and figure['metrics'], 'a paper figure names its source'
        assert all(isinstance(v, (int, float)) for v in figure['metrics'].values())
    for figure in meta.get('measured', []):
        assert figure['protocol'] and figure['by'], 'a measured figure says how and by whom'
        assert all(isinstance(v, (int, float)) for v in figure['metrics'].values())
    assert timm.models.get_pretrained_cfg(name).license, 'the license is in the cfg'


def test_untrained_cfgs_claim_no_measured_figure():
    for name in NAMES:
        if not timm.models.get_pretrained_cfg(name).has_weights:
            assert not weights_meta(name).get('measured'), f'{name}: nothing can be measured on weights that do not exist'
