"""Multi-scale deformable attention (Deformable DETR, Zhu et al., ICLR 2021) in plain PyTorch.

Each query attends to `n_points` locations per head and feature level, placed at learned offsets
around its reference point and read by bilinear interpolation (`F.grid_sample`, zero padding,
align_corners=False). It needs no compiled extension and runs on any device and dtype; its
numbers match the Deformable DETR CUDA op up to float summation order.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

from .input_check import is_traced

__all__ = ['MSDeformAttn', 'ms_deform_attn_sample', 'multi_scale_reference_points']


def ms_deform_attn_sample(
        value: torch.Tensor,
        spatial_shapes: List[Tuple[int, int]],
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples of `value` at `sampling_locations`.

    Args:
        value: (N, sum(H_l * W_l), heads, head_dim), the levels flattened row-major and concatenated.
        spatial_shapes: (H_l, W_l) of each level, in the order of `value`.
        sampling_locations: (N, Lq, heads, levels, points, 2), (x, y) in [0, 1] (pixel edges), may fall outside.
        attention_weights: (N, Lq, heads, levels, points).

    Returns:
        (N, Lq, heads * head_dim).
    """
    n, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = (2 * sampling_locations - 1).to(value.dtype)  # grid_sample's [-1, 1] coordinates
    samples = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (N, H*W, heads, D) -> (N*heads, D, H, W)
        level_value = values[level].permute(0, 2, 3, 1).reshape(n * heads, head_dim, h, w)
        # (N, Lq, heads, P, 2) -> (N*heads, Lq, P, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(
            level_value, level_grid, mode='bilinear', padding_mode='zeros', align_corners=False))
    # (N*heads, D, Lq, levels * points), weighted and summed over levels and points
    samples = torch.stack(samples, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, num_queries, levels * points)
    out = (samples * weights.to(samples.dtype)).sum(-1)
    return out.view(n, heads * head_dim, num_queries).transpose(1, 2)


@register_notrace_function  # reason: builds a tensor from the level sizes, Proxy ints under FX
def _level_sizes(spatial_shapes: List[Tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
    """(W_l, H_l) of each level, shaped (levels, 1, 2) to divide (..., levels, points, 2) offsets, as `like`."""
    return torch.tensor([[w, h] for h, w in spatial_shapes], dtype=like.dtype, device=like.device)[:, None]


def multi_scale_reference_points(
        spatial_shapes: List[Tuple[int, int]],
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pixel centres of every level, normalised to [0, 1] as (x, y): shape (1, sum(H_l * W_l), 1, 2)."""
    points = []
    for h, w in spatial_shapes:
        y = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(y, x, indexing='ij')
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), -1))
    return torch.cat(points, 0)[None, :, None]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention, with the Deformable DETR parameter layout.

    `sampling_offsets` has heads * levels * points * 2 outputs laid out as (head, level, point, xy);
    offsets are in pixels of their level. The softmax runs jointly over levels and points, per head.
    """

    def __init__(self, dim: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f'dim ({dim}) must be divisible by n_heads ({n_heads})')
        self.dim = dim
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(dim, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR init: offsets start on a ring of directions, one per head, at 1..P pixels."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = directions.view(self.n_heads, 1, 1, 2) * steps
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    @torch.jit.unused
    def _check_levels(self, value: torch.Tensor, spatial_shapes: List[Tuple[int, int]]) -> None:
        if len(spatial_shapes) != self.n_levels:
            raise ValueError(f'expected {self.n_levels} feature levels, got {len(spatial_shapes)}')
        if sum(h * w for h, w in spatial_shapes) != value.shape[1]:
            raise ValueError(f'value has {value.shape[1]} positions, but the levels {spatial_shapes} hold '
                             f'{sum(h * w for h, w in spatial_shapes)}')

    def forward(
            self,
            query: torch.Tensor,
            reference_points: torch.Tensor,
            value: torch.Tensor,
            spatial_shapes: List[Tuple[int, int]],
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, dim).
            reference_points: (N or 1, Lq, levels, 2), (x, y) in [0, 1].
            value: (N, sum(H_l * W_l), dim), the levels flattened row-major and concatenated.
            spatial_shapes: (H_l, W_l) of each level.
        """
        n, num_queries, _ = query.shape
        if not torch.jit.is_scripting():  # eager only: TorchScript skips this block, FX / export skip the check
            if not is_traced(value):
                self._check_levels(value, spatial_shapes)
        value = self.value_proj(value).view(n, value.shape[1], self.n_heads, self.dim // self.n_heads)
        offsets = self.sampling_offsets(query).view(
            n, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, num_queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, num_queries, self.n_heads, self.n_levels, self.n_points)
        locations = reference_points[:, :, None, :, None, :] + offsets / _level_sizes(spatial_shapes, offsets)
        return self.output_proj(ms_deform_attn_sample(value, spatial_shapes, locations, weights))
