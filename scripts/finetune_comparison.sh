#!/usr/bin/env bash
# Frozen attention pooling against fine-tuning (docs/open-questions-finetune.md), full scale:
# all tiles of tcga_crc_msi, MSI vs MSS, 5-fold patient-level CV (seed 0: the probe's folds),
# 1,000 bootstrap resamples. Per encoder: the frozen probe (linear + attention), then
# last-2-blocks, LoRA (r = 8 on qkv) and full fine-tuning with the attention head, each
# compared with the frozen attention head (paired patient-level bootstrap).
#
#   JWTH_DATA_ROOT=/path/to/data bash scripts/finetune_comparison.sh [OUT_ROOT] [ENCODERS]
#
# ENCODERS: space-separated name=spec pairs (default: the long run's ViT-Ti/16 and the same
# architecture at random initialisation, both 112 px). Resumable: a finished run is skipped,
# a fine-tuning run reuses its finished folds. Keep the CPU otherwise idle: the wall times
# recorded in each results.json are the cost measure.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$HOME/jwth-runs/finetune}
ENCODERS=${2:-"pretrained=$ROOT/checkpoints/wip/crc-vit-tiny-long random=timm:vit_tiny_patch16_224?img_size=112"}
JWTH=${JWTH:-jwth}
DATA="${JWTH_DATA_ROOT:?set JWTH_DATA_ROOT to the folder holding tcga_crc_msi/}/tcga_crc_msi"
COMMON=(--data "$DATA" --positive MSIMUT --folds 5 --n-boot 1000 --seed 0)
mkdir -p "$OUT"

for pair in $ENCODERS; do
  name=${pair%%=*}; spec=${pair#*=}
  [ -f "$OUT/$name/frozen/results.json" ] || \
    "$JWTH" probe "${COMMON[@]}" --encoder "$spec" --out "$OUT/$name/frozen" --heads linear,attention
  for method in last-blocks lora full; do
    run="$OUT/$name/$method"
    [ -f "$run/results.json" ] || \
      "$JWTH" finetune "${COMMON[@]}" --encoder "$spec" --out "$run" --method "$method" --head attention
    "$JWTH" compare "$run" "$OUT/$name/frozen" --heads attention --out "$OUT/$name/compare_$method"
  done
done
echo "All runs are in $OUT: */frozen/results.md, */<method>/results.md, */compare_<method>/compare.md"
