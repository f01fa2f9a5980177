"""What the MONAI Deploy application adds to the model's own inference time, on a real DICOM series.

Side by side in one run, on the same series and the same checkpoint:

- reference: the model's own inference -- ``ctfm_engine.tasks.segment.segment`` on the already-read volume
  (preprocessing, sliding window, labels back on the source grid), in this process;
- the app: ``python -m deploy_app -i SERIES -o OUT`` in a child process, exactly as a hospital runs it, with the
  deploy environment's Python (.venv-deploy, made by ``make test``): Holoscan start-up, series selection, DICOM
  reading (JPEG 2000 decoding), segmentation, DICOM-SEG writing.

It prints the app's stage times (from its ``ctfm-results.json``), the in-graph total and the process wall time,
each as a ratio to the reference inference time.  Goal: I/O and DICOM work add less than 30 % on CPU.

    .venv/bin/python benchmarks/deploy_app.py                          # ts_abdomen (512x512x20, JPEG 2000)
    .venv/bin/python benchmarks/deploy_app.py --model published        # CT-FM's full-size segmentation network
    .venv/bin/python benchmarks/deploy_app.py --input DICOM_DIR --encoding labelmap-rle
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ctfm_engine.dicom.series import read_dicom_series
from ctfm_engine.models.segmentation import inference_network
from ctfm_engine.runtime.backends import TorchBackend
from ctfm_engine.tasks.segment import open_segmentation_model, segment

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data"
SERIES = SHARED / "dicom" / "ts_abdomen_20slices_j2k"
SHIPPED = ROOT / "ctfm_engine" / "weights" / "ctfm-mini-wholebody-seg"
DEPLOY_PYTHON = ROOT / ".venv-deploy" / "bin" / "python"


def published_size_checkpoint(folder: Path) -> Path:
    """CT-FM's whole-body segmentation network at its published size (init_filters 32, 118 classes), random
    weights: its timings are the published model's, its labels mean nothing."""
    from monai.networks.nets import SegResNetDS

    from ctfm_engine.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": 118, "init_filters": 32,
              "blocks_down": [1, 2, 2, 4, 4], "dsdepth": 4}
    network = SegResNetDS(**config)
    save_checkpoint(network, folder, config)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=SERIES, help="a DICOM series folder")
    parser.add_argument("--model", default="shipped", help="'shipped', 'published' or a checkpoint folder")
    parser.add_argument("--encoding", default="binary")
    args = parser.parse_args()
    if not DEPLOY_PYTHON.is_file():
        sys.exit(f"the app runs in its own environment and {DEPLOY_PYTHON} is missing: make .venv-deploy/.installed")
    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix="ctfm-deploy-bench-"))
    if args.model == "shipped":
        model_path = SHIPPED
    elif args.model == "published":
        model_path = published_size_checkpoint(work / "published-size")
    else:
        model_path = Path(args.model)

    volume = read_dicom_series(args.input)
    model = open_segmentation_model(model_path)
    module, head = inference_network(model.network)
    started = time.perf_counter()
    reference = segment(volume, preprocessing=model.preprocessing, roi_size_zyx=model.roi_size_zyx,
                        overlap=model.overlap, backend=TorchBackend(module, "cpu"), head=head)
    inference = time.perf_counter() - started
    del reference

    out = work / "out"
    started = time.perf_counter()
    child = subprocess.run([DEPLOY_PYTHON, "-m", "deploy_app", "-i", str(args.input), "-o", str(out), "-m",
                            str(model_path), "--encoding", args.encoding], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        sys.exit(f"the app failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
    summary = json.loads((out / "ctfm-results.json").read_text())
    stages = summary["seconds"]
    in_graph = sum(stages.values())
    size = volume.shape_zyx[::-1]
    print(f"series: {args.input.name} ({size[0]}x{size[1]}x{size[2]} voxels), model {model.checkpoint.name} "
          f"(sha256 {model.checkpoint.sha256[:12]}), encoding {args.encoding}, {torch.get_num_threads()} threads")
    print(f"{'':<40} {'seconds':>8} {'vs inference':>13}")
    print(f"{'reference: model inference (engine)':<40} {inference:>8.2f} {1.0:>12.2f}x")
    for stage, seconds in stages.items():
        print(f"{'  app stage ' + stage:<40} {seconds:>8.2f} {seconds / inference:>12.2f}x")
    print(f"{'app in-graph total':<40} {in_graph:>8.2f} {in_graph / inference:>12.2f}x")
    print(f"{'app process wall (incl. Holoscan start)':<40} {wall:>8.2f} {wall / inference:>12.2f}x")
    added = in_graph - stages.get("segment", 0.0)
    print(f"\nI/O and DICOM work inside the app add {added:.2f} s = {100 * added / inference:.1f} % of the "
          f"inference time (goal < 30 %); process start-up adds {wall - in_graph:.2f} s more "
          f"({100 * (wall - in_graph) / inference:.1f} %).")


if __name__ == "__main__":
    main()
