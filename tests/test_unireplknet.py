"""UniRepLKNet: the official model's outputs (training and deploy forms), re-parameterisation, checkpoints,
variants against the paper and the timm interface."""
import io as _io
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.utils import reparameterize_model

import zoo
from zoo.cards import count_gmacs
from zoo.convert import from_official
from zoo.models import unireplknet
from zoo.models.unireplknet import DILATED_BRANCHES, DilatedReparamConv, checkpoint_filter_fn, create_from_official

from official_layout import load_manifest, placeholder_state_dict, to_official_layout

FIXTURES = Path(__file__).parent / 'fixtures' / 'unireplknet'
CASES = ['c1_default_train', 'c2_allk_train', 'c3_allk_deploy']
VARIANTS = ['a', 'f', 'p', 'n', 't', 's', 'b', 'l', 'xl']
# TPAMI Table 4/5 params (M, deploy form; B as in Table 5) and GMACs (224 px for A..S, 384 px for B..XL).
PAPER = {
    'a': (4.4, 0.6, 224), 'f': (6.2, 0.9, 224), 'p': (10.7, 1.6, 224), 'n': (18.3, 2.8, 224),
    't': (31.0, 4.9, 224), 's': (55.6, 9.1, 224), 'b': (98.0, 47.2, 384), 'l': (218.3, 105.4, 384),
    'xl': (386.4, 187.0, 384),
}


def load_case(case):
    meta = json.loads((FIXTURES / f'{case}.json').read_text())
    return meta, load_file(FIXTURES / f'{case}.weights.safetensors'), load_file(FIXTURES / f'{case}.io.safetensors')


