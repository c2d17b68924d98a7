"""×Net ("timesNet"): a pre-trained encoder × a pre-trained decoder for dense prediction.

Paper: "Is Pre-training Applicable to the Decoder for Dense Prediction?", Ning, Gan, Xuan and Yokoya,
ICRA 2026 (https://arxiv.org/abs/2503.07637). No code or weights were released; the model is built from the
paper's description, and every detail that description leaves open is chosen here and listed in `card_info`.

The paper's designs, as built here:
* **Pre-trained encoder**: any timm model with a stride-32 feature map (`features_only`); only its deepest
  map goes on. There are no encoder-decoder skip connections.
* **Reversed decoder**: a timm ImageNet classifier (ConvNeXt) whose stages run deepest first. Its stem and
  its stage blocks keep the classifier's weights (loaded by `timm.create_model(..., pretrained=True)`); its
  downsampling layers cannot run backwards and are dropped.
* **Re-Shape module**: in place of each dropped downsampling layer, norm + 1x1 conv + depth-to-space turns the
  previous (coarser, wider) map into the next stage's width and resolution: the mirror of ConvNeXt's
  norm + 2x2 stride-2 patchify. A Re-Shape without upsampling bridges the encoder to the deepest stage.
* **Feature mixing**: the decoder's pre-trained stem embeds the input image, exactly as in pre-training, and
  that embedding is added to the Re-Shaped features entering the stride-4 stage, so the stage sees an input
  like its pre-training input.
* **Post Feature Pyramid**: the outputs of all four decoder stages (stride 32 to 4) are normed, projected to
  one width, upsampled to stride 4 and summed after decoding; a 3x3 conv fuses them and a 1x1 conv predicts
  depth (sigmoid x max_depth, metres) or class logits, bilinearly upsampled to the input size.
"""
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from timm.models import register_model, resolve_pretrained_cfg

from zoo.layers import check_image_input, check_multiple_of, takes_device_dtype
from zoo.metadata import zoo_cfgs
from zoo.models._builder import build_zoo_model

__all__ = ['TimesNet', 'ReShape', 'PostFeaturePyramid']

TASKS = ('depth', 'segmentation')
_REDUCTIONS = (4, 8, 16, 32)


class ReShape(nn.Module):
    """Norm, 1x1 conv to `out_chs * scale**2` channels, depth-to-space by `scale` (the reverse of patchify)."""

    def __init__(self, in_chs: int, out_chs: int, scale: int = 2):
        super().__init__()
        self.norm = LayerNorm2d(in_chs)
        self.proj = nn.Conv2d(in_chs, out_chs * scale ** 2, kernel_size=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.proj(self.norm(x)))


class PostFeaturePyramid(nn.Module):
    """Fuse the decoder's own multi-scale outputs (finest first) into one map at the finest resolution."""

    def __init__(self, in_chs: Sequence[int], dim: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Sequential(LayerNorm2d(c), nn.Conv2d(c, dim, kernel_size=1)) for c in in_chs)
        self.fuse = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False), LayerNorm2d(dim), nn.GELU())

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        x = self.lateral[0](features[0])
        for i, lateral in enumerate(self.lateral):  # TorchScript unrolls a module list only when it is whole
            if i > 0:
                x = x + F.interpolate(lateral(features[i]), size=size, mode='bilinear', align_corners=False)
        return self.fuse(x)


