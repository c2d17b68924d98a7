"""A Hub folder changes all at once or not at all: `zoo.hub.save_pretrained` killed after any single file
operation leaves the old folder or the new one, never a mix; the next save cleans up what a killed one left.
"""
import os
import shutil
import sys
import threading

import pytest
import timm
import torch

from zoo import _io, hub
from zoo._io import SAVE_PREFIX
from zoo.errors import InputError

# Every event Python raises for an operation that changes the file system (plus ctypes calls: the one-step
# folder swap is a libc call). Reads do not change a folder and are not counted.
_CHANGES = {'os.rename', 'os.remove', 'os.rmdir', 'os.mkdir', 'os.link', 'os.symlink', 'os.chmod', 'os.utime',
            'os.truncate', 'shutil.rmtree', 'ctypes.call_function'}


class _Killed(BaseException):
    """Not an Exception: no `except Exception` or cleanup path of the save can catch it, as with a kill -9."""


class _Killer:
    """Audit hook: counts the file-changing operations of one thread and, once armed at `n`, raises at the n-th
    and at every one after it (a killed process does nothing more)."""

    def __init__(self):
        self.at, self.count, self.thread = None, 0, None

    def arm(self, at):
        self.at, self.count, self.thread = at, 0, threading.get_ident()

    def disarm(self):
        self.at = None

    def __call__(self, event, args):
        if self.at is None or threading.get_ident() != self.thread:
            return
        writes = event == 'open' and (args[1] is None or any(c in args[1] for c in 'wax+'))
        if event in _CHANGES or writes:
            self.count += 1
            if self.count >= self.at:
                raise _Killed(event)


_KILLER = _Killer()
sys.addaudithook(_KILLER)  # audit hooks cannot be removed; disarmed it does nothing


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def _model(seed):
    torch.manual_seed(seed)
    return timm.create_model('test_convnext', num_classes=2).eval()


def test_a_save_killed_after_any_file_operation_leaves_the_old_folder_or_the_new(tmp_path):
    folder, pristine, reference = tmp_path / 'model', tmp_path / 'pristine', tmp_path / 'reference'
    hub.save_pretrained(_model(0), folder, training=dict(recipe={'model': 'test_convnext'}, metrics={}))
    (folder / 'notes.txt').write_text('the user\'s own file')
    (folder / 'onnx').mkdir()
    (folder / 'onnx' / 'model.onnx').write_bytes(b'an export')
    shutil.copytree(folder, pristine)
    shutil.copytree(folder, reference)
    hub.save_pretrained(_model(1), reference)
    old, new = _snapshot(pristine), _snapshot(reference)
    # The new folder: no stale training metadata beside the new weights, the user's files kept.
    assert sorted(new) == ['README.md', 'config.json', 'model.safetensors', 'notes.txt', 'onnx/model.onnx']
    assert new['model.safetensors'] != old['model.safetensors']

    kills = 0
    while True:
        _KILLER.arm(kills + 1)
        try:
            hub.save_pretrained(_model(1), folder)
            break
        except _Killed:
            kills += 1
        finally:
            _KILLER.disarm()
        state = _snapshot(folder)
        assert state == old or state == new, f'killed at operation {kills}: a mixed folder'
        if state == new:
            shutil.rmtree(folder)
            shutil.copytree(pristine, folder)
    assert kills > 10  # the hook saw the save's operations
    assert _snapshot(folder) == new
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(SAVE_PREFIX)] == []


def test_the_next_save_removes_leftovers_of_killed_saves_only(tmp_path):
    folder = tmp_path / 'model'
    legacy = tmp_path / '.zoo-save-k3j4h2'  # an older zoo's name: no process recorded
    legacy.mkdir()
    other_host = tmp_path / f'{SAVE_PREFIX}123.another-host.example.abc'
    other_host.mkdir()
    hub.save_pretrained(_model(0), folder)
    assert not legacy.exists()
    assert other_host.exists()  # it may be running on another machine sharing this filesystem


@pytest.mark.parametrize('where', ['file', 'under_file'])
def test_save_pretrained_refuses_a_file_as_folder(tmp_path, where):
    target = tmp_path / 'taken'
    target.write_text('keep me')
    out = target if where == 'file' else target / 'sub'
    with pytest.raises(InputError, match='which is a file' if where == 'under_file' else 'is a file'):
        hub.save_pretrained(_model(0), out)
    assert target.read_text() == 'keep me'


def test_file_modes_follow_the_umask_without_ever_setting_it(tmp_path, monkeypatch):
    """`os.umask` reads the umask only by setting it: a file another thread made meanwhile would be world-writable."""
    set_umask = os.umask
    previous = set_umask(0o027)
    try:
        def refuse(mask):
            raise AssertionError(f'the process umask was set to {mask:o}')

        monkeypatch.setattr(os, 'umask', refuse)
        assert _io._umask() == _io._probe_umask() == 0o027
        _io.write_atomically(tmp_path / 'f.bin', lambda f: f.write(b'x'))
        assert (tmp_path / 'f.bin').stat().st_mode & 0o777 == 0o640
    finally:
        set_umask(previous)
