#!/usr/bin/env bash
# The CUDA checks in one prepared run, for a machine with a GPU, PyTorch and no network
# (the device machines of this workplace: Python 3.12, torch, scipy, hypothesis, matplotlib,
# tensorboard installed; pytorch-metric-learning, faiss-cpu and record-keeper missing).
#
#   bash benchmarks/gpu_check.sh --fetch   # where pip works: the missing wheels into .whl/
#   bash benchmarks/gpu_check.sh           # on the GPU machine, with .whl/ beside the repo
#
# The run installs the wheels into /tmp/site (nothing else is changed), then writes to
# $OUT (default /tmp/gpu-check): machine.txt, tests-cuda.log (the tests that read
# TEST_DEVICE, on cuda), cost-cuda-<section>.md and cost-cuda.log (benchmarks/cost.py on
# cuda, one section at a time); commit the three reports, joined, as
# benchmarks/results/cost-cuda.md.
# Each step has a time limit, so that what finished comes back. Exit status: 0 if both
# steps passed.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pytorch-metric-learning==2.9.0 faiss-cpu==1.15.1 record-keeper==0.9.32)
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu COST_ARGS=--quick: a dry run of this script
COST_ARGS=${COST_ARGS:-}
# seconds per step (one device call may run 600 s at most)
TEST_TIME_LIMIT=${TEST_TIME_LIMIT:-180}
COST_TIME_LIMIT_ps=${COST_TIME_LIMIT_ps:-120}
COST_TIME_LIMIT_miner=${COST_TIME_LIMIT_miner:-180}
COST_TIME_LIMIT_train_step=${COST_TIME_LIMIT_train_step:-60}

if [[ "${1:-}" == "--fetch" ]]; then
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
        manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
fi

OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
    nvidia-smi -L
    python3 -c "import sys, torch, pytorch_metric_learning as pml
print('python', sys.version.split()[0], '| torch', torch.__version__, '| pml',
      pml.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available()
      else 'no CUDA')"
} 2>&1 | tee "$OUT/machine.txt"

TEST_DEVICE=$DEVICE timeout "$TEST_TIME_LIMIT" python3 -m pytest -q -p no:cacheprovider \
    tests/losses tests/miners tests/utils 2>&1 | tee "$OUT/tests-$DEVICE.log" | tail -n 25
tests=$?

# one report per section, so that a section cut by its time limit loses only itself
cost=0
for section in ps miner train-step; do
    limit_var="COST_TIME_LIMIT_${section//-/_}"
    # shellcheck disable=SC2086  # COST_ARGS is a list of flags
    timeout "${!limit_var}" python3 benchmarks/cost.py --device "$DEVICE" $COST_ARGS \
        --sections "$section" --out "$OUT/cost-$DEVICE-$section.md" 2>&1 \
        | tee -a "$OUT/cost-$DEVICE.log" | grep -E ": (met|MISSED)|^wrote"
    status=${PIPESTATUS[0]}
    [[ $status -eq 0 ]] || { echo "cost.py --sections $section: exit status $status"; cost=$status; }
done

echo "tests exit status: $tests; cost exit status: $cost (124: time limit)"
[[ $tests -eq 0 && $cost -eq 0 ]]
