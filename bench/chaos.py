"""chaos: tool calls from several sessions while agentcgd is kill -9ed at
random moments and restarted.

    sudo .venv/bin/python bench/chaos.py --calls 1000        # writes bench/results/reliability/chaos.json

Sessions run side by side: most through the Python client (clone_into
placement, and one with the waiting-child placement), two through the
`agentcg run` CLI (one process per call). Each call runs
`sh -c 'sleep T; exit S'` with its own expected status S and its own name,
so that every result and every call.end event can be checked. Meanwhile a
killer sends SIGKILL to the daemon at random intervals and starts it again
at once, as systemd's Restart=always would (the socket file stays).

Counted at the end: calls whose exit status was lost or wrong (or that came
back unaccounted), call cgroups left in the tree after every session ended,
and call.end events per call in the event log (missing, duplicated, or
with a status other than the tool's).

It runs on any cgroup2 mount (a hybrid host's /sys/fs/cgroup/unified with no
controllers will do: placement, restore and accounting are what is tested,
not limits); the kernel lab is 10-20x slower and each CLI process there
takes ~1.5 s to start, which puts 1,000 calls out of reach of a test run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentcg.adapters.cgroupfs import detect_hierarchy  # noqa: E402
from agentcg.client import Client  # noqa: E402
from bench.replay.run import source_commit  # noqa: E402

RESULT = REPO / "bench" / "results" / "reliability" / "chaos.json"
BIN = Path(sys.executable).parent


class Daemon:
    """agentcgd on its own cgroup root; kill() and start() as a crash and systemd's restart."""

    def __init__(self, root: Path, runtime: Path):
        self.root, self.runtime = root, runtime
        self.socket = str(runtime / "agentcg.sock")
        self.args = [sys.executable, "-m", "agentcg.daemon.app", "--cgroup-root", str(root),
                     "--runtime-dir", str(runtime), "--log-level", "error", "--no-require-controllers"]
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stderr=subprocess.DEVNULL)

    def wait_listening(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                Client(self.socket, reconnect_timeout_s=0).status()
                return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("agentcgd did not start listening")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def expected_status(i: int) -> int:
    return 1 + (i * 37) % 120          # 1..120: 0 never, so a silent success is wrong too


def tool_argv(i: int, rng: random.Random) -> list[str]:
    return ["sh", "-c", f"sleep {rng.choice(['0', '0.02', '0.1', '0.3'])}; exit {expected_status(i)}"]


def client_session(d: Daemon, name: str, indices: list[int], out: dict[int, dict[str, Any]],
                   seed: int, clone_into: bool | None) -> None:
    rng = random.Random(seed)
    c = Client(d.socket, clone_into=clone_into, wait_for_daemon=True)
    s = c.session(name, exist_ok=True, end_on_exit=False)
    for i in indices:
        try:
            r = s.run(tool_argv(i, rng), name=f"chaos-{i}")
            out[i] = {"status": r.exit_status, "unaccounted": r.unaccounted, "via": "client"}
        except Exception as exc:           # a lost call: counted, never raised
            out[i] = {"status": None, "error": repr(exc), "via": "client"}


def cli_session(d: Daemon, name: str, indices: list[int], out: dict[int, dict[str, Any]], seed: int) -> None:
    rng = random.Random(seed)
    exe = BIN / "agentcg"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "agentcg.cli.main"]
    env = dict(os.environ, AGENTCG_SOCKET=d.socket)
    Client(d.socket, wait_for_daemon=True).session(name, exist_ok=True, end_on_exit=False)
    for i in indices:
        p = subprocess.run(cmd + ["run", "--session", name, "--name", f"chaos-{i}", "--", *tool_argv(i, rng)],
                           env=env, capture_output=True, text=True, timeout=300)
        out[i] = {"status": p.returncode, "unaccounted": "could not be accounted" in p.stderr or None,
                  "via": "cli", **({"stderr": p.stderr[-400:]} if p.returncode != expected_status(i) else {})}


def killer(d: Daemon, stop: threading.Event, counts: dict[str, int], interval_s: tuple[float, float],
           seed: int) -> None:
    rng = random.Random(seed)
    while not stop.wait(rng.uniform(*interval_s)):
        d.kill()
        counts["kills"] += 1
        time.sleep(rng.uniform(0, 0.3))   # clients meet a refusing socket meanwhile
        d.start()
        counts["restarts"] += 1


