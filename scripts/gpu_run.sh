#!/usr/bin/env bash
# One-shot pretraining on a lent GPU machine (15 minutes of device time in all, start-up
# included): time 20 steps, train for TRAIN_MIN minutes, Gram post-train for POST_MIN, and
# write the fp16 encoders, losses, monitor rows and curves to $OUT (at most 8 files come back).
# Prepared and dry-run on CPU (GPU_DEVICE=cpu, tiny settings); the machine has PyTorch, timm,
# typer, rich, h5py, scikit-learn and pandas, so jwth runs from src/ without installing.
#
# Here, first:  python scripts/gpu_pack_tiles.py "$JWTH_DATA_ROOT/tcga_crc_msi" .gpu_data/tcga_crc_msi   (~45 MiB)
#               echo /.gpu_data/ >> .git/info/exclude
# Device call:  run(command="bash scripts/gpu_run.sh", carry=[".gpu_data"], timeout_s=600)
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
DATA=${GPU_DATA:-.gpu_data/tcga_crc_msi}
OUT=${OUT:-runs/gpu_out}
CONFIG=${GPU_CONFIG:-src/jwth/configs/pretrain_crc_vit_tiny_gpu.yaml}
TRAIN_MIN=${TRAIN_MIN:-6}
POST_MIN=${POST_MIN:-1.5}
DEV=${GPU_DEVICE:-auto}
PY=${PY:-python3}
RUN=/tmp/jwth_gpu_run
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/gpu_run.log"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; "$PY" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'timm', timm.__version__)"; } >> "$OUT/gpu_run.log" 2>&1
common=(train.device="$DEV" train.progress=false train.log_every=20 train.tensorboard=false)
log "timing 20 steps"
"$PY" -m jwth.cli pretrain --config "$CONFIG" --data "$DATA" --out /tmp/jwth_gpu_time20 "${common[@]}" \
  train.max_steps=20 monitor.every_steps=0 >> "$OUT/gpu_run.log" 2>&1
tail -3 /tmp/jwth_gpu_time20/losses.csv >> "$OUT/gpu_run.log" 2>/dev/null
log "training for $TRAIN_MIN min"
"$PY" -m jwth.cli pretrain --config "$CONFIG" --data "$DATA" --out "$RUN" "${common[@]}" \
  train.max_minutes="$TRAIN_MIN" >> "$OUT/gpu_run.log" 2>&1
log "pretraining exit $?"
log "Gram post-training for $POST_MIN min"
"$PY" -m jwth.cli posttrain --from "$RUN" --data "$DATA" --out "${RUN}_gram" "${common[@]}" \
  train.max_minutes="$POST_MIN" >> "$OUT/gpu_run.log" 2>&1
log "post-training exit $?"
"$PY" -m jwth.cli plot-losses "$RUN" "${RUN}_gram" --out "$OUT/curves.png" >> "$OUT/gpu_run.log" 2>&1
cp "$RUN/encoder/model.safetensors" "$OUT/pretrained.safetensors" 2>/dev/null
cp "$RUN/encoder/config.json" "$OUT/config.json" 2>/dev/null
cp "${RUN}_gram/encoder/model.safetensors" "$OUT/gram.safetensors" 2>/dev/null
cp "$RUN/losses.csv" "$OUT/losses.csv" 2>/dev/null
cat "$RUN/monitor.csv" > "$OUT/monitor.csv" 2>/dev/null
log "done"
ls -la "$OUT" >> "$OUT/gpu_run.log"
