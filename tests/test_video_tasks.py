"""Video tasks: frame IO, metrics against the official HNeRV code, losses, the bitstream, interpolation."""
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from zoo import cli, codec
from zoo.tasks import video

FIXTURES = Path(__file__).parent / 'fixtures' / 'metrics'


def smooth_frames(t=4, h=32, w=48, seed=0):
    """Frames with smooth content (H.264 keeps them well), float32 in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(t, 3, 4, 6, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode='bilinear', align_corners=False)


# ---------------------------------------------------------------------------------------------------------------
# Frame IO


def test_png_folder_round_trip_is_exact_and_naturally_ordered(tmp_path):
    frames = (smooth_frames(t=12) * 255).round() / 255
    out = video.write_frames(frames, tmp_path / 'frames')
    assert sorted(p.name for p in out.iterdir())[:2] == ['frame_00000.png', 'frame_00001.png']
    assert torch.equal(video.read_frames(out), frames)
    # natural order: frame_2 before frame_10, whatever the zero padding
    natural = tmp_path / 'natural'
    natural.mkdir()
    for i in (10, 2, 1):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(natural / f'f_{i}.png')
    assert (video.read_frames(natural)[:, 0, 0, 0] * 255).round().tolist() == [1, 2, 10]


def test_mp4_round_trip(tmp_path):
    frames = smooth_frames(t=6, h=64, w=96)
    path = video.write_frames(frames, tmp_path / 'clip.mp4')
    back = video.read_frames(path)
    assert back.shape == frames.shape and back.dtype == torch.float32
    assert video.psnr(back, frames).min() > 33  # H.264 at crf 18 with 4:2:0 chroma
    grey = frames.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    assert video.psnr(video.read_frames(video.write_frames(grey, path)), grey).min() > 42
    # every frame comes back in its place: closest to its own source
    errors = ((back[:, None] - frames[None]) ** 2).flatten(2).mean(2)
    assert errors.argmin(1).tolist() == list(range(6))
    assert video.read_frames(path, max_frames=2).shape[0] == 2


def test_frame_size_resizes_to_cover_then_crops_centre(tmp_path):
    frames = torch.zeros(1, 3, 36, 64)
    frames[:, :, 2:34] = 1  # a 32-row band: exactly what a centre crop to 32x64 keeps
    video.write_frames(frames, tmp_path / 'f')
    assert torch.equal(video.read_frames(tmp_path / 'f', frame_size=(32, 64)), torch.ones(1, 3, 32, 64))
    assert video.read_frames(tmp_path / 'f', frame_size=(64, 64)).shape == (1, 3, 64, 64)


def test_read_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match='no frames at'):
        video.read_frames(tmp_path / 'missing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no frames in'):
        video.read_frames(tmp_path / 'empty')
    mixed = tmp_path / 'mixed'
    mixed.mkdir()
    Image.new('RGB', (48, 32)).save(mixed / 'a.png')
    Image.new('RGB', (48, 30)).save(mixed / 'b.png')
    with pytest.raises(ValueError, match=r'b\.png is 30x48, but a\.png is 32x48'):
        video.read_frames(mixed)
    (mixed / 'b.png').write_bytes(b'not a picture')
    with pytest.raises(ValueError, match=r'cannot read frame .*b\.png'):
        video.read_frames(mixed)
    (tmp_path / 'junk.mp4').write_bytes(b'not a video')
    with pytest.raises(ValueError, match='cannot read'):
        video.read_frames(tmp_path / 'junk.mp4')


def test_writes_are_atomic_and_never_clobber_other_files(tmp_path):
    good = video.write_frames(smooth_frames(), tmp_path / 'good.mp4')
    before = good.read_bytes()
    with pytest.raises(ValueError, match='even frame height and width'):
        video.write_frames(torch.rand(2, 3, 31, 48), good)
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['good.mp4']  # no temp file left behind
    with pytest.raises(ValueError, match='give a folder .* or a .mp4/.mkv/.mov video'):
        video.write_frames(smooth_frames(), tmp_path / 'clip.avi')
    # a folder of our frames is replaced whole (no stale frames from a longer video) ...
    folder = video.write_frames(smooth_frames(t=5), tmp_path / 'frames')
    video.write_frames(smooth_frames(t=2), folder)
    assert len(list(folder.iterdir())) == 2
    # ... a folder holding anything else is refused
    (folder / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match='notes.txt'):
        video.write_frames(smooth_frames(t=2), folder)
    assert (folder / 'notes.txt').read_text() == 'mine'


# ---------------------------------------------------------------------------------------------------------------
# Metrics and losses against hnerv_utils.py


@pytest.fixture(scope='module')
def reference():
    return load_file(FIXTURES / 'metrics_psnr_msssim.io.safetensors'), json.loads(
        (FIXTURES / 'metrics_psnr_msssim.json').read_text())


@pytest.mark.parametrize('size', ['64x128', '176x176'])
def test_metrics_match_the_official_code(reference, size):
    tensors, meta = reference
    pred, gt = tensors[f'pred_{size}'], tensors[f'gt_{size}']
    torch.testing.assert_close(video.psnr(pred, gt), tensors[f'psnr_per_frame_{size}'], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(video.ssim(pred, gt), tensors[f'ssim_per_frame_{size}'], atol=1e-5, rtol=1e-5)
    assert video.psnr(pred, gt).mean().item() == pytest.approx(
        meta['results'][size]['psnr_mean_of_frames (HNeRV reported)'], abs=1e-5)
    if size == '176x176':
        torch.testing.assert_close(video.ms_ssim(pred, gt), tensors['msssim_per_frame_176x176'], atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(ValueError, match='larger than 160 px'):
            video.ms_ssim(pred, gt)


@pytest.mark.parametrize('size', ['64x128', '176x176'])
@pytest.mark.parametrize('name,key', [('l2', 'L2'), ('l1', 'L1'), ('fusion6', 'Fusion6')])
def test_losses_match_the_official_loss_fn(reference, size, name, key):
    tensors, meta = reference
    value = video.fitting_loss(name)(tensors[f'pred_{size}'], tensors[f'gt_{size}'])
    assert value.item() == pytest.approx(meta['results'][size]['loss_fn'][key], abs=1e-5)


@pytest.mark.parametrize('name', ['l2', 'l1', 'fusion6'])
def test_masked_loss_ignores_the_prediction_outside_the_mask(name):
    target = smooth_frames(t=2)
    mask = torch.zeros(2, 1, 32, 48)
    mask[..., 8:24, 8:40] = 1
    pred = (target + 0.1 * torch.randn_like(target)).clamp(0, 1).requires_grad_()
    loss = video.fitting_loss(name)
    value = loss(pred, target, mask)
    value.backward()
    assert pred.grad[:, :, ~mask[0, 0].bool()].abs().max() == 0
    assert pred.grad[:, :, mask[0, 0].bool()].abs().max() > 0
    garbage_outside = torch.where(mask.bool(), pred.detach(), torch.rand_like(target))
    assert loss(garbage_outside, target, mask).item() == pytest.approx(value.item(), abs=1e-6)
    assert loss(target, target, mask).item() == pytest.approx(0, abs=1e-6)


def test_unknown_loss():
    with pytest.raises(ValueError, match='known: l2, l1, fusion6'):
        video.fitting_loss('l3')


# ---------------------------------------------------------------------------------------------------------------
# Interpolation


def test_interpolated_embeddings_keep_the_originals_and_lie_between_them():
    embeddings = torch.randn(3, 16, 2, 4)
    middle = video.interpolate_embeddings(embeddings, 2)
    assert middle.shape == (5, 16, 2, 4)
    torch.testing.assert_close(middle[::2], embeddings)
    torch.testing.assert_close(middle[1], (embeddings[0] + embeddings[1]) / 2)
    quarter = video.interpolate_embeddings(embeddings, 4)[1]
    torch.testing.assert_close(quarter, 0.75 * embeddings[0] + 0.25 * embeddings[1])


# ---------------------------------------------------------------------------------------------------------------
# Bitstream


_NERV = dict(frame_size=(64, 96), num_frames=4, strides=(4, 2, 2), pe_levels=8, stem_dim=32, fc_dim=16, lower_width=8)
TINY = {
    # ConvNeXt encoder to a (16, 4, 6) embedding per frame (stored in the bitstream), decoder back to 64x96
    'hnerv_0_35m': dict(frame_size=(64, 96), num_frames=4, enc_strides=(4, 2, 2), fc_dim=16),
    # frame index -> positional encoding -> decoder: nothing stored per frame
    'nerv_s': _NERV,
    'nervpp_xs': _NERV,
}


def tiny_model(name, **overrides):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(TINY[name], **overrides)).eval()


def reference_decode(model, frames, prune=0.1, bits=8):
    """What the bitstream must decode to, computed independently: prune the 10% smallest decoder weights
    (ndim > 1) globally, quantise every tensor with fp32 min and scale to 2^bits - 1 levels, decode."""
    state = {k: v.clone() for k, v in model.decoder_state_dict().items()}
    weights = torch.cat([v.abs().flatten() for v in state.values() if v.ndim > 1])
    threshold = weights.sort().values[int(prune * weights.numel()) - 1]
    for v in state.values():
        if v.ndim > 1:
            v[v.abs() <= threshold] = 0

    def roundtrip(t):
        t_min = t.min()
        scale = (t.max() - t_min) / (2 ** bits - 1)
        if scale == 0:  # a constant tensor (NeRV++ has some at init): one symbol
            return t_min.expand_as(t)
        return t_min + scale * ((t - t_min) / scale).round().clamp(0, 2 ** bits - 1)

    reference = tiny_model(model.pretrained_cfg['architecture'])
    reference.load_decoder_state_dict({k: roundtrip(v) for k, v in state.items()})
    with torch.no_grad():
        if model.stored_embeddings:
            embeddings = roundtrip(model.encode(frames=frames))
        else:
            embeddings = reference.encode(index=torch.arange(model.num_frames))
        return reference.decode(embeddings)


@pytest.mark.parametrize('name', list(TINY))
def test_compress_decodes_to_the_models_own_dequantised_output(tmp_path, name):
    model = tiny_model(name).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frames = smooth_frames(h=64, w=96)
    path = tmp_path / 'video.zvid'
    result = codec.compress(model, path, frames)
    assert model.training, 'compress leaves the model in the mode it was in'
    model.eval()
    decoded = codec.decode_video(path)
    torch.testing.assert_close(decoded, reference_decode(model, frames), atol=1e-6, rtol=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model is untouched
    assert result['bytes'] == path.stat().st_size
    assert result['bpp'] == pytest.approx(path.stat().st_size * 8 / (4 * 64 * 96))
    assert result['bytes'] == result['header_bytes'] + result['decoder_bytes'] + result['embedding_bytes']
    assert (result['embedding_bytes'] > 0) == model.stored_embeddings
    assert result['psnr'] == pytest.approx(video.psnr(decoded, frames).mean().item(), abs=1e-4)
    assert result['ms_ssim'] is None  # 64 px frames are too small for five scales
    rebuilt, embeddings = codec.decompress(path)
    assert rebuilt.frame_size == (64, 96) and embeddings.shape[0] == 4


@pytest.mark.parametrize('bits', [2, 12, 16])
def test_other_bit_widths_round_trip(tmp_path, bits):
    model = tiny_model('nerv_s')
    result = codec.compress(model, tmp_path / 'video.zvid', prune=0.2, bits=bits)
    torch.testing.assert_close(codec.decode_video(tmp_path / 'video.zvid'),
                               reference_decode(model, None, prune=0.2, bits=bits), atol=1e-6, rtol=0)
    values = sum(v.numel() for v in model.decoder_state_dict().values())
    assert result['decoder_bytes'] <= values * (1 if bits <= 8 else 2) + 16 * len(model.decoder_state_dict())
    codec.compress(model, tmp_path / 'unpruned.zvid', prune=0.0, bits=bits)
    decoded, _ = codec.decompress(tmp_path / 'unpruned.zvid')
    for key, weight in model.decoder_state_dict().items():  # every value within half a quantisation step
        step = (weight.max() - weight.min()) / (2 ** bits - 1)
        error = (decoded.decoder_state_dict()[key] - weight).abs().max()
        assert error <= step / 2 + 1e-7, f'{key}: error {error} for a step of {step}'  # + float32 rounding


def test_compress_writes_the_embeddings_a_release_carries(tmp_path):
    """The official Bunny release has decoder and embeddings but no encoder: its own embeddings are written."""
    model = tiny_model('hnerv_0_35m')
    frames = smooth_frames(h=64, w=96)
    with torch.no_grad():
        model.register_buffer('frame_embeddings', model.encode(frames=frames), persistent=False)
    for p in model.encoder.parameters():
        p.data.normal_()  # the release's encoder is not the one that made the embeddings
    codec.compress(model, tmp_path / 'video.zvid')
    expected = reference_decode(tiny_model('hnerv_0_35m'), frames)
    torch.testing.assert_close(codec.decode_video(tmp_path / 'video.zvid'), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match='has 4 frame embeddings; got 2 frames'):
        codec.compress(model, tmp_path / 'other.zvid', frames[:2])


def test_entropy_coding_beats_the_raw_symbols(tmp_path):
    model = tiny_model('nerv_s')
    with torch.no_grad():
        for v in model.decoder_state_dict().values():
            # trained weights are peaked with long tails: most symbols sit near the middle of the range
            v.copy_(torch.distributions.Laplace(0.0, 1.0).sample(v.shape))
    result = codec.compress(model, tmp_path / 'video.zvid', prune=0.0)
    values = sum(v.numel() for v in model.decoder_state_dict().values())
    assert result['decoder_bytes'] * 8 / values < 7.0  # raw 8-bit symbols would cost 8 bits


def test_ms_ssim_is_reported_for_frames_above_160_px(tmp_path):
    model = tiny_model('hnerv_0_35m', frame_size=(176, 176))
    frames = smooth_frames(t=2, h=176, w=176)
    result = codec.compress(model, tmp_path / 'video.zvid', frames, bits=6)
    decoded = codec.decode_video(tmp_path / 'video.zvid')
    assert result['ms_ssim'] == pytest.approx(video.ms_ssim(decoded, frames).mean().item(), abs=1e-5)


def test_compress_refuses_what_it_cannot_encode(tmp_path):
    model = tiny_model('hnerv_0_35m')
    with pytest.raises(ValueError, match='pass the frames .or their embeddings.'):
        codec.compress(model, tmp_path / 'a.zvid')
    with pytest.raises(ValueError, match='built for 64x96 frames'):
        codec.compress(model, tmp_path / 'a.zvid', torch.rand(2, 3, 32, 48))
    with pytest.raises(ValueError, match='represents 4 frames'):
        codec.compress(tiny_model('nerv_s'), tmp_path / 'a.zvid', torch.rand(3, 3, 64, 96))
    assert not list(tmp_path.iterdir())


def rewrite_header(path, **changes):
    """A bitstream with header fields replaced and a valid checksum: well-formed, but for another model."""
    data = path.read_bytes()
    header_len = struct.unpack_from('<I', data, 6)[0]
    header = dict(json.loads(data[10:10 + header_len]), **changes)
    body = json.dumps(header).encode()
    blob = data[:6] + struct.pack('<I', len(body)) + body + data[10 + header_len:-4]
    path.write_bytes(blob + struct.pack('<I', zlib.crc32(blob)))


def test_damaged_or_foreign_bitstreams_fail_clearly(tmp_path):
    good = tmp_path / 'good.zvid'
    codec.compress(tiny_model('hnerv_0_35m'), good, smooth_frames(h=64, w=96))
    data = good.read_bytes()
    bad = tmp_path / 'bad.zvid'
    for cut in (5, 40, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(codec.BitstreamError, match='truncated'):
            codec.decompress(bad)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    bad.write_bytes(bytes(flipped))
    with pytest.raises(codec.BitstreamError, match='checksum mismatch'):
        codec.decompress(bad)
    bad.write_bytes(b'RIFF' + data[4:])
    with pytest.raises(codec.BitstreamError, match='not a zoo video bitstream'):
        codec.decompress(bad)
    codec.compress(tiny_model('nerv_s'), bad)
    rewrite_header(bad, model='nervpp_xs')  # same arguments, other blocks
    with pytest.raises(codec.BitstreamError, match='does not fit nervpp_xs.*another architecture'):
        codec.decompress(bad)
    bad.write_bytes(data)
    rewrite_header(bad, model='hnerv_9m')
    with pytest.raises(codec.BitstreamError, match="model 'hnerv_9m' is not a zoo video model"):
        codec.decompress(bad)


def test_cli_compress_then_decode(tmp_path, capsys):
    from zoo import hub

    hub.save_pretrained(tiny_model('hnerv_0_35m'), tmp_path / 'fitted')  # as training saves a fitted model
    frames = smooth_frames(h=64, w=96)
    video.write_frames(frames, tmp_path / 'frames')
    bitstream, out = tmp_path / 'video.zvid', tmp_path / 'decoded.mp4'
    assert cli.main(['compress', str(tmp_path / 'fitted'), str(tmp_path / 'frames'), '-o', str(bitstream),
                     '--json']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['bytes'] == bitstream.stat().st_size and result['frames'] == 4
    assert cli.main(['decode', str(bitstream), str(out)]) == 0
    assert 'wrote 4 frames of 64x96' in capsys.readouterr().out
    decoded = codec.decode_video(bitstream)
    assert video.psnr(video.read_frames(out), decoded).min() > 30
    # a failed decode writes nothing over the good video
    before = out.read_bytes()
    bitstream.write_bytes(bitstream.read_bytes()[:-3])
    assert cli.main(['decode', str(bitstream), str(out)]) == codec.BitstreamError.exit_code
    assert 'truncated' in capsys.readouterr().err
    assert out.read_bytes() == before
