#!/usr/bin/env bash
# Every figure that needs a GPU or a native cgroup v2 host, from one command.
#
#   bash bench/gpu_suite.sh [OUT_DIR]            # on the GPU machine, from the repo root
#   bash bench/gpu_suite.sh --smoke [OUT_DIR]    # the same parts, tiny, on any host (CI)
#
# The GPU machine is lent for minutes, so the suite is sized to finish in
# under 8 minutes in all: each part runs under its own `timeout` (seconds in
# PARTS below), a part that overruns or fails is recorded and the next one
# runs. Results go under OUT_DIR (default: $OUT where that is set, else
# bench/results/gpu-suite): one JSON per part as each benchmark writes it, a
# log per part, and summary.json with every part's exit status, seconds and
# results file. Parts whose host lacks what they need (no CUDA device, no
# cgroup v2 controllers, not root) are recorded as skipped with the reason.
#
# Python packages the GPU image lacks travel as wheels in .whl/ (see
# bench/README.md, "gpu_suite"); when .whl/ exists they are installed into a
# private target first. The BPF objects are built here and carried (bpf/.output).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT_DIR=${1:-${OUT:-bench/results/gpu-suite}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/agentcg-site .whl/*.whl && export PYTHONPATH=/tmp/agentcg-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# The checkout itself where agentcg is not installed (the GPU image): a plain
# install into a private prefix (agentcg.daemon and agentcg.cli live at the top
# level, mapped by pyproject's package-dir, so the tree cannot be imported as is).
if ! "$PY" -c 'import agentcg.daemon, agentcg.cli' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --prefix /tmp/agentcg-prefix . >/dev/null 2>&1 || echo "gpu_suite: installing the checkout failed" >&2
  site=$(ls -d /tmp/agentcg-prefix/lib/python3*/site-packages 2>/dev/null | head -1)
  [ -n "$site" ] && export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/agentcg-prefix/bin:$PATH
fi
# the BPF objects built here travel in bpf/.output
[ -d bpf/.output ] && export AGENTCG_BPF_DIR=${AGENTCG_BPF_DIR:-$PWD/bpf/.output}

have_cuda=$("$PY" -c 'import torch; print("yes" if torch.cuda.is_available() else "no")' 2>/dev/null || echo no)
have_v2=$("$PY" - <<'PY'
import os
try:
    ctrl = set(open("/sys/fs/cgroup/cgroup.controllers").read().split())
except OSError:
    ctrl = set()
print("yes" if {"memory", "cpu", "pids"} <= ctrl and os.geteuid() == 0 else "no")
PY
)
is_root=$([ "$(id -u)" = 0 ] && echo yes || echo no)

SUMMARY=$OUT_DIR/summary.jsonl
: > "$SUMMARY"
suite_start=$(date +%s)

record() {  # part rc seconds result_file note
  "$PY" - "$@" >> "$SUMMARY" <<'PY'
import json, sys
part, rc, secs, result, note = sys.argv[1:6]
print(json.dumps({"part": part, "rc": int(rc), "seconds": int(secs), "result": result or None,
                  "status": "skipped" if rc == "-1" else ("timeout" if rc in ("124", "137") else
                                                           ("ok" if rc == "0" else "failed")),
                  "note": note or None}))
PY
}

run_part() {  # name limit_s needs result_file -- command...
  local name=$1 limit=$2 needs=$3 result=$4; shift 5
  local why=""
  case "$needs" in
    *cuda*) [ $SMOKE = 1 ] || [ "$have_cuda" = yes ] || why="no CUDA device" ;;
  esac
  case "$needs" in
    *v2*) [ "$have_v2" = yes ] || why="${why:+$why; }no cgroup v2 memory/cpu/pids controllers at /sys/fs/cgroup or not root" ;;
    *root*) [ "$is_root" = yes ] || why="${why:+$why; }not root" ;;
  esac
  if [ -n "$why" ]; then
    echo "== $name: skipped ($why)"
    record "$name" -1 0 "" "$why"
    return
  fi
  echo "== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local t1=$(date +%s)
  tail -n 3 "$OUT_DIR/$name.log" | sed 's/^/   /'
  local note=""
  [ -n "$result" ] && [ ! -e "$OUT_DIR/$result" ] && note="no results file written"
  record "$name" "$rc" $((t1 - t0)) "$result" "$note"
}

