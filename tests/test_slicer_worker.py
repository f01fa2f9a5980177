"""The CTFM module's worker process (SlicerCTFM/CTFMLib/worker.py): it calls only the engine's task layer, words the
engine's remedies in the module's own terms, leaves the default model to the engine's weights policy, and keys each
scan it keeps for search once."""

from __future__ import annotations

import io
import queue
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
from conftest import SAMPLE_CT, SHARED, SHIPPED_ENCODER
from CTFMLib import jobs, protocol, worker
from test_ct_check import liver_interior_crop

from ctfm_engine.readers import read_volume
from ctfm_engine.volume import CTVolume

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SlicerCTFM"

SLICER_HEAD = SHARED / "dicom" / "slicer_head_64x64"  # 93 slices of 1.5 mm: 140 mm along S
# (that the module's files import only the task layer is checked for every face in test_faces.py)


def test_client_and_worker_are_separate_files_speaking_one_protocol():
    client = (MODULE / "CTFMLib" / "jobs.py").read_text()
    assert "def worker_main" not in client and "ctfm_engine.pipelines" not in client
    assert jobs.WORKER_SCRIPT == (MODULE / "CTFMLib" / "worker.py").resolve()
    assert jobs.grid_from_event is protocol.grid_from_event  # part of how a search result is read
    event = protocol.read_event(protocol.event_line(protocol.PROGRESS, done=1, total=4, stage="segmenting"))
    assert event == {"event": "progress", "done": 1, "total": 4, "stage": "segmenting"}
    assert protocol.read_event("a library printed this") == {"event": "log", "level": "STDOUT",
                                                             "message": "a library printed this"}


def _partial_head() -> CTVolume:
    """The upper 90 mm of a real head CT: a head, but less than a whole one along S."""
    head = read_volume(SLICER_HEAD)
    start = head.shape_zyx[0] - 60
    origin = head.zyx_index_to_lps(np.array([float(start), 0.0, 0.0]))
    return CTVolume(np.ascontiguousarray(head.voxels[start:]), head.spacing_xyz_mm, tuple(origin), head.direction,
                    "partial head")


def test_the_partial_head_refusal_tells_which_checkbox_of_the_panel_judges_it_anyway(tmp_path):
    tree = ElementTree.parse(MODULE / "Resources" / "UI" / "CTFM.ui")
    checkbox = next(widget for widget in tree.iter("widget") if widget.get("name") == "acceptPartialCheckBox")
    label = checkbox.findtext("property[@name='text']/string")
    assert f'tick "{label}"' in worker.REMEDIES["accept_partial"]

    refused = jobs.start_triage(_partial_head(), None, "cpu", work_dir=tmp_path)
    ticked = jobs.start_triage(_partial_head(), None, "cpu", accept_partial=True, work_dir=tmp_path)
    for job in (refused, ticked):
        assert job.wait(120) == "failed"
    assert refused.error.exit_code == 3 and refused.error.kind == "InputError"
    assert refused.error.message.startswith("partial head: covers only 90 mm along S")
    assert refused.error.message.endswith(f'; tick "{label}" in the Triage section to judge it anyway')
    assert "--accept-partial" not in refused.error.message
    # ticked, the scan passes the input check; no triage model ships, and the engine's policy says so (exit 4)
    assert ticked.error.exit_code == 4 and "no head-CT triage model" in ticked.error.message
    assert not any(tmp_path.iterdir())


def test_a_job_without_weights_gets_the_policys_demonstration_model_and_its_warning(tmp_path):
    job = jobs.start_search_features(read_volume(SAMPLE_CT), None, "cpu", cache_dir=tmp_path / "features",
                                     work_dir=tmp_path / "work")
    assert job.wait(180) == "done", job.error
    assert job.result["weights"]["name"] == "ctfm-mini" and job.result["weights"]["demonstration"] is True
    assert "WARNING: demonstration model ctfm-mini, not CT-FM, not for clinical use" in job.log


