#!/usr/bin/env python3
"""Protocol fuzzing at scale: a real agentcgd takes 100k+ fuzzed inputs from
root and from an unprivileged uid, and must answer all of them.

Inputs come from tests/protocol_fuzz.py (the CI test's generator, driven by
hypothesis): requests built from every op's schema with fields well-typed,
wrongly typed, missing or extra, and raw byte mutations. With --atheris N,
N more raw-byte inputs come from libFuzzer's mutator (atheris), guided by
coverage of the protocol decoder run in the fuzzer process; each is sent to
the daemon as it is.

Workers (--workers, half of them as --uid, default 65534) each send their
share on fresh connections. Every input is checked as in the CI test
(answered within the deadline, one answer per complete line, documented
codes, never internal); after each chunk the daemon must be alive with the
same pid. Result: bench/results/reliability/fuzz.json (inputs per uid, error
codes seen, violations, hangs, crashes, pid unchanged, daemon log lines per
1000 bad inputs, commit, host).

    sudo python bench/fuzz.py --inputs 100000 --atheris 20000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import protocol_fuzz as fz  # noqa: E402
from agentcg.adapters.cgroupfs import detect_hierarchy  # noqa: E402
from bench.replay.run import source_commit  # noqa: E402
from conftest import cgroup2_mount, remove_daemon_tree  # noqa: E402

CHUNK = 2000          # inputs per hypothesis run (one seed each)
ATHERIS_REPORT = 500  # the atheris worker rewrites its tally every this many inputs


def fuzz_worker(sock: str, n: int, seed: int, pid: int, alive: Any) -> dict[str, Any]:
    """n hypothesis inputs in chunks; stops early if the daemon dies."""
    driver = fz.Driver(sock)
    try:
        done = 0
        while done < n:
            k = min(CHUNK, n - done)
            fz.run(driver, k, seed * 1_000_003 + done, pid)
            done += k
            if not alive():
                break
    finally:
        driver.close()
    return driver.tally.to_dict()


def atheris_worker(sock: str, runs: int, out: str, corpus: str) -> None:
    """libFuzzer's byte mutator; never returns (libFuzzer exits the process)."""
    import atheris
    with atheris.instrument_imports():
        from agentcg import protocol as p
    driver = fz.Driver(sock)

    def one(data: bytes) -> None:
        for line in data.split(b"\n")[:50]:       # coverage of the decoder steers the mutator
            try:
                p.check_request(p.decode(line))
            except p.ProtocolError:
                pass
        driver.send(data)
        if driver.tally.inputs % ATHERIS_REPORT == 0:
            Path(out).write_text(json.dumps(driver.tally.to_dict()))

    os.makedirs(corpus, exist_ok=True)
    for i, msg in enumerate([p.request(1, "status"), p.request(2, "session.show", name="fz-a"),
                             p.request(3, "call.end", session="fz-a", call=1, exit_status=0),
                             p.request(4, "session.create", name="fz-b", intent={"memory": "64M"})]):
        Path(corpus, str(i)).write_bytes(p.encode(msg))
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-max_len=4096", "-print_final_stats=0", corpus], one)
    atheris.Fuzz()


