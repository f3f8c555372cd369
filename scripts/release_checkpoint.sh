#!/usr/bin/env bash
# The checkpoint run end to end (docs/pretraining.md, "The checkpoint run"):
# pretrain -> Gram post-training -> token diagnostics -> MSI probes (random init,
# pretrained, post-trained) -> paired comparisons -> loss curves. The encoder is copied
# into the package (jwth:crc-vit-tiny-gram) only by hand, and only when the comparisons
# show it beating the random initialisation: the run of 2026-11-30 did not.
#
#   JWTH_DATA_ROOT=/path/to/data bash scripts/release_checkpoint.sh [runs]
#
# On a 2-core CPU: ~66 min pretraining, ~17 min post-training, ~25 min probes. Every
# step resumes or reuses its outputs when re-run after an interruption. Keep the machine
# otherwise idle: PyTorch CPU training slows down several-fold when threads compete.
set -euo pipefail

RUNS=${1:-runs}
DATA="${JWTH_DATA_ROOT:?set JWTH_DATA_ROOT to the folder holding tcga_crc_msi/}/tcga_crc_msi"
NAME=crc-vit-tiny-gram
CONFIG=src/jwth/configs/pretrain_crc_vit_tiny_cpu.yaml

jwth pretrain --config "$CONFIG" --data "$DATA" --out "$RUNS/crc_vit_tiny"
jwth posttrain --from "$RUNS/crc_vit_tiny" --data "$DATA" --out "$RUNS/crc_vit_tiny_gram"
jwth plot-losses "$RUNS/crc_vit_tiny" "$RUNS/crc_vit_tiny_gram" --out "$RUNS/release/losses.png"

# the random-init baseline: same architecture, same input size (112 px), fixed seed
RANDOM_SPEC="timm:vit_tiny_patch16_224?img_size=112"
jwth diagnose --encoder "$RANDOM_SPEC" --encoder "$RUNS/crc_vit_tiny/encoder" --encoder "$RUNS/crc_vit_tiny_gram/encoder" \
  --label random --label pretrained --label gram --data "$DATA" --out "$RUNS/release/diagnose_224" --size 224
jwth diagnose --encoder "$RANDOM_SPEC" --encoder "$RUNS/crc_vit_tiny/encoder" --encoder "$RUNS/crc_vit_tiny_gram/encoder" \
  --label random --label pretrained --label gram --data "$DATA" --out "$RUNS/release/diagnose_112"

jwth probe --data "$DATA" --encoder "$RANDOM_SPEC" --out "$RUNS/probe_random_vit_tiny" --positive MSIMUT
jwth probe --data "$DATA" --encoder "$RUNS/crc_vit_tiny/encoder" --out "$RUNS/probe_pretrained" --positive MSIMUT
jwth probe --data "$DATA" --encoder "$RUNS/crc_vit_tiny_gram/encoder" --out "$RUNS/probe_gram" --positive MSIMUT

# the same encoder evaluated at 224 px (0.5 µm/px, 14x14 grid; position embedding resampled on load)
mkdir -p "$RUNS/enc224_crc_vit_tiny"
cp "$RUNS/crc_vit_tiny/encoder/model.safetensors" "$RUNS/enc224_crc_vit_tiny/"
python - "$RUNS" <<'PY'
import json, sys
runs = sys.argv[1]
c = json.load(open(f"{runs}/crc_vit_tiny/encoder/config.json"))
c["model_args"]["img_size"] = 224
c["pretrained_cfg"]["input_size"] = [3, 224, 224]
c["jwth"]["mpp"] = 0.5
json.dump(c, open(f"{runs}/enc224_crc_vit_tiny/config.json", "w"), indent=2)
PY
jwth probe --data "$DATA" --encoder "$RUNS/enc224_crc_vit_tiny" --out "$RUNS/probe_pretrained_224" --positive MSIMUT
jwth probe --data "$DATA" --encoder "timm:vit_tiny_patch16_224" --out "$RUNS/probe_random_224" --positive MSIMUT

jwth compare "$RUNS/probe_pretrained_224" "$RUNS/probe_random_224" --out "$RUNS/release/pretrained_vs_random_224"
jwth compare "$RUNS/probe_pretrained" "$RUNS/probe_random_vit_tiny" --out "$RUNS/release/pretrained_vs_random"
jwth compare "$RUNS/probe_gram" "$RUNS/probe_random_vit_tiny" --out "$RUNS/release/gram_vs_random"
jwth compare "$RUNS/probe_gram" "$RUNS/probe_pretrained" --out "$RUNS/release/gram_vs_pretrained"

echo "comparisons in $RUNS/release/*/compare.md. Release only if the trained encoder beats random init:"
echo "  mkdir -p src/jwth/checkpoints/$NAME && cp $RUNS/crc_vit_tiny_gram/encoder/{model.safetensors,config.json} src/jwth/checkpoints/$NAME/"
