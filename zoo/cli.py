"""The `zoo` command: list, info, predict, convert, push, card, compress, decode, reproduce, bench, validate,
explain, export."""
import argparse
import json
import os
import signal
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from tqdm import tqdm

import zoo
from zoo import cards, export, hub
from zoo._io import check_output_dir
from zoo.bench import bench_model
from zoo.convert import family_module
from zoo.errors import InputError, UnknownModelError, ZooError
from zoo.metadata import weights_meta
from zoo.models import FAMILIES
from zoo.models._builder import load_state_dict_strict, mark_official, read_checkpoint, require_published_weights
from zoo.registry import check_model_name, registry_name
from zoo.tasks import DENSE_STRIDE, padded_size, rgb_image, save_prediction


def _say(args, doing: str) -> None:
    """One line on stderr about what a slow step is doing (ending in '...'), so that nobody waits in silence."""
    print(f'zoo {args.command}: {doing}...', file=sys.stderr, flush=True)


def _load_model(args, source: str, pretrained: bool = True):
    """A Hub folder written by save_pretrained, or a registered name (its weights unless `pretrained` is False)."""
    path = Path(source)
    if path.is_dir():
        _say(args, f'loading {path}')
        return hub.load(path).eval()
    check_model_name(source)
    if pretrained:
        require_published_weights(source)
    _say(args, f'building {source}' + (' and loading its weights' if pretrained else ' with random weights'))
    return zoo.create_model(source, pretrained=pretrained).eval()


def _cmd_list(args) -> None:
    pattern = registry_name(args.pattern).lower()  # zoo names are lower case; `zoo/` is the zoo's name space
    names = zoo.list_models(pattern, pretrained=args.pretrained)
    if not names:
        kind = 'published weight' if args.pretrained else 'zoo model'
        raise UnknownModelError(f'no {kind} matches {args.pattern!r}; `zoo list` shows them all')
    for name in names:
        print(name)


def _cmd_info(args) -> None:
    name = registry_name(args.name)
    check_model_name(name)
    with torch.device('meta'):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    input_size = tuple(cfg.get('input_size', (3, 224, 224)))
    weights = cfg.get('hf_hub_id') or cfg.get('url') or 'none published under this name'
    meta = weights_meta(f'{cfg["architecture"]}.{cfg["tag"]}')
    info = {
        'name': name,
        'params_m': round(cards.count_params(model) / 1e6, 3),
        'gmacs': round(cards.count_gmacs(model, input_size), 3),
        'input_size': list(input_size),
        'crop_pct': cfg.get('crop_pct'),
        'paper': cfg.get('paper_name'),
        'paper_ids': cfg.get('paper_ids'),
        'license': cfg.get('license'),
        'weights': weights,
        'pretrained_tags': [n for n in zoo.list_models(pretrained=True) if n.split('.')[0] == model.pretrained_cfg['architecture']],
        'provenance': cards.cfg_provenance(cfg)['kind'],
        'recipe': meta.get('recipe'),
        'paper_results': meta.get('paper', []),
        'measured_results': meta.get('measured', []),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if key.endswith('_results'):
                label = 'paper figure' if key == 'paper_results' else 'measured'
                for r in value or [{'source': 'none recorded'}]:
                    where = r.get('source') or r.get('by') or 'zoo'
                    figures = ', '.join(f'{k} {v}' for k, v in r.get('metrics', {}).items())
                    print(f'{label:>16}: {figures} ({r.get("dataset")}, {where})' if figures else f'{label:>16}: none')
            else:
                print(f'{key:>16}: {value}')


def _label_names(model) -> Optional[List[str]]:
    """Class names: the checkpoint's own, or ImageNet's for a head of an ImageNet subset's size (timm's guess
    from the class count); None (numbers only) for any other head."""
    names = model.pretrained_cfg.get('label_names')
    if names and len(names) == model.num_classes:
        return list(names)
    subset = timm.data.infer_imagenet_subset(model)
    if subset is None:
        return None
    info = timm.data.ImageNetInfo(subset)
    return [info.index_to_description(i) for i in range(model.num_classes)]


def _read_image(image_path):
    try:
        return rgb_image(Image.open(image_path))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f'cannot read image {image_path}: {e.strerror if getattr(e, "strerror", None) else e}')


