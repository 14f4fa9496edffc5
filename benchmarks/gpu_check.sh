#!/usr/bin/env bash
# The GPU check: PyTorch's part of the test suite with tensors on CUDA, then the torch
# benchmark with --device cuda. Meant for a machine that has a CUDA GPU and a CUDA build of
# PyTorch but maybe nothing else of ours (no TensorFlow, IPython or ipywidgets: the tests
# that need them skip). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh [OUTPUT_DIR]     # default benchmarks/results
#
# Writes OUTPUT_DIR/gpu_tests.log, gpu_bench.log and full-torch-cuda.{md,json,csv}.
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export PYTHONDONTWRITEBYTECODE=1

"$python" - <<'EOF' || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device: nothing to check here.")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, python {sys.version.split()[0]}")
EOF

echo "== tests (CUDA where a test has a device parameter or needs a GPU)"
"$python" -m pytest -q -p no:cacheprovider -x tests/test_devices.py tests/test_backend_torch.py \
    tests/test_api.py tests/test_diagnose.py tests/test_fdcheck.py 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark (torch, --device cuda)"
"$python" benchmarks/run.py --framework torch --device cuda --no-startup --out "$out" \
    "${@:2}" 2>&1 | tee "$out/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}

echo "tests exit $tests_rc, benchmark exit $bench_rc"
exit $(( tests_rc || bench_rc ))
