"""`ctfm index`: scan retrieval over real CT with the shipped ctfm-mini encoder; exact, HNSW and IVF search;
resumable archive builds with the local and the Ray engine; the on-disk index and its refusals."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import numpy as np
import pytest
from conftest import SHARED, WEIGHTS, require_module, run_cli

from ctfm_engine.errors import InputError, ModelError
from ctfm_engine.tasks.archive_builder import index_scans, read_manifest
from ctfm_engine.tasks.scan_index import KINDS, EmbeddingProvenance, IndexEntry, ScanIndex, SearchParameters

MINI = WEIGHTS / "ctfm-mini"
HEART = SHARED / "ct-nifti" / "s0335.nii.gz"
HEAD = SHARED / "dicom" / "slicer_head_64x64"
PELVIS = SHARED / "ct-nifti" / "TotalSegmentator_0009_0000.nii.gz"
MR = SHARED / "negative-controls" / "example_mr_sm.nii.gz"
# Three small real CTs (NIfTI and a DICOM series) and an MR that must be skipped, in that order.
MANIFEST_ROWS = [("heart", HEART), ("mr", MR), ("head", HEAD), ("pelvis", PELVIS)]
CT_IDS = ["heart", "head", "pelvis"]


def faiss_or_skip() -> None:
    require_module("faiss", "FAISS is not installed (pip install 'ctfm-engine[faiss]')")


def write_manifest(path, rows=MANIFEST_ROWS):
    path.write_text("id,path\n" + "".join(f"{entry_id},{scan}\n" for entry_id, scan in rows))
    return path


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """An index built once through the CLI from the manifest, batches of 2: (folder, CLI result, log lines)."""
    folder = tmp_path_factory.mktemp("built")
    manifest = write_manifest(folder / "manifest.csv")
    logs = LogLines()
    logging.getLogger().addHandler(logs)
    try:
        result = run_cli("index", "build", folder / "index", "--manifest", manifest, "--weights", MINI,
                         "--batch-size", 2, "--json")
    finally:
        logging.getLogger().removeHandler(logs)
    assert result.code == 0, result.stderr
    return folder / "index", result, "\n".join(logs.lines)


@pytest.fixture
def index_copy(built, tmp_path):
    return shutil.copytree(built[0], tmp_path / "index")


def test_build_indexes_every_ct_and_skips_the_mr_by_name_not_path(built):
    folder, result, logs = built
    document = result.document
    assert document["command"] == "index build" and document["weights"]["name"] == "ctfm-mini"
    assert document["weights"]["demonstration"] is True  # the bundled ctfm-mini
    assert (document["added"], document["already_indexed"], document["entries"]) == (3, 0, 3)
    [skipped] = document["skipped"]
    assert skipped["id"] == "mr" and skipped["line"] == 3 and "Hounsfield" in skipped["reason"]
    # logs name a row by manifest line and id, never by its path (which can name a patient)
    assert "skipped line 3 (mr): does not look like a CT" in logs and "line 4 (head): CT stored as HU+1024" in logs
    assert not any(str(scan) in logs for _, scan in MANIFEST_ROWS)
    with ScanIndex.open(folder) as index:
        assert index.ids == CT_IDS and index.dimension == 128
        assert index.entry("head").series_instance_uid  # the DICOM series records its SeriesInstanceUID
        assert index.entry("pelvis").source == str(PELVIS)
        # the index keeps name and sha256; whether they are a demonstration model follows from the sha256
        assert index.provenance.weights == {key: document["weights"][key] for key in ("name", "sha256")}
        assert index.provenance.level == "scan"


def test_a_scan_queried_against_the_index_finds_itself_first(built):
    # No --weights: the index remembers the folder of the weights that built it.
    result = run_cli("index", "query", built[0], "--scan", PELVIS, "--top-k", 3, "--json")
    assert result.code == 0, result.stderr
    document = result.document
    assert document["weights"] == built[1].document["weights"]
    matches = document["matches"]
    assert [match["id"] for match in matches][0] == "pelvis" and len(matches) == 3
    assert matches[0]["similarity"] == pytest.approx(1.0, abs=1e-5) and matches[0]["source"] == str(PELVIS)
    similarities = [match["similarity"] for match in matches]
    assert similarities == sorted(similarities, reverse=True)


def test_the_same_scan_in_another_orientation_and_spacing_finds_its_original(built, tmp_path):
    """The pelvis flipped, axis-permuted and resampled to 2 mm (another direction, spacing and size) is still the
    pelvis: CT-FM's preprocessing puts every scan on one SPL 3x1x1 mm grid first."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(PELVIS))
    moved = sitk.PermuteAxes(sitk.Flip(image, [True, False, False]), [1, 0, 2])
    size = [int(round(n * s / 2.0)) for n, s in zip(moved.GetSize(), moved.GetSpacing(), strict=True)]
    moved = sitk.Resample(moved, size, sitk.Transform(), sitk.sitkLinear, moved.GetOrigin(), (2.0, 2.0, 2.0),
                          moved.GetDirection(), -1024.0, sitk.sitkInt16)
    copy = tmp_path / "pelvis_moved.nrrd"
    sitk.WriteImage(moved, str(copy))
    result = run_cli("index", "query", built[0], "--scan", copy, "--top-k", 3, "--json")
    assert result.code == 0, result.stderr
    matches = result.document["matches"]
    assert matches[0]["id"] == "pelvis", matches
    assert matches[0]["similarity"] > 0.99 and matches[0]["similarity"] - matches[1]["similarity"] > 0.01


