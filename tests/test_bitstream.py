"""A bitstream is data: hostile headers and payloads end in a BitstreamError (one line from `zoo decode`), never
in code, a fetch, a file read, another exception or a damaged output; the CLI's compress / decode failures; the
video models' construction and frame-index checks; 16-bit images."""
import importlib.util
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import zoo
from zoo import cli, codec, hub
from zoo.tasks import video

_spec = importlib.util.spec_from_file_location(
    'bitstream_fuzz', Path(__file__).resolve().parents[1] / 'benchmarks' / 'bitstream_fuzz.py')
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


def tiny_model(name, **overrides):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(fuzz.SEED_MODELS[name], **overrides)).eval()


@pytest.fixture(scope='module')
def bitstreams(tmp_path_factory):
    """A bitstream of each tiny video model: HNeRV (with stored embeddings), NeRV, NeRV++."""
    folder = tmp_path_factory.mktemp('bitstreams')
    paths = {}
    for name in fuzz.SEED_MODELS:
        model = tiny_model(name)
        paths[name] = folder / f'{name}.zvid'
        codec.compress(model, paths[name], torch.rand(4, 3, 64, 96) if model.stored_embeddings else None)
    return {name: path.read_bytes() for name, path in paths.items()}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No socket can connect, and torch / HF caches point at an empty folder, which the test checks stays empty."""
    for name in ('connect', 'connect_ex'):
        monkeypatch.setattr(socket.socket, name, fuzz._refuse)
    monkeypatch.setattr(socket, 'create_connection', fuzz._refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', fuzz._refuse)
    cache = tmp_path / 'cache'
    cache.mkdir()
    monkeypatch.setenv('TORCH_HOME', str(cache))
    monkeypatch.setenv('HF_HOME', str(cache))
    yield
    assert not any(cache.rglob('*')), 'decoding wrote into a cache'


def crafted(blob, change):
    """`blob` with its header changed by `change(header)`, and a valid CRC: well-formed, but hostile."""
    header, payload = fuzz.split(blob)
    change(header)
    return fuzz.join(header, payload)


def _stderr(capsys) -> str:
    """What the command printed on stderr, less its progress lines (`zoo CMD: decoding ...`)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.endswith('...')]
    return ''.join(line + '\n' for line in lines)


