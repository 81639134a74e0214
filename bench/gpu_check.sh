#!/usr/bin/env bash
# The prepared GPU check, ordered so the most valuable evidence comes first within a
# 15-minute device budget (every new kernel specialisation JIT-compiles on a GPU, about a
# second each, so the whole suite may not fit):
#   1. the kernel tests at real sizes (every path, dtype, layout, flag);
#   2. the quick benchmark against torch eager (JSON with device, versions, command);
#   3. the same with torch.compile as a baseline (compiles per point: slower);
#   4. the rest of the suite, as far as the time allows.
# Everything lands in $OUT (default bench/results/new). Commit the JSON under
# bench/results/ as written.
set -uo pipefail
OUT=${OUT:-bench/results/new}
mkdir -p "$OUT"
python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python - <<'PY' | tee "$OUT/versions.txt"
import sys, torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY
export PYTHONUNBUFFERED=1
timeout 240 python -m pytest -x -q tests/test_kernels.py tests/test_ops.py tests/test_numerics.py \
    2>&1 | tee "$OUT/pytest-kernels.log" | tail -15
timeout 150 python -m fastbn.bench --suite quick --providers fastbn,torch --out "$OUT" 2>&1 \
    | tee "$OUT/bench-quick.txt" | tail -40
timeout 150 python -m fastbn.bench --suite quick --providers fastbn,compile --modes forward-backward \
    --out "$OUT" 2>&1 | tee "$OUT/bench-quick-compile.txt" | tail -25
timeout 150 python -m pytest -q tests --deselect tests/test_kernels.py 2>&1 \
    | tee "$OUT/pytest-rest.log" | tail -15
