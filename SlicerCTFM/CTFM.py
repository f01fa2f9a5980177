"""CTFM: whole-body segmentation, head-CT triage and semantic search with CT-FM, the CT foundation model, in Slicer.

Thin by design (SlicerNNUnet's layout): the widget wires ``Resources/UI/CTFM.ui`` and runs a small state machine
(Idle, Running, Cancelling) whose QTimer polls a worker job; the logic delegates to ``CTFMLib``: ``jobs`` runs the
engine in a worker process (``worker``; the UI thread never waits on it), ``session`` turns results into nodes and
status lines, ``install`` sets up packages and weights, and
``mrml_adapters`` converts between MRML nodes (RAS) and the engine (patient LPS, arrays (z, y, x)).  Nothing heavy
is imported at module load: torch and ctfm_engine live in the worker, and the adapters load after the dependency
check.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import qt
import slicer
import vtk
from CTFMLib import install, jobs
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

install.use_bundled_engine()  # ctfm_engine ships with the module: import it from the module's own folder

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer < 5.4 has no translation helpers

    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text


POLL_INTERVAL_MS = 100
WEIGHT_SOURCES = ("auto", "folder", "hub")
NOT_CLINICAL = "Research use only: CT-FM results are not for clinical decisions."


class CTFM(ScriptedLoadableModule):
    """Module metadata only (cheap: Slicer loads it at startup)."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT-FM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerCTFM team"]
        self.parent.helpText = _(
            "Whole-body segmentation (TotalSegmentator v2 structures), head-CT triage and semantic search (click a "
            "point, find the same anatomy in other scans) with CT-FM, the CT foundation model of Pai, Hadzic et al. "
            "(2025). Inference runs in a background process that can be cancelled. " + NOT_CLINICAL)
        self.parent.acknowledgementText = _(
            "CT-FM by the AIM lab (Mass General Brigham); model architecture from MONAI (SegResNetDS). The bundled "
            "demonstration models were trained by this project on public CT and are not for clinical use.")


class CTFMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: Apply becomes Cancel while a job runs, a QTimer polls the job, results are imported on done."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: CTFMLogic | None = None
        self.job: jobs.Job | None = None
        self.jobKind = ""  # "segmentation" or "triage"
        self.jobVolume = None
        self.measurementsTable = None  # the table node of the last segmentation's measurements
        self.searchRequest: int | None = None
        self.searchActive = False
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTFM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CTFMLogic()
        self.logic.logCallback = self.addLog
        self.ui.segmentationApplyButton.connect("clicked(bool)", self.onSegmentationButton)
        self.ui.triageApplyButton.connect("clicked(bool)", self.onTriageButton)
        self.ui.searchApplyButton.connect("clicked(bool)", self.onSearchButton)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.weightsSourceComboBox.connect("currentIndexChanged(int)", self.onWeightsChanged)
        self.ui.segmentationWeightsPathLineEdit.connect("currentPathChanged(QString)", self.onWeightsChanged)
        self.ui.searchWeightsPathLineEdit.connect("currentPathChanged(QString)", self.onWeightsChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.segmentationOutputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.segmentationOutputSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                  self.ui.segmentationShow3DButton.setSegmentationNode)
        self.ui.searchPointSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSearchPointNodeChanged)
        self.ui.searchTargetsSelector.connect("checkedNodesChanged()", self.onSearchTargetsChanged)
        # "click a spot": placement stays on, and each new point replaces the previous query point
        self.ui.searchPointPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.ui.progressBar.setVisible(False)
        self.ui.activeModelLabel.setText(_("(checked when a task starts)"))
        # Slicer 5.8 and older (Python 3.9) cannot run the engine: say so once, instead of a pip failure later
        self.unsupported = install.unsupported_reason(install.slicer_version())
        if self.unsupported:
            self.ui.statusLabel.setText(self.unsupported)
            self.addLog(self.unsupported)
        self.updateButtons()

    def cleanup(self) -> None:
        self.removeObservers()
        self.timer.stop()
        if self.job is not None:
            self.job.cancel()
        if self.logic is not None:
            self.logic.stopSearchWorker()

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        self.cancelJob()
        self.stopSearch()

    # -- state machine: Idle (no job), Running, Cancelling --

    @property
    def state(self) -> str:
        if self.job is None or self.job.finished:
            return "Idle"
        return "Cancelling" if self.job.state == "cancelling" else "Running"

    def updateButtons(self, *unused: Any) -> None:
        state = self.state
        hasInput = self.ui.inputVolumeSelector.currentNode() is not None and not getattr(self, "unsupported", None)
        for kind, button in (("segmentation", self.ui.segmentationApplyButton),
                             ("triage", self.ui.triageApplyButton)):
            ownsJob = state != "Idle" and self.jobKind == kind
            button.text = _("Cancel") if ownsJob else _("Apply")
            button.enabled = (ownsJob and state == "Running") or (state == "Idle" and hasInput)
        self.ui.searchApplyButton.text = _("Stop search") if self.searchActive else _("Start search")
        self.ui.searchApplyButton.enabled = hasInput or self.searchActive
        segmentation = self.ui.segmentationOutputSelector.currentNode()
        self.ui.exportDicomSegButton.enabled = state == "Idle" and segmentation is not None
        self.ui.progressBar.setVisible(state != "Idle")

    def startJob(self, kind: str, job: jobs.Job, volumeNode: Any) -> None:
        self.job, self.jobKind, self.jobVolume = job, kind, volumeNode
        self.ui.progressBar.setRange(0, 0)  # busy until the worker reports its first count
        self.ui.statusLabel.setText(_("Starting the CT-FM worker..."))
        self.timer.start()
        self.updateButtons()

    def cancelJob(self) -> None:
        if self.job is not None and not self.job.finished:
            self.job.cancel()
            self.ui.statusLabel.setText(_("Cancelling..."))
            self.updateButtons()

    def onTimer(self) -> None:
        if self.job is not None:
            self.pollJob()
        if self.searchActive:
            self.pollSearch()
        if (self.job is None or self.job.finished) and not self.searchActive:
            self.timer.stop()

    def pollJob(self) -> None:
        for event in self.job.poll():
            if event["event"] == "log":
                self.addLog(event.get("message", ""))
        progress = self.job.progress
        if progress is not None and self.job.state == "running":
            self.ui.progressBar.setRange(0, max(progress.total, 1))
            self.ui.progressBar.setValue(progress.done)
            self.ui.statusLabel.setText(f"{progress.stage}: {progress.done}/{progress.total}")
        if self.job.finished:
            self.finishJob()

    def finishJob(self) -> None:
        job, kind = self.job, self.jobKind
        if job.state == "done":
            try:
                if kind == "segmentation":
                    segmentation = self.logic.importSegmentation(job.result, self.jobVolume,
                                                                 self.ui.segmentationOutputSelector.currentNode())
                    self.ui.segmentationOutputSelector.setCurrentNode(segmentation)
                    self.measurementsTable = self.logic.importMeasurements(job.result, self.jobVolume,
                                                                           self.measurementsTable)
                    self.ui.measurementsTableView.setMRMLTableNode(self.measurementsTable)
                    self.ui.statusLabel.setText(self.logic.describeSegmentation(job.result))
                else:
                    self.ui.triageResultLabel.setText(self.logic.describeTriage(job.result))
                    self.ui.statusLabel.setText(self.logic.triageStatus(job.result))
                self.ui.activeModelLabel.setText(self.logic.describeWeights(job.result.get("weights")))
            except Exception as error:
                slicer.util.errorDisplay(_("Importing the result failed: ") + str(error))
        elif job.state == "cancelled":
            self.ui.statusLabel.setText(_("Cancelled; nothing was written."))
        else:
            self.ui.statusLabel.setText(job.error.message)
            if kind == "triage":  # the input check's refusal belongs in the triage panel too
                self.ui.triageResultLabel.setText(_("Not judged: ") + job.error.message)
            slicer.util.errorDisplay(job.error.message, windowTitle=_("CT-FM"))
        self.job = None
        self.updateButtons()

    # -- buttons --

    def readyToStart(self) -> bool:
        """An Apply button pressed: while a job runs it is the Cancel button; else the packages must be there."""
        if self.state != "Idle":
            self.cancelJob()
            return False
        return self.ensureDependencies()

    def onSegmentationButton(self) -> None:
        if not self.readyToStart():
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
            weights = self.logic.chooseWeights("segmentation", **self.weightsOptions())
            self.ui.activeModelLabel.setText(weights.short())
            job = self.logic.startSegmentation(volume, weights.folder, self.device(),
                                               largestComponent=self.ui.largestComponentCheckBox.checked,
                                               skipCtCheck=self.ui.acceptNotCtCheckBox.checked)
            self.startJob("segmentation", job, volume)

    def onTriageButton(self) -> None:
        if not self.readyToStart():
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        threshold = self.ui.triageThresholdSpinBox.value or None
        with slicer.util.tryWithErrorDisplay(_("Triage could not start."), waitCursor=True):
            job = self.logic.startTriage(volume, self.ui.triageModelPathLineEdit.currentPath or None, self.device(),
                                         threshold=threshold, acceptPartial=self.ui.acceptPartialCheckBox.checked,
                                         skipCtCheck=self.ui.acceptNotCtCheckBox.checked)
            self.ui.triageResultLabel.setText("")
            self.startJob("triage", job, volume)

    def onSearchButton(self) -> None:
        if self.searchActive:
            self.stopSearch()
            return
        if not self.ensureDependencies():
            return
        source = self.ui.inputVolumeSelector.currentNode()
        targets = self.ui.searchTargetsSelector.checkedNodes() or [source]
        with slicer.util.tryWithErrorDisplay(_("Semantic search could not start."), waitCursor=True):
            weights = self.logic.chooseWeights("search", **self.weightsOptions())
            self.ui.activeModelLabel.setText(weights.short())
            cache = self.ui.featureCachePathLineEdit.currentPath or None
            self.logic.startSearch(source, targets, weights.folder, self.device(), cacheDir=cache,
                                   topK=self.ui.searchTopKSpinBox.value,
                                   skipCtCheck=self.ui.acceptNotCtCheckBox.checked)
            self.searchActive = True
            self.onSearchPointNodeChanged(self.ui.searchPointSelector.currentNode())
            self.ui.statusLabel.setText(_("Computing CT-FM features of the volumes; then click a point..."))
            self.timer.start()
        self.updateButtons()

    def onInputVolumeChanged(self, volumeNode: Any) -> None:
        """A search is about the input CT it started on: choosing another input stops it."""
        if self.searchActive and volumeNode is not self.logic.searchSource:
            self.stopSearch()
            self.ui.statusLabel.setText(_("Search stopped: the input CT changed. Start the search again."))
        self.updateButtons()

    def onSearchTargetsChanged(self) -> None:
        """Volumes checked while a search runs are sent to the worker (only the new ones get their features)."""
        if not self.searchActive:
            return
        source = self.logic.searchSource
        targets = self.ui.searchTargetsSelector.checkedNodes() or [source]
        with slicer.util.tryWithErrorDisplay(_("The search volumes could not be updated."), waitCursor=True):
            self.logic.updateSearchTargets(targets)

    def stopSearch(self) -> None:
        self.searchActive, self.searchRequest = False, None
        if self.logic is not None:
            self.logic.stopSearchWorker()
        self.removeObserversOf(self.ui.searchPointSelector.currentNode())
        self.updateButtons()

    def onSearchPointNodeChanged(self, markupsNode: Any) -> None:
        self.removeObserversOfClass("vtkMRMLMarkupsFiducialNode")
        if markupsNode is None:
            return
        self.ui.searchPointPlaceWidget.setCurrentNode(markupsNode)
        self.addObserver(markupsNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onSearchPointPlaced)
        self.addObserver(markupsNode, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onSearchPointMoved)

    def removeObserversOf(self, node: Any) -> None:
        if node is not None:
            for observed, event, method, *_rest in list(self.Observations):
                if observed is node:
                    self.removeObserver(observed, event, method)

    def removeObserversOfClass(self, className: str) -> None:
        for observed, event, method, *_rest in list(self.Observations):
            if observed is not None and observed.IsA(className):
                self.removeObserver(observed, event, method)

    def onSearchPointPlaced(self, markupsNode: Any, event: Any) -> None:
        """A click placed a new point: it is the query; the older points go (after this event is handled)."""
        self.onSearchPointMoved(markupsNode, event)
        if self.searchActive and markupsNode.GetNumberOfControlPoints() > 1:
            qt.QTimer.singleShot(0, lambda: self.keepOnlyLastPoint(markupsNode))

    @staticmethod
    def keepOnlyLastPoint(markupsNode: Any) -> None:
        while markupsNode.GetNumberOfControlPoints() > 1:
            markupsNode.RemoveNthControlPoint(0)

    def onSearchPointMoved(self, markupsNode: Any, event: Any) -> None:
        """Query the newest control point (the only one once older ones are removed) of the point list."""
        if not self.searchActive or markupsNode.GetNumberOfDefinedControlPoints() < 1:
            return
        try:
            self.searchRequest = self.logic.queryAtPoint(markupsNode, markupsNode.GetNumberOfControlPoints() - 1)
            self.ui.statusLabel.setText(_("Searching..."))
        except (KeyError, RuntimeError, ValueError) as error:
            self.ui.statusLabel.setText(str(error))

    def pollSearch(self) -> None:
        worker = self.logic.searchWorker
        if worker is None:
            return
        for event in worker.poll():
            kind = event["event"]
            if kind == "loaded":
                done, total = len(worker.loaded), len(self.logic.search.nodes)
                self.ui.statusLabel.setText(
                    _("Features ready: click a point in the input CT.") if done >= total
                    else _("CT-FM features computed for {0} of {1} volumes...").format(done, total))
            elif kind == "log":
                self.addLog(event.get("message", ""))
            elif kind == "result" and event.get("request") == self.searchRequest:
                self.ui.searchResultLabel.setText(self.logic.showSearchResult(event))
                self.ui.statusLabel.setText(self.logic.searchStatus(event))
            elif kind == "error":
                self.ui.statusLabel.setText(event.get("message", ""))
        if not worker.alive:
            message = worker.error.message if worker.error else _("The search worker stopped.")
            self.stopSearch()
            slicer.util.errorDisplay(message, windowTitle=_("CT-FM"))

    def onExportDicomSeg(self) -> None:
        segmentation = self.ui.segmentationOutputSelector.currentNode()
        with slicer.util.tryWithErrorDisplay(_("DICOM-SEG export failed."), waitCursor=True):
            folder = self.logic.exportDicomSeg(segmentation)
            self.ui.statusLabel.setText(_("DICOM-SEG written to {0} and added to the DICOM database.").format(folder))

    def onInstallDependencies(self) -> None:
        self.ensureDependencies(force=True)

    def onWeightsChanged(self, *unused: Any) -> None:
        self.ui.activeModelLabel.setText(_("(checked when a task starts)"))
        if self.logic is not None:
            self.logic.stopSearchWorker()
            self.searchActive = False
            self.updateButtons()

    # -- helpers --

    def ensureDependencies(self, force: bool = False) -> bool:
        """First use: offer to install the engine; False when it is not available."""
        engine = self.ui.engineSourcePathLineEdit.currentPath or None
        try:
            with slicer.util.WaitCursor():
                installed = self.logic.setupDependencies(
                    engine, confirm=lambda message: slicer.util.confirmOkCancelDisplay(message, _("CT-FM")))
            if installed:
                self.addLog(_("Installed: ") + ", ".join(installed))
            elif force:
                self.addLog(_("All CT-FM dependencies are installed."))
            return True
        except Exception as error:
            slicer.util.errorDisplay(str(error), windowTitle=_("CT-FM"))
            return False

    def weightsOptions(self) -> dict[str, Any]:
        source = WEIGHT_SOURCES[max(self.ui.weightsSourceComboBox.currentIndex, 0)]
        return {"source": source, "segmentationFolder": self.ui.segmentationWeightsPathLineEdit.currentPath or None,
                "searchFolder": self.ui.searchWeightsPathLineEdit.currentPath or None,
                "allowDownload": self.ui.allowDownloadCheckBox.checked}

    def device(self) -> str:
        return self.ui.deviceComboBox.currentText or "auto"

    def addLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)


