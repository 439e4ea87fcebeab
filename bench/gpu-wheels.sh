#!/usr/bin/env bash
# Download into .whl/ (git-ignored through .git/info/exclude) the wheels of the
# project's dependencies that a GPU host's Python image lacks, for a host that
# reaches no package registry: bench/gpu.sh installs them there before it runs.
# The versions are the ones in this checkout's .venv (the tested ones); the
# host's Python is 3.12 on x86-64 unless PYTHON_VERSION says otherwise. Torch,
# torchvision, numpy, pillow, safetensors, tqdm and pytest come with the host.
#     bash bench/gpu-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
names=(pydicom pynetdicom highdicom sqlalchemy pylibjpeg pylibjpeg-libjpeg
    pylibjpeg-openjpeg pylibjpeg-rle pyjpegls)
pins=()
for name in "${names[@]}"; do
    version=$(.venv/bin/python -c \
        "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" \
        "$name" 2>/dev/null || true)
    pins+=("$name${version:+==$version}")
done
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
if ! grep -qsx '/.whl/' "$exclude"; then
    echo '/.whl/' >>"$exclude"
fi
rm -rf .whl
platforms=()
for n in 39 38 37 36 35 34 33 32 31 30 29 28 27 26 25 24 17; do
    platforms+=(--platform "manylinux_2_${n}_x86_64")  # pip matches each exactly
done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
    "${platforms[@]}" -d .whl "${pins[@]}"
du -sh .whl
ls .whl
