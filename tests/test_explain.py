"""zoo.explain: every kind of picture for four classifier families, and that each method is what it claims."""
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

import zoo
import zoo.cli
from zoo import explain as ex
from zoo.errors import InputError

SIZE = 32
# Reduced versions of the four families (the registered names, fewer and narrower blocks) at 32x32.
TINY = {
    'spartan_tiny': dict(depths=(1, 1, 1, 1), dims=(16, 16, 32, 32)),
    'unireplknet_a': dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_sizes=((3,), (3,), (5,), (3,))),
    'convit_tiny': dict(img_size=SIZE, depth=2, local_up_to_layer=1, embed_dim=8),
    'halonet_h0': dict(depths=(1, 1, 1, 1), widths=(16, 32, 32, 64), block_size=4, halo_size=1, pad_to_block=True),
}


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module', params=sorted(TINY))
def tiny(request):
    torch.manual_seed(0)
    model = timm.create_model(request.param, num_classes=5, **TINY[request.param]).eval()
    for m in model.modules():  # non-zero biases, so that the bias path is not trivially zero
        if getattr(m, 'bias', None) is not None and isinstance(m.bias, nn.Parameter):
            nn.init.normal_(m.bias, std=0.1)
    return request.param, model, torch.randn(1, 3, SIZE, SIZE)


def _png_shape(path):
    with Image.open(path) as image:
        return np.asarray(image).shape


def _check_pictures(result, count=None):
    assert result.pictures and (count is None or len(result.pictures) == count)
    for path in result.pictures:
        height, width, channels = _png_shape(path)
        assert height >= 100 and width >= 100 and channels in (3, 4)


def test_feature_maps_show_each_stage(tiny, tmp_path):
    name, model, x = tiny
    result = ex.explain(model, x, 'features', out_dir=tmp_path, top_k=3)
    stages = [f['module'] for f in model.feature_info]
    _check_pictures(result, count=len(stages))
    maps = model.forward_intermediates(x, intermediates_only=True)
    for stage, fmap in zip(stages, maps):
        values = result.values[stage]
        assert values['mean'].shape == fmap.shape[-2:]
        torch.testing.assert_close(values['mean'], fmap[0].mean(0))
        # the top channels are those of highest mean activation, highest first
        means = fmap[0].mean((1, 2))
        assert values['top_channels'].tolist() == means.topk(len(values['top_channels'])).indices.tolist()


def test_attribution_gradcam_and_integrated_gradients(tiny, tmp_path):
    name, model, x = tiny
    cam = ex.explain(model, x, 'gradcam', out_dir=tmp_path, target_class=1)
    _check_pictures(cam, count=1)
    assert cam.values['cam'].shape == (SIZE, SIZE) and cam.values['cam'].min() >= 0  # ReLU'd, upsampled
    ig = ex.explain(model, x, 'integrated-gradients', out_dir=tmp_path, target_class=1, steps=16)
    _check_pictures(ig, count=1)
    assert ig.values['attributions'].shape == (3, SIZE, SIZE)
    with torch.no_grad():
        gap = (model(x)[0, 1] - model(torch.zeros_like(x))[0, 1]).item()
    # completeness: the attributions add up to f(x) - f(baseline), up to the path integral's error
    assert ig.values['attributions'].sum().item() == pytest.approx(gap, abs=0.1 * abs(gap) + 1e-3)


def test_activation_maximisation_raises_its_objective(tiny, tmp_path):
    name, model, x = tiny
    result = ex.explain(model, x, 'maximize', out_dir=tmp_path, target_class=2, steps=16, lr=0.1, jitter=2)
    _check_pictures(result, count=1)
    assert result.values['image'].shape == (3, SIZE, SIZE)
    assert result.values['end'] > result.values['start']
    layer = model.feature_info[-1]['module']
    by_channel = ex.explain(model, x, 'maximize', out_dir=tmp_path, layer=layer, channel=0, steps=16, lr=0.1,
                            jitter=2)
    assert by_channel.values['end'] > by_channel.values['start']
    assert by_channel.pictures[0].name == f'maximize_{layer}_ch0.png'


