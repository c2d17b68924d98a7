"""ConViT: zoo names equal timm's own class, the "+" models match paper Table 1, checkpointing, features."""
from functools import partial

import pytest
import timm
import torch
from timm.models import convit as timm_convit

import zoo
from zoo import hub
from zoo.convert import from_official
from zoo.models import convit

# paper Table 1 (millions, as printed) and the exact counts of this build (1000 classes)
PARAMS = {
    'convit_tiny': (6, 5_710_512),
    'convit_small': (27, 27_777_322),
    'convit_base': (86, 86_540_040),
    'convit_tiny_plus': (10, 9_972_912),
    'convit_small_plus': (48, 48_979_882),
    'convit_base_plus': (152, 153_134_856),
}


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    model = timm.create_model('convit_tiny').eval()
    with torch.no_grad():  # move LayerNorms, gates and position projections off their init values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope='module')
def image():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('name', list(PARAMS))
def test_registered_in_zoo_with_params_of_paper(name):
    assert zoo.is_zoo_model(name)
    assert timm.models.model_entrypoint(name).__module__ == 'zoo.models.convit'
    with torch.device('meta'):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    paper, exact = PARAMS[name]
    assert count == exact
    assert abs(count / 1e6 - paper) / paper < 0.05  # Table 1 rounds: Ti 5.71 -> "6", B+ 153.1 -> "152"
    if not name.endswith('_plus'):
        with torch.device('meta'):
            reference = timm_convit.ConVit(embed_dim=48, num_heads=model.blocks[0].attn.num_heads, local_up_to_layer=10)
        assert {k: v.shape for k, v in model.state_dict().items()} == \
            {k: v.shape for k, v in reference.state_dict().items()}


def test_pretrained_cfgs_point_at_timm_weights():
    for size in ('tiny', 'small', 'base'):
        cfg = timm.models.get_pretrained_cfg(f'convit_{size}.fb_in1k')
        assert cfg.hf_hub_id == f'timm/convit_{size}.fb_in1k'
        assert cfg.paper_ids == 'arXiv:2103.10697'
        assert convit.card_info['variants'][f'convit_{size}_plus']
    assert not timm.list_models('convit_*_plus', pretrained=True)
    assert sorted(timm.list_models('convit*', pretrained=True)) == [
        'convit_base.fb_in1k', 'convit_small.fb_in1k', 'convit_tiny.fb_in1k']


def test_equals_timm_class(tiny, image):
    reference = timm_convit.ConVit(
        embed_dim=48, num_heads=4, local_up_to_layer=10, locality_strength=1.0).eval()
    reference.load_state_dict(tiny.state_dict(), strict=True)
    with torch.no_grad():
        out = tiny(image)
        feats, inter = tiny.forward_intermediates(image, indices=[2, 11])
        ref_feats, ref_inter = reference.forward_intermediates(image, indices=[2, 11])
        assert torch.equal(out, reference(image))
    assert torch.equal(feats, ref_feats)
    for a, b in zip(inter, ref_inter):
        assert a.shape == (2, 192, 14, 14)
        assert torch.equal(a, b)


def test_grad_checkpointing_same_output_and_grads(tiny, image):
    def run(enable):
        tiny.zero_grad()
        tiny.set_grad_checkpointing(enable)
        out = tiny(image[:1])
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in tiny.named_parameters()}

    out_plain, grads_plain = run(False)
    out_ckpt, grads_ckpt = run(True)
    tiny.set_grad_checkpointing(False)
    tiny.zero_grad()
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=1e-6)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_features_only(tiny, image):
    model = timm.create_model('convit_tiny', features_only=True, out_indices=(3, 9, 11)).eval()
    source = {f'model.{k}': v for k, v in tiny.state_dict().items()}
    model.load_state_dict({k: source[k] for k in model.state_dict()}, strict=True)
    assert model.feature_info.channels() == [192] * 3
    assert model.feature_info.reduction() == [16] * 3
    with torch.no_grad():
        feats = model(image)
        expected = tiny.forward_intermediates(image, indices=(3, 9, 11), intermediates_only=True)
    assert [f.shape for f in feats] == [(2, 192, 14, 14)] * 3
    for a, b in zip(feats, expected):
        torch.testing.assert_close(a, b)


def test_head_interface(tiny, image):
    model = timm.create_model('convit_tiny_plus', num_classes=10).eval()
    assert model.num_features == 256 and model.get_classifier().out_features == 10
    with torch.no_grad():
        assert model.forward_head(model.forward_features(image[:1]), pre_logits=True).shape == (1, 256)
        model.reset_classifier(0)
        assert model(image[:1]).shape == (1, 256)


def test_from_official_matches_official_kwargs(tiny, image):
    official_sd = {f'module.{k}': v for k, v in tiny.state_dict().items()}
    # the official factory passes the total width, embed_dim=48*num_heads, and LayerNorm(eps=1e-6)
    model = from_official(
        'convit', {'model': official_sd}, embed_dim=192, num_heads=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    with torch.no_grad():
        assert torch.equal(model(image), tiny(image))
    with pytest.raises(ValueError, match='not a ConViT checkpoint'):
        convit.checkpoint_filter_fn({'conv.weight': torch.zeros(1)}, model)


def test_bad_input_errors(tiny):
    with pytest.raises(ValueError, match='expected 3 input channels'):
        tiny(torch.zeros(1, 1, 224, 224))
    with pytest.raises(ValueError, match='fixed at 224x224'):
        tiny(torch.zeros(1, 3, 192, 192))
    with pytest.raises(ValueError, match='fixed at 224x224'):
        tiny.forward_intermediates(torch.zeros(1, 3, 160, 224))


def test_another_img_size_is_recorded_and_survives_the_hub_round_trip(tmp_path):
    """A ConViT built for 128 px says so in its cfg, so data configs, the card and a reloaded folder agree."""
    model = timm.create_model('convit_tiny', img_size=128).eval()
    assert model.pretrained_cfg['input_size'] == (3, 128, 128)
    assert timm.data.resolve_model_data_config(model)['input_size'] == (3, 128, 128)
    hub.save_pretrained(model, tmp_path / 'convit_128')
    reloaded = hub.load(tmp_path / 'convit_128')
    assert tuple(reloaded.patch_embed.img_size) == (128, 128)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_weights_for_224_px_load_into_a_model_for_another_size(tmp_path):
    """The published weights are for 224 px; built with img_size=128, the position table is resampled."""
    source = timm.create_model('convit_tiny')
    path = tmp_path / 'convit_tiny_224.pth'
    torch.save(source.state_dict(), path)
    model = timm.create_model('convit_tiny', pretrained=True, img_size=128, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.pos_embed.shape == (1, 64, 192)
    assert torch.equal(model.blocks[3].attn.qk.weight, source.blocks[3].attn.qk.weight)
    assert torch.isfinite(model(torch.randn(1, 3, 128, 128))).all()
    not_square = {**source.state_dict(), 'pos_embed': torch.zeros(1, 140, 192)}
    with pytest.raises(ValueError, match='not a square grid'):
        convit.checkpoint_filter_fn(not_square, model)