def merge(tallies: list[dict[str, Any]]) -> dict[str, Any]:
    codes: Counter = Counter()
    out = {"inputs": 0, "lines": 0, "answers": 0, "followed": 0, "hangs": 0, "violation_count": 0,
           "violations": []}
    for t in tallies:
        for k in ("inputs", "lines", "answers", "followed", "hangs", "violation_count"):
            out[k] += t.get(k, 0)
        out["violations"] += t.get("violations", [])[: 20 - len(out["violations"])]
        codes.update(t.get("codes", {}))
    out["codes"] = dict(codes.most_common())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=100_000, help="hypothesis inputs in all (default %(default)s)")
    ap.add_argument("--atheris", type=int, default=20_000, help="atheris raw-byte inputs (0: none)")
    ap.add_argument("--workers", type=int, default=4, help="sender processes, half as --uid")
    ap.add_argument("--uid", type=int, default=65534, help="the unprivileged uid (default %(default)s)")
    ap.add_argument("--out", default=str(REPO / "bench/results/reliability/fuzz.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("fuzz.py: needs root (a daemon on a cgroup2 tree, and a second uid)", file=sys.stderr)
        return 2
    mnt = cgroup2_mount()
    if mnt is None:
        print("fuzz.py: no cgroup2 mount", file=sys.stderr)
        return 2
    tag = f"agentcg-fuzz-{os.getpid()}"
    root, runtime = mnt / tag, Path("/tmp") / tag
    runtime.mkdir(mode=0o755)
    os.chmod(runtime, 0o755)
    log_path = str(runtime / "agentcgd.log")
    sock = str(runtime / "agentcg.sock")
    commit = source_commit()     # of the code that runs, before anything else is committed
    proc = fz.start_agentcgd(str(root), str(runtime), log_path)
    started = time.monotonic()
    try:
        pid = fz.daemon_pid(sock)
        log_start = len(Path(log_path).read_text().splitlines())

        def alive() -> bool:
            """The same daemon still answers status (callable from the workers)."""
            try:
                return fz.daemon_pid(sock) == pid
            except (OSError, ValueError, fz.p.ProtocolError, StopIteration):
                return False
        per = args.inputs // args.workers
        jobs = []
        for i in range(args.workers):
            uid = args.uid if i % 2 else None
            n = per + (args.inputs - per * args.workers if i == 0 else 0)
            jobs.append((uid, fz.fork_as(uid, lambda n=n, i=i: fuzz_worker(sock, n, i + 1, pid, alive))))
        by_uid: dict[str, list[dict[str, Any]]] = {}
        for uid, (wpid, r) in jobs:
            by_uid.setdefault(str(0 if uid is None else uid), []).append(fz.collect(wpid, r))
        atheris_tally: dict[str, Any] | None = None
        atheris_note = None
        if args.atheris:
            out = str(runtime / "atheris.json")
            w = subprocess.run([sys.executable, __file__, "--atheris-worker", sock, str(args.atheris), out,
                                str(runtime / "corpus")],
                               capture_output=True, text=True)
            if Path(out).exists():
                atheris_tally = json.loads(Path(out).read_text())
                by_uid.setdefault("0", []).append(atheris_tally)
            else:
                atheris_note = f"atheris worker wrote nothing (rc {w.returncode}): {w.stderr[-500:]}"
        still = proc.poll() is None and alive()
        log_lines = Path(log_path).read_text().splitlines()[log_start:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        remove_daemon_tree(root)
        shutil.rmtree(runtime, ignore_errors=True)
    errors = [t for ts in by_uid.values() for t in ts if "error" in t]
    total = merge([t for ts in by_uid.values() for t in ts])
    bad = sum(n for code, n in total["codes"].items() if code != "ok")
    hier = detect_hierarchy()
    result = {
        "inputs": total["inputs"],
        "hypothesis_inputs": args.inputs,
        "atheris_inputs": atheris_tally["inputs"] if atheris_tally else 0,
        "atheris": atheris_note or "libFuzzer mutator (atheris), raw bytes, decoder coverage in the sender",
        "inputs_by_uid": {uid: sum(t.get("inputs", 0) for t in ts) for uid, ts in by_uid.items()},
        "answers_owed": total["lines"], "answers": total["answers"], "followed_streams": total["followed"],
        "codes": total["codes"],
        "violations": total["violation_count"], "violation_examples": total["violations"],
        "hangs": total["hangs"],
        "crashes": 0 if still else 1, "daemon_pid_unchanged": still,
        "worker_errors": [t["error"] for t in errors],
        "error_answers": bad,
        "log_lines": len(log_lines),
        "log_lines_by_level": dict(Counter(ln.split()[1] for ln in log_lines if len(ln.split()) > 1)),
        # which lines: level, logger and the first words (numbers dropped), most frequent first
        "log_lines_by_kind": dict(Counter(" ".join(w for w in ln.split()[1:7] if not w.rstrip(":,").isdigit())
                                          for ln in log_lines).most_common(15)),
        "log_lines_per_1000_bad_inputs": round(1000 * len(log_lines) / max(1, bad), 3),
        "tracebacks_in_log": sum("Traceback" in ln for ln in log_lines),
        "max_message_bytes": fz.SMALL_MAX_BYTES,
        "wall_s": round(time.monotonic() - started, 1),
        "commit": commit,
        "host": {"node": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "cgroup2": str(mnt),
                 "hierarchy": hier.to_dict().get("kind")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("inputs", "inputs_by_uid", "violations", "hangs", "crashes",
                                             "daemon_pid_unchanged", "log_lines_per_1000_bad_inputs",
                                             "wall_s")}))
    return 0 if still and not total["violation_count"] and not errors else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--atheris-worker":
        atheris_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    sys.exit(main())
