"""Names timm and the zoo both register: after `import zoo` they are still timm's models.

For each shared name, a checkpoint of timm's own class (built with timm's entrypoint function, as a process
without zoo builds it) loads strictly through `timm.create_model(name, pretrained=True, ...)` and gives timm's
outputs; TorchScript and FX feature extraction work on the zoo's registration.
"""
import json
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
from timm.models.byoanet import halonet_h1
from timm.models.convit import convit_base, convit_small, convit_tiny
from timm.models.inception_resnet_v2 import inception_resnet_v2
from timm.models.inception_v4 import inception_v4
from timm.models._features_fx import create_feature_extractor

import zoo

# Each shared name -> timm's own entrypoint for it (the function timm registered before zoo re-registered it).
TIMM_ENTRYPOINTS = {
    'convit_tiny': convit_tiny,
    'convit_small': convit_small,
    'convit_base': convit_base,
    'inception_v4': inception_v4,
    'inception_resnet_v2': inception_resnet_v2,
    'halonet_h1': halonet_h1,
}


def _input(model: torch.nn.Module, name: str) -> torch.Tensor:
    size = model.pretrained_cfg['input_size'][-1]
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_shared_names_are_exactly_these():
    """The names a plain timm registers that zoo registers too (computed in a process without zoo)."""
    out = subprocess.run(
        [sys.executable, '-c', 'import json, timm; print(json.dumps(timm.list_models()))'],
        capture_output=True, text=True, check=True).stdout
    assert set(json.loads(out)) & set(zoo.list_models()) == set(TIMM_ENTRYPOINTS)


@pytest.mark.parametrize('name', sorted(TIMM_ENTRYPOINTS))
def test_timm_checkpoint_loads_strictly_with_timm_outputs(name, tmp_path):
    torch.manual_seed(0)
    theirs = TIMM_ENTRYPOINTS[name]().eval()
    for buffer in theirs.buffers():  # BN statistics away from (0, 1), so a stat that fails to load shows
        if buffer.is_floating_point():
            buffer.uniform_(0.5, 1.5)
    path = tmp_path / 'timm.safetensors'
    safetensors.torch.save_file(theirs.state_dict(), path)
    ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert zoo.is_zoo_model(name)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = _input(theirs, name)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize('name', ['convit_tiny', 'inception_v4', 'halonet_h1', 'inception_resnet_v2'])
def test_torchscript_and_fx_features(name):
    """convit_small / convit_base share convit_tiny's code; the other names are checked one by one."""
    model = timm.create_model(name).eval()
    x = _input(model, name)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=1e-4, atol=1e-4)
        fx_model = create_feature_extractor(model, return_nodes={model.pretrained_cfg['classifier']: 'logits'})
        torch.testing.assert_close(fx_model(x)['logits'], expected)
