"""×Net: the decoder's weights come from the classifier checkpoint, outputs, input errors, both halves at work."""
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

import zoo
from zoo import hub
from zoo.models import timesnet
from zoo.models.timesnet import TimesNet

NAME = 'timesnet_convnext_tiny_convnext_tiny'
TINY = dict(encoder='test_convnext', decoder='convnext_atto')  # different halves, so no key or width lines up by luck


def _tiny(**kwargs) -> TimesNet:
    torch.manual_seed(0)
    return timm.create_model(NAME, **dict(TINY, **kwargs)).eval()


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _classifier_file(tmp_path, name: str, seed: int):
    """A timm classifier's weights (random, seeded) in a local file, standing in for its Hub checkpoint."""
    torch.manual_seed(seed)
    state_dict = timm.create_model(name).state_dict()
    path = tmp_path / f'{name}.safetensors'
    safetensors.torch.save_file(state_dict, path)
    return path, state_dict


@pytest.fixture
def checkpoints(tmp_path):
    return _classifier_file(tmp_path, 'test_convnext', seed=1), _classifier_file(tmp_path, 'convnext_atto', seed=2)


def _pretrained_tiny(checkpoints, **kwargs) -> TimesNet:
    (enc_path, _), (dec_path, _) = checkpoints
    return _tiny(
        pretrained=True,
        encoder_kwargs=dict(pretrained_cfg_overlay=dict(file=str(enc_path))),
        decoder_kwargs=dict(pretrained_cfg_overlay=dict(file=str(dec_path)), **kwargs))


def test_decoder_weights_come_from_the_classifier_checkpoint(checkpoints):
    (_, enc_sd), (_, dec_sd) = checkpoints
    model = _pretrained_tiny(checkpoints)
    decoder_sd = model.decoder.state_dict()
    # every stem and stage-block tensor of the classifier, under its own name, and nothing else of the decoder
    kept = {k: v for k, v in dec_sd.items() if k.startswith('stem.') or '.blocks.' in k}
    assert sorted(decoder_sd) == sorted(kept)
    for key, value in kept.items():
        assert torch.equal(decoder_sd[key], value), key
    # the classifier's downsampling layers and head are not part of the reversed decoder
    assert not any('downsample' in k or k.startswith('head.') for k in decoder_sd)
    # the encoder is the other checkpoint (features_only flattens stem.0 -> stem_0, stages.0 -> stages_0)
    encoder_sd = model.encoder.state_dict()
    assert len(encoder_sd) == len([k for k in enc_sd if not k.startswith('head.')])
    for key, value in encoder_sd.items():
        assert torch.equal(value, enc_sd[key.replace('stem_', 'stem.').replace('stages_', 'stages.')]), key


def test_without_pretrained_the_decoder_is_not_the_checkpoint(checkpoints):
    (_, _), (_, dec_sd) = checkpoints
    fresh = _tiny(pretrained=False, decoder_kwargs=dict(pretrained_cfg_overlay=dict(file='/nonexistent')))
    key = 'stages.3.blocks.1.mlp.fc1.weight'
    assert not torch.equal(fresh.decoder.state_dict()[key], dec_sd[key])
    # ablation: a pre-trained encoder with a decoder trained from scratch
    ablated = _pretrained_tiny(checkpoints, pretrained=False)
    assert not torch.equal(ablated.decoder.state_dict()[key], dec_sd[key])


def test_outputs_depth_in_metres_and_segmentation_logits_at_input_size():
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        depth = _tiny(max_depth=80.0)(x)
        logits = _tiny(task='segmentation', num_classes=7)(x)
    assert depth.shape == (2, 1, 64, 96)
    assert 0 < depth.min() and depth.max() < 80
    assert logits.shape == (2, 7, 64, 96)
    assert _tiny().task == 'depth' and _tiny(task='segmentation').task == 'segmentation'
    assert _tiny(task='segmentation').num_classes == 150


