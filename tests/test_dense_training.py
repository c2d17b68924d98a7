"""Depth and segmentation through the trainer: paired folders, seeded joint augmentation, losses, metrics."""
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from zoo import hub
from zoo.errors import InputError
from zoo.train import trainer
from zoo.train.dense import PairedImages

# A tiny ×Net (timm's test ConvNeXt encoder x ConvNeXt-atto decoder) keeps each run to seconds.
TINY = dict(encoder='test_convnext', decoder='convnext_atto')


def _write_pairs(root: Path, kind: str, count: int = 4, size=(64, 96)):
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        (root / split / 'images').mkdir(parents=True)
        (root / split / kind).mkdir(parents=True)
        for i in range(count):
            image = (rng.random((*size, 3)) * 255).astype(np.uint8)
            Image.fromarray(image).save(root / split / 'images' / f'{i:03d}.png')
            if kind == 'depth':  # 16-bit PNG in millimetres, brighter = farther, 0.5..5 m
                target = (500 + image.mean(-1) / 255 * 4500).astype(np.uint16)
            else:
                target = (image[..., 0] > 127).astype(np.uint8) + (image[..., 1] > 200).astype(np.uint8)
            Image.fromarray(target).save(root / split / kind / f'{i:03d}.png')
    return root


def _recipe(task: str, **data):
    return trainer.check_recipe(dict(
        source='test', model='timesnet_convnext_tiny_convnext_tiny', task=task,
        model_args=dict(TINY, task=task, **({'num_classes': 3} if task == 'segmentation' else {})),
        data=dict(crop_size=[32, 64], **data),
        train=dict(epochs=2, batch_size=2, lr=1e-3, seed=0)))


def test_depth_recipe_trains_and_reports_the_depth_metrics(tmp_path):
    data = _write_pairs(tmp_path / 'data', 'depth')
    recipe = _recipe('depth', depth_scale=1000.0, benchmark='nyu', eval_crop='none')
    metrics = trainer.train(recipe, tmp_path / 'run', data=str(data), quiet=True)
    assert {'delta1', 'abs_rel', 'rmse', 'silog'} <= set(metrics)
    assert 0 <= metrics['delta1'] <= 1 and metrics['rmse'] > 0
    model = hub.load(tmp_path / 'run' / 'model')
    assert model.task == 'depth'


def test_segmentation_recipe_trains_with_dice_and_iou(tmp_path):
    data = _write_pairs(tmp_path / 'data', 'masks')
    metrics = trainer.train(_recipe('segmentation'), tmp_path / 'run', data=str(data), quiet=True)
    assert set(metrics) == {'mean_dice', 'mean_iou'}
    assert 0 <= metrics['mean_iou'] <= metrics['mean_dice'] <= 1


def test_crop_and_flip_move_image_and_target_together(tmp_path):
    data = _write_pairs(tmp_path / 'data', 'depth', count=1)
    pairs = [(data / 'train' / 'images' / '000.png', data / 'train' / 'depth' / '000.png')]
    dataset = PairedImages(pairs, 'depth', mean=(0, 0, 0), std=(1, 1, 1), depth_scale=1000.0,
                           crop_size=(32, 64), hflip=1.0, seed=5)
    image, depth = dataset[0]
    expected = 0.5 + image.mean(0, keepdim=True) * 4.5  # the depth the image encodes
    assert image.shape == (3, 32, 64) and depth.shape == (1, 32, 64)
    assert (depth - expected).abs().max() < 2e-3
    assert torch.equal(dataset[0][0], image), 'the same (seed, epoch, index) gives the same crop'
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][0], image), 'another epoch gives another crop'


def test_a_hub_dataset_gives_the_samples_the_paired_folders_give(tmp_path):
    """`data.dataset` (a Hub id or a local folder, read by `datasets.load_dataset`) yields the same tensors."""
    import datasets as hf_datasets
    import timm
    from zoo.train import dense

    folders = _write_pairs(tmp_path / 'data', 'masks', count=2)
    parquet = tmp_path / 'parquet'
    parquet.mkdir()
    features = hf_datasets.Features({'image': hf_datasets.Image(), 'label': hf_datasets.Image()})
    for split in ('train', 'validation'):
        names = sorted(p.name for p in (folders / split / 'images').iterdir())
        rows = {'image': [Image.open(folders / split / 'images' / n) for n in names],
                'label': [Image.open(folders / split / 'masks' / n) for n in names]}
        hf_datasets.Dataset.from_dict(rows, features=features).to_parquet(str(parquet / f'{split}.parquet'))
    recipe = _recipe('segmentation', dataset=str(parquet), cache_dir=str(tmp_path / 'cache'))
    model = timm.create_model(recipe['model'], **recipe['model_args'])
    from_hub = dense.datasets(recipe, model)[:2]
    from_folders = dense.datasets(recipe, model, data=str(folders))[:2]
    for hub_split, folder_split in zip(from_hub, from_folders):
        assert len(hub_split) == len(folder_split) == 2
        for i in range(2):
            (hub_image, hub_mask), (image, mask) = hub_split[i], folder_split[i]
            assert torch.equal(hub_image, image) and torch.equal(hub_mask, mask)
    assert from_hub[1][0][1].unique().tolist() == [0, 1, 2], 'class indices survive the round trip'


