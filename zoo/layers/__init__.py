"""Building blocks shared by two or more zoo families and absent from ``timm.layers``."""
from .device_dtype import takes_device_dtype
from .input_check import check_image_input, check_multiple_of, is_traced
from .ms_deform_attn import MSDeformAttn, ms_deform_attn_sample, multi_scale_reference_points

__all__ = [
    'MSDeformAttn', 'check_image_input', 'check_multiple_of', 'is_traced', 'ms_deform_attn_sample', 'multi_scale_reference_points',
    'takes_device_dtype',
]
