#!/usr/bin/env bash
# Spark GPU discovery script (spark.executor.resource.gpu.discoveryScript).
# Prints the GPUs of this executor as Spark's ResourceInformation JSON:
#   {"name": "gpu", "addresses": ["0", "1"]}
# The addresses are nvidia-smi indices; pipeline/gpu.py maps them to TensorFlow's
# device index (also under CUDA_VISIBLE_DEVICES). With no GPU or no nvidia-smi it
# prints an empty list, so a misconfigured node is visible in the Spark UI
# instead of failing the executor launch with an unparsable answer.
set -euo pipefail

addresses=""
if command -v nvidia-smi >/dev/null 2>&1; then
  # One index per line; skip blank lines and anything that is not a number.
  while IFS= read -r idx; do
    idx="${idx//[[:space:]]/}"
    [[ "$idx" =~ ^[0-9]+$ ]] || continue
    addresses+="${addresses:+,}\"$idx\""
  done < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)
fi
printf '{"name": "gpu", "addresses": [%s]}\n' "$addresses"
