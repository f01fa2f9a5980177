"""Head-CT triage: the probability that a head CT shows an abnormal finding, and the decision at a threshold.

Order (inputs are judged before any model is loaded): :func:`require_head_ct` screens the scan on CT-FM's head-CT
grid and refuses what the classifier cannot judge (no cranium, the cranium outside the model's field of view, less
than a whole head along S); :func:`load_triage_model` reads the checkpoint strictly; :func:`triage` preprocesses the
scan on the checkpoint's grid and runs one forward pass: probability = sigmoid(logit), abnormal when
probability >= threshold.  No triage model ships with ctfm: one comes from ``ctfm finetune`` with a triage recipe.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ctfm_engine.errors import InputError, ModelError
from ctfm_engine.head_ct import (
    HEAD_CT_PREPROCESSING,
    MIN_HEAD_COVERAGE_MM,
    HeadCTCheck,
    HeadCTInput,
    HeadCTPreprocessing,
    check_head,
    head_ct_hu,
    head_ct_input,
    window_stack,
)
from ctfm_engine.models.checkpoint import CONFIG_FILE, Checkpoint, load_state_strict, read_checkpoint
from ctfm_engine.models.registry import TRIAGE_RECIPE
from ctfm_engine.models.triage import TriageClassifier
from ctfm_engine.progress import CancelCheck, Progress, check_cancelled
from ctfm_engine.runtime.backends import Backend
from ctfm_engine.volume import CTVolume

DEFAULT_THRESHOLD = 0.5
# Preprocessed and classified: the two stages a progress callback hears about.
STAGES = 2


def load_triage_model(weights: str | Path) -> tuple[TriageClassifier, Checkpoint]:
    """The classifier in eval mode with every weight of ``weights`` loaded, and its checkpoint.

    ModelError (exit code 4) naming the folder for an encoder-only or segmentation checkpoint, a config that does
    not describe a one-logit triage classifier, or weights that do not fit it.
    """
    checkpoint = read_checkpoint(weights)
    folder, keys = checkpoint.folder, checkpoint.state_dict
    if any(key.startswith("up_layers.") for key in keys):
        raise ModelError(f"{folder}: is a segmentation checkpoint (encoder and decoder), not a head-CT triage "
                         f"classifier; pass a folder exported by `ctfm finetune` with a triage recipe")
    if not any(key.startswith("head.") for key in keys):
        raise ModelError(f"{folder}: holds an encoder without a classifier head, not a head-CT triage classifier; "
                         f"fine-tune one from it with `ctfm finetune --config {TRIAGE_RECIPE} --set "
                         f"model.encoder_weights={folder.resolve()}`")
    if int(checkpoint.config.get("out_features", 1)) != 1:
        raise ModelError(f"{folder / CONFIG_FILE}: the classifier gives {checkpoint.config['out_features']} outputs; "
                         f"a head-CT triage model gives one logit (abnormal)")
    try:
        network = TriageClassifier(**checkpoint.config)
    except (TypeError, ValueError) as error:
        raise ModelError(f"{folder / CONFIG_FILE}: not a triage classifier configuration ({error})") from None
    load_state_strict(network, keys, str(folder))
    return network.eval(), checkpoint


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float; ValueError unless it is a probability in [0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the threshold must be a probability between 0 and 1, got {threshold!r}")
    return float(threshold)


def decision_threshold(network: TriageClassifier, requested: float | None = None) -> tuple[float, str]:
    """(threshold, where it came from): ``requested``, else the one the checkpoint records, else 0.5."""
    if requested is not None:
        return check_threshold(requested), "requested"
    if network.threshold is not None:
        return network.threshold, "checkpoint"
    return DEFAULT_THRESHOLD, "default"


def require_head_ct(volume: CTVolume, *, accept_partial: bool = False) -> HeadCTInput:
    """The scan on CT-FM's head-CT grid (5x2x2 mm, 240x256x256 mm), once it is a head CT the classifier can judge.

    The screen runs on this fixed grid whatever the checkpoint's, so a coarse model's grid cannot hide a cranium.
    InputError (exit code 3) naming the file when the scan shows no cranium (an abdomen, a neck, a chest), when
    the cranium lies outside the centre-cropped field of view the model sees (e.g. a whole-body scan), or, unless
    ``accept_partial``, when it covers less than a whole head along S: a "normal" call would then say nothing
    about the brain outside the scan.  A field of view that leaves out some of a long scan is only a note.
    """
    preprocessing = HEAD_CT_PREPROCESSING
    hu, grid, checks = head_ct_hu(volume, preprocessing)
    _refuse_unless_judgeable(volume.source, checks, accept_partial)
    if any(checks.cropped_away_mm):
        in_view = check_head(hu, preprocessing.spacing_zyx_mm, checks.coverage_mm, preprocessing, checks.modality)
        if not in_view.looks_like_head:
            raise InputError("{}: the cranium lies outside the {:.0f} x {:.0f} x {:.0f} mm the triage model sees "
                             "(the scan covers {:.0f} x {:.0f} x {:.0f} mm along S, P, L and is cropped to its "
                             "centre); give the head series alone or crop the scan to the head"
                             .format(volume.source, *preprocessing.field_of_view_mm, *checks.coverage_mm))
    return HeadCTInput(window_stack(hu, preprocessing.windows), grid, volume.grid, preprocessing, checks)


def _refuse_unless_judgeable(source: str, checks: HeadCTCheck, accept_partial: bool) -> None:
    if not checks.looks_like_head:
        raise InputError(f"{source}: not a head CT: {'; '.join(checks.reasons)}; head-CT triage judges scans of "
                         f"the head only")
    if checks.coverage_mm[0] < MIN_HEAD_COVERAGE_MM and not accept_partial:
        raise InputError(f"{source}: covers only {checks.coverage_mm[0]:.0f} mm along S, less than a whole head "
                         f"(about 120-200 mm), so a normal result would say nothing about the brain outside the "
                         f"scan; give the full head series", remedy="accept_partial")


def triage_input(
    volume: CTVolume,
    preprocessing: HeadCTPreprocessing = HEAD_CT_PREPROCESSING,
    *,
    screened: HeadCTInput | None = None,
    accept_partial: bool = False,
) -> HeadCTInput:
    """The classifier's input on ``preprocessing``'s grid, after :func:`require_head_ct` (or its ``screened``
    result, when the caller already has it).  Its checks are the screen's, with the field-of-view notes of
    ``preprocessing``'s grid."""
    if screened is None:
        screened = require_head_ct(volume, accept_partial=accept_partial)
    if preprocessing == screened.preprocessing:
        return screened
    model_input = head_ct_input(volume, preprocessing)
    checks = replace(screened.checks, cropped_away_mm=model_input.checks.cropped_away_mm,
                     notes=model_input.checks.notes)
    return replace(model_input, checks=checks)


