"""The ``ctfm`` command: a thin face over the task layer (:mod:`ctfm_engine.pipelines`).

One module per subcommand -- embed, search, ocd, segment, triage, export, saliency, concept_map, index, dicom, pacs,
weights, training (pretrain, finetune), demo -- each with ``add_parser(commands, common, inputs)``, ``run(args)``
returning the ``--json`` document and ``human_lines(document)``; :mod:`ctfm_engine.cli.common` holds what they
share.  :func:`main` runs the chosen one inside :func:`ctfm_engine.errors.guarded`, the one boundary handler, and
words the engine's remedies as flags.

Exit codes: 0 success, 2 usage error, 3 unacceptable input data, 4 model or weights problem, 130 interrupted,
1 anything else.  With ``--json`` one JSON document goes to stdout (also on failure: ``{"error": {...}}``); logs and
progress go to stderr, and using a bundled demonstration model is announced there even with ``--quiet``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from ctfm_engine import __version__
from ctfm_engine.cli import (
    concept_map,
    demo,
    dicom,
    embed,
    export,
    index,
    ocd,
    pacs,
    saliency,
    search,
    segment,
    training,
    triage,
    weights,
)
from ctfm_engine.cli.common import common_options, input_options
from ctfm_engine.errors import CTFMError, guarded

log = logging.getLogger("ctfm")

# Subcommand -> the module that parses, runs and prints it (in the order `ctfm --help` lists them).
SUBCOMMANDS: dict[str, ModuleType] = {
    "embed": embed,
    "search": search,
    "ocd": ocd,
    "weights": weights,
    "index": index,
    "dicom": dicom,
    "pacs": pacs,
    "pretrain": training,
    "finetune": training,
    "segment": segment,
    "triage": triage,
    "export": export,
    "saliency": saliency,
    "concept-map": concept_map,
    "demo": demo,
}

# The engine's remedy keys (see ctfm_engine.errors) in the command line's words.
REMEDIES = {"accept_partial": "pass --accept-partial to judge it anyway",
            "spacing": "pass a coarser --spacing (e.g. 1.5)",
            "segmentation_encoder": "use an encoder checkpoint (project-lighter/ct_fm_feature_extractor); "
                                    "ctfm embed and ctfm search take --allow-segmentation-encoder to use it anyway",
            "ct_check": "if it is a CT in Hounsfield units, pass --skip-ct-check to read it anyway",
            "hu_offset": "pass --hu-offset -1024 to add the missing rescale, or --skip-ct-check if it is in "
                         "Hounsfield units already"}

# The logger that announces a bundled demonstration model: heard even with --quiet.
WEIGHTS_LOGGER = "ctfm_engine.weights"


def build_parser() -> argparse.ArgumentParser:
    common, inputs = common_options(), input_options()
    parser = argparse.ArgumentParser(prog="ctfm", description="CT-FM, the CT foundation model, on your CT scans.")
    parser.add_argument("--version", action="version", version=f"ctfm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in dict.fromkeys(SUBCOMMANDS.values()):
        module.add_parser(commands, common, inputs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    face = SUBCOMMANDS[args.command]

    def report(code: int, message: str, error: BaseException) -> None:
        if not isinstance(error, (CTFMError, KeyboardInterrupt)):
            message = f"{message} (run with -v for the traceback)"
        print(f"ctfm: error: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"exit_code": code, "message": message},
                              **(getattr(error, "document", None) or {})}))

    with _logging_on_stderr(verbose=args.verbose, quiet=args.quiet):
        code, document = guarded(lambda: face.run(args), report, remedies=REMEDIES, log=log)
    if document is None:
        return code
    print(json.dumps(document) if args.json else "\n".join(face.human_lines(document)))
    return 0


@contextmanager
def _logging_on_stderr(*, verbose: bool, quiet: bool) -> Iterator[None]:
    """Log lines as ``ctfm: MESSAGE`` on stderr for one run: debug with -v, errors only with -q -- except the
    demonstration-model notice, which is never silent.  Levels and handlers are restored afterwards, so ``main``
    can run many times in one process."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ctfm: %(message)s"))
    quieted = {WEIGHTS_LOGGER: logging.WARNING if quiet else logging.NOTSET}
    if not verbose:
        quieted["highdicom"] = logging.WARNING  # one INFO line per copied DICOM module
    saved: dict[str, Any] = {name: logging.getLogger(name).level for name in quieted}
    saved_root = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO)
    for name, level in quieted.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_root)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
