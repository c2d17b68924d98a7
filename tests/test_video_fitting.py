"""Fitting a video model with the trainer, and README's main job in a shortened form."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from zoo.train import trainer
from zoo.cli import main
from zoo.tasks.video import psnr, read_frames, write_frames
from zoo.train.video_fitting import make_demo_clip, side_by_side

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO / 'training' / 'recipes' / 'hnerv_demo.yaml'
# 4 frames of 48x96 (strides 3,2,2,2,2 reach 48) and 40 epochs of 2 steps: the main job in seconds.
SHORT = ['data.demo_clip.num_frames=4', 'model_args.frame_size=[48, 96]', 'model_args.enc_strides=[3, 2, 2, 2, 2]',
         'train.epochs=40', 'train.warmup_epochs=4', 'train.log_every=10']


def test_demo_clip_is_a_smooth_pan_and_zoom():
    clip = make_demo_clip(num_frames=8, frame_size=(48, 96))
    assert clip.shape == (8, 3, 48, 96) and 0 <= clip.min() and clip.max() <= 1
    assert torch.equal(clip, make_demo_clip(num_frames=8, frame_size=(48, 96)))
    step = psnr(clip[1:], clip[:-1])
    assert (step < 60).all(), 'every frame moves'
    assert (step > psnr(clip[-1:], clip[:1])).all(), 'neighbours are closer than the ends of the clip'


def test_demo_clip_names_the_images_it_can_use():
    with pytest.raises(ValueError, match='astronaut'):
        make_demo_clip(image='mona_lisa')


def test_main_job_shortened(tmp_path, capsys):
    """README's command with a shorter recipe: fit, export, reload with timm, decode, compress, report; then
    `zoo reproduce` of its Hub folder, from a process with another thread count, is bit-exact."""
    out = tmp_path / 'run'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, '-m', 'accelerate.commands.launch', '--num_processes', '1', '--cpu',
         str(REPO / 'training' / 'train.py'), '--recipe', str(DEMO_RECIPE), '--output-dir', str(out), *SHORT],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ('PSNR', 'bits per pixel', 'frames/s', 'side_by_side.png', 'local-dir:'):
        assert line in result.stdout
    report = json.loads((out / 'report.json').read_text())
    clip = read_frames(out / 'clip')
    assert clip.shape == (4, 3, 48, 96)
    picture = Image.open(out / 'side_by_side.png')
    assert picture.size[0] > 4 * 96 and picture.size[1] > 2 * 48  # four frames, two labelled rows
    assert report['bpp'] == pytest.approx((out / 'video.zvid').stat().st_size * 8 / (4 * 48 * 96))

    model = timm.create_model(f'local-dir:{out / "model"}', pretrained=True).eval()
    with torch.no_grad():
        fitted = psnr(model(frames=clip), clip).mean().item()
    assert fitted == pytest.approx(report['reloaded_psnr'], abs=0.05)  # the clip PNGs are 8-bit
    recipe = trainer.load_recipe(DEMO_RECIPE, SHORT)
    torch.manual_seed(0)
    untrained = timm.create_model('hnerv_0_35m', **{**recipe['model_args'], 'num_frames': 4}).eval()
    with torch.no_grad():
        assert fitted > psnr(untrained(frames=clip), clip).mean().item() + 3, 'fitting improves the video'

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(['reproduce', str(out / 'model'), '--output-dir', str(tmp_path / 'again')]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith('bit-exact: re-ran the recipe') for line in printed), printed[-8:]


def test_side_by_side_labels_its_rows_and_frames(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    labels, set_ylabel = [], Axes.set_ylabel

    def spy(self, label, **kwargs):
        labels.append(label)
        return set_ylabel(self, label, **kwargs)

    monkeypatch.setattr(Axes, 'set_ylabel', spy)
    frames = torch.rand(6, 3, 24, 32)
    path = side_by_side(frames, frames.flip(0), tmp_path / 'side_by_side.png', columns=3)
    assert labels == ['original', 'decoded']
    assert Image.open(path).size[0] > 3 * 32 and [p.name for p in tmp_path.iterdir()] == ['side_by_side.png']


def test_unreachable_frame_size_is_refused_with_the_sizes_that_work(tmp_path):
    recipe = trainer.load_recipe(DEMO_RECIPE, ['model_args.frame_size=[50, 100]'])
    with pytest.raises(ValueError, match='multiples of 96'):
        trainer.train(recipe, tmp_path, quiet=True)


def test_a_frame_folder_sets_the_frame_count(tmp_path):
    write_frames(make_demo_clip(num_frames=6, frame_size=(48, 96)), tmp_path / 'frames')
    recipe = trainer.load_recipe(DEMO_RECIPE, SHORT)
    from zoo.train.video_fitting import model_kwargs

    kwargs = model_kwargs(recipe, str(tmp_path / 'frames'))
    assert kwargs['num_frames'] == 6 and kwargs['frame_size'] == (48, 96)


def test_inpainting_mask_has_the_papers_five_boxes():
    from zoo.train.video_fitting import inpainting_mask

    mask = inpainting_mask((96, 192), 10)
    assert mask.shape == (1, 96, 192) and (mask == 0).sum() == 5 * 10 * 10
    for y, x in ((48, 96), (24, 48), (24, 144), (72, 48), (72, 144)):
        assert mask[0, y, x] == 0
    assert mask[0, 0, 0] == 1 and mask[0, 48, 60] == 1


def test_inpainting_never_sees_the_hidden_pixels(tmp_path):
    """Frames that differ only inside the boxes give the same fitted weights: neither the encoder nor the
    loss sees the hidden pixels."""
    from safetensors.torch import load_file

    from zoo.train.video_fitting import inpainting_mask

    clip = make_demo_clip(num_frames=4, frame_size=(48, 96))
    hidden = 1 - inpainting_mask((48, 96), 12)
    noisy = clip * (1 - hidden) + torch.rand_like(clip) * hidden
    runs = []
    for name, frames in (('clean', clip), ('noisy', noisy)):
        write_frames(frames, tmp_path / name)
        recipe = trainer.load_recipe(DEMO_RECIPE, SHORT[1:] + ['train.epochs=2', 'data.inpaint_box=12'])
        metrics = trainer.train(recipe, tmp_path / f'run-{name}', data=str(tmp_path / name), quiet=True)
        runs.append(load_file(tmp_path / f'run-{name}' / 'model' / 'model.safetensors'))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert metrics['input_psnr'] < 60
