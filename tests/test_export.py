"""`zoo export`: every family exports to ONNX and computes what the eager model computes in onnxruntime; the other
formats, dynamic batch, int8, the data config beside the file, and the CLI."""
import json
import sys
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn as nn

import zoo
from zoo import cli, export, hub
from zoo.errors import InputError, ZooError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))

# The smallest variant of each family, cut down (fewer blocks, narrower, smaller input) so that the ONNX export
# stays quick; each keeps the operators the family is about (dilated re-param kernels, the complex CMixer step,
# halo windows, gated positional attention, deformable attention with grid_sample, ...).
TINY = {
    'unireplknet_a': (dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_sizes=((3,), (13,), (13,), (13,))), 64),
    'spartan_tiny': (dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)), 64),
    'halonet_h0': (dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_chs=16, num_heads=2, pad_to_block=True), 64),
    'convit_tiny': (dict(img_size=32, patch_size=8, embed_dim=16, depth=2, local_up_to_layer=1), 32),  # 4 heads x 16
    'inception_resnet_v1': (dict(depths=(1, 1, 1)), 80),
    'idisc_resnet101': (dict(encoder='resnet18', hidden_dim=16, latent_dim=8, num_latents=4), (48, 64)),
    'timesnet_convnext_tiny_convnext_tiny': (dict(encoder='test_convnext', decoder='test_convnext'), 64),
    'macmd_pvt_v2_b2': (dict(encoder='test_convnext', in_chans=1), 64),
    'hnerv_0_35m': (dict(frame_size=(80, 160), num_frames=8, enc_strides=(5, 4, 2), dec_strides=(5, 2, 2, 2),
                         enc_dim=16, fc_dim=12, lower_width=6), None),
    'nerv_s': (dict(frame_size=(40, 80), strides=(5, 2, 2), fc_dim=8, stem_dim=32, lower_width=4, num_frames=10), None),
    'nervpp_xs': (dict(frame_size=(40, 80), strides=(5, 2, 2), fc_dim=8, stem_dim=16, lower_width=8, num_frames=10),
                  None),
}


