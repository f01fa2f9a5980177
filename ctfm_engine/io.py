"""Atomic output: a result file or folder appears complete or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import SimpleITK as sitk


def default_mode(mode: int) -> int:
    """``mode`` limited by the process umask: what a plain open() or mkdir() would have created."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is flushed to disk (fsync), renamed to ``path`` and the
    rename made durable (fsync of the folder), so a power cut leaves the old file or the whole new one; on failure
    the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    os.chmod(temporary, default_mode(0o666))  # mkstemp makes files private; results are ordinary files
    try:
        yield Path(temporary)
        _fsync(Path(temporary))
        os.replace(temporary, path)
        _fsync(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; on success its files are flushed to disk and it replaces
    ``path`` (the rename made durable), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(staging, default_mode(0o777))
    try:
        yield staging
        for folder, _, files in os.walk(staging):
            for name in files:
                _fsync(Path(folder) / name)
            _fsync(Path(folder))
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk (folders: where the platform allows opening them)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # a folder on a platform that cannot open one (Windows): nothing more to do
        return
    try:
        os.fsync(descriptor)
    except OSError:  # file systems that do not support fsync on this object
        pass
    finally:
        os.close(descriptor)


def write_image(image: sitk.Image, path: str | Path, *, compress: bool = True) -> Path:
    """Write a SimpleITK image (NIfTI, NRRD, MHA: chosen by the suffix) atomically."""
    import SimpleITK as sitk

    path = Path(path)
    with atomic_output(path) as temporary:
        # SimpleITK picks the format from the file name, so write under a name with the real suffix.
        named = temporary.with_name(temporary.name + "".join(path.suffixes))
        try:
            sitk.WriteImage(image, str(named), useCompression=compress)
            named.replace(temporary)
        finally:
            named.unlink(missing_ok=True)
    return path
