"""Head-CT triage on every runtime side by side: what `ctfm triage --backend auto` measures, at CT-FM's width.

A triage classifier of the published encoder's width (init_filters 32, the CT-FM SinoCT head; random weights with
randomised BatchNorm statistics: its times are the published model's, its probabilities mean nothing) judges the
real head CT of the test data (Slicer's CTHead series) through the engine's own triage pipeline with
``--backend auto`` and an empty cache, so every runtime of this machine is measured: PyTorch fp32 and bf16
(channels-last), onnxruntime, OpenVINO fp32 and bf16.  Printed per runtime: seconds per forward pass (after a
warm-up), speed-up against PyTorch fp32, and the agreement auto requires (probability within 0.001 of PyTorch
fp32's); then the choice.

    .venv/bin/python benchmarks/triage_runtimes.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HEAD_CT = SHARED / "dicom" / "slicer_head_64x64"


def published_width_triage(folder: Path) -> Path:
    from embed import randomise_batchnorm_statistics

    from ctfm_engine.models.checkpoint import save_checkpoint
    from ctfm_engine.models.encoder import encoder_config
    from ctfm_engine.models.triage import TriageClassifier

    torch.manual_seed(0)
    config = {**encoder_config(init_filters=32), "threshold": 0.5}
    network = randomise_batchnorm_statistics(TriageClassifier(**config))
    save_checkpoint(network, folder, config)
    return folder


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["CTFM_CACHE"] = str(Path(scratch) / "cache")
        os.environ.pop("CTFM_BACKEND", None)
        from ctfm_engine.pipelines.triage import TriageRequest, run_triage

        model = published_width_triage(Path(scratch) / "triage")
        outcome = run_triage(TriageRequest(HEAD_CT, weights=model, accept_partial=True))
    choice = outcome.runtime.describe()
    trials = choice["trials"]
    reference = next(t for t in trials if (t["backend"], t["precision"]) == ("torch", "fp32"))
    print(f"head CT {HEAD_CT.name} -> model input {outcome.preprocessing.get('spatial_size_zyx')} per window, "
          f"CT-FM width (init_filters 32, random weights); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'runtime':<16} {'s/pass':>8} {'vs torch fp32':>14} {'agreement':>10} {'qualifies':>10}")
    for trial in trials:
        name = f"{trial['backend']} {trial['precision']}"
        if trial["error"]:
            print(f"{name:<16} failed: {trial['error']}")
            continue
        print(f"{name:<16} {trial['seconds']:>8.3f} {reference['seconds'] / trial['seconds']:>13.2f}x "
              f"{trial['foreground_agreement']:>10.6f} {str(trial['qualifies']):>10}")
    print(f"auto chose {choice['backend']} {choice['precision']} ({choice['speedup_vs_torch_fp32']}x PyTorch fp32); "
          f"the whole triage took {outcome.seconds:.1f} s including the one-off measurement")


if __name__ == "__main__":
    main()
