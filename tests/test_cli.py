"""The `zoo` command line."""
import json

import pytest
import torch
from PIL import Image

import timm
import zoo
from zoo import cli
from zoo.errors import UnknownModelError
from zoo.models import spartan

from official_layout import load_manifest, to_official_layout


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list(capsys):
    code, out, _ = run(capsys, 'list', 'spartan*')
    assert code == 0 and out.split() == ['spartan_tiny']
    code, out, _ = run(capsys, 'list', '--pretrained')
    assert 'spartan_tiny.in1k' in out.split()


def test_info_reports_params_gmacs_paper_license_weights(capsys):
    code, out, _ = run(capsys, 'info', 'spartan_tiny', '--json')
    info = json.loads(out)
    assert code == 0
    assert info['params_m'] == pytest.approx(3.82, abs=0.005)
    assert info['gmacs'] == pytest.approx(1.04, abs=0.01)
    assert info['input_size'] == [3, 256, 256]
    assert info['license'] == 'apache-2.0' and 'SpaRTAN' in info['paper']
    assert info['weights'] == 'henry-pay/SpaRTAN-S'


def test_unknown_name_exits_3_with_a_suggestion(capsys):
    code, _, err = run(capsys, 'info', 'spartan_tny')
    assert code == UnknownModelError.exit_code == 3 and 'did you mean spartan_tiny' in err


def test_names_take_the_zoo_prefix_as_timm_create_model_does(capsys):
    code, out, _ = run(capsys, 'info', 'zoo/SpaRTAN_tiny.in1k', '--json')
    assert code == 0 and json.loads(out)['weights'] == 'henry-pay/SpaRTAN-S'
    code, _, err = run(capsys, 'card', 'zoo/spartan_tny')
    assert code == 3 and 'spartan_tiny' in err
    code, _, err = run(capsys, 'reproduce', 'zoo/spartan_tiny.in1k')  # a zoo name, not a Hub repo to download
    assert code == 2 and "no zoo-made weights to re-run: its weights (henry-pay/SpaRTAN-S)" in err
    assert zoo.is_zoo_model('ZOO/SpaRTAN_tiny.in1k')


def test_reproduce_downloads_a_repo_of_an_org_called_zoo_by_its_own_name(capsys, monkeypatch):
    def refuse(repo_id, **kwargs):
        raise ValueError(f'asked for {repo_id}')

    monkeypatch.setattr(cli, 'snapshot_download', refuse)
    code, _, err = run(capsys, 'reproduce', 'Zoo/My-Trained-Run')
    assert code == 2 and 'asked for Zoo/My-Trained-Run' in err


def test_predict_prints_top_k_with_imagenet_labels(capsys, tmp_path):
    image = tmp_path / 'cat.png'
    Image.new('RGB', (300, 260), (200, 120, 40)).save(image)
    code, out, _ = run(capsys, 'predict', 'spartan_tiny', str(image), '--random', '--top-k', '3')
    lines = out.splitlines()
    assert code == 0 and lines[0] == str(image) and len(lines) == 4
    labels = timm.data.ImageNetInfo().label_descriptions()
    assert any(label in lines[1] for label in labels)


def test_predict_refuses_a_file_that_is_not_an_image(capsys, tmp_path):
    bad = tmp_path / 'notes.txt'
    bad.write_text('hello')
    code, _, err = run(capsys, 'predict', 'spartan_tiny', str(bad), '--random')
    assert code == 2 and f'cannot read image {bad}' in err


def test_convert_official_checkpoint_to_a_hub_folder(capsys, tmp_path):
    torch.manual_seed(0)
    source = timm.create_model('spartan_tiny').eval()
    official = to_official_layout(
        source.state_dict(), source, spartan.checkpoint_filter_fn, load_manifest('spartan', 'spartan_t_repo_config'))
    checkpoint = tmp_path / 'spartan_300.pth'
    torch.save({'epoch': 300, 'model': official}, checkpoint)
    code, out, err = run(capsys, 'convert', 'spartan', str(checkpoint), '--out', str(tmp_path / 'hub'))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / 'hub').iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    converted = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), source(x))


def test_convert_refuses_a_checkpoint_of_another_architecture(capsys, tmp_path):
    checkpoint = tmp_path / 'resnet.pth'
    torch.save(timm.create_model('resnet18').state_dict(), checkpoint)
    code, _, err = run(capsys, 'convert', 'spartan', str(checkpoint), '--out', str(tmp_path / 'hub'))
    assert code == 2 and 'not a SpaRTAN checkpoint' in err
    assert not (tmp_path / 'hub').exists()


def test_card_prints_the_card(capsys):
    code, out, _ = run(capsys, 'card', 'spartan_tiny.in1k')
    assert code == 0 and out.startswith('---') and '# Model card for spartan_tiny.in1k' in out


def test_bench_reports_speed_memory_and_the_matmul_fraction(capsys):
    threads = torch.get_num_threads()
    code, out, _ = run(capsys, 'bench', 'unireplknet_a', '--deploy', '--batch', '2', '--size', '32',
                       '--threads', '1', '--repeats', '2', '--warmup', '1', '--json')
    result = json.loads(out)
    assert code == 0 and result['threads'] == 1
    assert torch.get_num_threads() == threads, 'bench left the process on its thread count'
    assert result['name'] == 'unireplknet_a' and result['deploy'] and result['size'] == 32
    assert result['images_per_s'] > 0 and result['latency_p90_ms'] >= result['latency_p50_ms'] > 0
    assert result['peak_memory_mb'] > 0
    # 0.64 GMACs at 224 px; convs and matmuls scale with the pixel count (32 px: about 1/49 of it)
    assert result['gflop_per_image'] == pytest.approx(2 * 0.64 / 49, rel=0.1)
    assert result['matmul_fraction'] == pytest.approx(result['achieved_gflops'] / result['matmul_gflops'])
    code, out, _ = run(capsys, 'bench', 'unireplknet_a', '--batch', '2', '--size', '32', '--train',
                       '--threads', '1', '--repeats', '1', '--warmup', '0')
    assert code == 0 and 'train' in out and 'GFLOP/s' in out
    # forward + backward of the training form (0.675 GMACs at 224 px) is about 3 forwards, depth-wise convs included
    gflop = float(next(line for line in out.splitlines() if 'GFLOP / image' in line).split()[-1])
    assert gflop == pytest.approx(3 * 2 * 0.675 / 49, rel=0.1)


def test_bench_refuses_a_bad_dtype_and_an_unknown_model(capsys):
    with pytest.raises(SystemExit):
        cli.main(['bench', 'unireplknet_a', '--dtype', 'int8'])
    code, _, err = run(capsys, 'bench', 'unireplknet_q')
    assert code == 3 and 'did you mean unireplknet_t' in err
