#!/usr/bin/env bash
# The main job on the embedded default model: convert it to DAR with the recommended recipe (vllm-dar convert's
# defaults), then serve the stock and the converted model side by side with vLLM (vllm-dar compare): vLLM's KV
# capacity, one prompt answered by both, perplexity on held-out text and decode speed, one screen.
# Run scripts/setup.sh first.
#
#   bash scripts/main.sh                              # defaults below
#   DAR_ARGS="--kv-budget 0.2" bash scripts/main.sh   # convert at 20% of the stock KV bytes
#   COMPARE_ARGS="--dtype float32" bash scripts/main.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. "${VLLM_DAR_VENV:-.venv}/bin/activate"
SRC=${SRC:-models/smollm2-135m-f32}  # conversion source: the fp32 copy (calibration runs in fp32)
STOCK=${STOCK:-models/smollm2-135m}  # what a user serves: bf16, the same weights as SRC rounded to bf16
OUT=${OUT:-models/smollm2-135m-dar}

vllm-dar convert "$SRC" "$OUT" --force ${DAR_ARGS:-}
# Both engines serve bf16 (compare's --dtype): the DAR checkpoint's fp32 weights round to exactly STOCK's.
vllm-dar compare "$STOCK" "$OUT" ${COMPARE_ARGS:-}
