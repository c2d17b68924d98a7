"""What differs per task, as library code the command line, `zoo validate`, the training plug-ins
(`zoo.train`) and users call: losses, metrics, pre- and post-processing, pictures (`depth`, `segmentation`,
`video`), and what they share (below).

Dense models say their task in a `task` attribute ('depth', 'normals', 'segmentation'); `zoo predict`
hands them to `save_prediction`, which writes a picture a person can look at next to the input.
"""
import importlib
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from zoo._io import write_atomically

# Every dense zoo model's deepest feature map is at stride 32: its input sides must be multiples of 32.
DENSE_STRIDE = 32
# 16-bit greyscale (depth maps, medical slices, frames), which convert('RGB') would clip at 255.
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')

_PICTURE_WRITERS = {
    'depth': ('zoo.tasks.depth', 'save_depth_picture'),
    'normals': ('zoo.tasks.depth', 'save_normals_picture'),
    'segmentation': ('zoo.tasks.segmentation', 'save_mask_overlay'),
}


def padded_size(height: int, width: int, stride: int = DENSE_STRIDE) -> Tuple[int, int]:
    """The smallest size at or above (height, width) whose sides are multiples of `stride`."""
    return -(-height // stride) * stride, -(-width // stride) * stride


@torch.no_grad()
def predict_padded(model, x: torch.Tensor) -> torch.Tensor:
    """A dense model's output for a batch (B, C, H, W) of any size, as float on the CPU: the batch is padded at
    the bottom and right (edge pixels repeated) to sides that are multiples of `DENSE_STRIDE`, and the output
    cropped back to H x W. Every `zoo predict` picture goes through here, so all dense models see an image the
    same way: at its own size, never resized."""
    height, width = x.shape[-2:]
    padded_height, padded_width = padded_size(height, width)
    x = F.pad(x, (0, padded_width - width, 0, padded_height - height), mode='replicate')
    return model.eval()(x)[..., :height, :width].float().cpu()


def figure(height: int, width: int, extra_width: float = 0.2, extra_height: float = 0.2):
    """A matplotlib Figure for an (height, width) picture, shown at least 256 px tall at its aspect, with
    `extra_width` / `extra_height` inches for its key (colour bar, legend, labels)."""
    from matplotlib.figure import Figure  # slow to import and needed only to draw: `import zoo` never loads it

    scale = max(1., 256 / height) / 100  # inches per pixel at 100 dpi
    return Figure(figsize=(width * scale + extra_width, height * scale + extra_height), dpi=100, layout='constrained')


def save_figure(fig, path) -> Path:
    """Write a Figure as PNG, atomically (a failure leaves any old file in place)."""
    return write_atomically(path, lambda f: fig.savefig(f, format='png'))


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


def per_channel(values, channels: int) -> torch.Tensor:
    """A cfg mean / std for `channels` channels (one value is repeated, others averaged down to one)."""
    values = torch.tensor(values, dtype=torch.float32).reshape(-1)
    if values.numel() != channels:
        values = values.mean().expand(channels)
    return values


def image_to_input(image: Image.Image, mean, std, in_chans: int = 3) -> torch.Tensor:
    """A PIL image as a model input (C, H, W) at its own size: RGB (grey for `in_chans=1`) scaled to [0, 1], then
    normalised with the cfg's `mean` and `std` (see `per_channel`). The one conversion `zoo predict`'s dense
    pictures and the dense training data share."""
    pixels = np.asarray(image.convert('L' if in_chans == 1 else 'RGB'), dtype=np.float32) / 255.
    x = torch.from_numpy(pixels).reshape(image.height, image.width, in_chans).permute(2, 0, 1)
    return (x - per_channel(mean, in_chans).view(-1, 1, 1)) / per_channel(std, in_chans).view(-1, 1, 1)
