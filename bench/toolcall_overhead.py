#!/usr/bin/env python3
"""What one tool call costs through agentcgd, next to the alternatives, in one run.

Per call, each method runs /bin/true and waits for it:

  bare     fork + exec + wait, no cgroup (subprocess.run)
  wrapper  a bash wrapper per call: mkdir a cgroup, move a subshell into it
           (echo $BASHPID > cgroup.procs), exec /bin/true, rmdir
  daemon   agentcgd through the stdlib client as it comes: call.start (the
           tool-call cgroup, made ahead; as root the child is born inside it
           through CLONE_INTO_CGROUP: posix_spawn where the C library offers
           it, glibc >= 2.39, else the C spawn helper; then call.started), run, call.end
           (collect stats; the cgroup is removed after the reply)
  daemon_pid  the same daemon with the client's clone_into off: a waiting
           child is moved into the cgroup by the daemon before it execs
  systemd  systemd-run --scope /bin/true (only where systemd is PID 1)

The methods run in interleaved rounds (a few calls of each in turn, order
rotated every round) so that they share the machine's noise; the result is
written to bench/results/toolcall_overhead.json. The script starts its own
agentcgd on a temporary cgroup root and removes everything it created.

    sudo python bench/toolcall_overhead.py --calls 2000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "toolcall_overhead.json"
TRUE = shutil.which("true") or "/bin/true"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._daemon import BenchDaemon  # noqa: E402

WRAPPER_SCRIPT = r"""
D="$1/w-$2"
mkdir "$D" || exit 90
( echo $BASHPID > "$D/cgroup.procs" && exec "$3" )
rc=$?
rmdir "$D" || exit 91
exit $rc
"""


# --- environment -------------------------------------------------------------

def cgroup_mode() -> tuple[str, Path | None]:
    """('unified'|'hybrid'|'legacy', the cgroup2 mount to use)."""
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f]
    v2 = [Path(m[1]) for m in mounts if len(m) > 2 and m[2] == "cgroup2"]
    if Path("/sys/fs/cgroup") in v2:
        return "unified", Path("/sys/fs/cgroup")
    if v2:
        return "hybrid", v2[0]
    return "legacy", None


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemd-run") is not None


def environment(mode: str, root: Path) -> dict:
    controllers = ""
    try:
        controllers = (root / "cgroup.controllers").read_text().strip()
    except OSError:
        pass
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "cgroup_mode": mode,
        "cgroup_root": str(root),
        "controllers": controllers,
        "python": platform.python_version(),
        "libc": " ".join(platform.libc_ver()),
        "systemd": systemd_running(),
    }


# --- statistics --------------------------------------------------------------

def percentile_us(samples_ns: list[int], pct: float) -> float:
    """Nearest-rank percentile in microseconds."""
    ordered = sorted(samples_ns)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil
    return round(ordered[int(rank) - 1] / 1000, 1)


# --- methods -----------------------------------------------------------------

class Bare:
    name = "bare"

    def call(self, i: int) -> None:
        rc = subprocess.run([TRUE]).returncode
        if rc != 0:
            raise RuntimeError(f"bare /bin/true exited {rc}")

    def close(self) -> None:
        pass


class Wrapper:
    name = "wrapper"

    def __init__(self, parent: Path):
        self.parent = parent

    def call(self, i: int) -> None:
        rc = subprocess.run(["bash", "-c", WRAPPER_SCRIPT, "wrapper", str(self.parent), str(i), TRUE]).returncode
        if rc != 0:
            raise RuntimeError(f"wrapper exited {rc} (90: mkdir failed, 91: rmdir failed)")

    def close(self) -> None:
        pass


class SystemdScope:
    name = "systemd"

    def call(self, i: int) -> None:
        rc = subprocess.run(["systemd-run", "--scope", "--quiet", "--collect", TRUE]).returncode
        if rc != 0:
            raise RuntimeError(f"systemd-run --scope exited {rc}")

    def close(self) -> None:
        pass


class Daemon:
    """An agentcgd of our own on `root`, reached through the stdlib client."""
    name = "daemon"

    def __init__(self, root: Path, workdir: Path, require_controllers: bool):
        from agentcg.client import Client

        self.root = root
        self.agentcgd = BenchDaemon(root, workdir, require_controllers=require_controllers, start_timeout_s=20)
        self.socket = self.agentcgd.socket
        self.proc = self.agentcgd.proc
        self.client = Client(socket_path=str(self.socket))
        # round-trip time of each request, to split the added cost into its parts
        self.request_ns: dict[str, list[int]] = {"call.start": [], "call.started": [], "call.end": []}
        plain_request = self.client.request

        def timed_request(op, **fields):
            t0 = time.perf_counter_ns()
            try:
                return plain_request(op, **fields)
            finally:
                if op in self.request_ns and self.timing:
                    self.request_ns[op].append(time.perf_counter_ns() - t0)

        self.timing = False
        self.client.request = timed_request
        # the child's start (clone_into: posix_spawn or the C helper into the call cgroup)
        from agentcg.client import _clone
        self.request_ns["spawn"] = []
        plain_spawn = _clone.spawn

        def timed_spawn(prep, cgroup_fd, *args, **kwargs):
            t0 = time.perf_counter_ns()
            try:
                proc = plain_spawn(prep, cgroup_fd, *args, **kwargs)
            finally:
                if self.timing:
                    self.request_ns["spawn"].append(time.perf_counter_ns() - t0)
            self.spawn_how = getattr(proc, "how", None)
            return proc

        self.spawn_how = None
        _clone.spawn = timed_spawn
        self._session_cm = self.client.session("bench")
        self.session = self._session_cm.__enter__()

    def call(self, i: int) -> None:
        with self.session.tool_call("true") as call:
            result = call.run([TRUE])
        if result.exit_status != 0:
            raise RuntimeError(f"daemon tool call exited {result.exit_status}")

    def close(self) -> None:
        try:
            self._session_cm.__exit__(None, None, None)
        finally:
            self.agentcgd.stop()


class DaemonPid:
    """The same agentcgd, placing a waiting child by pid (clone_into off)."""
    name = "daemon_pid"

    def __init__(self, daemon: Daemon):
        from agentcg.client import Client

        self.client = Client(socket_path=str(daemon.socket), clone_into=False)
        self.session = self.client.session("bench-pid")

    def call(self, i: int) -> None:
        with self.session.tool_call("true") as call:
            result = call.run([TRUE])
        if result.exit_status != 0 or call.handle.placement != "pid":
            raise RuntimeError(f"daemon_pid tool call exited {result.exit_status} ({call.handle.placement})")

    def close(self) -> None:
        try:
            self.session.end(force=True)
        finally:
            self.client.close()


# --- cgroup housekeeping -----------------------------------------------------

def remove_tree(path: Path) -> None:
    """rmdir a cgroup subtree bottom-up; processes still inside are killed first."""
    if not path.is_dir():
        return
    kill = path / "cgroup.kill"
    if kill.exists():
        try:
            kill.write_text("1")
        except OSError:
            pass
    for _ in range(50):
        dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        try:
            for d in dirs + [path]:
                d.rmdir()
            return
        except FileNotFoundError:
            continue
        except OSError:
            time.sleep(0.1)
    print(f"warning: could not remove {path}", file=sys.stderr)


def enable_like(parent: Path, model: Path) -> None:
    """Enable in `parent` the controllers `model` enables for its children (a fair wrapper)."""
    try:
        wanted = (model / "cgroup.subtree_control").read_text().split()
    except OSError:
        return
    if wanted:
        (parent / "cgroup.subtree_control").write_text(" ".join("+" + c for c in wanted))


# --- main --------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    mode, mount = cgroup_mode()
    if mount is None:
        sys.exit("no cgroup2 mount on this host: nothing to compare")
    if os.geteuid() != 0:
        sys.exit("needs root (creates cgroups)")
    base = Path(args.root) if args.root else mount / f"agentcg-bench-{os.getpid()}"
    if base.exists():
        sys.exit(f"{base} exists already: pass another --root")
    methods_wanted = args.methods.split(",")
    base.mkdir()
    workdir = Path(tempfile.mkdtemp(prefix="agentcg-bench-"))
    methods: list = []
    skipped: dict[str, str] = {}
    try:
        wrapper_parent = base / "wrapper"
        wrapper_parent.mkdir()
        if "daemon" in methods_wanted:
            controllers = set((mount / "cgroup.controllers").read_text().split())
            has_controllers = {"memory", "cpu"} <= controllers
            daemon = Daemon(base / "daemon-root", workdir, require_controllers=has_controllers)
            methods.append(daemon)
            enable_like(wrapper_parent, base / "daemon-root")
            if "daemon_pid" in methods_wanted:
                methods.insert(0, DaemonPid(daemon))   # closed before the daemon stops
        if "bare" in methods_wanted:
            methods.append(Bare())
        if "wrapper" in methods_wanted:
            methods.append(Wrapper(wrapper_parent))
        if "systemd" in methods_wanted:
            if systemd_running():
                methods.append(SystemdScope())
            else:
                skipped["systemd"] = "systemd is not PID 1 here (/run/systemd/system missing)"
        samples: dict[str, list[int]] = {m.name: [] for m in methods}
        placement = None
        if any(m.name == "daemon" for m in methods):
            probe = next(m for m in methods if m.name == "daemon").session.tool_call("probe")
            probe.run([TRUE])
            placement = probe.handle.placement
        # warm-up: page cache, the daemon's first cgroup, bash's startup files
        for m in methods:
            for i in range(args.warmup):
                m.call(-1 - i)
        for m in methods:
            m.timing = True
        rounds = -(-args.calls // args.round_size)
        counter = 0
        t_start = time.monotonic()
        for r in range(rounds):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            n = min(args.round_size, args.calls - r * args.round_size)
            for m in order:
                for _ in range(n):
                    counter += 1
                    t0 = time.perf_counter_ns()
                    m.call(counter)
                    samples[m.name].append(time.perf_counter_ns() - t0)
            done = (r + 1) * args.round_size
            if not args.quiet and (r % 10 == 9 or r == rounds - 1):
                print(f"  {min(done, args.calls)}/{args.calls} calls per method "
                      f"({time.monotonic() - t_start:.0f}s)", file=sys.stderr)
    finally:
        for m in methods:
            m.close()
        remove_tree(base)
        shutil.rmtree(workdir, ignore_errors=True)

    result: dict = {"calls": args.calls, "warmup": args.warmup, "round_size": args.round_size}
    for name, s in samples.items():
        result[f"{name}_p50_us"] = percentile_us(s, 50)
        result[f"{name}_p99_us"] = percentile_us(s, 99)
        result[f"{name}_mean_us"] = round(sum(s) / len(s) / 1000, 1)
    if "daemon" in samples and "bare" in samples:
        result["added_p50_us"] = round(result["daemon_p50_us"] - result["bare_p50_us"], 1)
        result["added_p99_us"] = round(result["daemon_p99_us"] - result["bare_p99_us"], 1)
    if "daemon" in samples and "wrapper" in samples:
        result["daemon_over_wrapper_p99"] = round(result["daemon_p99_us"] / result["wrapper_p99_us"], 3)
    if "daemon_pid" in samples and "bare" in samples:
        result["added_pid_p50_us"] = round(result["daemon_pid_p50_us"] - result["bare_p50_us"], 1)
        result["added_pid_p99_us"] = round(result["daemon_pid_p99_us"] - result["bare_p99_us"], 1)
    result["daemon_placement"] = placement
    daemon = next((m for m in methods if m.name == "daemon"), None)
    if daemon is not None:
        result["daemon_spawn"] = daemon.spawn_how
        for op, s in daemon.request_ns.items():
            if not s:
                continue
            key = op.replace(".", "_")
            result[f"daemon_{key}_p50_us"] = percentile_us(s, 50)
            result[f"daemon_{key}_p99_us"] = percentile_us(s, 99)
    result["skipped"] = skipped
    result["environment"] = environment(mode, mount)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Cost of one tool call through agentcgd vs. bare fork/exec, a bash cgroup "
                    "wrapper and systemd-run --scope, measured side by side in one run.",
        epilog="example: sudo python bench/toolcall_overhead.py --calls 2000")
    p.add_argument("--calls", type=int, default=1000, help="timed calls per method (default 1000)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls per method first (default 20)")
    p.add_argument("--round-size", type=int, default=20,
                   help="calls of one method before switching to the next (default 20)")
    p.add_argument("--root", help="cgroup directory to create and work in (default: "
                                  "<cgroup2 mount>/agentcg-bench-<pid>; removed at the end)")
    p.add_argument("--methods", default="bare,wrapper,daemon,daemon_pid,systemd",
                   help="comma-separated subset of bare,wrapper,daemon,daemon_pid,systemd "
                        "(daemon_pid needs daemon)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"result JSON (default {DEFAULT_OUT})")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.calls < 1 or args.round_size < 1 or args.warmup < 0:
        p.error("--calls and --round-size must be >= 1, --warmup >= 0")
    unknown = set(args.methods.split(",")) - {"bare", "wrapper", "daemon", "daemon_pid", "systemd"}
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}")
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    names = [n for n in ("bare", "wrapper", "daemon", "daemon_pid", "systemd") if f"{n}_p50_us" in result]
    print(f"{'method':<10}{'p50 us':>10}{'p99 us':>10}{'mean us':>10}")
    for n in names:
        print(f"{n:<10}{result[n + '_p50_us']:>10}{result[n + '_p99_us']:>10}{result[n + '_mean_us']:>10}")
    for n, why in result["skipped"].items():
        print(f"{n:<10} skipped: {why}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
