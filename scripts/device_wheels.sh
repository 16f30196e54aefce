#!/usr/bin/env bash
# Fetch the wheels moectl needs on the lent GPU box (Python 3.12, x86-64, no network there; it has
# torch, typer, rich, psutil and nvidia-ml-py but not pydantic). Run HERE, in the repo root, before
# a device call that carries `.whl`; scripts/gpu_check.sh installs them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0
ls -1 .whl
