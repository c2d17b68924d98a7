"""MACMD: the official sub-modules and decoder, the official checkpoint layout, and the segmentation model."""
import json
import logging
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import zoo
from zoo.convert import from_official
from zoo.errors import CheckpointError
from zoo.models import macmd
from zoo.models._builder import load_state_dict_strict

from official_layout import load_manifest, placeholder_state_dict

FIXTURES = Path(__file__).parent / 'fixtures' / 'macmd'
UP_BLOCKS = ['decoder.apm.up_blocks.1', 'decoder.apm.up_blocks.2', 'decoder.apm.up_blocks.3']


def load_case(case):
    meta = json.loads((FIXTURES / f'{case}.json').read_text())
    io = load_file(FIXTURES / f'{case}.io.safetensors')
    weights = load_file(FIXTURES / f'{case}.weights.safetensors')
    runtime_path = FIXTURES / f'{case}.runtime.safetensors'
    runtime = load_file(runtime_path) if runtime_path.exists() else {}
    return meta, weights, runtime, io


def assert_close(actual, expected, meta):
    tol = meta['suggested_tolerance']
    torch.testing.assert_close(actual, expected, atol=tol['atol'], rtol=tol['rtol'])


# Sub-module cases: official weights of one decoder part, renamed as they are inside an official decoder.
SUBMODULE_CASES = {
    'hdconv_c16': (lambda: macmd.HDConv(16, 16), 'ag1.W_g.0.', lambda m, io: m(io['x'])),
    'mcag_c32': (lambda: macmd.MCAG(32), 'ag1.', lambda m, io: m(io['g'])),
    'meab_c64': (lambda: macmd.MEAB(64, 64), 'acb.', lambda m, io: m(io['x'])),
    'ccmix_t12': (
        lambda: macmd.MSCCM([40, 24, 16], 16), 'ccm.', lambda m, io: m([io[f'features.{i}'] for i in range(3)])),
    'upblock_24to16': (lambda: macmd.UpBlock(24, 16), 'decoder1.', lambda m, io: m(io['x'])),
    'ffb_c16': (lambda: macmd.FeatureFusionBlock(16), 'ffb.', lambda m, io: m(io['f1'], io['f2'], io['f3'])),
    'apm_c16': (lambda: macmd.APM([16, 24, 40, 64], 16), 'apm.', lambda m, io: m([io[f'x{i}'] for i in range(1, 5)])),
}


def load_submodule(case):
    """The zoo module of a sub-module case, its official weights passed through the decoder key renames."""
    build, official_prefix, call = SUBMODULE_CASES[case]
    meta, weights, runtime, io = load_case(case)
    converted = macmd._official_decoder_to_zoo({official_prefix + k: v for k, v in weights.items()})
    zoo_prefix = macmd._rename(official_prefix, macmd._DECODER_RENAMES)
    state_dict = {k.removeprefix(zoo_prefix): v for k, v in converted.items()}
    state_dict.update(runtime)  # the APM up-blocks, pinned by the fixture (same names in the zoo)
    module = build()
    load_state_dict_strict(module, state_dict, source=case)
    return meta, module.eval(), call, io


@pytest.mark.parametrize('case', sorted(SUBMODULE_CASES))
def test_submodule_reproduces_the_official_outputs(case):
    meta, module, call, io = load_submodule(case)
    with torch.no_grad():
        out = call(module, io)
    if case == 'ccmix_t12':
        for i, o in enumerate(out):
            assert_close(o, io[f'out.{i}'], meta)
    elif case == 'apm_c16':
        assert_close(out, io['out.persistent_eval'], meta)  # registered up-blocks in eval mode
    else:
        assert_close(out, io['out'], meta)
    dropped_ln1 = 2 * 24 if case == 'upblock_24to16' else 0  # the unused LayerNorm(24)
    up_blocks = 3 * (16 * 9 + 16 + 2 * 16 + 16 * 16 + 16) if case == 'apm_c16' else 0  # dw, BN, pw at C=16
    assert sum(p.numel() for p in module.parameters()) == meta['num_params'] - dropped_ln1 + up_blocks


