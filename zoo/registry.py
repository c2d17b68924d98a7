"""Which models the zoo registers, and errors for names it does not know."""
import difflib
from typing import List

import timm

from zoo._namespace import registry_name
from zoo.errors import UnknownModelError


def is_zoo_model(model_name: str) -> bool:
    """True when `model_name` (`arch` or `arch.tag`, or either behind `zoo/`) is registered by a zoo family module."""
    arch = timm.models.split_model_name_tag(registry_name(model_name))[0]
    return timm.is_model(arch) and timm.models.model_entrypoint(arch).__module__.startswith(f'{__package__}.models.')


def list_models(pattern: str = '*', pretrained: bool = False) -> List[str]:
    """The zoo's model names matching a glob `pattern`; with `pretrained`, every `name.tag` with weights."""
    return [n for n in timm.list_models(pattern, pretrained=pretrained) if is_zoo_model(n)]


def check_model_name(model_name: str) -> str:
    """Return the architecture of `model_name` (`arch`, `arch.tag`, or either behind `zoo/`), or raise with
    close suggestions."""
    model_name = registry_name(model_name)
    arch, tag = timm.models.split_model_name_tag(model_name)
    if not timm.is_model(arch):  # the zoo's own names first: timm's thousand others only when none is close
        close = difflib.get_close_matches(arch, list_models(), n=5, cutoff=0.6) or difflib.get_close_matches(
            arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f'; did you mean {", ".join(close)}?' if close else '; `zoo list` shows the zoo models'
        raise UnknownModelError(f'unknown model {model_name!r}{hint}')
    if tag:
        tags = [n.split('.', 1)[1] for n in timm.models.get_arch_pretrained_cfgs(arch)]
        if tag not in tags:
            raise UnknownModelError(f'{arch} has no pretrained tag {tag!r}; known tags: {", ".join(tags) or "none"}')
    return arch
