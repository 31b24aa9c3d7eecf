#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py says what it runs): on the lent machine, from the
# repository root, with .whl/ and .gpu_check_data/ carried (both made here by
# bench/gpu_check_prepare.sh):
#
#     bash bench/gpu_check.sh                 # one CUDA GPU, about 10 minutes; writes $OUT/gpu_check.{md,json,log}
#     GPU_CHECK_QUICK=1 PYTHON=.venv/bin/python bash bench/gpu_check.sh   # the CPU dry run, tiny budgets (./gpu_check_out/)
#
# PYTHON: the interpreter (default python3, the lent machine's). Extra arguments go to bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${GPU_CHECK_SITE:-/tmp/site}
PY=${PYTHON:-python3}
# The lent machine's python3 has torch, torchvision, typer, rich, safetensors, onnx(runtime), timm
# and pytest-xdist, but not fvcore and its pure-Python needs: those come as wheels.
if ! "$PY" -c "import fvcore, iopath, yacs, termcolor" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/ wheels: run bench/gpu_check_prepare.sh here first" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
export PYTHONPATH=".:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The commit gpu_check_prepare.sh recorded, for a copy without git metadata (bench/provenance.py).
if [ -z "${CHANPRUNE_COMMIT:-}" ] && [ -f .gpu_check_data/commit ]; then
    CHANPRUNE_COMMIT=$(cat .gpu_check_data/commit)
    export CHANPRUNE_COMMIT
fi
# The data cache (extracted archives, decoded tensors) outside the repository.
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/chanprune-cache}
# Then the seed methods' paper protocols (bench/papers.py) at a fraction of their epochs, each within
# GPU_CHECK_PAPERS_S seconds (0 skips them; $OUT/papers/, $OUT/papers.log); the dry run bounds
# every command to 2 steps.
OUTDIR=${OUT:-gpu_check_out}
papers() {
    [ "${GPU_CHECK_PAPERS_S:-240}" = "0" ] && return 0
    mkdir -p "$OUTDIR"
    local method
    for method in whitebox asfp; do
        timeout "${GPU_CHECK_PAPERS_S:-240}" "$PY" bench/papers.py --method "$method" \
            --checkpoint .gpu_check_data/resnet56-cifar10jpeg.pt --train .gpu_check_data/cifar10-jpeg-train.tar.gz \
            --test .gpu_check_data/cifar10-jpeg-test.tar.gz --out "$OUTDIR/papers" "$@" >> "$OUTDIR/papers.log" 2>&1 \
            || echo "papers $method: failed or timed out (see $OUTDIR/papers.log)"
    done
}
rc=0
if [ "${GPU_CHECK_QUICK:-0}" = "1" ]; then
    "$PY" bench/gpu_check.py --quick --device cpu "$@" || rc=$?
    papers --device cpu --smoke 2
else
    "$PY" bench/gpu_check.py "$@" || rc=$?
    papers --device cuda --fraction 0.02
fi
exit $rc
