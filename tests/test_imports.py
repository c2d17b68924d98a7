"""`import zoo` loads what building and loading a model needs (torch, timm, huggingface_hub, safetensors), not the
extras: training, video, dense and transformers code is imported when it is used."""
import json
import subprocess
import sys

EXTRAS = ('accelerate', 'datasets', 'transformers', 'av', 'matplotlib', 'scipy', 'skimage', 'constriction',
          'pytorch_msssim')


def test_import_zoo_loads_no_extra():
    code = 'import sys, json, zoo; print(json.dumps(sorted(sys.modules)))'
    loaded = json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout)
    assert 'zoo' in loaded and 'timm' in loaded
    assert [m for m in loaded if m.split('.')[0] in EXTRAS] == []