def check(d: Daemon, calls: int, out: dict[int, dict[str, Any]]) -> dict[str, Any]:
    wrong = [i for i in range(calls) if out.get(i, {}).get("status") != expected_status(i)]
    unaccounted = [i for i in range(calls) if out.get(i, {}).get("unaccounted")]
    ends: dict[int, list[dict[str, Any]]] = {}
    for line in (d.runtime / "events.jsonl").read_text().splitlines():
        ev = json.loads(line)
        name = str(ev.get("name") or "")
        if ev.get("type") == "call.end" and name.startswith("chaos-"):
            ends.setdefault(int(name[6:]), []).append(ev)
    missing = [i for i in range(calls) if i not in ends]
    duplicate = [i for i, evs in ends.items() if len(evs) > 1]
    wrong_event = [i for i, evs in ends.items() if any(e.get("exit_status") != expected_status(i) for e in evs)]
    leaked = sorted(str(p.relative_to(d.root)) for p in d.root.glob("s-*/c-*")) if d.root.exists() else []
    return {"wrong_or_lost_statuses": len(wrong), "unaccounted_calls": len(unaccounted),
            "missing_end_events": len(missing), "duplicate_end_events": len(duplicate),
            "wrong_status_in_events": len(wrong_event), "leaked_call_cgroups": len(leaked),
            "examples": {"wrong": {i: out.get(i) for i in wrong[:5]}, "missing": missing[:5],
                         "duplicate": duplicate[:5], "wrong_event": wrong_event[:5], "leaked": leaked[:5]}}


def run_chaos(calls: int = 1000, client_sessions: int = 4, cli_sessions: int = 2, cli_share: float = 0.2,
              interval_s: tuple[float, float] = (0.5, 2.0), seed: int = 1,
              root: Path | None = None) -> dict[str, Any]:
    mount = detect_hierarchy().cgroup2_mount
    if mount is None:
        raise SystemExit("chaos: no cgroup2 mount")
    tag = f"agentcg-chaos-{os.getpid()}"
    root = root or Path(mount) / tag
    runtime = Path("/tmp") / tag
    runtime.mkdir(mode=0o755, exist_ok=True)
    d = Daemon(root, runtime)
    d.start()
    d.wait_listening()
    rng = random.Random(seed)
    order = list(range(calls))
    rng.shuffle(order)
    n_cli = int(calls * cli_share) if cli_sessions else 0
    groups = [order[j:n_cli:cli_sessions] for j in range(cli_sessions)] + \
             [order[n_cli + j::client_sessions] for j in range(client_sessions)]
    out: dict[int, dict[str, Any]] = {}
    threads = [threading.Thread(target=cli_session, args=(d, f"chaos-cli-{j}", groups[j], out, seed + j))
               for j in range(cli_sessions)]
    threads += [threading.Thread(target=client_session,
                                 args=(d, f"chaos-py-{j}", groups[cli_sessions + j], out, seed + 100 + j,
                                       False if j == 0 else None))
                for j in range(client_sessions)]
    counts = {"kills": 0, "restarts": 0}
    stop = threading.Event()
    kt = threading.Thread(target=killer, args=(d, stop, counts, interval_s, seed + 1000))
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        kt.start()
        for t in threads:
            t.join()
        stop.set()
        kt.join()
        wall_s = time.monotonic() - t0
        d.wait_listening()
        c = Client(d.socket)
        for s in c.sessions():
            c.request("session.end", name=s["name"], force=True)
        result = check(d, calls, out)
    finally:
        stop.set()
        d.kill()
        _remove_tree(root)
        shutil.rmtree(runtime, ignore_errors=True)
    return {"calls": calls, "via_cli": n_cli, "via_client": calls - n_cli,
            "sessions": client_sessions + cli_sessions, **counts, "wall_s": round(wall_s, 1), **result}


def _remove_tree(root: Path) -> None:
    from agentcg.adapters.cgroupfs import CgroupFs
    from agentcg.adapters.executor import Executor
    if not root.exists():
        return
    fs = CgroupFs(root)
    for rel in fs.children(""):   # sessions, and the daemon's leaf (a helper may still be exiting)
        Executor(fs).kill(rel)
        fs.wait_unpopulated(rel, 5)
        fs.remove_tree(rel)
    fs.remove_tree("")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("chaos: needs root (it runs agentcgd on a cgroup2 tree)")
    res = run_chaos(args.calls, seed=args.seed)
    res.update(commit=source_commit(), host={"node": platform.node(), "kernel": platform.release(),
                                             "cpus": os.cpu_count(),
                                             "cgroup2": detect_hierarchy().cgroup2_mount})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