def test_query_by_id_leaves_the_entry_out_and_by_embedding_file_finds_its_scan(built, tmp_path):
    by_id = run_cli("index", "query", built[0], "--id", "head", "--json")
    assert by_id.code == 0, by_id.stderr
    assert {match["id"] for match in by_id.document["matches"]} == set(CT_IDS) - {"head"}
    assert by_id.document["weights"] == built[1].document["weights"]  # the index's, with the demonstration flag
    embedded = tmp_path / "heart.npz"
    assert run_cli("embed", HEART, "--weights", MINI, "--out", embedded, "-q").code == 0
    by_file = run_cli("index", "query", built[0], "--embedding", embedded, "--json")
    assert by_file.code == 0, by_file.stderr
    assert by_file.document["matches"][0]["id"] == "heart"


def test_a_bad_query_scan_is_refused_before_any_weights_load(built, tmp_path):
    result = run_cli("index", "query", built[0], "--scan", MR, "--weights", tmp_path / "no-such-weights", "--json")
    assert result.code == 3 and "Hounsfield" in result.document["error"]["message"]
    missing = run_cli("index", "query", tmp_path / "nowhere", "--id", "heart")
    assert missing.code == 3 and "no such index" in missing.stderr


def test_removed_entry_is_no_longer_found_and_tombstones_are_compacted(index_copy):
    result = run_cli("index", "remove", index_copy, "pelvis", "--json")
    assert result.code == 0, result.stderr
    assert result.document["entries"] == 2
    query = run_cli("index", "query", index_copy, "--scan", PELVIS, "--json")
    assert query.code == 0, query.stderr
    assert "pelvis" not in {match["id"] for match in query.document["matches"]}
    info = run_cli("index", "info", index_copy, "--json").document
    # 1 tombstone of 3 rows is above 20 %: the rows were rewritten without it
    assert (info["entries"], info["rows"], info["tombstones"]) == (2, 2, 0)
    unknown = run_cli("index", "remove", index_copy, "heart", "no-such-id")
    assert unknown.code == 3 and "no-such-id" in unknown.stderr
    with ScanIndex.open(index_copy) as index:
        assert index.ids == ["heart", "head"]  # all or nothing: heart is still there


def test_reopened_index_gives_identical_results_for_every_kind(index_copy):
    faiss_or_skip()
    with ScanIndex.open(index_copy, writable=True) as index:
        vectors = {entry_id: index.vector(entry_id) for entry_id in index.ids}
        before = {kind: [index.query(vector, 3, kind=kind) for vector in vectors.values()] for kind in KINDS}
        assert index.save_structure("hnsw") and index.save_structure("ivf")
    info = run_cli("index", "info", index_copy, "--json").document
    assert set(info["structures"]) == {"hnsw", "ivf"}
    assert all((index_copy / record["file"]).is_file() for record in info["structures"].values())
    with ScanIndex.open(index_copy) as index:
        after = {kind: [index.query(vector, 3, kind=kind) for vector in vectors.values()] for kind in KINDS}
    assert after == before
    assert [matches[0].id for matches in after["exact"]] == CT_IDS


