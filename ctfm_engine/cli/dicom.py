"""``ctfm dicom``: the series of a DICOM folder, which one the selection rules pick, and why the others are skipped."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ctfm_engine.errors import InputError, UsageError

log = logging.getLogger("ctfm")


def add_parser(commands: Any, common: argparse.ArgumentParser, inputs: argparse.ArgumentParser) -> None:
    dicom = commands.add_parser("dicom", parents=[common], help="list the series of a DICOM folder (any number of "
                                "studies) and which one the selection rules pick, with why the others are skipped")
    dicom.add_argument("folder", metavar="FOLDER", type=Path)
    dicom.add_argument("--rules", type=Path, metavar="FILE.json", help="selection rules (default: CT, axial, "
                       "ORIGINAL, no localisers, >= 10 slices; the keys of deploy_app/selection_rules.json)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.dicom.selection import SelectionRules, list_series, reasons_against, select_candidates

    if not args.folder.is_dir():
        raise UsageError(f"{args.folder}: not a folder; give the folder that holds the DICOM files")
    rules = SelectionRules.from_file(args.rules) if args.rules is not None else SelectionRules()
    candidates = list_series(args.folder)
    try:
        selection = select_candidates(candidates, rules, source=str(args.folder))
        chosen, reasons = selection.chosen, {id(candidate): reason for candidate, reason in selection.skipped}
    except InputError as error:
        log.warning("%s", error)
        chosen = None
        reasons = {id(candidate): ", ".join(reasons_against(candidate, rules)) for candidate in candidates}
    rows = [{**{key: value for key, value in candidate.as_dict().items() if key != "files"},
             "reason": None if candidate is chosen else reasons.get(id(candidate))} for candidate in candidates]
    return {"command": "dicom", "folder": str(args.folder), "rules": rules.as_dict(), "series": rows,
            "chosen": None if chosen is None else {key: value for key, value in chosen.as_dict().items()
                                                   if key != "files"}}


def human_lines(document: dict[str, Any]) -> list[str]:
    chosen = document.get("chosen")
    lines = []
    for row in document["series"]:
        mark = "*" if chosen and row["series_id"] == chosen["series_id"] else " "
        lines.append(f"{mark} {row['series_id']}  {row['modality']:<3} {row['instances']:>4} images  "
                     f"{row.get('description') or ''!s:<28} {row.get('reason') or ''}")
    lines.append("* = the series the MONAI Deploy app would process (other commands: pass its id to --series)"
                 if chosen else "no series meets the rules")
    return lines
