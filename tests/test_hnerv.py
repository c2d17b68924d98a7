"""HNeRV: the official model's outputs, the paper's sizing rule, the video-model interface and the quantized release."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from zoo.convert import from_official
from zoo.errors import CheckpointError
from zoo.models import hnerv
from zoo.models._builder import sha256_file

from official_layout import load_manifest, placeholder_state_dict, quantized_bunny_release, to_official_layout

FIXTURES = Path(__file__).parent / 'fixtures' / 'hnerv'
BUNNY_SIZES = {'hnerv_0_35m': (0.35, 32), 'hnerv_0_75m': (0.75, 48), 'hnerv_1_5m': (1.5, 68), 'hnerv_3m': (3, 97)}


def load_case(case):
    meta = json.loads((FIXTURES / f'{case}.json').read_text())
    return meta, load_file(FIXTURES / f'{case}.weights.safetensors'), load_file(FIXTURES / f'{case}.io.safetensors')


def small_model(**kwargs):
    """A 80x160 HNeRV (strides 5-4-2 / 5-2-2-2) small enough to run in tests."""
    args = dict(frame_size=(80, 160), num_frames=8, enc_strides=(5, 4, 2), dec_strides=(5, 2, 2, 2), enc_dim=16,
                fc_dim=12, lower_width=6)
    torch.manual_seed(0)
    return timm.create_model('hnerv_0_35m', **dict(args, **kwargs)).eval()


def decoder_features(model, embedding):
    """decoder_feat.j of the official forward: the stem output after the unfold, then each block's output."""
    dec = model.decoder
    x = dec.stem(embedding)
    fc_h, fc_w = dec.fc_hw
    n, _, h, w = x.shape
    x = x.view(n, -1, fc_h, fc_w, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, -1, fc_h * h, fc_w * w)
    feats = [x]
    for block in dec.blocks:
        feats.append(block(feats[-1]))
    return feats


def test_reference_hnerv_mode_encoder_decoder_and_size():
    meta, weights, io = load_case('hnerv_convnext_80x160')
    model = from_official('hnerv', weights, frame_size=(80, 160), **meta['constructor_kwargs'])
    tol = dict(atol=meta['atol'], rtol=meta['rtol'])
    with torch.no_grad():
        embedding = model.encode(io['input'])
        torch.testing.assert_close(embedding, io['embedding'], **tol)
        torch.testing.assert_close(model.decode(io['embedding']), io['output'], **tol)
        torch.testing.assert_close(model(io['input']), io['output'], **tol)
        feats = decoder_features(model, io['embedding'])
    for j in range(3):
        torch.testing.assert_close(feats[j], io[f'decoder_feat.{j}'], **tol)
    counts = meta['param_counts']
    assert sum(p.numel() for p in model.parameters()) == counts['total_all_modules']
    assert sum(p.numel() for p in model.encoder.parameters()) == counts['encoder']
    assert model.size_params() == round(counts['counted_size_M'] * 1e6)
    assert model.fc_dim == hnerv.hnerv_fc_dim((80, 160), 132, 0.104, (5, 4, 2), (5, 2, 2, 2), 16, (1, 5), 1.2) == 27


def test_reference_nerv_mode_positional_encoding_in_float64():
    meta, weights, io = load_case('hnerv_nervmode_pe_40x80')
    model = from_official('hnerv', weights, **meta['constructor_kwargs'])
    assert model.input_kind == 'index' and not model.stored_embeddings and model.frame_size == (40, 80)
    index = torch.tensor(meta['frames']['frame_indices'])
    torch.testing.assert_close(index.double() / 132, io['input'], atol=0, rtol=0)
    with torch.no_grad():
        pe = model.encode(index=index)
        torch.testing.assert_close(pe, io['pe_embedding'], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(index=index), io['output'], atol=meta['atol'], rtol=meta['rtol'])
        feats = decoder_features(model, pe)
    for j in range(3):
        torch.testing.assert_close(feats[j], io[f'decoder_feat.{j}'], atol=meta['atol'], rtol=meta['rtol'])
    assert model.size_params() == meta['param_counts']['decoder_only_excl_head']
    assert model.decoder_state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize('name', sorted(p.stem for p in (FIXTURES / 'manifests').glob('*.json')))
def test_full_size_manifests_load_strictly(name):
    manifest = load_manifest('hnerv', name)
    kwargs = dict(manifest['constructor_kwargs'])
    if not kwargs['enc_strds']:
        assert kwargs['fc_hw'] == '8_16'  # README NeRV baseline: 8x16 grid, strides 5-4-2-2 -> 640x1280
    with torch.device('meta'):
        model = hnerv.create_from_official(**kwargs)
    converted = hnerv.checkpoint_filter_fn(placeholder_state_dict(manifest), model)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == manifest['num_params']
    assert model.size_params() == round(manifest['counted_size'] * 1e6)


