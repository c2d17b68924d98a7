"""Depth task kit: SIlog loss, metrics, the NYU / KITTI evaluation masks and the pictures `zoo predict` writes,
checked against values worked out by hand."""
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import zoo
from zoo.tasks import save_prediction
from zoo.tasks.depth import (
    DepthMetrics, SILogLoss, depth_metrics, eval_mask, image_to_tensor, kitti_benchmark_crop, save_depth_picture,
    save_normals_picture)

# pred / gt = 1, 1.2, 1.5, 3 on one image of four valid pixels
PRED = torch.tensor([1., 1.2, 1.5, 3.]).view(1, 1, 2, 2)
GT = torch.ones(1, 1, 2, 2)


def test_silog_loss_by_hand():
    pred = torch.tensor([1., math.e]).view(1, 1, 1, 2)
    gt = torch.ones(1, 1, 1, 2)
    # g = (0, 1): unbiased variance 0.5, mean 0.5 -> 10 * sqrt(0.5 + 0.15 * 0.25 + 1e-6)
    assert SILogLoss()(pred, gt).item() == pytest.approx(7.331446, abs=1e-4)
    # scaling the prediction moves only the mean term
    assert SILogLoss(lam=0.)(2 * pred, gt).item() == pytest.approx(10 * math.sqrt(0.5 + 1e-6), abs=1e-4)
    # masked pixels do not count; the prediction is resized to the target first
    masked = torch.cat([pred, torch.full((1, 1, 1, 1), 50.)], dim=-1)
    mask = torch.tensor([True, True, False]).view(1, 1, 1, 3)
    assert SILogLoss()(masked, torch.ones(1, 1, 1, 3), mask).item() == pytest.approx(7.331446, abs=1e-4)
    small = torch.full((1, 1, 1, 1), math.e)
    assert SILogLoss()(small, torch.ones(1, 1, 4, 4)).item() == pytest.approx(10 * math.sqrt(0.15 + 1e-6), abs=1e-4)


def test_metrics_by_hand():
    m = depth_metrics(PRED, GT)
    assert m['delta1'] == pytest.approx(0.5)  # 1 and 1.2 are within 1.25
    assert m['delta2'] == pytest.approx(0.75)  # 1.5 < 1.5625
    assert m['delta3'] == pytest.approx(0.75)  # 3 > 1.953
    assert m['abs_rel'] == pytest.approx((0 + .2 + .5 + 2) / 4)
    assert m['sq_rel'] == pytest.approx((0 + .04 + .25 + 4) / 4)
    assert m['rmse'] == pytest.approx(1.035616, abs=1e-5)
    assert m['rmse_log'] == pytest.approx(0.592578, abs=1e-5)
    assert m['log10'] == pytest.approx(0.183098, abs=1e-5)
    assert m['silog'] == pytest.approx(48.0835, abs=1e-3)
    # symmetric deltas: an under-estimate by the same factor scores the same
    assert depth_metrics(1 / PRED, GT)['delta1'] == pytest.approx(0.5)


def test_pixel_metrics_pool_the_batch_and_rmse_averages_images():
    pred = torch.tensor([[2., 2.], [1., 1.]]).view(2, 1, 1, 2)
    gt = torch.ones(2, 1, 1, 2)
    pred = torch.tensor([[2., 2., 2.], [1., 1., 3.]]).view(2, 1, 1, 3)
    gt = torch.ones(2, 1, 1, 3)
    mask = torch.tensor([[True, True, False], [True, True, True]]).view(2, 1, 1, 3)
    m = depth_metrics(pred, gt, mask)
    assert m['abs_rel'] == pytest.approx(4 / 5)  # five valid pixels: errors 1, 1, 0, 0, 2
    # per image: sqrt(1 + 1e-6) and sqrt(4 / 3 + 1e-6), then averaged
    assert m['rmse'] == pytest.approx((math.sqrt(1 + 1e-6) + math.sqrt(4 / 3 + 1e-6)) / 2)
    running = DepthMetrics()
    running.update(pred, gt, mask)
    running.update(PRED, GT)
    total = running.compute()
    assert total['abs_rel'] == pytest.approx((2 * (4 / 5) + 1 * 0.675) / 3)  # batches weigh by their images


def test_empty_mask_is_refused():
    with pytest.raises(ValueError, match='mask is empty'):
        depth_metrics(PRED, GT, torch.zeros_like(GT, dtype=torch.bool))


