"""One module per family; importing this package registers every zoo model with timm.

Where timm already has the paper's model (ConViT, Inception, HaloNet H1) the zoo registers it again,
with zoo metadata, under the same name; timm's "Overwriting ... in registry" warning is expected there
and silenced for zoo modules only.
"""
import importlib
import pkgutil
import warnings

FAMILIES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_')))

with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message=r'Overwriting \S+ in registry with zoo\.models\.')
    for _family in FAMILIES:
        importlib.import_module(f'{__name__}.{_family}')
