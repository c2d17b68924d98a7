"""`import zoo` loads what building and loading a model needs (torch, timm, huggingface_hub, safetensors), not the
extras: training, video, dense and transformers code is imported when it is used."""
import json
import subprocess
import sys

EXTRAS = ('accelerate', 'datasets', 'transformers', 'av', 'matplotlib', 'scipy', 'skimage', 'constriction',
          'pytorch_msssim')


def _loaded_after(statement: str) -> set:
    code = f'import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_import_zoo_loads_no_extra():
    """Measured against timm alone: an old torchvision (0.20) imports PyAV itself when it is installed."""
    baseline = _loaded_after('import timm, huggingface_hub, safetensors')
    loaded = _loaded_after('import zoo')
    assert 'zoo' in loaded
    assert sorted(m for m in loaded - baseline if m.split('.')[0] in EXTRAS) == []