@pytest.mark.parametrize('name', sorted(BUNNY_SIZES))
def test_registered_sizes_are_the_bunny_recipe_of_table_17(name):
    size, c2 = BUNNY_SIZES[name]
    with torch.device('meta'):
        model = timm.create_model(name)
    manifest = load_manifest('hnerv', f'hnerv_bunny_{name[len("hnerv_"):]}')
    assert model.fc_dim == c2 == manifest['widths']['fc_dim']
    assert model.frame_size == (640, 1280) and model.num_frames == 132
    assert model.pretrained_cfg['input_size'] == (3, 640, 1280)
    assert model.size_params() == round(manifest['counted_size'] * 1e6)
    assert abs(model.size_params() / 1e6 - size) / size < 0.07
    assert hnerv.checkpoint_filter_fn(placeholder_state_dict(manifest), model).keys() == model.state_dict().keys()


def test_sizing_rule_at_other_frame_sizes_and_counts_matches_table_17():
    assert hnerv.hnerv_fc_dim((480, 960), 300, 3, (5, 4, 3, 2, 2)) == 110
    assert hnerv.hnerv_fc_dim((960, 1920), 300, 3, (5, 4, 4, 3, 2)) == 92
    assert hnerv.hnerv_fc_dim((960, 1920), 600, 3, (5, 4, 4, 3, 2)) == 91  # the embeddings take a bigger share
    assert hnerv.decoder_widths(68, 5, 1.2, 12) == [57, 48, 40, 33, 28]  # round(47.5) = 48: banker's rounding
    assert hnerv.decoder_kernels(5, (1, 5)) == [1, 3, 5, 5, 5]
    model = timm.create_model('hnerv_1_5m', frame_size=(480, 960), num_frames=50, enc_strides=(5, 4, 3, 2, 2))
    assert model.fc_dim == hnerv.hnerv_fc_dim((480, 960), 50, 1.5, (5, 4, 3, 2, 2))
    with pytest.raises(ValueError, match='cannot hold 132 frame embeddings'):
        hnerv.hnerv_fc_dim((640, 1280), 132, 0.01)


def test_frame_size_the_strides_cannot_reach_names_the_sizes_that_work():
    with pytest.raises(ValueError, match=r'multiples of 320 .*height 720 -> 640 or 960'):
        timm.create_model('hnerv_1_5m', frame_size=(720, 1280))
    model = small_model()
    with pytest.raises(ValueError, match=r'multiples of 40 .*width 170 -> 160 or 200'):
        model.encode(torch.rand(1, 3, 80, 170))


def test_video_interface():
    model = small_model()
    assert model.input_kind == 'frames' and model.stored_embeddings
    frames = torch.rand(2, 3, 80, 160)
    with torch.no_grad():
        embeddings = model.encode(frames=frames)
        assert embeddings.shape == (2, 16, 2, 4)
        out = model.decode(embeddings)
        assert out.shape == (2, 3, 80, 160) and 0 <= out.min() and out.max() <= 1
        torch.testing.assert_close(model(frames), out)
        torch.testing.assert_close(model(**model.example_inputs('cpu')), model.decode(model.encode(torch.zeros(1, 3, 80, 160))))
    with pytest.raises(ValueError, match='encodes frames'):
        model.encode(index=torch.arange(2))
    with pytest.raises(ValueError, match=r'expected embeddings of shape \(B, 16, 2, 4\)'):
        model.decode(torch.rand(2, 8, 2, 4))
    assert model.size_params() == sum(p.numel() for p in model.decoder.parameters()) - 3 * 6 * 9 - 3 + 16 * 2 * 4 * 8


