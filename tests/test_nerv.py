"""NeRV: the official model's outputs and encoding, the paper's sizes and the video-model interface."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from zoo.convert import from_official
from zoo.errors import CheckpointError
from zoo.models import nerv

from official_layout import load_manifest, placeholder_state_dict, to_official_layout

FIXTURES = Path(__file__).parent / 'fixtures' / 'nerv'
CASES = ['nerv_swish_40x80', 'nerv_gelu_multihead_24x48']
PAPER_SIZES = {'nerv_s': 3_242_865, 'nerv_m': 6_322_961, 'nerv_l': 12_565_523}  # the *_pe80 manifests


def load_case(case):
    meta = json.loads((FIXTURES / f'{case}.json').read_text())
    return meta, load_file(FIXTURES / f'{case}.weights.safetensors'), load_file(FIXTURES / f'{case}.io.safetensors')


@pytest.mark.parametrize('case', CASES)
def test_reference_encoding_stem_and_every_head(case):
    meta, weights, io = load_case(case)
    model = from_official('nerv', weights, **meta['constructor_kwargs'])
    tol = dict(atol=meta['atol'], rtol=meta['rtol'])
    index = torch.tensor(meta['frames']['frame_indices'])
    with torch.no_grad():
        pe = model.encode(index=index)
        torch.testing.assert_close(pe, io['input'], atol=0, rtol=0)  # float32 rounding is part of the encoding
        torch.testing.assert_close(model.stem(pe).view_as(io['stem_out']), io['stem_out'], **tol)
        images = model.forward_heads(pe)
        final = model(index)
    outputs = [io['output']] if 'output' in io else [io[f'output.{i}'] for i in range(3)]
    assert len(images) == len(outputs)
    for image, expected in zip(images, outputs):
        torch.testing.assert_close(image, expected, **tol)
    torch.testing.assert_close(final, outputs[-1], **tol)
    assert model.frame_size == tuple(meta['frames']['output_size_hw'])
    assert model.size_params() == meta['param_counts']['total']


@pytest.mark.parametrize('name', sorted(p.stem for p in (FIXTURES / 'manifests').glob('*.json')))
def test_full_size_manifests_load_strictly(name):
    manifest = load_manifest('nerv', name)
    with torch.device('meta'):
        model = nerv.create_from_official(**manifest['constructor_kwargs'])
    converted = nerv.checkpoint_filter_fn(placeholder_state_dict(manifest), model)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert model.size_params() == manifest['num_params']
    assert model.frame_size == tuple(manifest['output_size_hw'])


@pytest.mark.parametrize('name', sorted(PAPER_SIZES))
def test_registered_sizes_are_the_paper_models(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert model.size_params() == PAPER_SIZES[name]
    assert model.frame_size == (720, 1280) and model.fc_hw == (9, 16) and model.pos_embed.levels == 80
    assert model.pretrained_cfg['input_size'] == (3, 720, 1280)
    manifest = load_manifest('nerv', f'{name}_bunny_pe80')
    assert nerv.checkpoint_filter_fn(placeholder_state_dict(manifest), model).keys() == model.state_dict().keys()


def test_frame_size_sets_the_first_feature_map_or_names_the_sizes_that_work():
    with torch.device('meta'):
        model = timm.create_model('nerv_s', frame_size=(640, 1280), num_frames=50)
    assert model.fc_hw == (8, 16) and model.num_frames == 50
    with pytest.raises(ValueError, match=r'multiples of 80 .*height 700 -> 640 or 720'):
        timm.create_model('nerv_s', frame_size=(700, 1280))


@pytest.fixture(scope='module')
def small_model():
    torch.manual_seed(0)
    return timm.create_model('nerv_s', frame_size=(40, 80), strides=(5, 2, 2), fc_dim=8, stem_dim=32,
                             lower_width=4, num_frames=10).eval()


def test_video_interface(small_model):
    model = small_model
    assert model.input_kind == 'index' and not model.stored_embeddings
    index = torch.arange(3)
    with torch.no_grad():
        embeddings = model.encode(index=index)
        assert embeddings.shape == (3, 160)
        frames = model.decode(embeddings)
        assert frames.shape == (3, 3, 40, 80) and 0 <= frames.min() and frames.max() <= 1
        torch.testing.assert_close(model(index), frames)
        torch.testing.assert_close(model(**model.example_inputs('cpu')), frames[:1])
    with pytest.raises(ValueError, match='frame indices'):
        model.encode(frames=torch.rand(1, 3, 40, 80))
    with pytest.raises(ValueError, match=r'expected embeddings of shape \(B, 160\)'):
        model.decode(torch.rand(3, 80))
    assert model.size_params() == sum(p.numel() for p in model.parameters())


def test_decoder_state_dict_is_the_whole_model_and_loads_strictly(small_model):
    sd = small_model.decoder_state_dict()
    assert sd.keys() == small_model.state_dict().keys()
    other = timm.create_model('nerv_s', frame_size=(40, 80), strides=(5, 2, 2), fc_dim=8, stem_dim=32, lower_width=4)
    other.load_decoder_state_dict(sd)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointError, match=r'missing \(first: heads\.2\.bias'):
        other.load_decoder_state_dict({k: v for k, v in sd.items() if k != 'heads.2.bias'})


def test_training_checkpoint_zoo_layout_and_the_way_back():
    meta, weights, io = load_case('nerv_swish_40x80')
    wrapped = {'epoch': 1, 'state_dict': {f'module.{k}': v for k, v in weights.items()}}
    model = from_official('nerv', wrapped, **meta['constructor_kwargs'])
    with torch.no_grad():
        torch.testing.assert_close(model.decode(io['input']), io['output'], atol=meta['atol'], rtol=meta['rtol'])
    fresh = nerv.create_from_official(**meta['constructor_kwargs'])
    fresh.load_state_dict(nerv.checkpoint_filter_fn(model.state_dict(), fresh))
    manifest = {'state_dict': {k: list(v.shape) for k, v in weights.items()}}
    official = to_official_layout(model.state_dict(), model, nerv.checkpoint_filter_fn, manifest)
    assert all(torch.equal(official[k], v) for k, v in weights.items())


def test_wrong_checkpoints_and_unsupported_options_are_refused():
    meta, weights, _ = load_case('nerv_swish_40x80')
    kwargs = meta['constructor_kwargs']
    with pytest.raises(ValueError, match=r'not a NeRV checkpoint.*conv1\.weight'):
        from_official('nerv', timm.create_model('resnet18').state_dict(), **kwargs)
    pruned = {('layers.0.conv.conv.weight_orig' if k == 'layers.0.conv.conv.weight' else k): v for k, v in weights.items()}
    with pytest.raises(ValueError, match='pruned'):
        from_official('nerv', pruned, **kwargs)
    with pytest.raises(CheckpointError, match='of another shape'):
        from_official('nerv', weights, **dict(kwargs, fc_hw_dim='2_4_20'))
    with pytest.raises(ValueError, match="only num_blocks=1"):
        nerv.create_from_official(**dict(kwargs, num_blocks=2))
    with pytest.raises(ValueError, match="activation 'sin'"):
        nerv.create_from_official(**dict(kwargs, act='sin'))


def test_fast_decode_gives_the_plain_decoders_frames(small_model):
    embeddings = small_model.encode(index=torch.arange(4))
    with torch.no_grad():
        fast = small_model.decode(embeddings)
        small_model.fast_decode = False
        plain = small_model.decode(embeddings)
    small_model.fast_decode = True
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=0)