@takes_device_dtype
class TimesNet(nn.Module):
    """×Net: timm encoder -> Re-Shape -> reversed pre-trained timm classifier (+ image mixing) -> Post FP -> head.

    Args:
        encoder: timm model name (optionally `name.tag`) used through `features_only`; its last map must be
            at stride 32.
        decoder: timm classifier name with ConvNeXt's layout (`stem`, four `stages` with `downsample` and
            `blocks`, strides 4-32), run in reverse.
        task: 'depth' (output (B, 1, H, W), metres in (0, max_depth)) or 'segmentation' (logits (B, K, H, W)).
        num_classes: output channels; 1 for depth, the class count for segmentation (default 150, ADE20K). 0
            builds no head: `forward` returns the Post Feature Pyramid's map (B, num_features, H/4, W/4).
        background_class: the segmentation class that `zoo predict` leaves uncoloured; None (the default) for
            ADE20K's classes as mmseg numbers them (label 0 "other" ignored, so class 0 is wall).
        max_depth: depth range of the sigmoid output, in metres (10 for NYU, 80 for KITTI).
        pyramid_dim: width of the Post Feature Pyramid; default the decoder's stride-4 width.
        in_chans: image channels, passed to both encoder and decoder (timm adapts their first convs).
        pretrained_backbones: start the encoder and the decoder from their classifiers' pre-trained weights.
        encoder_kwargs, decoder_kwargs: extra `timm.create_model` arguments for each half (e.g.
            `pretrained_cfg_overlay=dict(file=...)`, `drop_path_rate`, or `pretrained=False` to ablate one half).
    """

    def __init__(
            self,
            encoder: str = 'convnext_tiny',
            decoder: str = 'convnext_tiny',
            task: str = 'depth',
            num_classes: Optional[int] = None,
            background_class: Optional[int] = None,
            max_depth: float = 10.0,
            pyramid_dim: Optional[int] = None,
            in_chans: int = 3,
            pretrained_backbones: bool = False,
            encoder_kwargs: Optional[Dict[str, Any]] = None,
            decoder_kwargs: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f'task must be one of {", ".join(TASKS)}, got {task!r}')
        if num_classes is None:
            num_classes = 1 if task == 'depth' else 150
        self.task = task
        self.background_class = background_class
        self.max_depth = max_depth
        self.in_chans = in_chans

        encoder_args = dict(pretrained=pretrained_backbones, features_only=True, in_chans=in_chans)
        self.encoder = timm.create_model(encoder, **{**encoder_args, **(encoder_kwargs or {})})
        enc_chs, enc_reduction = self.encoder.feature_info.channels()[-1], self.encoder.feature_info.reduction()[-1]
        if enc_reduction != _REDUCTIONS[-1]:
            raise ValueError(
                f'encoder {encoder} ends at stride {enc_reduction}; ×Net needs an encoder whose last feature map '
                f'is at stride {_REDUCTIONS[-1]}')

        decoder_args = dict(pretrained=pretrained_backbones, in_chans=in_chans)
        classifier = timm.create_model(decoder, **{**decoder_args, **(decoder_kwargs or {})})
        stages = getattr(classifier, 'stages', None)
        reductions = tuple(f['reduction'] for f in getattr(classifier, 'feature_info', ()))
        if not hasattr(classifier, 'stem') or stages is None or reductions != _REDUCTIONS or not all(
                hasattr(s, 'downsample') and hasattr(s, 'blocks') for s in stages):
            raise ValueError(
                f'decoder {decoder} does not have the layout ×Net reverses: a `stem` and four `stages` (each with '
                f'`downsample` and `blocks`) at strides {_REDUCTIONS}, as timm\'s ConvNeXt models have')
        dec_chs = [f['num_chs'] for f in classifier.feature_info]
        for stage in stages:
            stage.downsample = nn.Identity()  # replaced by the Re-Shape modules; runs backwards no more
        self.decoder = nn.Module()
        self.decoder.stem = classifier.stem
        self.decoder.stages = nn.ModuleList(stages)  # same keys as the Sequential; TorchScript indexes a ModuleList

        self.reshapes = nn.ModuleList(
            [ReShape(dec_chs[i + 1], dec_chs[i], scale=2) for i in range(len(dec_chs) - 1)]
            + [ReShape(enc_chs, dec_chs[-1], scale=1)])
        self.num_features = self.head_hidden_size = pyramid_dim or dec_chs[0]  # the 1x1 head's input width
        self.post_pyramid = PostFeaturePyramid(dec_chs, self.num_features)
        self.reduction = _REDUCTIONS[-1]
        self.reset_classifier(num_classes)

    def check_input(self, x: torch.Tensor) -> None:
        """A clear error for batches the model cannot take (channels, or sides not a multiple of 32). Eager only:
        TorchScript, FX and torch.export skip it."""
        check_image_input(x, self.in_chans)
        check_multiple_of(x, self.reduction, '×Net', 'the encoder stride, undone by the reversed decoder')

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new, randomly initialised 1x1 head with `num_classes` outputs (0: none), e.g. to fine-tune on other
        classes."""
        if self.task == 'depth' and num_classes not in (0, 1):
            raise ValueError(f'a depth model predicts one channel (num_classes=1, or 0 for no head); got {num_classes}')
        like = next(self.post_pyramid.parameters())
        self.num_classes = num_classes
        self.head = nn.Conv2d(self.num_features, num_classes, 1, device=like.device, dtype=like.dtype) \
            if num_classes else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
        for stage in self.decoder.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The reversed decoder's stage outputs, finest (stride 4) first: stage 3 back to stage 0."""
        self.check_input(x)
        stages = self.decoder.stages
        y3 = stages[3](self.reshapes[3](self.encoder(x)[-1]))
        y2 = stages[2](self.reshapes[2](y3))
        y1 = stages[1](self.reshapes[1](y2))
        y0 = stages[0](self.reshapes[0](y1) + self.decoder.stem(x))  # feature mixing: the image as the decoder saw it
        return [y0, y1, y2, y3]

    def forward_head(self, features: List[torch.Tensor], size: List[int]) -> torch.Tensor:
        """The prediction at `size` (H, W), or with no head the fused map at stride 4."""
        y = self.head(self.post_pyramid(features))
        if self.num_classes == 0:
            return y
        y = F.interpolate(y, size=size, mode='bilinear', align_corners=False)
        if self.task == 'depth':
            y = torch.sigmoid(y) * self.max_depth
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), x.shape[-2:])


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: TimesNet) -> Dict[str, torch.Tensor]:
    """Zoo-layout ×Net checkpoints only (no official ones exist); unwraps a training dict."""
    for key in ('model', 'state_dict'):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    return {k.removeprefix('module.'): v for k, v in state_dict.items()}


