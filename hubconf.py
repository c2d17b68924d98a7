"""torch.hub entry points: one per zoo model.

    model = torch.hub.load("<owner>/zoo", "spartan_tiny", pretrained=True)
    model = torch.hub.load("/path/to/zoo", "spartan_tiny", source="local", num_classes=10)

Each entry point takes `pretrained` and any `timm.create_model` keyword argument.
"""
from timm.models import model_entrypoint as _model_entrypoint

import zoo as _zoo

dependencies = ['torch', 'torchvision', 'timm', 'huggingface_hub', 'safetensors']


def _entry_point(name: str):
    def entry_point(pretrained: bool = False, **kwargs):
        return _zoo.create_model(name, pretrained=pretrained, **kwargs)

    registered_doc = (_model_entrypoint(name).__doc__ or name).strip()
    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = (
        f'{registered_doc}\n\n'
        f'Args:\n'
        f'    pretrained: load the default published weights ({name}.<tag> names another tag through\n'
        f'        timm.create_model).\n'
        f'    **kwargs: timm.create_model keyword arguments (num_classes, in_chans, drop_path_rate, ...).\n')
    return entry_point


globals().update({_name: _entry_point(_name) for _name in _zoo.list_models()})