def test_linear_interpreter_reproduces_the_logits(tiny, tmp_path):
    """A x + bias path = logits, with GELU / SiLU at their input-dependent slope, softmax and norms frozen."""
    name, model, x = tiny
    result = ex.explain(model, x, 'linear', out_dir=tmp_path, target_class=0, top_k=1)
    _check_pictures(result, count=3)  # two rows and one column
    values = result.values
    with torch.no_grad():
        logits = model(x)[0]
    torch.testing.assert_close(values['logits'], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values['linear'] + values['bias'][values['classes']], logits[values['classes']],
                               rtol=1e-4, atol=1e-5)
    assert values['bias'].abs().max() > 0
    # the interpreter is linear in its input: A(2z) = 2 A z
    interpreter = ex.LinearInterpreter(model, x)
    z = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(interpreter(2 * z) - interpreter.bias, 2 * (interpreter(z) - interpreter.bias),
                                   rtol=1e-4, atol=1e-5)


def test_linear_interpreter_is_exact_on_a_relu_network():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    net[4].running_mean.normal_()
    x = torch.randn(1, 3, 16, 16)
    interpreter = ex.LinearInterpreter(net, x)
    rows = interpreter.rows(range(4))
    with torch.no_grad():
        logits = net(x)[0]
    reproduced = (rows * x[0]).flatten(1).sum(1) + interpreter.bias[0]
    torch.testing.assert_close(reproduced, logits, rtol=1e-5, atol=1e-6)
    # ReLU gates are 0/1: the map equals the network's Jacobian at x, and the bias path is f(0) with x's gates
    jacobian = torch.autograd.functional.jacobian(lambda t: net(t)[0], x)[:, 0]
    torch.testing.assert_close(rows, jacobian, rtol=1e-5, atol=1e-6)


def test_convit_attention_gates_and_rows(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('convit_tiny', num_classes=5, **TINY['convit_tiny']).eval()
    with torch.no_grad():
        model.blocks[0].attn.gating_param.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    result = ex.explain(model, torch.randn(1, 3, SIZE, SIZE), 'attention', out_dir=tmp_path, queries=[(0, 1)])
    _check_pictures(result, count=3)  # gates, and the query's rows in each of the 2 blocks
    torch.testing.assert_close(result.values['gates'][0], torch.sigmoid(torch.tensor([-2.0, 0.0, 1.0, 3.0])))
    for block in ('blocks.0.attn', 'blocks.1.attn'):  # GPSA, then plain attention with the class token
        attn = result.values[block]
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    assert result.values['blocks.1.attn'].shape[-1] == 1 + (SIZE // 16) ** 2


def test_halonet_attention_of_a_pixel(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('halonet_h0', num_classes=5, **TINY['halonet_h0']).eval()
    layer = 'stages.1.blocks.0.self_attn'  # an 8x8 map: blocks of 4, halo 1 -> 6x6 windows
    result = ex.explain(model, torch.randn(1, 3, SIZE, SIZE), 'attention', out_dir=tmp_path, layer=layer,
                        pixel=(0.6, 0.3))
    _check_pictures(result, count=1)
    rows = result.values[layer]
    assert rows.shape == (model.get_submodule(layer).num_heads, 6, 6)
    torch.testing.assert_close(rows.flatten(1).sum(-1), torch.ones(len(rows)))
    assert result.values['pixel'] == (4, 2)


def test_attention_refuses_a_model_without_its_own(tmp_path):
    model = timm.create_model('spartan_tiny', num_classes=5, **TINY['spartan_tiny']).eval()
    with pytest.raises(InputError, match='no attention'):
        ex.explain(model, torch.randn(1, 3, SIZE, SIZE), 'attention', out_dir=tmp_path)
    with pytest.raises(InputError, match='unknown method'):
        ex.explain(model, torch.randn(1, 3, SIZE, SIZE), 'saliency', out_dir=tmp_path)
    with pytest.raises(InputError, match='no layer'):
        ex.explain(model, torch.randn(1, 3, SIZE, SIZE), 'features', out_dir=tmp_path, layer='stages.9')


def test_cli_explain_writes_pictures(tmp_path):
    image = tmp_path / 'photo.png'
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / 'pictures'
    assert zoo.cli.main(['explain', 'spartan_tiny', str(image), '--random', '--size', '32', '--method', 'gradcam',
                         '--target-class', '3', '-o', str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ['gradcam_stages.3_3.png']
    assert zoo.cli.main(['explain', 'spartan_tiny', str(tmp_path / 'missing.png'), '--random', '-o', str(out)]) == 2


def test_import_zoo_does_not_import_matplotlib():
    code = 'import sys, zoo, zoo.cli; assert "matplotlib" not in sys.modules and "captum" not in sys.modules'
    subprocess.run([sys.executable, '-c', code], check=True)
