"""HaloNet: the paper's parameter counts, the halo attention against a naive masked reference, the interface."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.halo_attn import HaloAttn
from timm.models.byoanet import model_cfgs as timm_byoanet_cfgs
from timm.models.byobnet import ByobNet

import zoo
from zoo.models import halonet
from zoo.models.halonet import HaloAttention, HaloNet

# published (paper's model table, in millions) and exact counts of the zoo models
PARAMS = {
    'halonet_h0': (5.5, 5_500_952),
    'halonet_h1': (8.1, 8_100_056),
    'halonet_h2': (9.4, 9_404_312),
    'halonet_h3': (11.8, 11_841_304),
    'halonet_h4': (19.1, 19_101_976),
    'halonet_h5': (30.7, 30_717_272),
    'halonet_h6': (43.4, 43_456_792),
    'halonet_h7': (67.4, 67_433_240),
}


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _tiny(**kwargs):
    """A 4-stage HaloNet small enough to run everywhere: b=4, h=1, rv=2.5 (values wider than q/k)."""
    args = dict(
        depths=(1, 2, 1, 1), widths=(16, 32, 32, 64), block_size=4, halo_size=1, value_ratio=2.5, out_ratio=1.5,
        final_chs=96, stem_chs=16, num_heads=2, num_classes=7)
    return HaloNet(**dict(args, **kwargs)).eval()


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_param_count_matches_paper(name):
    published, exact = PARAMS[name]
    with torch.device('meta'):
        model = timm.create_model(name)
    n = _count(model)
    assert n == exact
    # the paper's counts are the exact counts truncated to 0.1M (rounding would give 43.5M for H6)
    assert math.floor(n / 1e5) / 10 == published
    assert zoo.is_zoo_model(name)


def test_h1_has_timm_h1_param_count():
    with torch.device('meta'):
        ours = timm.create_model('halonet_h1')
        theirs = ByobNet(cfg=timm_byoanet_cfgs['halonet_h1'])
    assert _count(ours) == _count(theirs)


def test_values_are_wider_than_queries_for_rv_above_one():
    with torch.device('meta'):
        model = timm.create_model('halonet_h5')
    for i, m in enumerate((64, 128, 256, 512)):
        block = model.stages[i].blocks[1]
        attn = block.self_attn
        assert attn.q.out_channels == m
        assert attn.kv.out_channels == m + int(2.5 * m)
        assert attn.dim_head_v == int(2.5 * m) // 8 and attn.dim_head_qk == m // 8
        assert block.post_attn.num_features == int(2.5 * m)
        assert block.conv3_1x1.conv.in_channels == int(2.5 * m)
        assert block.conv3_1x1.conv.out_channels == 2 * m
    attn = HaloAttention(16, 16, 40, num_heads=2, block_size=4, halo_size=1)
    assert attn(torch.randn(1, 16, 8, 8)).shape == (1, 40, 8, 8)


def naive_halo_attention(attn: HaloAttention, x: torch.Tensor) -> torch.Tensor:
    """Full attention of every (strided) query over the zero-padded map, masked to its block's halo window.

    No blocking or unfolding: query pixel p attends to every key pixel t with
    block_start(p) - h <= t < block_start(p) + b + h on both axes, where pixels outside the image are
    zero keys/values (not masked); logit = scale * q.k + q.r_h[t_y - p_y] + q.r_w[t_x - p_x].
    """
    b, h, s, nh = attn.block_size, attn.halo_size, attn.stride, attn.num_heads
    dqk, dv, win = attn.dim_head_qk, attn.dim_head_v, attn.win_size
    B, _, H, W = x.shape
    Hp, Wp = math.ceil(H / b) * b, math.ceil(W / b) * b
    q = F.conv2d(x, attn.q.weight).reshape(B, nh, dqk, H, W)
    kv = F.conv2d(x, attn.kv.weight).reshape(B, nh, dqk + dv, H, W)
    kv = F.pad(kv, [h, h + Wp - W, h, h + Hp - H])  # key at padded index t is pixel t - h
    k, v = kv[:, :, :dqk].flatten(3), kv[:, :, dqk:].flatten(3)

    qy, qx = torch.meshgrid(torch.arange(0, H, s), torch.arange(0, W, s), indexing='ij')
    qy, qx = qy.flatten(), qx.flatten()
    ky, kx = torch.meshgrid(torch.arange(Hp + 2 * h) - h, torch.arange(Wp + 2 * h) - h, indexing='ij')
    ky, kx = ky.flatten(), kx.flatten()
    q = q[:, :, :, qy, qx]  # (B, nh, dqk, Q)

    def in_window(qp, kp):
        start = (qp // b * b)[:, None]
        return (kp[None, :] >= start - h) & (kp[None, :] < start + b + h)

    mask = in_window(qy, ky) & in_window(qx, kx)
    dy = (ky[None, :] - qy[:, None]).clamp(-(win - 1), win - 1) + win - 1
    dx = (kx[None, :] - qx[:, None]).clamp(-(win - 1), win - 1) + win - 1
    pos_h = torch.einsum('bndq,rd->bnqr', q, attn.pos_embed.height_rel)
    pos_w = torch.einsum('bndq,rd->bnqr', q, attn.pos_embed.width_rel)
    Q = q.shape[-1]
    logits = (
        torch.einsum('bndq,bndk->bnqk', q, k) * dqk ** -0.5
        + pos_h.gather(-1, dy.expand(B, nh, Q, -1))
        + pos_w.gather(-1, dx.expand(B, nh, Q, -1)))
    logits = logits.masked_fill(~mask, float('-inf'))
    out = torch.einsum('bnqk,bndk->bndq', logits.softmax(-1), v)
    return out.reshape(B, nh * dv, math.ceil(H / s), math.ceil(W / s))


@pytest.mark.parametrize('stride, size, pad', [
    (1, (8, 12), False), (2, (8, 12), False), (1, (10, 7), True), (2, (9, 14), True)])
def test_halo_attention_matches_naive_masked_attention(stride, size, pad):
    torch.manual_seed(0)
    attn = HaloAttention(12, 16, 40, num_heads=2, block_size=4, halo_size=1, stride=stride, pad_to_block=pad)
    attn = attn.double()
    x = torch.randn(2, 12, *size, dtype=torch.float64)
    out = attn(x)
    ref = naive_halo_attention(attn, x)
    assert out.shape == ref.shape == (2, 40, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    # the gradients agree too, position tables included (they reach the blocked attention as its additive mask)
    weight = torch.randn_like(out)
    params = [attn.q.weight, attn.kv.weight, attn.pos_embed.height_rel, attn.pos_embed.width_rel]
    grads = torch.autograd.grad((out * weight).sum(), params)
    ref_grads = torch.autograd.grad((ref * weight).sum(), params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-9)


def test_strided_attention_is_stride_one_attention_subsampled():
    torch.manual_seed(0)
    full = HaloAttention(8, 8, 16, num_heads=2, block_size=4, halo_size=2, stride=1)
    strided = HaloAttention(8, 8, 16, num_heads=2, block_size=4, halo_size=2, stride=2)
    strided.load_state_dict(full.state_dict())
    x = torch.randn(1, 8, 12, 8)
    torch.testing.assert_close(strided(x), full(x)[:, :, ::2, ::2], rtol=1e-5, atol=1e-5)


def test_stride_one_matches_timm_halo_attn():
    """timm's HaloAttn expresses the same layer (rv > 1 through dim_head); its tables are offset by h rows."""
    torch.manual_seed(0)
    h = 2
    ours = HaloAttention(16, 16, 48, num_heads=4, block_size=4, halo_size=h)
    theirs = HaloAttn(16, 48, num_heads=4, dim_head=4, block_size=4, halo_size=h)
    state = ours.state_dict()
    for key in ('pos_embed.height_rel', 'pos_embed.width_rel'):
        state[key] = state[key].roll(h, dims=0)
    theirs.load_state_dict(state)
    x = torch.randn(2, 16, 8, 12)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_h0_forward_and_features():
    # H0 needs 256 px sides without padding; 64 px with block padding keeps the test fast
    torch.manual_seed(0)
    model = timm.create_model('halonet_h0', pad_to_block=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        logits = model.forward_head(final)
        pooled = model.forward_head(final, pre_logits=True)
        torch.testing.assert_close(model(x), logits)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert pooled.shape == (1, model.num_features) and model.num_features == 256
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    assert model.pretrained_cfg['input_size'] == (3, 256, 256)

    torch.manual_seed(0)  # the same init as `model`
    features = timm.create_model('halonet_h0', features_only=True, pad_to_block=True).eval()
    assert features.feature_info.channels() == [32, 64, 128, 256]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        for a, b in zip(features(x), feats):
            torch.testing.assert_close(a, b)


def test_size_not_divisible_by_block_is_a_clear_error():
    model = timm.create_model('halonet_h0').eval()
    with pytest.raises(ValueError, match='multiples of 256.*got 224x224.*pad_to_block=True'):
        model(torch.randn(1, 3, 224, 224))
    attn = HaloAttention(8, 8, 8, num_heads=2, block_size=4, halo_size=1)
    with pytest.raises(ValueError, match='block size 4 needs .* multiples of 4, got 6x8'):
        attn(torch.randn(1, 8, 6, 8))
    with pytest.raises(ValueError, match='expected 3 input channels'):
        model(torch.randn(1, 1, 256, 256))


def test_pad_to_block_accepts_any_size():
    model = _tiny(pad_to_block=True)
    with torch.no_grad():
        final, feats = model.forward_intermediates(torch.randn(1, 3, 70, 45))
    # the stem and every stride-2 layer round up: 70x45 -> 18x12 -> 9x6 -> 5x3 -> 3x2
    assert [tuple(f.shape[2:]) for f in feats] == [(18, 12), (9, 6), (5, 3), (3, 2)]
    assert final.shape == (1, 96, 3, 2)
    with pytest.raises(ValueError, match='multiples of 128'):
        _tiny()(torch.randn(1, 3, 70, 45))


def test_h7_keeps_the_paper_size_and_pads():
    with torch.device('meta'):
        model = timm.create_model('halonet_h7')
        strict = timm.create_model('halonet_h6')
    assert model.pad_to_block and model.pretrained_cfg['input_size'] == (3, 600, 600)
    assert not strict.pad_to_block and strict.pretrained_cfg['input_size'] == (3, 512, 512)


def test_grad_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    model = _tiny(pad_to_block=True)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_classifier_and_pruning_interface():
    model = _tiny(pad_to_block=True)
    x = torch.randn(1, 3, 32, 32)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model(x).shape == (1, 3)
    matcher = model.group_matcher()
    assert matcher['stem'] == r'^stem'
    with torch.no_grad():
        full = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        kept = model.prune_intermediate_layers([1])
        assert kept == [1] and len(model.stages) == 2 and model.num_features == 48
        pruned = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        assert model(x).shape == (1, 48, 4, 4)  # pruned head: no pooling, no classifier
    torch.testing.assert_close(pruned[0], full[0])


def test_cfgs_declare_no_weights_and_cards_cover_every_variant():
    names = [f'halonet_h{i}' for i in range(8)]
    assert sorted(zoo.list_models('halonet_h*')) == names
    assert set(halonet.card_info['variants']) == set(names)
    for name in names:
        cfg = timm.models.get_pretrained_cfg(f'{name}.untrained').to_dict()
        assert not cfg.get('hf_hub_id') and not cfg.get('url')
        assert cfg['paper_ids'] == 'arXiv:2103.12731'
    assert timm.list_pretrained('halonet_h*') == []


def test_inference_in_chunks_of_blocks_matches_all_blocks_at_once(monkeypatch):
    """Without gradients, large inputs are attended a chunk of blocks at a time (bounded memory): same output."""
    torch.manual_seed(0)
    attn = HaloAttention(16, 16, 32, num_heads=2, block_size=4, halo_size=1).eval()
    x = torch.randn(2, 16, 16, 20)
    expected = attn(x).detach()  # gradients enabled: all 20 blocks at once
    monkeypatch.setattr(halonet, '_INFERENCE_CHUNK_ELEMENTS', 3 * 2 * 2 * 16 * 36)  # 3 blocks per chunk
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)
