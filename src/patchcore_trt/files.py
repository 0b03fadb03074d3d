"""Safe file writes: a crash or a full disk never leaves a half-written file under the final name.

Regular files are written to a temporary file beside the target and renamed onto it; a symlink to a regular
file stays a symlink (its target is the file replaced). Some targets are written into directly, because a rename
would replace them with a plain file: anything that is not a regular file (``/dev/null``, a FIFO, a socket), and
any path that leads to an open file descriptor (``/dev/stdout``, ``/dev/fd/N``, ``/proc/PID/fd/N``, or the file the
process's stdout or stderr is redirected to). The process's own stdout and stderr are written through their
descriptors, so ``--json /dev/stdout > out.txt`` appends where the shell's descriptor stands instead of
truncating or replacing ``out.txt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# A link to an open descriptor: /dev/fd/N, /proc/self/fd/N, /proc/PID/fd/N (and /dev/stdout, /dev/stderr below).
_FD_LINK = re.compile(r"^/(?:dev|proc/[^/]+)/fd/(\d+)$")
_STD_NAMES = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


def _link_chain(path: Path | str) -> list[str]:
    """``path`` and each symlink target it leads through, as absolute text; stops at a link to a descriptor."""
    chain: list[str] = []
    current = os.path.abspath(os.fspath(path))
    for _ in range(40):  # the kernel's own limit on nested links
        chain.append(current)
        if _FD_LINK.match(current) or current in _STD_NAMES:
            break  # a "magic" link: its text names the open file, it does not lead to it
        try:
            target = os.readlink(current)
        except OSError:
            break
        current = os.path.normpath(os.path.join(os.path.dirname(current), target))
    return chain


def _own_pid_fd(text: str) -> int | None:
    if text in _STD_NAMES:
        return _STD_NAMES[text]
    match = _FD_LINK.match(text)
    if match is None:
        return None
    if text.startswith("/dev/") or text.split("/")[2] in ("self", "thread-self", str(os.getpid())):
        return int(match.group(1))
    return None


def std_stream(path: Path | str) -> int | None:
    """1 or 2 when writing to ``path`` writes to this process's stdout or stderr, else None."""
    for text in _link_chain(path):
        fd = _own_pid_fd(text)
        if fd in (1, 2):
            return fd
    try:
        target = os.stat(path)
    except OSError:
        return None
    for fd in (1, 2):
        try:
            if os.path.samestat(target, os.fstat(fd)):
                return fd
        except OSError:
            continue
    return None


def _through_descriptor(path: Path | str) -> bool:
    return any(_FD_LINK.match(text) or text in _STD_NAMES for text in _link_chain(path))


def is_special(path: Path) -> bool:
    """True for a target written into directly, never renamed over: an existing target that is neither a regular
    file nor a folder (a device, a FIFO, a socket), or a path that leads to an open descriptor (``/dev/stdout``,
    ``/proc/PID/fd/N``, the file stdout or stderr is redirected to)."""
    if std_stream(path) is not None or _through_descriptor(path):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def open_special(path: Path, mode: str) -> IO:
    """Open a target ``is_special`` admits for writing (``mode`` "w" or "wb") without replacing or truncating it.

    This process's stdout and stderr are written through a copy of their descriptor: the data lands where the
    shell's descriptor stands (after anything printed before), even when it is redirected to a regular file. A
    regular file reached through another process's descriptor is appended to, never truncated.
    """
    path = Path(path)
    binary = "b" in mode
    fd = std_stream(path)
    if fd is not None:
        stream = sys.stdout if fd == 1 else sys.stderr
        if stream is not None:
            stream.flush()
        handle = os.fdopen(os.dup(fd), "wb" if binary else "w", **({} if binary else _text_options()))
        return handle
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        regular = False
    opened = ("ab" if binary else "a") if regular else ("wb" if binary else "w")
    return path.open(opened, **({} if binary else _text_options()))


def _text_options() -> dict[str, str]:
    return {"encoding": "utf-8", "newline": ""}


def staging_target(path: Path) -> Path:
    """The file a staged write replaces: ``path`` itself, or the file a symlink at ``path`` points to (the link
    stays a link)."""
    path = Path(path)
    if path.is_symlink():
        return Path(os.path.realpath(path))
    return path


@contextlib.contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """OS errors raised in the block name ``path``, the user's file, never a temporary one."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def staged_beside(target: Path) -> tuple[int, Path]:
    """A new temporary file beside ``target``, open (descriptor, path), with the permissions a plain open() gives
    (mkstemp makes it 0600)."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, Path(name)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    OS errors name ``path`` itself, never the temporary file.
    """
    path = Path(path)
    target = staging_target(path)
    with naming(path):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = staged_beside(target)
    os.close(fd)
    try:
        with naming(path):
            yield tmp
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    if is_special(path):
        with naming(path), open_special(path, "wb") as handle:
            handle.write(data)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def display_name(path: Path | str) -> str:
    """A path as text any writer can encode: undecodable bytes of the file name become ``\\xNN``."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")
