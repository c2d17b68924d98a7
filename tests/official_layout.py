"""Official-layout state dicts for full-size models, made from zoo weights and an official manifest.

The reference fixtures hold official weights for reduced configs only. A manifest lists every official
key and shape of a full-size variant; passing placeholder tensors of those shapes through the family's
`checkpoint_filter_fn` (which keeps key order) pairs each official key with its zoo key, and that
pairing turns any zoo state dict back into the official layout.
"""
import json
from pathlib import Path
from typing import Dict

import torch

FIXTURES = Path(__file__).parent / 'fixtures'


def load_manifest(family: str, name: str) -> Dict:
    return json.loads((FIXTURES / family / 'manifests' / f'{name}.json').read_text())


def placeholder_state_dict(manifest: Dict) -> Dict[str, torch.Tensor]:
    """Empty tensors with the manifest's official keys and shapes (int64 for BN step counters)."""
    return {
        k: torch.empty(shape, dtype=torch.long if k.endswith('num_batches_tracked') else torch.float32)
        for k, shape in manifest['state_dict'].items()
    }


def to_official_layout(zoo_state_dict: Dict[str, torch.Tensor], model, filter_fn, manifest: Dict) -> Dict[str, torch.Tensor]:
    """`zoo_state_dict` renamed and reshaped to the official keys of `manifest`."""
    placeholders = placeholder_state_dict(manifest)
    zoo_keys = list(filter_fn(placeholders, model))
    assert len(zoo_keys) == len(placeholders), 'the filter must map official keys one to one'
    return {
        official_key: zoo_state_dict[zoo_key].reshape(placeholders[official_key].shape).clone()
        for official_key, zoo_key in zip(placeholders, zoo_keys)
    }


def quantized_bunny_release(manifest: Dict) -> Dict:
    """A quant_vid.pth-shaped release for the full Bunny model: every decoder weight dequantizes to
    -0.5 + 0.25 * 3 = 0.25, the 132 embeddings to 0.01 * a random uint8."""
    return {'embed': {'quant': torch.randint(0, 256, (132, 16, 2, 4), dtype=torch.uint8),
                      'min': torch.zeros(1, 16, 2, 4).half(), 'scale': torch.full((1, 16, 2, 4), 0.01).half()},
            'model': {k: {'quant': torch.full(shape, 3, dtype=torch.uint8), 'min': torch.tensor(-0.5),
                          'scale': torch.tensor(0.25)}
                      for k, shape in manifest['state_dict'].items() if not k.startswith('encoder.')}}
