"""Every training recipe and Accelerate config can be run as written: it loads, names its source, builds its
model (on the meta device), its optimizer and its schedule, and its augmentation is one timm accepts (dense
recipes: a training crop the model takes, a known depth benchmark, a loss that builds)."""
from pathlib import Path

import pytest
import torch
from timm.data import create_transform, resolve_data_config

import zoo
from zoo.train import trainer
from zoo.train.classification import _MIX_KEYS
from zoo.tasks.depth import EVAL_SETTINGS
from zoo.tasks.video import fitting_loss

ROOT = Path(__file__).resolve().parents[1] / 'training'
RECIPES = sorted((ROOT / 'recipes').glob('*.yaml'))


def test_recipes_exist():
    assert len(RECIPES) >= 40


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: p.stem)
def test_recipe_builds(path):
    recipe = trainer.load_recipe(path)
    assert isinstance(recipe.get('source'), str) and len(recipe['source']) > 20, 'a recipe names its source'
    cfg = recipe['train']
    for key in ('lr', 'weight_decay', 'warmup_lr', 'min_lr'):
        assert isinstance(cfg[key], float) or cfg[key] == 0, f'train.{key} must be a number, got {cfg[key]!r}'
    assert cfg['mixed_precision'] in ('no', 'fp16', 'bf16')

    no_downloads = ('pretrained', 'pretrained_encoder', 'pretrained_backbones')  # ImageNet weights of dense models
    model_args = {k: v for k, v in recipe['model_args'].items() if k not in no_downloads}
    if recipe['task'] == 'video':
        model_args['num_frames'] = recipe['data'].get('max_frames') or 50
        fitting_loss(recipe.get('loss', 'l2'))
    with torch.device('meta'):
        model = zoo.create_model(recipe['model'], **model_args)
    # As zoo.train.trainer.train builds them: an lr_groups prefix that names no parameter raises here.
    optimizer, _, num_epochs = trainer.build_optimizer(cfg, model, updates_per_epoch=10)
    if cfg['lr_groups']:
        lrs = {round(cfg['lr'] * g['lr_scale'], 12) for g in optimizer.param_groups}
        assert lrs == {round(lr, 12) for lr in (cfg['lr'], *cfg['lr_groups'].values())}
    assert num_epochs == cfg['epochs'] + (cfg['warmup_epochs'] if cfg['warmup_prefix'] else 0)

    if recipe['task'] == 'classification':
        data_config = resolve_data_config(model=model)
        aug = {k: v for k, v in (recipe.get('aug') or {}).items() if k not in _MIX_KEYS}
        assert not set(aug) & set(data_config), 'interpolation / crop_pct / mean / std come from the model config'
        if recipe['data'].get('input_size'):
            data_config['input_size'] = (3, *recipe['data']['input_size'])
        create_transform(**data_config, is_training=True, **aug)
    elif recipe['task'] in ('depth', 'segmentation'):
        data = recipe['data']
        multiple = data.get('eval_multiple', 32)
        assert data.get('crop_size') and all(side % multiple == 0 for side in data['crop_size']), \
            f'the training crop must be a size the model takes (multiples of {multiple})'
        if recipe['task'] == 'depth':
            assert data.get('benchmark', 'nyu') in EVAL_SETTINGS and data.get('depth_scale'), 'depth caps and PNG scale'
        else:
            assert model.num_classes >= 2, 'segmentation needs a background and at least one class'
        trainer.task_module(recipe).make_loss(recipe, model)


@pytest.mark.parametrize('name', ['ddp', 'fsdp', 'deepspeed'])
def test_accelerate_config_loads(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / 'accelerate' / f'{name}.yaml'))
    assert config.num_machines == 1 and config.machine_rank == 0 and config.num_processes > 1