def test_apm_with_batch_statistics_in_its_up_blocks_is_the_official_forward():
    """The official up-blocks are fresh modules, hence in training mode: their BN uses batch statistics."""
    meta, apm, call, io = load_submodule('apm_c16')
    for block in apm.up_blocks[1:]:
        block.block[1].train()
    with torch.no_grad():
        assert_close(call(apm, io), io['out.official'], meta)


def test_mcag_gates_the_rectified_features():
    """The official in-place ReLU rectifies BN(HDConv(x)) before it is gated: outputs are never negative."""
    _, mcag, call, io = load_submodule('mcag_c32')
    with torch.no_grad():
        assert call(mcag, io).min() >= 0


@pytest.fixture(scope='module')
def decoder_case():
    return load_case('decoder_pinned_s64')


def decode(model, io):
    with torch.no_grad():
        return model([io[f'x{i}'] for i in range(1, 5)])


def test_whole_decoder_through_from_official(decoder_case):
    meta, weights, runtime, io = decoder_case
    decoder = from_official('macmd', {**weights, **runtime}, **meta['constructor_kwargs'])
    assert isinstance(decoder, macmd.MACMDDecoder) and not decoder.training
    for i, out in enumerate(decode(decoder, io)):
        assert_close(out, io[f'dec{i}.persistent_eval'], meta)
    for block in decoder.apm.up_blocks[1:]:
        block.block[1].train()
    assert_close(decode(decoder, io)[0], io['dec0.official'], meta)


def test_official_decoder_without_up_blocks_loads_and_names_them(decoder_case, caplog):
    meta, weights, _, io = decoder_case
    with caplog.at_level(logging.WARNING, logger='zoo.models.macmd'):
        decoder = from_official('macmd', weights, **meta['constructor_kwargs'])
    message = caplog.text
    assert 'apm.up_blocks.1, apm.up_blocks.2, apm.up_blocks.3 (27 entries)' in message
    dec0, dec1, dec2 = decode(decoder, io)
    assert_close(dec1, io['dec1.persistent_eval'], meta)  # only dec0 depends on the APM
    assert_close(dec2, io['dec2.persistent_eval'], meta)
    assert not torch.allclose(dec0, io['dec0.persistent_eval'], atol=1e-3)


