"""MRML adapters: Slicer nodes (RAS) to and from the engine's objects (patient LPS, arrays (z, y, x)).

Slicer keeps world coordinates in RAS (+x towards the patient's Right, +y Anterior, +z Superior); DICOM, ITK and
``ctfm_engine`` use patient LPS millimetres (+x Left, +y Posterior, +z Superior), so the Slicer point ``(r, a, s)`` is
the engine point ``(-r, -a, s)``.  This
module is the one place where the two meet; every function takes RAS from MRML and hands LPS to the engine, or the
reverse.  The conversion is the diagonal matrix ``diag(-1, -1, 1)``, its own inverse.

Geometry conventions on both sides:

- A volume node stores its voxels as ``vtkImageData`` with dimensions (i, j, k) and an ``IJKToRAS`` 4x4 matrix
  whose columns 0..2 are the i, j, k axes scaled by the spacing and whose column 3 is the centre of voxel (0, 0, 0).
  ``slicer.util.arrayFromVolume`` views the voxels as a numpy array in (k, j, i) order.
- ``ctfm_engine`` (``CTVolume``, ``Grid``) stores voxels as (z, y, x) = (k, j, i), ``spacing_xyz_mm`` and a
  ``direction`` whose column ``n`` is the LPS unit vector of index axis ``n`` in (x, y, z) = (i, j, k) order.

So the voxel arrays are the same array, and ``IJKToLPS = diag(-1, -1, 1, 1) @ IJKToRAS``.  A node under a linear
parent transform is hardened into the geometry (the engine sees world coordinates); a node under a non-linear
transform is refused, because its voxels no longer sit on a regular grid in the world.

Only MRML/VTK classes and the Qt-free helpers of ``slicer.util`` are used, so the module runs inside Slicer and in
plain CPython with the PyPI package ``slicer-core`` (no ``slicer.app``, ``slicer.modules`` or ``slicer.mrmlScene``:
every function takes its scene or nodes explicitly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import slicer
import vtk
from slicer.util import arrayFromVolume, arrayFromVTKMatrix, updateVolumeFromArray, vtkMatrixFromArray

from ctfm_engine.labels import Code, Label
from ctfm_engine.volume import CTVolume, DicomReferences, Grid

# diag(-1, -1, 1, 1): maps homogeneous RAS to LPS and LPS to RAS.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Slicer's serialized terminology entry names the context of the category/type codes and of the region codes.
TYPE_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
TERMINOLOGY_SEPARATORS = "~^|"
ALGORITHM_TYPE_TAG = "DICOM.SegmentAlgorithmType"
ALGORITHM_NAME_TAG = "DICOM.SegmentAlgorithmName"
# Subject hierarchy attribute of a segmentation: the SOP Instance UIDs of the images it was made on (space separated).
REFERENCED_INSTANCES_ATTRIBUTE = "DICOM.ReferencedInstanceUIDs"

# Colour maps for a similarity heatmap that exist in Slicer and in slicer-core (file-based tables such as Viridis
# need the application): name -> (MRML class, method that selects the map).  Slicer's colour logic gives each the
# node ID ``<class><name>``.
HEATMAP_COLOUR_MAPS = {
    "PET-Heat": ("vtkMRMLPETProceduralColorNode", "SetTypeToHeat"),
    "PET-Rainbow": ("vtkMRMLPETProceduralColorNode", "SetTypeToRainbow"),
    "Rainbow": ("vtkMRMLColorTableNode", "SetTypeToRainbow"),
}


def ras_to_lps(points_ras: np.ndarray | Sequence[float]) -> np.ndarray:
    """RAS points (..., 3) in mm to LPS points (..., 3) in mm."""
    points = np.array(points_ras, dtype=np.float64)
    if points.shape[-1:] != (3,):
        raise ValueError(f"points must have 3 coordinates in their last axis, got shape {points.shape}")
    points[..., :2] *= -1.0
    return points


def lps_to_ras(points_lps: np.ndarray | Sequence[float]) -> np.ndarray:
    """LPS points (..., 3) in mm to RAS points (..., 3) in mm (the same flip as :func:`ras_to_lps`)."""
    return ras_to_lps(points_lps)


def to_world_matrix(node: slicer.vtkMRMLTransformableNode) -> np.ndarray:
    """The 4x4 matrix from ``node``'s local RAS to world RAS: identity without a parent transform.

    Raises ValueError when the parent transform chain is not linear (a grid or B-spline warp).
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise ValueError(
            f"node {node.GetName()!r} is under the non-linear transform {parent.GetName()!r}; harden the transform "
            f"(which resamples the node) or remove it before handing the node to CT-FM"
        )
    matrix = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(parent, None, matrix)
    return arrayFromVTKMatrix(matrix)


