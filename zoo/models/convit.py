"""ConViT: vision transformers with gated positional self-attention (GPSA).

Paper: "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases", d'Ascoli et al.,
ICML 2021 (https://arxiv.org/abs/2103.10697). Official code (Apache-2.0): https://github.com/facebookresearch/convit.

timm already has the paper's model (`timm.models.convit`) and the Ti/S/B weights, so the zoo reuses its
classes as they are and only adds what timm lacks: gradient checkpointing and clear input errors. The
zoo names `convit_tiny/small/base` replace timm's registrations (same weights, same outputs) and
`convit_tiny_plus/small_plus/base_plus` add the paper's wider "+" models (64 channels per head, Table 1),
which have no released weights.

Layout (paper Sec. 3): patch embedding plus a learned absolute position embedding (patch tokens only),
10 GPSA blocks, the class token concatenated, 2 plain self-attention blocks, final LayerNorm, class-token head.
"""
import math
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed, to_2tuple
from timm.models import checkpoint, register_model
from timm.models import convit as timm_convit
from timm.models._features import feature_take_indices

from zoo.layers import check_image_input, is_traced
from zoo.metadata import paper, zoo_cfgs
from zoo.models._builder import build_zoo_model

__all__ = ['ConVit']


class ConVit(timm_convit.ConVit):
    """timm's ConViT, plus gradient checkpointing and input checks.

    Args are those of `timm.models.convit.ConVit`; note that `embed_dim` is the width per head (48 in the
    paper's Ti/S/B, 64 in the "+" models), multiplied by `num_heads` inside.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_checkpointing = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self.in_chans, max(self.patch_embed.patch_size))
        if not torch.jit.is_scripting():  # eager only: TorchScript skips this block, FX / export skip the check
            size = self.patch_embed.img_size
            if not is_traced(x) and self.patch_embed.strict_img_size and tuple(x.shape[-2:]) != tuple(size):
                raise ValueError(
                    f'ConViT position embeddings are fixed at {size[0]}x{size[1]} images, got '
                    f'{x.shape[-2]}x{x.shape[-1]}; build the model with img_size=({x.shape[-2]}, {x.shape[-1]}) '
                    '(the embedding is resampled on load)')

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.use_pos_embed:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def _prepend_cls_token(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Before block `index`: the class token joins where the GPSA blocks end."""
        if index == self.local_up_to_layer and self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that also returns the patch tokens after the selected blocks.

        Args:
            x: Input image batch.
            indices: Take the last n blocks if int, all if None, these blocks if a sequence.
            norm: Apply the final norm to the intermediates.
            stop_early: Stop after the last requested block.
            output_fmt: 'NCHW' (patch grid) or 'NLC' (tokens); the class token is left out.
            intermediates_only: Return only the intermediate features.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"ConViT features are 'NCHW' or 'NLC', got output_fmt={output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        B, _, height, width = x.shape
        x = self._embed(x)
        intermediates = []
        for i, block in enumerate(blocks):  # enumerate, not indexing: TorchScript indexes modules by literals only
            x = self._prepend_cls_token(i, x)
            x = checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(y[:, 1:] if i >= self.local_up_to_layer and self.cls_token is not None else y)
        if output_fmt == 'NCHW':
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self._embed(x)
        for i, block in enumerate(self.blocks):
            x = self._prepend_cls_token(i, x)
            x = checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)
        return self.norm(x)


