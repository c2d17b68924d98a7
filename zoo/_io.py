"""Atomic file writes: a file or a folder is replaced whole, never left half-written.

A leaf module (it imports nothing of the zoo but its errors), so that every part of the zoo that writes a file
can use it.
"""
import ctypes
import errno
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Union

from zoo.errors import InputError

SAVE_PREFIX = '.zoo-save-'


def _umask() -> int:
    """The process umask, read without setting it: `os.umask` can only read it by changing it, and a file another
    thread creates meanwhile would get the wrong mode."""
    try:
        with open('/proc/self/status') as f:  # Linux >= 4.7
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _probe_umask()


def _probe_umask() -> int:
    """The umask as the bits a new file asked for with mode 0o777 does not get."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, 'probe')
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o777))
        return 0o777 & ~os.stat(probe).st_mode


def _file_mode() -> int:
    """The mode a plain `open(..., 'w')` gives (0o666 less the umask); temp files are made 0o600."""
    return 0o666 & ~_umask()


def replace_file(finished: Union[str, Path], target: Union[str, Path]) -> None:
    """Move a completely written temp file over `target`, readable like any file the user writes."""
    os.chmod(finished, _file_mode())
    os.replace(finished, target)


def write_atomically(path: Union[str, Path], write: Callable[[Any], None]) -> Path:
    """`write(binary_file)` into a temp file beside `path`, moved over it only once complete: a failed or
    interrupted write never leaves half a file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}-', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
        replace_file(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def check_output_dir(path: Union[str, Path]) -> Path:
    """`path` as a folder to write into (new or existing); an `InputError` when it, or a folder above it, is a file."""
    path = Path(path)
    for existing in (path, *path.parents):
        if existing.is_dir():
            break
        if existing.exists() or existing.is_symlink():
            where = 'is a file' if existing == path else f'is under {existing}, which is a file'
            raise InputError(f'{path} {where}; give a folder (new, or one to update)')
    return path


def _linux_renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2 if sys.platform.startswith('linux') else None
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return None


_RENAMEAT2 = _linux_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _swap_folders(new: Path, target: Path) -> None:
    """Put folder `new` at `target` with one rename (Linux `renameat2(RENAME_EXCHANGE)`); the old `target` ends up
    at `new`'s path. Where the exchange is missing, two renames leave `target` absent for a moment."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # anything but "not supported here"
            raise OSError(code, os.strerror(code), str(target))
    old = new.with_name(new.name + '-old')
    os.rename(target, old)
    os.rename(new, target)
    os.rename(old, new)


def _is_stale(save: Path) -> bool:
    """A `.zoo-save-<pid>.<host>.*` folder left by a save that is no longer running (or by an older zoo)."""
    pid, _, rest = save.name[len(SAVE_PREFIX):].partition('.')
    host = rest.rpartition('.')[0]
    if not pid.isdigit():
        return True  # written before the pid was recorded
    if host != socket.gethostname():
        return False  # another machine's save on a shared filesystem: it cannot be checked from here
    if int(pid) == os.getpid():
        return True  # an earlier save of this process, which raised before cleaning up
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def write_folder(directory: Union[str, Path], write: Callable[[Path], None], owned: Collection[str]) -> Path:
    """Replace folder `directory` all at once: the old folder or the new one, never a mix.

    `write(staging)` fills a new folder beside `directory`; the entries of the old folder not named in `owned`
    (files the zoo did not write) are hard-linked (or copied) into it; one rename swaps it in. A failed or
    killed write leaves the old folder as it was, and its leftovers (`.zoo-save-*` beside `directory`) are
    removed by the next write into the same parent.
    """
    target = check_output_dir(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f'{SAVE_PREFIX}*'):
        if _is_stale(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f'{SAVE_PREFIX}{os.getpid()}.{socket.gethostname()}.', dir=target.parent))
    try:
        write(staging)
        for written in staging.rglob('*'):
            if written.is_file():
                os.chmod(written, _file_mode())  # some writers (safetensors) make files 0o600
        if target.is_dir():
            for entry in target.iterdir():
                kept = staging / entry.name
                if entry.name in owned or kept.exists() or kept.is_symlink():
                    continue
                if entry.is_symlink():
                    os.symlink(os.readlink(entry), kept)
                elif entry.is_dir():
                    shutil.copytree(entry, kept, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(entry, kept)
            os.chmod(staging, target.stat().st_mode)
            _swap_folders(staging, target)
        else:
            os.chmod(staging, 0o777 & ~_umask())
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
