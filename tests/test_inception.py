"""Inception: zoo v4 / ResNet-v2 equal timm's classes; the paper's ResNet-v1 (and v2 layout) built and checked."""
import pytest
import timm
import torch
from timm.models import group_parameters
from timm.models.inception_resnet_v2 import InceptionResnetV2 as TimmInceptionResnetV2
from timm.models.inception_v4 import InceptionV4 as TimmInceptionV4

import zoo
from zoo.models import inception

NAMES = ['inception_v4', 'inception_resnet_v2', 'inception_resnet_v1', 'inception_resnet_v2_paper']
# exact counts at 1000 classes; v4 / ResNet-v2 are timm's (42.68M / 55.84M in the research), ResNet-v1 is
# the paper-faithful build, about 22.8M
PARAMS = {
    'inception_v4': 42_679_816,
    'inception_resnet_v2': 55_843_464,
    'inception_resnet_v1': 22_756_328,
    'inception_resnet_v2_paper': 32_433_928,
}
SMALL = 75  # the smallest input these nets take


def _randomize_bn(model):
    """Non-trivial BatchNorm statistics and scales, so that equality checks mean something."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope='module')
def image():
    return torch.randn(2, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def v1():
    torch.manual_seed(0)
    return _randomize_bn(timm.create_model('inception_resnet_v1'))


@pytest.mark.parametrize('name', NAMES)
def test_registered_with_params(name):
    assert zoo.is_zoo_model(name)
    assert timm.models.model_entrypoint(name).__module__ == 'zoo.models.inception'
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert name in inception.card_info['variants']


def test_resnet_v1_is_the_papers_net():
    with torch.device('meta'):
        model = timm.create_model('inception_resnet_v1')
        feats = model.forward_intermediates(torch.empty(1, 3, 299, 299), intermediates_only=True)
    # paper Fig. 15: 35x35x256 -> 17x17x896 -> 8x8x1792, with 5 / 10 / 5 blocks
    assert [tuple(f.shape[1:]) for f in feats[2:]] == [(256, 35, 35), (896, 17, 17), (1792, 8, 8)]
    assert (len(model.repeat), len(model.repeat_1), len(model.repeat_2)) == (5, 10, 5)
    # Reduction-A of Inception-ResNet-v1, paper Table 1: k, l, m, n = 192, 192, 256, 384
    red_a = model.mixed_6a
    assert [c.conv.out_channels for c in red_a.branch1] + [red_a.branch0.conv.out_channels] == [192, 192, 256, 384]
    assert [b.scale for b in (model.repeat[0], model.repeat_1[0], model.repeat_2[0])] == [0.17, 0.10, 0.20]
    assert abs(PARAMS['inception_resnet_v1'] / 1e6 - 22.8) < 0.05


def test_pretrained_cfgs():
    assert sorted(n for n in zoo.list_models(pretrained=True) if 'inception' in n) == [
        'inception_resnet_v2.tf_ens_adv_in1k', 'inception_resnet_v2.tf_in1k', 'inception_v4.tf_in1k']
    for tag in ('inception_v4.tf_in1k', 'inception_resnet_v2.tf_in1k', 'inception_resnet_v2.tf_ens_adv_in1k'):
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg.hf_hub_id == f'timm/{tag}' and cfg.mean == (0.5, 0.5, 0.5)
    with torch.device('meta'), pytest.warns(UserWarning, match='deprecated'):
        old_name = timm.create_model('ens_adv_inception_resnet_v2')
    assert isinstance(old_name, inception.InceptionResnetV2)
    assert old_name.pretrained_cfg['tag'] == 'tf_ens_adv_in1k'
    for name in ('inception_resnet_v1', 'inception_resnet_v2_paper'):
        cfg = timm.models.get_pretrained_cfg(name)
        assert not cfg.has_weights and 'no weights' in cfg.description


@pytest.mark.parametrize('name,timm_cls', [('inception_v4', TimmInceptionV4), ('inception_resnet_v2', TimmInceptionResnetV2)])
def test_equals_timm_class(name, timm_cls, image):
    torch.manual_seed(0)
    model = _randomize_bn(timm.create_model(name))
    reference = timm_cls().eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(model(image), reference(image))
        ours = model.forward_intermediates(image, indices=(1, 3), intermediates_only=True)
        theirs = reference.forward_intermediates(image, indices=(1, 3), intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize('name', NAMES)
def test_features_only(name, image):
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        feats = model(image)
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    # the stride-4 tap follows a 3x3 VALID conv in the ResNet stems (Fig. 14, TF-slim), a pool in the v4 stem (Fig. 3)
    stride4 = 15 if name in ('inception_resnet_v1', 'inception_resnet_v2') else 17
    assert [f.shape[-1] for f in feats] == [35, stride4, 7, 3, 1]


def test_features_only_matches_intermediates(v1, image):
    model = timm.create_model('inception_resnet_v1', features_only=True, out_indices=(2, 3)).eval()
    model.load_state_dict({k: v for k, v in v1.state_dict().items() if k in model.state_dict()}, strict=True)
    with torch.no_grad():
        feats = model(image)
        expected = v1.forward_intermediates(image, indices=(2, 3), intermediates_only=True)
    assert model.feature_info.channels() == [256, 896]
    assert all(torch.equal(a, b) for a, b in zip(feats, expected))


def test_resnet_v1_head_and_groups(v1, image):
    with torch.no_grad():
        pooled = v1.forward_head(v1.forward_features(image), pre_logits=True)
    assert pooled.shape == (2, 1792) and v1.get_classifier().out_features == 1000
    groups = group_parameters(v1, v1.group_matcher())
    assert len(groups) == 1 + 5 + 1 + 10 + 1 + 5 + 1  # stem, A blocks, Red-A, B blocks, Red-B, C blocks, head
    assert len(group_parameters(v1, v1.group_matcher(coarse=True))) == 7
    model = timm.create_model('inception_resnet_v1', num_classes=0)
    assert model.get_classifier().__class__.__name__ == 'Identity'


@pytest.mark.parametrize('name', ['inception_resnet_v1', 'inception_v4'])
def test_grad_checkpointing_same_output_and_grads(name, v1, image):
    model = v1 if name == 'inception_resnet_v1' else _randomize_bn(timm.create_model(name))

    def run(enable):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        out = model(image[:1])
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_plain, grads_plain = run(False)
    out_ckpt, grads_ckpt = run(True)
    model.set_grad_checkpointing(False)
    model.zero_grad()
    assert torch.equal(out_ckpt, out_plain)
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) == len(list(model.parameters()))
    for key in grads_plain:
        torch.testing.assert_close(grads_ckpt[key], grads_plain[key], rtol=1e-5, atol=1e-7, msg=key)


def test_filter_accepts_tf_slim_port_with_background_class():
    with torch.device('meta'):
        model = timm.create_model('inception_resnet_v2')
    state = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    state['classif.weight'] = torch.arange(1000.).unsqueeze(1).expand(1000, 1536)
    ported = {('last_linear.' + k[len('classif.'):] if k.startswith('classif.') else k): v for k, v in state.items()}
    ported['last_linear.weight'] = torch.cat([torch.full((1, 1536), -1.), ported['last_linear.weight']])
    ported['last_linear.bias'] = torch.cat([torch.full((1,), -1.), ported['last_linear.bias']])
    converted = inception.checkpoint_filter_fn(ported, model)
    assert converted.keys() == state.keys()
    assert torch.equal(converted['classif.weight'], state['classif.weight'])


@pytest.mark.parametrize('name', NAMES)
def test_bad_input_errors(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    with pytest.raises(ValueError, match='expected 3 input channels'):
        model(torch.empty(1, 4, 299, 299, device='meta'))
    with pytest.raises(ValueError, match='at least 75x75'):
        model.forward_intermediates(torch.empty(1, 3, 74, 299, device='meta'))
