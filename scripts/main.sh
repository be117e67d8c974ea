#!/usr/bin/env bash
# The main job on the embedded default model: convert it to DAR, then score the stock and the converted model on
# held-out real text, side by side. Run scripts/setup.sh first.
#
#   bash scripts/main.sh                     # defaults below
#   DAR_ARGS="--window 128" bash scripts/main.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. "${VLLM_DAR_VENV:-.venv}/bin/activate"
SRC=${SRC:-models/smollm2-135m-f32}
OUT=${OUT:-models/smollm2-135m-dar}
WINDOWS=${WINDOWS:-4}
# Held-out text: the evaluation part of python3.11-doc's sources (never used for calibration).
mapfile -t TEXT < <(python -c "from vllm_dar.data import split_files; print('\n'.join(split_files()[1]))")

vllm-dar convert "$SRC" "$OUT" --force --window 64 --key-rank 48 --value-rank 48 --head-sharing joint --sink-tokens 4 \
  --schedule calibrated ${DAR_ARGS:-}
vllm-dar eval "$SRC" --text "${TEXT[@]}" --max-windows "$WINDOWS" --json --quiet | tee /tmp/vllm-dar-full.json
vllm-dar eval "$OUT" --text "${TEXT[@]}" --max-windows "$WINDOWS" --json --quiet | tee /tmp/vllm-dar-dar.json
python - <<'PY'
import json
full, dar = (json.load(open(f"/tmp/vllm-dar-{n}.json")) for n in ("full", "dar"))
print(f"perplexity: full {full['perplexity']:.3f}, DAR {dar['perplexity']:.3f} "
      f"({dar['perplexity'] / full['perplexity'] - 1:+.1%}) at {dar['kv_fraction']:.1%} of the KV bytes")
PY
