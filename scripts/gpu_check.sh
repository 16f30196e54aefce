#!/usr/bin/env bash
# One short GPU check for a session that has one H100/H200 (about 8 minutes in all).
#
#   OUT=/some/dir bash scripts/gpu_check.sh
#
# Writes (at most 8 files, at most 2 folders deep, under $OUT):
#   nvidia-smi.txt                 the card, driver, memory
#   bench.json                     python3 -m engine.bench --device cuda --json (MoE layer vs dense)
#   runs.log                       every run's stdout/stderr, one after another
#   <run>/metrics.jsonl            engine.schema lines of each 1-GPU d12-moe run (3 runs)
#   moectl.txt                     moectl status --json, check --json and a guarded 1-GPU run --json
#   results.txt                    the summary table printed at the end
#   fp8_probe.txt                  with EXTRAS=fp8: which float8 GEMM calls cuBLASLt takes
# With more than 8 files (EXTRAS), the run folders are packed into runs.tgz, since the device
# tool brings back 8 files at most.
#
# The GPU box has torch but neither pydantic nor GitPython: the engine runs with plain python3.
# Each d12-moe run is 60 steps at a quarter of the preset's total batch (131072 tokens = 8 micro-
# batches of 16 x 1024 on one GPU) so three runs fit; tok/sec per GPU is what compares with the seed
# (~100,800 tok/s per GPU, 9.76% MFU at 8 GPUs; its dense iso-FLOP twin ~36% MFU).
# First figures (one H200, 2026-11-27) are in docs/benchmarks.md; scripts/gpu_profile.py splits one
# d12 MoE layer's time kernel by kernel when a run is slower than its dense twin.
#
#   EXTRAS="fp8 bias" OUT=/some/dir bash scripts/gpu_check.sh
#
# EXTRAS adds 30-step runs, about 80 s each: `fp8` (scripts/fp8_probe.py, then cap 1.0 with --fp8,
# the expert GEMMs through torch._scaled_mm) and `bias` (cap 1.0 with --balance bias); and `model`
# (scripts/gpu_profile.py --model, ~3 min: wall vs launch vs device ms of the whole model per
# variant, which is what explains grouped's gap to padded); `graphs` (cap 0 and cap 1.0 with
# --compile-mode reduce-overhead: CUDA graphs, for a step bound by kernel launches). Leave them
# out when under ~12 minutes of device time are left. Any torch.compile graph break a run warned
# of is listed under the table.
#
#   SKIP="bench moectl" STEPS=30 EXTRAS="fp8 bias" OUT=/some/dir bash scripts/gpu_check.sh
#
# SKIP leaves out the layer benchmark and/or the moectl-on-the-card part (both measured once
# already), so the training runs fit one device call of under 10 minutes.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PY=${PY:-python3}
STEPS=${STEPS:-60}
TOTAL_BATCH=${TOTAL_BATCH:-131072}
mkdir -p "$OUT"
: >"$OUT/runs.log"
# A rerun into the same OUT: the engine refuses an --out-dir that holds a run's metrics, and the
# table below would then show the last call's figures as this one's.
rm -rf "$OUT"/cap1_static "$OUT"/cap0_static "$OUT"/dense_static "$OUT"/cap1_fp8 "$OUT"/cap1_bias \
  "$OUT"/cap0_graphs "$OUT"/cap1_graphs "$OUT"/model_profile
declare -a SUMMARY=()

note() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

