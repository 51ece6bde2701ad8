"""Write-then-rename: a file or a directory appears complete or not at all, and the temporaries of writers that
died (kill -9, power loss) are swept by the next writer of the same name.

Every temporary is named ``.<name>.vpsde-tmp-<random>`` beside its target and is held under an exclusive
``flock`` by its writer for as long as it lives. The kernel drops the lock when the writer dies however it dies,
so a temporary whose lock can be taken belongs to nobody and is removed (:func:`sweep_stale`). Nothing else is
ever removed: only names of that pattern, which only vpsde writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterator

TMP_TAG = ".vpsde-tmp-"

STOPPING = threading.Event()
"""Set when the process was asked to stop (the CLI's SIGTERM handler): from then on no temporary is committed."""


class Stopped(BaseException):
    """The process was asked to stop: raised where SIGTERM lands and again by any commit after it, since code the
    signal interrupts may swallow the first (a bare ``except:`` around an optional import)."""


def _refuse_if_stopping() -> None:
    if STOPPING.is_set():
        raise Stopped()


def _temp_prefix(name: str) -> str:
    return f".{name}{TMP_TAG}"


def sweep_stale(directory: Path, name: str) -> list[Path]:
    """Remove the temporaries of ``name`` in ``directory`` left by writers that are gone (their lock is free);
    return what was removed."""
    removed = []
    prefix = _temp_prefix(name)
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # a symlink or gone: not ours to touch
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live writer holds it
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def locked_temp(directory: Path, name: str, suffix: str, make_dir: bool) -> tuple[Path, int]:
    """A new temporary for ``name`` in ``directory`` and an open descriptor holding its lock. If a sweeper removed
    it between creation and locking (it looked abandoned), make another."""
    while True:
        if make_dir:
            path = tempfile.mkdtemp(dir=directory, prefix=_temp_prefix(name), suffix=suffix)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        else:
            fd, path = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(name), suffix=suffix)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:
            return Path(path), fd
        os.close(fd)


def _name_the_target(e: OSError, tmp: Path, path: Path) -> None:
    """Make ``e`` name what the user asked for (``path``, or the file inside it), not the temporary: a full disk's
    error often names no file at all."""
    name = os.fsdecode(e.filename) if e.filename else ""
    if not name:
        e.filename = str(path)
    elif name.startswith(str(tmp)):
        e.filename = str(path) + name[len(str(tmp)):]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; on success rename it to ``path`` (mode 0644), on any
    error (a signal included) remove it; nothing is renamed once :data:`STOPPING` is set. ``suffix`` keeps the
    extension some writers insist on (np.savez adds ".npz"). Stale temporaries of ``path`` left by dead writers
    are swept first."""
    path = Path(path)
    sweep_stale(path.parent, path.name)
    tmp, fd = locked_temp(path.parent, path.name, suffix, make_dir=False)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        _refuse_if_stopping()
        os.replace(tmp, path)
    except OSError as e:
        _name_the_target(e, tmp, path)
        raise
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a new, locked temporary directory beside ``path`` (mode 0755) to fill; removed on any error. The
    caller moves it into place with :func:`replace_dir` inside the block."""
    sweep_stale(path.parent, path.name)
    tmp, fd = locked_temp(path.parent, path.name, "", make_dir=True)
    try:
        tmp.chmod(0o755)
        yield tmp
    except OSError as e:
        _name_the_target(e, tmp, path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a replace this is the old directory, or gone
        os.close(fd)


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Exclusive flock on ``directory`` itself (no lock file left behind): writers that replace entries of one
    directory take turns."""
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE): readers see the old or the new, never
    neither. False where the system or filesystem cannot (the caller then falls back to two renames)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Move the directory ``new`` to ``target``; if ``target`` exists, swap them atomically so ``new`` then holds
    the old directory (which the caller removes). Hold :func:`directory_lock` on the parent around this."""
    _refuse_if_stopping()
    if not os.path.lexists(target):
        os.rename(new, target)
    elif not exchange(new, target):  # no atomic exchange here: two renames, with a moment where none exists
        old = new.with_name(new.name + ".old")
        os.rename(target, old)
        os.rename(new, target)
        os.rename(old, new)