def test_decoder_state_dict_round_trip_is_strict():
    model, other = small_model(), small_model()
    torch.manual_seed(1)
    for p in other.parameters():
        p.data.normal_()
    sd = model.decoder_state_dict()
    assert sd and not any(k.startswith('encoder.') for k in sd) and 'decoder.head.weight' in sd
    other.load_decoder_state_dict(sd)
    embeddings = torch.rand(1, 16, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(other.decode(embeddings), model.decode(embeddings))
    with pytest.raises(CheckpointError, match=r'missing \(first: head\.bias'):
        other.load_decoder_state_dict({k: v for k, v in sd.items() if k != 'decoder.head.bias'})
    with pytest.raises(ValueError, match='only decoder'):
        other.load_decoder_state_dict(dict(sd, **{'encoder.stem.0.weight': torch.zeros(1)}))


def _quantize(t, per_axis):
    """The official release's layout: uint8 `quant`, per-axis fp16 min/scale (axis kept) or 0-d float32."""
    if per_axis:
        t_min, t_max = t.min(0, keepdim=True)[0], t.max(0, keepdim=True)[0]
        t_min, scale = t_min.half(), ((t_max - t_min) / 255).half()
    else:
        t_min, scale = t.min(), (t.max() - t.min()) / 255
    quant = ((t - t_min.float()) / scale.float().clamp_min(1e-8)).round().clamp(0, 255).to(torch.uint8)
    return {'quant': quant, 'min': t_min, 'scale': scale}


def _official_release(model, embeddings):
    """A quant_vid.pth-style dict made from a zoo model (official key names) and embeddings."""
    manifest = {'state_dict': {
        k: list(v.shape) for k, v in load_case('hnerv_convnext_80x160')[1].items() if not k.startswith('encoder.')}}
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith('encoder.')}
    official = to_official_layout(sd, model, hnerv.checkpoint_filter_fn, manifest)
    return {'embed': _quantize(embeddings, True),
            'model': {k: _quantize(v, per_axis=v.ndim > 1) for k, v in official.items()}}


def test_quantized_release_dequantizes_into_a_model_and_embeddings(tmp_path):
    meta, weights, io = load_case('hnerv_convnext_80x160')
    reference = from_official('hnerv', weights, frame_size=(80, 160), **meta['constructor_kwargs'])
    release = _official_release(reference, io['embedding'])
    path = tmp_path / 'quant_vid.pth'
    torch.save(release, path)
    kwargs = hnerv.model_args_from_official(frame_size=(80, 160), **meta['constructor_kwargs'])
    model, embeddings = hnerv.load_quantized_release(path, 'hnerv_1_5m', **kwargs)
    expected = {k: hnerv.dequantize_tensor(v) for k, v in release['model'].items()}
    torch.testing.assert_close(model.decoder.head.weight, expected['head_layer.weight'], atol=0, rtol=0)
    torch.testing.assert_close(
        model.decoder.blocks[1].conv.weight, expected['decoder.2.conv.upconv.0.weight'], atol=0, rtol=0)
    torch.testing.assert_close(embeddings, hnerv.dequantize_tensor(release['embed']), atol=0, rtol=0)
    assert (embeddings - io['embedding']).abs().max() < 0.01  # 8 bits per value
    with torch.no_grad():
        err = (model.decode(embeddings) - io['output']).abs().mean()
    assert err < 0.02  # an 8-bit model decodes close to the float one
    with pytest.raises(ValueError, match='not an HNeRV quantized release'):
        hnerv.load_quantized_release(weights)


def test_a_release_saved_as_a_hub_folder_keeps_its_embeddings(tmp_path):
    """The release has no encoder, so its embeddings are the video: they travel with the Hub folder."""
    from zoo import codec, hub

    meta, weights, io = load_case('hnerv_convnext_80x160')
    reference = from_official('hnerv', weights, frame_size=(80, 160), **meta['constructor_kwargs'])
    torch.save(_official_release(reference, io['embedding']), tmp_path / 'quant_vid.pth')
    kwargs = hnerv.model_args_from_official(frame_size=(80, 160), **meta['constructor_kwargs'])
    model, embeddings = hnerv.load_quantized_release(tmp_path / 'quant_vid.pth', 'hnerv_1_5m', **kwargs)
    assert 'frame_embeddings' not in model.decoder_state_dict()
    reloaded = hub.load(hub.save_pretrained(model, tmp_path / 'folder'))
    assert torch.equal(reloaded.frame_embeddings, embeddings)
    with torch.no_grad():
        assert torch.equal(reloaded.decode(reloaded.frame_embeddings), model.decode(embeddings))
    result = codec.compress(reloaded, tmp_path / 'bunny.zvid')  # no frames needed: the embeddings are stored
    assert result['frames'] == len(embeddings) and result['embedding_bytes'] > 0


