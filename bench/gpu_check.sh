#!/usr/bin/env bash
# The prepared GPU check, ordered so the most valuable evidence comes first within a
# 15-minute device budget (every new kernel specialisation JIT-compiles on a GPU, about a
# second each, so the whole suite may not fit). The step timeouts add up to about 11 min:
#   1. the kernel, launch (CUDA graphs, streams), ops and numerics tests at real sizes
#      (stop on the first failure);
#   2. the quick benchmark against torch eager (kernel and back-to-back eager times);
#   3. the host-cost suite (back-to-back calls of small shapes against torch), fastbn with
#      direct launches on (fastbn.direct_launch) and off (every launch through Triton's own
#      JITFunction.run: the fastbn_ordinary_us column);
#   4. the kernel tests of step 1 once more with direct launches off (FASTBN_DIRECT_LAUNCH=0;
#      the kernels are compiled and cached by then);
#   5. the quick benchmark against torch.compile, forward+backward;
#   6. a resnet50-suite subset in bf16 (batch 32 and 256, both layouts), forward+backward;
#   7. the rest of the suite, as far as the time allows.
# Everything lands in $OUT (default bench/results/new). Commit the JSON under
# bench/results/ as written.
#
# The GPU machine has no network: nothing here may download. tests/test_packaging.py checks
# this script on CPU: `bash -n`, and each step's pytest selection collected.
set -uo pipefail
OUT=${OUT:-bench/results/new}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# The pytest selections of steps 1 (and 4) and 7 (one line each: the packaging test reads them).
KERNEL_TESTS="tests/test_kernels.py tests/test_launch.py tests/test_ops.py tests/test_numerics.py"
REST_TESTS="tests --ignore=tests/test_kernels.py --ignore=tests/test_launch.py --ignore=tests/test_ops.py --ignore=tests/test_numerics.py"

install_fastbn() {
    # Editable install with the machine's own setuptools (no build isolation: no network).
    python -m pip install -q --no-deps --no-build-isolation -e . && return 0
    # Else run from this copy of the tree: `python -m` puts it first on sys.path, and a link
    # makes kernels/ importable as fastbn.kernels, as the installed package has it.
    [ -e fastbn/kernels ] || ln -s ../kernels fastbn/kernels || return 1
    echo "editable install failed; running from the working tree (fastbn/kernels linked)"
}

install_fastbn || exit 1
python - <<'PY' | tee "$OUT/versions.txt"
import sys, numpy, torch, triton, fastbn
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "numpy", numpy.__version__, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
      "fastbn", fastbn.__file__)
PY
# shellcheck disable=SC2086  # the selections are word lists on purpose
timeout 200 python -m pytest -x -q $KERNEL_TESTS 2>&1 | tee "$OUT/pytest-kernels.log" | tail -15
timeout 90 python -m fastbn.bench --suite quick --providers fastbn,torch --out "$OUT" 2>&1 \
    | tee "$OUT/bench-quick.txt" | tail -40
timeout 60 python -m fastbn.bench --suite host --out "$OUT" 2>&1 | tee "$OUT/bench-host.txt" | tail -20
# shellcheck disable=SC2086
FASTBN_DIRECT_LAUNCH=0 timeout 90 python -m pytest -x -q $KERNEL_TESTS 2>&1 \
    | tee "$OUT/pytest-kernels-no-direct.log" | tail -15
timeout 100 python -m fastbn.bench --suite quick --providers fastbn,compile --modes forward-backward \
    --out "$OUT" 2>&1 | tee "$OUT/bench-quick-compile.txt" | tail -25
timeout 90 python -m fastbn.bench --suite resnet50 --providers fastbn,torch --dtypes bf16 \
    --modes forward-backward --fusion none --out "$OUT" 2>&1 | tee "$OUT/bench-resnet50-bf16.txt" | tail -30
# shellcheck disable=SC2086
timeout 40 python -m pytest -q $REST_TESTS 2>&1 | tee "$OUT/pytest-rest.log" | tail -15
