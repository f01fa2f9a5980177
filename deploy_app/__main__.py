"""``python -m deploy_app -i DICOM_DIR -o OUT_DIR [-m MODEL] [options]``: run the CT-FM application once.
``python -m deploy_app serve ...`` / ``status --spool DIR``: the DICOM node (see deploy_app/node/cli.py).

    -m MODEL           the segmentation model: a checkpoint folder, a hub repo id found in the cache (as
                       `ctfm weights pull` leaves it), or a MAP models folder holding segmentation/ (and triage/)
                       (HOLOSCAN_MODEL_PATH); default: the engine's weights policy (CTFM_SEG_WEIGHTS, the published
                       whole_body_segmentation in the cache, then the bundled demonstration model -- announced in
                       the log and flagged "demonstration": true in ctfm-results.json and the DICOM-SEG)

Options beyond the MONAI Deploy SDK's ``-i/-o/-w/-l`` (each also read from an environment variable, so a MAP
can be configured without changing its command line):

    --encoding E       DICOM-SEG encoding: binary (default), binary-j2k, labelmap, labelmap-rle, labelmap-jpegls
                       (CTFM_SEG_ENCODING)
    --triage-model D   also triage the CT with this checkpoint (folder or hub repo id) and write a DICOM SR
                       (CTFM_TRIAGE_MODEL)
    --triage-accept-partial
                       judge a head CT that covers less than a whole head along S (CTFM_TRIAGE_ACCEPT_PARTIAL=1)
    --skip-ct-check    read the series even when its intensities do not look like CT in Hounsfield units (for a true
                       CT that fails the check, e.g. a crop of pure soft tissue); results on non-CT data are
                       meaningless (CTFM_SKIP_CT_CHECK=1)
    --no-largest-component
                       keep every island of every structure; by default the published whole_body_segmentation
                       keeps the largest connected component of each, as its model card (CTFM_NO_LARGEST_COMPONENT=1)
    --spacing S        the voxel size the model sees: native (the series' own, as the model card) or MM; default:
                       the spacing the model was trained at (CTFM_SPACING)
    --no-measurements-sr
                       write no measurement SR; by default each structure's volume (mL) and HU statistics (mean, SD,
                       median, min, max, 5/25/75/95th percentiles, on the series' grid) go into
                       ctfm-measurements-sr.dcm, a TID 1500 Comprehensive 3D SR referencing the DICOM-SEG's segments
                       and the series, published and sent with the SEG (CTFM_NO_MEASUREMENTS_SR=1)
    --pacs URL         send the results: http://HOST:PORT/dicom-web or dicom://AET@HOST:PORT (CTFM_PACS_URL)
    --rules FILE       series selection rules, JSON (CTFM_SELECTION_RULES; default deploy_app/selection_rules.json)
    --device D         cpu (default), cuda, cuda:N or auto (CTFM_DEVICE)

The runtime that segments (and triages) is chosen by measurement on the first study, as `ctfm segment --backend
auto` does: the fastest of PyTorch, onnxruntime and OpenVINO (and bf16 where it agrees with fp32 to 0.999 of the
foreground voxels), cached in the ctfm cache (CTFM_CACHE; keep it on a writable volume so that only the first study
pays for the measurement).  CTFM_BACKEND=torch|onnx|openvino pins one.

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
    from ctfm_engine.pipelines.segmentation import SEG_ENCODINGS
    from deploy_app.app import DEFAULT_RULES

    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m deploy_app", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--encoding", choices=SEG_ENCODINGS, default=env("CTFM_SEG_ENCODING") or "binary")
    parser.add_argument("-m", "--model", default=env("HOLOSCAN_MODEL_PATH") or None)
    parser.add_argument("--triage-model", default=env("CTFM_TRIAGE_MODEL") or None)
    parser.add_argument("--triage-accept-partial", action="store_true",
                        default=env("CTFM_TRIAGE_ACCEPT_PARTIAL", "").lower() in ("1", "true", "yes"))
    parser.add_argument("--skip-ct-check", action="store_true",
                        default=env("CTFM_SKIP_CT_CHECK", "").lower() in ("1", "true", "yes"))
    parser.add_argument("--no-largest-component", action="store_true",
                        default=env("CTFM_NO_LARGEST_COMPONENT", "").lower() in ("1", "true", "yes"))
    parser.add_argument("--spacing", default=env("CTFM_SPACING") or None)
    parser.add_argument("--no-measurements-sr", action="store_true",
                        default=env("CTFM_NO_MEASUREMENTS_SR", "").lower() in ("1", "true", "yes"))
    parser.add_argument("--pacs", default=env("CTFM_PACS_URL") or None)
    parser.add_argument("--rules", type=Path, default=env("CTFM_SELECTION_RULES") or DEFAULT_RULES)
    parser.add_argument("--device", default=env("CTFM_DEVICE") or "cpu")
    return parser.parse_known_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["serve"], ["status"], ["requeue"]):  # the DICOM node (deploy_app/node)
        from deploy_app.node.cli import main as node_main

        return node_main(argv)
    options, rest = parse(argv)
    if options.help:
        print(__doc__)
        print("MONAI Deploy SDK options: -i INPUT -o OUTPUT -w WORKDIR -l LOG_LEVEL")
        return 0
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "ERROR")
    from monai.deploy.core import Application

    from ctfm_engine.errors import UsageError, guarded

    try:
        context = Application.init_app_context(["deploy_app", *rest])
    except SystemExit as error:  # argparse of the SDK: a usage error
        return error.code if isinstance(error.code, int) else 2
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied module: noise here
    input_folder, output = Path(context.input_path), Path(context.output_path)

    def run() -> list[Path]:
        from deploy_app.app import AppSettings, CTFMSegmentationApp, model_folders
        from deploy_app.operators import RunRecord

        if not input_folder.is_dir():
            raise UsageError(f"-i {input_folder}: give the folder that holds the DICOM files (one or more series)")
        if not options.rules.is_file():
            raise UsageError(f"--rules {options.rules}: no such file")
        from ctfm_engine.pipelines.segmentation import spacing_choice

        spacing_choice(options.spacing)  # a bad --spacing is a usage error before any series is read
        segmentation_model, triage_model = model_folders(options.model)
        settings = AppSettings(input=input_folder, output=output, segmentation_model=segmentation_model,
                               triage_model=options.triage_model or triage_model, encoding=options.encoding,
                               pacs_url=options.pacs, rules_file=options.rules, device=options.device,
                               triage_accept_partial=options.triage_accept_partial,
                               skip_ct_check=options.skip_ct_check,
                               largest_component=False if options.no_largest_component else None,
                               spacing=options.spacing, measurements_sr=not options.no_measurements_sr)
        output.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".ctfm-staging-", dir=output))
        try:
            record = RunRecord(output=output, staging=staging)
            CTFMSegmentationApp(settings, record).run()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return record.published

    def report(code: int, message: str, error: BaseException) -> None:
        print(f"deploy_app: error: {message}", file=sys.stderr)

    from deploy_app.operators import REMEDIES

    code, published = guarded(run, report, remedies=REMEDIES, log=log)
    for path in published or []:
        print(path)
    return code


if __name__ == "__main__":
    sys.exit(main())