def test_exact_hnsw_and_ivf_agree_on_the_top_match_of_real_embeddings(tmp_path):
    faiss_or_skip()
    import torch

    from ctfm_engine.models.registry import load_encoder
    from ctfm_engine.preprocess import preprocess
    from ctfm_engine.readers import read_volume
    from ctfm_engine.tasks.embed import Embedder, PatchWindows

    torch.set_num_threads(2)
    encoder, checkpoint = load_encoder(MINI)
    embedder = Embedder(encoder)
    model_input = preprocess(read_volume(HEART), embedder.preprocessing)
    vectors, _ = embedder.patch_vectors(model_input, PatchWindows((16, 32, 32), 0.0), batch_size=32)
    assert len(vectors) == 75  # 3 x 5 x 5 windows over 44 x 134 x 134 model voxels
    provenance = EmbeddingProvenance(checkpoint.identity, level="patch")
    # Default search settings, but 4 IVF lists (the default for 75 vectors is 1) so that vectors really are
    # spread over inverted lists; the default nprobe (16) then visits them all.
    search = SearchParameters(ivf_nlist=4)
    with ScanIndex.create(tmp_path / "patches", dimension=128, provenance=provenance, search=search) as index:
        index.add([IndexEntry(f"patch-{number}", str(HEART)) for number in range(len(vectors))], vectors, provenance)
        for entry_id in index.ids:
            [exact] = index.neighbours(entry_id, 1, kind="exact")
            for kind in ("hnsw", "ivf"):
                [approximate] = index.neighbours(entry_id, 1, kind=kind)
                # the same entry, or one with the same similarity (many patches of air embed alike)
                assert approximate.id == exact.id or approximate.similarity == pytest.approx(exact.similarity,
                                                                                             abs=1e-6)


def test_ties_go_to_the_entry_added_first_for_every_kind(built, tmp_path):
    faiss_or_skip()
    with ScanIndex.open(built[0]) as source:
        heart, pelvis, provenance = source.vector("heart"), source.vector("pelvis"), source.provenance
    entries = [IndexEntry(entry_id, "real CT") for entry_id in ("a", "other", "b", "c")]
    with ScanIndex.create(tmp_path / "ties", dimension=128, provenance=provenance) as index:
        index.add(entries[:2], np.stack([heart, pelvis]), provenance)
        index.add(entries[2:], np.stack([heart, heart]), provenance)  # two more of the same embedding, later
        for kind in KINDS:
            assert [match.id for match in index.query(heart, 3, kind=kind)] == ["a", "b", "c"]


def test_vectors_from_other_weights_or_of_another_size_are_refused(index_copy, narrow_weights):
    # narrow_weights: the same architecture and dimension (128) as ctfm-mini, other (random) weights
    result = run_cli("index", "add", index_copy, HEART, "--weights", narrow_weights, "--json")
    assert result.code == 4, result.stderr
    message = result.document["error"]["message"]
    assert "ctfm-mini" in message and "ctfm-narrow-test" in message and str(index_copy) in message
    query = run_cli("index", "query", index_copy, "--scan", HEART, "--weights", narrow_weights)
    assert query.code == 4
    with ScanIndex.open(index_copy, writable=True) as index:
        assert len(index) == 3  # nothing was added
        other = EmbeddingProvenance({"name": "other", "sha256": "0" * 64})
        with pytest.raises(ModelError, match="not of other"):
            index.add([IndexEntry("x", "x")], np.ones(128, np.float32), other)
        with pytest.raises(ModelError, match="128-d"):
            index.add([IndexEntry("x", "x")], np.ones(64, np.float32), index.provenance)
        with pytest.raises(ModelError, match="128-d"):
            index.query(np.ones(512, np.float32))


