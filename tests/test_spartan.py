"""SpaRTAN: the official model's outputs, checkpoints and the timm interface."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2

from zoo.convert import from_official
from zoo.errors import CheckpointError
from zoo.models import spartan
from zoo.models._builder import load_state_dict_strict

from official_layout import load_manifest, placeholder_state_dict, to_official_layout

FIXTURES = Path(__file__).parent / 'fixtures' / 'spartan'
CASES = ['c1_repo_reduced', 'c2_3stage']


def load_case(case):
    meta = json.loads((FIXTURES / f'{case}.json').read_text())
    weights = load_file(FIXTURES / f'{case}.weights.safetensors')
    io = load_file(FIXTURES / f'{case}.io.safetensors')
    return meta, weights, io


@pytest.fixture(scope='module', params=CASES)
def case(request):
    meta, weights, io = load_case(request.param)
    return meta, from_official('spartan', weights, **meta['constructor_kwargs']), io


def test_reference_logits_and_features(case):
    meta, model, io = case
    tol = meta['suggested_tolerance']
    with torch.no_grad():
        features = model.forward_head(model.forward_features(io['input']), pre_logits=True)
        logits = model(io['input'])
    torch.testing.assert_close(features, io['features'], atol=tol['atol'], rtol=tol['rtol'])
    torch.testing.assert_close(logits, io['logits'], atol=tol['atol'], rtol=tol['rtol'])
    assert sum(p.numel() for p in model.parameters()) == meta['param_count']


def test_reference_stage_outputs_through_forward_intermediates(case):
    meta, model, io = case
    tol = meta['suggested_tolerance']
    with torch.no_grad():
        stages = model.forward_intermediates(io['input'], intermediates_only=True)
    assert len(stages) == len(meta['constructor_kwargs']['layer_depths'])
    for i, stage in enumerate(stages):
        torch.testing.assert_close(stage, io[f'stage_out.{i}'], atol=tol['atol'], rtol=tol['rtol'])


def test_full_size_manifest_loads_strictly_into_spartan_tiny():
    manifest = load_manifest('spartan', 'spartan_t_repo_config')
    with torch.device('meta'):
        model = timm.create_model('spartan_tiny')
    converted = spartan.checkpoint_filter_fn(placeholder_state_dict(manifest), model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert manifest['num_params'] == sum(p.numel() for p in model.parameters()) == 3_820_296


def test_spartan_tiny_gmacs_match_the_paper():
    from zoo.cards import count_gmacs
    with torch.device('meta'):
        model = timm.create_model('spartan_tiny')
    assert count_gmacs(model, (3, 256, 256)) == pytest.approx(1.04, abs=0.01)  # paper: ~1.0 GFLOPs at 256 px
    assert model.pretrained_cfg['input_size'] == (3, 256, 256)
    assert model.pretrained_cfg['crop_pct'] == 1.0


def test_official_training_checkpoint_dict_and_ddp_prefix_are_accepted():
    meta, weights, io = load_case('c2_3stage')
    wrapped = {'epoch': 3, 'model': {f'module.{k}': v for k, v in weights.items()}}
    model = from_official('spartan', wrapped, **meta['constructor_kwargs'])
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits'], atol=1e-4, rtol=1e-4)


def test_zoo_layout_round_trip_and_back_to_official():
    meta, weights, io = load_case('c1_repo_reduced')
    model = from_official('spartan', weights, **meta['constructor_kwargs'])
    zoo_sd = model.state_dict()
    assert spartan.checkpoint_filter_fn(zoo_sd, model) is not None
    fresh = spartan.create_from_official(**meta['constructor_kwargs'])
    load_state_dict_strict(fresh, spartan.checkpoint_filter_fn(zoo_sd, fresh))
    manifest = {'state_dict': {k: list(v.shape) for k, v in weights.items()}}
    official = to_official_layout(zoo_sd, model, spartan.checkpoint_filter_fn, manifest)
    for key, value in weights.items():
        assert torch.equal(official[key], value), key


def test_checkpoint_of_another_architecture_is_refused_with_its_keys():
    meta, _, _ = load_case('c2_3stage')
    resnet_sd = timm.create_model('resnet18', num_classes=5).state_dict()
    with pytest.raises(ValueError, match=r'not a SpaRTAN checkpoint.*conv1\.weight'):
        from_official('spartan', resnet_sd, **meta['constructor_kwargs'])


def test_checkpoint_of_another_config_names_missing_and_mismatched_keys():
    meta, weights, _ = load_case('c1_repo_reduced')
    kwargs = dict(meta['constructor_kwargs'], layer_depths=[1, 1, 2, 1])
    with pytest.raises(ValueError, match='other layer_depths'):
        from_official('spartan', weights, **kwargs)
    kwargs = dict(meta['constructor_kwargs'], num_classes=7)
    with pytest.raises(CheckpointError, match=r'of another shape \(first: head\.fc\.weight'):
        from_official('spartan', weights, **kwargs)


def test_official_constructor_asserts_become_errors():
    with pytest.raises(ValueError, match='num_layer'):
        spartan.create_from_official(num_classes=10, num_layer=4, layer_depths=[1, 1, 1], dims=[16, 32, 64])
    with pytest.raises(ValueError, match='multiple of 8'):
        spartan.create_from_official(num_classes=10, num_layer=2, layer_depths=[1, 1], expand_ratios=[2, 2], dims=[20])
    with pytest.raises(ValueError, match='at least 2'):
        spartan.create_from_official(num_classes=10, num_layer=2, layer_depths=[1, 1], dims=[32], init_dim=16)


def test_drop_path_rates_follow_the_official_schedule():
    model = timm.create_model('spartan_tiny', drop_path_rate=0.1)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, 'drop_prob') else 0.
             for stage in model.stages for b in stage.blocks]
    assert rates == pytest.approx([0.1 * i / 20 for i in range(20)])


@pytest.fixture(scope='module')
def small_model():
    torch.manual_seed(0)
    return timm.create_model('spartan_tiny', num_classes=10).eval()


def test_wrong_input_is_refused_with_a_clear_message(small_model):
    with pytest.raises(ValueError, match=r'expected 3 input channels.*in_chans=1'):
        small_model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='at least 32x32'):
        small_model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match='4-D'):
        small_model(torch.randn(3, 64, 64))


def test_in_chans_adapts_the_stem():
    model = timm.create_model('spartan_tiny', in_chans=1, num_classes=4).eval()
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 4)


def test_features_only_gives_four_stages():
    model = timm.create_model('spartan_tiny', features_only=True).eval()
    assert model.feature_info.channels() == [32, 64, 128, 256]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]


def test_forward_intermediates_and_pruning(small_model):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, intermediates = small_model.forward_intermediates(x, indices=[1, 3])
        assert torch.allclose(final, small_model.forward_features(x))
        assert [t.shape[1] for t in intermediates] == [64, 256]
    model = timm.create_model('spartan_tiny').eval()
    assert model.prune_intermediate_layers(indices=[1]) == [1]
    assert len(model.stages) == 2 and model.num_classes == 0 and model.num_features == 64


def test_timm_optimizer_exempts_the_smixer_gamma_from_weight_decay_as_the_official_one_does():
    model = spartan.spartan_tiny()
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    exempt = {id(p) for group in optimizer.param_groups if group['weight_decay'] == 0 for p in group['params']}
    exempt_names = {name for name, p in model.named_parameters() if id(p) in exempt}
    smixer_gammas = {name for name in exempt_names if name.endswith('smixer.gamma')}
    assert len(smixer_gammas) == sum(len(stage.blocks) for stage in model.stages)
    assert model.get_parameter(next(iter(smixer_gammas))).ndim == 4
    assert all(model.get_parameter(n).ndim == 1 for n in exempt_names - smixer_gammas)
    assert 'stages.0.blocks.0.cmixer.complex' not in exempt_names


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    model = timm.create_model('spartan_tiny', num_classes=3, drop_path_rate=0.)  # train mode, no random drops
    x = torch.randn(2, 3, 64, 64)
    reference = model(x)
    reference.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    output = model(x)
    torch.testing.assert_close(output, reference)
    output.sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=name)


def test_classifier_reset_and_pre_logits(small_model):
    model = timm.create_model('spartan_tiny', num_classes=10).eval()
    assert model.get_classifier().out_features == 10
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 256)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5
    matcher = small_model.group_matcher()
    assert matcher['stem'] == r'^stem'
