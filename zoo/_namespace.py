"""The `zoo/` model-name namespace for timm: `timm.create_model("zoo/spartan_tiny")`.

timm 1.0.31 rejects a plain name containing a slash (it looks like a Hub repo id), while timm <= 1.0.28
silently dropped everything before the slash. Both are wrong for us, so `import zoo` wraps the one
function timm uses to split a model name into (source, id): names that start with `zoo/` (any case)
become the lower-cased zoo registry name (`zoo.registry.strip_zoo_prefix`), and every other name goes to
timm's own parser unchanged.
"""
from typing import Callable, Optional, Tuple

import timm.models._factory as _factory

from zoo.registry import check_model_name, strip_zoo_prefix


def _wrap(parse: Callable[[str], Tuple[Optional[str], str]]) -> Callable[[str], Tuple[Optional[str], str]]:
    def parse_model_name(model_name: str) -> Tuple[Optional[str], str]:
        name = strip_zoo_prefix(model_name)
        if name is None:
            return parse(model_name)
        check_model_name(name)
        return None, name

    parse_model_name.__wrapped__ = parse
    parse_model_name.__doc__ = parse.__doc__
    return parse_model_name


def install() -> None:
    """Wrap timm's `parse_model_name` once (importing zoo twice, or reloading it, wraps nothing more)."""
    if not hasattr(_factory.parse_model_name, '__wrapped__'):
        _factory.parse_model_name = _wrap(_factory.parse_model_name)
