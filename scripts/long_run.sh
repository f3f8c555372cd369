#!/usr/bin/env bash
# The long ViT-Ti/16 pretraining run on the tcga_crc_msi images, one session at a time
# (docs/pretraining.md, "The long run"). Each call trains for MINUTES, stops cleanly
# (checkpoint + encoder export), and copies the teacher weights, losses, monitor and curves
# to checkpoints/wip/crc-vit-tiny-long/ so that each session can commit its progress.
#
#   JWTH_DATA_ROOT=/path/to/data bash scripts/long_run.sh [MINUTES] [RUN_DIR]
#
# RUN_DIR (default ~/jwth-runs/crc_vit_tiny_long, outside the checkout) is resumed when it
# holds a checkpoint. When it does not (a new machine), the run is warm-started from the
# committed weights (model.init; new heads and optimizer, schedules from step 0) and the
# warm start is recorded in RUN_DIR/WARM_START. Keep the machine otherwise idle: PyTorch CPU
# training slows down several-fold when threads compete.
set -euo pipefail

MINUTES=${1:-120}
RUN=${2:-$HOME/jwth-runs/crc_vit_tiny_long}
WIP=checkpoints/wip/crc-vit-tiny-long
CONFIG=src/jwth/configs/pretrain_crc_vit_tiny_long.yaml
DATA="${JWTH_DATA_ROOT:?set JWTH_DATA_ROOT to the folder holding tcga_crc_msi/}/tcga_crc_msi"
JWTH=${JWTH:-jwth}

extra=()
if [ ! -f "$RUN/checkpoint.safetensors" ] && [ -f "$WIP/model.safetensors" ]; then
  echo "no checkpoint in $RUN: warm-starting from the committed weights in $WIP"
  mkdir -p "$RUN"
  cp "$WIP/PROGRESS.json" "$RUN/WARM_START" 2>/dev/null || echo "{}" > "$RUN/WARM_START"
  extra+=("model.init=$PWD/$WIP")
fi
rc=0
"$JWTH" pretrain --config "$CONFIG" --data "$DATA" --out "$RUN" "train.max_minutes=$MINUTES" \
  train.progress=false train.log_every=50 "${extra[@]}" || rc=$?
# 0: schedule finished; 3: stopped by train.max_minutes; 130: stopped by a signal
if [ "$rc" != 0 ] && [ "$rc" != 3 ] && [ "$rc" != 130 ]; then exit "$rc"; fi

mkdir -p "$WIP"
cp "$RUN/encoder/model.safetensors" "$RUN/encoder/config.json" "$RUN/losses.csv" "$RUN/config.yaml" "$WIP/"
[ -f "$RUN/monitor.csv" ] && cp "$RUN/monitor.csv" "$WIP/"
[ -f "$RUN/WARM_START" ] && cp "$RUN/WARM_START" "$WIP/WARM_START.json"
"$JWTH" plot-losses "$RUN" --out "$WIP/curves.png"
python3 - "$RUN" "$WIP" <<'PY'
import csv, json, sys
run, wip = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(f"{run}/losses.csv")))
meta = json.load(open(f"{run}/encoder/config.json")).get("jwth", {})
# wall time per process start (a resumed process restarts its wall clock at 0)
segments, start = [], None
for prev, row in zip([None] + rows[:-1], rows):
    if prev is None or float(row["wall_s"]) < float(prev["wall_s"]):
        if prev is not None:
            segments.append({"from_step": int(start["step"]), "to_step": int(prev["step"]) + 1, "wall_min": round(float(prev["wall_s"]) / 60, 1)})
        start = row
if rows:
    segments.append({"from_step": int(start["step"]), "to_step": int(rows[-1]["step"]) + 1, "wall_min": round(float(rows[-1]["wall_s"]) / 60, 1)})
json.dump({"steps_done": int(rows[-1]["step"]) + 1 if rows else 0, "segments": segments, "encoder": meta}, open(f"{wip}/PROGRESS.json", "w"), indent=1)
print(f"progress: {wip}/PROGRESS.json")
PY
