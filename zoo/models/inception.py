"""Inception-v4, Inception-ResNet-v1 and Inception-ResNet-v2.

Paper: "Inception-v4, Inception-ResNet and the Impact of Residual Connections on Learning", Szegedy, Ioffe,
Vanhoucke, Alemi, AAAI 2017 (https://arxiv.org/abs/1602.07261). Official code and weights (Apache-2.0):
TensorFlow-Slim, https://github.com/tensorflow/models/tree/master/research/slim/nets.

* `inception_v4`, `inception_resnet_v2`: timm's implementations (the TF-slim layout, which for
  Inception-ResNet-v2 differs from the paper's figures) with Google's weights as timm publishes them. The zoo
  subclasses only add gradient checkpointing and input checks; outputs are timm's.
* `inception_resnet_v1`: the paper's Inception-ResNet-v1 (Figs. 10-15): the Fig. 14 stem, 5 x Inception-ResNet-A,
  Reduction-A with k, l, m, n = 192, 192, 256, 384, 10 x B, Reduction-B, 5 x C, scaled residuals. No
  weights were ever released for it.
* `inception_resnet_v2_paper`: Inception-ResNet-v2 as the paper draws it (Inception-v4 stem, 5/10/5 blocks,
  Figs. 16-19), next to the TF-slim layout that the weights use. No weights.

Every conv is Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU as in timm; VALID convs have no padding. A
residual block concatenates its branches, projects them back with a linear 1x1 conv (bias, no BN), scales
the result, adds it to the input, then applies ReLU.
"""
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import ConvNormAct, create_classifier, get_device_dtype
from timm.models import checkpoint_seq, register_model, register_model_deprecations
from timm.models._features import feature_take_indices
from timm.models.inception_resnet_v2 import InceptionResnetV2 as TimmInceptionResnetV2
from timm.models.inception_v4 import InceptionV4 as TimmInceptionV4, Mixed3a, Mixed4a, Mixed5a

from zoo.layers import check_image_input, takes_device_dtype
from zoo.metadata import paper, zoo_cfgs
from zoo.models._builder import build_zoo_model

__all__ = ['InceptionV4', 'InceptionResnetV2', 'InceptionResnet']

# the smallest image every VALID conv and pool of these nets accepts (75 -> 37 -> 35 -> 17 -> 15 -> 7 -> 3 -> 1)
MIN_INPUT_SIZE = 75


class _TimmInceptionAdditions:
    """What the zoo adds to timm's Inception classes: a gradient-checkpointing switch and input checks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_checkpointing = False  # an instance attribute: TorchScript does not see class attributes

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


class InceptionV4(_TimmInceptionAdditions, TimmInceptionV4):
    """timm's Inception-v4, plus gradient checkpointing and input checks."""

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's forward_intermediates after the input check, written out because TorchScript (timm's
        FeatureGetterNet is scriptable for Inception-v4) cannot compile `super()`."""
        check_image_input(x, self.in_chans, 75)  # MIN_INPUT_SIZE: TorchScript takes no global ints
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_indices = [self.stage_ends[i] for i in take_indices]
        max_index = self.stage_ends[max_index]
        if torch.jit.is_scripting() or not stop_early:  # an if statement: TorchScript cannot slice modules
            stages = self.features
        else:
            stages = self.features[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_chans, 75)  # MIN_INPUT_SIZE: TorchScript takes no global ints
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        return self.features(x)


def _run_layers(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run `model.layer_names` in order, checkpointing the block repeats (eager only: TorchScript cannot
    compile a module argument or `getattr` by a variable name)."""
    for name in model.layer_names:
        layer = getattr(model, name)
        x = checkpoint_seq(layer, x) if isinstance(layer, nn.Sequential) else layer(x)
    return x


