"""Image classification for `zoo.train.trainer`: data through `datasets`, timm transforms, mixup/cutmix, top-1/top-5.

A recipe's `data` names a local image folder (`data_dir`, laid out `train/<class>/*` and `validation/<class>/*`,
read with `datasets`' `imagefolder`) or a Hub dataset id (`dataset`, e.g. `ILSVRC/imagenet-1k`), and may set
`input_size: [H, W]` to train at another resolution than the model's default. `aug` values override the
model's data config (`interpolation`, `crop_pct` and `crop_mode` apply to evaluation too). `aug` holds
timm's `create_transform` arguments plus `mixup`, `cutmix` and `label_smoothing`.
"""
import random
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from zoo.errors import InputError
from zoo.train.task import Task, eval_loader

_MIX_KEYS = ('mixup', 'cutmix', 'cutmix_minmax', 'mix_prob', 'mix_switch_prob', 'mix_mode', 'label_smoothing')
_SEQUENCE = (float, list)
DATA_SCHEMA = dict(
    data_dir=(str,), dataset=(str,), train_split=(str,), eval_split=(str,), image_column=(str,), label_column=(str,),
    input_size=(list,), cache_dir=(str,), load_args=(dict,))
# timm's create_transform arguments (less those the model's data config sets) and the mixup / smoothing keys.
AUG_SCHEMA = dict(
    scale=(list,), ratio=(list,), hflip=(float,), vflip=(float,), color_jitter=_SEQUENCE, color_jitter_prob=(float,),
    grayscale_prob=(float,), gaussian_blur_prob=(float,), auto_augment=(str,), interpolation=(str,),
    crop_pct=(float,), crop_mode=(str,), re_prob=(float,), re_mode=(str,), re_count=(int,), re_num_splits=(int,),
    train_crop_mode=(str,), mixup=(float,), cutmix=(float,), cutmix_minmax=(list,), mix_prob=(float,),
    mix_switch_prob=(float,), mix_mode=(str,), label_smoothing=(float,))


def load_image_dataset(spec: Dict[str, Any], data: Optional[str] = None):
    """The `datasets.DatasetDict` a recipe's `data` names; `data` (the --data option) overrides its location."""
    import datasets  # optional extra: train (slow to import, and needed only here)

    source = data or spec.get('data_dir') or spec.get('dataset')
    if not source:
        raise InputError('no data: give --data DIR (an image folder with train/ and validation/ class folders) '
                         'or set data.data_dir / data.dataset in the recipe')
    path = Path(source).expanduser()
    if path.exists() or data or spec.get('data_dir'):
        train_dir = path / spec.get('train_split', 'train')
        if not train_dir.is_dir() or not any(train_dir.iterdir()):
            raise InputError(
                f'no training images at {train_dir}: expected {path}/train/<class name>/<image> and '
                f'{path}/validation/<class name>/<image>')
        return datasets.load_dataset('imagefolder', data_dir=str(path), cache_dir=spec.get('cache_dir'))
    return datasets.load_dataset(source, cache_dir=spec.get('cache_dir'), **spec.get('load_args', {}))


def datasets(recipe: Dict[str, Any], model: torch.nn.Module, data: Optional[str] = None, output_dir=None):
    """(train set, eval set, collate function or None): `SeededAugmentation` over the dataset's splits."""
    spec = recipe['data']
    splits = load_image_dataset(spec, data)
    train_split, eval_split = spec.get('train_split', 'train'), spec.get('eval_split', 'validation')
    for split in (train_split, eval_split):
        if split not in splits:
            raise InputError(f'the dataset has splits {list(splits)}; the recipe needs {train_split!r} and {eval_split!r}')
    image_key, label_key = spec.get('image_column', 'image'), spec.get('label_column', 'label')
    num_labels = splits[train_split].features[label_key].num_classes
    if num_labels > model.num_classes:
        raise InputError(f'the data has {num_labels} classes but {recipe["model"]} has a {model.num_classes}-class head; '
                         f'set model_args.num_classes: {num_labels} in the recipe')
    data_config = resolve_data_config(model=model)
    if spec.get('input_size'):
        data_config['input_size'] = (3, *spec['input_size'])
    aug = {k: v for k, v in (recipe.get('aug') or {}).items() if k not in _MIX_KEYS}
    train_transform = create_transform(**{**data_config, **aug}, is_training=True)
    eval_config = {k: v for k, v in aug.items() if k in ('interpolation', 'crop_pct', 'crop_mode')}
    eval_data_config = {**data_config, **eval_config}
    eval_transform = create_transform(**eval_data_config, is_training=False)
    # The Hub folder says how the weights were evaluated, so `zoo validate`, `zoo predict` and the card feed them
    # the same size and preprocessing (a recipe's `input_size` would otherwise be lost with the run).
    cfg = {k: v for k, v in model.pretrained_cfg.items() if not (spec.get('input_size') and k.startswith('test_'))}
    model.pretrained_cfg = dict(cfg, **{k: eval_data_config[k] for k in ('input_size', 'interpolation', 'crop_pct',
                                                                         'crop_mode')})

    seed = recipe['train']['seed']
    train_set = SeededAugmentation(splits[train_split], train_transform, seed, image_key, label_key)
    eval_set = SeededAugmentation(splits[eval_split], eval_transform, seed, image_key, label_key)
    return train_set, eval_set, None