def decode_cli(tmp_path, blob, capsys):
    """`zoo decode` of `blob` over an existing output folder: (exit code, stderr, whether the output is intact)."""
    case, out = tmp_path / 'case.zvid', tmp_path / 'out'
    video.write_frames(torch.full((1, 3, 8, 8), 0.5), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    case.write_bytes(blob)
    capsys.readouterr()
    code = cli.main(['decode', str(case), str(out)])
    err = _stderr(capsys)
    return code, err, {p.name: p.read_bytes() for p in out.iterdir()} == before


# Each case of issue #14 (bitstream part), as a change to a real header, and what the one-line error says.
HOSTILE_HEADERS = {
    'pretrained_with_overlay_url': (
        'nerv_s', lambda h: h['model_args'].update(
            pretrained=True, pretrained_cfg_overlay={'url': 'http://127.0.0.1:9/nyu_swintiny.pt'}),
        "model argument 'pretrained' is not allowed"),
    'overlay_alone': (
        'hnerv_0_35m', lambda h: h['model_args'].update(pretrained_cfg_overlay={'file': '/etc/passwd'}),
        "model argument 'pretrained_cfg_overlay' is not allowed"),
    'checkpoint_path': (
        'nerv_s', lambda h: h['model_args'].update(checkpoint_path='/etc/passwd'),
        "model argument 'checkpoint_path' is not allowed"),
    'model_resnet18': ('nerv_s', lambda h: h.update(model='resnet18'), "model 'resnet18' is not a zoo video model"),
    'model_5': ('nerv_s', lambda h: h.update(model=5), 'model 5 is not a zoo video model'),
    'tagged_model': ('hnerv_0_35m', lambda h: h.update(model='hnerv_1_5m.bunny'), 'is not a zoo video model'),
    'frames_100000000': ('hnerv_0_35m', lambda h: h.update(frames=100_000_000),
                         r'frames must be an integer in 1\.\.100000; got 100000000'),
    'frames_-5': ('nerv_s', lambda h: h.update(frames=-5), r'frames must be an integer in 1\.\.100000; got -5'),
    'bits_64': ('nervpp_xs', lambda h: h.update(bits=64), r'bits must be an integer in 1\.\.16; got 64'),
    'no_tensors': ('nerv_s', lambda h: h.pop('tensors'), "header lacks 'tensors'"),
    'frames_50000_small_file': ('nerv_s', lambda h: h.update(frames=50_000),
                                r'55355 payload bytes cannot hold 50000 frames of 64x96: .* below the floor'),
    'frames_not_num_frames': ('nerv_s', lambda h: h.update(frames=5),
                              'declares 5 frames, but its nerv_s represents num_frames=4'),
    'frames_and_num_frames_50000_small_file': (
        'nerv_s', lambda h: (h.update(frames=50_000), h['model_args'].update(num_frames=50_000)),
        r'payload bytes cannot hold 50000 frames of 64x96: .* bits per pixel, below the floor'),
    'hnerv_frames_50000_small_file': ('hnerv_0_35m', lambda h: h.update(frames=50_000), 'below the floor'),
    'hnerv_frames_not_embeddings': (
        'hnerv_0_35m', lambda h: h.update(frames=5), r'its frame embeddings are \(4, [^)]*\), not \(5, '),
    'hnerv_frames_50000_with_table': (
        'hnerv_0_35m', lambda h: (h.update(frames=50_000), h['tensors'][-1][1].__setitem__(0, 50_000)),
        'below the floor'),
    'huge_width': ('nerv_s', lambda h: h['model_args'].update(fc_dim=100_000),
                   r'model_args\.fc_dim must be an integer in 1\.\.4096'),
    'long_video': ('nerv_s', lambda h: (h.update(frames=100_000),
                                        h['model_args'].update(frame_size=[128, 128], num_frames=100_000)),
                   r'decode to .* values, above the limit of 4294967296 \(MAX_DECODED_VALUES'),
    'nan_number': ('nervpp_xs', lambda h: h['model_args'].update(pe_base=float('nan')), 'not a number a bitstream'),
    'unknown_field': ('nerv_s', lambda h: h.update(script='import os'), "unknown fields 'script'"),
    'negative_dim': ('nerv_s', lambda h: h['tensors'][0][1].__setitem__(0, -1), 'every tensor entry must be'),
    'hnerv_without_encoder_strides': ('hnerv_0_35m', lambda h: h['model_args'].update(enc_strides=[]),
                                      'HNeRV needs enc_strides'),
    'activation_name': ('nerv_s', lambda h: h['model_args'].update(act_layer='os.system'),
                        r'act_layer must be one of gelu, relu, silu'),
}


@pytest.mark.parametrize('case', list(HOSTILE_HEADERS))
def test_hostile_headers_are_refused_in_one_line(case, bitstreams, tmp_path, capsys, offline, monkeypatch):
    """Refused before anything is built: no weights are read (torch.load and timm's checkpoint loader would fail
    the test), no socket opens, and the existing output stays as it was."""
    def no_load(*args, **kwargs):
        raise AssertionError('decoding a bitstream read a checkpoint')

    monkeypatch.setattr(torch, 'load', no_load)
    monkeypatch.setattr(timm.models, 'load_checkpoint', no_load)
    name, change, message = HOSTILE_HEADERS[case]
    code, err, intact = decode_cli(tmp_path, crafted(bitstreams[name], change), capsys)
    assert code == codec.BitstreamError.exit_code and intact
    assert err.count('\n') == 1 and err.startswith('zoo decode: ')
    assert __import__('re').search(message, err), err


def test_the_encoder_keeps_the_decoders_limits(tmp_path):
    """Whatever compress writes decodes: it refuses, before writing, a model the decoder's limits would refuse."""
    with pytest.raises(zoo.errors.InputError, match='below the floor'):
        codec.compress(tiny_model('nerv_s', num_frames=50_000), tmp_path / 'a.zvid')
    model = tiny_model('nerv_s')
    with torch.no_grad():
        model.heads['2'].bias[0] = float('nan')
    with pytest.raises(zoo.errors.InputError, match='NaN or infinite'):
        codec.compress(model, tmp_path / 'a.zvid')
    assert not list(tmp_path.iterdir())


def test_payload_records_are_checked_before_decoding(bitstreams, tmp_path):
    header, payload = fuzz.split(bitstreams['hnerv_0_35m'])
    offsets = fuzz._record_offsets(header, payload)
    for field, value, message in ((8, b'\x07', 'has coding 7'), (4, b'\x00\x00\xc0\x7f', 'has the range'),
                                  (0, b'\x00\x00\x80\xff', 'has the range')):
        broken = bytearray(payload)
        broken[offsets[1] + field:offsets[1] + field + len(value)] = value
        path = tmp_path / 'bad.zvid'
        path.write_bytes(fuzz.join(header, bytes(broken)))
        with pytest.raises(codec.BitstreamError, match=message):
            codec.decompress(path)
    path.write_bytes(fuzz.join(dict(header, payload_bytes=len(payload) + 1), payload + b'\x00'))
    with pytest.raises(codec.BitstreamError, match='1 payload bytes follow the last tensor'):
        codec.decompress(path)


def test_one_corrupt_byte_anywhere_is_detected(bitstreams, tmp_path):
    """The CRC covers prefix, header and payload: one changed byte (in the prefix, every third of the header, a
    sample of the payload, the CRC) is a BitstreamError."""
    blob = bitstreams['nerv_s']
    header_end = 10 + int.from_bytes(blob[6:10], 'little')
    rng = np.random.default_rng(0)
    positions = [*range(10), *range(10, header_end, 3), *rng.choice(np.arange(header_end, len(blob) - 4), 32),
                 *range(len(blob) - 4, len(blob))]
    path = tmp_path / 'bad.zvid'
    for position in positions:
        damaged = bytearray(blob)
        damaged[position] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(damaged))
        with pytest.raises(codec.BitstreamError):
            codec.decompress(path)