def ijk_to_lps_matrix(node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """The 4x4 matrix from a homogeneous voxel index (i, j, k) of ``node`` to world LPS millimetres."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    return LPS_FROM_RAS @ to_world_matrix(node) @ arrayFromVTKMatrix(ijk_to_ras)


def grid_of_node(node: slicer.vtkMRMLVolumeNode) -> Grid:
    """The engine grid (shape (z, y, x), spacing, LPS origin, direction) of a volume node in world coordinates.

    Raises ValueError for a node without voxels, or one whose transform shears its voxel axes (they are no longer
    perpendicular), which a ``Grid`` cannot describe.
    """
    image = node.GetImageData()
    if image is None:
        raise ValueError(f"volume node {node.GetName()!r} has no voxels (no image data)")
    matrix = ijk_to_lps_matrix(node)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    direction = matrix[:3, :3] / spacing[None, :]
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ValueError(
            f"volume node {node.GetName()!r} has a sheared geometry (its transform makes the voxel axes "
            f"non-perpendicular); resample the volume through the transform first"
        )
    shape_zyx = tuple(reversed(image.GetDimensions()))
    return Grid(shape_zyx, tuple(spacing), tuple(matrix[:3, 3]), direction)  # type: ignore[arg-type]


def set_grid(node: slicer.vtkMRMLVolumeNode, grid: Grid) -> None:
    """Place ``node`` (no parent transform) on ``grid``: its IJKToRAS becomes the grid's index-to-LPS, flipped."""
    node.SetIJKToRASMatrix(vtkMatrixFromArray(LPS_FROM_RAS @ grid.index_to_lps_matrix))


def volume_node_to_ctvolume(node: slicer.vtkMRMLScalarVolumeNode, *, keep_small_integers: bool = False) -> CTVolume:
    """A copy of a scalar volume node as a ``CTVolume``: voxels (z, y, x) float32, geometry in world LPS.

    Parameters
    ----------
    node:
        A ``vtkMRMLScalarVolumeNode`` with one value per voxel (CT in Hounsfield units).  A linear parent transform
        is hardened into the geometry; a non-linear one raises ValueError.
    keep_small_integers:
        Keep 8- and 16-bit integer voxels (Slicer loads DICOM CT as int16) in their own type instead of float32:
        every value is the same, the copy made on the UI thread and the file handed to a worker are half the size,
        and the worker converts (``CTFMLib.jobs``).

    Returns
    -------
    CTVolume
        ``voxels`` has shape (k, j, i) of the node's image data; ``source`` is the node name.  A node loaded by
        Slicer's DICOM module carries the attribute ``DICOM.instanceUIDs`` (SOP Instance UIDs, in the order Slicer
        loaded the files): they are kept as ``dicom.sop_instance_uids``, and the series UID of the node's subject
        hierarchy item, when there is one, as ``series_instance_uid``.
    """
    grid = grid_of_node(node)
    image = node.GetImageData()
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"volume node {node.GetName()!r} has {image.GetNumberOfScalarComponents()} values per voxel; CT-FM "
            f"needs a greyscale CT (one value per voxel)"
        )
    view = arrayFromVolume(node)
    small_integers = view.dtype in (np.int8, np.uint8, np.int16, np.uint16)  # exactly representable in float32
    voxels = np.array(view, dtype=view.dtype if keep_small_integers and small_integers else np.float32, copy=True)
    series_uid = _series_instance_uid(node)
    instance_uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    dicom = DicomReferences(series_instance_uid=series_uid, sop_instance_uids=tuple(instance_uids))
    return CTVolume(
        voxels=voxels,
        spacing_xyz_mm=grid.spacing_xyz_mm,
        origin_lps_mm=grid.origin_lps_mm,
        direction=grid.direction,
        source=node.GetName(),
        series_instance_uid=series_uid,
        dicom=dicom,
    )