class SeededAugmentation(torch.utils.data.Dataset):
    """Samples transformed with random state that depends only on (seed, epoch, index).

    Accelerate's loader fetches one batch ahead, and loader workers each hold their own random state, so
    augmentation drawn from the global generators would depend on how the run was cut up. Seeding each sample
    makes a resumed, multi-worker or multi-process run see exactly the samples an uninterrupted one sees.
    """

    def __init__(self, dataset, transform: Callable, seed: int, image_key: str = 'image', label_key: str = 'label'):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.image_key, self.label_key = image_key, label_key
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        try:
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            torch.manual_seed(sample_seed)
            image = self.transform(sample[self.image_key].convert('RGB'))
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
            torch.set_rng_state(state[2])
        return image, sample[self.label_key]


def make_loss(recipe: Dict[str, Any], model: torch.nn.Module) -> Callable:
    """Cross-entropy with label smoothing, on mixup/cutmix soft targets when the recipe asks for them."""
    aug = recipe.get('aug') or {}
    smoothing = aug.get('label_smoothing', 0.0)
    mixup = None
    if aug.get('mixup', 0) > 0 or aug.get('cutmix', 0) > 0 or aug.get('cutmix_minmax') is not None:
        mixup = Mixup(
            mixup_alpha=aug.get('mixup', 0.0), cutmix_alpha=aug.get('cutmix', 0.0), cutmix_minmax=aug.get('cutmix_minmax'),
            prob=aug.get('mix_prob', 1.0), switch_prob=aug.get('mix_switch_prob', 0.5), mode=aug.get('mix_mode', 'batch'),
            label_smoothing=smoothing, num_classes=model.num_classes)
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = LabelSmoothingCrossEntropy(smoothing) if smoothing else torch.nn.CrossEntropyLoss()

    def loss_fn(model, batch):
        images, labels = batch
        if mixup is not None:
            images, labels = mixup(images, labels)
        return criterion(model(images), labels)
    return loss_fn


@torch.no_grad()
def evaluate(recipe: Dict[str, Any], model: torch.nn.Module, eval_set, accelerator) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and loss on the eval split, sharded over processes."""
    loader = eval_loader(eval_set, recipe['train']['batch_size'], accelerator)
    model = model.to(accelerator.device)
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for images, labels in loader:
        logits = model(images)
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(-1).sum().item()
        loss_sum += F.cross_entropy(logits.float(), labels, reduction='sum').item()
        total += labels.numel()
    return {'top1': 100.0 * correct1 / total, 'top5': 100.0 * correct5 / total, 'loss': loss_sum / total}


class Classification(Task):
    """Image classification: image folders or Hub datasets, timm augmentation, cross-entropy, top-1 / top-5."""
    data_schema, aug_schema = DATA_SCHEMA, AUG_SCHEMA
    best_metric = ('top1', 'max')

    datasets = staticmethod(datasets)
    make_loss = staticmethod(make_loss)
    evaluate = staticmethod(evaluate)

    def label_names(self, train_set):
        """The dataset's class names (an image folder's folder names, a Hub dataset's ClassLabel names)."""
        feature = train_set.dataset.features.get(train_set.label_key)
        return list(feature.names) if getattr(feature, 'names', None) else None