def test_zoo_layout_decoder_round_trips_and_must_be_complete(decoder_case):
    meta, weights, runtime, io = decoder_case
    decoder = from_official('macmd', {**weights, **runtime}, **meta['constructor_kwargs'])
    zoo_sd = decoder.state_dict()
    again = from_official('macmd', {f'module.{k}': v for k, v in zoo_sd.items()}, **meta['constructor_kwargs'])
    for a, b in zip(decode(decoder, io), decode(again, io)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    incomplete = {k: v for k, v in zoo_sd.items() if 'up_blocks' not in k}
    with pytest.raises(CheckpointError, match=r'27 keys missing \(first: apm\.up_blocks\.1\.block\.0\.weight'):
        from_official('macmd', incomplete, **meta['constructor_kwargs'])


# ---------------------------------------------------------------------------------------------------------------
# The full official model: its checkpoint layout (manifest), on the meta device


@pytest.fixture(scope='module')
def manifest():
    return load_manifest('macmd', 'pvt_b2_macmd_synapse')


def test_synapse_manifest_loads_strictly_into_macmd_pvt_v2_b2(manifest, caplog):
    with torch.device('meta'):
        model = timm.create_model('macmd_pvt_v2_b2')
    official = placeholder_state_dict(manifest)
    with caplog.at_level(logging.WARNING, logger='zoo.models.macmd'):
        converted = macmd.checkpoint_filter_fn(official, model)
    assert all(block in caplog.text for block in UP_BLOCKS)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    # what the zoo adds: the 27 up-block entries; what it leaves out: the 8 unused UpBlock LayerNorm entries
    added = [k for k in expected if k.startswith('decoder.apm.up_blocks.')]
    assert len(added) == 27 and len(expected) == manifest['num_state_dict_entries'] + 27 - 8
    unused_ln1 = sorted(k for k in official if re.match(r'decoder\.decoder\d\.ln1\.', k))
    assert sorted(manifest['unused_in_forward']) == unused_ln1
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == manifest['num_params'] - 3_072 + 3 * 4_928 == 34_614_504


def test_encoder_keys_follow_the_manifest_map_to_timm(manifest):
    with torch.device('meta'):
        model = timm.create_model('macmd_pvt_v2_b2')
    encoder_official = {k: v for k, v in placeholder_state_dict(manifest).items() if k.startswith('backbone.')}
    decoder_placeholder = {'decoder.ag1.W_g.1.weight': torch.empty(64)}
    converted = macmd.checkpoint_filter_fn({**encoder_official, **decoder_placeholder}, model)
    expected = {f'encoder.{v}' for v in manifest['encoder_key_to_timm_pvt_v2_b2'].values()}
    assert {k for k in converted if k.startswith('encoder.')} == expected


def test_three_channel_model_drops_the_grey_stem_and_other_encoders_are_refused(manifest):
    official = placeholder_state_dict(manifest)
    with torch.device('meta'):
        model = macmd.create_from_official(n_classes=9, n_channels=3, img_size=224, encoder='pvt_v2_b2')
    assert model.in_chans == 3 and isinstance(model.stem, torch.nn.Identity)
    converted = macmd.checkpoint_filter_fn(official, model)
    assert not any(k.startswith(('conv.', 'stem.')) for k in converted)
    assert set(converted) == set(model.state_dict())
    with pytest.raises(ValueError, match="only the official PVTv2 encoders.*'maxvit'"):
        macmd.create_from_official(n_classes=9, encoder='maxvit')
    with torch.device('meta'):
        small = macmd.create_from_official(n_classes=2, n_channels=3, encoder='pvt_v2_b0')
    assert [m.conv.in_channels for m in small.decoder.apm.channel_proj] == [32, 64, 160, 256]


def test_checkpoint_of_another_architecture_is_refused_with_its_keys():
    resnet_sd = timm.create_model('resnet18', num_classes=5).state_dict()
    with pytest.raises(ValueError, match=r'not a MACMD checkpoint for a MACMD.*conv1\.weight'):
        from_official('macmd', resnet_sd, n_classes=9, n_channels=1)


def test_checkpoint_of_another_class_count_names_the_heads(manifest):
    official = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in placeholder_state_dict(manifest).items()}
    with pytest.raises(CheckpointError, match=r'of another shape \(first: head\.weight'):
        from_official('macmd', official, n_classes=4, n_channels=1)


def test_params_and_gmacs_of_the_card():
    from zoo.cards import count_gmacs
    with torch.device('meta'):
        model = timm.create_model('macmd_pvt_v2_b2')
    assert model.pretrained_cfg['input_size'] == (1, 224, 224) and model.num_classes == 9
    # research (flop counter on the official model, runtime up-blocks included): 6.14 GMACs at 224x224
    assert count_gmacs(model, (1, 224, 224)) == pytest.approx(6.14, abs=0.02)


# ---------------------------------------------------------------------------------------------------------------
# The segmentation model


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return zoo.create_model('zoo/macmd_pvt_v2_b2').eval()


def test_forward_gives_logits_at_the_input_size_for_any_multiple_of_32(model):
    assert model.task == 'segmentation'
    with torch.no_grad():
        for size in [(64, 64), (64, 96)]:
            assert model(torch.rand(2, 1, *size)).shape == (2, 9, *size)