class CTFMLogic(ScriptedLoadableModuleLogic):
    """All computation, callable without the widget: starts worker jobs and turns their results into MRML nodes
    (through ``CTFMLib.session``, which is tested without Slicer).

    No dialogs here: questions to the user come in as callbacks (``confirm``) from the widget.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback = logging.info
        self.search: Any = None  # CTFMLib.session.SearchSession while a search runs

    @staticmethod
    def pythonExecutable() -> str:
        """The interpreter of worker processes: PythonSlicer (Slicer's own Python with the same packages)."""
        return shutil.which("PythonSlicer") or jobs.default_python()

    def setupDependencies(self, engineSource: str | None = None, confirm: Any = None) -> list[str]:
        return install.ensure_dependencies(engineSource, confirm=confirm, log=self.logCallback)

    def chooseWeights(self, task: str, source: str = "auto", segmentationFolder: str | None = None,
                      searchFolder: str | None = None, allowDownload: bool = False) -> install.WeightsChoice:
        folder = segmentationFolder if task == "segmentation" else searchFolder
        return install.choose_weights(task, source, folder=folder, allow_download=allowDownload)

    @staticmethod
    def describeWeights(weights: dict[str, str] | None) -> str:
        from CTFMLib import session

        return session.describe_weights(weights)

    # -- segmentation --

    def startSegmentation(self, volumeNode: Any, weights: Any, device: str = "auto",
                          largestComponent: bool | None = None, skipCtCheck: bool = False) -> jobs.Job:
        from CTFMLib import mrml_adapters

        volume = mrml_adapters.volume_node_to_ctvolume(volumeNode, keep_small_integers=True)
        return jobs.start_segmentation(volume, weights, device, largest_component=largestComponent,
                                       skip_ct_check=skipCtCheck, python=self.pythonExecutable())

    def importSegmentation(self, result: dict[str, Any], volumeNode: Any, segmentationNode: Any = None) -> Any:
        """The labels as a segmentation node named after the input (or replacing ``segmentationNode``)."""
        from CTFMLib import session

        return session.import_segmentation(result, volumeNode, slicer.mrmlScene, replace=segmentationNode)

    def importMeasurements(self, result: dict[str, Any], volumeNode: Any, tableNode: Any = None) -> Any:
        """The organ measurements (volume, HU statistics per structure) as a table node named after the input (or
        replacing ``tableNode``); None when nothing was segmented."""
        from CTFMLib import session

        if tableNode is not None and slicer.mrmlScene.GetNodeByID(tableNode.GetID()) is None:
            tableNode = None  # removed by the user meanwhile
        return session.import_measurements(result, volumeNode, slicer.mrmlScene, replace=tableNode)

    @staticmethod
    def describeSegmentation(result: dict[str, Any]) -> str:
        from CTFMLib import session

        return session.describe_segmentation(result)

    # -- triage --

    def startTriage(self, volumeNode: Any, model: str | None = None, device: str = "auto",
                    threshold: float | None = None, acceptPartial: bool = False,
                    skipCtCheck: bool = False) -> jobs.Job:
        from CTFMLib import mrml_adapters

        volume = mrml_adapters.volume_node_to_ctvolume(volumeNode, keep_small_integers=True)
        return jobs.start_triage(volume, model, device, threshold=threshold, accept_partial=acceptPartial,
                                 skip_ct_check=skipCtCheck, python=self.pythonExecutable())

    @staticmethod
    def describeTriage(result: dict[str, Any]) -> str:
        from CTFMLib import session

        return session.describe_triage(result)

    @staticmethod
    def triageStatus(result: dict[str, Any]) -> str:
        from CTFMLib import session

        return session.triage_status(result)

    # -- semantic search --

    @property
    def searchWorker(self) -> jobs.SearchWorker | None:
        return None if self.search is None else self.search.worker

    @property
    def searchSource(self) -> Any:
        return None if self.search is None else self.search.source

    def startSearch(self, sourceNode: Any, targetNodes: list[Any], weights: Any, device: str = "auto",
                    cacheDir: str | None = None, topK: int = 3, skipCtCheck: bool = False) -> Any:
        """Start (or keep, when the settings are the same) the search session and send it the volumes it lacks."""
        from CTFMLib import session

        if self.search is not None and not (self.search.alive and self.search.matches(weights, device, cacheDir,
                                                                                       topK, skipCtCheck)):
            self.stopSearchWorker()
        if self.search is None:
            self.search = session.SearchSession(slicer.mrmlScene, weights, device, cache_dir=cacheDir, top_k=topK,
                                                skip_ct_check=skipCtCheck, python=self.pythonExecutable())
        self.search.set_volumes(sourceNode, targetNodes)
        return self.search

    def updateSearchTargets(self, targetNodes: list[Any]) -> None:
        """Search in ``targetNodes`` from now on (new volumes are sent to the worker)."""
        self.search.set_volumes(self.search.source, targetNodes)

    def queryAtPoint(self, markupsNode: Any, index: int = 0) -> int:
        """Ask the worker for control point ``index`` of ``markupsNode``; the request id of its answer."""
        return self.search.query(markupsNode, index)

    def showSearchResult(self, event: dict[str, Any]) -> str:
        """Heatmap per target, the best one overlaid, views on the best match; a summary."""
        return self.search.show_result(event)

    @staticmethod
    def searchStatus(event: dict[str, Any]) -> str:
        from CTFMLib import session

        return session.search_status(event)

    def stopSearchWorker(self) -> None:
        if self.search is not None:
            self.search.close()
        self.search = None

    # -- DICOM-SEG --

    def exportDicomSeg(self, segmentationNode: Any, folder: str | None = None) -> str:
        """Export through Slicer's DICOM module (DICOMSegmentationPlugin), which also adds the SEG to the DICOM
        database; the segmentation's reference volume must come from the database.  The folder the SEG was written
        to (default: a new folder under Slicer's temporary path; removed again when the export fails)."""
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        volumeNode = segmentationNode.GetNodeReference(role)
        if volumeNode is None:
            raise ValueError(f"{segmentationNode.GetName()}: the segmentation has no reference volume; DICOM-SEG "
                             f"export needs the CT it was made on")
        if not volumeNode.GetAttribute("DICOM.instanceUIDs"):
            raise ValueError(f"{volumeNode.GetName()}: DICOM-SEG export needs a volume loaded from the DICOM "
                             f"database; import the series in the DICOM module, load it from there, and segment it")
        try:
            import DICOMSegmentationPlugin
        except ImportError:  # Slicer < 5.12: the plugin comes with the QuantitativeReporting extension
            raise RuntimeError("DICOM-SEG export needs the QuantitativeReporting extension on this Slicer version: "
                               "install it from the Extensions Manager and restart Slicer") from None

        from CTFMLib import mrml_adapters

        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        mrml_adapters.place_in_study(segmentationNode, volumeNode)
        plugin = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
        exportables = plugin.examineForExport(hierarchy.GetItemByDataNode(segmentationNode))
        if not exportables:
            raise ValueError(f"{segmentationNode.GetName()}: Slicer's DICOM module cannot export this segmentation "
                             f"(are the CT's files still in the DICOM database?)")
        created = folder is None
        if created:
            import tempfile

            folder = tempfile.mkdtemp(prefix="CTFM-DICOM-SEG-", dir=slicer.app.temporaryPath)
        for exportable in exportables:
            exportable.directory = folder
            exportable.setTag("SeriesDescription", "CT-FM segmentation")
        error = plugin.export(exportables)
        if error:
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(error)
        return folder


class CTFMTest(ScriptedLoadableModuleTest):
    """Self-test on the bundled sample CT: segmentation, triage (skipped without a triage model) and search; the
    inference parts skip themselves when the dependencies or weights are absent (pip is never run in testing)."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_module_loads()
        self.test_segmentation()
        self.test_triage()
        self.test_search()

    def skipReason(self, task: str) -> str | None:
        missing = install.missing_requirements(install.read_requirements())
        if missing:
            return "missing " + ", ".join(missing)
        try:
            install.choose_weights(task, "auto")
        except Exception as error:
            return str(error)
        return None

    def sampleVolume(self) -> Any:
        import ctfm_engine

        path = Path(ctfm_engine.__file__).resolve().parent / "data" / "sample_ct.nii.gz"
        return slicer.util.loadVolume(str(path))

    def waitFor(self, job: jobs.Job, timeout: float = 600.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not job.finished and time.monotonic() < deadline:
            job.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertTrue(job.finished, f"job still {job.state} after {timeout} s")

    def test_module_loads(self) -> None:
        self.delayDisplay("CT-FM module and its logic load")
        self.assertIsNotNone(slicer.modules.ctfm)
        self.assertTrue(os.path.isfile(install.REQUIREMENTS_FILE))
        CTFMLogic()

    def test_segmentation(self) -> None:
        reason = self.skipReason("segmentation")
        if reason:
            self.delayDisplay(f"segmentation skipped: {reason}")
            return
        volume = self.sampleVolume()
        logic = CTFMLogic()
        job = logic.startSegmentation(volume, logic.chooseWeights("segmentation").folder, "cpu")
        self.waitFor(job)
        self.assertEqual(job.state, "done", job.error)
        segmentation = logic.importSegmentation(job.result, volume)
        self.assertEqual(segmentation.GetName(), f"{volume.GetName()} segmentation")
        table = logic.importMeasurements(job.result, volume)
        self.assertEqual(table.GetNumberOfRows(), segmentation.GetSegmentation().GetNumberOfSegments())
        self.assertGreater(segmentation.GetSegmentation().GetNumberOfSegments(), 0)
        algorithm = vtk.mutable("")
        self.assertTrue(segmentation.GetSegmentation().GetNthSegment(0).GetTag("DICOM.SegmentAlgorithmType", algorithm))
        self.assertEqual(str(algorithm), "AUTOMATIC")
        with self.assertRaises(ValueError):  # the sample is a NIfTI file, not a series of the DICOM database
            logic.exportDicomSeg(segmentation)
        self.delayDisplay("segmentation passed")

    def test_triage(self) -> None:
        reason = self.skipReason("search")  # the packages; no triage model ships, it comes from the environment
        if reason or not os.environ.get("CTFM_TRIAGE_WEIGHTS"):
            self.delayDisplay(f"triage skipped: {reason or 'no triage model (set CTFM_TRIAGE_WEIGHTS)'}")
            return
        job = CTFMLogic().startTriage(self.sampleVolume(), None, "cpu")
        self.waitFor(job)
        # the sample is an abdomen: the input screen must refuse it before the model runs
        self.assertEqual((job.state, job.error.exit_code), ("failed", 3))
        self.delayDisplay("triage refused a non-head CT, as it must")

    def test_search(self) -> None:
        reason = self.skipReason("search")
        if reason:
            self.delayDisplay(f"search skipped: {reason}")
            return
        import time

        volume = self.sampleVolume()
        logic = CTFMLogic()
        logic.startSearch(volume, [volume], logic.chooseWeights("search").folder, "cpu")
        worker = logic.searchWorker
        try:
            deadline = time.monotonic() + 300
            while len(worker.loaded) < 1 and worker.alive and time.monotonic() < deadline:
                worker.poll()
                slicer.app.processEvents()
                time.sleep(0.05)
            bounds = [0.0] * 6
            volume.GetRASBounds(bounds)
            centre = [(bounds[2 * axis] + bounds[2 * axis + 1]) / 2 for axis in range(3)]
            markups = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "query")
            markups.AddControlPointWorld(vtk.vtkVector3d(*centre))
            request = logic.queryAtPoint(markups)
            while request not in worker.results and request not in worker.errors and worker.alive:
                worker.poll()
                slicer.app.processEvents()
                time.sleep(0.02)
            self.assertIn(request, worker.results)
            summary = logic.showSearchResult(worker.results[request])
            self.assertIn("cosine", summary)
            self.assertIsNotNone(slicer.mrmlScene.GetFirstNodeByName(f"{volume.GetName()} similarity"))
        finally:
            logic.stopSearchWorker()
        self.delayDisplay("search passed")
