"""The `zoo` command line as a person meets it: every failure is one clear line on stderr and a non-zero exit
(a traceback only with ZOO_DEBUG=1 or for a real bug), usage errors exit 2 as argparse's own do, slow steps say
what they are doing, and output into a closed pipe ends quietly. Branches add the failure paths of their own
subcommands here."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo import cli, hub
from zoo.errors import InputError, UnknownModelError
from zoo.models import FAMILIES

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys, *argv):
    """argparse's own way out: SystemExit(2) after a usage line and the message."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def one_clean_line(err: str) -> str:
    """The error line, after any progress (a tqdm bar, `zoo CMD: building ...`), with no traceback."""
    assert 'Traceback' not in err, err
    return err.strip().splitlines()[-1]


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / 'cat.jpg'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 45, 3), dtype=np.uint8)).save(path)
    return path


def test_list_matches_any_case_and_says_when_nothing_matches(capsys):
    code, out, _ = run(capsys, 'list', '*SpaRTAN*')
    assert code == 0 and out.split() == ['spartan_tiny']
    code, out, _ = run(capsys, 'list', 'zoo/SpaRTAN*')
    assert code == 0 and out.split() == ['spartan_tiny']
    code, out, err = run(capsys, 'list', 'nothing_here')
    assert code == UnknownModelError.exit_code and out == ''
    assert one_clean_line(err) == "zoo list: no zoo model matches 'nothing_here'; `zoo list` shows them all"


def test_typos_are_answered_with_zoo_names_first(capsys):
    for command in ('card', 'info', 'bench'):
        code, _, err = run(capsys, command, 'spartan_tny')
        assert code == 3 and one_clean_line(err).endswith("unknown model 'spartan_tny'; did you mean spartan_tiny?")
    code, _, err = run(capsys, 'info', 'resnt50')  # a timm name still gets timm's close names
    assert code == 3 and 'did you mean resnet50' in err


def test_usage_errors_exit_2_like_argparse(capsys):
    code, err = usage_error(capsys, 'card')
    assert code == 2 and 'usage: zoo card' in err and 'give a model NAME, or --all' in err
    code, err = usage_error(capsys, 'predict', 'spartan_tiny')  # no image
    assert code == 2 and 'usage: zoo predict' in err


def test_every_subcommand_has_a_description_and_convert_lists_the_families(capsys):
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert all(p.description for p in commands.values())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['convert', '--help'])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(family in out for family in FAMILIES)
    assert 'Official checkpoint -> Hub folder.' in out.splitlines()


def test_predict_fails_cleanly_on_missing_files_directories_and_typos(capsys, photo, tmp_path):
    code, _, err = run(capsys, 'predict', 'spartan_tiny', tmp_path / 'missing.jpg', '--random')
    missing = f'zoo predict: cannot read image {tmp_path / "missing.jpg"}: No such file or directory'
    assert code == InputError.exit_code and one_clean_line(err) == missing
    code, _, err = run(capsys, 'predict', 'spartan_tiny', tmp_path, '--random')  # a directory, not an image
    assert code == InputError.exit_code and 'cannot read image' in one_clean_line(err)
    code, _, err = run(capsys, 'predict', 'spartan_tny', photo, '--random')
    assert code == 3 and 'did you mean spartan_tiny' in one_clean_line(err)


def test_predict_says_what_it_builds_and_shows_progress_for_one_image(capsys, photo):
    code, out, err = run(capsys, 'predict', 'spartan_tiny', photo, '--random', '--top-k', '1')
    assert code == 0 and out.splitlines()[0] == str(photo)
    assert 'zoo predict: building spartan_tiny with random weights...' in err and '1/1' in err  # the tqdm bar


def test_predict_sends_a_video_model_elsewhere(capsys, photo):
    code, out, err = run(capsys, 'predict', 'hnerv_0_35m', photo, '--random')
    assert code == InputError.exit_code and out == ''
    assert 'hnerv_0_35m is a video model' in one_clean_line(err) and 'zoo compress' in err