def test_forward_is_deterministic_and_the_main_deep_supervision_output(model):
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        first, second = model(x), model(x)
        outputs = model.forward_train(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # the official APM is not: new weights per call
    assert [tuple(o.shape) for o in outputs] == [(1, 9, 64, 64)] * 3
    torch.testing.assert_close(outputs[0], first)


def test_predict_proba_is_softmax_for_many_classes_and_sigmoid_for_one(model):
    x = torch.rand(1, 1, 64, 64)
    probs = model.predict_proba(x)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 64, 64))
    binary = timm.create_model('macmd_pvt_v2_b2', num_classes=1, in_chans=3).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        logits = binary(x)
    assert logits.shape == (1, 1, 32, 32)
    torch.testing.assert_close(binary.predict_proba(x), logits.sigmoid())


def test_wrong_input_is_refused_with_the_multiple_it_needs(model):
    with pytest.raises(ValueError, match=r'multiples of 32.*got 100x64; resize or pad to 96 or 128 x 64$'):
        model(torch.rand(1, 1, 100, 64))
    with pytest.raises(ValueError, match='expected 1 input channels'):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match='in_chans=4'):
        timm.create_model('macmd_pvt_v2_b2', in_chans=4)


def test_up_blocks_train_with_the_deep_supervision_loss():
    from zoo.tasks.segmentation import CeDiceLoss
    torch.manual_seed(0)
    net = timm.create_model('macmd_pvt_v2_b2', num_classes=3, encoder='pvt_v2_b0')
    loss = CeDiceLoss()(net.forward_train(torch.rand(2, 1, 64, 64)), torch.randint(0, 3, (2, 64, 64)))
    loss.backward()
    for name, p in net.named_parameters():
        if 'up_blocks' in name or 'aux_heads' in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_pretrained_loads_the_encoder_weights_through_timm(hub, tmp_path):
    """pretrained=True fetches the encoder's timm weights (a small PVTv2 here, served by the local fake Hub)."""
    from huggingface_hub import HfApi
    torch.manual_seed(1)
    reference = timm.create_model('pvt_v2_b0')
    save_file(reference.state_dict(), tmp_path / 'model.safetensors')
    (tmp_path / 'config.json').write_text(json.dumps({'architecture': 'pvt_v2_b0', 'num_classes': 1000}))
    HfApi().create_repo('timm/pvt_v2_b0.in1k')
    HfApi().upload_folder(repo_id='timm/pvt_v2_b0.in1k', folder_path=tmp_path)
    net = timm.create_model('macmd_pvt_v2_b2', pretrained=True, encoder='pvt_v2_b0')
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith('head.')}
    for key, value in expected.items():
        assert torch.equal(net.encoder.state_dict()[key], value), key
    scratch = timm.create_model('macmd_pvt_v2_b2', encoder='pvt_v2_b0')
    assert not torch.equal(scratch.encoder.patch_embed.proj.weight, expected['patch_embed.proj.weight'])


def test_hub_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model('macmd_pvt_v2_b2', num_classes=2, encoder='pvt_v2_b0').eval()
    folder = zoo.hub.save_pretrained(net, tmp_path / 'macmd')
    loaded = zoo.hub.load(folder)
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert 'image-segmentation' in (folder / 'README.md').read_text()


def test_cli_predict_writes_a_mask_overlay(tmp_path, capsys):
    from PIL import Image
    from zoo.cli import main
    image_path = tmp_path / 'slice.png'
    Image.new('L', (50, 40), 128).save(image_path)
    assert main(['predict', 'macmd_pvt_v2_b2', str(image_path), '--random']) == 0
    out = tmp_path / 'slice.segmentation.png'
    assert f'-> {out}' in capsys.readouterr().out
    picture = Image.open(out)  # the overlay at the image's size, with a legend of the classes beside it
    assert picture.mode in ('RGB', 'RGBA') and picture.size[0] > 50 and picture.size[1] > 40
