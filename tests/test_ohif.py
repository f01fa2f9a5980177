"""The real OHIF viewer shows our DICOM-SEG on the CT it segments, where our label map says, under our names.

OHIF is npm ``@ohif/app`` 3.13.2 (its prebuilt ``dist/``, tests/ohif), served by a Python HTTP server in this test
with an ``app-config.js`` whose DICOMweb data source is a real Orthanc (tests/orthanc.py); the server also
reverse-proxies ``/dicom-web/`` to Orthanc, so the viewer and its data share one origin (no CORS).  Headless Debian
Chromium, driven by puppeteer-core from ``tests/ohif/show_seg.mjs``, opens the study, loads one SEG series onto
the CT as a user does (double-click its thumbnail, answer Yes), reads the segment names from the segmentation
panel and takes screenshots of the viewport with all segments, with none, and with the spleen alone.  Each
encoding our writer offers is a SEG series of its own, shown in a Chromium of its own.

Each screenshot pixel is mapped to the patient point it shows with cornerstone's canvas-to-world transform, a
mapping the test first checks against the CT itself (the screenshot's grey levels follow our HU at those points,
and follow them far worse with the volume mirrored).  The pixels the SEG changes must then be the pixels whose
point our label map labels, and match far worse with the label map mirrored left-right or front-back.

The abdominal CT stays JPEG 2000 (OHIF decodes it with its OpenJPEG WebAssembly codec: no transcoding needed), and
Chromium renders with software WebGL (SwiftShader through ANGLE).  Orthanc runs in a network namespace of its own;
the HTTP server listens inside it (its thread joins the namespace with setns(2)) and Node/Chromium run there through
nsenter.  Load times and memory per encoding go to ``display.json`` beside the screenshots;
``CTFM_UPDATE_FIGURES=1`` copies the BINARY view to docs/ohif_seg.png.

Two findings are pinned as strict expected failures: OHIF colours LABELMAP segments off by one
(:data:`LABELMAP_COLOUR_DEFECT`), and a JPEG 2000 BINARY SEG costs a failed whole-instance fetch from this Orthanc
before OHIF loads it frame by frame (:data:`J2K_TRANSCODING`).
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import SHARED, TS_DICOM, missing_real_part, require
from orthanc import Orthanc, running_orthanc

from ctfm_engine.dicom.seg import Algorithm, SegEncoding, SegInfo, source_headers, write_dicom_seg
from ctfm_engine.dicom.series import read_dicom_series
from ctfm_engine.labels import Label, label_table, totalsegmentator_names
from ctfm_engine.volume import CTVolume

REPOSITORY = Path(__file__).resolve().parents[1]
OHIF_PROJECT = Path(__file__).resolve().parent / "ohif"
OHIF_DIST = OHIF_PROJECT / "node_modules" / "@ohif" / "app" / "dist"
SHOW_SEG = OHIF_PROJECT / "show_seg.mjs"
CHROMIUM = Path("/usr/bin/chromium")
FIGURE = REPOSITORY / "docs" / "ohif_seg.png"
UPDATE_FIGURES = os.environ.get("CTFM_UPDATE_FIGURES") == "1"

TS_EXPECTED = SHARED / "totalsegmentator" / "example_seg_dicom.nii.gz"
TILT_DICOM = SHARED / "dicom" / "ge_head_gantry_tilt"
ALGORITHM = Algorithm("ctfm-test-seg", "0.1.0", "3f" * 32)
ENCODINGS = tuple(SegEncoding)  # every encoding our writer offers, each its own SEG series
BACKGROUND = "Background"
SOLO_SEGMENT = "spleen"  # a lateral structure: on the patient's left, its mirror image lies in the liver
SKULL_HU = 300.0
LABELMAP_COLOUR_DEFECT = (
    "OHIF 3.13.2 colours a LABELMAP SEG's segment n with the colour of SegmentSequence item n-1 (its bundled "
    "@cornerstonejs/adapters getSegmentMetadata builds [undefined, ...SegmentSequence], taking item k for segment "
    "k+1): our first item is segment 0, Background (black, as highdicom writes LABELMAP), so the spleen (1) is drawn "
    "black, the liver (2) in the spleen's green, and so on; names and placement are right, BINARY colours too")
J2K_TRANSCODING = (
    "OHIF fetches a multi-frame SEG whole (WADO-RS, Accept: multipart/related; type=\"application/dicom\", so in the "
    "default Explicit VR Little Endian); Orthanc 1.10.1 cannot decode JPEG 2000 to transcode it and answers 500, "
    "and OHIF falls back to fetching the 520 frames one by one (transfer-syntax=*): displayed right, but slower "
    "and with errors in the console")

STEP_TIMEOUT_S = 60  # one step in the browser: page load, CT shown, SEG loaded
RUN_TIMEOUT_S = 150  # one whole viewer session, Chromium start to close
PROXY_TIMEOUT_S = 60
# A screenshot pixel belongs to the overlay when a colour channel differs by more than this from the view without
# segments (8-bit levels; the overlay's fill changes them by tens of levels).
OVERLAY_LEVELS = 12
CLONE_NEWNET = 0x40000000


def viewer_parts() -> None:
    """Node.js, the installed npm project (OHIF's dist/, puppeteer-core) and Debian Chromium, or a missing real part."""
    require(shutil.which("node"), "Node.js is not installed (apt-get install nodejs npm)")
    require((OHIF_DIST / "index.html").is_file() and (OHIF_PROJECT / "node_modules" / "puppeteer-core").is_dir(),
            f"the OHIF test project is not installed ({OHIF_PROJECT}: npm install, as make test does)")
    require(CHROMIUM.is_file(), f"Debian Chromium is not installed ({CHROMIUM}; apt-get install chromium)")


# --- the studies: CT series and our SEGs of them ----------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """A CT series as the archive holds it, its label map on the volume's grid, and our SEGs of it."""

    volume: CTVolume
    labels: np.ndarray
    ct_files: list[Path]
    segs: dict[str, SegInfo]  # by series description, the name the study browser shows


def with_resolved_uids(volume: CTVolume, folder: Path) -> list[Path]:
    """The series' files as an archive would hold them: with the Study/Series/SOP/Frame of Reference UIDs that
    the series reader resolved (derived where the files leave them blank), which our SEGs reference."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file, header in zip(volume.dicom.files, source_headers(volume), strict=True):
        dataset = pydicom.dcmread(file)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                        "FrameOfReferenceUID"):
            setattr(dataset, keyword, getattr(header, keyword))
        dataset.file_meta.MediaStorageSOPInstanceUID = header.SOPInstanceUID
        path = folder / f"{header.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


@pytest.fixture(scope="module")
def table() -> dict[int, Label]:
    return label_table(totalsegmentator_names())


@pytest.fixture(scope="module")
def abdomen(table: dict[int, Label], tmp_path_factory: pytest.TempPathFactory) -> Study:
    """The 20-slice abdominal CT (JPEG 2000, blank UIDs) with TotalSegmentator's 31 structures, one SEG series per
    encoding."""
    viewer_parts()
    folder = tmp_path_factory.mktemp("ohif-abdomen")
    volume = read_dicom_series(TS_DICOM)
    expected = sitk.ReadImage(str(TS_EXPECTED))
    labels = sitk.GetArrayFromImage(sitk.Resample(expected, volume.to_sitk(), sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    segs = {}
    for number, encoding in enumerate(ENCODINGS):
        description = f"CT-FM {encoding.value}"
        segs[description] = write_dicom_seg(labels, volume, table, folder / f"{encoding.value}.dcm",
                                            algorithm=ALGORITHM, encoding=encoding, series_number=901 + number,
                                            series_description=description)
    return Study(volume, labels, with_resolved_uids(volume, folder / "ct"), segs)


@pytest.fixture(scope="module")
def tilted_head(table: dict[int, Label], tmp_path_factory: pytest.TempPathFactory) -> Study:
    """The GE head CT with an 18.5 degree gantry tilt (its 4 mm block, de-sheared by our reader) and a SEG of its
    skull (bone above 300 HU), whose frames lie in the tilted source planes."""
    viewer_parts()
    folder = tmp_path_factory.mktemp("ohif-tilt")
    series_uid = str(pydicom.dcmread(TILT_DICOM / "01.dcm", stop_before_pixels=True).SeriesInstanceUID)
    volume = read_dicom_series(TILT_DICOM, series_uid=f"{series_uid}#4mm")
    assert volume.dicom.resampled_for_tilt
    skull = {label.name: value for value, label in table.items()}["skull"]
    labels = np.where(volume.voxels > SKULL_HU, skull, 0).astype(np.uint8)
    description = "CT-FM skull"
    seg = write_dicom_seg(labels, volume, table, folder / "skull.dcm", algorithm=ALGORITHM,
                          series_description=description)
    return Study(volume, labels, sorted(TILT_DICOM.glob("*.dcm")), {description: seg})


# --- the archive and the viewer's web server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    viewer_parts()
    with running_orthanc(tmp_path_factory.mktemp("ohif-orthanc")) as orthanc:
        yield orthanc


def send(pacs: Orthanc, study: Study) -> None:
    """Store the study, CT and SEGs, with `ctfm pacs send` over STOW-RS (instances already there stay single)."""
    files = [*study.ct_files, *(seg.path for seg in study.segs.values())]
    sent = pacs.run([sys.executable, "-m", "ctfm_engine.cli", "pacs", "send", pacs.dicomweb_url, *files, "--json"])
    assert sent.returncode == 0, sent.stderr[-2000:]
    statuses = {item["status"] for item in json.loads(sent.stdout)["files"]}
    assert statuses <= {"stored", "already-present"}, sent.stdout[-2000:]


def app_config() -> str:
    """OHIF's configuration: one DICOMweb data source at this server's own /dicom-web/ (Orthanc behind it), no
    onboarding tour or investigational-use banner over the viewport."""
    return """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: { 'ohif.tours': { $set: [] } },
  investigationalUseDialog: { option: 'never' },
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showLoadingIndicator: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (test)',
      name: 'orthanc',
      wadoUriRoot: window.location.origin + '/dicom-web',
      qidoRoot: window.location.origin + '/dicom-web',
      wadoRoot: window.location.origin + '/dicom-web',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true },
    },
  }],
};
"""


class ViewerHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, orthanc_port: int) -> None:
        self.orthanc_port = orthanc_port
        self.config = app_config().encode()
        self.proxy_failures: list[str] = []
        super().__init__(("127.0.0.1", 0), ViewerRequestHandler)


class ViewerRequestHandler(SimpleHTTPRequestHandler):
    """OHIF's dist/ (unknown paths are the single-page app's routes: index.html), our app-config.js, and
    /dicom-web/ forwarded to Orthanc."""

    server: ViewerHTTPServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(OHIF_DIST), **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        route = self.path.split("?", 1)[0]
        if route.startswith("/dicom-web/"):
            self._forward_to_orthanc()
        elif route == "/app-config.js":
            self._answer(200, "text/javascript", self.server.config)
        else:
            if not (OHIF_DIST / route.lstrip("/")).is_file():
                self.path = "/index.html"
            super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the signature http.server calls)
        """Quiet: the browser fetches hundreds of files."""

    def _forward_to_orthanc(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=PROXY_TIMEOUT_S)
        try:
            accept = self.headers.get("Accept")
            connection.request("GET", self.path, headers={"Accept": accept} if accept else {})
            response = connection.getresponse()
            body = response.read()
        except OSError as error:
            self.server.proxy_failures.append(f"GET {self.path}: {error}")
            self.send_error(502, f"Orthanc did not answer: {error}")
            return
        finally:
            connection.close()
        if response.status >= 500:
            self.server.proxy_failures.append(f"GET {self.path} (Accept: {self.headers.get('Accept')}): Orthanc "
                                              f"answered {response.status}")
        self._answer(response.status, response.getheader("Content-Type", "application/octet-stream"), body)

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def join_network_namespace(namespace: str) -> None:
    """Move the calling thread (only it: Linux namespaces are per thread) into ``namespace`` (a /proc/PID/ns/net)."""
    libc = ctypes.CDLL(None, use_errno=True)
    descriptor = os.open(namespace, os.O_RDONLY)
    try:
        if libc.setns(descriptor, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns({namespace}): {os.strerror(error)}")
    finally:
        os.close(descriptor)


@pytest.fixture(scope="module")
def viewer(pacs: Orthanc) -> Iterator[ViewerHTTPServer]:
    """The viewer's web server on 127.0.0.1 inside Orthanc's namespace, served by a thread that joined it (the
    threads it starts per request inherit the namespace, so the proxy reaches Orthanc's loopback too)."""
    started = threading.Event()
    outcome: dict[str, Any] = {}

    def serve() -> None:
        try:
            join_network_namespace(pacs.namespace)
            outcome["server"] = ViewerHTTPServer(pacs.http_port)
        except OSError as error:
            outcome["error"] = error
            return
        finally:
            started.set()
        outcome["server"].serve_forever(poll_interval=0.2)

    thread = threading.Thread(target=serve, name="ohif-http", daemon=True)
    thread.start()
    started.wait(timeout=30)
    if "server" not in outcome:
        missing_real_part(f"the viewer's web server cannot listen in Orthanc's network namespace: "
                          f"{outcome.get('error', 'it did not start within 30 s')}")
    server = outcome["server"]
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- one viewer session ------------------------------------------------------------------------------------------


def show_seg(pacs: Orthanc, viewer: ViewerHTTPServer, study: Study, seg: SegInfo, out_dir: Path,
             image_sop_instance_uid: str) -> dict[str, Any]:
    """Run tests/ohif/show_seg.mjs in Orthanc's namespace for ``seg``: its JSON result (screenshots in
    ``out_dir``).  Chromium is ended here whatever happens to the script."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = viewer.server_address[1]
    pid_file = out_dir / "chromium.pid"
    request = {
        "chromium": str(CHROMIUM),
        "url": f"http://127.0.0.1:{port}/viewer?StudyInstanceUIDs={study.volume.dicom.study_instance_uid}",
        "seg_description": seg_description(seg),
        "segment_count": len(segment_labels(seg)),
        "solo_segment": SOLO_SEGMENT,
        "image_sop_instance_uid": image_sop_instance_uid,
        "out_dir": str(out_dir),
        "chromium_pid_file": str(pid_file),
        "timeout_ms": STEP_TIMEOUT_S * 1000,
        "deadline_ms": RUN_TIMEOUT_S * 1000,
    }
    (out_dir / "request.json").write_text(json.dumps(request, indent=1))
    command = ["nsenter", f"--net={pacs.namespace}", "node", str(SHOW_SEG), str(out_dir / "request.json")]
    node = subprocess.Popen(command, cwd=OHIF_PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = node.communicate(timeout=RUN_TIMEOUT_S + 30)
    except subprocess.TimeoutExpired:
        node.kill()
        stdout, stderr = node.communicate()
        pytest.fail(f"the OHIF session ran past {RUN_TIMEOUT_S + 30} s; its log ends:\n{stderr[-3000:]}")
    finally:
        end_chromium(pid_file)
    (out_dir / "show_seg.log").write_text(stderr)
    (out_dir / "result.json").write_text(stdout)
    assert node.returncode == 0, (f"show_seg.mjs failed ({node.returncode}); proxy failures "
                                  f"{viewer.proxy_failures[-5:]}; its log ends:\n{stderr[-4000:]}")
    return json.loads(stdout)


def seg_description(seg: SegInfo) -> str:
    return str(pydicom.dcmread(seg.path, stop_before_pixels=True).SeriesDescription)


def segment_labels(seg: SegInfo) -> list[str]:
    """The SegmentLabels of the SEG file in its order; a LABELMAP SEG starts with segment 0, Background (highdicom
    writes it: the pixel value 0 needs a description there)."""
    dataset = pydicom.dcmread(seg.path, stop_before_pixels=True)
    return [str(item.SegmentLabel) for item in dataset.SegmentSequence]


def end_chromium(pid_file: Path) -> None:
    """Kill Chromium's process group (puppeteer starts it as a group leader) if it outlived the script."""
    if not pid_file.is_file():
        return
    pid = int(pid_file.read_text())
    try:
        if "chrom" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            os.killpg(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


# --- what the screenshots show -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """Viewport screenshots of one session and the patient point (LPS mm) each pixel shows."""

    shots: dict[str, np.ndarray]  # name -> (rows, columns, 3) RGB levels 0-255, as float
    points_lps: np.ndarray  # (rows, columns, 3)

    def changed(self, shot: str, reference: str = "no_segment") -> np.ndarray:
        """The pixels where ``shot`` differs from ``reference``: the overlay's pixels."""
        return np.abs(self.shots[shot] - self.shots[reference]).max(axis=-1) > OVERLAY_LEVELS


def view_of(result: dict[str, Any]) -> View:
    geometry = result["geometry"]
    assert geometry["device_pixel_ratio"] == 1
    shots = {name: sitk.GetArrayFromImage(sitk.ReadImage(shot["file"])).astype(float)[..., :3]
             for name, shot in result["shots"].items() if isinstance(shot, dict)}
    rows, columns = shots["no_segment"].shape[:2]
    pane_x, pane_y = result["shots"]["no_segment"]["rect_css_px"][:2]
    canvas_x, canvas_y = geometry["canvas_rect_css_px"][:2]
    origin = np.array(geometry["world_at_canvas_origin"])
    along_x = np.array(geometry["world_per_canvas_x"]) - origin
    along_y = np.array(geometry["world_per_canvas_y"]) - origin
    x = pane_x + np.arange(columns) + 0.5 - canvas_x  # pixel centres in canvas coordinates
    y = pane_y + np.arange(rows) + 0.5 - canvas_y
    points = origin + x[None, :, None] * along_x + y[:, None, None] * along_y
    return View(shots, points)


def sample(volume: CTVolume, values_zyx: np.ndarray, points_lps: np.ndarray,
           shift_lps_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
           mirror_axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-voxel ``values_zyx`` at ``points_lps`` (optionally shifted, or with the array mirrored along an axis)
    and the mask of points inside the volume."""
    values = values_zyx if mirror_axis is None else np.flip(values_zyx, axis=mirror_axis)
    flat = points_lps.reshape(-1, 3) - np.asarray(shift_lps_mm)
    index = np.rint(volume.lps_to_zyx_index(flat)).astype(int)
    inside = np.all((index >= 0) & (index < np.array(values.shape)), axis=1)
    sampled = np.zeros(len(flat), dtype=values.dtype)
    sampled[inside] = values[tuple(index[inside].T)]
    shape = points_lps.shape[:2]
    return sampled.reshape(shape), inside.reshape(shape)


def grey_agreement(view: View, volume: CTVolume, voi: tuple[float, float], **variation: Any) -> float:
    """Correlation of the screenshot without segments with our HU at the points its pixels show (windowed as the
    viewer windows them): near 1 when the pixel -> patient mapping is right."""
    hu, inside = sample(volume, volume.voxels, view.points_lps, **variation)
    grey = view.shots["no_segment"].mean(axis=-1)
    return float(np.corrcoef(np.clip(hu[inside], *voi), grey[inside])[0, 1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2.0 * np.count_nonzero(a & b) / total if total else 1.0


def voi_of(result: dict[str, Any]) -> tuple[float, float]:
    lower, upper = result["geometry"]["voi_range"]
    return float(lower), float(upper)


def middle_slice(volume: CTVolume) -> tuple[str, np.ndarray]:
    """SOP Instance UID and ImagePositionPatient of the source slice in the middle of the volume."""
    header = source_headers(volume)[volume.shape_zyx[0] // 2]
    return str(header.SOPInstanceUID), np.array(header.ImagePositionPatient, dtype=float)


def rgb(css_colour: str) -> tuple[int, ...]:
    """``"rgb(50, 170, 60)"`` -> (50, 170, 60)."""
    return tuple(int(part) for part in css_colour[css_colour.index("(") + 1:-1].split(",")[:3])


@dataclass(frozen=True)
class Session:
    """One viewer session on one SEG: what show_seg.mjs reported and the screenshots, mapped to the patient."""

    study: Study
    seg: SegInfo
    result: dict[str, Any]
    view: View
    out_dir: Path
    archive_errors: list[str]  # requests the proxy saw fail, with Orthanc's status


def open_in_ohif(pacs: Orthanc, viewer: ViewerHTTPServer, study: Study, seg: SegInfo, out_dir: Path) -> Session:
    """Store the study, show ``seg`` on its middle CT slice, and write the load times and memory to
    ``display.json`` beside the screenshots (printed too)."""
    send(pacs, study)
    sop_instance_uid, position = middle_slice(study.volume)
    result = show_seg(pacs, viewer, study, seg, out_dir, sop_instance_uid)
    np.testing.assert_allclose(result["geometry"]["image_position_patient"], position, atol=1e-3,
                               err_msg="the viewport must show the slice asked for")
    timings, memory = result["timings_s"], result["memory"]
    archive_errors = list(viewer.proxy_failures)
    viewer.proxy_failures.clear()
    document = {
        "seg": {"encoding": seg.encoding.value, "series_description": result["seg_description"],
                "bytes": seg.bytes, "frames": seg.frames, "segments": len(seg.segments)},
        "timings_s": timings,
        "memory": memory,
        "chromium": result["chromium"],
        "archive_errors": archive_errors,
        "screenshots": {name: shot["file"] if isinstance(shot, dict) else shot
                        for name, shot in result["shots"].items()},
    }
    (out_dir / "display.json").write_text(json.dumps(document, indent=1))
    print(f"\nOHIF 3.13.2, {seg.encoding.value} SEG ({seg.bytes / 2**20:.1f} MiB, {seg.frames} frames): CT shown "
          f"{timings['navigation_to_ct_displayed']:.1f} s after navigation, segments listed "
          f"{timings['seg_double_click_to_segments_listed']:.1f} s after the double-click "
          f"({timings['navigation_to_segments_listed']:.1f} s in all); JS heap "
          f"{memory['ct_displayed']['js_heap_used_mib']:.0f} -> {memory['seg_displayed']['js_heap_used_mib']:.0f} "
          f"MiB, Chromium PSS {memory['ct_displayed']['pss_mib']:.0f} -> {memory['seg_displayed']['pss_mib']:.0f} "
          f"MiB; {out_dir / 'display.json'}")
    return Session(study, seg, result, view_of(result), out_dir, archive_errors)


@pytest.fixture(scope="module", params=ENCODINGS, ids=[encoding.value for encoding in ENCODINGS])
def abdomen_session(request: pytest.FixtureRequest, abdomen: Study, pacs: Orthanc, viewer: ViewerHTTPServer,
                    tmp_path_factory: pytest.TempPathFactory) -> Session:
    """The abdominal CT with one of our SEG encodings loaded in OHIF (one Chromium per encoding)."""
    seg = next(info for info in abdomen.segs.values() if info.encoding == request.param)
    session = open_in_ohif(pacs, viewer, abdomen, seg, tmp_path_factory.mktemp(f"ohif-{request.param.value}"))
    if UPDATE_FIGURES and request.param is SegEncoding.BINARY:
        FIGURE.parent.mkdir(exist_ok=True)
        shutil.copyfile(session.result["shots"]["viewer"], FIGURE)
    return session


@pytest.fixture(scope="module")
def tilted_session(tilted_head: Study, pacs: Orthanc, viewer: ViewerHTTPServer,
                   tmp_path_factory: pytest.TempPathFactory) -> Session:
    (seg,) = tilted_head.segs.values()
    return open_in_ohif(pacs, viewer, tilted_head, seg, tmp_path_factory.mktemp("ohif-tilt"))


# --- the tests ----------------------------------------------------------------------------------------------------


def test_the_segmentation_panel_lists_our_segment_names_in_our_order(abdomen_session: Session) -> None:
    result, seg = abdomen_session.result, abdomen_session.seg
    assert result["selected_segmentation"] == seg_description(seg)
    listed = [row["title"] for row in result["segments"]]
    assert listed == segment_labels(seg), "the panel must list the SEG's segments, in order"
    assert [name for name in listed if name != BACKGROUND] == [name for _, _, name in seg.segments]


def test_the_seg_loads_without_errors(abdomen_session: Session, request: pytest.FixtureRequest) -> None:
    """No error in the browser console, no failed request to the archive."""
    if abdomen_session.seg.encoding is SegEncoding.BINARY_J2K:
        request.applymarker(pytest.mark.xfail(strict=True, reason=J2K_TRANSCODING))
    assert not abdomen_session.archive_errors, abdomen_session.archive_errors
    assert not abdomen_session.result["console_errors"], abdomen_session.result["console_errors"]


def test_the_screenshot_pixels_show_our_ct_where_cornerstone_places_them(abdomen_session: Session) -> None:
    """The pixel -> patient mapping the overlay checks rely on, checked against the CT itself; and the display
    convention: the patient's right on the screen's left."""
    result, view, volume = abdomen_session.result, abdomen_session.view, abdomen_session.study.volume
    voi = voi_of(result)
    # The abdominal series is axis-aligned (identity orientation): array axis 2 runs right to left, axis 1 front to
    # back, so mirroring an axis mirrors the patient.
    agreement = {"as stored": grey_agreement(view, volume, voi),
                 "left-right mirrored": grey_agreement(view, volume, voi, mirror_axis=2),
                 "front-back mirrored": grey_agreement(view, volume, voi, mirror_axis=1)}
    assert agreement["as stored"] > 0.95, agreement
    assert max(agreement["left-right mirrored"], agreement["front-back mirrored"]) < agreement["as stored"] - 0.1
    markers = {marker["text"]: marker for marker in result["orientation_markers"]}
    pane_x, _, pane_width, _ = result["shots"]["no_segment"]["rect_css_px"]
    assert markers["R"]["x"] < pane_x + pane_width / 2, "the patient's right is on the screen's left"
    assert result["geometry_unchanged"], "hiding and showing segments must not move the view"


def test_the_overlay_lies_where_our_label_map_is_not_mirrored(abdomen_session: Session) -> None:
    study, seg, view = abdomen_session.study, abdomen_session.seg, abdomen_session.view
    overlay = view.changed("all_segments")
    solo = view.changed("solo_segment")
    solo_value = next(value for _, value, name in seg.segments if name == SOLO_SEGMENT)
    agreement = {}
    for name, mirror in (("as stored", None), ("left-right mirrored", 2), ("front-back mirrored", 1)):
        labels, _ = sample(study.volume, study.labels, view.points_lps, mirror_axis=mirror)
        agreement[name] = {"all segments": round(dice(overlay, labels > 0), 4),
                           SOLO_SEGMENT: round(dice(solo, labels == solo_value), 4)}
    assert np.count_nonzero(overlay) > 10_000, "the SEG changes almost nothing on screen"
    assert agreement["as stored"]["all segments"] >= 0.95, agreement
    assert agreement["left-right mirrored"]["all segments"] <= 0.8, agreement
    assert agreement["front-back mirrored"]["all segments"] <= 0.8, agreement
    assert agreement["as stored"][SOLO_SEGMENT] >= 0.95, agreement
    assert agreement["left-right mirrored"][SOLO_SEGMENT] <= 0.05, f"the spleen is on the patient's left: {agreement}"


def test_each_segment_is_drawn_in_its_own_colour(abdomen_session: Session, table: dict[int, Label],
                                                 request: pytest.FixtureRequest) -> None:
    """The panel's colour of every segment is ours (the SEG's RecommendedDisplayCIELabValue), and the spleen shown
    alone is filled with the spleen's colour: the fill moves the CT's grey towards that colour."""
    if abdomen_session.seg.encoding.segmentation_type is hd.seg.SegmentationTypeValues.LABELMAP:
        request.applymarker(pytest.mark.xfail(strict=True, reason=LABELMAP_COLOUR_DEFECT))
    seg, view, result = abdomen_session.seg, abdomen_session.view, abdomen_session.result
    ours = {name: table[value].color_rgb for _, value, name in seg.segments}
    shown = {row["title"]: rgb(row["colour"]) for row in result["segments"] if row["title"] != BACKGROUND}
    wrong = {name: {"shown": shown[name], "ours": colour} for name, colour in ours.items()
             if np.abs(np.subtract(shown[name], colour)).max() > 2}
    solo = view.changed("solo_segment")
    fill = (view.shots["solo_segment"] - view.shots["no_segment"])[solo].mean(axis=0)
    towards = np.array(ours[SOLO_SEGMENT]) - view.shots["no_segment"][solo].mean(axis=0)
    cosine = float(fill @ towards / np.linalg.norm(fill) / np.linalg.norm(towards))
    assert not wrong, f"{len(wrong)} segments shown in another colour than ours: {wrong}"
    assert cosine >= 0.98, f"the {SOLO_SEGMENT} is filled with another colour (cosine {cosine:.3f} to ours)"


def test_a_seg_of_a_gantry_tilted_series_is_overlaid_in_the_tilted_planes(tilted_session: Session) -> None:
    """The skull SEG of the 18.5 degree tilted head CT: the viewport shows a tilted source slice, and the overlay
    covers our skull label map there, far better than shifted 2 mm front or back within that slice."""
    study, seg, view, result = (tilted_session.study, tilted_session.seg, tilted_session.view,
                                tilted_session.result)
    geometry = result["geometry"]
    assert [row["title"] for row in result["segments"]] == segment_labels(seg) == ["skull"]
    assert not tilted_session.archive_errors and not result["console_errors"], (
        tilted_session.archive_errors, result["console_errors"])
    source = pydicom.dcmread(study.volume.dicom.files[0], stop_before_pixels=True)
    np.testing.assert_allclose(geometry["image_orientation_patient"],
                               np.array(source.ImageOrientationPatient, dtype=float), atol=1e-4)
    assert grey_agreement(view, study.volume, voi_of(result)) > 0.9

    column_direction = np.array(geometry["image_orientation_patient"][3:])  # front-back, within the tilted plane
    overlay = view.changed("all_segments")
    agreement = {}
    for name, shift_mm in (("as stored", 0.0), ("2 mm forward", -2.0), ("2 mm back", 2.0)):
        labels, _ = sample(study.volume, study.labels, view.points_lps, shift_lps_mm=tuple(shift_mm * column_direction))
        agreement[name] = round(dice(overlay, labels > 0), 4)
    assert np.count_nonzero(overlay) > 2_000, "the SEG changes almost nothing on screen"
    assert agreement["as stored"] >= 0.9, agreement
    assert max(agreement["2 mm forward"], agreement["2 mm back"]) < agreement["as stored"] - 0.1, agreement