def test_class_names_come_from_the_checkpoint_imagenet_or_numbers():
    with torch.device('meta'):
        odd = zoo.create_model('spartan_tiny', num_classes=1001)  # timm's guess knows no 1001-class subset
        named = zoo.create_model('spartan_tiny', num_classes=2)
        imagenet = zoo.create_model('spartan_tiny')
    assert cli._label_names(odd) is None
    named.pretrained_cfg = dict(named.pretrained_cfg, label_names=['cat', 'dog'])
    assert cli._label_names(named) == ['cat', 'dog']
    assert cli._label_names(imagenet)[281] == 'tabby, tabby cat'


def test_predict_pads_a_dense_model_input_and_says_so(capsys, photo, tmp_path):
    model = zoo.create_model('timesnet_convnext_tiny_convnext_tiny', encoder='test_convnext', decoder='convnext_atto')
    hub.save_pretrained(model, tmp_path / 'depth_model')
    code, out, err = run(capsys, 'predict', tmp_path / 'depth_model', photo)  # 30x45 photo; sides of 32 needed
    assert code == 0 and out.strip() == f'{photo} -> {photo.with_name("cat.depth.png")}'
    assert f'{photo} is 30x45; the model runs on it padded at the bottom and right to 32x64' in err


def test_compress_warns_when_the_frames_are_not_the_models_video(capsys, tmp_path):
    from zoo.tasks import video

    torch.manual_seed(0)
    unfitted = zoo.create_model('hnerv_0_35m', frame_size=(64, 96), num_frames=2, enc_strides=(4, 2, 2), fc_dim=16)
    hub.save_pretrained(unfitted, tmp_path / 'model')
    video.write_frames(torch.rand(2, 3, 64, 96), tmp_path / 'frames')
    code, _, err = run(capsys, 'compress', tmp_path / 'model', tmp_path / 'frames', '-o', tmp_path / 'v.zvid')
    assert code == 0 and 'zoo compress: warning: PSNR' in err and 'Are these its frames?' in err


def test_convert_fails_cleanly(capsys, tmp_path):
    code, _, err = run(capsys, 'convert', 'spartan', tmp_path / 'missing.pth', '--out', tmp_path / 'out')
    assert code == 2 and one_clean_line(err).endswith(str(tmp_path / 'missing.pth'))
    code, _, err = run(capsys, 'convert', 'spartan', tmp_path, '--out', tmp_path / 'out')  # a directory
    assert code == 2 and one_clean_line(err).startswith('zoo convert: ')
    code, _, err = run(capsys, 'convert', 'spartn', tmp_path / 'x.pth', '--out', tmp_path / 'out')
    assert code == 2 and "unknown family 'spartn'" in one_clean_line(err)
    code, _, err = run(capsys, 'convert', 'idisc', tmp_path / 'x.pth', '--out', tmp_path / 'out')
    assert code == 2 and 'name the model the checkpoint is for with --model' in one_clean_line(err)
    assert not (tmp_path / 'out').exists()


def test_interrupts_and_os_errors_are_one_line_real_bugs_keep_their_traceback(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, '_cmd_list', interrupted)
    code, _, err = run(capsys, 'list')
    assert code == 130 and one_clean_line(err) == 'zoo list: interrupted'

    def denied(args):
        raise PermissionError(13, 'Permission denied', '/root/x')

    monkeypatch.setattr(cli, '_cmd_list', denied)
    code, _, err = run(capsys, 'list')
    assert code == 2 and one_clean_line(err) == 'zoo list: /root/x: Permission denied'
    monkeypatch.setenv('ZOO_DEBUG', '1')
    with pytest.raises(PermissionError):
        cli.main(['list'])
    monkeypatch.delenv('ZOO_DEBUG')

    def bug(args):
        raise TypeError('a real bug')

    monkeypatch.setattr(cli, '_cmd_list', bug)
    with pytest.raises(TypeError, match='a real bug'):
        cli.main(['list'])


def test_output_into_a_closed_pipe_ends_quietly():
    """`zoo card spartan_tiny | head`: the reader has gone before the card is written."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, '-c', 'import sys; from zoo.cli import main; sys.exit(main())',
                             'card', 'spartan_tiny'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # nobody reads: every write the command makes meets a broken pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == ''


def test_import_zoo_leaves_matplotlib_to_the_pictures():
    code = 'import sys, zoo, zoo.cli, zoo.tasks.depth, zoo.tasks.segmentation; print("matplotlib" in sys.modules)'
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.stdout.strip() == 'False', result.stderr
