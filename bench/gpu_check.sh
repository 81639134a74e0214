#!/usr/bin/env bash
# The prepared GPU check: install fastbn, run the test suite on CUDA (real sizes), then the
# quick benchmark. Everything lands in $OUT (default bench/results/new): pytest.log, the
# benchmark's JSON (device, versions, command, every row) and its terminal table.
# Commit the JSON under bench/results/ as written.
set -uo pipefail
OUT=${OUT:-bench/results/new}
mkdir -p "$OUT"
python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python - <<'PY' | tee "$OUT/versions.txt"
import sys, torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY
# The suite must stay under 5 minutes on an H100; the limit keeps time for the benchmark.
timeout 330 python -m pytest -x -q tests 2>&1 | tee "$OUT/pytest.log" | tail -30
PYTHONUNBUFFERED=1 timeout 240 python -m fastbn.bench --suite quick --out "$OUT" 2>&1 \
    | tee "$OUT/bench-quick.txt" | tail -40
