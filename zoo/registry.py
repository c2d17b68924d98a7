"""Which models the zoo registers, and errors for names it does not know."""
import difflib
import numbers
from typing import Any, Dict, List, Optional

import timm

from zoo.errors import InputError, UnknownModelError

# The zoo's name space in timm model names: `zoo/sparTAN_tiny` (any case; `zoo._namespace` teaches timm to read it).
PREFIX = 'zoo/'

# Constructor arguments shared by the zoo's models, with the least value each takes (a count, a size, a rate):
# a wrong type or a value out of range is refused when the model is built, not deep inside it.
_AT_LEAST_ONE = ('in_chans', 'img_size', 'dims', 'widths', 'embed_dim', 'num_heads', 'block_size', 'stem_chs',
                 'expand_ratios', 'mlp_ratio', 'output_stride')
_AT_LEAST_ZERO = ('num_classes', 'depths', 'depth', 'halo_size', 'final_chs')
_RATES = ('drop_rate', 'drop_path_rate', 'attn_drop_rate', 'proj_drop_rate', 'pos_drop_rate')


def strip_zoo_prefix(model_name: str) -> Optional[str]:
    """`zoo/sparTAN_tiny.in1k` -> `spartan_tiny.in1k`; None for a name outside the namespace."""
    if model_name[:len(PREFIX)].lower() != PREFIX:
        return None
    return model_name[len(PREFIX):].lower()


def registry_name(model_name: str) -> str:
    """The name timm's registry knows: `zoo/sparTAN_tiny` -> `spartan_tiny`; names outside `zoo/` unchanged."""
    return strip_zoo_prefix(model_name) or model_name


def is_zoo_model(model_name: str) -> bool:
    """True when `model_name` (`arch` or `arch.tag`, or either behind `zoo/`) is registered by a zoo family module."""
    arch = timm.models.split_model_name_tag(registry_name(model_name))[0]
    return timm.is_model(arch) and timm.models.model_entrypoint(arch).__module__.startswith(f'{__package__}.models.')


def list_models(pattern: str = '*', pretrained: bool = False) -> List[str]:
    """The zoo's model names matching a glob `pattern`; with `pretrained`, every `name.tag` with weights."""
    return [n for n in timm.list_models(pattern, pretrained=pretrained) if is_zoo_model(n)]


def check_model_args(variant: str, kwargs: Dict[str, Any]) -> None:
    """Refuse a count or size that is not an integer (or sequence of them) of at least its least value, and a
    drop rate outside [0, 1), naming the argument."""
    for name, value in kwargs.items():
        if value is None or name not in _AT_LEAST_ONE + _AT_LEAST_ZERO + _RATES:
            continue
        if name in _RATES:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise InputError(f'{variant}: {name} must be a number in [0, 1), got {value!r}')
            continue
        least = 1 if name in _AT_LEAST_ONE else 0
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least for v in items):
            each = ' (each)' if isinstance(value, (list, tuple)) else ''
            raise InputError(f'{variant}: {name} must be an integer >= {least}{each}, got {value!r}')


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
