"""``ctfm triage``: head-CT triage -- the probability of an abnormal finding, a decision, and what the input check
found."""

from __future__ import annotations

import argparse
from typing import Any

from ctfm_engine.cli.common import add_runtime_options, check_onnx_option, device, scan_source, weights_lines
from ctfm_engine.errors import UsageError


def add_parser(commands: Any, common: argparse.ArgumentParser, inputs: argparse.ArgumentParser) -> None:
    triage = commands.add_parser("triage", parents=[common, inputs],
                                 help="head-CT triage: probability of an abnormal finding, and a decision")
    triage.add_argument("input", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder of a head CT")
    triage.add_argument("--model", help="triage checkpoint folder exported by `ctfm finetune`, or a hub repo id "
                        "(default: CTFM_TRIAGE_WEIGHTS, then <cache>/models/triage; none ships with ctfm)")
    triage.add_argument("--threshold", type=float, help="abnormal when probability >= this (default: the one "
                        "the checkpoint records, else 0.5)")
    triage.add_argument("--accept-partial", action="store_true", help="judge a head CT that covers less than a "
                        "whole head along S (refused by default: a normal call would not cover the missing part)")
    add_runtime_options(triage, "probability stays within 0.001 of")

def run(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.pipelines.triage import TriageRequest, run_triage

    check_onnx_option(args)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold {args.threshold}: give a probability between 0 and 1")
    outcome = run_triage(TriageRequest(
        scan_source(args.input, args), weights=args.model, threshold=args.threshold,
        accept_partial=args.accept_partial, backend=args.backend, onnx_file=args.onnx, device=device(args),
        precision=args.precision))
    result = outcome.result
    return {
        "command": "triage",
        "input": str(args.input),
        "series_instance_uid": result.series_instance_uid,
        "probability": result.probability,
        "logit": result.logit,
        "decision": result.decision,
        "threshold": result.threshold,
        "threshold_source": outcome.threshold_source,
        "checks": result.checks,
        "weights": outcome.weights,
        "backend": outcome.backend,
        "runtime": None if outcome.runtime is None else outcome.runtime.describe(),
        "device": outcome.device,
        "preprocessing": outcome.preprocessing,
        "seconds": round(outcome.seconds, 2),
    }


def human_lines(document: dict[str, Any]) -> list[str]:
    checks = document["checks"]
    return [*weights_lines(document),
            f"{document['input']}: {document['decision'].upper()}, probability of an abnormal finding "
            f"{document['probability']:.3f} (threshold {document['threshold']:g}, {document['threshold_source']}; "
            f"{document['backend']})",
            "head check: cranium over {:.0f} mm along S, {:.0f} mm wide inside; scan covers {:.0f} x {:.0f} x "
            "{:.0f} mm (S, P, L)".format(checks["skull_extent_mm"], checks["cranial_width_mm"], *checks["coverage_mm"]),
            *(f"note: {note}" for note in checks["notes"])]
