"""Training checkpoints are data: no file in them runs code on resume, a damaged one is named, an unfinished
save is passed over for the newest complete checkpoint.

A tiny timm ConvNeXt on 32x32 images, as in test_trainer.py (which checks that resume is exact).
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from zoo.train import trainer
from zoo.errors import CheckpointError
from zoo.models._builder import sha256_file


@pytest.fixture(scope='module')
def recipe_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for split, count in (('train', 8), ('validation', 2)):
        for label in ('cat', 'dog'):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray((rng.random((40, 40, 3)) * 255).astype('uint8')).save(root / split / label / f'{i}.png')
    recipe = tmp_path_factory.mktemp('recipe') / 'tiny.yaml'
    recipe.write_text(yaml.safe_dump(dict(
        model='test_convnext', model_args=dict(num_classes=2), task='classification',
        data=dict(input_size=[32, 32], cache_dir=str(root.parent / 'hf-datasets')),
        train=dict(epochs=2, batch_size=8, lr=1e-3, seed=3, ema_decay=0.9, checkpoint_every=1, keep_checkpoints=3),
    )))
    return trainer.load_recipe(recipe), str(root)


@pytest.fixture(scope='module')
def stopped_run(tmp_path_factory, recipe_and_data):
    """A run stopped after 2 optimizer steps: checkpoints step_1 and step_2."""
    recipe, data = recipe_and_data
    out = tmp_path_factory.mktemp('run')
    trainer.train(recipe, out, data=data, exit_after_steps=2, quiet=True)
    return out


@pytest.fixture
def run(stopped_run, tmp_path):
    shutil.copytree(stopped_run, tmp_path / 'run')
    return tmp_path / 'run'


def _resume(run, recipe_and_data, **kwargs):
    """Resume and take one more step (then stop): the resumed-from folder is in the output."""
    recipe, data = recipe_and_data
    return trainer.train(recipe, run, data=data, resume=True, exit_after_steps=3, quiet=True, **kwargs)


class _Payload:
    """Pickles to a call that creates `marker`: what a hostile checkpoint file would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _plant(path, marker):
    torch.save({'state': _Payload(marker)}, path)


def _rewrite_manifest(folder):
    files = {p.name: dict(bytes=p.stat().st_size, sha256=sha256_file(p))
             for p in folder.iterdir() if p.name != trainer.MANIFEST_NAME}
    (folder / trainer.MANIFEST_NAME).write_text(json.dumps(dict(format=trainer.CHECKPOINT_FORMAT, files=files)))


def test_a_checkpoint_holds_no_file_that_needs_a_full_unpickler(stopped_run):
    folder = trainer.list_checkpoints(stopped_run)[-1]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ['ema.safetensors', 'manifest.json', 'model.safetensors', 'optimizer.bin',
                     'random_states_0.safetensors', 'trainer_state.json']
    manifest = trainer.verify_checkpoint(folder)
    assert sorted(manifest['files']) == [n for n in names if n != 'manifest.json']


def test_hostile_pickles_in_every_file_run_nothing_and_are_named(run, recipe_and_data, tmp_path):
    marker = tmp_path / 'ran'
    _plant(tmp_path / 'probe.bin', marker)
    torch.load(tmp_path / 'probe.bin', weights_only=False)  # the payload is real: a full unpickler runs it
    assert marker.exists()
    marker.rmdir()

    folder = trainer.list_checkpoints(run)[-1]
    for path in folder.iterdir():
        if path.name != trainer.MANIFEST_NAME:
            _plant(path, marker)
    with pytest.raises(CheckpointError, match='ema.safetensors'):  # the first file in the manifest fails its sha256
        _resume(run, recipe_and_data)
    _plant(folder / trainer.MANIFEST_NAME, marker)
    with pytest.raises(CheckpointError, match=f'{folder / trainer.MANIFEST_NAME} is not a zoo checkpoint manifest'):
        _resume(run, recipe_and_data)
    assert not marker.exists()

    # An attacker who also rewrites the manifest: each file is refused by name, still without running anything.
    for name in sorted(p.name for p in folder.iterdir()):
        single = tmp_path / f'single-{name}'
        shutil.copytree(trainer.list_checkpoints(run)[0], single)
        _plant(single / name, marker)
        if name != trainer.MANIFEST_NAME:
            _rewrite_manifest(single)
        with pytest.raises(CheckpointError, match=f'{single / name}'):
            trainer.verify_checkpoint(single)
        assert not marker.exists()


def test_truncated_random_states_stop_the_resume_by_name_unless_skipped(run, recipe_and_data, capsys):
    newest, older = trainer.list_checkpoints(run)[-1], trainer.list_checkpoints(run)[-2]
    rng = newest / 'random_states_0.safetensors'
    rng.write_bytes(rng.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f'{rng}.*--skip-damaged-checkpoints'):
        _resume(run, recipe_and_data)
    capsys.readouterr()
    _resume(run, recipe_and_data, skip_damaged_checkpoints=True)
    out = capsys.readouterr().out
    assert f'passing over {newest}' in out and f'resumed from {older} (step 1)' in out


def test_missing_and_unlisted_files_are_named(stopped_run, tmp_path):
    folder = tmp_path / 'step'
    shutil.copytree(trainer.list_checkpoints(stopped_run)[-1], folder)
    (folder / 'optimizer.bin').unlink()
    with pytest.raises(CheckpointError, match='optimizer.bin is missing'):
        trainer.verify_checkpoint(folder)
    shutil.copy(trainer.list_checkpoints(stopped_run)[-1] / 'optimizer.bin', folder)
    (folder / 'custom_checkpoint_0.pkl').write_bytes(b'x')
    with pytest.raises(CheckpointError, match='custom_checkpoint_0.pkl is not listed'):
        trainer.verify_checkpoint(folder)


def test_an_empty_or_unfinished_newest_checkpoint_is_passed_over(run, recipe_and_data, capsys):
    (run / 'checkpoints' / 'step_00000009').mkdir()
    unfinished = run / 'checkpoints' / 'step_00000008'
    shutil.copytree(trainer.list_checkpoints(run)[-2], unfinished)
    (unfinished / 'manifest.json').unlink()
    _resume(run, recipe_and_data)
    out = capsys.readouterr().out
    assert 'passing over' in out and 'step_00000009' in out and 'step_00000008' in out
    assert f'resumed from {run / "checkpoints" / "step_00000002"} (step 2)' in out


def test_resume_with_only_unfinished_checkpoints_refuses_to_start_afresh(tmp_path, recipe_and_data):
    (tmp_path / 'checkpoints' / 'step_00000001').mkdir(parents=True)
    with pytest.raises(CheckpointError, match='no complete checkpoint'):
        _resume(tmp_path, recipe_and_data)
