#!/usr/bin/env bash
# The whole CUDA path in one short run, printing the figures:
#   1. the gpu-marked tests (CUDA against the CPU: probabilities and heatmaps);
#   2. bench/inference.py --device cuda (forward and whole-path images/s);
#   3. a short `medtrain fit` on cuda (mixed precision), then `evaluate`;
#   4. bench/e2e.py with the node scoring on cuda (needs dcmtk's storescp and
#      storescu: skipped, and said so, where they are not installed).
# About 5 minutes on one GPU. On a machine with CUDA:
#     bash bench/gpu.sh
# The same steps on the CPU, to check the script itself anywhere:
#     bash bench/gpu.sh --device cpu
# Python: the project's .venv when there is one, else python3 (a GPU host's own
# PyTorch), with the wheels in .whl/ installed first when that folder exists
# (bench/gpu-wheels.sh downloads the project's other dependencies into it, for
# a host that reaches no package registry). Exit status: 0 when every step
# ran, 1 when one failed, 2 when CUDA was asked for and is not there.
set -uo pipefail
cd "$(dirname "$0")/.."
device=cuda
if [ "${1:-}" = "--device" ] && [ -n "${2:-}" ]; then
    device=$2
elif [ $# -gt 0 ]; then
    echo "usage: bash bench/gpu.sh [--device cuda|cpu]" >&2
    exit 2
fi
if [ -x .venv/bin/python ]; then
    py=$PWD/.venv/bin/python
else
    py=$(command -v python3)
    if [ -d .whl ]; then
        site=$(mktemp -d)
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$site" .whl/*.whl || exit 1
        export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONUNBUFFERED=1
medtrain=("$py" -c "import sys; from training.cli import main; sys.exit(main())")

"$py" - "$device" <<'EOF' || exit 2
import sys
import torch
device = sys.argv[1]
print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        print("bench/gpu.sh: CUDA is not available here", file=sys.stderr)
        sys.exit(2)
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
EOF

failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, note a failure
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name"
    local started=$SECONDS
    timeout "$limit" "$@"
    local code=$?
    echo "-- $name: exit $code after $((SECONDS - started)) s"
    [ $code -eq 0 ] || failed+=("$name")
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ "$device" = cpu ]; then
    # The gpu-marked tests skip without CUDA: run them so that they say so.
    step "gpu-marked tests" 120 "$py" -m pytest -q -m gpu -rs tests/test_classifier.py
else
    step "gpu-marked tests" 120 "$py" -m pytest -q -m gpu tests/test_classifier.py
fi
step "bench/inference.py" 120 "$py" bench/inference.py --device "$device" \
    --studies 4 --repeat 3
step "medtrain synth" 60 "${medtrain[@]}" synth "$work/train" --n 200 --seed 1 \
    --size 128
step "medtrain synth (test)" 60 "${medtrain[@]}" synth "$work/test" --n 100 \
    --seed 2 --size 128
step "medtrain fit" 180 "${medtrain[@]}" fit "$work/train" \
    --out "$work/model.safetensors" --device "$device" --epochs 4
step "medtrain evaluate" 60 "${medtrain[@]}" evaluate "$work/model.safetensors" \
    "$work/test" --device "$device"
if [ -x /usr/bin/storescp ] && [ -x /usr/bin/storescu ]; then
    step "bench/e2e.py" 180 "$py" bench/e2e.py --device "$device" --studies 30
else
    echo
    echo "== bench/e2e.py: skipped: dcmtk's storescp and storescu (its PACS and"
    echo "   sender) are not installed here"
fi
echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "bench/gpu.sh on $device: failed: ${failed[*]}"
    exit 1
fi
echo "bench/gpu.sh on $device: every step ran"
