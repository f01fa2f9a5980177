#!/usr/bin/env bash
# Few-shot whole-body segmentation (as CT-FM's fewshot.sh): fine-tune on k TotalSegmentator training volumes, for
# k in 5 10 20, three subsets each (subset seeds 0 1 2), from the CT-FM encoder and from random initialisation;
# every run is tested on the manifest's test split (held-out Dice in result.json and the model card).
#
# The paper took the FIRST rows of TotalSegmentator's meta.csv (VISTA3D split), unshuffled: 2% / 1% / 0.5% of 928 =
# 19 / 9 / 5 training volumes, called 20 / 10 / 5-shot, plus 1 / 1 / 0 validation volumes (unused here: the
# segmentation recipe has no validation split). SEEDS=null reproduces that single subset; a whole-number seed
# takes a seeded sample instead (for one seed the 5 volumes are among the 10 and those among the 20), so the
# spread over seeds shows how much the choice of volumes matters. Epochs as in the full recipe (CT-FM ran the
# same 300-epoch config); with few volumes an epoch is a single step unless data.visits_per_epoch is raised.
#
# Usage (from the repository root):  training/fewshot_totalseg.sh
# Environment: CONFIG (default training/finetune_totalseg_paper.yaml), ENCODER (CT-FM encoder folder, default the
# recipe's), KS ("5 10 20"), SEEDS ("0 1 2"; "null" = paper), ARMS ("ctfm random"), OUT (runs/fewshot),
# EXTRA (more --set overrides, e.g. "--set trainer.devices=1 --set data.visits_per_epoch=8"), CTFM (the command,
# default ctfm; e.g. .venv/bin/ctfm).
# Summary: OUT/summary.csv with arm, k, seed and the mean held-out macro Dice of each run.
set -euo pipefail

CONFIG=${CONFIG:-training/finetune_totalseg_paper.yaml}
KS=${KS:-"5 10 20"}
SEEDS=${SEEDS:-"0 1 2"}
ARMS=${ARMS:-"ctfm random"}
OUT=${OUT:-runs/fewshot}
EXTRA=${EXTRA:-}
CTFM=${CTFM:-ctfm}

for arm in $ARMS; do
  for k in $KS; do
    for seed in $SEEDS; do
      run="$OUT/${arm}_k${k}_seed${seed}"
      if [[ -f "$run/result.json" ]]; then
        echo "skip $run (done)"; continue
      fi
      weights=()
      if [[ $arm == random ]]; then
        weights=(--set model.encoder_weights=null)
      elif [[ -n ${ENCODER:-} ]]; then
        weights=(--set "model.encoder_weights=$ENCODER")
      fi
      mkdir -p "$run"
      # shellcheck disable=SC2086  # EXTRA is a list of options
      $CTFM finetune --config "$CONFIG" --json -q \
        --set "data.train_volumes=$k" --set "data.subset_seed=$seed" "${weights[@]}" \
        --set "output.dir=$run" --set "output.export=$run/model" \
        --set "output.name=fewshot-${arm}-k${k}-seed${seed}" $EXTRA > "$run/result.json.partial"
      mv "$run/result.json.partial" "$run/result.json"
    done
  done
done

python - "$OUT" <<'PY'
import csv, json, sys
from pathlib import Path

out = Path(sys.argv[1])
with open(out / "summary.csv", "w", newline="") as stream:
    writer = csv.writer(stream)
    writer.writerow(["arm", "k", "subset_seed", "train_volumes", "held_out_scans", "mean_macro_dice"])
    for result in sorted(out.glob("*_k*_seed*/result.json")):
        arm, k, seed = result.parent.name.split("_")
        document = json.loads(result.read_text())
        dice = [r["macro_dice"] for r in document.get("held_out_dice", []) if r.get("macro_dice") is not None]
        writer.writerow([arm, k[1:], seed[4:], document.get("train_volumes"), len(dice),
                         round(sum(dice) / len(dice), 4) if dice else ""])
print(f"wrote {out / 'summary.csv'}")
PY
