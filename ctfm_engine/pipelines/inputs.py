"""What a task request's input may be, and reading it: a CTVolume already in memory, or a file or DICOM folder.

Every input is read and validated before any model is loaded, so a bad input gives exit code 3 even when weights
are missing.  Several inputs are kept in memory after validation while they fit (else read again when their turn
comes), so a long list of scans neither fails late nor holds every scan at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ctfm_engine.readers import read_volume
from ctfm_engine.volume import CTVolume, check_scan


def sample_ct_path() -> Path:
    """The bundled sample CT (TotalSegmentator's example, 30 x 101 x 122 voxels of 3 mm) the demo and the export's
    validation use."""
    return Path(str(resources.files("ctfm_engine") / "data" / "sample_ct.nii.gz"))


# Volumes read for validation are kept for the run below this many voxels in total, else read again.
KEEP_VALIDATED_VOXELS = 300_000_000


@dataclass(frozen=True)
class ScanSource:
    """A CT on disk: a NIfTI/NRRD/MHA file or a folder holding a DICOM series, and how to read it."""

    path: str | Path
    series_uid: str | None = None  # the series to use when a DICOM folder holds several
    hu_offset: float | None = None  # added to every voxel (CT stored as HU + 1024 without a rescale)
    check_ct: bool = True  # False reads a true CT that fails the check that it is CT in HU (a crop inside an organ)

    def read(self) -> CTVolume:
        return read_volume(self.path, series_uid=self.series_uid, hu_offset=self.hu_offset, check_hu=self.check_ct)


Scan = CTVolume | ScanSource | str | Path


def as_source(scan: Scan, series_uid: str | None = None, hu_offset: float | None = None) -> CTVolume | ScanSource:
    """A path becomes a :class:`ScanSource` with the request's series and offset; volumes and sources stay."""
    if isinstance(scan, (CTVolume, ScanSource)):
        return scan
    return ScanSource(scan, series_uid, hu_offset)


def read_scan(scan: CTVolume | ScanSource) -> CTVolume:
    """The scan as a CTVolume, refused (InputError) when it holds non-numbers or is larger than any patient."""
    volume = scan if isinstance(scan, CTVolume) else scan.read()
    check_scan(volume)
    return volume


def scan_name(scan: CTVolume | ScanSource) -> str:
    """What a result calls its input: the path as given, or the volume's own source."""
    return scan.source if isinstance(scan, CTVolume) else str(scan.path)


class ValidatedScans:
    """Scans read and validated up front; iterating gives each volume, re-read when it was not kept."""

    def __init__(self, scans: Sequence[CTVolume | ScanSource], keep_voxels: int = KEEP_VALIDATED_VOXELS) -> None:
        self.scans = list(scans)
        self._kept: list[CTVolume | None] = []
        kept = 0
        for scan in self.scans:
            volume = read_scan(scan)
            kept += volume.voxels.size
            self._kept.append(volume if kept <= keep_voxels or isinstance(scan, CTVolume) else None)

    def __len__(self) -> int:
        return len(self.scans)

    def __iter__(self) -> Iterator[CTVolume]:
        for scan, volume in zip(self.scans, self._kept, strict=True):
            yield volume if volume is not None else read_scan(scan)

    def volumes(self) -> list[CTVolume]:
        return list(self)
