#!/usr/bin/env bash
# A short tour of agentcg on a host with cgroup v2 controllers (or inside the
# kernel lab): start agentcgd on a private root, declare a session, run tool
# calls that stay within and go past their intents, show the feedback, status
# and event log, then stop the daemon and remove the tree.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
RUN=$(mktemp -d /tmp/agentcg-demo.XXXXXX)
ROOT=/sys/fs/cgroup/agentcg-demo-$$
export AGENTCG_SOCKET=$RUN/agentcg.sock
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

$BIN/agentcgd --cgroup-root "$ROOT" --runtime-dir "$RUN" --teardown --log-level info 2>"$RUN/agentcgd.log" &
DPID=$!
trap 'kill -TERM $DPID 2>/dev/null; wait $DPID 2>/dev/null; rm -rf "$RUN"' EXIT
for _ in $(seq 100); do [ -S "$AGENTCG_SOCKET" ] && break; sleep 0.1; done
[ -S "$AGENTCG_SOCKET" ] || { echo "agentcgd did not start:"; cat "$RUN/agentcgd.log"; exit 1; }

step agentcg session create demo --intent memory=512M,memory_max=1G,pids=256
$BIN/agentcg session create demo --intent memory=512M,memory_max=1G,pids=256
step agentcg run --session demo -- sh -c 'cat /proc/self/cgroup; echo hello from a tool call'
$BIN/agentcg run --session demo -- sh -c 'cat /proc/self/cgroup; echo hello from a tool call'
step "agentcg run --session demo --intent memory_max=64M -- python3 -c 'allocate 256 MiB'"
$BIN/agentcg run --session demo --intent memory_max=64M -- \
  python3 -c 'b = bytearray(256 << 20); print("allocated", len(b) >> 20, "MiB")'
echo "(exit status $?)"
step agentcg run --session demo --intent pids=32 -- "sh -c 'fork 100 sleepers'"
$BIN/agentcg run --session demo --intent pids=32 -- \
  sh -c 'for i in $(seq 100); do sleep 5 & done 2>/dev/null; wait; echo forked as many as allowed'
echo "(exit status $?)"
step agentcg status
$BIN/agentcg status
step agentcg events
$BIN/agentcg events
step agentcg session end demo
$BIN/agentcg session end demo
