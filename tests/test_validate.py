"""`zoo validate` end to end on data made here, each metric checked against values computed independently.

The models' forward passes are replaced by functions of the input whose outputs the tests know, so every
expected number is worked out here with numpy from the raw files, not by the code under test.
"""
import csv
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import zoo
from zoo import cli, hub
from zoo import validate as validation
from zoo.codec import decode_video
from zoo.errors import InputError
from zoo.models._builder import record_weights, sha256_file
from zoo.models.spartan import SpaRTAN
from zoo.models.timesnet import TimesNet
from zoo.tasks.video import read_frames, write_frames

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # the models' data config
TINY_XNET = dict(encoder='test_convnext', decoder='convnext_atto')


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _red(x: torch.Tensor) -> torch.Tensor:
    """The red channel in [0, 1] of a normalised batch, as the file held it."""
    return x[:, :1] * STD[0] + MEAN[0]


# ---------------------------------------------------------------------------------------------------------------
# Classification


# Where each image's true class sits in the logits' ranking: 6 of 12 first, 10 of 12 in the top five.
RANKS = [0, 0, 0, 0, 0, 1, 2, 4, 5, 5, 0, 3]


def _class_folders(root):
    """12 flat images, 2 per class folder c0..c5; image i is grey level 10 * (i + 1), its id."""
    labels = []
    for i in range(len(RANKS)):
        label = i // 2
        folder = root / 'validation' / f'c{label}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (12, 12), (10 * (i + 1),) * 3).save(folder / f'{i:02d}.png')
        labels.append(label)
    return root, labels


def _ranked_logits(labels):
    """Logits (12, 6) where image i's true class has rank RANKS[i]."""
    table = torch.zeros(len(labels), 6)
    for i, (label, rank) in enumerate(zip(labels, RANKS)):
        order = [c for c in range(6) if c != label]
        order.insert(rank, label)
        table[i, order] = torch.arange(6, 0, -1).float()
    return table


def test_classification_top1_top5_results_file_and_card(tmp_path, capsys, monkeypatch):
    data, labels = _class_folders(tmp_path / 'data')
    model = zoo.create_model('spartan_tiny', num_classes=6, pretrained_cfg_overlay=dict(input_size=(3, 32, 32)))
    trained = {'kind': 'zoo-trained', 'recipe': {'source': 'a test recipe'}, 'data': str(data),
               'metrics': {'top1': 41.0}}
    folder = hub.save_pretrained(record_weights(model, trained), tmp_path / 'model')  # a trainer's folder
    table = _ranked_logits(labels)

    def forward(self, x):
        ids = (_red(x)[:, 0, 16, 16] * 255 / 10).round().long() - 1
        return table[ids]
    monkeypatch.setattr(SpaRTAN, 'forward', forward)

    results = tmp_path / 'results.csv'
    code, out, err = run(capsys, 'validate', folder, '--data', data, '--batch', 5, '--workers', 0,
                         '--results-file', results, '--update-card', folder)
    assert code == 0, err
    assert 'validate classification' in err  # the progress bar, on stderr
    result = json.loads(out)
    assert result['metrics'] == {'top1': pytest.approx(100 * 6 / 12), 'top5': pytest.approx(100 * 10 / 12)}
    sha = sha256_file(folder / 'model.safetensors')
    assert result['weights_sha256'] == sha and result['samples'] == 12 and result['model'] == 'spartan_tiny'
    assert result['protocol']['input_size'] == [3, 32, 32] and result['protocol']['crop_pct'] == 1.0
    assert result['command'].startswith(f'zoo validate {folder} --data {data} --split validation --batch 5')

    (row,) = csv.DictReader(results.open())
    assert float(row['top1']) == pytest.approx(50.0) and row['weights_sha256'] == sha

    config = json.loads((folder / 'config.json').read_text())
    (entry,) = config['results']
    assert set(entry) == set(validation.RESULT_KEYS)
    assert entry['metrics']['top5'] == pytest.approx(250 / 3) and entry['dataset'] == str(data)
    card = (folder / 'README.md').read_text()
    assert card.startswith('---') and '## Training' in card and 'a test recipe' in card  # the card stays whole
    assert '## Results' in card and '| measured | classification |' in card and 'top1 50, top5 83.33' in card
    assert zoo.hub.load(folder).num_classes == 6  # the folder still loads

    other = dict(result, weights_sha256='0' * 64)
    with pytest.raises(InputError, match=f'0{{64}}, but .* has sha256 {sha}'):
        validation.update_card(folder, other)
    assert len(json.loads((folder / 'config.json').read_text())['results']) == 1

    code, _, err = run(capsys, 'validate', folder, '--data', data, '--split', 'test', '--workers', 0)
    errors = [line for line in err.splitlines() if not line.endswith('...')]  # past `zoo validate: loading ...`
    assert code == 2 and len(errors) == 1 and 'test' in errors[0]