def _series_instance_uid(node: slicer.vtkMRMLNode) -> str | None:
    """The DICOM UID Slicer's DICOM module gives the node's subject hierarchy item (the SeriesInstanceUID)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    if hierarchy is None:
        return None
    item = hierarchy.GetItemByDataNode(node)
    if item == hierarchy.GetInvalidItemID():
        return None
    return hierarchy.GetItemUID(item, "DICOM") or None


def ctvolume_to_volume_node(
    volume: CTVolume, scene: slicer.vtkMRMLScene, name: str
) -> slicer.vtkMRMLScalarVolumeNode:
    """A new scalar volume node in ``scene`` holding a copy of ``volume`` (float32 voxels) on its geometry.

    The inverse of :func:`volume_node_to_ctvolume` for a node without a parent transform; default display nodes
    are created so the volume can be shown.
    """
    return _scalar_volume_node(volume.voxels, volume.grid, scene, name)


def _scalar_volume_node(
    voxels_zyx: np.ndarray, grid: Grid, scene: slicer.vtkMRMLScene, name: str
) -> slicer.vtkMRMLScalarVolumeNode:
    if tuple(voxels_zyx.shape) != grid.shape_zyx:
        raise ValueError(f"array shape {tuple(voxels_zyx.shape)} differs from the grid's {grid.shape_zyx}")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    set_grid(node, grid)
    updateVolumeFromArray(node, np.ascontiguousarray(voxels_zyx, dtype=np.float32))
    node.CreateDefaultDisplayNodes()
    return node


def terminology_entry(label: Label, type_context: str = TYPE_CONTEXT, region_context: str = REGION_CONTEXT) -> str:
    """Slicer's serialized terminology entry for a label's SNOMED CT codes.

    The format is ``"<type context>~<category>~<type>~<type modifier>~<region context>~<region>~<region
    modifier>"``, each code written ``scheme^value^meaning`` (``^^`` when absent); laterality is the type
    modifier.  This is what ``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry`` writes: no trailing
    ``|`` (Slicer's parser would read it into the region modifier's meaning).  Raises ValueError for a label without
    category and type (Slicer's DICOM-SEG export needs both) or a code holding one of the separators ``~ ^ |``.
    """
    if label.category is None or label.type is None:
        raise ValueError(f"label {label.value} ({label.name}) has no SNOMED category and type code")
    codes = [_code_text(label.category), _code_text(label.type), _code_text(label.type_modifier)]
    region = [_code_text(label.region), _code_text(label.region_modifier)]
    return "~".join([type_context, *codes, region_context, *region])


def _code_text(code: Code | None) -> str:
    if code is None:
        return "^^"
    fields = (code.scheme, code.value, code.meaning)
    if any(separator in field for field in fields for separator in TERMINOLOGY_SEPARATORS):
        raise ValueError(f"code {fields} holds one of the terminology separators {TERMINOLOGY_SEPARATORS!r}")
    return "^".join(fields)


def labels_to_segmentation_node(
    labels_zyx: np.ndarray,
    reference_node: slicer.vtkMRMLScalarVolumeNode,
    label_table: Mapping[int, Label],
    scene: slicer.vtkMRMLScene,
    name: str | None = None,
    *,
    model_name: str | None = None,
) -> slicer.vtkMRMLSegmentationNode:
    """A segmentation node with one segment per label value present in ``labels_zyx`` (0 is background).

    Parameters
    ----------
    labels_zyx:
        Integer label map, shape (k, j, i) of ``reference_node``'s voxels (the shape of
        ``volume_node_to_ctvolume(reference_node).voxels``).
    reference_node:
        The volume the labels were computed on.  The segmentation references its geometry (parameter and node
        reference), sits under the same parent transform and, in the subject hierarchy, beside it (its study); a
        volume loaded from DICOM passes its ``DICOM.instanceUIDs`` on as the segmentation item's
        ``DICOM.ReferencedInstanceUIDs``, which Slicer's DICOM-SEG export uses.
    label_table:
        Label value -> ``Label``: segment name, colour (0-255) and SNOMED codes.  Labels with codes get a
        terminology entry (:func:`terminology_entry`); every present value must be in the table.
    scene:
        The scene the node is added to.
    name:
        Node name; default ``"<reference name> segmentation"``.
    model_name:
        Written into each segment's ``DICOM.SegmentAlgorithmName`` as ``"CT-FM <model_name>"`` (``"CT-FM"``
        alone when None), with ``DICOM.SegmentAlgorithmType = AUTOMATIC``, so a DICOM-SEG export names the model.

    Raises ValueError for a label map of another shape or non-integer type, or values missing from the table.
    """
    shape_zyx = grid_of_node(reference_node).shape_zyx
    if tuple(labels_zyx.shape) != shape_zyx:
        raise ValueError(
            f"label map shape {tuple(labels_zyx.shape)} differs from the voxel grid {shape_zyx} of "
            f"{reference_node.GetName()!r}; labels must be on the reference volume's grid"
        )
    if not np.issubdtype(labels_zyx.dtype, np.integer):
        raise ValueError(f"label map must hold integer label values, got {labels_zyx.dtype}")
    present = [int(value) for value in np.unique(labels_zyx) if value != 0]
    unknown = [value for value in present if value not in label_table]
    if unknown:
        raise ValueError(f"label values {unknown} are not in the label table; pass the table of the model used")
    name = name or f"{reference_node.GetName()} segmentation"
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    try:
        _attach_to_reference(segmentation, reference_node)
        _import_labels(labels_zyx, segmentation, reference_node, present)
        _describe_segments(segmentation, label_table, set(present), model_name)
    except Exception:
        scene.RemoveNode(segmentation)
        raise
    return segmentation


def _attach_to_reference(
    segmentation: slicer.vtkMRMLSegmentationNode, reference_node: slicer.vtkMRMLScalarVolumeNode
) -> None:
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    segmentation.SetNodeReferenceID(
        slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole(), reference_node.GetID()
    )
    segmentation.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    place_in_study(segmentation, reference_node)


# The organ measurements table: (row key of the engine's measurements, column title, unit); HU statistics on the
# source grid, as ``ctfm segment --measurements`` and the measurement SR give them.
MEASUREMENT_COLUMNS = (
    ("name", "Structure", ""), ("volume_ml", "Volume", "mL"), ("hu_mean", "Mean", "HU"), ("hu_sd", "SD", "HU"),
    ("hu_median", "Median", "HU"), ("hu_p5", "P5", "HU"), ("hu_p25", "P25", "HU"), ("hu_p75", "P75", "HU"),
    ("hu_p95", "P95", "HU"), ("hu_min", "Min", "HU"), ("hu_max", "Max", "HU"), ("voxels", "Voxels", ""),
)


def measurements_to_table_node(
    rows: Sequence[Mapping[str, object]],
    reference_node: slicer.vtkMRMLScalarVolumeNode,
    scene: slicer.vtkMRMLScene,
    name: str,
) -> slicer.vtkMRMLTableNode:
    """A table node of per-structure measurements (one row per structure, the columns of MEASUREMENT_COLUMNS with
    their units), beside ``reference_node`` in its study; numbers rounded for reading (1 decimal, volume 2)."""
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    for key, title, unit in MEASUREMENT_COLUMNS:
        column = vtk.vtkStringArray() if key == "name" else vtk.vtkDoubleArray()
        column.SetName(f"{title} ({unit})" if unit else title)
        for row in rows:
            value = row[key]
            if key == "name":
                column.InsertNextValue(str(value))
            else:
                column.InsertNextValue(round(float(value), 2 if key == "volume_ml" else 1))
        table.AddColumn(column)
    for _key, title, unit in MEASUREMENT_COLUMNS:
        if unit:
            table_node.SetColumnUnitLabel(f"{title} ({unit})", unit)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)  # results, not a spreadsheet to edit
    table_node.Modified()
    place_in_study(table_node, reference_node)
    return table_node


def place_in_study(
    segmentation: slicer.vtkMRMLNode, reference_node: slicer.vtkMRMLScalarVolumeNode
) -> None:
    """Put the segmentation's subject hierarchy item beside ``reference_node``'s (its study), creating the item where
    no hierarchy plugin did (slicer-core); for a volume loaded from DICOM, pass its ``DICOM.instanceUIDs`` on as the
    item's ``DICOM.ReferencedInstanceUIDs``, which Slicer's DICOM-SEG export reads to find (and check) the images."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(reference_node.GetScene())
    if hierarchy is None:
        return
    reference_item = hierarchy.GetItemByDataNode(reference_node)
    if reference_item == hierarchy.GetInvalidItemID():
        return
    study_item = hierarchy.GetItemParent(reference_item)
    segmentation_item = hierarchy.GetItemByDataNode(segmentation)
    if segmentation_item == hierarchy.GetInvalidItemID():  # no subject hierarchy plugins (slicer-core)
        segmentation_item = hierarchy.CreateItem(study_item, segmentation)
    else:
        hierarchy.SetItemParent(segmentation_item, study_item)
    instance_uids = reference_node.GetAttribute("DICOM.instanceUIDs")
    if instance_uids:
        hierarchy.SetItemAttribute(segmentation_item, REFERENCED_INSTANCES_ATTRIBUTE, instance_uids)


