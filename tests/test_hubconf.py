"""torch.hub: one documented entry point per zoo model, and nothing else."""
import importlib.util
from pathlib import Path

import torch

import zoo

ROOT = Path(__file__).resolve().parent.parent


def load_hubconf():
    spec = importlib.util.spec_from_file_location('hubconf_under_test', ROOT / 'hubconf.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_points_are_exactly_the_zoo_models():
    hubconf = load_hubconf()
    # torch.hub treats every public callable of hubconf as an entry point
    entry_points = sorted(n for n in dir(hubconf) if not n.startswith('_') and callable(getattr(hubconf, n)))
    assert entry_points == sorted(zoo.list_models())
    for name in entry_points:
        doc = getattr(hubconf, name).__doc__
        assert doc and 'pretrained' in doc, name


def test_torch_hub_load_local():
    model = torch.hub.load(str(ROOT), 'spartan_tiny', source='local', pretrained=False, num_classes=10)
    assert model.num_classes == 10
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)
