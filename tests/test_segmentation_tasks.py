"""Segmentation task kit: loss, Dice, HD95 and the mask overlay, against values worked out by hand."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from zoo.tasks import save_prediction
from zoo.tasks.segmentation import (
    IGNORE_INDEX, PALETTE, CeDiceLoss, dice_coefficient, hd95, overlay_mask, predict_mask, save_mask_overlay,
    soft_dice_loss, synapse_case_metrics,
)

# Uniform probabilities 0.5 on two pixels, one of each class: per class sum(p t) = 0.5, sum(p^2) = 0.5,
# sum(t^2) = 1, so Dice = (1 + s) / (1.5 + s); CE (or BCE) = ln 2.
HALF_DICE_LOSS = 1 - (1 + 1e-5) / (1.5 + 1e-5)
UNIFORM_LOSS = 0.4 * math.log(2) + 0.6 * HALF_DICE_LOSS


def test_without_ignored_pixels_the_loss_is_the_official_formula():
    """0.4 mean CE + 0.6 soft Dice over the whole batch, as MACMD's `CeDiceLoss`, for a realistic batch."""
    torch.manual_seed(0)
    logits, target = torch.randn(4, 9, 56, 56), torch.randint(0, 9, (4, 56, 56))
    one_hot = torch.nn.functional.one_hot(target, 9).permute(0, 3, 1, 2).float()
    expected = 0.4 * torch.nn.functional.cross_entropy(logits, target) + 0.6 * soft_dice_loss(logits.softmax(1), one_hot)
    torch.testing.assert_close(CeDiceLoss()(logits, target), expected, rtol=1e-6, atol=0)
    half = CeDiceLoss()(logits.half(), target)  # float16 logits over 12,544 x 4 pixels: no overflow in the count
    assert torch.isfinite(half) and abs(half.item() - expected.item()) < 1e-2


def test_pixels_labelled_255_count_in_neither_loss_term():
    torch.manual_seed(0)
    for num_classes in (1, 3):
        logits = torch.randn(2, num_classes, 8, 8, requires_grad=True)
        target = torch.randint(0, max(num_classes, 2), (2, 8, 8))
        target[:, :4] = IGNORE_INDEX
        loss = CeDiceLoss()(logits, target)
        loss.backward()
        assert logits.grad[:, :, :4].abs().max() == 0
        labelled_half = CeDiceLoss()(logits.detach()[:, :, 4:], target[:, 4:])
        assert loss.item() == pytest.approx(labelled_half.item(), rel=1e-6)
        with_channel = CeDiceLoss()(logits.detach(), target[:, None])  # (B, 1, H, W) masks are read alike
        assert with_channel.item() == pytest.approx(loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match='does not fit logits'):
        CeDiceLoss()(torch.randn(2, 3, 8, 8), torch.zeros(4, 8, 8, dtype=torch.long))
    all_ignored = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = CeDiceLoss()(all_ignored, torch.full((1, 4, 4), IGNORE_INDEX))
    loss.backward()
    assert torch.isfinite(loss) and all_ignored.grad.abs().max() == 0


def test_ce_dice_loss_multiclass_by_hand():
    loss = CeDiceLoss()(torch.zeros(1, 2, 1, 2), torch.tensor([[[0, 1]]]))
    assert loss.item() == pytest.approx(UNIFORM_LOSS, rel=1e-6)


def test_ce_dice_loss_binary_uses_bce_and_sigmoid():
    loss = CeDiceLoss()(torch.zeros(1, 1, 1, 2), torch.tensor([[[0, 1]]]))
    assert loss.item() == pytest.approx(UNIFORM_LOSS, rel=1e-6)


def test_ce_dice_loss_weights_and_deep_supervision_sum():
    logits, target = torch.zeros(1, 2, 1, 2), torch.tensor([[[0, 1]]])
    only_ce = CeDiceLoss(ce_weight=1., dice_weight=0.)(logits, target)
    assert only_ce.item() == pytest.approx(math.log(2), rel=1e-6)
    assert CeDiceLoss()([logits, logits, logits], target).item() == pytest.approx(3 * UNIFORM_LOSS, rel=1e-6)


