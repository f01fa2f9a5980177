"""``python -m deploy_app -i DICOM_DIR -o OUT_DIR [-m MODEL_DIR] [options]``: run the CT-FM application once.

Options beyond the MONAI Deploy SDK's ``-i/-o/-m/-w/-l`` (each also read from an environment variable, so a MAP
can be configured without changing its command line):

    --encoding E       DICOM-SEG encoding: binary (default), binary-j2k, labelmap, labelmap-rle, labelmap-jpegls
                       (CTFM_SEG_ENCODING)
    --triage-model D   also triage the CT with this checkpoint and write a DICOM SR (CTFM_TRIAGE_MODEL)
    --pacs URL         send the results: http://HOST:PORT/dicom-web or dicom://AET@HOST:PORT (CTFM_PACS_URL)
    --rules FILE       series selection rules, JSON (CTFM_SELECTION_RULES; default deploy_app/selection_rules.json)
    --device D         cpu (default), cuda, cuda:N or auto (CTFM_DEVICE)

Exit codes are the engine's: 0 done; 2 usage; 3 the input is not acceptable (no CT series, localiser only, MR,
truncated or duplicated files, ...); 4 model problem; 1 anything else, including a PACS that is down or refuses
the results (they stay in OUT_DIR and in its outbox; ``ctfm pacs outbox OUT_DIR --send URL`` delivers them later).
A failed run leaves nothing new in OUT_DIR except, when only the delivery failed, the finished results.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("deploy_app")


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    from deploy_app.app import DEFAULT_RULES, ENCODINGS

    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m deploy_app", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--encoding", choices=ENCODINGS, default=env("CTFM_SEG_ENCODING") or "binary")
    parser.add_argument("--triage-model", type=Path, default=env("CTFM_TRIAGE_MODEL") or None)
    parser.add_argument("--pacs", default=env("CTFM_PACS_URL") or None)
    parser.add_argument("--rules", type=Path, default=env("CTFM_SELECTION_RULES") or DEFAULT_RULES)
    parser.add_argument("--device", default=env("CTFM_DEVICE") or "cpu")
    return parser.parse_known_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, rest = parse(argv)
    if options.help:
        print(__doc__)
        print("MONAI Deploy SDK options: -i INPUT -o OUTPUT -m MODEL -w WORKDIR -l LOG_LEVEL")
        return 0
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "ERROR")
    from monai.deploy.core import Application

    from ctfm_engine.errors import CTFMError, UsageError

    try:
        context = Application.init_app_context(["deploy_app", *rest])
    except SystemExit as error:  # argparse of the SDK: a usage error
        return error.code if isinstance(error.code, int) else 2
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied module: noise here
    staging: Path | None = None
    try:
        from deploy_app.app import AppSettings, CTFMSegmentationApp, model_folders
        from deploy_app.operators import RunRecord

        input_folder, output = Path(context.input_path), Path(context.output_path)
        if not input_folder.is_dir():
            raise UsageError(f"-i {input_folder}: give the folder that holds the DICOM files (one or more series)")
        if not options.rules.is_file():
            raise UsageError(f"--rules {options.rules}: no such file")
        model_path = Path(context.model_path) if context.model_path and Path(context.model_path).exists() else None
        segmentation_model, triage_model = model_folders(model_path)
        settings = AppSettings(input=input_folder, output=output, segmentation_model=segmentation_model,
                               triage_model=options.triage_model or triage_model, encoding=options.encoding,
                               pacs_url=options.pacs, rules_file=options.rules, device=options.device)
        output.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".ctfm-staging-", dir=output))
        record = RunRecord(output=output, staging=staging)
        CTFMSegmentationApp(settings, record).run()
    except CTFMError as error:
        print(f"deploy_app: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("deploy_app: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except Exception as error:  # a bug, not a user error: one line, the traceback at DEBUG
        log.debug("traceback", exc_info=True)
        print(f"deploy_app: error: unexpected {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    for path in record.published:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
