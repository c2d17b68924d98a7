"""iDisc: the official head outputs, the official Swin at the native sizes, every official checkpoint layout,
the NYU / KITTI / normals tags, pretrained loading, TorchScript / FX and the input checks."""
import json
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.swin_transformer import SwinTransformerBlock

import zoo
from zoo import hub
from zoo.cards import count_gmacs
from zoo.convert import from_official
from zoo.models import idisc
from zoo.models.idisc import checkpoint_filter_fn, create_encoder, create_from_official

from official_layout import load_manifest, placeholder_state_dict

FIXTURES = Path(__file__).parent / 'fixtures' / 'idisc'
HEAD_CASES = ['head_r50_nyu', 'head_swint_kitti', 'head_swinl_nyunormals']
# evaluation configs that build a training config's network, and that config
EVAL_MANIFESTS = {'nyu_sunrgbd': 'nyu_swinl', 'nyu_diode': 'nyu_swinl', 'kitti_argo': 'kitti_swinl',
                  'kitti_ddad': 'kitti_swinl'}
MANIFESTS = sorted(p.stem for p in (FIXTURES / 'manifests').glob('*.json') if p.stem not in EVAL_MANIFESTS)
RESNET_FC = 2048 * 1000 + 1000  # the official ResNet checkpoints keep torchvision's unused classifier


def load_case(case):
    meta = json.loads((FIXTURES / f'{case}.json').read_text())
    return meta, load_file(FIXTURES / f'{case}.weights.safetensors'), load_file(FIXTURES / f'{case}.io.safetensors')


@pytest.mark.parametrize('case', HEAD_CASES)
def test_official_head_outputs(case):
    meta, weights, io = load_case(case)
    model = from_official('idisc', weights, config=meta['constructor']['config'])
    tol = meta['suggested_tolerance']
    features = [io[f'features.{i}'] for i in range(4)]
    with torch.no_grad():
        prediction, inter = model.forward_head(features, meta['inputs']['image_hw'], return_intermediates=True)

    def close(actual, key):
        scale = max(1., io[key].abs().max().item())
        torch.testing.assert_close(actual, io[key], atol=tol['atol'] * scale, rtol=tol['rtol'])

    close(prediction, model.task)
    for i in range(3):
        close(inter['outs'][i], f'outs.{i}')
        close(inter['idrs'][i], f'idrs.{i}')
    for j in range(4):
        close(inter['raw'][j], f'pixel_decoder.raw_outputs.{j}')
        close(inter['fpn'][j], f'pixel_decoder.fpn_outputs.{j}')
    assert model.task == ('normals' if 'normals' in io else 'depth')
    assert sum(p.numel() for p in model.parameters()) == meta['num_params']


def test_afp_iterations_share_weights():
    meta, weights, io = load_case('head_r50_nyu')
    model = from_official('idisc', weights, config=meta['constructor']['config'])
    assert model.afp[0].depth == 2 and len(list(model.afp[0].children())) == 3  # attn, norm, mlp: one set
    model.afp[0].depth = 1  # one pass of the same weights gives other IDRs than the official two
    with torch.no_grad():
        _, inter = model.forward_head([io[f'features.{i}'] for i in range(4)], (48, 64), return_intermediates=True)
    assert not torch.allclose(inter['idrs'][0], io['idrs.0'], atol=1e-3)


def _official_swin_encoder():
    meta, weights, io = load_case('swin_native_sizes')
    cfg = meta['constructor']
    encoder = create_encoder(
        'swin_tiny_patch4_window7_224', embed_dim=cfg['embed_dims'][0], depths=cfg['depths'],
        num_heads=cfg['num_heads'], drop_path_rate=0.).eval()
    converted = {idisc.rename_official_key(f'pixel_encoder.{k}'): v for k, v in weights.items()}
    encoder.load_state_dict({k.removeprefix('encoder.'): v for k, v in converted.items() if k}, strict=True)
    return meta, encoder, io


