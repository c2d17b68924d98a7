"""Export a zoo model to ONNX, a torch.export ExportedProgram or TorchScript, and check that the file computes
what the eager model computes.

What is exported is the inference graph users deploy: a classifier or dense model from an image batch (the
deploy form with `deploy=True`: timm's `reparameterize_model`), HNeRV's decoder from frame embeddings, and
NeRV / NeRV++ from frame indices. `export` writes the file atomically with a JSON of the model's data config
beside it, once the exported bytes, loaded in their runtime (onnxruntime, `torch.export.load`, `torch.jit.load`),
have run random inputs at two batch sizes (one with a fixed batch) as the eager model does.
"""
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn

from zoo._io import write_atomically
from zoo.errors import InputError, ZooError

FORMATS = {'onnx': '.onnx', 'exported-program': '.pt2', 'torchscript': '.pt'}
# fp32 parity: max |exported - eager| must stay under this times the output's scale (its max |value|)
RTOL = 1e-4

def family(model: nn.Module) -> str:
    """The zoo family of a model: the name of the module in zoo.models that defines it."""
    return type(model).__module__.rsplit('.', 1)[-1]


class Decoder(nn.Module):
    """A video model's decoder as a module of one tensor: HNeRV frames from embeddings, NeRV from indices."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.decode(x) if hasattr(self.model, 'embed_shape') else self.model(index=x)


def exportable(model: nn.Module, deploy: bool = False) -> nn.Module:
    """The eval-mode module that is exported: the deploy form with `deploy`, a video model's decoder."""
    if deploy:
        model = timm.utils.reparameterize_model(model)
    model = model.eval()
    if hasattr(model, 'fast_decode'):
        # the fast decode path picks a memory layout and row bands for eager CPU; a runtime picks its own
        model.fast_decode = False
    return Decoder(model).eval() if hasattr(model, "example_inputs") else model


def input_name(module: nn.Module) -> str:
    if not isinstance(module, Decoder):
        return 'images'
    return 'embeddings' if hasattr(module.model, 'embed_shape') else 'index'


def random_input(module: nn.Module, batch: int, size: Optional[Tuple[int, int]] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random batch the exported graph takes: images, frame embeddings or frame indices."""
    if isinstance(module, Decoder):
        video = module.model
        if hasattr(video, 'embed_shape'):
            return torch.randn(batch, *video.embed_shape, generator=generator)
        return torch.randint(0, video.num_frames, (batch,), generator=generator)
    chans, height, width = module.pretrained_cfg.get('input_size', (3, 224, 224))
    chans = getattr(module, 'in_chans', chans)
    if size:
        height, width = size
    return torch.randn(batch, chans, height, width, generator=generator)


def data_config(module: nn.Module, x: torch.Tensor, format: str, **extra) -> Dict[str, Any]:
    """What a deployment needs besides the graph: input and output names and shapes, the preprocessing."""
    model = module.model if isinstance(module, Decoder) else module
    config = {
        'architecture': model.pretrained_cfg.get('architecture'),
        'format': format,
        'input': {'name': input_name(module), 'shape': list(x.shape), 'dtype': str(x.dtype).replace('torch.', '')},
        'output': {'name': 'output'},
    }
    if isinstance(module, Decoder):
        config['frame_size'] = list(model.frame_size)
        config['output']['range'] = [0.0, 1.0]
        config['num_frames'] = model.num_frames
    else:
        config['task'] = getattr(model, 'task', 'classification')
        config['data_config'] = timm.data.resolve_model_data_config(model)
        config['data_config']['input_size'] = list(x.shape[1:])
    return dict(config, **extra)


# ---------------------------------------------------------------------------------------------------------------
# Writers and loaders, one per format


def _onnx_bytes(module: nn.Module, x: torch.Tensor, dynamic_batch: bool, opset: Optional[int]) -> bytes:
    name = input_name(module)
    program = torch.onnx.export(
        module, (x,), dynamo=True, opset_version=opset, input_names=[name], output_names=['output'],
        dynamic_shapes={'x': {0: torch.export.Dim('batch', min=1, max=4096)}} if dynamic_batch else None,
        optimize=True, verbose=False)
    return program.model_proto.SerializeToString()


def _exported_program_bytes(module: nn.Module, x: torch.Tensor, dynamic_batch: bool, opset: Optional[int]) -> bytes:
    program = torch.export.export(
        module, (x,), dynamic_shapes={'x': {0: torch.export.Dim('batch', min=1, max=4096)}} if dynamic_batch else None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _torchscript_bytes(module: nn.Module, x: torch.Tensor, dynamic_batch: bool, opset: Optional[int]) -> bytes:
    traced = torch.jit.trace(module, (x,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


_WRITERS = {'onnx': _onnx_bytes, 'exported-program': _exported_program_bytes, 'torchscript': _torchscript_bytes}


def load_runner(source: Union[str, Path, bytes], format: str,
                threads: Optional[int] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running an exported file (a path, or its bytes) in its own runtime."""
    if format == 'onnx':
        import onnxruntime as ort  # optional extra: only ONNX export needs it

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), options, providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    source = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    module = torch.export.load(source).module() if format == 'exported-program' else torch.jit.load(source)

    def run(x):
        with torch.inference_mode():
            return module(x)
    return run


# ---------------------------------------------------------------------------------------------------------------
# Export and check


