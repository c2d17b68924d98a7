"""Bad arguments, paths and files on the command line: one clear line on stderr and a non-zero exit, never a
traceback (#14). Bitstream and recipe cases are in test_video_tasks.py and test_recipes.py."""
import importlib.util
import json
import os
import re
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image

from zoo import cli, hub

REPO = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    """Exit code and stderr without its progress (`zoo CMD: building ...`, tqdm bars)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, '\n'.join(line for line in err.splitlines() if line.strip() and not (
        line.endswith('...') or '%|' in line))


def _one_line(err):
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    return err


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    torch.manual_seed(0)
    return hub.save_pretrained(timm.create_model('test_convnext', num_classes=2),
                               tmp_path_factory.mktemp('hub') / 'model')


@pytest.fixture(scope='module')
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp('images') / 'x.png'
    Image.new('RGB', (40, 40), 'gray').save(path)
    return path


def test_convert_refuses_a_file_as_out_and_a_path_under_a_file(capsys, tmp_path):
    taken = tmp_path / 'taken'
    taken.write_text('keep me')
    for out in (taken, taken / 'model'):
        code, err = run(capsys, 'convert', 'spartan', tmp_path / 'missing.pth', '--out', out)
        assert code == 2 and f'zoo convert: {out} ' in _one_line(err) and 'is a file' in err
    assert taken.read_text() == 'keep me'


def test_train_refuses_a_file_as_output_dir(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location('train_script', REPO / 'training' / 'train.py')
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    taken = tmp_path / 'taken'
    taken.write_text('keep me')
    code = train_script.main(['--recipe', str(REPO / 'training' / 'recipes' / 'spartan_tiny.yaml'),
                              '--output-dir', str(taken)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and _one_line(err) == f'train.py: {taken} is a file; give a folder (new, or one to update)'


@pytest.mark.parametrize('change, message', [
    (lambda config: [1, 2], 'is not a timm config.json'),
    (lambda config: dict(config, model_args={'bogus_arg': 3}), "model_args do not fit test_convnext.*'bogus_arg'"),
])
def test_hub_folders_with_a_bad_config_are_refused(capsys, folder, image, tmp_path, change, message):
    bad = tmp_path / 'bad'
    bad.mkdir()
    for name in ('config.json', 'model.safetensors'):
        (bad / name).write_bytes((folder / name).read_bytes())
    (bad / 'config.json').write_text(json.dumps(change(json.loads((folder / 'config.json').read_text()))))
    code, err = run(capsys, 'predict', bad, image)
    assert code == 4
    assert err.startswith(f'zoo predict: {bad / "config.json"}') and _one_line(err)
    assert re.search(message, err), err


@pytest.mark.parametrize('args, message', [
    (['--batch', '0'], 'batch must be at least 1, got 0'),
    (['--batch', '-1'], 'batch must be at least 1, got -1'),
    (['--device', 'tpu9'], "unknown device 'tpu9'"),
    (['--repeats', '0'], 'repeats must be at least 1'),
])
def test_bench_refuses_bad_arguments(capsys, args, message):
    code, err = run(capsys, 'bench', 'test_convnext', *args)
    assert code == 2 and message in _one_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without a GPU')
def test_bench_on_cuda_without_a_gpu(capsys):
    code, err = run(capsys, 'bench', 'test_convnext', '--device', 'cuda')
    assert code == 2 and "device 'cuda' is not available on this machine" in _one_line(err)


def test_predict_refuses_a_non_positive_top_k(capsys, folder, image):
    code, err = run(capsys, 'predict', folder, image, '--top-k', '-3')
    assert code == 2 and _one_line(err) == 'zoo predict: --top-k must be at least 1, got -3'


def _png_header_only(path, width, height):
    """A PNG whose header claims `width` x `height` RGB pixels (a decompression bomb, as PIL sees it)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))


def test_predict_refuses_a_decompression_bomb(capsys, folder, tmp_path):
    bomb = tmp_path / 'bomb.png'
    _png_header_only(bomb, 30000, 30000)
    code, err = run(capsys, 'predict', folder, bomb)
    assert code == 2 and re.match(f'zoo predict: cannot read image {bomb}.*exceeds limit', _one_line(err))


def test_predict_a_model_without_weights_suggests_random(capsys, image):
    code, err = run(capsys, 'predict', 'halonet_h0', image)
    assert code == 5 and 'halonet_h0 has no published weights' in _one_line(err) and '--random' in err


def test_push_without_a_reachable_hub(capsys, folder, hub, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(('127.0.0.1', 0))
        closed = f'http://127.0.0.1:{s.getsockname()[1]}'
    monkeypatch.setattr(constants, 'ENDPOINT', closed)
    monkeypatch.setenv('HF_ENDPOINT', closed)
    code, err = run(capsys, 'push', folder, 'org/name')
    assert code == 2 and f'could not push to org/name at {closed}' in _one_line(err)


def test_accelerate_launch_quiet_gives_the_one_line_only(tmp_path):
    """accelerate's launcher re-raises a failed training script as CalledProcessError unless `--quiet`."""
    recipe = tmp_path / 'tiny.yaml'
    recipe.write_text(yaml.safe_dump(dict(model='test_convnext', model_args=dict(num_classes=2),
                                          task='classification', train=dict(batch_size=2))))
    env = dict(os.environ, PYTHONPATH=str(REPO), ACCELERATE_USE_CPU='1')
    result = subprocess.run(
        [sys.executable, '-m', 'accelerate.commands.launch', '--quiet', '--num_processes', '1', '--cpu',
         str(REPO / 'training' / 'train.py'), '--recipe', str(recipe), '--data', str(tmp_path / 'nonexistent'),
         '--output-dir', str(tmp_path / 'run')],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert f'train.py: no training images at {tmp_path / "nonexistent"}' in result.stderr
    assert 'Traceback' not in result.stderr and 'CalledProcessError' not in result.stderr
