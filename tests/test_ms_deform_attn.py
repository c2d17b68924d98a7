"""Multi-scale deformable attention against a per-sample bilinear reference, on every available device."""
import math

import pytest
import torch

from zoo.layers import MSDeformAttn, ms_deform_attn_sample, multi_scale_reference_points

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
SHAPES = [(5, 7), (3, 4), (2, 2)]


def bilinear_zero_padded(image, x, y):
    """image (D, H, W) at continuous (x, y) in [0, 1] (pixel edges), zero outside, as a plain loop."""
    _, h, w = image.shape
    px, py = x * w - 0.5, y * h - 0.5  # pixel-centre coordinates
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(image.shape[0], dtype=torch.float64)
    for yi in (y0, y0 + 1):
        for xi in (x0, x0 + 1):
            if 0 <= yi < h and 0 <= xi < w:
                weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
                out += weight * image[:, yi, xi].double()
    return out


def naive_sample(value, shapes, locations, weights):
    n, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(n, num_queries, heads, head_dim, dtype=torch.float64)
    for b in range(n):
        for q in range(num_queries):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    image = value[b, starts[lvl]:starts[lvl + 1], m].T.reshape(head_dim, h, w)
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        out[b, q, m] += weights[b, q, m, lvl, p].double() * bilinear_zero_padded(image, x, y)
    return out.reshape(n, num_queries, heads * head_dim)


@pytest.mark.parametrize('device', DEVICES)
def test_sampling_matches_a_per_point_bilinear_loop(device):
    gen = torch.Generator().manual_seed(0)
    n, heads, head_dim, points, num_queries = 2, 3, 4, 2, 6
    value = torch.randn(n, sum(h * w for h, w in SHAPES), heads, head_dim, generator=gen)
    # locations reach past the borders on every side, so zero padding is exercised
    locations = torch.rand(n, num_queries, heads, len(SHAPES), points, 2, generator=gen) * 1.4 - 0.2
    weights = torch.rand(n, num_queries, heads, len(SHAPES), points, generator=gen)
    expected = naive_sample(value, SHAPES, locations, weights)
    actual = ms_deform_attn_sample(value.to(device), SHAPES, locations.to(device), weights.to(device))
    assert actual.device.type == device
    torch.testing.assert_close(actual.cpu().double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_points_are_pixel_centres():
    points = multi_scale_reference_points([(2, 4), (1, 1)])
    assert points.shape == (1, 9, 1, 2)
    torch.testing.assert_close(points[0, :4, 0], torch.tensor([[.125, .25], [.375, .25], [.625, .25], [.875, .25]]))
    torch.testing.assert_close(points[0, 8, 0], torch.tensor([.5, .5]))


@pytest.mark.parametrize('device', DEVICES)
def test_module_offsets_are_in_pixels_of_each_level(device):
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=12, n_levels=len(SHAPES), n_heads=3, n_points=2).to(device)
    with torch.no_grad():
        attn.sampling_offsets.bias.normal_()
        attn.attention_weights.weight.normal_()
    length = sum(h * w for h, w in SHAPES)
    src = torch.randn(2, length, 12, device=device)
    ref = multi_scale_reference_points(SHAPES, device=device).expand(-1, -1, len(SHAPES), -1)
    with torch.no_grad():
        out = attn(src, ref, src, SHAPES)
        # the same computation spelled out: offsets divided by (W_l, H_l), joint softmax over levels x points
        value = attn.value_proj(src).view(2, length, 3, 4).cpu()
        offsets = attn.sampling_offsets(src).view(2, length, 3, len(SHAPES), 2, 2).cpu()
        weights = attn.attention_weights(src).view(2, length, 3, -1).softmax(-1).view(2, length, 3, len(SHAPES), 2)
        scale = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32)
        locations = ref.cpu()[:, :, None, :, None] + offsets / scale[:, None]
        expected = attn.output_proj(naive_sample(value, SHAPES, locations, weights.cpu()).float().to(device))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_init_points_each_head_in_its_own_direction():
    attn = MSDeformAttn(dim=16, n_levels=2, n_heads=4, n_points=3)
    grid = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    torch.testing.assert_close(grid[1, 0], torch.tensor([[0., 1.], [0., 2.], [0., 3.]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(grid[:, 0], grid[:, 1])
    assert not attn.attention_weights.weight.any()


def test_wrong_level_layout_is_refused():
    attn = MSDeformAttn(dim=8, n_levels=2, n_heads=2, n_points=1)
    x = torch.randn(1, 10, 8)
    with pytest.raises(ValueError, match='value has 10 positions'):
        attn(x, torch.rand(1, 10, 2, 2), x, [(2, 2), (2, 2)])
    with pytest.raises(ValueError, match='expected 2 feature levels'):
        attn(x, torch.rand(1, 10, 2, 2), x, [(2, 5)])
