"""What differs per task: outputs, losses, metrics, pre- and post-processing.

Dense models say their task in a `task` attribute ('depth', 'normals', 'segmentation'); `zoo predict`
hands them to `save_prediction`, which writes a picture a person can look at next to the input.
"""
import importlib
from pathlib import Path

import numpy as np
from PIL import Image

# 16-bit greyscale (depth maps, medical slices, frames), which convert('RGB') would clip at 255.
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')

_PICTURE_WRITERS = {
    'depth': ('zoo.tasks.depth', 'save_depth_picture'),
    'normals': ('zoo.tasks.depth', 'save_normals_picture'),
    'segmentation': ('zoo.tasks.segmentation', 'save_mask_overlay'),
}


def save_prediction(model, image, image_path: Path) -> Path:
    """Run a dense `model` on a PIL `image` and write `<stem>.<task>.png` beside `image_path`."""
    task = getattr(model, 'task', 'classification')
    if task not in _PICTURE_WRITERS:
        raise ValueError(f'no picture writer for task {task!r}; known: {", ".join(sorted(_PICTURE_WRITERS))}')
    module_name, function_name = _PICTURE_WRITERS[task]
    writer = getattr(importlib.import_module(module_name), function_name)
    out_path = Path(image_path).with_name(f'{Path(image_path).stem}.{task}.png')
    return writer(model, image, out_path)


def rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from a PIL image of any mode; 16-bit greyscale is scaled by its full range
    (65535), not clipped at 255."""
    if image.mode in SIXTEEN_BIT_MODES:
        return np.repeat(np.asarray(image, dtype=np.float32)[:, :, None] / 65535, 3, axis=2)
    return np.asarray(image.convert('RGB'), dtype=np.float32) / 255


def rgb_image(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image, as timm's transforms take; 16-bit greyscale is scaled by its full range, not clipped."""
    if image.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray(np.round(rgb_array(image) * 255).astype(np.uint8))
    return image.convert('RGB')