@pytest.mark.usefixtures('hub')  # the local fake Hub of conftest.py
def test_load_model_hashes_the_weight_file_it_loaded(tmp_path):
    import safetensors.torch
    from huggingface_hub import HfApi

    weights = tmp_path / 'model.safetensors'
    safetensors.torch.save_file(zoo.create_model('spartan_tiny').state_dict(), weights)
    api = HfApi()
    api.create_repo('henry-pay/SpaRTAN-S')  # spartan_tiny.in1k's official repo
    api.upload_file(path_or_fileobj=weights, path_in_repo='model.safetensors', repo_id='henry-pay/SpaRTAN-S')
    model, sha = validation.load_model('zoo/spartan_tiny.in1k')
    assert sha == sha256_file(weights)

    folder = tmp_path / 'folder'
    timm.models.save_for_hf(model, folder, safe_serialization=True)  # config.json + weights: a card costs time
    hub.push_folder(folder, 'someone/spartan')
    _, sha = validation.load_model('hf-hub:someone/spartan')
    assert sha == sha256_file(folder / 'model.safetensors')


# ---------------------------------------------------------------------------------------------------------------
# Depth


def _upsample_align_corners(a: np.ndarray, size) -> np.ndarray:
    """Bilinear resize with align_corners=True: linear interpolation along each axis in turn."""
    (h, w), (out_h, out_w) = a.shape, size
    rows = np.stack([np.interp(np.linspace(0, w - 1, out_w), np.arange(w), r) for r in a])
    return np.stack([np.interp(np.linspace(0, h - 1, out_h), np.arange(h), c) for c in rows.T]).T


def _idisc_expected(preds, gts, masks, batch):
    """The iDisc averages: pixel means per batch (deltas, AbsRel, SqRel, log10), image means per batch (RMSE,
    RMSE log, SIlog), batches weighted by their number of images."""
    totals, count = {}, 0
    for start in range(0, len(gts), batch):
        p_all = np.concatenate([p[m] for p, m in zip(preds[start:start + batch], masks[start:start + batch])])
        g_all = np.concatenate([g[m] for g, m in zip(gts[start:start + batch], masks[start:start + batch])])
        ratio = np.maximum(p_all / g_all, g_all / p_all)
        values = {f'delta{k}': np.mean(ratio < 1.25 ** k) for k in (1, 2, 3)}
        values['abs_rel'] = np.mean(np.abs(p_all - g_all) / g_all)
        values['sq_rel'] = np.mean((p_all - g_all) ** 2 / g_all)
        values['log10'] = np.mean(np.abs(np.log10(p_all) - np.log10(g_all)))
        images = list(zip(preds[start:start + batch], gts[start:start + batch], masks[start:start + batch]))
        values['rmse'] = np.mean([np.sqrt(np.mean((p[m] - g[m]) ** 2 + 1e-6)) for p, g, m in images])
        values['rmse_log'] = np.mean([np.sqrt(np.mean(np.log(p[m] / g[m]) ** 2 + 1e-6)) for p, g, m in images])
        values['silog'] = np.mean([100 * np.std(np.log(p[m]) - np.log(g[m]), ddof=1) for p, g, m in images])
        n = len(images)
        for k, v in values.items():
            totals[k] = totals.get(k, 0) + v * n
        count += n
    return {k: v / count for k, v in totals.items()}


def _save_pair(root, kind: str, name: str, image: np.ndarray, target: np.ndarray) -> None:
    """root/validation/images/NAME.png and root/validation/KIND/NAME.png, the layout training reads."""
    for folder, array in (('images', image), (kind, target)):
        (root / 'validation' / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / 'validation' / folder / f'{name}.png')