@pytest.mark.parametrize('size', ['nyu', 'kitti'])
def test_swin_encoder_reproduces_the_official_swin_at_native_size(size):
    meta, encoder, io = _official_swin_encoder()
    shape = meta['inputs'][size]['shape']
    seed = int(re.search(r'manual_seed\((\d+)\)', meta['inputs'][size]['how'])[1])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(x.sum().reshape(1), io[f'{size}.input_sum'])

    def check(stages, atol):
        torch.testing.assert_close(stages[3], io[f'{size}.stage3'], atol=atol, rtol=0)
        for i in range(3):
            torch.testing.assert_close(stages[i].mean((2, 3)), io[f'{size}.stage{i}.mean'], atol=atol, rtol=0)
            torch.testing.assert_close(stages[i][..., -14:, -14:], io[f'{size}.stage{i}.br'], atol=atol, rtol=0)
            torch.testing.assert_close(stages[i][..., :14, :14], io[f'{size}.stage{i}.tl'], atol=atol, rtol=0)

    with torch.no_grad():
        check(encoder(x), atol=1e-4)
        # timm's own order (shift, then pad) is what the test guards against: it does not reproduce them
        for block in encoder.modules():
            if isinstance(block, SwinTransformerBlock):
                block.__class__ = SwinTransformerBlock
        with pytest.raises(AssertionError):
            check(encoder(x), atol=1e-2)


# registered name.tag -> official manifest of the same network
TAGS = {
    'idisc_resnet101.nyu': 'nyu_r101', 'idisc_resnet101.kitti': 'kitti_r101',
    'idisc_efficientnet_b5.nyu': 'nyu_eb5', 'idisc_efficientnet_b5.kitti': 'kitti_eb5',
    'idisc_swin_tiny.nyu': 'nyu_swint', 'idisc_swin_tiny.kitti': 'kitti_swint',
    'idisc_swin_base.nyu': 'nyu_swinb', 'idisc_swin_base.kitti': 'kitti_swinb',
    'idisc_swin_large.nyu': 'nyu_swinl', 'idisc_swin_large.kitti': 'kitti_swinl',
    'idisc_swin_large.nyu_normals': 'nyunorm_swinl',
}


MANIFEST_TAGS = {manifest: name for name, manifest in TAGS.items()}


@pytest.mark.parametrize('name', MANIFESTS)
def test_full_size_manifest_loads_strictly(name):
    """Every official config's checkpoint layout loads into the zoo model: the registered name.tag where one
    exists (so the tag picks the config's network), else the model `from_official` builds for the config."""
    manifest = load_manifest('idisc', name)
    tag = MANIFEST_TAGS.get(name)
    with torch.device('meta'):
        model = timm.create_model(f'zoo/{tag}') if tag else create_from_official(manifest['config'])
    converted = checkpoint_filter_fn(placeholder_state_dict(manifest), model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    fc = RESNET_FC if 'pixel_encoder.fc.weight' in manifest['state_dict'] else 0
    assert sum(p.numel() for p in model.parameters()) == manifest['num_params'] - fc
    assert model.task == ('normals' if manifest['config']['model']['output_dim'] == 4 else 'depth')
    if tag:
        assert model.pretrained_cfg['tag'] == tag.split('.')[1] and model.pretrained_cfg['url'].endswith('.pt')


@pytest.mark.parametrize('name', sorted(EVAL_MANIFESTS))
def test_evaluation_manifests_are_their_training_network(name):
    manifest, twin = load_manifest('idisc', name), load_manifest('idisc', EVAL_MANIFESTS[name])
    assert manifest['state_dict'] == twin['state_dict'] and manifest['num_params'] == twin['num_params']
    assert idisc.model_args_from_official(manifest['config']) == idisc.model_args_from_official(twin['config'])


@pytest.mark.parametrize('encoder', ['tf_efficientnet_b0', 'swin_tiny_patch4_window7_224'])
def test_any_input_size_is_taken(encoder):
    """The official model pads (Swin) or rounds up (convs) internally, so no size multiple is required."""
    kwargs = dict(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 6)) if encoder.startswith('swin') else {}
    model = idisc.IDisc(encoder=None, encoder_channels=(8, 8, 8, 8), hidden_dim=16, latent_dim=8, num_latents=4)
    model.encoder = create_encoder(encoder, **kwargs)
    model.decoder = idisc.PixelDecoder(model.encoder.channels[::-1], 16)
    model.eval()
    for size in [(37, 53), (8, 8)]:
        with torch.no_grad():
            depth = model(torch.randn(1, 3, *size))
        assert depth.shape == (1, 1, *size) and (depth > 0).all()