def test_inputs_it_cannot_take_are_refused_clearly():
    model = _tiny()
    with pytest.raises(ValueError, match=r'multiples of 32.*got 70x96; resize or pad to 64 or 96 x 96$'):
        model(torch.randn(1, 3, 70, 96))
    with pytest.raises(ValueError, match='expected 3 input channels'):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match='task must be one of depth, segmentation'):
        _tiny(task='normals')
    with pytest.raises(ValueError, match='depth model predicts one channel'):
        _tiny(num_classes=3)
    with pytest.raises(ValueError, match='does not have the layout'):
        _tiny(decoder='resnet18')
    with pytest.raises(ValueError, match='stride 16'):
        _tiny(encoder='vit_tiny_patch16_224', encoder_kwargs=dict(dynamic_img_size=True))


def _grads(model, x, target):
    model.zero_grad()
    F.cross_entropy(model(x), target).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_gradients_reach_every_parameter_of_both_halves():
    model = _tiny(task='segmentation', num_classes=5).train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 5, (2, 64, 64))
    grads = _grads(model, x, target)
    assert [n for n, g in grads.items() if g is None or not g.abs().sum() > 0] == []
    assert any(n.startswith('encoder.') for n in grads) and any(n.startswith('decoder.stages.') for n in grads)
    # activation checkpointing in both halves (for large models at depth resolutions) gives the same gradients
    model.set_grad_checkpointing()
    assert model.encoder.grad_checkpointing and all(s.grad_checkpointing for s in model.decoder.stages)
    for n, g in _grads(model, x, target).items():
        torch.testing.assert_close(g, grads[n], msg=n)


@pytest.mark.parametrize('module_name', [
    'encoder', 'decoder.stem', 'decoder.stages.0', 'decoder.stages.1', 'decoder.stages.2', 'decoder.stages.3'])
def test_each_part_feeds_the_prediction(module_name):
    """Zeroing the output of the encoder, the decoder's stem (the image mixing) or any reversed stage (each a
    level of the Post Feature Pyramid) changes the prediction."""
    def zero(_module, _inputs, out):
        return [torch.zeros_like(o) for o in out] if isinstance(out, list) else torch.zeros_like(out)

    model = _tiny()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        handle = model.get_submodule(module_name).register_forward_hook(zero)
        changed = model(x)
        handle.remove()
    assert (changed - reference).abs().max() > 1e-4


def test_stages_run_deepest_first_with_reshape_between():
    model = _tiny()
    order = []
    for i, stage in enumerate(model.decoder.stages):
        stage.register_forward_hook(lambda _m, inp, out, i=i: order.append((i, tuple(out.shape[1:]))))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    widths = [f['num_chs'] for f in timm.create_model('convnext_atto').feature_info]
    assert order == [(i, (widths[i], 64 // 2 ** (i + 2), 96 // 2 ** (i + 2))) for i in (3, 2, 1, 0)]


def test_hub_folder_round_trip(tmp_path):
    model = _tiny(task='segmentation', num_classes=4)
    hub.save_pretrained(model, tmp_path / 'xnet')
    loaded = hub.load(tmp_path / 'xnet')
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.task == 'segmentation' and loaded.num_classes == 4
    # a ×Net checkpoint named by the cfg is loaded whole; the halves are not fetched separately
    again = timm.create_model(
        NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'xnet' / 'model.safetensors')),
        task='segmentation', num_classes=4, **TINY).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize('name', sorted(timesnet.default_cfgs))
def test_registered_variants_are_the_named_encoder_and_decoder(name):
    arch = name.split('.')[0]
    size = arch.split('_')[2]
    with torch.device('meta'):
        model = timm.create_model(name)
        classifier = timm.create_model(f'convnext_{size}')
    assert zoo.list_models(arch) == [arch]
    assert model.task == 'depth'
    assert _count(model.encoder) == _count(classifier) - _count(classifier.head)
    kept = _count(classifier.stem) + sum(_count(s.blocks) for s in classifier.stages)
    assert _count(model.decoder) == kept
    assert model.pretrained_cfg['input_size'][1] % 32 == 0 and model.pretrained_cfg['input_size'][2] % 32 == 0
