#!/usr/bin/env bash
# One entry point for a fresh machine. Idempotent: each call sets up what is missing, then works.
#
#   bash scripts/dev.sh run     set up .venv, then the main job: a guarded `moectl run` of the tiny
#                               preset on CPU (no download); extra args go to `moectl run`
#   bash scripts/dev.sh test    set up .venv with test extras, then run the whole test suite (on
#                               several workers where it can: worker_args below); extra args go to pytest
#   bash scripts/dev.sh setup   set up .venv with test extras only (a development checkout)
#
# torch: if the system python already has torch (a GPU box), the venv reuses it
# (--system-site-packages); otherwise pip installs torch==$MOECTL_TORCH (default 2.13.0, which
# resolves to a local CPU wheel on our dev/CI machines and to the CUDA build from PyPI elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.moectl-installed

# setup [EXTRAS]: EXTRAS "test" also installs the test extras (pytest, the MLflow server, wandb);
# without, moectl and its runtime dependencies only (what `run` needs: a faster first call).
setup() {
  local extras=${1:-}
  if [ ! -x "$VENV/bin/python" ]; then
    if "$PY" -c "import torch" >/dev/null 2>&1; then
      "$PY" -m venv --system-site-packages "$VENV"
    else
      "$PY" -m venv "$VENV"
    fi
  fi
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch==${MOECTL_TORCH:-2.13.0} into $VENV" >&2
    "$VENV/bin/python" -m pip install -q "torch==${MOECTL_TORCH:-2.13.0}"
  fi
  # Re-install the project only when its metadata or the extras asked for changed (keeps repeat
  # calls fast). The stamp is the pyproject hash and the extras installed: a venv set up for the
  # tests also serves `run`.
  local hash have
  hash=$(sha256sum <pyproject.toml | cut -c1-16)
  have=$(cat "$STAMP" 2>/dev/null || true)
  if [ "$have" = "$hash ${extras:-base}" ] || { [ -z "$extras" ] && [ "$have" = "$hash test" ]; }; then
    return 0
  fi
  echo "[setup] installing moectl and its dependencies${extras:+ (with the $extras extras)} into $VENV" >&2
  "$VENV/bin/python" -m pip install -q -e ".${extras:+[$extras]}"
  echo "$hash ${extras:-base}" >"$STAMP"
}

# worker_args ARRAY: pytest-xdist options that run the suite on several workers, one test file at a
# time each (--dist=loadfile: a file's module fixtures and order stay together), each worker in a
# PID namespace of its own (scripts/pid_namespace.py says why it must be). Only where this machine
# gives one (root, or CAP_SYS_ADMIN: `unshare --pid` works); else ARRAY stays empty and the suite
# runs in one process, as it always did; so it does for --pdb, --trace and --collect-only, and
# where the arguments choose workers themselves (-n, --dist, --tx, -p no:xdist). MOECTL_TEST_WORKERS=N asks for N workers (1: none); the
# default is one per core, 2 to 4. Run alone on 2 cores the suite kept the CPUs 48% busy (one
# process starting torch, then the next); 2 workers took it from 19.0 to 13.2 minutes there
# (docs/benchmarks.md).
worker_args() {
  local -n into=$1
  shift
  local arg
  for arg in "$@"; do  # what asks for one process, or for workers of its own choosing
    case $arg in --pdb | --trace | --collect-only | --co | -n* | --numprocesses* | --dist* | --tx* | no:xdist) return 0 ;; esac
  done
  local n=${MOECTL_TEST_WORKERS:-}
  if [ -z "$n" ]; then
    n=$(nproc 2>/dev/null || echo 1)
    [ "$n" -gt 4 ] && n=4
  fi
  [ "$n" -ge 2 ] 2>/dev/null || return 0
  case "$PWD" in *[[:space:]]*) return 0 ;; esac  # (execnet splits its python= value at spaces)
  unshare --pid --fork --mount-proc true >/dev/null 2>&1 || return 0
  local py=$PWD/$VENV/bin/python
  into=(--dist=loadfile "--tx=${n}*popen//python=unshare --pid --fork --mount-proc $py $PWD/scripts/pid_namespace.py $py")
}

case "${1:-}" in
  run)
    shift
    setup
    exec "$VENV/bin/moectl" run --preset tiny --device cpu "$@"
    ;;
  test)
    shift
    setup test
    workers=()
    worker_args workers "$@"
    exec "$VENV/bin/python" -m pytest ${workers[@]+"${workers[@]}"} "$@"
    ;;
  setup)
    setup test
    ;;
  *)
    echo "usage: bash scripts/dev.sh run|test|setup [args...]" >&2
    exit 2
    ;;
esac
