#!/usr/bin/env bash
# Collect every wheel `dsft bench --mode gpu` needs, for a GPU machine without network.
#
#   bash dsft/bench/wheels.sh [DEST]           # on a machine with network (default DEST=wheels)
#   # carry DEST over, then on the GPU machine (Linux x86_64, Python 3.11 by default):
#   python -m venv .venv && .venv/bin/pip install --no-index --find-links DEST 'dsft[bench]'
#   .venv/bin/dsft bench --mode gpu --out runs/bench-gpu
#
# DeepSpeed is an sdist on PyPI: it is built here into a wheel with DS_BUILD_OPS=0 (pure
# Python; its CUDA ops are JIT-compiled on the GPU machine on first use, which needs
# nvcc there), so nothing is compiled at install time. dsft itself is built from this
# checkout. Wheels for another interpreter or platform: PY=3.12 PLATFORM=manylinux_2_28_x86_64.
# KEEP_TORCH=0 drops torch and the nvidia-* wheels (several GB) when the GPU machine
# already has a CUDA torch in the range pyproject.toml allows (install into that
# environment, with --no-deps for nothing else missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-wheels}
py=${PY:-3.11}
platform=${PLATFORM:-manylinux2014_x86_64}
pip=${PIP:-pip}
mkdir -p "$dest"

# 1. the source-only packages, as wheels built here
DS_BUILD_OPS=0 "$pip" wheel --no-deps --wheel-dir "$dest" "deepspeed==0.19.8"
"$pip" wheel --no-deps --wheel-dir "$dest" .

# 2. everything else, binary wheels for the target interpreter and platform
reqs=$(mktemp)
python3 - "$reqs" <<'EOF'
import sys, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = [d for d in p["dependencies"] if not d.startswith("deepspeed")]
deps += p["optional-dependencies"]["bench"]
# DeepSpeed's own requirements (its wheel above was built without them)
deps += ["hjson", "ninja", "numpy", "packaging>=20.0", "psutil", "py-cpuinfo", "pydantic>=2.0.0",
         "einops", "msgpack", "tqdm"]
open(sys.argv[1], "w").write("\n".join(deps) + "\n")
EOF
"$pip" download --dest "$dest" --only-binary=:all: --python-version "$py" \
  --platform "$platform" --platform manylinux_2_28_x86_64 --platform linux_x86_64 \
  --implementation cp -r "$reqs"
rm -f "$reqs"

if [ "${KEEP_TORCH:-1}" = 0 ]; then
  rm -f "$dest"/torch-*.whl "$dest"/nvidia_*.whl "$dest"/triton-*.whl
fi
echo "wheels in $dest: $(ls "$dest" | wc -l) files, $(du -sh "$dest" | cut -f1)"
echo "install offline: pip install --no-index --find-links $dest 'dsft[bench]'"