def test_the_search_worker_keys_each_scan_once_not_on_every_click(tmp_path, monkeypatch):
    """The worker hashes a scan when it is loaded and passes that key on every click (a 512x512x300 scan costs
    ~0.2 s to hash); its answers carry the encoder's weights record."""
    import ctfm_engine.tasks.search as search_module
    from ctfm_engine.pipelines import open_searcher

    hashed = []
    original = search_module.volume_key
    monkeypatch.setattr(search_module, "volume_key", lambda *args: hashed.append(1) or original(*args))
    stream = io.StringIO()
    service = worker.SearchService(tmp_path, open_searcher(SHIPPED_ENCODER, disk_cache=False),
                                   worker.EventWriter(stream))
    source = read_volume(SAMPLE_CT)
    for number, key in enumerate(("abdomen", "abdomen again"), start=1):
        protocol.write_volume(source, tmp_path, f"volume-{number}")
        service.load({"op": protocol.LOAD, "request": number, "key": key, "stem": f"volume-{number}"})
    assert len(hashed) == 2
    point = source.zyx_index_to_lps((np.array(source.shape_zyx) - 1) / 2.0)
    requests = queue.Queue()
    for number in (3, 4, 5):
        requests.put({"op": protocol.SEARCH, "request": number, "source": "abdomen", "point_lps": list(point),
                      "targets": ["abdomen", "abdomen again"], "heatmaps": False})
    requests.put({"op": protocol.SEARCH, "request": 6, "source": "abdomen", "point_lps": [1e4, 1e4, 1e4],
                  "targets": ["abdomen"]})
    requests.put({"op": protocol.CLOSE})
    started = time.perf_counter()
    service.serve(requests)
    assert len(hashed) == 2, "a click hashed a scan"
    events = [protocol.read_event(line) for line in stream.getvalue().splitlines()]
    results = [event for event in events if event["event"] == protocol.RESULT]
    assert [event["request"] for event in results] == [3, 4, 5]
    assert all(target["cached"] for event in results for target in event["targets"])
    assert results[0]["weights"] == service.searcher.weights and results[0]["weights"]["demonstration"] is True
    (error,) = [event for event in events if event["event"] == protocol.ERROR]  # a refusal ends that request only
    assert error["request"] == 6 and error["exit_code"] == 3 and "outside this scan" in error["message"]
    assert not list(tmp_path.glob("volume-*"))  # loaded volumes are not left in the job folder
    print(f"three clicks and a refusal answered in {time.perf_counter() - started:.2f} s")


def test_a_volume_that_does_not_look_like_ct_is_refused_naming_the_inputs_checkbox_that_reads_it(tmp_path):
    """A true CT that fails the check (a crop inside the liver): refused with the module's own remedy; ticked, every
    kind of job reads it -- the one-shot jobs (here: segmentation) and the search worker."""
    from ctfm_engine.pipelines import open_searcher

    tree = ElementTree.parse(MODULE / "Resources" / "UI" / "CTFM.ui")
    checkbox = next(widget for widget in tree.iter("widget") if widget.get("name") == "acceptNotCtCheckBox")
    label = checkbox.findtext("property[@name='text']/string")
    assert label == "Accept images that do not look like CT"
    assert worker.REMEDIES["ct_check"] == worker.REMEDIES["hu_offset"]

    crop = read_volume(liver_interior_crop(tmp_path), check_hu=False)
    work = tmp_path / "work"
    refused = jobs.start_segmentation(crop, tmp_path / "no-such-weights", "cpu", work_dir=work)
    ticked = jobs.start_segmentation(crop, tmp_path / "no-such-weights", "cpu", skip_ct_check=True, work_dir=work)
    for job in (refused, ticked):
        assert job.wait(120) == "failed"
    assert refused.error.exit_code == 3 and "does not look like a CT in Hounsfield units" in refused.error.message
    assert refused.error.message.endswith(f'tick "{label}" in the Inputs section to use it anyway')
    assert "--skip-ct-check" not in refused.error.message
    assert ticked.error.exit_code == 4 and "no-such-weights" in ticked.error.message  # read; then no model
    assert not any(work.iterdir())

    searcher = open_searcher(SHIPPED_ENCODER, disk_cache=False)
    for check_ct, expected in ((True, protocol.ERROR), (False, protocol.LOADED)):
        stream = io.StringIO()
        service = worker.SearchService(tmp_path, searcher, worker.EventWriter(stream), check_ct=check_ct)
        protocol.write_volume(crop, tmp_path, "volume-1")
        service.answer(service.load, {"op": protocol.LOAD, "request": 1, "key": "crop", "stem": "volume-1"})
        (event,) = [protocol.read_event(line) for line in stream.getvalue().splitlines()]
        assert event["event"] == expected, event