def create_from_official(
        embed_dim: int = 48,
        num_heads: int = 12,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.,
        global_pool: Optional[str] = None,
        norm_layer: Callable = nn.LayerNorm,
        local_up_to_layer: int = 10,
        **kwargs,
) -> ConVit:
    """The zoo ConViT for the official `VisionTransformer(**kwargs)` call.

    The official class takes the total width (its factories multiply 48 or 64 by `num_heads`), applies
    `drop_rate` to the token and projection dropouts and has no head dropout; the zoo/timm class takes the
    width per head and splits those rates.
    """
    if embed_dim % num_heads:
        raise ValueError(f'embed_dim ({embed_dim}) is the total width and must be divisible by num_heads ({num_heads})')
    if qk_scale is not None and qk_scale != (embed_dim // num_heads) ** -0.5:
        raise ValueError(f'qk_scale={qk_scale} is not supported: the zoo ConViT scales attention by head_dim ** -0.5')
    if global_pool not in (None, 'token'):
        raise ValueError(f'the official ConViT pools the class token; global_pool={global_pool!r} has no equivalent')
    model = ConVit(
        embed_dim=embed_dim // num_heads,
        num_heads=num_heads,
        pos_drop_rate=drop_rate,
        proj_drop_rate=drop_rate,
        norm_layer=norm_layer,
        local_up_to_layer=local_up_to_layer,
        **kwargs,
    )
    return model


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: ConVit) -> Dict[str, torch.Tensor]:
    """Accept an official ConViT checkpoint (raw or under `model`) or a timm/zoo one: the key names agree. A
    position table made for another image size is resampled (bicubic) to the model's patch grid."""
    if 'model' in state_dict and isinstance(state_dict['model'], dict):
        state_dict = state_dict['model']
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    if 'patch_embed.proj.weight' not in state_dict or 'blocks.0.attn.gating_param' not in state_dict:
        raise ValueError(
            'not a ConViT checkpoint: expected patch_embed.*, blocks.*.attn.{qk,v,pos_proj,gating_param}, norm.*, '
            f'head.*; its first keys are {list(state_dict)[:5]}')
    pos_embed = state_dict.get('pos_embed')
    if pos_embed is not None and model.use_pos_embed and pos_embed.shape != model.pos_embed.shape:
        # weights for another image size (224 px for the published ones): resample the table to this grid
        side = math.isqrt(pos_embed.shape[1])
        if side * side != pos_embed.shape[1]:
            raise ValueError(
                f'the checkpoint position table has {pos_embed.shape[1]} patches, not a square grid, so its image '
                'size is unknown; build the model with the img_size it was trained at')
        grid = list(model.patch_embed.grid_size)
        state_dict['pos_embed'] = resample_abs_pos_embed(pos_embed, new_size=grid, num_prefix_tokens=0)
    return state_dict


def _create_convit(variant: str, pretrained: bool = False, **kwargs) -> ConVit:
    out_indices = kwargs.pop('out_indices', 3)
    if kwargs.get('img_size') is not None:
        # The position table fixes the input size, so the cfg says which: data configs, cards and a saved
        # config (which rebuilds the model at this size) read it there.
        size = to_2tuple(kwargs['img_size'])
        overlay = kwargs.pop('pretrained_cfg_overlay', None) or {}
        kwargs['pretrained_cfg_overlay'] = {**overlay, 'input_size': (kwargs.get('in_chans', 3), *size)}
    return build_zoo_model(
        ConVit,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2103.10697',
        'paper_name': 'ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases',
        'origin_url': 'https://github.com/facebookresearch/convit',
        **kwargs,
    }


def _meta(name: str, params_m: float, gmacs: float, top1: float, top5: float, **kwargs) -> Dict:
    """Params (M), GMACs at 224, the recipe, and paper Table 1's ImageNet-1k top-1 / top-5 (%)."""
    return dict(params_m=params_m, gmacs=gmacs, recipe=f'training/recipes/{name}.yaml',
                paper=[paper('ImageNet-1k', 'arXiv:2103.10697 Table 1', top1=top1, top5=top5)], **kwargs)


def _timm_weights(name: str, top1: str, meta: Dict) -> Dict:
    measured = dict(task='image-classification', dataset='ImageNet-1k', split='val', metrics={'top1': float(top1)},
                    protocol={'input': 224, 'crop_pct': 0.875, 'interpolation': 'bicubic'},
                    by='timm (PR #653, when the weights were ported)')
    return _cfg(
        meta=dict(meta, measured=[measured]),
        hf_hub_id=f'timm/{name}.fb_in1k',
        description=(
            f'The authors\' ImageNet-1k weights in timm\'s copy ({top1} top-1 when timm ported them, PR #653); '
            'the checkpoint layout is the official one.'),
    )


def _untrained(name: str, meta: Dict) -> Dict:
    return _cfg(
        meta=meta,
        description=f'The paper\'s {name} architecture; no weights were released, so there are none here.',
        notes=('Untrained: `pretrained=True` has nothing to load.',),
    )


