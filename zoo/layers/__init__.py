"""Building blocks shared by two or more zoo families and absent from ``timm.layers``."""
from .input_check import check_image_input

__all__ = ['check_image_input']
