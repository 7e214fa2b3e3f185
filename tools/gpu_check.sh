#!/usr/bin/env bash
# Every GPU figure docs/benchmarks.md lacks, in one run of under 8 minutes; prints the markdown to paste there.
#
#   bash tools/gpu_check.sh [--cpu] [--out DIR] [--deadline SECONDS] [--only train,memory,sampler,fid,ddp]
#
# Writes DIR/gpu_check.md (the table), DIR/gpu_check.json (the same figures as numbers) and DIR/gpu_check.log
# (every section's output). DIR defaults to $OUT (a device machine's folder whose files come back), else
# gpu_check_out. --cpu: the same sections and columns at tiny settings, to check the code paths without a GPU.
# Python packages the machine lacks (hydra-core, omegaconf, ...) can come as wheels in $GPU_CHECK_WHEELS
# (default: the checkout's .whl/, if it has wheels): they are installed into a temporary folder first (pip --no-index --no-deps).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi || true
fi

wheels=${GPU_CHECK_WHEELS:-$repo/.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

# fewstep from this checkout, installed or not
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PYTHON" "$repo/tools/gpu_check.py" "$@"
