"""The `zoo` command: list, info, predict, convert, push, card, compress, decode, reproduce, bench, export."""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import timm
import torch
from tqdm import tqdm

import zoo
from zoo import cards, hub
from zoo._namespace import registry_name
from zoo.errors import ZooError
from zoo.registry import check_model_name


def _cmd_list(args) -> None:
    for name in zoo.list_models(args.pattern, pretrained=args.pretrained):
        print(name)


def _cmd_info(args) -> None:
    name = registry_name(args.name)
    check_model_name(name)
    with torch.device('meta'):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    input_size = tuple(cfg.get('input_size', (3, 224, 224)))
    weights = cfg.get('hf_hub_id') or cfg.get('url') or 'none published under this name'
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
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f'{key:>16}: {value}')


def _label_names(model) -> Optional[List[str]]:
    """Class names: the checkpoint's own, or ImageNet's for a 1000/21841-class head."""
    names = model.pretrained_cfg.get('label_names')
    if names:
        return list(names)
    if model.num_classes in (1000, 1001, 11821, 21841, 21843):
        info = timm.data.ImageNetInfo(timm.data.infer_imagenet_subset(model) or 'imagenet-1k')
        return [info.index_to_description(i) for i in range(model.num_classes)]
    return None


def _read_image(image_path):
    from PIL import Image

    try:
        return Image.open(image_path).convert('RGB')
    except (OSError, ValueError) as e:
        raise SystemExit(f'zoo predict: cannot read image {image_path}: {e}')


def _cmd_predict(args) -> None:
    source = Path(args.name)
    if source.is_dir():
        model = hub.load(source)
    else:
        model = zoo.create_model(args.name, pretrained=not args.random).eval()
    if getattr(model, 'task', 'classification') != 'classification':
        from zoo.tasks import save_prediction

        for image_path in tqdm(args.images, desc='predict', disable=len(args.images) < 2, file=sys.stderr):
            print(f'{image_path} -> {save_prediction(model, _read_image(image_path), Path(image_path))}')
        return
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    labels = _label_names(model)
    for image_path in tqdm(args.images, desc='predict', disable=len(args.images) < 2, file=sys.stderr):
        with torch.no_grad():
            probs = model(transform(_read_image(image_path)).unsqueeze(0)).softmax(-1)[0]
        top = probs.topk(min(args.top_k, probs.numel()))
        print(image_path)
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            label = labels[i] if labels else f'class {i}'
            print(f'  {p:7.2%}  {i:5d}  {label}')


def _cmd_convert(args) -> None:
    from zoo.convert import family_module

    module = family_module(args.family)
    model_name = args.model
    if model_name is None:
        names = zoo.list_models(f'{args.family.lower()}_*')
        if len(names) != 1:
            raise SystemExit(f'zoo convert: name the model the checkpoint is for with --model, one of {", ".join(names)}')
        model_name = names[0]
    kwargs = {'num_classes': args.num_classes} if args.num_classes is not None else {}
    model = zoo.create_model(model_name, **kwargs)
    state_dict = module.checkpoint_filter_fn(hub.read_checkpoint(args.checkpoint), model)
    hub.load_state_dict_strict(model, state_dict, source=str(args.checkpoint))
    out = hub.save_pretrained(model.eval(), args.out)
    print(f'wrote {out} ({model_name}); load it with timm.create_model("local-dir:{out}", pretrained=True)')


def _cmd_push(args) -> None:
    commit = hub.push_folder(args.directory, args.repo_id, commit_message=args.message, private=args.private)
    print(getattr(commit, 'commit_url', commit))


def _cmd_card(args) -> None:
    if args.all:
        print(f'wrote {len(cards.write_cards())} cards to {cards.CARDS_DIR}')
    elif args.name:
        print(cards.card_for_name(args.name))
    else:
        raise SystemExit('zoo card: give a model NAME or --all')


def _cmd_compress(args) -> None:
    from zoo.tasks import video

    source = Path(args.model)
    model = hub.load(source) if source.is_dir() else zoo.create_model(args.model, pretrained=True)
    frames = video.read_frames(args.frames, frame_size=model.frame_size, max_frames=args.max_frames)
    result = video.compress(model, args.out, frames, prune=args.prune, bits=args.bits)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    ms_ssim = 'n/a (frames of 160 px or less)' if result['ms_ssim'] is None else f'{result["ms_ssim"]:.4f}'
    height, width = result['frame_size']
    print(f'wrote {result["path"]} ({result["model"]}, {result["frames"]} frames of {height}x{width})')
    print(f'  bytes: {result["bytes"]}  bpp: {result["bpp"]:.4f}  PSNR: {result["psnr"]:.2f} dB  MS-SSIM: {ms_ssim}')


