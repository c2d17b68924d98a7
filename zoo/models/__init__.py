"""One module per family; importing this package registers every zoo model with timm."""
import importlib
import pkgutil

FAMILIES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_')))

for _family in FAMILIES:
    importlib.import_module(f'{__name__}.{_family}')
