"""Dataset archives (`.tar`, `.tar.gz`, ...) extracted once into a content-addressed cache.

Owns the cache location (`$XDG_CACHE_HOME/chanprune`), the traversal-safe extraction (our member
checks plus Python's tarfile `data` filter), the atomic temp-folder-then-rename publish, stale
temp cleanup, the (path, size, mtime, inode) memo that skips re-hashing an unchanged archive, and
the progress bars of the first use (hashing, extracting; on a terminal only).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..errors import ChanpruneError, UserError
from ..support.progress import bytes_progress

__all__ = ["ARCHIVE_SUFFIXES", "cache_root", "extract_archive_cached", "is_archive"]

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

_CACHE_MARKER = ".chanprune-extracted.json"
_HASH_PREFIX = 32  # hex characters of the sha256 used as the cache folder name
_STALE_TMP_SECONDS = 24 * 3600
# Python >= 3.11.4 / 3.12: the tarfile extraction filters; FilterError subclasses TarError.
_FilterError: type[Exception] = getattr(tarfile, "FilterError", tarfile.TarError)


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/chanprune` (XDG: a relative value is ignored), else `~/.cache/chanprune`."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "chanprune"
    try:
        return Path.home() / ".cache" / "chanprune"
    except RuntimeError:
        raise UserError("cannot find a home folder for the cache; set XDG_CACHE_HOME") from None


def is_archive(path: Path) -> bool:
    """Whether `path` is named like a tar archive this module extracts."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


class _CountingReader:
    """A binary file that reports how many bytes each read returned (the progress of one pass)."""

    def __init__(self, fh: BinaryIO, advance: Callable[[int], None]) -> None:
        self._fh, self._advance = fh, advance

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self._advance(len(data))
        return data


def _sha256_file(path: Path, display: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh, bytes_progress(f"hashing {display}", path.stat().st_size) as advance:
        reader = _CountingReader(fh, advance)
        for chunk in iter(lambda: reader.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _escapes(relative: str) -> bool:
    norm = posixpath.normpath(relative)
    return norm == ".." or norm.startswith("../") or norm.startswith("/")


def _member_problem(member: tarfile.TarInfo, filter_available: bool) -> str | None:
    """Why `member` must not be extracted, or None. The tarfile data filter re-checks on disk."""
    name = member.name
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "climbs out of the archive ('..')"
    if member.ischr() or member.isblk() or member.isfifo():
        return "is a device or FIFO"
    if member.issym() or member.islnk():
        if not filter_available:
            return "is a link (links need Python's tarfile data filter, 3.11.4+)"
        target = member.linkname
        base = posixpath.dirname(name) if member.issym() else ""
        if target.startswith("/") or _escapes(posixpath.join(base, target)):
            return f"links outside the archive (to {target!r})"
        return None
    if not (member.isfile() or member.isdir()):
        return "is not a regular file, folder or link"
    return None


def _checked_members(tf: tarfile.TarFile, display: str, filter_available: bool) -> Iterator[tarfile.TarInfo]:
    for member in tf:
        problem = _member_problem(member, filter_available)
        if problem:
            raise UserError(f"refusing to extract {display}: member {member.name!r} {problem}; "
                            "use an archive whose members stay inside it (relative paths, no outside links)")
        yield member


def _remove_stale_tmp(folder: Path) -> None:
    """Best effort: drop temp folders left by extractions killed long ago."""
    now = time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") and ".tmp-" in entry.name:
            try:
                if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass


def _extract(archive: Path, final: Path, display: str, digest: str) -> None:
    """Extract into a temp folder beside `final`, then rename: `final` only ever appears complete."""
    parent = final.parent
    _remove_stale_tmp(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the extracted data is not secret
    filter_available = hasattr(tarfile, "data_filter")
    try:
        try:
            # Stream mode: one sequential pass, no backward seeks in the compressed stream.
            with open(archive, "rb") as fh, \
                    bytes_progress(f"extracting {display} into the cache (first use only)", archive.stat().st_size) as advance, \
                    tarfile.open(fileobj=_CountingReader(fh, advance), mode="r|*") as tf:  # type: ignore[call-overload]
                members = _checked_members(tf, display, filter_available)
                if filter_available:
                    tf.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python < 3.11.4: our own checks refuse every link
                    tf.extractall(tmp, members=members)
        except UserError:
            raise
        except _FilterError as exc:
            raise UserError(f"refusing to extract {display}: {exc}; use an archive whose members stay inside it") from None
        except (tarfile.TarError, EOFError, zlib.error, ValueError) as exc:
            raise UserError(f"cannot read archive {display}: {exc}; it is damaged or incomplete, fetch or re-create it") from None
        except OSError as exc:
            raise ChanpruneError(
                f"cannot extract {display} into {parent}: {exc}; set XDG_CACHE_HOME to a writable "
                "folder with enough space"
            ) from None
        (tmp / _CACHE_MARKER).write_text(
            json.dumps({"archive": str(archive), "sha256": digest, "extracted": time.time()}),
            encoding="utf-8",
        )
        if final.exists() and not (final / _CACHE_MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)  # damaged by hand: the marker is always renamed in
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _CACHE_MARKER).is_file():  # not a lost race with a concurrent extraction
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def extract_archive_cached(archive: Path, display: str | None = None) -> Path:
    """Folder holding `archive`'s extracted content, extracting it on first use only.

    The folder is keyed by the archive's sha256; a small memo keyed by (path, size, mtime, inode)
    avoids even re-hashing the archive on later runs.
    """
    display = display or str(archive)
    root = cache_root() / "datasets"
    try:
        (root / "by-stat").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the data cache {root}: {exc}; set XDG_CACHE_HOME") from None
    st = archive.stat()
    key = hashlib.sha256(
        f"{archive.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()
    ).hexdigest()[:_HASH_PREFIX]
    memo = root / "by-stat" / key
    try:
        digest = memo.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        digest = ""
    if re.fullmatch(r"[0-9a-f]{64}", digest) and (root / digest[:_HASH_PREFIX] / _CACHE_MARKER).is_file():
        return root / digest[:_HASH_PREFIX]
    try:
        digest = _sha256_file(archive, display)
    except OSError as exc:
        raise UserError(f"cannot read {display}: {exc}") from None
    final = root / digest[:_HASH_PREFIX]
    if not (final / _CACHE_MARKER).is_file():
        _extract(archive, final, display, digest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".memo.", dir=memo.parent)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(digest)
        os.replace(tmp, memo)
    except OSError:
        pass  # the memo only saves a re-hash next time
    return final