def compare(run: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, inputs: List[torch.Tensor]) -> Dict[str, Any]:
    """Max abs difference between `run` and the eager `module` on each input, and the output scale."""
    diffs, scales = [], []
    for x in inputs:
        with torch.inference_mode():
            expected = module(x).float()
        got = run(x).float()
        if got.shape != expected.shape:
            raise RuntimeError(f'the exported graph gave shape {tuple(got.shape)} for input {tuple(x.shape)}, '
                               f'eager {tuple(expected.shape)}')
        diffs.append((got - expected).abs().max().item())
        scales.append(expected.abs().max().item())
    scale = max(scales) or 1.0
    return {'batches': [x.shape[0] for x in inputs], 'max_abs_diff': max(diffs), 'output_scale': scale,
            'relative_diff': max(diffs) / scale}


def quantize_int8(onnx_path: Union[str, Path]) -> bytes:
    """Dynamic int8 quantisation with onnxruntime's quantizer: int8 weights, activations quantised per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # optional extra: ONNX only

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'int8.onnx'
        quantize_dynamic(str(onnx_path), str(out), weight_type=QuantType.QInt8)
        return out.read_bytes()


def sidecar_path(path: Union[str, Path]) -> Path:
    """Where the data config JSON of an exported file goes: `model.onnx` -> `model.onnx.json`."""
    path = Path(path)
    return path.with_name(path.name + '.json')


def export(
        model: nn.Module,
        path: Union[str, Path],
        format: str = 'onnx',
        deploy: bool = False,
        dynamic_batch: bool = False,
        int8: bool = False,
        opset: Optional[int] = None,
        size: Optional[Tuple[int, int]] = None,
        batch: int = 2,
        seed: int = 0,
) -> Dict[str, Any]:
    """Export `model` to `path`, check it against eager, write `<path>.json`; returns that JSON's content.

    The check runs the exported bytes in their runtime at batch 1 and 3 with `dynamic_batch`, else twice at `batch`; fp32
    exports must agree within `RTOL` times the output scale; an int8 one reports its difference.
    """
    if format not in FORMATS:
        raise InputError(f'format must be one of {", ".join(FORMATS)}, got {format!r}')
    if int8 and format != 'onnx':
        raise InputError('--int8 quantises an ONNX graph with onnxruntime: use --format onnx')
    path = Path(path)
    module = exportable(model, deploy=deploy)
    generator = torch.Generator().manual_seed(seed)
    x = random_input(module, 2 if dynamic_batch else batch, size, generator)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            data = _WRITERS[format](module, x, dynamic_batch, opset)
    except Exception as e:  # each exporter raises its own kinds; the user gets the first line of what it said
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        others = ' or '.join(f for f in FORMATS if f != format)
        raise ZooError(f'{family(model)} failed to export to {format} ({type(e).__name__}: {first_line}); '
                       f'try --format {others}') from e
    seconds = time.perf_counter() - start
    batches = (1, 3) if dynamic_batch else (x.shape[0], x.shape[0])
    inputs = [random_input(module, b, size, generator) for b in batches]
    # checked before it is written, so a graph that computes something else never replaces a file at `path`
    check = compare(load_runner(data, format), module, inputs)
    if check['relative_diff'] > RTOL:
        raise ZooError(
            f'the exported {format} graph differs from eager by {check["max_abs_diff"]:.3g} (output scale '
            f'{check["output_scale"]:.3g}, tolerance {RTOL:g} x scale); nothing was written')
    write_atomically(path, lambda f: f.write(data))
    result = {'path': str(path), 'seconds': round(seconds, 2), 'fp32_check': check}
    if int8:
        q_path = path.with_name(f'{path.stem}.int8{path.suffix}')
        q_data = quantize_int8(path)
        result['int8'] = {'path': str(q_path), 'check': compare(load_runner(q_data, 'onnx'), module, inputs)}
        write_atomically(q_path, lambda f: f.write(q_data))
    config = data_config(module, x, format, deploy=deploy, dynamic_batch=dynamic_batch, opset=opset, check=result)
    write_atomically(sidecar_path(path), lambda f: f.write((json.dumps(config, indent=2) + '\n').encode()))
    return config


def summary(config: Dict[str, Any]) -> str:
    """What `zoo export` prints: the files written and the parity check."""
    result = config['check']
    form = ', '.join(k.replace('_', ' ') for k in ('deploy', 'dynamic_batch') if config[k])
    lines = [f'wrote {result["path"]} ({config["architecture"]}, {config["format"]}{", " + form if form else ""}, '
             f'input {config["input"]["name"]} {tuple(config["input"]["shape"])}) and {sidecar_path(result["path"])}']
    runtime = {'onnx': 'onnxruntime', 'exported-program': 'torch.export.load', 'torchscript': 'torch.jit.load'}
    check = result['fp32_check']
    lines.append(
        f'  {runtime[config["format"]]} vs eager at batch {" and ".join(map(str, check["batches"]))}: max abs diff '
        f'{check["max_abs_diff"]:.3g} = {check["relative_diff"]:.2g} x output scale {check["output_scale"]:.3g} '
        f'(tolerance {RTOL:g} x scale)')
    if 'int8' in result:
        q = result['int8']['check']
        lines.append(f'  int8: wrote {result["int8"]["path"]}; vs eager fp32: max abs diff {q["max_abs_diff"]:.3g} = '
                     f'{q["relative_diff"]:.2g} x output scale (accuracy on real data: docs/benchmarks.md)')
    return '\n'.join(lines)