def _import_labels(
    labels_zyx: np.ndarray,
    segmentation: slicer.vtkMRMLSegmentationNode,
    reference_node: slicer.vtkMRMLScalarVolumeNode,
    present: Sequence[int],
) -> None:
    """One segment per present label value, all sharing one binary labelmap layer: the label map itself.

    This is how Slicer stores non-overlapping segments (a shared layer, each segment its label value), built directly
    instead of through ``ImportLabelmapToSegmentationNode``, which takes seconds on a 512x512x300 map (4.4 s for 41
    structures on a 2-core CPU; this takes the time of one copy, ``benchmarks/slicer_ui.py``) and would hold the UI
    thread that long.  The layer is on the reference's voxel grid in its local RAS (IJKToRAS), and the segmentation
    sits under the reference's parent transform, so both move together.
    """
    from vtk.util import numpy_support

    if labels_zyx.min() >= 0 and labels_zyx.max() <= np.iinfo(np.uint16).max:
        storage, vtk_type = (np.uint8, vtk.VTK_UNSIGNED_CHAR) if labels_zyx.max() <= 255 else (np.uint16,
                                                                                                vtk.VTK_UNSIGNED_SHORT)
    else:
        storage, vtk_type = np.int32, vtk.VTK_INT
    layer = slicer.vtkOrientedImageData()
    depth, rows, columns = labels_zyx.shape
    layer.SetDimensions(columns, rows, depth)
    flat = np.ascontiguousarray(labels_zyx, dtype=storage).ravel()
    layer.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk_type))
    ijk_to_ras = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(ijk_to_ras)
    layer.SetImageToWorldMatrix(ijk_to_ras)
    contents = segmentation.GetSegmentation()
    representation = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    for value in present:
        segment = slicer.vtkSegment()
        segment.SetLabelValue(int(value))
        segment.AddRepresentation(representation, layer)
        if not contents.AddSegment(segment, f"label_{int(value)}"):
            raise RuntimeError(f"Slicer could not add label {value} to {segmentation.GetName()!r}")