def _cmd_predict(args) -> None:
    if args.top_k < 1:
        raise InputError(f'--top-k must be at least 1, got {args.top_k}')
    model = _load_model(args, args.name, pretrained=not args.random)
    if hasattr(model, 'frame_size'):
        raise InputError(
            f'{args.name} is a video model: it represents the one video it was fitted to and does not look at '
            'images. Fit it with training/train.py, then `zoo compress` and `zoo decode` its video')
    if getattr(model, 'task', 'classification') != 'classification':
        for image_path in tqdm(args.images, desc='predict', file=sys.stderr):
            image = _read_image(image_path)
            height, width = padded_size(image.height, image.width)
            if (height, width) != (image.height, image.width):
                tqdm.write(f'zoo predict: {image_path} is {image.height}x{image.width}; the model runs on it padded '
                           f'at the bottom and right to {height}x{width} (sides a multiple of {DENSE_STRIDE}), and '
                           'the picture is cropped back', file=sys.stderr)
            print(f'{image_path} -> {save_prediction(model, image, Path(image_path))}')
        return
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    labels = _label_names(model)
    for image_path in tqdm(args.images, desc='predict', file=sys.stderr):
        with torch.no_grad():
            probs = model(transform(_read_image(image_path)).unsqueeze(0)).softmax(-1)[0]
        top = probs.topk(min(args.top_k, probs.numel()))
        print(image_path)
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            label = labels[i] if labels else f'class {i}'
            print(f'  {p:7.2%}  {i:5d}  {label}')


def _cmd_convert(args) -> None:
    check_output_dir(args.out)
    module = family_module(args.family)
    model_name = args.model
    if model_name is None:
        names = zoo.list_models(f'{args.family.lower()}_*')
        if len(names) != 1:
            raise InputError(f'name the model the checkpoint is for with --model, one of {", ".join(names)}')
        model_name = names[0]
    kwargs = {'num_classes': args.num_classes} if args.num_classes is not None else {}
    _say(args, f'building {model_name} and reading {args.checkpoint}')
    model = zoo.create_model(model_name, **kwargs)
    state_dict = module.checkpoint_filter_fn(read_checkpoint(args.checkpoint), model)
    load_state_dict_strict(model, state_dict, source=str(args.checkpoint))
    mark_official(model, args.checkpoint, getattr(module, 'WEIGHT_SHA256', None))
    out = hub.save_pretrained(model.eval(), args.out)
    print(f'wrote {out} ({model_name}); load it with timm.create_model("local-dir:{out}", pretrained=True)')


# The HTTP library's base error (httpx's or requests'), which connection failures derive from.
_HTTP_ERROR = HfHubHTTPError.__bases__[0]


