#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py says what it runs): on the lent machine, from the
# repository root, with .whl/ and .gpu_check_data/ carried (both made here by
# bench/gpu_check_prepare.sh):
#
#     bash bench/gpu_check.sh                 # one CUDA GPU, about 10 minutes; writes $OUT/gpu_check.{md,json,log}
#     GPU_CHECK_QUICK=1 PYTHON=.venv/bin/python bash bench/gpu_check.sh   # the CPU dry run, tiny budgets (./gpu_check_out/)
#     GPU_CHECK_PAPERS=lossless GPU_CHECK_PAPERS_S=150 bash bench/gpu_check.sh --phases env   # the five seeds, 10 distilled epochs each
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
# Then the seed methods' CIFAR-10 protocols (bench/papers.py), each method within
# GPU_CHECK_PAPERS_S seconds (0 skips them; $OUT/papers/, $OUT/papers.log). GPU_CHECK_PAPERS picks
# which: `paper` (default) runs whitebox and asfp at 2 % of their papers' epochs; `lossless` runs the
# five seeds through the project's 10-epoch distilled recipe at GPU_CHECK_PAPERS_FRACTION (default 1),
# the comparison the CPU cannot afford: give it the device time with `--phases env` (the check's
# other phases skipped) and GPU_CHECK_PAPERS_S=150; GPU_CHECK_PAPERS_METHODS="info cac" runs only those
# (one lent machine may not have time for all five). The dry run bounds every command to 2 steps.
OUTDIR=${OUT:-gpu_check_out}
papers() {
    [ "${GPU_CHECK_PAPERS_S:-240}" = "0" ] && return 0
    mkdir -p "$OUTDIR"
    local method methods=(whitebox asfp) protocol=(--protocol paper)
    if [ "${GPU_CHECK_PAPERS:-paper}" = "lossless" ]; then
        methods=(whitebox asfp sensitivity info cac)
        protocol=(--protocol lossless)
    fi
    [ -n "${GPU_CHECK_PAPERS_METHODS:-}" ] && read -ra methods <<< "$GPU_CHECK_PAPERS_METHODS"
    for method in "${methods[@]}"; do
        timeout "${GPU_CHECK_PAPERS_S:-240}" "$PY" bench/papers.py --method "$method" "${protocol[@]}" \
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
    if [ "${GPU_CHECK_PAPERS:-paper}" = "lossless" ]; then
        papers --device cuda --fraction "${GPU_CHECK_PAPERS_FRACTION:-1}"
    else
        papers --device cuda --fraction 0.02
    fi
fi
exit $rc
