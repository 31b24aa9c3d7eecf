#!/usr/bin/env bash
# Prepares the GPU check here (a machine with pip and ../shared): the wheels of the packages the lent
# machine lacks into .whl/, and the data into .gpu_check_data/ (both ignored by git; they travel with
# `carry`). ../shared itself does not travel to the lent machine.
#
#     bash bench/gpu_check_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
PY=${PYTHON:-.venv/bin/python}
# fvcore (MAC counting) and its pure-Python needs that the lent machine's image does not have
# (numpy, pyyaml, tqdm, Pillow and typing_extensions it has); portalocker and tabulate it has too,
# carried anyway so that their versions match this machine's.
mkdir -p .whl
"$PY" -m pip wheel -q --no-deps fvcore iopath yacs termcolor portalocker tabulate -w .whl
mkdir -p .gpu_check_data
for f in data/cifar10-jpeg-train.tar.gz data/cifar10-jpeg-test.tar.gz checkpoints/resnet56-cifar10jpeg.pt; do
    [ -f "$SHARED/$f" ] || { echo "missing $SHARED/$f" >&2; exit 2; }
    cp -p "$SHARED/$f" .gpu_check_data/
done
# The commit being checked, for the copy on the lent machine, which has no git metadata
# (bench/gpu_check.sh passes it to bench/provenance.py): prepare again after committing.
rm -f .gpu_check_data/commit
if commit=$(git rev-parse HEAD 2>/dev/null); then
    git diff --quiet HEAD -- || commit="$commit-dirty"
    echo "$commit" > .gpu_check_data/commit
fi
du -sh .whl .gpu_check_data
echo "carry: [\".whl\", \".gpu_check_data\"]; run: bash bench/gpu_check.sh"
