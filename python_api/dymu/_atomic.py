"""Write a file whole or not at all: a temporary file in the same folder, then ``os.replace``.

Every file the ``dymu`` command line writes (thresholds JSON, reports, pictures) goes through
here, so an interrupted run (Ctrl-C, a crash, a full disk) leaves either the old file or no
file, never a truncated one. The temporary name is hidden (``.name.XXXX.tmp``) and removed
when the write fails; the finished file gets the usual permissions (the existing file's, or
0o666 minus the umask), not mkstemp's 0o600.

    with atomic_write(path, "w") as f: ...      # text (UTF-8) or "wb" for bytes
    write_text(path, text)
    write_bytes(path, data)
"""

import contextlib
import os
import stat
import tempfile


def _final_mode(path: str) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", *, encoding: str = "utf-8"):
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``.

    Args:
        path: the file to write (its folder must exist).
        mode: "w" (text, ``encoding``) or "wb" (bytes).

    Yields the open file. If the block raises, the temporary file is removed and ``path`` is
    untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({"encoding": encoding} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _final_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path, "w", encoding=encoding) as handle:
        handle.write(text)


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)