def test_ce_dice_loss_is_near_zero_when_right_and_pushes_towards_the_target_when_wrong():
    target = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    right = 20 * torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert CeDiceLoss()(right, target).item() < 1e-6
    logits = torch.zeros(1, 3, 2, 3, requires_grad=True)
    CeDiceLoss()(logits, target).backward()
    target_grads = logits.grad.gather(1, target[:, None])
    assert (target_grads < 0).all()  # a step against the gradient raises the target logit


def test_ce_dice_loss_refuses_logits_of_another_size():
    with pytest.raises(ValueError, match='differ in size'):
        CeDiceLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))


def squares():
    """Two 3x3 squares in a 10x10 grid, the second shifted two columns right: they share one column."""
    pred, target = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    pred[2:5, 2:5] = True
    target[2:5, 4:7] = True
    return pred, target


def test_dice_by_hand():
    pred, target = squares()
    assert dice_coefficient(pred, target) == pytest.approx(2 * 3 / 18)
    assert dice_coefficient(torch.from_numpy(pred), torch.from_numpy(pred)) == 1.0
    assert dice_coefficient(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert dice_coefficient(pred, np.zeros_like(pred)) == 0.0


def test_hd95_by_hand_in_pixels_and_millimetres():
    # Border pixels (8 per square): each square's far column is 2 px from the other's border, its middle
    # column's top and bottom 1 px, its shared column 0 px: 16 distances, six of them 2, so the 95th is 2.
    pred, target = squares()
    assert hd95(pred, target) == pytest.approx(2.0)
    assert hd95(target, pred) == pytest.approx(2.0)
    assert hd95(pred, target, spacing=(1.0, 0.5)) == pytest.approx(1.0)  # columns 0.5 mm apart


def test_hd95_ignores_a_single_outlier_unlike_the_hausdorff_distance():
    # A 10x10 block (36 border pixels) predicted exactly, plus one stray pixel 8 px away: 72 zero distances
    # and one of 8, whose 95th percentile is 0.
    target = np.zeros((20, 20), bool)
    target[1:11, 1:11] = True
    pred = target.copy()
    pred[18, 18] = True
    assert hd95(pred, target) == 0.0


def test_hd95_of_empty_masks():
    empty, pred = np.zeros((5, 5), bool), np.eye(5, dtype=bool)
    assert hd95(empty, empty) == 0.0
    assert hd95(pred, empty) == math.inf
    assert hd95(empty, pred) == math.inf
    with pytest.raises(ValueError, match='shape'):
        hd95(np.zeros((4, 4)), np.zeros((4, 5)))


def test_synapse_case_metrics_follow_the_official_empty_mask_convention():
    label = np.zeros((2, 10, 10), int)
    prediction = np.zeros((2, 10, 10), int)
    label[0, 2:5, 2:5] = prediction[0, 2:5, 2:5] = 1  # class 1: exact
    prediction[1, 0:2, 0:2] = 2  # class 2: predicted, absent from the label
    label[1, 5:8, 5:8] = 3  # class 3: in the label, missed
    pred2d, target2d = squares()
    label[1][target2d] = 4  # class 4: the shifted squares
    prediction[1][pred2d] = 4
    scores = synapse_case_metrics(torch.from_numpy(prediction), label, num_classes=6)
    assert scores[:3] == [(1.0, 0.0), (1.0, 0.0), (0.0, 0.0)]
    assert scores[3] == pytest.approx((1 / 3, 2.0))
    assert scores[4] == (0.0, 0.0)  # class 5: in neither, still scored 0 by the official code


class HalfAndHalf(nn.Module):
    """A 2-class 'model' that predicts class 1 on the left 20 columns of its input and class 0 elsewhere."""
    task = 'segmentation'

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.in_chans = 3
        self.pretrained_cfg = dict(input_size=(3, 16, 16), mean=(0.,), std=(1.,), label_names=['sky', 'liver'])

    def forward(self, x):
        assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0  # padded to what the zoo's dense models take
        logits = torch.zeros(1, 2, *x.shape[-2:])
        logits[:, 1, :, :20] = self.scale
        return logits


def test_overlay_blends_class_colours_over_the_image_by_hand():
    image = Image.new('RGB', (4, 2), (100, 100, 100))
    mask = np.array([[0, 1, 2, 0], [0, 0, 13, 0]])  # class 13 wraps round to the first colour
    out = np.asarray(overlay_mask(image, mask, alpha=0.5))
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [165, 62, 88]  # (100 + (230, 25, 75)) / 2, rounded half to even
    assert out[0, 2].tolist() == np.rint((100 + PALETTE[1]) / 2).astype(int).tolist()
    assert out[1, 2].tolist() == out[0, 1].tolist()
    with pytest.raises(ValueError, match='differ in size'):
        overlay_mask(image, mask[:, :3])
    every_class = np.asarray(overlay_mask(image, mask, alpha=0.5, background=None))  # ADE20K: 0 is wall
    assert every_class[0, 0].tolist() == out[0, 1].tolist() and every_class[0, 1].tolist() == out[0, 2].tolist()


def test_predict_mask_runs_at_the_image_size_padded_and_crops_back():
    mask = predict_mask(HalfAndHalf(), Image.new('RGB', (40, 20), (0, 0, 0)))  # run padded to 32x64
    assert mask.shape == (20, 40)
    assert (mask[:, :20] == 1).all() and (mask[:, 20:] == 0).all()


def test_mask_picture_has_a_legend_of_the_classes_present(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    legends, legend = [], Figure.legend

    def spy(self, *args, **kwargs):
        legends.append([h.get_label() for h in kwargs['handles']])
        return legend(self, *args, **kwargs)

    monkeypatch.setattr(Figure, 'legend', spy)
    path = save_mask_overlay(HalfAndHalf(), Image.new('RGB', (40, 20), (0, 0, 0)), tmp_path / 'out.png')
    assert legends == [['liver']]  # the background class (0, "sky") is neither coloured nor listed
    assert Image.open(path).size[0] > 40 and [p.name for p in tmp_path.iterdir()] == ['out.png']


def test_a_failed_prediction_leaves_an_existing_picture_alone(tmp_path):
    target = tmp_path / 'out.png'
    target.write_bytes(b'good')
    model = HalfAndHalf()
    model.forward = lambda x: (_ for _ in ()).throw(RuntimeError('boom'))
    with pytest.raises(RuntimeError, match='boom'):
        save_mask_overlay(model, Image.new('RGB', (4, 4)), target)
    assert target.read_bytes() == b'good'
    assert [p.name for p in tmp_path.iterdir()] == ['out.png']


def test_zoo_predict_dispatches_segmentation_models_to_the_overlay(tmp_path):
    image_path = tmp_path / 'scan.jpg'
    Image.new('RGB', (8, 8)).save(image_path)
    out = save_prediction(HalfAndHalf(), Image.open(image_path), image_path)
    assert out == tmp_path / 'scan.segmentation.png' and Image.open(out).size[1] >= 256  # shown 256 px tall


def test_xnet_segmentation_colours_class_0_which_is_wall_on_ade20k(tmp_path):
    import zoo
    from zoo import hub

    model = zoo.create_model('timesnet_convnext_tiny_convnext_tiny', task='segmentation', num_classes=3,
                             encoder='test_convnext', decoder='convnext_atto').eval()
    assert model.background_class is None
    hub.save_pretrained(zoo.create_model(
        'timesnet_convnext_tiny_convnext_tiny', task='segmentation', num_classes=3, background_class=0,
        encoder='test_convnext', decoder='convnext_atto'), tmp_path / 'with_background')
    assert hub.load(tmp_path / 'with_background').background_class == 0
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([5., 0., 0.]))  # class 0 everywhere
    image = Image.new('RGB', (64, 32), (0, 0, 0))
    assert (predict_mask(model, image) == 0).all()
    out = np.asarray(overlay_mask(image, predict_mask(model, image), background=model.background_class))
    assert (out == np.rint(PALETTE[0] / 2)).all()