def _describe_segments(
    segmentation: slicer.vtkMRMLSegmentationNode,
    label_table: Mapping[int, Label],
    present: set[int],
    model_name: str | None,
) -> None:
    """Name, colour, terminology and algorithm tags of each imported segment, found by its label value."""
    contents = segmentation.GetSegmentation()
    imported = set()
    for index in range(contents.GetNumberOfSegments()):
        segment = contents.GetNthSegment(index)
        label = label_table[segment.GetLabelValue()]
        imported.add(label.value)
        segment.SetName(label.name)
        segment.SetColor(*(channel / 255.0 for channel in label.color_rgb))
        if label.category is not None and label.type is not None:
            _set_terminology(segment, terminology_entry(label))
        segment.SetTag(ALGORITHM_TYPE_TAG, "AUTOMATIC")
        segment.SetTag(ALGORITHM_NAME_TAG, f"CT-FM {model_name}" if model_name else "CT-FM")
    if imported != present:
        raise RuntimeError(f"Slicer imported label values {sorted(imported)}, expected {sorted(present)}")


def _set_terminology(segment: slicer.vtkSegment, entry: str) -> None:
    """``SetTerminology`` (Slicer >= 5.10) or, on older releases, the terminology tag it writes."""
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(entry)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def heatmap_to_volume_node(
    heatmap_zyx: np.ndarray,
    grid: Grid,
    scene: slicer.vtkMRMLScene,
    name: str,
    *,
    colormap: str = "PET-Heat",
    window: tuple[float, float] = (0.0, 1.0),
    hide_below: float = 0.5,
) -> slicer.vtkMRMLScalarVolumeNode:
    """A scalar volume node showing a similarity heatmap on its own (usually coarse) engine grid.

    Parameters
    ----------
    heatmap_zyx:
        Similarity (cosine, or rescaled to [0, 1]), shape ``grid.shape_zyx``; stored as float32.
    grid:
        Where the heatmap voxels sit in patient LPS; Slicer reslices it onto any view, so it is not resampled.
    colormap:
        One of ``HEATMAP_COLOUR_MAPS`` ("PET-Heat", "PET-Rainbow", "Rainbow"); the scene's node of that name is
        used, or added when the scene has none (a scene without Slicer's colour logic).
    window:
        Fixed display range (low, high): the colours mean the same similarity in every heatmap.
    hide_below:
        Voxels below this similarity are transparent (display threshold); interpolation is on.
    """
    if colormap not in HEATMAP_COLOUR_MAPS:
        raise ValueError(f"colormap {colormap!r} is not one of {sorted(HEATMAP_COLOUR_MAPS)}")
    node = _scalar_volume_node(heatmap_zyx, grid, scene, name)
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(colour_node(scene, colormap).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*window)
    display.AutoThresholdOff()
    display.SetThreshold(hide_below, max(window[1], float(np.nanmax(heatmap_zyx))))
    display.ApplyThresholdOn()
    display.SetInterpolate(1)
    return node