def _cmd_decode(args) -> None:
    from zoo.tasks import video

    frames = video.decode_video(args.bitstream)
    out = video.write_frames(frames, args.out, fps=args.fps)
    print(f'wrote {len(frames)} frames of {frames.shape[-2]}x{frames.shape[-1]} to {out}')


def _cmd_reproduce(args) -> None:
    from huggingface_hub import snapshot_download

    from zoo import trainer

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
    if result['verdict'] == 'differs':
        raise SystemExit(1)


def _cmd_bench(args) -> None:
    from zoo.bench import bench_model

    check_model_name(args.name)
    result = bench_model(
        args.name, batch=args.batch, size=args.size, deploy=args.deploy, channels_last=args.channels_last,
        compile=args.compile, dtype=args.dtype, train=args.train, device=args.device, threads=args.threads,
        repeats=args.repeats, warmup=args.warmup)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result)


def _cmd_export(args) -> None:
    from zoo import export

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
    p.add_argument('pattern', nargs='?', default='*', help='glob, e.g. "spartan*"')
    p.add_argument('--pretrained', action='store_true', help='list published weights as name.tag')
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser('info', help='params, GMACs, input size, paper, license, weights of a model')
    p.add_argument('name')
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser('predict', help='top-k classes for images, or a depth map / mask picture for dense models')
    p.add_argument('name', help='model name[.tag], or a Hub folder written by save_pretrained')
    p.add_argument('images', nargs='+')
    p.add_argument('--top-k', type=int, default=5)
    p.add_argument('--random', action='store_true', help='random weights (no download), to try the pipeline')
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser('convert', help='official checkpoint -> Hub folder')
    p.add_argument('family')
    p.add_argument('checkpoint', type=Path)
    p.add_argument('--out', type=Path, required=True)
    p.add_argument('--model', help='zoo model the checkpoint is for (default: the family\'s only model)')
    p.add_argument('--num-classes', type=int)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser('push', help='upload a Hub folder to a Hub repo')
    p.add_argument('directory', type=Path)
    p.add_argument('repo_id')
    p.add_argument('--message', default='Add model')
    p.add_argument('--private', action='store_true')
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser('bench', help='images/s, latency, peak memory and GFLOP/s (vs a matmul) of a model')
    p.add_argument('name')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--size', type=int, help='input height and width (default: the model\'s input size)')
    p.add_argument('--deploy', action='store_true', help='re-parameterise first (timm reparameterize_model)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (with inductor freezing at inference)')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    p.add_argument('--train', action='store_true', help='time forward + backward + SGD step')
    p.add_argument('--device', help='cpu or cuda[:i] (default: cuda if available)')
    p.add_argument('--threads', type=int, help='torch CPU threads')
    p.add_argument('--repeats', type=int, default=10, help='timed batches')
    p.add_argument('--warmup', type=int, default=2, help='untimed batches first')
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser('card', help='print a model card, or regenerate model_cards/ with --all')
    p.add_argument('name', nargs='?')
    p.add_argument('--all', action='store_true')
    p.set_defaults(func=_cmd_card)

    p = sub.add_parser('compress', help='video model + its frames -> bitstream (prune, quantise, entropy-code)')
    p.add_argument('model', help='video model name[.tag] (pretrained weights), or a Hub folder of a fitted model')
    p.add_argument('frames', type=Path, help='the video the model represents: a folder of images or a video file')
    p.add_argument('--out', '-o', type=Path, required=True, help='bitstream file to write')
    p.add_argument('--prune', type=float, default=0.1, help='fraction of decoder weights pruned (default 0.1)')
    p.add_argument('--bits', type=int, default=8, help='quantisation bits for weights and embeddings (default 8)')
    p.add_argument('--max-frames', type=int, help='use the first frames only')
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser('decode', help='bitstream -> frames (a folder of PNGs, or .mp4/.mkv/.mov)')
    p.add_argument('bitstream', type=Path)
    p.add_argument('out', type=Path)
    p.add_argument('--fps', type=int, default=25, help='frame rate of a video OUT (default 25)')
    p.set_defaults(func=_cmd_decode)

    p = sub.add_parser('reproduce', help='re-run the recipe behind zoo-trained weights and compare the result')
    p.add_argument('source', help='a Hub folder or repo id written by training/train.py')
    p.add_argument('--data', help='where the training data is on this machine (default: as recorded)')
    p.add_argument('--output-dir', type=Path, help='default: runs/reproduce-<name>')
    p.add_argument('--rtol', type=float, default=0.01, help='relative tolerance on metrics when not bit-exact')
    p.set_defaults(func=_cmd_reproduce)

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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ZooError, FileNotFoundError, ValueError) as e:
        if os.environ.get('ZOO_DEBUG') == '1':
            raise
        print(f'zoo {args.command}: {e}', file=sys.stderr)
        return getattr(e, 'exit_code', 2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