def tiny(name: str) -> nn.Module:
    """A cut-down model with every weight and norm statistic random, so that no branch is trivially zero."""
    kwargs, _ = TINY[name]
    torch.manual_seed(0)
    model = zoo.create_model(name, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _size(name):
    size = TINY[name][1]
    return None if size is None else (size, size) if isinstance(size, int) else size


@pytest.mark.parametrize('name, deploy', [(n, False) for n in TINY] + [('unireplknet_a', True)])
def test_every_family_exports_to_onnx_and_matches_eager(tmp_path, name, deploy):
    out = tmp_path / f'{name}.onnx'
    config = export.export(tiny(name), out, format='onnx', deploy=deploy, size=_size(name))
    check = config['check']['fp32_check']
    assert check['relative_diff'] < export.RTOL and check['output_scale'] > 0
    onnx.checker.check_model(str(out))
    assert json.loads(export.sidecar_path(out).read_text()) == json.loads(json.dumps(config))
    assert config['deploy'] is deploy and config['input']['shape'][0] == 2


def test_unireplknet_deploy_graph_is_the_reparameterised_one(tmp_path):
    model = tiny('unireplknet_a')
    keys = list(model.state_dict())
    export.export(model, tmp_path / 'train.onnx', size=(64, 64))
    export.export(model, tmp_path / 'deploy.onnx', deploy=True, size=(64, 64))
    convs = {k: sum(n.op_type == 'Conv' for n in onnx.load(str(tmp_path / f'{k}.onnx')).graph.node)
             for k in ('train', 'deploy')}
    assert convs['deploy'] < convs['train']  # the dilated branches and BNs are folded into one kernel
    assert list(model.state_dict()) == keys  # the caller's model keeps its training form


def test_video_decoders_take_embeddings_or_indices(tmp_path):
    hnerv = export.export(tiny('hnerv_0_35m'), tmp_path / 'hnerv.onnx')
    assert hnerv['input']['name'] == 'embeddings' and hnerv['frame_size'] == [80, 160]
    nerv = export.export(tiny('nerv_s'), tmp_path / 'nerv.onnx', dynamic_batch=True)
    assert nerv['input']['name'] == 'index' and nerv['input']['dtype'] == 'int64'
    assert nerv['check']['fp32_check']['batches'] == [1, 3]


@pytest.mark.parametrize('format', ['exported-program', 'torchscript'])
def test_other_formats_load_back_and_match(tmp_path, format):
    out = tmp_path / f'model{export.FORMATS[format]}'
    config = export.export(tiny('spartan_tiny'), out, format=format, dynamic_batch=True, size=(64, 64))
    assert config['check']['fp32_check']['batches'] == [1, 3]
    run = export.load_runner(out, format)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        expected = tiny('spartan_tiny')(x)
    torch.testing.assert_close(run(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_a_graph_that_computes_something_else_never_replaces_the_file(tmp_path, monkeypatch):
    out = tmp_path / 'model.onnx'
    out.write_bytes(b'the good file')
    real = export.load_runner
    monkeypatch.setattr(export, 'load_runner', lambda *a, **k: (lambda x: real(*a, **k)(x) + 1))
    with pytest.raises(ZooError, match='differs from eager'):
        export.export(tiny('spartan_tiny'), out, size=(64, 64))
    assert out.read_bytes() == b'the good file' and not export.sidecar_path(out).exists()
    assert [p.name for p in tmp_path.iterdir()] == ['model.onnx']


def test_bad_requests_get_one_line(tmp_path):
    with pytest.raises(InputError, match='format must be one of'):
        export.export(tiny('spartan_tiny'), tmp_path / 'm.onnx', format='tflite')
    with pytest.raises(InputError, match='--format onnx'):
        export.export(tiny('spartan_tiny'), tmp_path / 'm.pt2', format='exported-program', int8=True)


def test_cli_exports_a_hub_folder_with_int8(tmp_path, capsys):
    folder = hub.save_pretrained(tiny('convit_tiny'), tmp_path / 'folder')
    out = tmp_path / 'convit.onnx'
    code = cli.main(['export', str(folder), '--dynamic-batch', '--int8', '--opset', '18', '-o', str(out)])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert 'onnxruntime vs eager at batch 1 and 3' in text and 'int8' in text
    config = json.loads(export.sidecar_path(out).read_text())
    assert config['data_config']['input_size'] == [3, 32, 32] and config['data_config']['mean']
    assert config['opset'] == 18 and onnx.load(str(out)).opset_import[0].version == 18
    int8 = onnx.load(config['check']['int8']['path'])
    assert any(n.op_type in ('MatMulInteger', 'DynamicQuantizeLinear') for n in int8.graph.node)
    assert config['check']['int8']['check']['relative_diff'] < 0.1


def test_cli_error_is_one_line(tmp_path, capsys):
    code = cli.main(['export', 'spartan_tiny', '--random', '--format', 'exported-program', '--int8', '-o',
                     str(tmp_path / 'm.pt2')])
    _, err = capsys.readouterr()
    assert code == InputError.exit_code and err.count('\n') == 1 and '--format onnx' in err


def test_gpu_suite_smoke_runs_on_cpu(tmp_path):
    import gpu_suite

    result = gpu_suite.main(['--smoke', '--out', str(tmp_path)])
    measured = [r for r in result['rows'] if 'img_s' in r or 'trainer_step_ms' in r]
    assert {r['section'] for r in measured} == {'unireplknet', 'hnerv', 'classifiers', 'trainer'}
    assert {r['mode'] for r in measured if r['section'] == 'unireplknet'} == {'eager', 'compiled'}
    assert json.loads((tmp_path / 'gpu_suite.json').read_text())['rows'] == json.loads(json.dumps(result['rows']))
    assert '| unireplknet | unireplknet_a | compiled |' in (tmp_path / 'gpu_suite.md').read_text()