# run NAME LIMIT_S CMD... : run with a timeout, keep going whatever happens, remember the outcome.
run() {
  local name=$1 limit=$2
  shift 2
  note "$name (limit ${limit}s): $*"
  local t0=$SECONDS
  echo "===== $name: $*" >>"$OUT/runs.log"
  timeout --signal=TERM --kill-after=20 "$limit" "$@" >>"$OUT/runs.log" 2>&1
  local rc=$?
  SUMMARY+=("$name rc=$rc wall=$((SECONDS - t0))s")
  note "$name -> rc=$rc in $((SECONDS - t0))s"
  [ $rc -ne 0 ] && tail -n 3 "$OUT/runs.log"
  return 0
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || note "nvidia-smi failed"
head -n 15 "$OUT/nvidia-smi.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || true

skipped() { case " ${SKIP:-} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if ! skipped bench; then
  note "bench"
  t0=$SECONDS
  timeout 90 $PY -m engine.bench --device cuda --json >"$OUT/bench.json" 2>>"$OUT/runs.log"
  SUMMARY+=("bench rc=$? wall=$((SECONDS - t0))s")
  cat "$OUT/bench.json"; echo
fi

D12=(-m engine.train --preset d12-moe --device cuda --steps "$STEPS" --total-batch-size "$TOTAL_BATCH" --log-every 10)
run cap1_static 140 $PY "${D12[@]}" --cap 1.0 --compile static --out-dir "$OUT/cap1_static"
run cap0_static 140 $PY "${D12[@]}" --cap 0 --compile static --out-dir "$OUT/cap0_static"
run dense_static 120 $PY "${D12[@]}" --dense --compile static --out-dir "$OUT/dense_static"
D12_SHORT=(-m engine.train --preset d12-moe --device cuda --steps 30 --total-batch-size "$TOTAL_BATCH" --log-every 10)
for extra in ${EXTRAS:-}; do
  case $extra in
    fp8)
      timeout 120 $PY scripts/fp8_probe.py 2>&1 | tee "$OUT/fp8_probe.txt"
      run cap1_fp8 110 $PY "${D12_SHORT[@]}" --cap 1.0 --fp8 --compile static --out-dir "$OUT/cap1_fp8" ;;
    bias) run cap1_bias 110 $PY "${D12_SHORT[@]}" --cap 1.0 --balance bias --compile static --out-dir "$OUT/cap1_bias" ;;
    graphs)
      run cap0_graphs 110 $PY "${D12_SHORT[@]}" --cap 0 --compile static --compile-mode reduce-overhead --out-dir "$OUT/cap0_graphs"
      run cap1_graphs 110 $PY "${D12_SHORT[@]}" --cap 1.0 --compile static --compile-mode reduce-overhead --out-dir "$OUT/cap1_graphs" ;;
    model)
      note "model profile"
      t0=$SECONDS
      OUT="$OUT/model_profile" timeout 240 $PY scripts/gpu_profile.py --model >>"$OUT/runs.log" 2>&1
      SUMMARY+=("model_profile rc=$? wall=$((SECONDS - t0))s") ;;
    *) note "unknown extra: $extra (fp8, bias, graphs, model)" ;;
  esac
done