def _create_timesnet(variant: str, pretrained: bool = False, **kwargs) -> TimesNet:
    """`pretrained=True` loads ×Net weights when the cfg names some (a Hub repo, a file); no one has published
    any, so otherwise it starts the encoder and the decoder from their ImageNet classifiers."""
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    own_weights = any(getattr(cfg, k, None) for k in ('hf_hub_id', 'url', 'file', 'state_dict'))
    return build_zoo_model(
        TimesNet,
        variant,
        pretrained and own_weights,
        pretrained_backbones=pretrained and not own_weights,
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


def _cfg(**kwargs) -> Dict:
    return {
        'num_classes': None,  # set by the task: 1 for depth, the class count for segmentation
        'input_size': (3, 480, 640),
        'min_input_size': (3, 32, 32),
        'fixed_input_size': False,
        'interpolation': 'bilinear',
        'crop_pct': 1.0,
        'crop_mode': 'center',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'encoder.stem_0',
        'classifier': None,  # a ×Net checkpoint loads whole; timm would otherwise compare the cfg's class count
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2503.07637',
        'paper_name': 'Is Pre-training Applicable to the Decoder for Dense Prediction?',
        'description': 'Untrained ×Net: the authors released neither code nor checkpoints.',
        'notes': (
            'pretrained=True starts the encoder and the decoder from their timm ImageNet classifiers (the '
            'paper\'s starting point); the Re-Shape modules, the Post Feature Pyramid and the head start at '
            'random.',),
        **kwargs,
    }


# encoder, decoder: timm classifiers with the tags timm publishes for them
_ARCHS = {
    f'timesnet_convnext_{size}_convnext_{size}': dict(encoder=f'convnext_{size}.{tag}', decoder=f'convnext_{size}.{tag}')
    for size, tag in (
        ('tiny', 'in12k_ft_in1k'), ('small', 'in12k_ft_in1k'), ('base', 'fb_in22k_ft_in1k'),
        ('large', 'fb_in22k_ft_in1k'))
}

# Params (M) and GMACs at 480x640 (depth head), and the recipe where there is one; the paper's tables could not be
# read offline, so no paper figure is recorded.
_META = {
    'timesnet_convnext_tiny_convnext_tiny': dict(
        params_m=56.46, gmacs=56.65, recipe='training/recipes/timesnet_convnext_tiny_convnext_tiny_nyu.yaml'),
    'timesnet_convnext_small_convnext_small': dict(params_m=99.73, gmacs=108.42),
    'timesnet_convnext_base_convnext_base': dict(params_m=176.58, gmacs=191.74),
    'timesnet_convnext_large_convnext_large': dict(params_m=395.72, gmacs=429.14),
}

default_cfgs = zoo_cfgs({f'{name}.untrained': _cfg(meta=_META[name]) for name in _ARCHS})

card_info = dict(
    pipeline_tag='depth-estimation',
    usage=(
        '# pretrained=True: encoder and decoder from their ImageNet classifiers (no ×Net weights exist)\n'
        'images = torch.rand(1, 3, {height}, {width})  # ImageNet mean/std, H and W multiples of 32\n'
        'with torch.no_grad():\n'
        '    depth = model(images)  # (1, 1, {height}, {width}), metres in (0, max_depth=10)\n'
        '# task="segmentation", num_classes=K: logits (B, K, H, W)'),
    intended_use=(
        'Monocular depth estimation (task="depth", the default) and semantic segmentation '
        '(task="segmentation") to train on your data, starting from a pre-trained encoder and a pre-trained '
        'decoder: research on decoder pre-training as in the ×Net paper.'),
    limitations=(
        'Rebuilt from the paper\'s description only: the authors released no code and no weights, and the paper\'s '
        'module definitions and tables could not be read (only its abstract and summaries), so this is an '
        'interpretation, not a reproduction, and its numbers are not the paper\'s. Inferred, and why: '
        '(1) the decoder is a timm ConvNeXt classifier whose stages run deepest first; its stem and stage blocks '
        'keep the classifier\'s weights, its stride-2 downsampling layers are dropped (they cannot run backwards). '
        '(2) Re-Shape = LayerNorm2d + 1x1 conv + PixelShuffle(2), the mirror of ConvNeXt\'s LayerNorm + 2x2 '
        'stride-2 patchify, between consecutive reversed stages; a Re-Shape with scale 1 bridges the encoder\'s '
        'stride-32 map to the deepest decoder stage. (3) Only the encoder\'s deepest map is used: the paper '
        'removes the encoder-decoder skip connections. (4) Feature mixing adds the decoder\'s pre-trained stem '
        'applied to the image (the input its first stage saw in pre-training) to the features entering the '
        'stride-4 stage; the paper\'s mixing may differ in place and form. (5) Post Feature Pyramid = per-stage '
        'LayerNorm2d + 1x1 conv to one width (the decoder\'s stride-4 width), bilinear upsampling to stride 4, '
        'sum, 3x3 conv + LayerNorm2d + GELU. (6) Head = 1x1 conv, bilinear upsampling to the input size; depth is '
        'sigmoid x max_depth (10 m NYU, 80 m KITTI). (7) Variants pair ConvNeXt-T/S/B/L with itself at timm\'s '
        'published tags; the paper\'s exact pairs are not known. Any timm encoder with a stride-32 last map and '
        'any ConvNeXt-layout decoder can be combined through encoder= / decoder=. Both halves expect ImageNet '
        'mean/std. Image sides must be multiples of 32 (a ValueError names the nearest fit). No training recipe '
        'is reproduced.'),
    variants={
        name: f'encoder {arch["encoder"]}, decoder {arch["decoder"]} (pairing inferred; paper tables unavailable)'
        for name, arch in _ARCHS.items()
    },
)


def _timesnet(variant: str, pretrained: bool, **kwargs) -> TimesNet:
    return _create_timesnet(variant, pretrained=pretrained, **dict(_ARCHS[variant], **kwargs))


@register_model
def timesnet_convnext_tiny_convnext_tiny(pretrained: bool = False, **kwargs) -> TimesNet:
    """×Net, ConvNeXt-T encoder × reversed ConvNeXt-T decoder."""
    return _timesnet('timesnet_convnext_tiny_convnext_tiny', pretrained, **kwargs)


@register_model
def timesnet_convnext_small_convnext_small(pretrained: bool = False, **kwargs) -> TimesNet:
    """×Net, ConvNeXt-S encoder × reversed ConvNeXt-S decoder."""
    return _timesnet('timesnet_convnext_small_convnext_small', pretrained, **kwargs)


@register_model
def timesnet_convnext_base_convnext_base(pretrained: bool = False, **kwargs) -> TimesNet:
    """×Net, ConvNeXt-B encoder × reversed ConvNeXt-B decoder."""
    return _timesnet('timesnet_convnext_base_convnext_base', pretrained, **kwargs)


@register_model
def timesnet_convnext_large_convnext_large(pretrained: bool = False, **kwargs) -> TimesNet:
    """×Net, ConvNeXt-L encoder × reversed ConvNeXt-L decoder."""
    return _timesnet('timesnet_convnext_large_convnext_large', pretrained, **kwargs)