def test_fuzzed_bitstreams_decode_or_fail_with_a_bitstream_error(bitstreams, tmp_path, offline):
    """200 cases of the benchmark's seeded fuzzer (benchmarks/bitstream_fuzz.py runs 10,000), each decoded as
    `zoo decode` does over an existing output, with sockets blocked."""
    outcomes, failures = fuzz.run(list(bitstreams.values()), 200, seed=14, folder=tmp_path)
    assert not failures, '\n'.join(failures[:10])
    assert outcomes['decoded'] > 0 and outcomes['BitstreamError'] > 150  # both ends of the decoder are reached


# ---------------------------------------------------------------------------------------------------------------
# zoo compress / zoo decode failures


def test_compress_to_an_existing_folder(tmp_path, capsys):
    (tmp_path / 'out').mkdir()
    assert cli.main(['compress', 'nerv_s', str(tmp_path), '-o', str(tmp_path / 'out')]) == 2
    err = _stderr(capsys)
    assert err.count('\n') == 1 and 'is a folder: give the bitstream file to write' in err


def test_decode_into_a_folder_named_like_a_video(bitstreams, tmp_path, capsys):
    bitstream, out = tmp_path / 'video.zvid', tmp_path / 'x.mp4'
    bitstream.write_bytes(bitstreams['nerv_s'])
    out.mkdir()
    (out / 'mine.txt').write_text('kept')
    assert cli.main(['decode', str(bitstream), str(out)]) == 2
    err = _stderr(capsys)
    assert err.count('\n') == 1 and 'x.mp4 is a folder' in err
    assert [p.name for p in out.iterdir()] == ['mine.txt']


