"""`import zoo` registers the models with timm and opens the `zoo/` name space, and nothing more."""
import subprocess
import sys

import pytest
import timm
import timm.models._factory as factory
import torch

import zoo
from zoo import _namespace


@pytest.mark.parametrize('name', ['zoo/sparTAN_tiny', 'zoo/spartan_tiny', 'ZOO/SPARTAN_TINY', 'spartan_tiny'])
def test_zoo_names_build_the_registered_model(name):
    torch.manual_seed(0)
    reference = timm.create_model('spartan_tiny', num_classes=4)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4)
    assert type(model) is type(reference)
    assert model.pretrained_cfg['architecture'] == 'spartan_tiny'
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_zoo_name_with_a_tag_selects_that_pretrained_cfg():
    model = timm.create_model('zoo/spartan_tiny.in1k')
    assert model.pretrained_cfg['tag'] == 'in1k'


def test_listing():
    assert timm.list_models('spartan*') == ['spartan_tiny']
    assert 'spartan_tiny' in zoo.list_models()
    assert 'resnet18' not in zoo.list_models()
    assert 'spartan_tiny.in1k' in zoo.list_models(pretrained=True)


def test_unknown_zoo_name_suggests_close_names():
    with pytest.raises(zoo.UnknownModelError, match=r"unknown model 'spartan_tny'.*did you mean spartan_tiny"):
        timm.create_model('zoo/spartan_tny')
    with pytest.raises(zoo.UnknownModelError, match='spartan_tiny'):
        zoo.create_model('spartn_tiny')
    with pytest.raises(zoo.UnknownModelError, match=r"no pretrained tag 'in22k'.*in1k"):
        zoo.create_model('spartan_tiny.in22k')


def test_other_names_keep_timm_behaviour():
    assert factory.parse_model_name('hf-hub:org/name') == ('hf-hub', 'org/name')
    assert factory.parse_model_name('resnet18') == (None, 'resnet18')
    with pytest.raises(ValueError, match='hf-hub:'):
        timm.create_model('org/resnet18')


def test_install_wraps_only_once():
    original = factory.parse_model_name.__wrapped__
    _namespace.install()
    _namespace.install()
    assert factory.parse_model_name.__wrapped__ is original
    assert not hasattr(original, '__wrapped__')


def test_a_fresh_interpreter_needs_only_import_zoo():
    code = 'import timm, zoo; m = timm.create_model("zoo/sparTAN_tiny", num_classes=2); print(type(m).__name__)'
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'SpaRTAN'
