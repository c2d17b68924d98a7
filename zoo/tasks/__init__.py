"""What differs per task: outputs, losses, metrics, pre- and post-processing.

Dense models say their task in a `task` attribute ('depth', 'normals', 'segmentation'); `zoo predict`
hands them to `save_prediction`, which writes a picture a person can look at next to the input.
"""
import importlib
from pathlib import Path

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
