#!/usr/bin/env bash
# The main job: set up, then run agentcgd.
# - On a host with cgroup v2 controllers (and root): agentcgd in the
#   foreground on /sys/fs/cgroup/agentcg (Ctrl-C stops it; agents keep
#   running). For a service install see README (systemd/agentcgd.service and
#   systemd/agentcg-tree.service, which holds the tree).
# - On a hybrid/v1 host (agentcgd refuses to start there, and says why): the
#   same daemon in the kernel lab (../shared/kernlab), driven by scripts/demo.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1
ctrl=$(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null || true)
if [[ " $ctrl " == *" memory "* && " $ctrl " == *" pids "* ]]; then
  [ "$(id -u)" = 0 ] || { echo "agentcgd needs root (it manages cgroups): sudo make run" >&2; exit 1; }
  echo "starting agentcgd (socket /run/agentcg/agentcg.sock); in another shell: .venv/bin/agentcg status"
  exec .venv/bin/agentcgd "$@"
fi
echo "== this host has no cgroup v2 memory/pids controllers; agentcgd says:"
.venv/bin/agentcgd --runtime-dir "$(mktemp -d)" 2>&1 | sed 's/^/   /'
KERNLAB=${KERNLAB_SH:-../shared/kernlab/kernlab.sh}
if [ -x "$KERNLAB" ] && [ "$(id -u)" = 0 ]; then
  echo "== running agentcgd in the kernel lab instead (a real cgroup v2 kernel under QEMU)"
  exec "$KERNLAB" scripts/demo.sh
fi
echo "no kernel lab at $KERNLAB: nothing more to run here" >&2
exit 1