"$PY" - > "$OUT_DIR/environment.json" <<'PY'
import json, os, platform, subprocess
env = {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count()}
try:
    import torch
    env["torch"] = torch.__version__
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
except Exception as exc:  # torch absent: recorded, the cgroup parts still run
    env["torch"] = f"absent: {exc}"
try:
    env["cgroup_controllers"] = open("/sys/fs/cgroup/cgroup.controllers").read().split()
except OSError:
    env["cgroup_controllers"] = []
try:
    env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip() or None
except OSError:
    env["commit"] = None
print(json.dumps(env, indent=1))
PY

if [ $SMOKE = 1 ]; then
  run_part kv_swap 120 cuda kv_swap.json -- "$PY" bench/kv_swap.py --sizes-gib 0.0625 --shape tiny --repeats 1 --out "$OUT_DIR"
  run_part resume 120 cuda resume_overlap.json -- "$PY" bench/resume.py --model tiny --context 256 --new 4 --repeats 1 --device cpu --out "$OUT_DIR"
  run_part decode 120 cuda decode.json -- "$PY" bench/decode.py --model tiny --context 64 --steps 4 --device cpu --out "$OUT_DIR"
  if [ -e bench/agent_jct.py ] || [ -d bench/agent_jct ]; then
    run_part agent_jct 180 cuda agent_jct.json -- "$PY" -m bench.agent_jct --preset cpu --device cpu --agents 3 --max-turns 4 --max-seconds 150 --out "$OUT_DIR/agent_jct.json"
  fi
  run_part toolcall_overhead 120 root toolcall_overhead.json -- "$PY" bench/toolcall_overhead.py --calls 40 --warmup 5 --methods bare,daemon --quiet --out "$OUT_DIR/toolcall_overhead.json"
else
  run_part gpu_tests 60 cuda "" -- "$PY" -m pytest -q -p no:cacheprovider tests/gpu
  run_part kv_swap 35 cuda kv_swap.json -- "$PY" bench/kv_swap.py --sizes-gib 1,4 --repeats 2 --out "$OUT_DIR"
  run_part resume 45 cuda resume_overlap.json -- "$PY" bench/resume.py --context 32768 --repeats 2 --device cuda --out "$OUT_DIR"
  run_part decode 35 cuda decode.json -- "$PY" bench/decode.py --device cuda --out "$OUT_DIR"
  if [ -e bench/agent_jct.py ] || [ -d bench/agent_jct ]; then
    run_part agent_jct 130 cuda agent_jct.json -- "$PY" -m bench.agent_jct --preset gpu --device cuda --max-seconds 115 --out "$OUT_DIR/agent_jct.json"
  fi
  run_part toolcall_overhead 40 v2 toolcall_overhead.json -- "$PY" bench/toolcall_overhead.py --calls 500 --quiet --out "$OUT_DIR/toolcall_overhead.json"
  run_part bpf_tracker 35 root bpf_tracker.json -- "$PY" bench/bpf_tracker.py --rounds 4 --calls 100 --out "$OUT_DIR/bpf_tracker.json"
  for seed in 1 7; do
    run_part "replay_seed$seed" 40 v2 "" -- "$PY" -m bench.replay --sessions 3 --priorities 8,2,8 --speedup 5 \
      --mem-scale 0.5 --seed $seed --max-duration-s 30 --no-plots --out "$OUT_DIR/replay-seed$seed"
  done
fi

"$PY" - "$SUMMARY" "$OUT_DIR/summary.json" "$(( $(date +%s) - suite_start ))" <<'PY'
import json, sys
parts = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = {"parts": parts, "total_seconds": int(sys.argv[3]),
       "failed": [p["part"] for p in parts if p["status"] in ("failed", "timeout")],
       "skipped": [p["part"] for p in parts if p["status"] == "skipped"]}
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(f"gpu_suite: {len(parts)} parts in {out['total_seconds']} s; failed: {out['failed'] or 'none'}; "
      f"skipped: {out['skipped'] or 'none'}")
sys.exit(1 if out["failed"] else 0)
PY