@dataclass(frozen=True)
class TriageResult:
    """One scan's triage: the network's logit, probability = sigmoid(logit), and the decision at ``threshold``."""

    input: str
    series_instance_uid: str | None
    logit: float
    probability: float
    threshold: float
    checks: dict[str, Any]

    @property
    def decision(self) -> str:
        """``abnormal`` when probability >= threshold, else ``normal``."""
        return "abnormal" if self.probability >= self.threshold else "normal"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decision": self.decision}


def triage(
    volume: CTVolume,
    backend: Backend,
    preprocessing: HeadCTPreprocessing = HEAD_CT_PREPROCESSING,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    model_input: HeadCTInput | None = None,
    accept_partial: bool = False,
    progress: Progress | None = None,
    cancel: CancelCheck | None = None,
) -> TriageResult:
    """Triage ``volume`` with ``backend`` (a triage network: (1, 1, 4*z, y, x) -> one logit).

    ``preprocessing`` is the checkpoint's grid (``TriageClassifier.preprocessing``); ``model_input`` may carry
    :func:`triage_input`'s result when the caller already has it.  Non-head scans are refused (InputError) before
    the backend runs.  ``progress(done, 2)`` hears of the two stages (preprocessed, classified); ``cancel`` is
    checked before each and raises :class:`~ctfm_engine.progress.Cancelled`.
    """
    threshold = check_threshold(threshold)
    check_cancelled(cancel)
    if model_input is None:
        model_input = triage_input(volume, preprocessing, accept_partial=accept_partial)
    elif model_input.preprocessing != preprocessing:
        raise ValueError("model_input was preprocessed on another grid than the model's")
    else:
        _refuse_unless_judgeable(volume.source, model_input.checks, accept_partial)
    if progress is not None:
        progress(1, STAGES)
    check_cancelled(cancel)
    logits = backend(torch.from_numpy(model_input.image)[None, None]).detach().reshape(-1).cpu()
    if logits.numel() != 1:
        raise ModelError(f"{backend.name}: the network gave {logits.numel()} outputs for one scan; a head-CT triage "
                         f"model gives one logit")
    logit = float(logits[0])
    if not math.isfinite(logit):
        raise ModelError(f"{backend.name}: the network's logit is {logit} on {volume.source}; the weights are broken")
    probability = float(torch.sigmoid(torch.tensor(logit, dtype=torch.float64)))
    if progress is not None:
        progress(2, STAGES)
    return TriageResult(volume.source, volume.series_instance_uid, logit, probability, threshold,
                        model_input.checks.as_dict())