def test_reduce_zero_label_ignores_label_0_and_scores_every_other_class(tmp_path):
    """ADE20K's setting (mmseg's reduce_zero_label): label 0 is ignored, 1..K become the K classes 0..K-1."""
    from zoo.train import dense

    data = _write_pairs(tmp_path / 'data', 'masks', count=1)
    pair = (data / 'validation' / 'images' / '000.png', data / 'validation' / 'masks' / '000.png')
    raw = np.asarray(Image.open(pair[1])).copy()
    raw[:4] = 255  # pixels the annotation already leaves out stay out
    Image.fromarray(raw).save(pair[1])
    raw = torch.from_numpy(raw.astype(np.int64))
    image, mask = PairedImages([pair], 'segmentation', mean=(0, 0, 0), std=(1, 1, 1), reduce_zero_label=True)[0]
    assert torch.equal(mask, torch.where((raw == 0) | (raw == 255), 255, raw - 1))

    class Predicts(torch.nn.Module):
        num_classes = 2

        def __init__(self, prediction):
            super().__init__()
            self.prediction = prediction

        def forward(self, x):
            return torch.nn.functional.one_hot(self.prediction, 2).permute(2, 0, 1)[None].float()

    def mean_iou(prediction, mask=mask, reduce_zero_label=True):
        recipe = {'data': {'reduce_zero_label': reduce_zero_label}}
        metrics = dense._segmentation_evaluate(recipe, Predicts(prediction), [(image, mask)], Accelerator(cpu=True))
        return metrics['mean_iou']

    labelled = mask != 255
    assert mean_iou(mask.masked_fill(~labelled, 1)) == 1.0, 'predictions on ignored pixels do not count'
    share_of_class_0 = ((mask == 0).sum() / labelled.sum()).item()
    assert mean_iou(torch.zeros_like(mask)) == pytest.approx(share_of_class_0 / 2), 'class 0 is scored, class 1 is 0'
    # Without reduce_zero_label, 0 is background (not scored) and 255 is still ignored.
    background_mask = torch.where(raw == 255, 255, raw.clamp(max=1))
    prediction = background_mask.masked_fill(background_mask == 255, 1)
    assert mean_iou(prediction, background_mask, reduce_zero_label=False) == 1.0


def test_unpaired_and_missing_folders_are_named(tmp_path):
    data = _write_pairs(tmp_path / 'data', 'masks', count=2)
    (data / 'train' / 'masks' / '001.png').unlink()
    with pytest.raises(ValueError, match='001.png'):
        trainer.train(_recipe('segmentation'), tmp_path / 'run', data=str(data), quiet=True)
    with pytest.raises(InputError, match='train/images/<name>.jpg'):
        trainer.train(_recipe('segmentation'), tmp_path / 'run', data=str(tmp_path / 'nothing'), quiet=True)


def test_macmd_trains_on_grey_images_with_deep_supervision(tmp_path, monkeypatch):
    data = _write_pairs(tmp_path / 'data', 'masks', count=2)
    recipe = _recipe('segmentation')
    recipe.update(model='macmd_pvt_v2_b2', model_args=dict(num_classes=3))
    heads = []
    from zoo.models.macmd import MACMD

    original = MACMD.forward_train
    monkeypatch.setattr(MACMD, 'forward_train', lambda self, x: heads.append(x.shape) or original(self, x))
    metrics = trainer.train(recipe, tmp_path / 'run', data=str(data), quiet=True)
    assert heads and all(shape[1] == 1 for shape in heads), 'every training step uses the three heads, on grey input'
    assert 0 <= metrics['mean_dice'] <= 1


def test_silog_gives_no_nan_without_valid_pixels():
    from zoo.tasks.depth import SILogLoss

    pred = torch.rand(1, 1, 8, 8, requires_grad=True)
    loss = SILogLoss()(pred, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(pred.grad).all()