def test_nyu_eval_mask_is_the_eigen_crop_with_depth_caps():
    gt = torch.full((1, 1, 480, 640), 5.)
    mask = eval_mask(gt, 'nyu')
    assert mask.sum() == (471 - 45) * (601 - 41)
    assert mask[0, 0, 45, 41] and not mask[0, 0, 44, 41] and not mask[0, 0, 45, 601]
    gt[0, 0, 100, 100], gt[0, 0, 101, 100], gt[0, 0, 102, 100] = 0.005, 10.5, 9.99
    mask = eval_mask(gt, 'nyu')
    assert not mask[0, 0, 100, 100] and not mask[0, 0, 101, 100] and mask[0, 0, 102, 100]
    with pytest.raises(ValueError, match='480x640'):
        eval_mask(torch.ones(1, 1, 240, 320), 'nyu')


def test_kitti_eval_mask_is_the_garg_crop_with_an_80m_cap():
    gt = torch.full((1, 1, 352, 1216), 50.)
    gt[..., 300, 600] = 81.
    mask = eval_mask(gt, 'kitti')
    # rows int(0.40810811 * 352) = 143 to int(0.99189189 * 352) = 349, cols 43 to 1172
    assert mask.sum() == (349 - 143) * (1172 - 43) - 1
    assert mask[..., 143, 43].all() and not mask[..., 142, 43].any() and not mask[..., 349, 43].any()
    assert eval_mask(gt, 'kitti', crop='none').sum() == 352 * 1216 - 1
    with pytest.raises(ValueError, match='unknown dataset'):
        eval_mask(gt, 'ddad')


def test_kitti_benchmark_crop_is_bottom_centre():
    frame = torch.arange(375 * 1242).view(1, 375, 1242)
    crop = kitti_benchmark_crop(frame)
    assert crop.shape == (1, 352, 1216)
    assert crop[0, 0, 0] == frame[0, 23, 13] and crop[0, -1, -1] == frame[0, -1, 1228]


@pytest.fixture(scope='module')
def small_depth_model():
    torch.manual_seed(0)
    return timm.create_model('zoo/idisc_resnet101.nyu', encoder='resnet18', hidden_dim=16, latent_dim=8,
                             num_latents=4).eval()


def _image(h=40, w=56):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_depth_picture_is_the_map_with_a_colour_bar(small_depth_model, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    bars, colorbar = [], Figure.colorbar

    def spy(self, *args, **kwargs):
        bars.append(kwargs)
        return colorbar(self, *args, **kwargs)

    monkeypatch.setattr(Figure, 'colorbar', spy)
    out = save_depth_picture(small_depth_model, _image(), tmp_path / 'sub' / 'a.png')
    assert out == tmp_path / 'sub' / 'a.png' and sorted(p.name for p in out.parent.iterdir()) == ['a.png']
    assert bars and bars[0]['label'] == 'depth (m)'
    picture = np.asarray(Image.open(out).convert('RGB'))
    assert picture.shape[0] >= 256 and picture.shape[1] > 256 * 56 / 40  # the map shown 256 px tall, a bar beside it
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 10  # a map, not a flat colour
    # `zoo predict` goes through the task hook and writes <stem>.depth.png beside the image
    image_path = tmp_path / 'room.jpg'
    _image().save(image_path)
    assert save_prediction(small_depth_model, _image(), image_path) == tmp_path / 'room.depth.png'


def test_failed_write_leaves_the_old_picture(small_depth_model, tmp_path, monkeypatch):
    target = tmp_path / 'a.png'
    target.write_bytes(b'old picture')
    monkeypatch.setattr(Image.Image, 'save', lambda *a, **k: (_ for _ in ()).throw(OSError('disk full')))
    with pytest.raises(OSError, match='disk full'):
        save_depth_picture(small_depth_model, _image(), target)
    assert target.read_bytes() == b'old picture' and [p.name for p in tmp_path.iterdir()] == ['a.png']


def test_normals_picture(tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model('idisc_swin_large.nyu_normals', encoder='resnet18', hidden_dim=16, latent_dim=8,
                             num_latents=4).eval()
    assert model.task == 'normals'
    out = save_prediction(model, _image(), tmp_path / 'room.jpg')
    assert out.name == 'room.normals.png'
    assert np.asarray(Image.open(out)).shape[0] > 256  # the map shown 256 px tall, its colour key below
    assert save_normals_picture(model, _image(32, 32), tmp_path / 'n.png').is_file()


def test_image_to_tensor_keeps_the_size_and_normalises(small_depth_model):
    image = Image.fromarray(np.full((30, 50, 3), 255, dtype=np.uint8))
    x = image_to_tensor(small_depth_model, image)
    assert x.shape == (1, 3, 30, 50)
    torch.testing.assert_close(x[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
