"""UniRepLKNet's fast inference path computes the same function as the plain module-by-module path."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

from zoo.models.unireplknet import UniRepLKNet, UniRepLKNetBlock, _dw_conv_reachable

from test_unireplknet import randomize

# Every block kind: no mixer (0), plain 3x3 / 5x5, and dilated re-parameterisable 7, 13, 17.
SMALL = dict(depths=(2, 1, 3, 1), dims=(8, 16, 24, 32), kernel_sizes=((3, 0), (5,), (7, 13, 17), (13,)))


def fast_and_plain(model: nn.Module):
    model = randomize(model).eval().reparameterize()
    return model, copy.deepcopy(model).set_fast(False)


def assert_same_logits(fast: nn.Module, plain: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        expected, actual = plain(x), fast(x)
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() < 1e-4 * max(scale, 1.)


@pytest.mark.parametrize('shape', [(1, 3, 32, 32), (3, 3, 64, 64), (2, 3, 50, 70), (2, 3, 97, 33), (1, 3, 8, 8)])
def test_fast_path_matches_plain_on_every_block_kind_and_map_size(shape):
    torch.manual_seed(0)
    fast, plain = fast_and_plain(UniRepLKNet(num_classes=7, **SMALL))
    assert_same_logits(fast, plain, torch.randn(shape))


@pytest.mark.parametrize('size', [224, 128])
def test_fast_path_matches_plain_on_unireplknet_a(size):
    """The real shapes; at 128 px stage 4 is 4x4, where the 13x13 kernel is cropped to 7x7."""
    torch.manual_seed(0)
    fast, plain = fast_and_plain(timm.create_model('unireplknet_a'))
    assert_same_logits(fast, plain, torch.randn(2, 3, size, size))


@pytest.mark.parametrize('kernel_size,map_size', [(13, (4, 4)), (13, (1, 9)), (17, (5, 30)), (3, (1, 1)), (13, (7, 7))])
def test_cropped_kernel_gives_the_full_kernel_result(kernel_size, map_size):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, kernel_size, padding=kernel_size // 2, groups=6, bias=True)
    x = torch.randn(2, 6, *map_size)
    with torch.no_grad():
        torch.testing.assert_close(_dw_conv_reachable(conv, x), conv(x), atol=1e-5, rtol=1e-5)


def test_fast_path_is_the_default_for_deploy_inference_only(monkeypatch):
    calls = []
    original = UniRepLKNetBlock.forward_fast
    monkeypatch.setattr(UniRepLKNetBlock, 'forward_fast', lambda self, x: calls.append(1) or original(self, x))
    x = torch.randn(1, 3, 32, 32)
    train_form = UniRepLKNet(num_classes=5, **SMALL).eval()
    train_form(x)
    assert not calls  # the training form has BNs and layer scale: plain path
    deploy = timm.create_model('unireplknet_a', deploy=True, num_classes=5).eval()
    deploy(x)
    assert len(calls) == 12
    deploy.train()(x)
    deploy.eval().set_fast(False)(x)
    assert len(calls) == 12


def test_fast_path_gives_the_same_input_gradient():
    """Saliency maps and adversarial attacks differentiate an eval-mode model through the fast path."""
    torch.manual_seed(0)
    fast, plain = fast_and_plain(UniRepLKNet(num_classes=7, **SMALL))
    grads = []
    for model in (fast, plain):
        x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1), requires_grad=True)
        model(x)[:, 3].sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_compiled_model_traces_the_plain_path(monkeypatch):
    """Under torch.compile the blocks give inductor the plain graph, which it fuses better (docs/benchmarks.md)."""
    calls = []
    original = UniRepLKNetBlock.forward_fast
    monkeypatch.setattr(UniRepLKNetBlock, 'forward_fast', lambda self, x: calls.append(1) or original(self, x))
    torch.manual_seed(0)
    fast, plain = fast_and_plain(UniRepLKNet(num_classes=7, **SMALL))
    torch._dynamo.reset()
    assert_same_logits(torch.compile(fast, backend='eager'), plain, torch.randn(2, 3, 32, 32))
    torch._dynamo.reset()
    assert not calls
    fast(torch.randn(1, 3, 32, 32))
    assert calls, 'eager inference still takes the fast path'