def test_an_interrupted_build_resumes_and_ends_equal_to_an_uninterrupted_one(built, tmp_path):
    rows = read_manifest(write_manifest(tmp_path / "manifest.csv"))
    folder = tmp_path / "index"

    def stop_after_first_batch(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        index_scans(folder, rows, weights=MINI, batch_size=2, progress=stop_after_first_batch)
    with ScanIndex.open(folder) as index:
        assert index.ids == ["heart"]  # first batch: heart and the skipped MR, committed before the interrupt
    progress: list[tuple[int, int]] = []
    report = index_scans(folder, rows, weights=MINI, batch_size=2, progress=lambda *step: progress.append(step))
    assert (report.already_indexed, report.added, [item.row.id for item in report.skipped]) == (1, 2, ["mr"])
    assert progress == [(2, 3), (3, 3)]  # only the three rows left were embedded
    with ScanIndex.open(folder) as resumed, ScanIndex.open(built[0]) as uninterrupted:
        assert resumed.ids == uninterrupted.ids
        np.testing.assert_allclose(resumed.unit_vectors(), uninterrupted.unit_vectors(), atol=1e-6)
        assert [resumed.entry(i) for i in resumed.ids] == [uninterrupted.entry(i) for i in uninterrupted.ids]
    # a run over a finished archive tries the skipped MR again, skips it again, and succeeds
    again = index_scans(folder, rows, weights=MINI, batch_size=2)
    assert (again.already_indexed, again.added, [item.row.id for item in again.skipped]) == (3, 0, ["mr"])


def test_a_failed_commit_leaves_the_previous_index_readable(index_copy, monkeypatch):
    from ctfm_engine.tasks import scan_index

    def disk_full(path, document):
        raise OSError(28, "No space left on device")

    def data_files() -> set[str]:
        return {path.name for path in index_copy.iterdir()} - {"index.json", ".lock"}

    header_before = (index_copy / "index.json").read_text()
    named = {f"{segment['name']}.{suffix}" for segment in json.loads(header_before)["segments"]
             for suffix in ("npy", "jsonl")}
    assert data_files() == named
    with ScanIndex.open(index_copy, writable=True) as index:
        vector, provenance = index.vector("heart"), index.provenance
        monkeypatch.setattr(scan_index, "_write_json", disk_full)  # the segment is written, the header is not
        with pytest.raises(OSError):
            index.add([IndexEntry("late", "late")], vector, provenance)
    monkeypatch.undo()
    assert (index_copy / "index.json").read_text() == header_before
    assert len(data_files() - named) == 2  # the vectors and entries of the failed write
    with ScanIndex.open(index_copy) as index:
        assert index.ids == CT_IDS
    ScanIndex.open(index_copy, writable=True).close()  # the next writer deletes what no header names
    assert data_files() == named


def test_manifest_problems_are_named_and_an_all_bad_archive_leaves_nothing(tmp_path):
    no_path = tmp_path / "no_path.csv"
    no_path.write_text("file,id\nscan.nii.gz,a\n")
    result = run_cli("index", "build", tmp_path / "index", "--manifest", no_path)
    assert result.code == 3 and "'path' column" in result.stderr
    twice = write_manifest(tmp_path / "twice.csv", [("a", HEART), ("a", HEAD)])
    result = run_cli("index", "build", tmp_path / "index", "--manifest", twice)
    assert result.code == 3 and "line 3 repeats the id 'a' of line 2" in result.stderr
    only_mr = tmp_path / "only_mr.txt"
    only_mr.write_text(f"# one MR, no CT\n{MR}\n{tmp_path / 'missing.nii.gz'}\n")
    # every scan is bad: exit 3 on the data, though no weights are found, and no index folder is left behind
    result = run_cli("index", "build", tmp_path / "index", "--manifest", only_mr, "--json")
    assert result.code == 3 and "none of the 2 scans" in result.document["error"]["message"]
    assert not (tmp_path / "index").exists()
    with pytest.raises(InputError, match="lists no scans"):
        read_manifest(write_manifest(tmp_path / "empty.csv", []))


def test_ray_engine_builds_the_same_index_as_the_local_engine(built, tmp_path):
    require_module("ray", "Ray is not installed (pip install 'ctfm-engine[ray]')")
    manifest = write_manifest(tmp_path / "manifest.csv", [("heart", HEART), ("mr", MR), ("head", HEAD)])
    result = run_cli("index", "build", tmp_path / "index", "--manifest", manifest, "--weights", MINI, "--engine",
                     "ray", "--workers", 1, "--cpus-per-worker", 1, "--batch-size", 2, "--json")
    assert result.code == 0, result.stderr
    document = result.document
    assert document["engine"] == "ray" and document["weights"] == built[1].document["weights"]
    assert (document["added"], [item["id"] for item in document["skipped"]]) == (2, ["mr"])
    with ScanIndex.open(tmp_path / "index") as ray_index, ScanIndex.open(built[0]) as local_index:
        assert ray_index.ids == ["heart", "head"]
        for entry_id in ray_index.ids:
            np.testing.assert_allclose(ray_index.vector(entry_id), local_index.vector(entry_id), atol=1e-5)
            assert ray_index.entry(entry_id) == local_index.entry(entry_id)


def test_missing_optional_packages_are_usage_errors_that_say_what_to_install(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "manifest.csv", [("heart", HEART)])
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where the extra is not installed
    result = run_cli("index", "build", tmp_path / "index", "--manifest", manifest, "--engine", "ray")
    assert result.code == 2 and "pip install 'ctfm-engine[ray]'" in result.stderr
    monkeypatch.setitem(sys.modules, "faiss", None)
    result = run_cli("index", "build", tmp_path / "index", "--manifest", manifest, "--kind", "hnsw")
    assert result.code == 2 and "pip install 'ctfm-engine[faiss]'" in result.stderr
    assert not (tmp_path / "index").exists()