def colour_node(scene: slicer.vtkMRMLScene, colormap: str) -> slicer.vtkMRMLColorNode:
    """The scene's colour node ``colormap`` (one of ``HEATMAP_COLOUR_MAPS``), added with Slicer's ID if absent."""
    class_name, select = HEATMAP_COLOUR_MAPS[colormap]
    existing = scene.GetNodeByID(f"{class_name}{colormap}")
    if existing is not None:
        return existing
    node = getattr(slicer, class_name)()  # a scene without the colour logic has not registered the class
    getattr(node, select)()
    node.SetName(colormap)
    node.SetSingletonTag(colormap)
    return scene.AddNode(node)


def show_as_overlay(
    scene: slicer.vtkMRMLScene,
    background_node: slicer.vtkMRMLVolumeNode | None,
    foreground_node: slicer.vtkMRMLVolumeNode,
    opacity: float = 0.4,
) -> int:
    """Show ``foreground_node`` over ``background_node`` in every slice view of ``scene``; returns the view count.

    Works on the scene's ``vtkMRMLSliceCompositeNode``s directly (no layout manager, so also in slicer-core); with
    ``background_node`` None each view keeps its background.
    """
    composites = [
        scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]
    for composite in composites:
        if background_node is not None:
            composite.SetBackgroundVolumeID(background_node.GetID())
        composite.SetForegroundVolumeID(foreground_node.GetID())
        composite.SetForegroundOpacity(opacity)
    return len(composites)


def markup_point_lps(markups_node: slicer.vtkMRMLMarkupsNode, index: int = 0) -> np.ndarray:
    """World position (after parent transforms) of control point ``index``, in LPS mm, shape (3,)."""
    count = markups_node.GetNumberOfControlPoints()
    if not 0 <= index < count:
        raise ValueError(f"markups node {markups_node.GetName()!r} has {count} control points, no point {index}")
    position_ras = [0.0, 0.0, 0.0]
    markups_node.GetNthControlPointPositionWorld(index, position_ras)
    return ras_to_lps(position_ras)


def jump_slices_to_lps(scene: slicer.vtkMRMLScene, point_lps: np.ndarray | Sequence[float]) -> None:
    """Centre every slice view of ``scene`` on an LPS point (mm)."""
    red, anterior, superior = lps_to_ras(point_lps)
    slicer.vtkMRMLSliceNode.JumpAllSlices(
        scene, float(red), float(anterior), float(superior), slicer.vtkMRMLSliceNode.CenteredJumpSlice
    )
