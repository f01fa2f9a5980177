"""The Slicer MRML adapters (SlicerCTFM/CTFMLib/mrml_adapters.py) against real MRML from the PyPI package slicer-core.

Each test builds a fresh ``vtkMRMLScene`` set up the way the Slicer application does it (colour nodes, segmentation
converter rules, slice views with composite nodes) and feeds it real CT from ../shared/data.  The strongest
geometry check reads the same NIfTI with MRML's own storage node and with the engine's reader.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_CT, SAMPLE_LABELS, SHARED, TS_DICOM, require_module

from ctfm_engine.labels import label_table, totalsegmentator_names
from ctfm_engine.readers import read_volume
from ctfm_engine.volume import CTVolume, DicomReferences, Grid

require_module("slicer_core", "the MRML adapter tests need the PyPI package slicer-core (Qt-free MRML)")
slicer = importlib.import_module("slicer")
vtk = importlib.import_module("vtk")
adapters = importlib.import_module("CTFMLib.mrml_adapters")

SMALL_CT = SHARED / "ct-nifti" / "s0335.nii.gz"  # direction diag(-1, -1, 1)
OBLIQUE_CT = SHARED / "ct-nifti" / "TotalSegmentator_0002_0000.nii.gz"  # not axis-aligned
VIEWS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}


def _register_converter_rules() -> None:
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def _bare_scene():
    _register_converter_rules()
    return slicer.vtkMRMLScene()


@pytest.fixture
def scene():
    yield from slicer_scene()


def slicer_scene():
    """A scene as the application prepares it: default colour nodes and three slice views (a fixture body)."""
    scene = _bare_scene()
    colours = slicer.vtkMRMLColorLogic()
    colours.SetMRMLScene(scene)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for layout_name, orientation in VIEWS.items():
        view = scene.CreateNodeByClass("vtkMRMLSliceNode")
        view.SetName(layout_name)
        view.SetLayoutName(layout_name)
        view.SetOrientation(orientation)
        scene.AddNode(view)
        composite = scene.CreateNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(layout_name)
        scene.AddNode(composite)
    yield scene
    colours.SetMRMLScene(None)
    scene.Clear(1)


def _nodes(scene, class_name: str) -> list:
    return [scene.GetNthNodeByClass(index, class_name) for index in range(scene.GetNumberOfNodesByClass(class_name))]


def _read_with_mrml(scene, path: Path):
    """Load a file the way Slicer's Add Data does: a volume archetype storage node (vtkITK reader)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"MRML could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def _node_ijk_to_lps(node, index_zyx: np.ndarray) -> np.ndarray:
    """LPS of (z, y, x) voxel indices through the node's own IJKToRAS and world transform (VTK, not numpy)."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    to_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(node.GetParentTransformNode(), None, to_world)
    points = []
    for k, j, i in np.asarray(index_zyx, dtype=float):
        local = ijk_to_ras.MultiplyPoint((i, j, k, 1.0))[:3]
        r, a, s = to_world.TransformPoint(local)
        points.append((-r, -a, s))
    return np.array(points)


def _sample_indices(shape_zyx: tuple[int, int, int]) -> np.ndarray:
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape_zyx], indexing="ij")).reshape(3, -1).T
    return np.vstack([corners, np.array(shape_zyx) // 2, np.array(shape_zyx) // 3])


def _permuted_and_flipped(path: Path) -> CTVolume:
    """The same CT stored with its axes permuted and one flipped: same patient, other direction matrix."""
    image = sitk.Flip(sitk.PermuteAxes(sitk.ReadImage(str(path)), [2, 0, 1]), [True, False, False])
    return CTVolume.from_sitk(image, source=f"{path.name} permuted")


@pytest.mark.parametrize("path", [SMALL_CT, OBLIQUE_CT], ids=["axis-aligned", "oblique"])
def test_ctvolume_round_trips_through_a_volume_node(scene, path: Path) -> None:
    volume = read_volume(path)
    node = adapters.ctvolume_to_volume_node(volume, scene, "ct")
    back = adapters.volume_node_to_ctvolume(node)
    assert back.voxels.dtype == np.float32
    assert np.array_equal(back.voxels, volume.voxels)
    assert back.grid.matches(volume.grid, tolerance_mm=1e-6)
    assert np.allclose(back.direction, volume.direction, atol=1e-9)
    indices = _sample_indices(volume.shape_zyx)
    assert np.allclose(_node_ijk_to_lps(node, indices), volume.zyx_index_to_lps(indices), atol=1e-6)
    assert back.source == "ct" and back.dicom == DicomReferences()


def test_int16_ct_travels_to_a_worker_at_half_the_size_and_arrives_as_the_same_float32_voxels(scene, tmp_path):
    protocol = importlib.import_module("CTFMLib.protocol")
    volume = read_volume(SMALL_CT)
    node = adapters.ctvolume_to_volume_node(volume, scene, "ct")
    slicer.util.updateVolumeFromArray(node, volume.voxels.astype(np.int16))  # as Slicer loads a DICOM CT
    assert np.array_equal(volume.voxels.astype(np.int16), volume.voxels)  # real HU are whole numbers
    float_copy = adapters.volume_node_to_ctvolume(node)
    small = adapters.volume_node_to_ctvolume(node, keep_small_integers=True)
    assert float_copy.voxels.dtype == np.float32 and small.voxels.dtype == np.int16
    assert small.voxels.nbytes * 2 == float_copy.voxels.nbytes
    protocol.write_volume(small, tmp_path)
    arrived = protocol.read_volume(tmp_path)
    assert arrived.voxels.dtype == np.float32 and np.array_equal(arrived.voxels, float_copy.voxels)
    assert arrived.grid.matches(float_copy.grid, tolerance_mm=1e-9)


def test_oblique_test_volume_is_really_oblique() -> None:
    direction = read_volume(OBLIQUE_CT).direction
    assert np.abs(direction - np.diag(np.diag(direction))).max() > 0.03


def test_permuted_volume_puts_each_voxel_at_the_same_patient_point(scene) -> None:
    original = read_volume(SMALL_CT)
    permuted = _permuted_and_flipped(SMALL_CT)
    assert not np.allclose(np.abs(permuted.direction), np.eye(3))
    node = adapters.ctvolume_to_volume_node(permuted, scene, "permuted")
    ras_to_ijk = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(ras_to_ijk)
    node_voxels = slicer.util.arrayFromVolume(node)
    for index_zyx in _sample_indices(original.shape_zyx):
        r, a, s = adapters.lps_to_ras(original.zyx_index_to_lps(index_zyx))
        i, j, k = np.rint(ras_to_ijk.MultiplyPoint((r, a, s, 1.0))[:3]).astype(int)
        assert node_voxels[k, j, i] == original.voxels[tuple(index_zyx)]
    assert adapters.volume_node_to_ctvolume(node).grid.matches(permuted.grid, tolerance_mm=1e-6)


@pytest.mark.parametrize("path", [SMALL_CT, OBLIQUE_CT], ids=["axis-aligned", "oblique"])
def test_mrml_storage_node_and_engine_reader_agree(scene, path: Path) -> None:
    node = _read_with_mrml(scene, path)
    from_slicer = adapters.volume_node_to_ctvolume(node)
    from_engine = read_volume(path)
    assert np.array_equal(from_slicer.voxels, from_engine.voxels)
    assert from_slicer.grid.matches(from_engine.grid, tolerance_mm=1e-6)
    assert np.allclose(from_slicer.direction, from_engine.direction, atol=1e-9)
    assert np.allclose(from_slicer.spacing_xyz_mm, from_engine.spacing_xyz_mm, atol=1e-9)


def _rotation_about_superior(degrees: float, translation_ras: tuple[float, float, float]) -> np.ndarray:
    angle = np.radians(degrees)
    matrix = np.eye(4)
    matrix[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    matrix[:3, 3] = translation_ras
    return matrix


def _linear_transform(scene, matrix_ras: np.ndarray):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "patient motion")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix_ras))
    return transform


def test_linear_parent_transform_is_hardened_into_the_geometry(scene) -> None:
    node = _read_with_mrml(scene, OBLIQUE_CT)
    untransformed = adapters.volume_node_to_ctvolume(node)
    node.SetAndObserveTransformNodeID(_linear_transform(scene, _rotation_about_superior(30, (12, -7, 25))).GetID())
    moved = adapters.volume_node_to_ctvolume(node)
    indices = _sample_indices(moved.shape_zyx)
    assert np.allclose(moved.zyx_index_to_lps(indices), _node_ijk_to_lps(node, indices), atol=1e-4)
    assert not np.allclose(moved.zyx_index_to_lps(indices), untransformed.zyx_index_to_lps(indices), atol=1.0)
    assert np.array_equal(moved.voxels, untransformed.voxels)


def test_non_linear_parent_transform_is_refused(scene) -> None:
    node = _read_with_mrml(scene, SMALL_CT)
    displacement = vtk.vtkImageData()
    displacement.SetDimensions(4, 4, 4)
    displacement.SetSpacing(50.0, 50.0, 50.0)
    displacement.SetOrigin(-75.0, -75.0, -75.0)
    displacement.AllocateScalars(vtk.VTK_DOUBLE, 3)
    displacement.GetPointData().GetScalars().Fill(2.0)
    warp = slicer.vtkOrientedGridTransform()
    warp.SetDisplacementGridData(displacement)
    transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    transform.SetAndObserveTransformFromParent(warp)
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ValueError, match="non-linear transform 'warp'"):
        adapters.volume_node_to_ctvolume(node)


def test_sheared_or_empty_volume_nodes_are_refused(scene) -> None:
    node = _read_with_mrml(scene, SMALL_CT)
    shear = np.eye(4)
    shear[0, 1] = 0.3
    node.SetAndObserveTransformNodeID(_linear_transform(scene, shear).GetID())
    with pytest.raises(ValueError, match="sheared geometry"):
        adapters.volume_node_to_ctvolume(node)
    with pytest.raises(ValueError, match="has no voxels"):
        adapters.volume_node_to_ctvolume(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))


def test_dicom_instance_uids_of_a_slicer_dicom_volume_are_kept(scene) -> None:
    volume = read_volume(TS_DICOM)
    node = adapters.ctvolume_to_volume_node(volume, scene, "series")
    # What Slicer's DICOM scalar volume plugin records on a volume it loads from the database.
    node.SetAttribute("DICOM.instanceUIDs", " ".join(volume.dicom.sop_instance_uids))
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.GetSceneItemID(), "study")
    hierarchy.SetItemUID(hierarchy.CreateItem(study, node), "DICOM", volume.dicom.series_instance_uid)
    back = adapters.volume_node_to_ctvolume(node)
    assert back.dicom.sop_instance_uids == volume.dicom.sop_instance_uids
    assert back.series_instance_uid == volume.dicom.series_instance_uid
    assert back.grid.matches(volume.grid, tolerance_mm=1e-4)


def test_segmentation_of_a_dicom_volume_references_its_source_instances(scene) -> None:
    volume = read_volume(TS_DICOM)
    node = adapters.ctvolume_to_volume_node(volume, scene, "series")
    uids = " ".join(volume.dicom.sop_instance_uids)
    node.SetAttribute("DICOM.instanceUIDs", uids)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.GetSceneItemID(), "study")
    hierarchy.CreateItem(study, node)
    labels = np.zeros(volume.voxels.shape, dtype=np.uint8)
    labels[5:10, 200:260, 220:280] = 1  # any non-empty label: what is checked is the reference to the source
    table = label_table({1: "vertebrae_L1"})
    segmentation = adapters.labels_to_segmentation_node(labels, node, table, scene)
    item = hierarchy.GetItemByDataNode(segmentation)
    assert hierarchy.GetItemParent(item) == study
    # what Slicer's DICOMSegmentationPlugin.examineForExport reads to find the source images in the database
    referenced = hierarchy.GetItemAttribute(item, "DICOM.ReferencedInstanceUIDs").split()
    assert referenced == list(volume.dicom.sop_instance_uids)
    nifti = adapters.ctvolume_to_volume_node(volume, scene, "nifti")  # the same voxels, not from the database
    hierarchy.CreateItem(study, nifti)
    plain = adapters.labels_to_segmentation_node(labels, nifti, table, scene)
    assert not hierarchy.GetItemAttribute(hierarchy.GetItemByDataNode(plain), "DICOM.ReferencedInstanceUIDs")


@pytest.fixture
def ct_and_labels(scene):
    ct = _read_with_mrml(scene, SAMPLE_CT)
    labels_image = sitk.ReadImage(str(SAMPLE_LABELS))
    assert Grid.of_image(labels_image).matches(adapters.volume_node_to_ctvolume(ct).grid)
    return ct, sitk.GetArrayFromImage(labels_image)


def _segment_array(scene, segmentation, segment_id: str, reference) -> np.ndarray:
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    try:
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation, ids, labelmap, reference
        )
        return np.array(slicer.util.arrayFromVolume(labelmap))
    finally:
        scene.RemoveNode(labelmap)


def _tag(segment, name: str) -> str:
    value = vtk.mutable("")
    assert segment.GetTag(name, value), f"segment {segment.GetName()} has no tag {name}"
    return str(value)


def test_labels_become_named_coloured_coded_segments(scene, ct_and_labels) -> None:
    ct, labels = ct_and_labels
    table = label_table(totalsegmentator_names())
    present = sorted(int(value) for value in np.unique(labels) if value)
    segmentation = adapters.labels_to_segmentation_node(labels, ct, table, scene, model_name="ctfm-mini-wholebody-seg")
    contents = segmentation.GetSegmentation()
    assert segmentation.GetName() == f"{ct.GetName()} segmentation"
    assert contents.GetNumberOfSegments() == len(present) == 41
    assert not _nodes(scene, "vtkMRMLLabelMapVolumeNode"), "the temporary import labelmap was left in the scene"
    by_name = {contents.GetNthSegment(i).GetName(): contents.GetNthSegment(i) for i in range(len(present))}
    assert set(by_name) == {table[value].name for value in present}
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    for value in present:
        label, segment = table[value], by_name[table[value].name]
        assert np.allclose(segment.GetColor(), np.array(label.color_rgb) / 255.0)
        assert _tag(segment, "DICOM.SegmentAlgorithmType") == "AUTOMATIC"
        assert _tag(segment, "DICOM.SegmentAlgorithmName") == "CT-FM ctfm-mini-wholebody-seg"
        entry_text = _tag(segment, segment.GetTerminologyEntryTagName())
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminologies.DeserializeTerminologyEntry(entry_text, entry), entry_text
        assert terminologies.SerializeTerminologyEntry(entry) == entry_text
        assert entry.GetTypeObject().GetCodeValue() == label.type.value
        assert entry.GetCategoryObject().GetCodeValue() == label.category.value
    for side, code in (("left", "SCT^7771000^Left"), ("right", "SCT^24028007^Right")):
        kidney = _tag(by_name[f"kidney_{side}"], "TerminologyEntry")
        assert "~SCT^64033007^Kidney~" in kidney and f"~{code}~" in kidney


def test_segments_hold_exactly_their_label_voxels(scene, ct_and_labels) -> None:
    ct, labels = ct_and_labels
    table = label_table(totalsegmentator_names())
    segmentation = adapters.labels_to_segmentation_node(labels, ct, table, scene)
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert segmentation.GetNodeReferenceID(role) == ct.GetID()
    contents = segmentation.GetSegmentation()
    name_to_value = {label.name: value for value, label in table.items()}
    for index in range(contents.GetNumberOfSegments()):
        value = name_to_value[contents.GetNthSegment(index).GetName()]
        exported = _segment_array(scene, segmentation, contents.GetNthSegmentID(index), ct)
        assert exported.shape == labels.shape
        assert np.array_equal(exported > 0, labels == value), table[value].name


def test_segmentation_follows_a_transformed_reference_into_its_study(scene, ct_and_labels) -> None:
    ct, labels = ct_and_labels
    transform = _linear_transform(scene, _rotation_about_superior(-20, (5, 40, -3)))
    ct.SetAndObserveTransformNodeID(transform.GetID())
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.GetSceneItemID(), "study")
    hierarchy.CreateItem(study, ct)  # as Slicer's subject hierarchy plugins do for every data node
    only_liver = np.where(labels == 5, labels, 0)
    segmentation = adapters.labels_to_segmentation_node(only_liver, ct, label_table(totalsegmentator_names()), scene)
    assert segmentation.GetTransformNodeID() == transform.GetID()
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    liver = segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver")
    assert np.array_equal(_segment_array(scene, segmentation, liver, ct) > 0, labels == 5)


def test_bad_label_maps_are_refused_without_leaving_a_node(scene, ct_and_labels) -> None:
    ct, labels = ct_and_labels
    table = label_table(totalsegmentator_names())
    with pytest.raises(ValueError, match="label map shape"):
        adapters.labels_to_segmentation_node(labels[:-1], ct, table, scene)
    with pytest.raises(ValueError, match=r"label values \[5\] are not in the label table"):
        adapters.labels_to_segmentation_node(labels, ct, {k: v for k, v in table.items() if k != 5}, scene)
    with pytest.raises(ValueError, match="integer"):
        adapters.labels_to_segmentation_node(labels.astype(np.float32), ct, table, scene)
    assert not _nodes(scene, "vtkMRMLSegmentationNode")


def test_terminology_entry_refuses_a_label_without_codes() -> None:
    table = label_table({1: "kidney_left", 2: "not_a_structure"})
    assert adapters.terminology_entry(table[1]).count("~") == 6
    with pytest.raises(ValueError, match="no SNOMED category and type"):
        adapters.terminology_entry(table[2])


def _coarse_grid(volume: CTVolume, factor: int) -> Grid:
    """The grid of ``factor``-voxel blocks of ``volume``: each coarse voxel centred on its block."""
    shape = tuple(n // factor for n in volume.shape_zyx)
    centre_of_first_block = volume.zyx_index_to_lps(np.full(3, (factor - 1) / 2))
    spacing = tuple(s * factor for s in volume.spacing_xyz_mm)
    return Grid(shape, spacing, tuple(centre_of_first_block), volume.direction)


def _block_mean(voxels: np.ndarray, factor: int) -> np.ndarray:
    z, y, x = (n // factor for n in voxels.shape)
    blocks = voxels[: z * factor, : y * factor, : x * factor].reshape(z, factor, y, factor, x, factor)
    return blocks.mean(axis=(1, 3, 5))


def test_heatmap_node_sits_on_its_coarse_grid_with_fixed_display(scene) -> None:
    ct = _read_with_mrml(scene, OBLIQUE_CT)
    volume = adapters.volume_node_to_ctvolume(ct)
    grid = _coarse_grid(volume, 4)
    heatmap = np.clip((_block_mean(volume.voxels, 4) + 1000.0) / 2000.0, 0.0, 1.0).astype(np.float32)
    node = adapters.heatmap_to_volume_node(heatmap, grid, scene, "similarity")
    assert np.array_equal(slicer.util.arrayFromVolume(node), heatmap)
    indices = _sample_indices(grid.shape_zyx)
    assert np.allclose(_node_ijk_to_lps(node, indices), grid.zyx_index_to_lps(indices), atol=1e-6)
    fine_block = np.array(np.meshgrid(*[range(4)] * 3, indexing="ij")).reshape(3, -1).T
    assert np.allclose(_node_ijk_to_lps(node, [[0, 0, 0]])[0], _node_ijk_to_lps(ct, fine_block).mean(axis=0))
    display = node.GetDisplayNode()
    heat_id = slicer.vtkMRMLColorLogic.GetPETColorNodeID(slicer.vtkMRMLPETProceduralColorNode.PETheat)
    assert display.GetColorNodeID() == heat_id
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == 0.5
    assert display.GetInterpolate()
    assert adapters.show_as_overlay(scene, ct, node, 0.4) == 3
    for composite in _nodes(scene, "vtkMRMLSliceCompositeNode"):
        assert composite.GetForegroundVolumeID() == node.GetID()
        assert composite.GetBackgroundVolumeID() == ct.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)


def test_heatmap_colour_node_is_added_to_a_scene_without_colour_logic() -> None:
    scene = _bare_scene()
    grid = read_volume(SMALL_CT).grid
    coarse = Grid(tuple(n // 8 for n in grid.shape_zyx), grid.spacing_xyz_mm, grid.origin_lps_mm, grid.direction)
    heatmap = np.linspace(0.0, 1.0, int(np.prod(coarse.shape_zyx)), dtype=np.float32).reshape(coarse.shape_zyx)
    slicer_ids = {  # the IDs Slicer's colour logic gives these maps
        "PET-Heat": slicer.vtkMRMLColorLogic.GetPETColorNodeID(slicer.vtkMRMLPETProceduralColorNode.PETheat),
        "PET-Rainbow": slicer.vtkMRMLColorLogic.GetPETColorNodeID(slicer.vtkMRMLPETProceduralColorNode.PETrainbow),
        "Rainbow": slicer.vtkMRMLColorLogic.GetColorTableNodeID(slicer.vtkMRMLColorTableNode.Rainbow),
    }
    assert set(slicer_ids) == set(adapters.HEATMAP_COLOUR_MAPS)
    for colormap, slicer_id in slicer_ids.items():
        node = adapters.heatmap_to_volume_node(heatmap, coarse, scene, colormap, colormap=colormap)
        assert node.GetDisplayNode().GetColorNodeID() == slicer_id
        assert node.GetDisplayNode().GetColorNode().GetNumberOfColors() > 1
    with pytest.raises(ValueError, match="colormap 'Viridis'"):
        adapters.heatmap_to_volume_node(heatmap, coarse, scene, "x", colormap="Viridis")
    with pytest.raises(ValueError, match="differs from the grid"):
        adapters.heatmap_to_volume_node(heatmap[1:], coarse, scene, "x")
    scene.Clear(1)


def test_markup_point_is_read_in_world_lps_and_slices_jump_to_it(scene) -> None:
    ct = _read_with_mrml(scene, OBLIQUE_CT)
    motion = _rotation_about_superior(25, (-8, 14, 30))
    transform = _linear_transform(scene, motion)
    ct.SetAndObserveTransformNodeID(transform.GetID())
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "query")
    markups.SetAndObserveTransformNodeID(transform.GetID())
    voxel_zyx = np.array([40, 70, 100])
    ijk_to_ras = vtk.vtkMatrix4x4()
    ct.GetIJKToRASMatrix(ijk_to_ras)
    local_ras = np.array(ijk_to_ras.MultiplyPoint((*voxel_zyx[::-1].astype(float), 1.0))[:3])
    markups.AddControlPoint(vtk.vtkVector3d(*local_ras))
    point_lps = adapters.markup_point_lps(markups)
    assert np.allclose(point_lps, adapters.ras_to_lps((motion @ np.append(local_ras, 1.0))[:3]), atol=1e-6)
    assert np.allclose(adapters.volume_node_to_ctvolume(ct).lps_to_zyx_index(point_lps), voxel_zyx, atol=1e-4)
    adapters.jump_slices_to_lps(scene, point_lps)
    for view in _nodes(scene, "vtkMRMLSliceNode"):
        slice_to_ras = view.GetSliceToRAS()
        centre_ras = [slice_to_ras.GetElement(row, 3) for row in range(3)]
        assert np.allclose(centre_ras, adapters.lps_to_ras(point_lps), atol=1e-6), view.GetName()
    with pytest.raises(ValueError, match="has 1 control points, no point 1"):
        adapters.markup_point_lps(markups, 1)


def test_ras_lps_flip_is_its_own_inverse_and_leaves_input_alone() -> None:
    points = np.array([[10.0, -20.0, 30.0], [-1.5, 2.5, -3.5]])
    assert np.array_equal(adapters.ras_to_lps(points), [[-10.0, 20.0, 30.0], [1.5, -2.5, -3.5]])
    assert np.array_equal(adapters.lps_to_ras(adapters.ras_to_lps(points)), points)
    assert points[0, 0] == 10.0
    with pytest.raises(ValueError, match="3 coordinates"):
        adapters.ras_to_lps([1.0, 2.0])