def test_depth_follows_the_idisc_protocol(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    h, w = 64, 96
    reds, gts = [], []
    for i in range(4):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        depth_mm = rng.integers(0, 12000, (h, w)).astype(np.uint16)  # 0 (no return) to 12 m: some beyond 10 m
        _save_pair(tmp_path / 'data', 'depth', str(i), image, depth_mm)
        reds.append(image[..., 0] / 255.)
        gts.append(depth_mm / 1000.)
    assert Image.open(tmp_path / 'data' / 'validation' / 'depth' / '0.png').mode.startswith('I')
    folder = hub.save_pretrained(zoo.create_model(
        'timesnet_convnext_tiny_convnext_tiny', task='depth', **TINY_XNET), tmp_path / 'model')

    def forward(self, x):  # half-resolution depth, 1 + 3 * red: resized to the ground truth by the protocol
        return 1 + 3 * _red(x)[..., ::2, ::2]
    monkeypatch.setattr(TimesNet, 'forward', forward)

    code, out, err = run(capsys, 'validate', folder, '--data', tmp_path / 'data', '--batch', 2, '--crop', 'garg',
                         '--limit', 3, '--workers', 0)
    assert code == 0, err
    result = json.loads(out)
    assert result['protocol'] == dict(
        split='validation', limit=3, benchmark='nyu', crop='garg', min_depth=0.01, max_depth=10.0,
        depth_scale=1000.0, upsample='bilinear_align_corners', averaging='idisc', batch_size=2)
    reds, gts = reds[:3], gts[:3]  # --limit 3
    preds = [_upsample_align_corners(1 + 3 * r[::2, ::2], (h, w)) for r in reds]
    box = np.zeros((h, w), bool)
    box[int(0.40810811 * h):int(0.99189189 * h), int(0.03594771 * w):int(0.96405229 * w)] = True
    masks = [(g > 0.01) & (g < 10) & box for g in gts]
    expected = _idisc_expected(preds, gts, masks, batch=2)
    assert result['metrics'] == pytest.approx(expected, rel=1e-4)
    assert result['samples'] == 3
    assert set(expected) == {'delta1', 'delta2', 'delta3', 'abs_rel', 'sq_rel', 'log10', 'rmse', 'rmse_log', 'silog'}


def test_depth_protocol_defaults_per_benchmark():
    kitti = validation.depth_protocol('kitti')
    assert (kitti['crop'], kitti['max_depth'], kitti['depth_scale']) == ('garg', 80., 256.)
    nyu = validation.depth_protocol(upsample='nearest', max_depth=8)
    assert (nyu['crop'], nyu['max_depth'], nyu['depth_scale'], nyu['upsample']) == ('eigen_nyu', 8, 1000., 'nearest')
    with pytest.raises(InputError, match='known: nyu, kitti'):
        validation.depth_protocol('sunrgbd')


# ---------------------------------------------------------------------------------------------------------------
# Segmentation


def _border(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (or outside the image)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _hd95_brute_force(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = np.argwhere(_border(a)), np.argwhere(_border(b))
    d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def test_segmentation_miou_dice_and_hd95(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(1)
    h, w = 64, 96
    preds, truths = [], []
    for i in range(2):
        blocks = rng.integers(0, 3, (h // 16, w // 16))
        pred = np.kron(blocks, np.ones((16, 16), dtype=np.int64))
        red = (pred * 100 + 20).astype(np.uint8)  # class k is red level 100 k + 20
        image = np.stack([red, red, red], -1)
        truth = np.roll(pred, (3, 5), axis=(0, 1)).astype(np.uint8)
        truth[:4, :4] = 255  # ignored
        _save_pair(tmp_path / 'data', 'masks', str(i), image, truth)
        preds.append(pred)
        truths.append(truth.astype(np.int64))
    folder = hub.save_pretrained(zoo.create_model(
        'timesnet_convnext_tiny_convnext_tiny', task='segmentation', num_classes=3, background_class=0,
        **TINY_XNET), tmp_path / 'model')

    def forward(self, x):
        level = (_red(x)[:, 0] * 255 - 20) / 100
        return torch.stack([-(level - k).abs() for k in range(3)], 1)
    monkeypatch.setattr(TimesNet, 'forward', forward)

    code, out, err = run(capsys, 'validate', folder, '--data', tmp_path / 'data', '--batch', 2, '--workers', 0)
    assert code == 0, err
    result = json.loads(out)
    valid = [t != 255 for t in truths]
    iou, dice, distances = [], [], []
    for k in (1, 2):  # class 0 is the background
        inter = sum(((p == k) & (t == k) & v).sum() for p, t, v in zip(preds, truths, valid))
        p_area = sum(((p == k) & v).sum() for p, v in zip(preds, valid))
        t_area = sum(((t == k) & v).sum() for t, v in zip(truths, valid))
        iou.append(inter / (p_area + t_area - inter))
        dice.append(2 * inter / (p_area + t_area))
        for p, t, v in zip(preds, truths, valid):
            if ((p == k) & v).any() and ((t == k) & v).any():
                distances.append(_hd95_brute_force((p == k) & v, (t == k) & v))
    assert result['metrics'] == pytest.approx(
        dict(miou=np.mean(iou), mean_dice=np.mean(dice), hd95=np.mean(distances)), rel=1e-6)
    assert result['protocol']['classes'] == [1, 2] and result['protocol']['hd95_cases'] == len(distances)
    assert result['protocol']['reduce_zero_label'] is False
    assert 0 < result['metrics']['miou'] < 1


# ---------------------------------------------------------------------------------------------------------------
# Video


@pytest.mark.parametrize('frame_size, num_frames', [((64, 96), 3), ((176, 176), 2)])
def test_video_psnr_ms_ssim_and_bpp_of_a_real_bitstream(tmp_path, capsys, frame_size, num_frames):
    from pytorch_msssim import ms_ssim

    torch.manual_seed(0)
    frames = torch.rand(num_frames, 3, 8, 8)
    frames = torch.nn.functional.interpolate(frames, size=frame_size, mode='bilinear').clamp(0, 1)
    clip = write_frames(frames, tmp_path / 'clip')
    model = zoo.create_model('hnerv_0_35m', frame_size=frame_size, num_frames=num_frames, enc_strides=(4, 2, 2),
                             fc_dim=16)
    folder = hub.save_pretrained(model, tmp_path / 'model')
    bitstream = tmp_path / 'video.zoo'
    code, out, err = run(capsys, 'validate', f'local-dir:{folder}', '--data', clip, '--batch', 2,
                         '--bitstream', bitstream)
    assert code == 0, err
    result = json.loads(out)
    truth = read_frames(clip).double()
    decoded = decode_video(bitstream).double()
    mse = ((decoded - truth) ** 2).flatten(1).mean(1).numpy()
    height, width = frame_size
    assert result['metrics']['bytes'] == bitstream.stat().st_size
    assert result['metrics']['bpp'] == pytest.approx(bitstream.stat().st_size * 8 / (num_frames * height * width))
    assert result['per_frame']['psnr'] == pytest.approx(list(-10 * np.log10(mse + 1e-9)), rel=1e-5)
    assert result['metrics']['psnr'] == pytest.approx(np.mean(-10 * np.log10(mse + 1e-9)), rel=1e-5)
    assert result['protocol']['prune'] == 0.1 and result['protocol']['bits'] == 8 and result['split'] is None
    if height > 160:
        expected = ms_ssim(decoded.float(), truth.float(), data_range=1, size_average=False)
        assert result['per_frame']['ms_ssim'] == pytest.approx(expected.tolist(), rel=1e-5)
    else:
        assert 'ms_ssim' not in result['metrics']


def test_a_nerv_model_and_a_video_of_another_length_are_refused(tmp_path, capsys):
    model = zoo.create_model('nerv_s', frame_size=(64, 96), num_frames=4, strides=(4, 2, 2), pe_levels=8,
                             stem_dim=32, fc_dim=16, lower_width=8)
    folder = hub.save_pretrained(model, tmp_path / 'model')
    clip = write_frames(torch.rand(3, 3, 64, 96), tmp_path / 'clip')
    code, _, err = run(capsys, 'validate', folder, '--data', clip)
    assert code == 2 and 'represents 4 frames; the video has 3' in err


def test_results_csv_gains_the_columns_of_another_task(tmp_path):
    path = tmp_path / 'results.csv'
    common = dict(model='m', tag=None, task='classification', dataset='d', split='s', weights_sha256='x',
                  samples=1, date='now', seconds=1.0, protocol={}, command=None)
    validation.write_results(dict(common, metrics={'top1': 50.0, 'top5': 75.0}), path)
    validation.write_results(dict(common, task='depth', metrics={'abs_rel': 0.1}), path)
    rows = list(csv.DictReader(path.open()))
    assert [r['task'] for r in rows] == ['classification', 'depth']
    assert rows[0]['abs_rel'] == '' and rows[1]['abs_rel'] == '0.1' and rows[1]['top1'] == ''
    json_path = tmp_path / 'results.json'
    validation.write_results(dict(common, metrics={'top1': 50.0}), json_path)
    validation.write_results(dict(common, metrics={'top1': 60.0}), json_path)
    assert [r['metrics']['top1'] for r in json.loads(json_path.read_text())] == [50.0, 60.0]
