#!/usr/bin/env bash
# The GPU check (issue 18): embed throughput of efficientnet_lite0 and resnet50 at batch 1, 32 and
# 256 with AMP and channels-last, the holidays import, one CDAE epoch and the query latency, then
# one JSON line on stdout (progress on stderr). See benchmarks/gpu_check.py for the sections.
#
#   benchmarks/gpu_check.sh                        # a CUDA machine, full sizes
#   benchmarks/gpu_check.sh --device cpu --tiny    # anywhere, a few seconds (run by the tests)
#
# It runs with the project's own install: .venv/bin/python (`make install`), or $CBIR_PYTHON.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${CBIR_PYTHON:-$root/.venv/bin/python}"
if [[ ! -x "$python" ]]; then
    echo "gpu_check: no $python; run \`make install\` or set CBIR_PYTHON" >&2
    exit 2
fi
cd "$root"
exec "$python" -m benchmarks.gpu_check "$@"
