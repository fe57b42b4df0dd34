"""Writing the user's files safely (STYLE.md rule 21).

``atomic_write_bytes(path, data)`` decides by what ``path`` is:

* a new path, or an existing regular file: the bytes go to a temporary file beside it, are
  fsync'ed, and the temporary file is renamed over ``path`` (a reader sees the old file or the
  new one, never half of either). A new file gets the umask's mode (0o666 & ~umask, applied by
  the kernel); an existing file keeps its mode (and, for root, its owner).
* a symlink: written through to its target, by the same rules (the link itself stays);
* a character device, a FIFO (named pipe) or ``"-"`` (stdout): written directly, opened for
  writing and never replaced, chmod'ed or truncated into a regular file.

``replace_bytes`` is the temp + rename step alone, for files inside folders qkv created (a
checkpoint's ``latest`` pointer), where a planted symlink must be replaced, not followed.
Every failure is a ``WriteError`` (an ``OSError``) whose one-line message names the file.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import sys
from pathlib import Path

from qkv.errors import WriteError


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_error(path: str | os.PathLike, err: OSError) -> WriteError:
    """``err`` re-stated as one line naming ``path`` (the user's name, not a temporary one)."""
    if isinstance(err, WriteError):
        return err
    code = err.errno if err.errno is not None else errno.EIO
    return WriteError(code, f"cannot write {path}: {err.strerror or os.strerror(code)}", str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path``: atomically for regular files, directly for devices, FIFOs and ``-``."""
    if str(path) == "-":
        _write_stdout(data)
        return
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        info = os.stat(target)
    except FileNotFoundError:
        info = None
    except OSError as err:  # a symlink loop, a component that is not a folder
        raise write_error(path, err) from None
    if info is None or stat.S_ISREG(info.st_mode):
        _replace(target, data, keep=info, shown=path)
    elif stat.S_ISCHR(info.st_mode) or stat.S_ISFIFO(info.st_mode):
        _write_direct(target, data, shown=path)
    elif stat.S_ISDIR(info.st_mode):
        raise WriteError(errno.EISDIR, f"cannot write {path}: it is a folder", str(path))
    else:
        raise WriteError(errno.EINVAL, f"cannot write {path}: not a regular file, device or pipe", str(path))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Temp + fsync + rename over ``path`` whatever it is now (for qkv's own files only)."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except OSError:
        info = None
    keep = info if info is not None and stat.S_ISREG(info.st_mode) else None
    _replace(path, data, keep=keep, shown=path)


def _replace(path: Path, data: bytes, *, keep: os.stat_result | None, shown: Path) -> None:
    """Write a temporary file beside ``path`` (mode from ``keep``, else the umask's) and rename it over."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
    except OSError as err:
        raise write_error(shown, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if keep is not None:
                _copy_owner_and_mode(f.fileno(), keep)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(shown, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_beside(path: str | os.PathLike) -> Path:
    """A new empty hidden file beside ``path`` (mode 0o666 & ~umask), for writers that take a path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
    except OSError as err:
        raise write_error(path, err) from None
    os.close(fd)
    return tmp


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A new empty hidden folder beside ``path`` (mode 0o777 & ~umask), to fill and rename whole."""
    path = Path(path)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new hidden file beside ``path``, created with 0o666 so that the kernel applies the umask
    (and a folder's default ACL), as for any file a program creates; no race on reading the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _copy_owner_and_mode(fd: int, keep: os.stat_result) -> None:
    """The replacement keeps the replaced file's permission bits (and its owner when we may set it)."""
    if hasattr(os, "fchown") and os.geteuid() == 0 and (keep.st_uid, keep.st_gid) != (os.geteuid(), os.getegid()):
        os.fchown(fd, keep.st_uid, keep.st_gid)
    os.fchmod(fd, stat.S_IMODE(keep.st_mode))


def _write_direct(path: Path, data: bytes, *, shown: Path) -> None:
    """Open an existing device or FIFO for writing and write ``data``; it is never replaced."""
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
    except OSError as err:
        raise write_error(shown, err) from None


def _write_stdout(data: bytes) -> None:
    out = getattr(sys.stdout, "buffer", None)
    try:
        if out is None:
            sys.stdout.write(data.decode("utf-8"))
        else:
            sys.stdout.flush()
            out.write(data)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as err:
        raise write_error("-", err) from None
