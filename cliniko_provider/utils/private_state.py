"""Private local state: the one home of every file the provider keeps on a worker's disk.

Every such file (the machine's rate budget, the upload journal) lives under one directory, named by
``$CLINIKO_STATE_DIR`` (default ``<tmp>/cliniko-<uid>``), in a sub-directory per kind (``rate``,
``uploads``). Another local user must not be able to read that state, plant state that is read, make
the provider write through a link, or hang it; so:

- every directory is this user's own and mode 0700 (one of another owner, or open to others, is
  refused: never repaired, since it may be shared on purpose, as ``/tmp`` is), opened without
  following a symlink, and every file is reached through the directory's descriptor;
- files are 0600, opened no-follow and non-blocking, then checked with ``fstat``: anything but a
  regular file of this user with one link (a symlink, FIFO, device, directory) is refused without
  ever being read, and removed (the directory is private, so removing the name never touches a
  target);
- a file is rewritten by writing a new file (exclusive create, never an existing name) and renaming
  it over the old one, so a reader sees the old content or the new, never a half.

What the content means, and how damaged content is repaired, is the caller's: this module only hands
out bytes it is sure came from this user's own files.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

STATE_DIR_ENV = "CLINIKO_STATE_DIR"
OLD_STATE_DIR_ENV = "CLINIKO_RATE_STATE_DIR"  # deprecated: the rate budget's directory before 0.x
FIX = f"make the directory a private one of this user (mode 0700), or set {STATE_DIR_ENV} to one"
FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeStateError(OSError):
    """A private-state directory or file is not safe to use (another owner, loose mode, not a file)."""


def state_root() -> tuple[Path, str | None]:
    """Return the directory of all private state, and a deprecation note when the old variable named it.

    ``$CLINIKO_STATE_DIR``, else the deprecated ``$CLINIKO_RATE_STATE_DIR``, else ``<tmp>/cliniko-<uid>``.
    """
    configured = os.environ.get(STATE_DIR_ENV)
    old = os.environ.get(OLD_STATE_DIR_ENV)
    if configured:
        note = f"{OLD_STATE_DIR_ENV} is deprecated and ignored: {STATE_DIR_ENV} is set" if old else None
        return Path(configured), note
    if old:
        return Path(old), f"{OLD_STATE_DIR_ENV} is deprecated; set {STATE_DIR_ENV} instead"
    return Path(tempfile.gettempdir()) / f"cliniko-{os.geteuid()}", None


def check_name(name: str) -> str:
    """Return ``name`` if it can name a file directly inside a private directory, else raise ValueError.

    :param name: a file name (no separator, not hidden: names starting with a dot are temp files).
    """
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise ValueError(f"{name!r} cannot name a private state file")
    return name


class PrivateDir:
    """A directory private to this OS user, and the files in it (see the module docstring).

    :param what: names the state in log lines, e.g. ``"Cliniko rate budget"``.
    :param sub: its sub-directory of the state root (:func:`state_root`), read at each use.
    :param path: the directory itself instead (made if missing; checked the same way).
    """

    def __init__(self, what: str, sub: str, path: Path | None = None) -> None:
        self.what = what
        self.sub = check_name(sub)
        self._path = path
        self._noted = False

    @property
    def path(self) -> Path:
        """The directory (logs the deprecation note of the state root's variable once)."""
        return self._locate()[0]

    def _locate(self) -> tuple[Path, str]:
        """Return (directory to open first, sub-directory of it to use: "" for that directory itself)."""
        if self._path is not None:
            return self._path, ""
        root, note = state_root()
        if note and not self._noted:
            self._noted = True
            log.warning("%s: %s", self.what, note)
        return root / self.sub, self.sub

    def open_dir(self) -> int:
        """Open the directory (making it, and the state root, when missing); return its descriptor.

        :raises UnsafeStateError: it is not a directory of this user's, mode 0700.
        :raises OSError: it cannot be made or opened.
        """
        path, sub = self._locate()
        fd = _open_private_dir(path.parent if sub else path, None)
        if not sub:
            return fd
        try:
            return _open_private_dir(Path(sub), fd)
        finally:
            os.close(fd)

    def open_shared(self, name: str) -> int:
        """Open (creating it when missing) a file for reading and writing in place; return its descriptor.

        An unsafe entry at the name is removed, with one warning, and a new file made in its place.

        :param name: the file's name in the directory.
        """
        dir_fd = self.open_dir()
        try:
            fd = self._open_checked(dir_fd, check_name(name), os.O_RDWR | os.O_CREAT)
            if fd is None:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | FILE_FLAGS, 0o600, dir_fd=dir_fd)
            return fd
        finally:
            os.close(dir_fd)

    def read(self, name: str, limit: int) -> bytes | None:
        """Return a file's content (None when it is missing or unsafe, the latter removed with one warning).

        :param name: the file's name in the directory.
        :param limit: the most bytes read; a longer file is returned cut at ``limit`` + 1 bytes, so
            the caller can see that it is too long.
        """
        dir_fd = self.open_dir()
        try:
            fd = self._open_checked(dir_fd, check_name(name), os.O_RDONLY)
        finally:
            os.close(dir_fd)
        if fd is None:
            return None
        try:
            return read_at_most(fd, limit + 1)
        finally:
            os.close(fd)

    def write(self, name: str, data: bytes) -> None:
        """Replace a file's content at once: a new 0600 file, exclusively created, renamed over the old.

        :param name: the file's name in the directory.
        :param data: the new content.
        """
        check_name(name)
        dir_fd = self.open_dir()
        try:
            temp = f".{name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | FILE_FLAGS, 0o600, dir_fd=dir_fd)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
                raise
        finally:
            os.close(dir_fd)

    def _open_checked(self, dir_fd: int, name: str, flags: int) -> int | None:
        """Open ``name`` if it is a regular file of this user with one link; else remove it, return None."""
        try:
            fd = os.open(name, flags | FILE_FLAGS, 0o600, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            self._remove_unsafe(name, dir_fd, "a symlink")
            return None
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink == 1:
            if info.st_mode & 0o077:
                os.fchmod(fd, 0o600)
            return fd
        os.close(fd)
        self._remove_unsafe(name, dir_fd, "not a regular file of this user")
        return None

    def _remove_unsafe(self, name: str, dir_fd: int, what: str) -> None:
        log.warning("%s: %s was %s; replacing it", self.what, self.path / name, what)
        os.unlink(name, dir_fd=dir_fd)


def _open_private_dir(path: Path, dir_fd: int | None) -> int:
    """Make (mode 0700) or open a directory, refusing a symlink, another owner's or a loose one."""
    try:
        os.mkdir(path, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass
    except FileNotFoundError:
        if dir_fd is not None:
            raise
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeStateError(error.errno, "not a directory (or a symlink)") from None
        raise
    info = os.fstat(fd)
    problem = None
    if info.st_uid != os.geteuid():
        problem = f"the directory belongs to user id {info.st_uid}"
    elif info.st_mode & 0o077:
        problem = f"the directory's mode {stat.S_IMODE(info.st_mode):04o} lets other users in"
    if problem:
        os.close(fd)
        raise UnsafeStateError(errno.EPERM, problem)
    return fd


def read_at_most(fd: int, count: int) -> bytes:
    """Return up to ``count`` bytes from a descriptor (fewer only at its end).

    :param fd: an open file descriptor.
    :param count: the most bytes to read.
    """
    chunks: list[bytes] = []
    while count > 0 and (chunk := os.read(fd, count)):
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)
