#!/usr/bin/env bash
# The whole test suite, as CI runs it:
#   1. set up (scripts/setup.sh),
#   2. every tier that this host can run natively (unit, fakefs, worker,
#      kernel tests that need only BPF or any cgroup2 mount, GPU tests when
#      there is a GPU),
#   3. the kernlab tier (tests that need cgroup v2 controllers or sched_ext):
#      natively where the host has them, otherwise in ONE boot of the kernel lab
#      (../shared/kernlab/kernlab.sh), with AGENTCG_REQUIRE_KERNEL=1 so that a
#      missing feature fails instead of skipping.
# Extra arguments go to both pytest runs (e.g. -x, -k NAME).
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1
PY=.venv/bin/python
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
KERNLAB=${KERNLAB_SH:-../shared/kernlab/kernlab.sh}
rc=0

echo "== tier: unit, fakefs, worker, host kernel, gpu (native)"
$PY -m pytest -q -m "not kernlab" "$@" tests
r=$?; [ $r -eq 0 ] || [ $r -eq 5 ] || rc=1

have_v2=$($PY - <<'PY'
import os
ok = False
try:
    ctrl = open("/sys/fs/cgroup/cgroup.controllers").read().split()
    ok = {"memory", "cpu", "pids"} <= set(ctrl) and os.path.isdir("/sys/kernel/sched_ext")
except OSError:
    pass
print("yes" if ok and os.geteuid() == 0 else "no")
PY
)
echo "== tier: kernlab (cgroup v2 controllers, sched_ext)"
if [ "$have_v2" = yes ]; then
  AGENTCG_REQUIRE_KERNEL=1 $PY -m pytest -q -m kernlab "$@" tests/kernel
  r=$?
elif [ -x "$KERNLAB" ] && [ "$(id -u)" = 0 ]; then
  echo "host lacks cgroup v2 controllers or sched_ext: running this tier in the kernel lab (one boot)"
  AGENTCG_REQUIRE_KERNEL=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 KERNLAB_MEM=${KERNLAB_MEM:-6G} \
    "$KERNLAB" $PY -m pytest -q -p no:cacheprovider -m kernlab "$@" tests/kernel
  r=$?
else
  echo "SKIPPED: no cgroup v2 controllers here and no kernel lab at $KERNLAB (or not root)"
  r=0
fi
[ $r -eq 0 ] || [ $r -eq 5 ] || rc=1
[ $rc -eq 0 ] && echo "== all tiers passed" || echo "== FAILED"
exit $rc