if ! skipped moectl; then
  # moectl on the real card: the only real NVML reading we get. pydantic is missing on the box, so
  # carry it: run `bash scripts/device_wheels.sh` here first and name `.whl` in the call's carry.
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  REPO=$PWD
  SCRATCH=/tmp/gpu_moectl   # a throwaway git repo holding only a .moectl.toml, so nothing here is committed to
  rm -rf "$SCRATCH" && mkdir -p "$SCRATCH" && (
    cd "$SCRATCH" && git init -q -b main && git config user.email gpu@check && git config user.name gpu-check
    cat >.moectl.toml <<TOML
[project]
name = "gpucheck"
branch = "main"
venv = ""
[paths]
artifact_root = "/tmp/gpu_moectl_runs"
[launch]
env = { OMP_NUM_THREADS = "1", PYTHONPATH = "$REPO" }
TOML
    git add .moectl.toml && git commit -qm init
  )
  MOECTL=(env PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" $PY -m moectl)
  {
    echo "== moectl status --json";  (cd "$SCRATCH" && timeout 60 "${MOECTL[@]}" status --json); echo "rc=$?"
    echo "== moectl check --device cuda --json"; (cd "$SCRATCH" && timeout 60 "${MOECTL[@]}" check --device cuda --preset d12-moe --json); echo "rc=$?"
    echo "== moectl run (1 GPU, d12-moe, 30 steps, eager)"
    (cd "$SCRATCH" && timeout --kill-after=20 150 "${MOECTL[@]}" run --device cuda --nproc 1 --preset d12-moe \
        --steps 30 --compile none --tag gpucheck --json -- --total-batch-size 131072); echo "rc=$?"
  } >"$OUT/moectl.txt" 2>&1
  SUMMARY+=("moectl $(grep -c '^rc=0' "$OUT/moectl.txt")/3 ok")
  tail -n 40 "$OUT/moectl.txt"
fi

# Summary: the tail of each run (steps after compile warm-up), read with the torch-free schema.
$PY - "$OUT" "${SUMMARY[@]}" <<'EOF' | tee "$OUT/results.txt"
import sys
from pathlib import Path

from engine.schema import RunSummary, StepMetrics, parse_line

out, outcomes = Path(sys.argv[1]), sys.argv[2:]
print("outcomes: " + " | ".join(outcomes))
head = f"{'run':<14}{'steps':>6}{'tail':>5}{'tok/sec':>12}{'dt_ms':>10}{'mfu%':>8}{'drop':>7}{'load':>6}{'mem_MiB':>10}{'loss':>8}"
print(head)
for name in ("cap1_static", "cap0_static", "dense_static", "cap1_fp8", "cap1_bias", "cap0_graphs", "cap1_graphs"):
    path = out / name / "metrics.jsonl"
    if not path.exists():
        if name not in ("cap1_static", "cap0_static", "dense_static") and not (out / name).exists():
            continue  # an extra not asked for (or refused at once: its rc is in the outcomes line)
        print(f"{name:<14}  (no metrics)")
        continue
    recs = [parse_line(l) for l in path.read_text().splitlines() if l.strip()]
    steps = [r for r in recs if isinstance(r, StepMetrics)]
    summ = [r for r in recs if isinstance(r, RunSummary)]
    tail = steps[len(steps) // 2:]  # second half: compile and warm-up excluded
    if not tail:
        print(f"{name:<14}  (no steps)")
        continue
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    tok = mean([s.tok_per_sec for s in tail])
    dt = mean([s.dt_ms for s in tail])
    mfu = mean([s.mfu for s in tail if s.mfu is not None])
    drop = mean([s.drop_frac for s in tail if s.drop_frac is not None])
    load = mean([s.expert_load_max for s in tail if s.expert_load_max is not None])
    mem = max(s.peak_mem_mib or 0 for s in steps)
    print(f"{name:<14}{len(steps):>6}{len(tail):>5}{tok:>12,.0f}{dt:>10.1f}{mfu:>8.2f}{drop:>7.3f}{load:>6.2f}"
          f"{mem:>10.0f}{steps[-1].loss:>8.3f}" + ("" if summ else "  (no summary: cut short)"))
    print("   last: " + path.read_text().splitlines()[-1][:300])
print("seed (8 GPUs, per GPU): ~100,800 tok/sec, 9.76% MFU; seed dense twin ~36% MFU")
model = out / "model_profile" / "model.json"
if model.exists():
    import json
    for name, row in json.loads(model.read_text())["model"].items():
        print(f"model {name:<12} wall {row['wall_ms']} ms  launch {row['launch_ms']} ms  device {row['device_ms']} ms per micro-step  "
              f"compile {row['compile_s']} s  peak {row['peak_mib']} MiB")
breaks = [ln for ln in (out / "runs.log").read_text(errors="replace").splitlines() if "graph break(s)" in ln]
print("graph breaks: " + ("none warned of" if not breaks else f"{len(breaks)} run(s) warned"))
for ln in breaks:
    print("   " + ln[:300])
EOF
# The device tool returns 8 files at most: past that, pack the folders (metrics, profiles).
if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  (cd "$OUT" && dirs=$(find . -mindepth 1 -maxdepth 1 -type d -printf '%P\n') \
    && tar czf runs.tgz $dirs && rm -rf $dirs && note "packed $(echo $dirs | wc -w) folders into runs.tgz")
fi
exit 0
