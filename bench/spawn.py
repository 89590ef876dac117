#!/usr/bin/env python3
"""What starting one child costs, by way of spawning, in one run; and whether
the child makes it to its exec while other threads want the interpreter lock.

Per spawn, each method starts /bin/true and waits for it:

  python_clone3  raw clone3(CLONE_INTO_CGROUP) through ctypes.PyDLL with the
                 child running Python (the ctypes calls) until its execve: the
                 client's former way on glibc < 2.39, kept here only to be
                 measured (it can hang in a multi-threaded caller)
  helper_vfork   the client's C helper (agentcg/client/spawn.c): clone3 with
                 CLONE_VM|CLONE_VFORK|CLONE_INTO_CGROUP, C only until execve
  helper_fork    the same helper, a fork-style clone3 (what it does off x86-64)
  posix_spawn    os.posix_spawn, no cgroup (bare)
  subprocess     subprocess.Popen, no cgroup (bare)

Latency rounds run interleaved (a few spawns of each in turn, order rotated
every round), at each caller size in --ballast-mb (a fork-style clone copies
the caller's page tables). The hang check then starts --hang-children
children per method from the main thread while eight threads spin in pure
Python, and counts children that did not exit within 10 s (killed). Children
go into a scratch cgroup on the cgroup2 mount; needs root.

    sudo .venv/bin/python bench/spawn.py --rounds 200
Result: bench/results/spawn.json.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from agentcg.client import _clone  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "spawn.json"
TRUE = "/bin/true"
HANG_WAIT_S = 10.0


# --- the former Python child (measured, not used by the client) ---------------

class CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


def _pydll() -> Any:
    lib = ctypes.PyDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    for name, args in (("execve", [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]),
                       ("dup2", [ctypes.c_int, ctypes.c_int]), ("write", [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]),
                       ("_exit", [ctypes.c_int])):
        getattr(lib, name).argtypes = args
    lib.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.signal.restype = ctypes.c_void_p
    return lib


_LIB = _pydll()


def python_clone3_spawn(prep: _clone.Prepared, cgroup_fd: int) -> _clone.ClonedProcess:
    """The former client path: the child runs Python bytecode until execve."""
    lib = _LIB
    pidfd = ctypes.c_int(-1)
    args = CloneArgs(flags=0x200000000 | 0x1000, pidfd=ctypes.addressof(pidfd),
                     exit_signal=signal.SIGCHLD, cgroup=cgroup_fd)
    r, w = os.pipe()
    err = ctypes.c_int(0)
    try:
        pid = lib.syscall(435, ctypes.byref(args), ctypes.c_size_t(88))
        if pid == 0:
            try:
                lib.signal(signal.SIGPIPE, None)
                lib.signal(signal.SIGXFSZ, None)
                lib.syscall(436, ctypes.c_uint(3), ctypes.c_uint(0xFFFFFFFF), ctypes.c_uint(1 << 2))
                for src, target in prep.dups:
                    lib.dup2(src, target)
                lib.execve(prep.path, prep.c_argv, prep.c_envp)
                err.value = ctypes.get_errno()
                lib.write(w, ctypes.addressof(err), 4)
            finally:
                lib._exit(127)
        if pid < 0:
            raise OSError(ctypes.get_errno(), "clone3")
    finally:
        os.close(w)
    data = os.read(r, 4)
    os.close(r)
    proc = _clone.ClonedProcess(prep.argv, pid, pidfd.value, int.from_bytes(data, sys.byteorder) if data else None)
    proc.how = "python_clone3"
    return proc


# --- methods -------------------------------------------------------------------

def cgroup_methods(cg_fd: int) -> dict[str, Callable[[list[str]], Any]]:
    def via(fn: Callable[..., Any], **kw: Any) -> Callable[[list[str]], Any]:
        def start(argv: list[str]) -> Any:
            prep = _clone.Prepared(argv, stdout=subprocess.DEVNULL)
            try:
                return fn(prep, cg_fd, **kw)
            finally:
                prep.close()
        return start
    methods = {"python_clone3": via(python_clone3_spawn)}
    if _clone.helper() is not None:
        if _clone.helper().agentcg_spawn_can_share_memory():
            methods["helper_vfork"] = via(_clone.helper_spawn, share_memory=True)
        methods["helper_fork"] = via(_clone.helper_spawn, share_memory=False)
    return methods


class _Bare:
    def __init__(self, pid: int):
        self.pid = pid

    def wait(self, timeout: float | None = None) -> int:
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])


def bare_methods() -> dict[str, Callable[[list[str]], Any]]:
    devnull = os.open(os.devnull, os.O_WRONLY)
    return {"posix_spawn": lambda argv: _Bare(os.posix_spawn(argv[0], argv, os.environ,
                                                             file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1)])),
            "subprocess": lambda argv: subprocess.Popen(argv, stdout=devnull)}


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    pick = lambda q: round(s[min(len(s) - 1, int(q * len(s)))] / 1000, 1)  # noqa: E731
    return {"p50_us": pick(0.50), "p90_us": pick(0.90), "p99_us": pick(0.99), "n": len(s)}


def latency(methods: dict[str, Callable[[list[str]], Any]], rounds: int, per_round: int) -> dict[str, Any]:
    start_ns: dict[str, list[int]] = {m: [] for m in methods}
    total_ns: dict[str, list[int]] = {m: [] for m in methods}
    names = list(methods)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(per_round):
                t0 = time.perf_counter_ns()
                proc = methods[name]([TRUE])
                t1 = time.perf_counter_ns()
                rc = proc.wait(10)
                t2 = time.perf_counter_ns()
                if rc != 0:
                    raise RuntimeError(f"{name}: /bin/true exited {rc}")
                start_ns[name].append(t1 - t0)
                total_ns[name].append(t2 - t0)
    return {m: {"spawn": percentiles_us(start_ns[m]), "spawn_and_wait": percentiles_us(total_ns[m])} for m in methods}


def hang_check(methods: dict[str, Callable[[list[str]], Any]], children: int, cgroup: Path) -> dict[str, Any]:
    """A child stuck before its exec holds up python_clone3_spawn too (it
    reads the exec-error pipe): a watchdog kills the cgroup's processes when
    no child got through for HANG_WAIT_S; such a child counts as hung."""
    stop = threading.Event()
    progress = [0]

    def spin() -> None:
        while not stop.is_set():
            pass

    def watchdog() -> None:
        seen = -1
        while not stop.wait(HANG_WAIT_S):
            if progress[0] == seen:
                # not cgroup.kill: after one, Linux 6.18 kills every later child born in the cgroup
                for pid in (cgroup / "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
            seen = progress[0]
    threads = [threading.Thread(target=spin, daemon=True) for _ in range(8)]
    threads.append(threading.Thread(target=watchdog, daemon=True))
    for t in threads:
        t.start()
    out: dict[str, Any] = {}
    try:
        for name, start in methods.items():
            hung = 0
            for i in range(children):
                proc = start(["/bin/sh", "-c", f"exit {i % 100}"])
                try:
                    rc = proc.wait(HANG_WAIT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
                ok = rc == i % 100
                if not ok and os.environ.get("SPAWN_DEBUG"):
                    print(f"{name} child {i}: exit {rc}", file=sys.stderr)
                hung += not ok
                progress[0] += 1
            out[name] = {"children": children, "hung": hung}
            print(f"hang check {name}: {hung}/{children} children did not exec", file=sys.stderr)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200, help="latency rounds per caller size (default 200)")
    ap.add_argument("--per-round", type=int, default=3, help="spawns of each method per round (default 3)")
    ap.add_argument("--ballast-mb", default="0,200", help="caller sizes to add, MB, comma-separated (default 0,200)")
    ap.add_argument("--hang-children", type=int, default=300, help="children per method in the hang check (0: skip)")
    ap.add_argument("--hang-ballast-mb", type=int, default=80,
                    help="caller size to add for the hang check, MB (default 80: a slower fork-style clone)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root (it creates a cgroup on the cgroup2 mount)")
    with open("/proc/self/mounts") as f:
        v2 = [m.split()[1] for m in f if m.split()[2] == "cgroup2"]
    if not v2:
        ap.error("no cgroup2 mount")
    cg = Path(v2[0]) / f"agentcg-bench-spawn-{os.getpid()}"
    cg.mkdir()
    cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    result: dict[str, Any] = {"host": {"kernel": platform.release(), "libc": " ".join(platform.libc_ver()),
                                       "cpus": os.cpu_count(), "python": platform.python_version()},
                              "settings": vars(a) | {"out": str(a.out)}, "latency": {}}
    try:
        methods = cgroup_methods(cg_fd) | bare_methods()
        for mb in [int(x) for x in a.ballast_mb.split(",") if x]:
            ballast = bytearray(mb << 20)
            ballast[::4096] = b"x" * len(ballast[::4096])    # touch every page: mapped, to be copied
            result["latency"][f"{mb}MB"] = latency(methods, a.rounds, a.per_round)
            del ballast
        if a.hang_children:
            ballast = [bytes(4096) for _ in range((a.hang_ballast_mb << 20) // 4096)]
            result["hang_check"] = hang_check(cgroup_methods(cg_fd), a.hang_children, cg)
            del ballast
    finally:
        os.close(cg_fd)
        cg.rmdir()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["latency"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