default_cfgs = zoo_cfgs({
    'convit_tiny.fb_in1k': _timm_weights('convit_tiny', '73.116', _meta('convit_tiny', 5.71, 1.25, 73.1, 91.7)),
    'convit_small.fb_in1k': _timm_weights('convit_small', '81.418', _meta('convit_small', 27.78, 5.75, 81.3, 95.7)),
    'convit_base.fb_in1k': _timm_weights('convit_base', '82.288', _meta('convit_base', 86.54, 17.51, 82.4, 95.9)),
    'convit_tiny_plus.untrained': _untrained('ConViT-Ti+', _meta('convit_tiny_plus', 9.97, 2.13, 76.7, 93.6)),
    'convit_small_plus.untrained': _untrained('ConViT-S+', _meta('convit_small_plus', 48.98, 10.0, 82.2, 95.9)),
    'convit_base_plus.untrained': _untrained('ConViT-B+', _meta('convit_base_plus', 153.13, 30.74, 82.5, 95.9)),
})

card_info = dict(
    intended_use=(
        'ImageNet-1k classification at 224 px and a backbone for features (`features_only=True` gives the patch '
        'grids of the last blocks, stride 16). Ti/S/B carry the authors\' weights; Ti+/S+/B+ are for training.'),
    limitations=(
        'The position embedding fixes the input size (224 px unless built with another img_size). Ti/S/B are '
        'timm\'s implementation and weights, checked equal to timm\'s own class; the "+" models are the same code '
        'with 64 channels per head as in paper Table 1, with no released weights. Gradient checkpointing is a zoo '
        'addition (per block).'),
    variants={
        'convit_tiny': 'ConViT-Ti: 4 heads x 48 = 192 wide, 12 blocks (10 GPSA), 6M params (5.71M), 1G FLOPs, 73.1 top-1',
        'convit_small': 'ConViT-S: 9 heads x 48 = 432 wide, 12 blocks (10 GPSA), 27M params (27.78M), 5.4G FLOPs, 81.3 top-1',
        'convit_base': 'ConViT-B: 16 heads x 48 = 768 wide, 12 blocks (10 GPSA), 86M params (86.54M), 17G FLOPs, 82.4 top-1',
        'convit_tiny_plus': 'ConViT-Ti+: 4 heads x 64 = 256 wide, 12 blocks (10 GPSA), 10M params (9.97M), 2G FLOPs, 76.7 top-1',
        'convit_small_plus': 'ConViT-S+: 9 heads x 64 = 576 wide, 12 blocks (10 GPSA), 48M params (48.98M), 10G FLOPs, 82.2 top-1',
        'convit_base_plus': 'ConViT-B+: 16 heads x 64 = 1024 wide, 12 blocks (10 GPSA), 152M params (153.13M), 30G FLOPs, 82.5 top-1',
    },
)


def _convit(variant: str, pretrained: bool, num_heads: int, head_dim: int, **kwargs) -> ConVit:
    model_args = dict(local_up_to_layer=10, locality_strength=1.0, embed_dim=head_dim, num_heads=num_heads)
    return _create_convit(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convit_tiny(pretrained: bool = False, **kwargs) -> ConVit:
    """ConViT-Ti (4 heads x 48), timm's weights."""
    return _convit('convit_tiny', pretrained, num_heads=4, head_dim=48, **kwargs)


@register_model
def convit_small(pretrained: bool = False, **kwargs) -> ConVit:
    """ConViT-S (9 heads x 48), timm's weights."""
    return _convit('convit_small', pretrained, num_heads=9, head_dim=48, **kwargs)


@register_model
def convit_base(pretrained: bool = False, **kwargs) -> ConVit:
    """ConViT-B (16 heads x 48), timm's weights."""
    return _convit('convit_base', pretrained, num_heads=16, head_dim=48, **kwargs)


@register_model
def convit_tiny_plus(pretrained: bool = False, **kwargs) -> ConVit:
    """ConViT-Ti+ (4 heads x 64), paper Table 1; no weights."""
    return _convit('convit_tiny_plus', pretrained, num_heads=4, head_dim=64, **kwargs)


@register_model
def convit_small_plus(pretrained: bool = False, **kwargs) -> ConVit:
    """ConViT-S+ (9 heads x 64), paper Table 1; no weights."""
    return _convit('convit_small_plus', pretrained, num_heads=9, head_dim=64, **kwargs)


@register_model
def convit_base_plus(pretrained: bool = False, **kwargs) -> ConVit:
    """ConViT-B+ (16 heads x 64), paper Table 1; no weights."""
    return _convit('convit_base_plus', pretrained, num_heads=16, head_dim=64, **kwargs)