def _cmd_push(args) -> None:
    try:
        commit = hub.push_folder(args.directory, args.repo_id, commit_message=args.message, private=args.private)
    except (_HTTP_ERROR, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ZooError(f'could not push to {args.repo_id} at {hf_constants.ENDPOINT} ({type(e).__name__}: {e}); '
                       'check the network, the token (hf auth login) and HF_ENDPOINT') from e
    print(getattr(commit, 'commit_url', commit))


def _cmd_card(args) -> None:
    if args.all:
        _say(args, f'writing a card for every published weight to {cards.CARDS_DIR}')
        print(f'wrote {len(cards.write_cards())} cards to {cards.CARDS_DIR}')
    elif args.name:
        print(cards.card_for_name(args.name))
    else:
        args.usage_error('give a model NAME, or --all to regenerate model_cards/')


# The papers' fitted HNeRV / NeRV models give 30-41 dB on their own video; frames of another video come out
# near 10 dB (issue #17 saw 9.6 dB). A fit cut very short can also land below this (the 40-epoch test demo: 15.5).
_LOW_VIDEO_PSNR = 15


def _cmd_compress(args) -> None:
    from zoo import codec  # optional extra: video (pytorch-msssim, constriction), only for this command
    from zoo.tasks import video

    codec.check_bitstream_path(args.out)
    if not Path(args.model).is_dir():
        name = codec.check_video_model(check_model_name(args.model))
        if not timm.models.get_pretrained_cfg(registry_name(args.model)).has_weights:
            raise InputError(
                f'{args.model} has no published weights: a video model represents the one video it was fitted to. Fit '
                f'it first (accelerate launch training/train.py --recipe training/recipes/{name}_bunny.yaml --data '
                'FRAMES) and give zoo compress the Hub folder it saves (runs/<recipe>/model)')
    model = _load_model(args, args.model)
    codec.check_video_model(model)
    _say(args, f'reading {args.frames}, then compressing and decoding to measure it')
    frames = video.read_frames(args.frames, frame_size=model.frame_size, max_frames=args.max_frames)
    result = codec.compress(model, args.out, frames, prune=args.prune, bits=args.bits)
    if result['psnr'] < _LOW_VIDEO_PSNR:
        print(f'zoo compress: warning: PSNR {result["psnr"]:.1f} dB is far below what a video model gives on the '
              f'video it was fitted to (over {_LOW_VIDEO_PSNR} dB). Are these its frames? A video model decodes '
              'only its own video; fit one to these frames with training/train.py', file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    ms_ssim = f'{result["ms_ssim"]:.4f}' if result['ms_ssim'] is not None else \
        f'n/a (frames of {video.MS_SSIM_MIN_SIZE} px or less)'
    height, width = result['frame_size']
    print(f'wrote {result["path"]} ({result["model"]}, {result["frames"]} frames of {height}x{width})')
    print(f'  bytes: {result["bytes"]}  bpp: {result["bpp"]:.4f}  PSNR: {result["psnr"]:.2f} dB  MS-SSIM: {ms_ssim}')


def _cmd_decode(args) -> None:
    from zoo import codec  # optional extra: video (pytorch-msssim, constriction, av), only for this command
    from zoo.tasks import video

    video.check_frames_path(args.out)  # before decoding, which can take minutes
    _say(args, f'decoding {args.bitstream}')
    frames = codec.decode_video(args.bitstream)
    out = video.write_frames(frames, args.out, fps=args.fps)
    print(f'wrote {len(frames)} frames of {frames.shape[-2]}x{frames.shape[-1]} to {out}')


def _cmd_reproduce(args) -> None:
    from zoo.train import trainer  # optional extra: train (accelerate), only for this command

    source = Path(args.source)
    if not source.is_dir():
        name = args.source
        zoo_name = registry_name(name)
        if zoo.is_zoo_model(zoo_name):
            cfg = timm.models.get_pretrained_cfg(zoo_name) if '.' in zoo_name else None
            where = cfg and (cfg.hf_hub_id or cfg.url)
            raise ValueError(
                f'{name} has no zoo-made weights to re-run: ' + (f'its weights ({where}) are the authors\' own. '
                                                                 if where else 'it has no published weights. ')
                + 'zoo reproduce re-runs weights made by training/train.py: give their Hub folder or repo id')
        source = Path(snapshot_download(name, allow_patterns=['*.json', '*.yaml', '*.md', '*.safetensors']))
    out = args.output_dir or Path('runs') / f'reproduce-{source.name}'
    result = trainer.reproduce(source, out, data=args.data, rtol=args.rtol)
    print(f'{result["verdict"]}: re-ran the recipe of {source} into {out}')
    print(f'  published  sha256 {result["published_sha256"]}  {json.dumps(result["published"])}')
    print(f'  reproduced sha256 {result["reproduced_sha256"]}  {json.dumps(result["reproduced"])}')
    for key, (recorded, now) in result['environment_differences'].items():
        print(f'  environment {key}: recorded {recorded}, now {now}')
    if result['verdict'] != 'bit-exact' and not result['environment_differences']:
        print('  the recorded environment is the same: the difference comes from the hardware or the libraries under torch')
    if result['verdict'] == 'differs':
        raise SystemExit(1)


def _cmd_bench(args) -> None:
    check_model_name(args.name)
    _say(args, f'building {args.name} and timing {args.warmup} + {args.repeats} batches of {args.batch}')
    result = bench_model(
        args.name, batch=args.batch, size=args.size, deploy=args.deploy, channels_last=args.channels_last,
        compile=args.compile, dtype=args.dtype, train=args.train, device=args.device, threads=args.threads,
        repeats=args.repeats, warmup=args.warmup)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result)


_DEPTH_OPTIONS = ('benchmark', 'crop', 'min_depth', 'max_depth', 'depth_scale', 'upsample')
_VALIDATE_OPTIONS = ('data', 'split', 'batch', 'limit', *_DEPTH_OPTIONS, 'prune', 'bits')


def _cmd_validate(args) -> None:
    from zoo import validate  # optional extra: train (validate reads data with the trainer's task plug-ins)

    given = {k: getattr(args, k) for k in _VALIDATE_OPTIONS if getattr(args, k) is not None}
    command = shlex.join(['zoo', 'validate', args.model, *(
        part for k, v in given.items() for part in (f'--{k.replace("_", "-")}', str(v))),
        *(['--reduce-zero-label'] if args.reduce_zero_label else [])])
    depth = {k: given[k] for k in _DEPTH_OPTIONS if k in given}
    video = {k: given[k] for k in ('prune', 'bits') if k in given}
    _say(args, f'loading {args.model}')
    model, weights_sha256 = validate.load_model(args.model)
    if args.update_card:  # before the run, not after it
        validate.check_card_folder(args.update_card, weights_sha256)
    result = validate.validate(
        model, args.data, split=args.split, batch_size=args.batch, limit=args.limit,
        device=args.device or ('cuda' if torch.cuda.is_available() else 'cpu'), num_workers=args.workers,
        depth=depth, reduce_zero_label=args.reduce_zero_label, bitstream=args.bitstream,
        weights_sha256=weights_sha256, source=args.model, command=command, **video)
    if args.results_file:
        validate.write_results(result, args.results_file)
    if args.update_card:
        validate.update_card(args.update_card, result)
    print(json.dumps(result, indent=2))


def _cmd_explain(args) -> None:
    from zoo import explain  # optional extra: explain (captum, matplotlib), only for this command

    source = Path(args.name)
    model = hub.load(source) if source.is_dir() else zoo.create_model(args.name, pretrained=not args.random)
    result = explain.explain(
        model, args.image, method=args.method, out_dir=args.out, input_size=args.size, layer=args.layer,
        target_class=args.target_class, top_k=args.top_k, channel=args.channel, steps=args.steps)
    for path in result.pictures:
        print(path)
    numbers = {k: v for k, v in result.values.items() if isinstance(v, (int, float))}
    if numbers:
        print(json.dumps(numbers))
    if args.method == 'linear':
        values = result.values
        for k, linear, share in zip(values['classes'], values['linear'].tolist(), values['bias_share'].tolist()):
            print(f'  class {k}: logit {values["logits"][k]:.4g} = A x {linear:.4g} + bias path '
                  f'{values["bias"][k]:.4g} (bias share {share:.1%})')


def _cmd_export(args) -> None:
    source = Path(args.name)
    model = hub.load(source) if source.is_dir() else zoo.create_model(args.name, pretrained=not args.random)
    size = tuple(args.size * 2 if len(args.size) == 1 else args.size) if args.size else None
    result = export.export(model, args.out, format=args.format, deploy=args.deploy, dynamic_batch=args.dynamic_batch,
                           int8=args.int8, opset=args.opset, size=size)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(export.summary(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='zoo', description=__doc__)
    parser.add_argument('--version', action='version', version=f'zoo {zoo.__version__}')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('list', help='list zoo models')
    p.add_argument('pattern', nargs='?', default='*', help='glob, any case, e.g. "spartan*" or "*Net*"')
    p.add_argument('--pretrained', action='store_true', help='list published weights as name.tag')
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser('info', help='params, GMACs, input size, paper, license, weights of a model')
    p.add_argument('name', help='model name[.tag]')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser('predict', help='top-k classes for images, or a depth map / mask picture for dense models')
    p.add_argument('name', help='model name[.tag], or a Hub folder written by save_pretrained')
    p.add_argument('images', nargs='+', help='image files; a dense model writes IMAGE_STEM.<task>.png beside each')
    p.add_argument('--top-k', type=int, default=5, help='classes to print per image (default 5)')
    p.add_argument('--random', action='store_true', help='random weights (no download), to try the pipeline')
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser('convert', help='official checkpoint -> Hub folder')
    p.add_argument('family', help=f'the family whose official layout the checkpoint is in: {", ".join(FAMILIES)}')
    p.add_argument('checkpoint', type=Path, help='the authors\' checkpoint file (read with weights_only=True)')
    p.add_argument('--out', type=Path, required=True, help='Hub folder to write')
    p.add_argument('--model', help='zoo model the checkpoint is for (default: the family\'s only model)')
    p.add_argument('--num-classes', type=int, help='classes of the checkpoint\'s head (default: the model\'s)')
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser('push', help='upload a Hub folder to a Hub repo')
    p.add_argument('directory', type=Path, help='a folder written by save_pretrained or zoo convert')
    p.add_argument('repo_id', help='e.g. my-org/spartan_tiny')
    p.add_argument('--message', default='Add model', help='commit message')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser('bench', help='images/s, latency, peak memory and GFLOP/s (vs a matmul) of a model')
    p.add_argument('name', help='model name (random weights)')
    p.add_argument('--batch', type=int, default=8, help='images per batch (default 8)')
    p.add_argument('--size', type=int, help='input height and width (default: the model\'s input size)')
    p.add_argument('--deploy', action='store_true', help='re-parameterise first (timm reparameterize_model)')
    p.add_argument('--channels-last', action='store_true', help='NHWC memory format')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (with inductor freezing at inference)')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    p.add_argument('--train', action='store_true', help='time forward + backward + SGD step')
    p.add_argument('--device', help='cpu or cuda[:i] (default: cuda if available)')
    p.add_argument('--threads', type=int, help='torch CPU threads')
    p.add_argument('--repeats', type=int, default=10, help='timed batches')
    p.add_argument('--warmup', type=int, default=2, help='untimed batches first')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser('card', help='print a model card, or regenerate model_cards/ with --all')
    p.add_argument('name', nargs='?', help='model name[.tag]')
    p.add_argument('--all', action='store_true', help='regenerate model_cards/ for every published weight')
    p.set_defaults(func=_cmd_card)

    p = sub.add_parser('compress', help='video model + its frames -> bitstream (prune, quantise, entropy-code)')
    p.add_argument('model', help='video model name[.tag] (pretrained weights), or a Hub folder of a fitted model')
    p.add_argument('frames', type=Path, help='the video the model represents: a folder of images or a video file')
    p.add_argument('--out', '-o', type=Path, required=True, help='bitstream file to write')
    p.add_argument('--prune', type=float, default=0.1, help='fraction of decoder weights pruned (default 0.1)')
    p.add_argument('--bits', type=int, default=8, help='quantisation bits for weights and embeddings (default 8)')
    p.add_argument('--max-frames', type=int, help='use the first frames only')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser('decode', help='bitstream -> frames (a folder of PNGs, or .mp4/.mkv/.mov)')
    p.add_argument('bitstream', type=Path, help='a file written by zoo compress')
    p.add_argument('out', type=Path, help='a folder of PNGs, or a video file (.mp4, .mkv, .mov)')
    p.add_argument('--fps', type=int, default=25, help='frame rate of a video OUT (default 25)')
    p.set_defaults(func=_cmd_decode)

    p = sub.add_parser('reproduce', help='re-run the recipe behind zoo-trained weights and compare the result')
    p.add_argument('source', help='a Hub folder or repo id written by training/train.py')
    p.add_argument('--data', help='where the training data is on this machine (default: as recorded)')
    p.add_argument('--output-dir', type=Path, help='default: runs/reproduce-<name>')
    p.add_argument('--rtol', type=float, default=0.01, help='relative tolerance on metrics when not bit-exact')
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser('validate', help='measure a model on a dataset by its task\'s protocol (timm validate.py)')
    p.add_argument('model', help='model name.tag (pretrained weights), a Hub folder, local-dir:DIR or hf-hub:ID')
    p.add_argument('--data', required=True, help='a local folder (the training layout) or video, or a Hub dataset id')
    p.add_argument('--split', default='validation', help='the split folder or Hub split (default validation)')
    p.add_argument('--batch', type=int, help='images (or frames) per batch (default 16; depth 8, iDisc\'s test batch)')
    p.add_argument('--limit', type=int, help='evaluate the first N samples (frames, for video) only')
    p.add_argument('--results-file', type=Path, help='append the result to a .csv or .json file')
    p.add_argument('--update-card', type=Path, metavar='FOLDER',
                   help='add the result to FOLDER/config.json "results" and re-render its card (same weights only)')
    p.add_argument('--device', help='cpu or cuda[:i] (default: cuda if available)')
    p.add_argument('--workers', type=int, default=4, help='data loader workers (default 4)')
    g = p.add_argument_group('depth (the iDisc protocol; defaults are the benchmark\'s)')
    g.add_argument('--benchmark', choices=['nyu', 'kitti'], help='default nyu')
    g.add_argument('--crop', choices=['eigen_nyu', 'garg', 'eigen', 'none'], help='default: eigen_nyu NYU, garg KITTI')
    g.add_argument('--min-depth', type=float, help='default 0.01 m')
    g.add_argument('--max-depth', type=float, help='default 10 m NYU, 80 m KITTI')
    g.add_argument('--depth-scale', type=float, help='ground truth PNG value per metre (default 1000 NYU, 256 KITTI)')
    g.add_argument('--upsample', choices=['bilinear_align_corners', 'bilinear', 'nearest'],
                   help='how the prediction is resized to the ground truth (default iDisc\'s)')
    p.add_argument('--reduce-zero-label', action='store_true',
                   help='segmentation: mask label 0 is ignored, 1..K become 0..K-1 (mmseg\'s, for ADE20K)')
    g = p.add_argument_group('video (the bitstream measured)')
    g.add_argument('--prune', type=float, help='fraction of decoder weights pruned (default 0.1)')
    g.add_argument('--bits', type=int, help='quantisation bits (default 8)')
    g.add_argument('--bitstream', type=Path, help='keep the bitstream at this path (default: a temporary file)')
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser('explain', help='pictures of what a model sees: feature maps, attention, Grad-CAM, '
                                       'integrated gradients, activation maximisation, linear interpreter')
    p.add_argument('name', help='model name[.tag], or a Hub folder written by save_pretrained')
    p.add_argument('image')
    p.add_argument('--method', default='features', choices=['features', 'attention', 'gradcam',
                                                            'integrated-gradients', 'maximize', 'linear'])
    p.add_argument('--layer', help='module name of a stage or block (default: every stage, or the last)')
    p.add_argument('--target-class', type=int, help='class to explain (default: the predicted one)')
    p.add_argument('--channel', type=int, help='maximize: a channel of --layer instead of a class')
    p.add_argument('--top-k', type=int, help='features: channels per stage; linear: classes besides the target')
    p.add_argument('--steps', type=int, help='maximize: optimisation steps; integrated-gradients: path steps')
    p.add_argument('--size', type=int, help='input height and width (default: the model\'s data config)')
    p.add_argument('--random', action='store_true', help='random weights (no download), to try the pipeline')
    p.add_argument('--out', '-o', type=Path, default=Path('explain'), help='folder for the pictures (default explain/)')
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser('export', help='ONNX / ExportedProgram / TorchScript file, checked against the eager model')
    p.add_argument('name', help='model name[.tag] (pretrained weights unless --random), or a Hub folder')
    p.add_argument('--format', default='onnx', choices=['onnx', 'exported-program', 'torchscript'])
    p.add_argument('--out', '-o', type=Path, required=True, help='file to write; its data config goes to OUT.json')
    p.add_argument('--deploy', action='store_true', help='re-parameterise first (timm reparameterize_model)')
    p.add_argument('--dynamic-batch', action='store_true', help='any batch size (checked at batch 1 and 3)')
    p.add_argument('--int8', action='store_true', help='also write OUT.int8.onnx: onnxruntime dynamic quantisation')
    p.add_argument('--opset', type=int, help='ONNX opset (default: torch.onnx\'s)')
    p.add_argument('--size', type=int, nargs='+', metavar='PX', help='input H [W] (default: the model\'s input size)')
    p.add_argument('--random', action='store_true', help='random weights (no download)')
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_cmd_export)

    for action in sub._choices_actions:  # `zoo CMD --help` opens with the line `zoo --help` shows for CMD
        command = sub.choices[action.dest]
        command.description = command.description or action.help[0].upper() + action.help[1:] + '.'
        command.set_defaults(usage_error=command.error)
    return parser


def _error_message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f'{e.filename}: {e.strerror}'  # `[Errno 21] Is a directory: 'x'` read as a person would say it
    return str(e)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. Errors meant for a person (a ZooError, a bad value, a file that cannot be read or written)
    are one line on stderr and a non-zero exit; anything else is a bug and keeps its traceback. ZOO_DEBUG=1 shows
    the traceback of every error."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here rather than at exit, where it could not be handled
    except BrokenPipeError:  # `zoo card NAME | head`: the reader has gone, as with any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit flush stays quiet
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        if os.environ.get('ZOO_DEBUG') == '1':
            raise
        print(f'zoo {args.command}: interrupted', file=sys.stderr)
        return 128 + signal.SIGINT
    except (ZooError, OSError, ValueError) as e:
        if os.environ.get('ZOO_DEBUG') == '1':
            raise
        print(f'zoo {args.command}: {_error_message(e)}', file=sys.stderr)
        return getattr(e, 'exit_code', 2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
