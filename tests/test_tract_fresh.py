"""TrAct (train.tract) and FreSh (train.fresh): the closed forms, and the recipe switches."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
from zoo.errors import RecipeError
from zoo.train import fresh, tract, trainer
from zoo.train.video_fitting import make_demo_clip, model_kwargs


pytestmark = pytest.mark.usefixtures('one_thread')


def _stem_net():
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def test_tract_gradient_is_the_papers_closed_form():
    """grad* = G^T X (X^T X / b + lambda I)^-1, with X the stem's patches and G the gradient at its outputs."""
    torch.manual_seed(0)
    net, x, lam = _stem_net(), torch.randn(4, 3, 8, 8), 0.3
    z = net[0](x)
    z.retain_grad()
    F.cross_entropy(net[1:](z), torch.arange(4)).backward()
    plain = net[0].weight.grad.clone()
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)  # (b, n)
    grads = z.grad.flatten(2).transpose(1, 2).reshape(-1, 6)  # (b, out)
    torch.testing.assert_close(plain.reshape(6, 27), grads.T @ patches, rtol=1e-4, atol=1e-6)
    expected = grads.T @ patches @ torch.linalg.inv(patches.T @ patches / len(patches) + lam * torch.eye(27))

    net.zero_grad()
    hook = tract.attach(net, {'lambda': lam})
    F.cross_entropy(net(x), torch.arange(4)).backward()
    torch.testing.assert_close(net[0].weight.grad.reshape(6, 27), expected, rtol=1e-4, atol=1e-6)
    hook.remove()
    net.zero_grad()
    F.cross_entropy(net(x), torch.arange(4)).backward()
    torch.testing.assert_close(net[0].weight.grad, plain)  # removed: the ordinary gradient again


def test_tract_finds_the_stem_of_zoo_models_and_refuses_others():
    model = zoo.create_model('spartan_tiny', dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), num_classes=3)
    name, conv = tract.first_conv(model)
    assert name == 'stem.0.conv' and conv.in_channels == 3
    with pytest.raises(RecipeError, match='stem or patchify'):
        tract.attach(nn.Sequential(nn.Linear(4, 4)), {'lambda': 0.1})
    with pytest.raises(RecipeError, match='only `lambda`'):
        tract.attach(_stem_net(), {'lamda': 0.1})


def test_recipes_accept_tract_and_fresh(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('model: spartan_tiny\ntask: classification\ntrain: {tract: {lambda: 0.2}}\n')
    assert trainer.load_recipe(recipe)['train']['tract'] == {'lambda': 0.2}
    assert trainer.load_recipe(recipe, ['train.fresh=true'])['train']['fresh'] is True


def test_spectrum_distance_and_fresh_choice():
    t = torch.arange(32, dtype=torch.float64)
    slow = torch.sin(2 * torch.pi * 2 * t / 32)[:, None, None, None].expand(32, 1, 2, 2)
    fast = torch.sin(2 * torch.pi * 12 * t / 32)[:, None, None, None].expand(32, 1, 2, 2)
    assert fresh.temporal_spectrum(slow).argmax() == 1 and fresh.temporal_spectrum(fast).argmax() == 11
    assert fresh.wasserstein(fresh.temporal_spectrum(slow), fresh.temporal_spectrum(fast)) == pytest.approx(10)

    frames = make_demo_clip(num_frames=8, frame_size=(16, 32))
    args = dict(frame_size=(16, 32), num_frames=8, strides=(2, 2, 2, 2), stem_dim=16, lower_width=8,
                expansion=1.0, reduction=2)
    chosen, table = fresh.choose_encoding('nerv_s', args, frames, bases=(1.05, 2.0), levels=(4, 16), seeds=(0,))
    assert len(table) == 4
    best = min(table, key=lambda row: row['distance'])
    assert (chosen['pe_base'], chosen['pe_levels']) == (best['base'], best['levels'])
    state = torch.random.get_rng_state()
    fresh.choose_encoding('nerv_s', args, frames, bases=(1.25,), levels=(4,), seeds=(0,))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    with pytest.raises(ValueError, match='encoder'):
        fresh.choose_encoding('hnerv_0_35m', {}, frames)


def test_recipe_fresh_writes_its_choice_into_model_args():
    recipe = trainer.check_recipe({
        'model': 'nerv_s', 'task': 'video', 'train': {'fresh': {'bases': [1.1, 1.5], 'levels': [8], 'seeds': [0]}},
        'model_args': dict(strides=(2, 2, 2, 2), stem_dim=16, lower_width=8, expansion=1.0, reduction=2),
        'data': {'demo_clip': {'num_frames': 4, 'frame_size': [16, 32]}}})
    args = model_kwargs(recipe)
    assert args['pe_base'] in (1.1, 1.5) and args['pe_levels'] == 8
    assert recipe['model_args']['pe_base'] == args['pe_base']