class InceptionResnetV2(_TimmInceptionAdditions, TimmInceptionResnetV2):
    """timm's Inception-ResNet-v2 (TF-slim layout), plus gradient checkpointing and input checks."""

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """timm's, after the input check (timm's walks `layer_names` with getattr: eager only, as in timm)."""
        check_image_input(x, self.in_chans, 75)  # MIN_INPUT_SIZE: TorchScript takes no global ints
        return super().forward_intermediates(x, *args, **kwargs)

    def _forward_layers(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward_features: `layer_names` written out, as TorchScript needs them (literal names only)."""
        x = self.maxpool_3a(self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x))))
        x = self.mixed_5b(self.maxpool_5a(self.conv2d_4a(self.conv2d_3b(x))))
        x = self.mixed_7a(self.repeat_1(self.mixed_6a(self.repeat(x))))
        return self.conv2d_7b(self.block8(self.repeat_2(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_chans, 75)  # MIN_INPUT_SIZE: TorchScript takes no global ints
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return _run_layers(self, x)
        return self._forward_layers(x)


class BlockA(nn.Module):
    """Inception-ResNet-A (35x35): 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3, linear 1x1 back to `dim`."""

    def __init__(
            self,
            dim: int,
            widths: Tuple[int, Sequence[int], Sequence[int]],
            scale: float,
            conv_block: Callable[..., nn.Module],
    ):
        super().__init__()
        w0, w1, w2 = widths
        self.scale = scale
        self.branch0 = conv_block(dim, w0, kernel_size=1)
        self.branch1 = nn.Sequential(
            conv_block(dim, w1[0], kernel_size=1),
            conv_block(w1[0], w1[1], kernel_size=3, padding=1),
        )
        self.branch2 = nn.Sequential(
            conv_block(dim, w2[0], kernel_size=1),
            conv_block(w2[0], w2[1], kernel_size=3, padding=1),
            conv_block(w2[1], w2[2], kernel_size=3, padding=1),
        )
        self.conv2d = nn.Conv2d(w0 + w1[1] + w2[2], dim, kernel_size=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)
        return self.act(self.conv2d(out) * self.scale + x)


class BlockBC(nn.Module):
    """Inception-ResNet-B (17x17, k=7) or -C (8x8, k=3): 1x1 | 1x1 -> 1xk -> kx1, linear 1x1 back to `dim`."""

    def __init__(
            self,
            dim: int,
            widths: Tuple[int, Sequence[int]],
            kernel_size: int,
            scale: float,
            conv_block: Callable[..., nn.Module],
    ):
        super().__init__()
        w0, w1 = widths
        self.scale = scale
        self.branch0 = conv_block(dim, w0, kernel_size=1)
        self.branch1 = nn.Sequential(
            conv_block(dim, w1[0], kernel_size=1),
            conv_block(w1[0], w1[1], kernel_size=(1, kernel_size), padding=(0, kernel_size // 2)),
            conv_block(w1[1], w1[2], kernel_size=(kernel_size, 1), padding=(kernel_size // 2, 0)),
        )
        self.conv2d = nn.Conv2d(w0 + w1[2], dim, kernel_size=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x)), 1)
        return self.act(self.conv2d(out) * self.scale + x)


class ReductionA(nn.Module):
    """Reduction-A (35 -> 17, paper Fig. 7): 3x3/2 n V | 1x1 k -> 3x3 l -> 3x3/2 m V | max-pool 3/2 V."""

    def __init__(self, dim: int, k: int, l: int, m: int, n: int, conv_block: Callable[..., nn.Module]):
        super().__init__()
        self.branch0 = conv_block(dim, n, kernel_size=3, stride=2)
        self.branch1 = nn.Sequential(
            conv_block(dim, k, kernel_size=1),
            conv_block(k, l, kernel_size=3, padding=1),
            conv_block(l, m, kernel_size=3, stride=2),
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)
        self.out_chs = dim + n + m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class ReductionB(nn.Module):
    """Reduction-B (17 -> 8, paper Figs. 12/18): three conv branches ending in 3x3/2 V convs | max-pool 3/2 V."""

    def __init__(self, dim: int, widths: Sequence[Sequence[int]], conv_block: Callable[..., nn.Module]):
        super().__init__()
        w0, w1, w2 = widths
        self.branch0 = nn.Sequential(
            conv_block(dim, w0[0], kernel_size=1),
            conv_block(w0[0], w0[1], kernel_size=3, stride=2),
        )
        self.branch1 = nn.Sequential(
            conv_block(dim, w1[0], kernel_size=1),
            conv_block(w1[0], w1[1], kernel_size=3, stride=2),
        )
        self.branch2 = nn.Sequential(
            conv_block(dim, w2[0], kernel_size=1),
            conv_block(w2[0], w2[1], kernel_size=3, padding=1),
            conv_block(w2[1], w2[2], kernel_size=3, stride=2),
        )
        self.branch3 = nn.MaxPool2d(3, stride=2)
        self.out_chs = dim + w0[1] + w1[1] + w2[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


@takes_device_dtype
class InceptionResnet(nn.Module):
    """An Inception-ResNet laid out as in the paper (Fig. 15), with the timm model interface.

    Args:
        num_classes: Classifier outputs (0 for no classifier).
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier (the paper keeps 0.8, i.e. drops 0.2).
        global_pool: Head pooling type.
        stem: 'v1' (paper Fig. 14, 256 channels) or 'v4' (the Inception-v4 stem of Fig. 3, 384 channels).
        depths: Number of A, B and C blocks.
        block_a: Branch widths of the A block: (1x1, (1x1, 3x3), (1x1, 3x3, 3x3)).
        reduction_a: Reduction-A filter counts k, l, m, n (paper Table 1).
        block_b: Branch widths of the B block: (1x1, (1x1, 1x7, 7x1)).
        reduction_b: Branch widths of Reduction-B: ((1x1, 3x3/2), (1x1, 3x3/2), (1x1, 3x3, 3x3/2)).
        block_c: Branch widths of the C block: (1x1, (1x1, 1x3, 3x1)).
        residual_scales: Scale of the residual branch in the A, B and C blocks (paper Sec. 3.3).
        norm_layer, norm_eps, act_layer: The conv blocks' norm and activation.
    """

    def __init__(
            self,
            num_classes: int = 1000,
            in_chans: int = 3,
            drop_rate: float = 0.,
            global_pool: str = 'avg',
            output_stride: int = 32,
            stem: str = 'v1',
            depths: Sequence[int] = (5, 10, 5),
            block_a: Tuple = (32, (32, 32), (32, 32, 32)),
            reduction_a: Sequence[int] = (192, 192, 256, 384),
            block_b: Tuple = (128, (128, 128, 128)),
            reduction_b: Sequence[Sequence[int]] = ((256, 384), (256, 256), (256, 256, 256)),
            block_c: Tuple = (192, (192, 192, 192)),
            residual_scales: Sequence[float] = (0.17, 0.10, 0.20),
            norm_layer: str = 'batchnorm2d',
            norm_eps: float = 1e-3,
            act_layer: str = 'relu',
    ):
        super().__init__()
        if output_stride != 32:
            raise ValueError(f'Inception-ResNet only supports output_stride=32, got {output_stride}')
        if stem not in ('v1', 'v4'):
            raise ValueError(f"stem must be 'v1' (paper Fig. 14) or 'v4' (paper Fig. 3), got {stem!r}")
        if len(depths) != 3 or len(residual_scales) != 3:
            raise ValueError(f'depths and residual_scales need one entry per block type (A, B, C), got {depths}, '
                             f'{residual_scales}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        conv_block = partial(
            ConvNormAct, padding=0, norm_layer=norm_layer, act_layer=act_layer, norm_kwargs=dict(eps=norm_eps),
            act_kwargs=dict(inplace=True))

        self.conv2d_1a = conv_block(in_chans, 32, kernel_size=3, stride=2)
        self.conv2d_2a = conv_block(32, 32, kernel_size=3)
        self.conv2d_2b = conv_block(32, 64, kernel_size=3, padding=1)
        self.feature_info = [dict(num_chs=64, reduction=2, module='conv2d_2b')]
        if stem == 'v1':
            self.maxpool_3a = nn.MaxPool2d(3, stride=2)
            self.conv2d_3b = conv_block(64, 80, kernel_size=1)
            self.conv2d_4a = conv_block(80, 192, kernel_size=3)
            self.conv2d_4b = conv_block(192, 256, kernel_size=3, stride=2)
            self.feature_info.append(dict(num_chs=192, reduction=4, module='conv2d_4a'))
            stem_names = ['maxpool_3a', 'conv2d_3b', 'conv2d_4a', 'conv2d_4b']
            dim = 256
        else:
            self.mixed_3a = Mixed3a(conv_block)
            self.mixed_4a = Mixed4a(conv_block)
            self.mixed_5a = Mixed5a(conv_block)
            self.feature_info.append(dict(num_chs=160, reduction=4, module='mixed_3a'))
            stem_names = ['mixed_3a', 'mixed_4a', 'mixed_5a']
            dim = 384
        self.stem_names = ['conv2d_1a', 'conv2d_2a', 'conv2d_2b'] + stem_names

        scale_a, scale_b, scale_c = residual_scales
        self.repeat = nn.Sequential(*[BlockA(dim, block_a, scale_a, conv_block) for _ in range(depths[0])])
        self.feature_info.append(dict(num_chs=dim, reduction=8, module='repeat'))
        self.mixed_6a = ReductionA(dim, *reduction_a, conv_block=conv_block)
        dim = self.mixed_6a.out_chs
        self.repeat_1 = nn.Sequential(*[BlockBC(dim, block_b, 7, scale_b, conv_block) for _ in range(depths[1])])
        self.feature_info.append(dict(num_chs=dim, reduction=16, module='repeat_1'))
        self.mixed_7a = ReductionB(dim, reduction_b, conv_block=conv_block)
        dim = self.mixed_7a.out_chs
        self.repeat_2 = nn.Sequential(*[BlockBC(dim, block_c, 3, scale_c, conv_block) for _ in range(depths[2])])
        self.feature_info.append(dict(num_chs=dim, reduction=32, module='repeat_2'))

        self.layer_names = self.stem_names + ['repeat', 'mixed_6a', 'repeat_1', 'mixed_7a', 'repeat_2']
        self.feature_ends = [self.layer_names.index(info['module']) for info in self.feature_info]
        self.num_features = self.head_hidden_size = dim
        self.global_pool, self.head_drop, self.classif = create_classifier(
            dim, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable:
        order = {name: i for i, name in enumerate(self.layer_names)}

        def _matcher(name: str) -> Tuple:
            parts = name.split('.')
            if parts[0] in self.stem_names:
                return (0,)
            if parts[0] in order:
                if not coarse and parts[0].startswith('repeat') and len(parts) > 1:
                    return order[parts[0]], int(parts[1])
                return (order[parts[0]],)
            return (float('inf'),)
        return _matcher

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classif

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.classif = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.classif.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that also returns the taps of `feature_info` (strides 2, 4, 8, 16, 32).

        Args:
            x: Input image batch.
            indices: Take the last n taps if int, all if None, these taps if a sequence.
            norm: Unused (no final norm); kept for the timm interface.
            stop_early: Stop after the last requested tap.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediate features.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"Inception-ResNet features are NCHW, got output_fmt='{output_fmt}'")
        check_image_input(x, self.in_chans, 75)  # MIN_INPUT_SIZE: TorchScript takes no global ints
        take_indices, max_index = feature_take_indices(len(self.feature_ends), indices)
        take_ends = [self.feature_ends[i] for i in take_indices]
        layer_names = self.layer_names[:self.feature_ends[max_index] + 1] if stop_early else self.layer_names
        intermediates = []
        for i, name in enumerate(layer_names):
            x = getattr(self, name)(x)
            if i in take_ends:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Replace the layers after the last selected tap by identities and drop the head."""
        take_indices, max_index = feature_take_indices(len(self.feature_ends), indices)
        for name in self.layer_names[self.feature_ends[max_index] + 1:]:
            setattr(self, name, nn.Identity())
        if max_index < len(self.feature_ends) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_head = True
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def _forward_layers(self, x: torch.Tensor) -> torch.Tensor:
        """`layer_names` written out, as TorchScript needs them (it takes module names as literals only)."""
        x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
        if hasattr(self, 'mixed_3a'):  # the Inception-v4 stem (Fig. 3); TorchScript resolves hasattr statically
            x = self.mixed_5a(self.mixed_4a(self.mixed_3a(x)))
        else:  # the Inception-ResNet-v1 stem (Fig. 14)
            x = self.conv2d_4b(self.conv2d_4a(self.conv2d_3b(self.maxpool_3a(x))))
        return self.repeat_2(self.mixed_7a(self.repeat_1(self.mixed_6a(self.repeat(x)))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_chans, 75)  # MIN_INPUT_SIZE: TorchScript takes no global ints
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return _run_layers(self, x)
        return self._forward_layers(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.classif(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Accept timm/zoo checkpoints and the older PyTorch ports of the TF-slim weights (Cadene's
    `pretrainedmodels`: `last_linear` head, optionally 1001 classes with the TF background class first)."""
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    head = 'last_linear' if isinstance(model, TimmInceptionV4) else 'classif'
    out = {}
    for key, value in state_dict.items():
        if key.startswith('last_linear.') and head == 'classif':
            key = 'classif.' + key[len('last_linear.'):]
        if key.startswith(f'{head}.') and value.shape[0] == 1001 and model.num_classes == 1000:
            value = value[1:]  # TF-slim class 0 is "background"
        out[key] = value
    return out


def _create(model_cls: Callable, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    feature_cfg = dict(flatten_sequential=True) if model_cls is InceptionV4 else dict()
    return build_zoo_model(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )


def _cfg(**kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 299, 299),
        'pool_size': (8, 8),
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'mean': IMAGENET_INCEPTION_MEAN,
        'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'conv2d_1a.conv',
        'classifier': 'classif',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:1602.07261',
        'paper_name': 'Inception-v4, Inception-ResNet and the Impact of Residual Connections on Learning',
        'origin_url': 'https://github.com/tensorflow/models/tree/master/research/slim',
        **kwargs,
    }


_TF_SLIM_NOTE = (
    'Converted from the TF-slim checkpoint: 1001 classes with background class 0 dropped, BatchNorm without '
    'learned scale (weights 1), eps 1e-3; inputs are scaled to [-1, 1] (mean = std = 0.5).')


def _meta(recipe: str, params_m: float, gmacs: float, top1_err: float, top5_err: float,
          timm_top1: Optional[float] = None, crop_pct: float = 0.875) -> Dict:
    """Params (M), GMACs at 299, the recipe, paper Table 2's single-crop errors (%) and timm's measured top-1."""
    meta = dict(params_m=params_m, gmacs=gmacs, recipe=f'training/recipes/{recipe}.yaml',
                paper=[paper('ImageNet-1k', 'arXiv:1602.07261 Table 2', top1_err=top1_err, top5_err=top5_err)])
    if timm_top1 is not None:
        meta['measured'] = [dict(
            task='image-classification', dataset='ImageNet-1k', split='val', metrics={'top1': timm_top1},
            protocol={'input': 299, 'crop_pct': crop_pct, 'interpolation': 'bicubic'}, by='timm (results-imagenet.csv)')]
    return meta


default_cfgs = zoo_cfgs({
    'inception_v4.tf_in1k': _cfg(
        meta=_meta('inception_v4', 42.68, 12.25, 20.0, 5.0, timm_top1=80.144),
        hf_hub_id='timm/inception_v4.tf_in1k',
        first_conv='features.0.conv',
        classifier='last_linear',
        description="Google's TF-slim ImageNet-1k weights (inception_v4_2016_09_09) as published by timm.",
        notes=(_TF_SLIM_NOTE,),
    ),
    'inception_resnet_v2.tf_in1k': _cfg(
        meta=_meta('inception_resnet_v2', 55.84, 13.16, 19.9, 4.9, timm_top1=80.434, crop_pct=0.8975),
        hf_hub_id='timm/inception_resnet_v2.tf_in1k',
        crop_pct=0.8975,
        description="Google's TF-slim ImageNet-1k weights (inception_resnet_v2_2016_08_30) as published by timm.",
        notes=(_TF_SLIM_NOTE, 'TF-slim layout, not the paper figures: see inception_resnet_v2_paper.'),
    ),
    'inception_resnet_v2.tf_ens_adv_in1k': _cfg(
        meta=_meta('inception_resnet_v2', 55.84, 13.16, 19.9, 4.9, timm_top1=79.998, crop_pct=0.8975),
        hf_hub_id='timm/inception_resnet_v2.tf_ens_adv_in1k',
        crop_pct=0.8975,
        description=(
            "Google's ensemble-adversarially trained weights (ens_adv_inception_resnet_v2_2017_08_18, Tramer et al., "
            'arXiv:1705.07204) as published by timm.'),
        notes=(_TF_SLIM_NOTE,),
    ),
    'inception_resnet_v1.untrained': _cfg(
        meta=_meta('inception_resnet_v1', 22.76, 6.21, 21.3, 5.5),
        description='The paper\'s Inception-ResNet-v1. Google released no weights for it, so there are none here.',
        notes=('Untrained: `pretrained=True` has nothing to load.',),
    ),
    'inception_resnet_v2_paper.untrained': _cfg(
        meta=_meta('inception_resnet_v2_paper', 32.43, 9.26, 19.9, 4.9),
        description=(
            'Inception-ResNet-v2 in the layout of the paper\'s figures. The released weights use the TF-slim layout '
            '(inception_resnet_v2); no weights exist for this one.'),
        notes=('Untrained: `pretrained=True` has nothing to load.',),
    ),
})

card_info = dict(
    intended_use=(
        'ImageNet-1k classification at 299 px (inputs scaled to [-1, 1]) and a CNN backbone: `features_only=True` '
        'gives strides 2, 4, 8, 16 and 32. inception_v4 and inception_resnet_v2 carry Google\'s weights; '
        'inception_resnet_v1 and inception_resnet_v2_paper are for training from scratch.'),
    limitations=(
        'inception_v4 and inception_resnet_v2 are timm\'s code and weights (TF-slim layout, checked equal to '
        'timm\'s classes); the zoo adds gradient checkpointing. inception_resnet_v1 and inception_resnet_v2_paper '
        'follow the paper figures; what the paper leaves open was inferred: the residual scales (the paper only '
        'says 0.1-0.3) are TF-slim\'s 0.17 / 0.10 / 0.20 for A / B / C, every C block ends in ReLU (Fig. 13/19, '
        'TF-slim instead ends with an unscaled block without ReLU), BatchNorm keeps a learned scale (TF-slim has '
        'none) with eps 1e-3, and the paper-v2 widths are the concatenation sums 1152 and 2144 where Figs. 17 and '
        '19 print 1154 and 2048. Images must be at least 75x75.'),
    variants={
        'inception_v4': 'Inception-v4: stem, 4 x A, Red-A (192, 224, 256, 384), 7 x B, Red-B, 3 x C; 1536 features; '
                        '42.68M params, 12.25 GMACs at 299; 20.0 / 5.0 top-1 / top-5 error (Table 2)',
        'inception_resnet_v1': 'Inception-ResNet-v1: Fig. 14 stem, 5 x A (256), Red-A (192, 192, 256, 384), 10 x B '
                               '(896), Red-B, 5 x C (1792); 21.3 / 5.5 top-1 / top-5 error (Table 2)',
        'inception_resnet_v2': 'Inception-ResNet-v2 (TF-slim): 10 x A (320), Red-A, 20 x B (1088), Red-B, 10 x C '
                               '(2080), 1x1 1536; 55.84M params, 13.16 GMACs at 299; 19.9 / 4.9 error (Table 2)',
        'inception_resnet_v2_paper': 'Inception-ResNet-v2 (paper figures): v4 stem, 5 x A (384), Red-A (256, 256, '
                                     '384, 384), 10 x B (1152), Red-B, 5 x C (2144); 19.9 / 4.9 error (Table 2)',
    },
)


@register_model
def inception_v4(pretrained: bool = False, **kwargs) -> InceptionV4:
    """Inception-v4 (timm's TF-slim port) with Google's weights."""
    return _create(InceptionV4, 'inception_v4', pretrained, **kwargs)


@register_model
def inception_resnet_v2(pretrained: bool = False, **kwargs) -> InceptionResnetV2:
    """Inception-ResNet-v2 in the TF-slim layout (timm's port) with Google's weights."""
    return _create(InceptionResnetV2, 'inception_resnet_v2', pretrained, **kwargs)


@register_model
def inception_resnet_v1(pretrained: bool = False, **kwargs) -> InceptionResnet:
    """Inception-ResNet-v1 as in the paper (Figs. 10-15); no weights exist."""
    model_args = dict(stem='v1', drop_rate=0.2)
    return _create(InceptionResnet, 'inception_resnet_v1', pretrained, **dict(model_args, **kwargs))


@register_model
def inception_resnet_v2_paper(pretrained: bool = False, **kwargs) -> InceptionResnet:
    """Inception-ResNet-v2 in the layout of the paper's figures (Figs. 3, 16-19); no weights exist."""
    model_args = dict(
        stem='v4',
        drop_rate=0.2,
        block_a=(32, (32, 32), (32, 48, 64)),
        reduction_a=(256, 256, 384, 384),
        block_b=(192, (128, 160, 192)),
        reduction_b=((256, 384), (256, 288), (256, 288, 320)),
        block_c=(192, (192, 224, 256)),
    )
    return _create(InceptionResnet, 'inception_resnet_v2_paper', pretrained, **dict(model_args, **kwargs))


# timm's old name for the adversarially trained weights, pointed at the zoo entrypoint
register_model_deprecations(__name__, {'ens_adv_inception_resnet_v2': 'inception_resnet_v2.tf_ens_adv_in1k'})
