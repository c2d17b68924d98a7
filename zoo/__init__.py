"""zoo: vision architectures from recent papers as timm models, with Hub weights and training recipes.

`import zoo` registers every zoo model with timm and makes `timm.create_model("zoo/<name>")` work.
"""
import timm

from zoo import _namespace
from zoo import models
from zoo.errors import ZooError
from zoo.registry import UnknownModelError, check_model_name, is_zoo_model, list_models

__version__ = '0.1.0'
__all__ = ['UnknownModelError', 'ZooError', 'create_model', 'is_zoo_model', 'list_models', 'models']

_namespace.install()


def create_model(model_name: str, pretrained: bool = False, **kwargs):
    """`timm.create_model` for zoo names (`spartan_tiny`, `zoo/spartan_tiny`, `spartan_tiny.in1k`)."""
    check_model_name(model_name)
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)