@pytest.mark.parametrize('encoder', ['test_efficientnet', 'swin_tiny_patch4_window7_224'])
def test_torchscript_and_fx_give_the_eager_depth(encoder):
    """torch.jit.script, timm's FX feature extraction and the two together, at a size no stride divides.

    (The ResNet encoder is covered by timm's own tests on idisc_resnet101, tests/timm_suite.)
    """
    kwargs = dict(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 6)) if encoder.startswith('swin') else {}
    model = idisc.IDisc(encoder=None, encoder_channels=(8, 8, 8, 8), hidden_dim=16, latent_dim=8, num_latents=4,
                        afp_depth=1, isd_depth=1)
    model.encoder = create_encoder(encoder, **kwargs)
    model.decoder = idisc.PixelDecoder(model.encoder.channels[::-1], 16, depth=1)
    model.eval()
    x = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        expected = model(x)
        traced = timm.models.create_feature_extractor(model, [timm.models.get_graph_node_names(model)[1][-1]])
        for actual in (torch.jit.script(model)(x), *traced(x).values(), *torch.jit.script(traced)(x).values()):
            torch.testing.assert_close(actual, expected)


def test_tags_pick_the_dataset_settings():
    assert sorted(zoo.list_models('idisc_*', pretrained=True)) == sorted(TAGS)
    with torch.device('meta'):
        nyu, kitti = timm.create_model('idisc_resnet101.nyu'), timm.create_model('idisc_resnet101.kitti')
        default = timm.create_model('idisc_resnet101')
    assert (len(nyu.decoder.layers), nyu.decoder.layers[0].attn.n_points) == (4, 4)
    assert (len(kitti.decoder.layers), kitti.decoder.layers[0].attn.n_points) == (6, 8)
    assert kitti.pretrained_cfg['input_size'] == (3, 352, 1216) and nyu.pretrained_cfg['input_size'] == (3, 480, 640)
    assert default.pretrained_cfg['tag'] == 'nyu' and len(default.decoder.layers) == 4
    # GMACs (conv, linear, matmul) of the official model at 640x480, counted with the official code (research notes)
    assert count_gmacs(nyu, (3, 480, 640)) == pytest.approx(180.3, abs=0.1)


def _official_checkpoint_from_head_case(encoder_name='resnet50'):
    """Head-case weights plus a random ResNet-50 in the official (torchvision) layout, `module.`-prefixed."""
    meta, weights, io = load_case('head_r50_nyu')
    resnet = timm.create_model(encoder_name).eval()  # the official ResNet keys, classifier included
    state_dict = {f'module.pixel_encoder.{k}': v for k, v in resnet.state_dict().items()}
    state_dict.update({f'module.{k}': v for k, v in weights.items()})
    head_args = idisc.model_args_from_official(meta['constructor']['config'])
    head_args.pop('encoder_channels'), head_args.pop('encoder')
    return state_dict, head_args, resnet, (meta, weights, io)