def test_pretrained_bunny_loads_the_release_through_the_hub(tmp_path, monkeypatch):
    with torch.device('meta'):
        full = timm.create_model('hnerv_1_5m')
    release = quantized_bunny_release(load_manifest('hnerv', 'hnerv_bunny_1_5m'))
    path = tmp_path / 'quant_vid.pth'
    torch.save(release, path)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'cache'))
    cfg = full.pretrained_cfg
    assert cfg['tag'] == 'bunny' and cfg['url'].endswith('haochen-rye/HNeRV/raw/main/checkpoints/quant_vid.pth')
    with pytest.raises(CheckpointError, match='has sha256'):  # not the official file
        timm.create_model('hnerv_1_5m', pretrained=True, pretrained_cfg_overlay=dict(url=path.as_uri()))
    monkeypatch.setitem(hnerv.WEIGHT_SHA256, 'hnerv_1_5m.bunny', sha256_file(path))
    model = timm.create_model('hnerv_1_5m', pretrained=True, pretrained_cfg_overlay=dict(url=path.as_uri()))
    assert torch.all(model.decoder.blocks[2].conv.weight == 0.25)  # -0.5 + 0.25 * 3
    assert model.frame_embeddings.shape == (132, 16, 2, 4)
    torch.testing.assert_close(model.frame_embeddings, release['embed']['quant'].float() * 0.01, atol=1e-5, rtol=1e-3)


def test_training_checkpoint_and_zoo_layout_are_accepted_and_map_back():
    meta, weights, io = load_case('hnerv_convnext_80x160')
    wrapped = {'epoch': 300, 'state_dict': {f'module.{k}': v for k, v in weights.items()}}
    model = from_official('hnerv', wrapped, frame_size=(80, 160), **meta['constructor_kwargs'])
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['output'], atol=meta['atol'], rtol=meta['rtol'])
    fresh = hnerv.create_from_official(frame_size=(80, 160), **meta['constructor_kwargs'])
    fresh.load_state_dict(hnerv.checkpoint_filter_fn(model.state_dict(), fresh))
    manifest = {'state_dict': {k: list(v.shape) for k, v in weights.items()}}
    official = to_official_layout(model.state_dict(), model, hnerv.checkpoint_filter_fn, manifest)
    assert all(torch.equal(official[k], v) for k, v in weights.items())


def test_wrong_checkpoints_and_unsupported_official_options_are_refused():
    meta, weights, _ = load_case('hnerv_convnext_80x160')
    with pytest.raises(ValueError, match=r'not an HNeRV checkpoint.*conv1\.weight'):
        from_official('hnerv', timm.create_model('resnet18').state_dict(), **meta['constructor_kwargs'])
    with pytest.raises(CheckpointError, match='of another shape'):
        from_official('hnerv', weights, **dict(meta['constructor_kwargs'], fc_dim=28))
    with pytest.raises(ValueError, match="norm 'none'"):
        hnerv.create_from_official(**dict(meta['constructor_kwargs'], norm='bn'))
    with pytest.raises(ValueError, match='fc_dim is required'):
        hnerv.create_from_official(**{k: v for k, v in meta['constructor_kwargs'].items() if k != 'fc_dim'})


def test_hub_folder_round_trip_keeps_the_video_configuration(tmp_path):
    from zoo.hub import load, save_pretrained
    model = small_model(num_frames=5)
    save_pretrained(model, tmp_path / 'fitted')
    reloaded = load(tmp_path / 'fitted')
    assert (reloaded.frame_size, reloaded.num_frames, reloaded.fc_dim) == ((80, 160), 5, 12)
    assert reloaded.pretrained_cfg['input_size'] == (3, 80, 160)
    embeddings = torch.rand(2, 16, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.decode(embeddings), model.decode(embeddings), atol=0, rtol=0)


@pytest.mark.parametrize('band_pixels, kwargs', [
    (16384, {}),
    (100, {}),  # bands of one to a few rows: every band edge and the halo rows are exercised
    (500, dict(frame_size=(120, 90), enc_strides=(5, 3, 2), dec_strides=(5, 3, 2), out_act='sigmoid')),
])
def test_fast_decode_gives_the_plain_decoders_frames(band_pixels, kwargs, monkeypatch):
    monkeypatch.setattr(hnerv.HNeRVDecoder, 'band_pixels', band_pixels)
    model = small_model(fc_dim=24, **kwargs)
    for p in model.decoder.parameters():
        if p.ndim == 1:
            p.data.normal_(0, 0.1)  # random biases too: the official init zeroes them
    layouts = []
    model.decoder.blocks[1].register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    embeddings = torch.randn(3, *model.embed_shape)
    with torch.no_grad():
        fast = model.decode(embeddings)
        model.fast_decode = False
        plain = model.decode(embeddings)
    model.fast_decode = True
    trained = model.decode(embeddings)  # autograd on: the training path is the plain one
    assert layouts == [True, False, False]
    assert fast.is_contiguous() and fast.shape == plain.shape
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(trained.detach(), plain, atol=0, rtol=0)