def test_compress_a_classifier_folder(tmp_path, capsys):
    hub.save_pretrained(timm.create_model('spartan_tiny', num_classes=10), tmp_path / 'classifier')
    assert cli.main(['compress', str(tmp_path / 'classifier'), str(tmp_path), '-o', str(tmp_path / 'a.zvid')]) == 2
    err = _stderr(capsys)
    assert err.count('\n') == 1 and "model 'spartan_tiny' is not a zoo video model" in err
    assert cli.main(['compress', 'spartan_tiny', str(tmp_path), '-o', str(tmp_path / 'a.zvid')]) == 2
    assert "model 'spartan_tiny' is not a zoo video model" in _stderr(capsys)
    assert not (tmp_path / 'a.zvid').exists()


def test_compress_a_model_without_weights(tmp_path, capsys):
    assert cli.main(['compress', 'nerv_s', str(tmp_path), '-o', str(tmp_path / 'a.zvid')]) == 2
    err = _stderr(capsys)
    assert err.count('\n') == 1 and 'nerv_s has no published weights' in err and 'nerv_s_bunny.yaml' in err


# ---------------------------------------------------------------------------------------------------------------
# Video models: construction and frame-index checks


@pytest.mark.parametrize('name', list(fuzz.SEED_MODELS))
@pytest.mark.parametrize('bad', [dict(num_frames=0), dict(num_frames=-3), dict(frame_size=(0, 96)),
                                 dict(frame_size=(-64, 96)), dict(fc_dim=0)])
def test_non_positive_counts_and_sizes_fail_at_construction(name, bad):
    key = next(iter(bad))
    with pytest.raises(zoo.errors.InputError, match=f'{key} must be positive'):
        with torch.device('meta'):
            timm.create_model(name, **dict(fuzz.SEED_MODELS[name], **bad))


@pytest.mark.parametrize('name', ['nerv_s', 'nervpp_xs'])
def test_frame_index_outside_the_fitted_frames_is_refused(name):
    model = tiny_model(name)
    with torch.no_grad():
        for index, message in ((torch.tensor([4]), r'outside the 4 frames .* \(0\.\.3\)'),
                               (torch.tensor([1000]), 'outside the 4 frames'), (torch.tensor([-1]), 'outside'),
                               (torch.tensor([1.5]), 'between two frames; pass interpolate=True')):
            with pytest.raises(zoo.errors.InputError, match=message):
                model.encode(index=index)
        with pytest.raises(zoo.errors.InputError, match='outside'):  # interpolation is between fitted frames only
            model(torch.tensor([3.5]), interpolate=True)
        ends = model(torch.tensor([1, 2]))
        middle = model(torch.tensor([1.5]), interpolate=True)
        assert torch.equal(model(torch.tensor([1.0, 2.0])), ends)  # whole float indices are frames
    assert middle.shape == (1, 3, 64, 96) and not torch.equal(middle[0], ends[0])


# ---------------------------------------------------------------------------------------------------------------
# 16-bit images


def sixteen_bit_png(path):
    """A 16-bit greyscale PNG (as depth maps and medical slices come) with values over the whole 0..65535."""
    values = np.linspace(0, 65535, 64 * 96).round().astype(np.uint16).reshape(64, 96)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == 'I;16'
    return values


def test_16_bit_frames_keep_their_range(tmp_path):
    folder = tmp_path / 'frames'
    folder.mkdir()
    values = sixteen_bit_png(folder / 'frame_0001.png')
    frames = video.read_frames(folder)
    assert frames.shape == (1, 3, 64, 96)
    torch.testing.assert_close(frames[0, 1], torch.from_numpy(values.astype(np.float32) / 65535))
    assert (frames >= 0.999).float().mean() < 0.01  # clipped at 255, 99.6% of it read as white


def test_predict_reads_16_bit_images_over_their_range(tmp_path):
    values = sixteen_bit_png(tmp_path / 'depth.png')
    image = np.asarray(cli._read_image(tmp_path / 'depth.png'))
    assert image.dtype == np.uint8 and image.shape == (64, 96, 3)
    np.testing.assert_array_equal(image[..., 0], np.round(values / 65535 * 255).astype(np.uint8))
