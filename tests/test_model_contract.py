"""What the dense and video models owe a timm user where timm's classifier tests cannot apply (issue #13).

timm's own `test_models.py` runs on every zoo model (tests/timm_suite); the (test, model) pairs it excludes
for these models are classifier assumptions (pooled vectors, classes on the last axis, random images for a
per-video model). What is left of timm's contract is checked here: the default cfg describes a real input, the
model runs forward and backward at that size, `num_classes=0` works, and `num_features` / `head_hidden_size`
name the width the head reads. Shapes of every variant are checked on the meta device; the smallest variant of
each family runs for real.
"""
import pytest
import timm
import torch

import zoo

DENSE = [n for n in zoo.list_models() if n.startswith(('idisc_', 'timesnet_', 'macmd_'))]
VIDEO = [n for n in zoo.list_models() if n.startswith(('hnerv_', 'nerv_', 'nervpp_'))]
SMALLEST = ['idisc_resnet101', 'timesnet_convnext_tiny_convnext_tiny', 'macmd_pvt_v2_b2', 'hnerv_0_35m', 'nerv_s',
            'nervpp_xs']


def _cfg_input(model, device='meta'):
    """The forward kwargs the default cfg describes: an image batch at `input_size`, or a video model's
    frames / frame indices (its `input_size` is the size of the frames it represents)."""
    if hasattr(model, 'example_inputs'):
        return model.example_inputs(device)
    return dict(x=torch.rand(1, *model.pretrained_cfg['input_size'], device=device))


@pytest.mark.parametrize('name', DENSE)
def test_dense_cfg_describes_a_real_input_and_the_output_matches_it(name):
    model = timm.create_model(name, device='meta')
    cfg = model.pretrained_cfg
    assert cfg['input_size'][0] == model.in_chans
    assert f"{cfg['first_conv']}.weight" in model.state_dict()
    out = model(**_cfg_input(model))
    assert out.shape[0] == 1 and out.shape[-2:] == cfg['input_size'][-2:], 'a prediction per input pixel'
    if model.num_classes:
        assert out.shape[1] == model.num_classes


@pytest.mark.parametrize('name', [n for n in DENSE if not n.startswith('idisc_')])
def test_dense_num_classes_0_returns_the_map_the_head_reads(name):
    model = timm.create_model(name, num_classes=0, device='meta')
    assert model.num_classes == 0 and model.num_features == model.head_hidden_size > 0
    out = model(**_cfg_input(model))
    assert out.ndim == 4 and out.shape[1] == model.num_features


@pytest.mark.parametrize('name', [n for n in DENSE if n.startswith('idisc_')])
def test_idisc_has_no_class_head_so_num_classes_is_0(name):
    model = timm.create_model(name, num_classes=0, device='meta')
    assert model.num_classes == 0 and model.num_features == model.head_hidden_size > 0
    assert model(**_cfg_input(model)).shape[1] == 1  # depth; the ISD heads read num_features-wide queries


@pytest.mark.parametrize('name, kwargs', [
    ('macmd_pvt_v2_b2', {}),
    ('timesnet_convnext_tiny_convnext_tiny', dict(task='segmentation')),
])
def test_segmentation_heads_reset_like_timm_classifiers(name, kwargs):
    model = timm.create_model(name, device='meta', dtype=torch.float64, **kwargs)
    for classes in (0, 4):
        model.reset_classifier(classes)
        assert model.num_classes == classes
        out = model(x=torch.rand(1, *model.pretrained_cfg['input_size'], device='meta', dtype=torch.float64))
        assert out.shape[1] == (classes or model.num_features) and out.dtype == torch.float64
    assert all(p.device.type == 'meta' and p.dtype == torch.float64 for p in model.get_classifier().parameters())


def test_a_depth_model_refuses_classes():
    model = timm.create_model('timesnet_convnext_tiny_convnext_tiny', device='meta')
    with pytest.raises(ValueError, match='one channel'):
        model.reset_classifier(5)
    with pytest.raises(ValueError, match='num_classes must be 0'):
        timm.create_model('idisc_resnet101', num_classes=5, device='meta')


@pytest.mark.parametrize('name', VIDEO)
def test_video_cfg_is_the_frame_size_and_the_output_matches_it(name):
    model = timm.create_model(name, device='meta')
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, *model.frame_size)
    inputs = _cfg_input(model)
    if 'frames' in inputs:
        assert tuple(inputs['frames'].shape[1:]) == cfg['input_size']
    assert tuple(model(**inputs).shape) == (1, *cfg['input_size'])
    assert model.num_classes == 0 and model.num_features == model.head_hidden_size > 0


@pytest.mark.parametrize('name', DENSE[:1] + VIDEO[:1])
def test_features_only_is_refused_in_one_line(name):
    with pytest.raises(ValueError, match=f'{name} has no features_only form.*features_only=True'):
        timm.create_model(name, features_only=True)


@pytest.mark.parametrize('name', SMALLEST)
def test_smallest_variant_runs_forward_and_backward_at_its_cfg_size(name):
    torch.manual_seed(0)
    model = timm.create_model(name).train()
    if hasattr(model, 'set_deep_supervision'):
        model.set_deep_supervision()  # every head takes part, as in training
    outputs = model(**_cfg_input(model, device='cpu'))
    outputs = outputs if isinstance(outputs, list) else [outputs]
    sum(o.float().mean() for o in outputs).backward()
    assert all(torch.isfinite(o).all() for o in outputs)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing[:5]}'
