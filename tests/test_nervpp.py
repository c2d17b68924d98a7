"""NeRV++: the official model's outputs, the README sizes and what it shares with NeRV."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from zoo.convert import from_official
from zoo.models import nervpp

from official_layout import load_manifest, placeholder_state_dict, to_official_layout

FIXTURES = Path(__file__).parent / 'fixtures' / 'nervpp'
CASES = ['nervpp_swish_40x80', 'nervpp_gelu_multihead_24x48']
README_SIZES = {'nervpp_xs': 1_902_725, 'nervpp_s': 3_379_541, 'nervpp_m': 6_382_533, 'nervpp_l': 12_546_111}


def load_case(case):
    meta = json.loads((FIXTURES / f'{case}.json').read_text())
    return meta, load_file(FIXTURES / f'{case}.weights.safetensors'), load_file(FIXTURES / f'{case}.io.safetensors')


@pytest.mark.parametrize('case', CASES)
def test_reference_encoding_gated_stem_and_every_head(case):
    meta, weights, io = load_case(case)
    model = from_official('nervpp', weights, **meta['constructor_kwargs'])
    tol = dict(atol=meta['atol'], rtol=meta['rtol'])
    index = torch.tensor(meta['frames']['frame_indices'])
    with torch.no_grad():
        pe = model.encode(index=index)
        torch.testing.assert_close(pe, io['input'], atol=0, rtol=0)
        torch.testing.assert_close(model.stem(pe).view_as(io['stem_out']), io['stem_out'], **tol)
        images = model.forward_heads(pe)
    outputs = [io['output']] if 'output' in io else [io[f'output.{i}'] for i in range(3)]
    assert len(images) == len(outputs)
    for image, expected in zip(images, outputs):
        torch.testing.assert_close(image, expected, **tol)
    assert model.size_params() == meta['param_counts']['total']
    assert [b.gcnn.fc2.in_features for b in model.blocks] == meta['widths']['gcnn_hidden']


@pytest.mark.parametrize('name', sorted(README_SIZES))
def test_registered_sizes_match_the_readme_commands_and_their_manifests(name):
    manifest = load_manifest('nervpp', f'{name}_bunny')
    with torch.device('meta'):
        model = timm.create_model(name)
        official = nervpp.create_from_official(**manifest['constructor_kwargs'])
    for m in (model, official):
        converted = nervpp.checkpoint_filter_fn(placeholder_state_dict(manifest), m)
        assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert model.size_params() == official.size_params() == manifest['num_params'] == README_SIZES[name]
    assert model.frame_size == (720, 1280) and model.pos_embed.levels == 40
    assert model.pretrained_cfg['input_size'] == (3, 720, 1280)


def test_video_interface_and_decoder_state_dict():
    torch.manual_seed(0)
    model = timm.create_model('nervpp_xs', frame_size=(40, 80), strides=(5, 2, 2), fc_dim=8, stem_dim=16,
                              lower_width=8).eval()
    assert model.input_kind == 'index' and not model.stored_embeddings
    with torch.no_grad():
        frames = model(torch.arange(2))
    assert frames.shape == (2, 3, 40, 80) and 0 <= frames.min() and frames.max() <= 1
    assert model.decoder_state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match='frame indices'):
        model.encode()
    with pytest.raises(ValueError, match='multiples of 20'):
        timm.create_model('nervpp_xs', frame_size=(50, 80), strides=(5, 2, 2))


def test_official_init_is_xavier_and_zero_bias():
    model = timm.create_model('nervpp_xs', frame_size=(40, 80), strides=(5, 2, 2), fc_dim=8, stem_dim=16)
    conv = model.blocks[1].up.conv
    bound = (6 / (conv.in_channels * 9 + conv.out_channels * 9)) ** 0.5
    assert conv.weight.abs().max() <= bound and torch.all(conv.bias == 0)
    assert torch.all(model.stem.fc1.bias == 0) and model.stem.fc1.weight.std() < 0.03


def test_zoo_layout_maps_back_and_foreign_checkpoints_are_refused():
    meta, weights, _ = load_case('nervpp_swish_40x80')
    model = from_official('nervpp', weights, **meta['constructor_kwargs'])
    manifest = {'state_dict': {k: list(v.shape) for k, v in weights.items()}}
    official = to_official_layout(model.state_dict(), model, nervpp.checkpoint_filter_fn, manifest)
    assert all(torch.equal(official[k], v) for k, v in weights.items())
    nerv_weights = load_file(Path(__file__).parent / 'fixtures' / 'nerv' / 'nerv_swish_40x80.weights.safetensors')
    with pytest.raises(ValueError, match=r'not a NeRV\+\+ checkpoint.*layers\.0\.conv\.conv'):
        from_official('nervpp', nerv_weights, **meta['constructor_kwargs'])


@pytest.mark.parametrize('kwargs', [
    dict(frame_size=(40, 80), strides=(5, 2, 2)),
    dict(frame_size=(60, 40), strides=(5, 2, 2), multi_head=True),
    dict(frame_size=(48, 96), strides=(3, 4), act_layer='gelu', out_act='sigmoid'),
])
def test_fast_decode_gives_the_plain_decoders_frames(kwargs, monkeypatch):
    """The banded NHWC decode is the plain decode up to float rounding, across band edges and batch items;
    with autograd on, the plain (differentiable) path runs whatever `fast_decode` says."""
    torch.manual_seed(0)
    model = timm.create_model('nervpp_xs', fc_dim=8, stem_dim=16, lower_width=8, **kwargs).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)  # the official init zeroes every bias; random ones test the bias handling
    monkeypatch.setattr(nervpp.NeRVPlusBlock, 'band_pixels', 100)  # many bands, some of one row
    pe = model.encode(index=torch.tensor([0, 5, 9]))
    assert model.fast_decode
    with torch.no_grad():
        fast = model.forward_heads(pe)
        model.fast_decode = False
        plain = model.forward_heads(pe)
    assert len(fast) == len(plain) == (len(kwargs['strides']) if kwargs.get('multi_head') else 1)
    for f, p in zip(fast, plain):
        assert f.shape == p.shape and f.is_contiguous()
        torch.testing.assert_close(f, p, atol=1e-6, rtol=0)
    block, x = model.blocks[1], torch.randn(2, 3, 5, model.blocks[1].proj.in_channels)  # a batch, one block
    with torch.no_grad():
        torch.testing.assert_close(block.forward_fast(x), block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1),
                                   atol=1e-6, rtol=0)
    model.fast_decode = True
    frames = model.decode(pe)
    assert frames.requires_grad
    torch.testing.assert_close(frames, plain[-1], atol=0, rtol=0)
    frames.mean().backward()
    assert model.blocks[0].gcnn.fc1.weight.grad is not None
