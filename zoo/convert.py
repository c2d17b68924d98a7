"""Official checkpoints and constructor arguments -> zoo models.

Each family module `zoo.models.<family>` provides `create_from_official(**official_kwargs)`, the zoo
model that corresponds to the official constructor called with those keyword arguments (official
names), and `checkpoint_filter_fn(state_dict, model)`, which maps official keys onto it.
"""
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Union

import torch.nn as nn

from zoo.models import FAMILIES
from zoo.models._builder import load_state_dict_strict, mark_official, read_checkpoint


def family_module(family: str) -> ModuleType:
    """The module of a family that converts official checkpoints, or a clear error."""
    family = family.lower()
    if family not in FAMILIES:
        raise ValueError(f'unknown family {family!r}; families: {", ".join(FAMILIES)}')
    module = importlib.import_module(f'zoo.models.{family}')
    if not hasattr(module, 'create_from_official'):
        raise ValueError(f'family {family!r} has no official code to convert from (it was built from its paper)')
    return module


def from_official(family: str, state_dict: Dict[str, Any], **official_kwargs) -> nn.Module:
    """Build the zoo model for the official constructor called with `official_kwargs`, load the official
    `state_dict` strictly through the family's `checkpoint_filter_fn`, and return it in eval mode."""
    module = family_module(family)
    model = module.create_from_official(**official_kwargs)
    converted = module.checkpoint_filter_fn(state_dict, model)
    load_state_dict_strict(model, converted, source=f'official {family} checkpoint')
    return mark_official(model).eval()


def from_official_file(family: str, path: Union[str, Path], **official_kwargs) -> nn.Module:
    """`from_official` on a checkpoint file (.safetensors, or .pth read with `weights_only=True`); the model
    records the file's name and sha256, and the published release it is when the sha256 matches one."""
    model = from_official(family, read_checkpoint(path), **official_kwargs)
    return mark_official(model, path, getattr(family_module(family), 'WEIGHT_SHA256', None))