def test_pretrained_tag_converts_the_official_file_on_load(tmp_path, monkeypatch):
    state_dict, head_args, resnet, (meta, weights, io) = _official_checkpoint_from_head_case()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    cache = tmp_path / 'hub' / 'checkpoints'  # where timm downloads an official file to, and finds it again
    cache.mkdir(parents=True)
    for dataset in ('nyu', 'kitti'):
        torch.save(state_dict, cache / f'{dataset}_resnet101.pt')
    model = timm.create_model('zoo/idisc_resnet101.nyu', pretrained=True, encoder='resnet50', **head_args).eval()
    provenance = model.zoo_weights['provenance']
    assert provenance['source'] == 'https://dl.cv.ethz.ch/idisc/checkpoints/nyu_resnet101.pt'
    assert (provenance['kind'], provenance['file']) == ('official', 'nyu_resnet101.pt')
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        expected = resnet.forward_intermediates(x, indices=(1, 2, 3, 4), intermediates_only=True)
        for actual, wanted in zip(features, expected):
            torch.testing.assert_close(actual, wanted, atol=0, rtol=0)
        depth = model(x)
        assert depth.shape == (1, 1, 48, 64) and (depth > 0).all()
        torch.testing.assert_close(model.forward_head([io[f'features.{i}'] for i in range(4)], (48, 64)), io['depth'],
                                   atol=1e-4, rtol=1e-4)
    # the KITTI decoder has 6 layers: NYU weights do not load into it, and the error names what is missing
    head_args = {k: v for k, v in head_args.items() if k not in ('decoder_depth', 'decoder_points')}
    with pytest.raises(RuntimeError, match=r'Missing key.*decoder\.layers\.4'):
        timm.create_model('idisc_resnet101.kitti', pretrained=True, encoder='resnet50', **head_args)


def test_small_model_end_to_end_and_hub_round_trip(tmp_path):
    model = timm.create_model('idisc_resnet101.kitti', encoder='resnet18', hidden_dim=16, latent_dim=8,
                              num_latents=4).eval()
    x = torch.randn(2, 3, 50, 70)  # no multiple of 32 is needed: every map is resized to the next
    with torch.no_grad():
        depth = model(x)
    assert depth.shape == (2, 1, 50, 70) and (depth > 0).all()
    folder = hub.save_pretrained(model, tmp_path / 'idisc')
    loaded = hub.load(folder)
    assert len(loaded.decoder.layers) == 6 and loaded.task == 'depth'
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), depth)


def test_normals_are_unit_vectors_at_the_stride_4_scale():
    # one scale, so no average of unit vectors (which is shorter than one) comes between normalisation and output
    model = timm.create_model('idisc_swin_large.nyu_normals', encoder='resnet18', hidden_dim=16, latent_dim=8,
                              num_latents=4, num_resolutions=1).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        normals = model(x)
        stride4 = model.forward_head(model.forward_features(x), (16, 16))
    assert model.task == 'normals' and normals.shape == (1, 3, 64, 64)
    torch.testing.assert_close(stride4.norm(dim=1), torch.ones(1, 16, 16), atol=1e-3, rtol=0)


def test_bad_inputs_and_checkpoints_are_refused():
    model = timm.create_model('idisc_resnet101', encoder='resnet18', hidden_dim=16, latent_dim=8, num_latents=4)
    with pytest.raises(ValueError, match='expected 3 input channels.*iDisc takes RGB images'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='not an iDisc checkpoint'):
        checkpoint_filter_fn({'conv1.weight': torch.zeros(1)}, model)
    head = idisc.IDisc(encoder=None, encoder_channels=(8, 8, 8, 8), hidden_dim=16, latent_dim=8)
    with pytest.raises(RuntimeError, match='forward_head'):
        head(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match='ResNet, EfficientNet or Swin'):
        create_encoder('vit_tiny_patch16_224')
    with pytest.raises(ValueError, match='num_classes must be 0'):
        idisc.IDisc(encoder=None, encoder_channels=(8, 8, 8, 8), num_classes=10)


def test_efficientnet_encoder_taps_the_2048_channel_head():
    with torch.device('meta'):
        encoder = create_encoder('tf_efficientnet_b5')
        features = encoder(torch.empty(1, 3, 480, 640))
    assert encoder.channels == [40, 64, 176, 2048]
    assert [tuple(f.shape[1:]) for f in features] == [(40, 120, 160), (64, 60, 80), (176, 30, 40), (2048, 15, 20)]
