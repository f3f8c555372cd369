#!/usr/bin/env bash
# After the long run (scripts/long_run.sh) has finished its 16,920 steps: Gram post-training,
# diagnostics before / after, the demo protocol and the site split for the pretrained, the
# post-trained and the random-init encoder, paired comparisons, and the evidence the release
# needs (docs/pretraining.md, "The long run"). Every step is resumable: a finished probe keeps
# its token cache, a post-training run resumes from its checkpoint.
#
#   JWTH_DATA_ROOT=/path/to/data bash scripts/finish_long_run.sh [RUN_DIR] [OUT_ROOT] [POST_MINUTES]
#
# Then release the better of the two encoders (the post-trained one unless its paired Δ CI
# lies below 0) with jwth.encoders.release.release_encoder; the command is printed at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=${1:-$HOME/jwth-runs/crc_vit_tiny_long}
OUT=${2:-$HOME/jwth-runs/finish}
POST_MIN=${3:-30}
JWTH=${JWTH:-jwth}
DATA="${JWTH_DATA_ROOT:?set JWTH_DATA_ROOT to the folder holding tcga_crc_msi/}/tcga_crc_msi"
RANDOM_SPEC="timm:vit_tiny_patch16_224?img_size=112"
TEST_SITES=AA,CM   # fixed before the long run started (docs/pretraining.md)
TOTAL_STEPS=16920
mkdir -p "$OUT"

# 0. only a finished run: probes of a partial model would be overwritten by nothing and their
#    caches would refuse the final weights
if ! grep -q "\"trained_steps\": $TOTAL_STEPS" "$RUN/encoder/config.json" 2>/dev/null; then
  echo "$RUN has not finished its $TOTAL_STEPS steps (see $RUN/encoder/config.json); run scripts/long_run.sh first." >&2
  exit 2
fi

# 1. Gram anchoring, from the final checkpoint (at most POST_MIN minutes a call; resumable)
rc=0
"$JWTH" posttrain --from "$RUN" --data "$DATA" --out "$OUT/gram" train.max_minutes="$POST_MIN" \
  train.progress=false train.log_every=50 || rc=$?
if [ "$rc" = 3 ]; then
  echo "post-training stopped after $POST_MIN min; run this script again to resume it (nothing else was run)." >&2
  exit 3
elif [ "$rc" != 0 ]; then
  exit "$rc"
fi
"$JWTH" plot-losses "$RUN" "$OUT/gram" --out "$OUT/curves.png"

# a step whose results are already there is skipped (delete its folder to run it again)
done_in() { [ -f "$1/${2:-results.json}" ]; }

# 2. token diagnostics: random init, pretrained, post-trained
done_in "$OUT/diagnose" metrics.json || "$JWTH" diagnose --encoder "$RANDOM_SPEC" --encoder "$RUN/encoder" --encoder "$OUT/gram/encoder" \
  --label random-init --label pretrained --label gram --data "$DATA" --out "$OUT/diagnose" --n-tiles 64 --size 112

# 3. the demo protocol (MSI, 5-fold patient CV, 1,000 bootstraps) and the site split, per encoder
for pair in "random|$RANDOM_SPEC" "pretrained|$RUN/encoder" "gram|$OUT/gram/encoder"; do
  name=${pair%%|*}; spec=${pair#*|}
  done_in "$OUT/probe_$name" || \
    "$JWTH" probe --data "$DATA" --encoder "$spec" --out "$OUT/probe_$name" --positive MSIMUT --stain-shift 0,1,2
  done_in "$OUT/site_$name" || "$JWTH" probe --data "$DATA" --encoder "$spec" --out "$OUT/site_$name" --positive MSIMUT \
    --split site --test-sites "$TEST_SITES" --cache "$OUT/probe_$name/cache"
done

# 4. paired comparisons (patient-level bootstrap over the same tiles)
"$JWTH" compare "$OUT/probe_pretrained" "$OUT/probe_random" --out "$OUT/compare_pretrained_vs_random"
"$JWTH" compare "$OUT/site_pretrained" "$OUT/site_random" --out "$OUT/compare_site_pretrained_vs_random"
"$JWTH" compare "$OUT/probe_gram" "$OUT/probe_pretrained" --out "$OUT/compare_gram_vs_pretrained"
"$JWTH" compare "$OUT/probe_gram" "$OUT/probe_random" --out "$OUT/compare_gram_vs_random"

PY_BIN=$(dirname "$(command -v "$JWTH")")/python
cat <<EOF
All evidence is in $OUT. Read compare_*/compare.md, then release (example for the Gram encoder):

cd "$ROOT" && "$PY_BIN" - <<'PY'
from pathlib import Path
from jwth.encoders.release import ReleaseEvidence, release_encoder
ev = ReleaseEvidence(
    run=Path("$RUN"), progress=Path("$ROOT/checkpoints/wip/crc-vit-tiny-long/PROGRESS.json"),
    curves=Path("$OUT/curves.png"), diagnose={"random init / pretrained / Gram": Path("$OUT/diagnose")},
    probes={"pretrained, 5-fold patient CV": Path("$OUT/probe_pretrained"),
            "Gram post-trained, 5-fold patient CV": Path("$OUT/probe_gram"),
            "random init, 5-fold patient CV": Path("$OUT/probe_random")},
    compares={"pretrained vs random init": Path("$OUT/compare_pretrained_vs_random"),
              "site split ($TEST_SITES held out): pretrained vs random init": Path("$OUT/compare_site_pretrained_vs_random"),
              "Gram vs pretrained": Path("$OUT/compare_gram_vs_pretrained")},
    commands=["bash scripts/long_run.sh 145   # once per session until 16,920 steps",
              "bash scripts/finish_long_run.sh"],
    hardware="...", data="...", notes="...")
release_encoder("$OUT/gram/encoder", "crc-vit-tiny", ev)
PY
EOF