def randomize(model, seed=0):
    """Non-trivial BN statistics, GRN, layer scale and biases, so that every fold is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype != torch.float32:
                continue
            if name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(('running_mean', 'bias', 'grn.weight')):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
            elif name.endswith(('ls.gamma', 'norm.weight')):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return model


@pytest.fixture(scope='module', params=CASES)
def case(request):
    meta, weights, io = load_case(request.param)
    return meta, from_official('unireplknet', weights, **meta['constructor_kwargs']), io


def test_reference_logits_features_and_stages(case):
    meta, model, io = case
    tol = meta['suggested_tolerance']
    assert model.deploy == meta['constructor_kwargs']['deploy']
    with torch.no_grad():
        final, stages = model.forward_intermediates(io['input'])
        features = model.forward_head(final, pre_logits=True)
        logits = model(io['input'])
    torch.testing.assert_close(features, io['features'], atol=tol['atol'], rtol=tol['rtol'])
    torch.testing.assert_close(logits, io['logits'], atol=tol['atol'], rtol=tol['rtol'])
    for i, stage in enumerate(stages):
        scale = max(1., io[f'stage_out.{i}'].abs().max().item())
        torch.testing.assert_close(stage, io[f'stage_out.{i}'], atol=tol['atol'] * scale, rtol=tol['rtol'])
    assert sum(p.numel() for p in model.parameters()) == meta['param_count']


def test_reparameterize_reproduces_the_official_fused_tensors():
    meta, weights, io = load_case('c2_allk_train')
    model = from_official('unireplknet', weights, **meta['constructor_kwargs'])
    assert model.reparameterize() is model and model.deploy
    fused = model.state_dict()
    model.reparameterize()  # a second call is a no-op
    assert all(torch.equal(fused[k], v) for k, v in model.state_dict().items())
    _, deploy_weights, deploy_io = load_case('c3_allk_deploy')
    deploy_model = create_from_official(**dict(meta['constructor_kwargs'], deploy=True))
    official = checkpoint_filter_fn(deploy_weights, deploy_model)
    assert set(official) == set(fused)
    for key, value in official.items():
        torch.testing.assert_close(fused[key], value, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), deploy_io['logits'], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kernel_size', sorted(DILATED_BRANCHES))
def test_dilated_reparam_conv_merges_every_supported_kernel_size(kernel_size):
    conv = randomize(DilatedReparamConv(8, kernel_size), seed=kernel_size).eval()
    assert len(conv.branches) == len(DILATED_BRANCHES[kernel_size][0])
    x = torch.randn(2, 8, 2 * kernel_size, 2 * kernel_size)
    with torch.no_grad():
        expected = conv(x)
        conv.reparameterize()
        conv.reparameterize()
        actual = conv(x)
    assert conv.deploy and list(dict(conv.named_parameters())) == ['lk_origin.weight', 'lk_origin.bias']
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_reparameterize_model_on_unireplknet_a_gives_the_deploy_form():
    torch.manual_seed(0)
    model = randomize(timm.create_model('unireplknet_a')).eval()
    x = torch.randn(2, 3, 64, 64)
    fused = reparameterize_model(model)  # timm's walker on a copy
    assert not model.deploy and fused.deploy
    with torch.no_grad():
        diff = (fused(x) - model(x)).abs().max().item()
    assert diff < 1e-4
    deploy_model = timm.create_model('unireplknet_a', deploy=True)
    deploy_model.load_state_dict(fused.state_dict(), strict=True)
    assert sum(p.numel() for p in deploy_model.parameters()) == 4_437_300
    model.reparameterize()
    model.reparameterize()
    assert model.state_dict().keys() == deploy_model.state_dict().keys()


@pytest.mark.parametrize('name', sorted(p.stem for p in (FIXTURES / 'manifests').glob('*.json')))
def test_full_size_manifest_loads_strictly(name):
    manifest = load_manifest('unireplknet', name)
    with torch.device('meta'):
        model = create_from_official(**manifest['resolved_constructor_kwargs'])
    converted = checkpoint_filter_fn(placeholder_state_dict(manifest), model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert sum(p.numel() for p in model.parameters()) == manifest['num_params']


@pytest.mark.parametrize('variant', VARIANTS)
def test_variant_params_and_macs_match_the_paper_and_official_code(variant):
    paper_params, paper_gmacs, size = PAPER[variant]
    manifest = load_manifest('unireplknet', f'unireplknet_{variant}.deploy')
    with torch.device('meta'):
        deploy = timm.create_model(f'unireplknet_{variant}', deploy=True)
        train = timm.create_model(f'unireplknet_{variant}')
    params = sum(p.numel() for p in deploy.parameters())
    assert params == manifest['num_params']
    # the paper rounds to 0.1M; for L and XL it is 0.15M / 0.13M below the official code's count
    assert abs(params / 1e6 - paper_params) <= max(0.05, 1e-3 * paper_params)
    train_manifest = load_manifest('unireplknet', f'unireplknet_{variant}')
    assert sum(p.numel() for p in train.parameters()) == train_manifest['num_params']
    gmacs = count_gmacs(deploy, (3, size, size))
    assert gmacs * 1e9 == pytest.approx(manifest['macs'][str(size)], rel=1e-9)
    assert gmacs == pytest.approx(paper_gmacs, abs=0.05 * max(1., paper_gmacs / 10))


def test_official_kernel_size_schedules():
    with torch.device('meta'):
        model = timm.create_model('unireplknet_t')
    kernels = [[b.conv_dw.kernel_size if isinstance(b.conv_dw, DilatedReparamConv) else b.conv_dw.kernel_size[0]
                for b in stage.blocks] for stage in model.stages]
    assert kernels == [[3] * 3, [13] * 3, [13, 3] * 9, [13] * 3]
    assert unireplknet.DEFAULT_KERNEL_SIZES[(3, 3, 27, 3)][2] == (13, 3, 3) * 9


def test_form_mismatch_errors_say_which_form_and_how_to_get_the_other():
    meta, deploy_weights, _ = load_case('c3_allk_deploy')
    train_kwargs = dict(meta['constructor_kwargs'], deploy=False)
    with pytest.raises(ValueError, match=r'deploy \(re-parameterised\) form.*deploy=True'):
        from_official('unireplknet', deploy_weights, **train_kwargs)
    _, train_weights, _ = load_case('c2_allk_train')
    with pytest.raises(ValueError, match=r'training form.*reparameterize\(\)'):
        from_official('unireplknet', train_weights, **meta['constructor_kwargs'])
    # zoo layout, through plain load_state_dict
    train_model = create_from_official(**train_kwargs)
    deploy_model = create_from_official(**meta['constructor_kwargs'])
    with pytest.raises(ValueError, match='deploy=True'):
        train_model.load_state_dict(deploy_model.state_dict())
    with pytest.raises(ValueError, match='reparameterize'):
        deploy_model.load_state_dict(train_model.state_dict())


def test_deploy_form_survives_save_pretrained_and_load(tmp_path):
    torch.manual_seed(0)
    model = randomize(timm.create_model('unireplknet_a', num_classes=10)).eval()
    fused = reparameterize_model(model)
    zoo.hub.save_pretrained(fused, tmp_path)
    assert json.loads((tmp_path / 'config.json').read_text())['model_args']['deploy'] is True
    loaded = zoo.hub.load(tmp_path)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fused(x))
    assert loaded.deploy


def test_official_training_dict_ddp_prefix_and_zoo_layout_are_accepted():
    meta, weights, io = load_case('c1_default_train')
    wrapped = {'epoch': 3, 'model': {f'module.{k}': v for k, v in weights.items()}}
    model = from_official('unireplknet', wrapped, **meta['constructor_kwargs'])
    again = from_official('unireplknet', model.state_dict(), **meta['constructor_kwargs'])
    with torch.no_grad():
        torch.testing.assert_close(again(io['input']), io['logits'], atol=1e-4, rtol=1e-4)


def test_bad_checkpoints_and_configs_are_refused():
    with pytest.raises(ValueError, match='not a UniRepLKNet checkpoint'):
        checkpoint_filter_fn({'conv1.weight': torch.zeros(1)}, timm.create_model('unireplknet_a'))
    with pytest.raises(ValueError, match='no official kernel-size schedule'):
        create_from_official(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    with pytest.raises(ValueError, match='kernel size must be one of'):
        create_from_official(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), kernel_sizes=((3,), (3,), (19,), (3,)))
    with pytest.raises(ValueError, match='not a classifier'):
        create_from_official(num_classes=None)
    meta, weights, _ = load_case('c1_default_train')
    with pytest.raises(zoo.errors.CheckpointError, match='keys unexpected'):
        from_official('unireplknet', weights, **dict(meta['constructor_kwargs'], depths=(2, 2, 4, 2),
                                                     kernel_sizes=((3, 3), (13, 13), (13,) * 4, (13, 13))))


def test_wrong_input_is_refused_with_a_clear_message():
    model = timm.create_model('unireplknet_a')
    with pytest.raises(ValueError, match='3 input channels'):
        model(torch.randn(1, 1, 32, 32))


def test_features_only_forward_intermediates_and_pruning():
    model = timm.create_model('unireplknet_a', features_only=True)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [40, 80, 160, 320]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = model(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(40, 16, 16), (80, 8, 8), (160, 4, 4), (320, 2, 2)]
    classifier = timm.create_model('unireplknet_a', num_classes=0)
    classifier.load_state_dict(model.state_dict(), strict=False)
    assert classifier.prune_intermediate_layers([1]) == [1]
    with torch.no_grad():
        out = classifier.forward_intermediates(x, indices=[1], intermediates_only=True)
    assert len(classifier.stages) == 2 and tuple(out[0].shape) == (1, 80, 8, 8)


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    meta, weights, _ = load_case('c1_default_train')
    x = torch.randn(2, 3, 32, 32)  # small: large-kernel depth-wise backward is slow on CPU
    results = []
    for checkpointing in (False, True):
        model = from_official('unireplknet', weights, **meta['constructor_kwargs']).train()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(0)
        loss = model(x).square().mean()
        loss.backward()
        results.append((loss.detach(), model.stem[0].weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert create_from_official(**dict(meta['constructor_kwargs'], with_cp=True)).stages[0].grad_checkpointing


def test_pretrained_cfgs_point_at_the_official_files():
    tags = timm.list_pretrained('unireplknet_*')
    expected = {f'unireplknet_{v}.in1k' for v in 'afpnts'}
    expected |= {f'unireplknet_{v}.{t}' for v in ('s', 'b', 'l', 'xl') for t in ('in22k_ft_in1k_384', 'in22k')}
    assert set(tags) == expected
    for tag in tags:
        cfg = timm.models.get_pretrained_cfg(tag).to_dict()
        assert cfg['source'] == 'official' and cfg['hf_hub_id'] == 'DingXiaoH/UniRepLKNet'
        arch = tag.split('.')[0]
        assert cfg['hf_hub_filename'].startswith(arch + '_') and cfg['hf_hub_filename'].endswith('.pth')
        if tag.endswith('_384'):
            assert cfg['input_size'] == (3, 384, 384) and cfg['crop_mode'] == 'squash' and cfg['crop_pct'] == 1.0
        else:
            assert cfg['input_size'][1] < 384 and cfg['crop_pct'] == 0.875
        assert cfg['num_classes'] == (21841 if tag.endswith('in22k') else 1000)
    assert timm.models.get_pretrained_cfg('unireplknet_t.in1k').hf_hub_filename == 'unireplknet_t_in1k_224_acc83.21.pth'
    assert set(unireplknet.card_info['variants']) == {f'unireplknet_{v}' for v in VARIANTS}


def test_pretrained_official_weights_through_the_hub_load_in_both_forms(hub):
    """An official-layout .pth on the (fake) Hub loads into the training form, and with deploy=True is
    re-parameterised after loading."""
    from huggingface_hub import HfApi

    torch.manual_seed(0)
    source = randomize(timm.create_model('unireplknet_a')).eval()
    manifest = load_manifest('unireplknet', 'unireplknet_a')
    official = to_official_layout(source.state_dict(), source, checkpoint_filter_fn, manifest)
    buffer = _io.BytesIO()
    torch.save({'model': official}, buffer)
    api = HfApi()
    api.create_repo('DingXiaoH/UniRepLKNet', exist_ok=True)
    api.upload_file(path_or_fileobj=buffer.getvalue(), path_in_repo='unireplknet_a_in1k_224_acc77.03.pth',
                    repo_id='DingXiaoH/UniRepLKNet')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source(x)
        train = timm.create_model('unireplknet_a.in1k', pretrained=True).eval()
        deploy = timm.create_model('unireplknet_a.in1k', pretrained=True, deploy=True).eval()
        torch.testing.assert_close(train(x), expected, atol=1e-5, rtol=1e-5)
        assert deploy.deploy and not train.deploy
        assert (deploy(x) - expected).abs().max().item() < 1e-4
