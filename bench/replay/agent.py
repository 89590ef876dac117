"""One replayed session: this process is the agent; each tool call is a forked
child placed in its own tool-call cgroup by agentcgd before it starts.

    python -m bench.replay.agent --plan P.json --socket S --session NAME --priority 8 \
        --speedup 10 --out result.json

The agent follows the recorded timeline (divided by the speed-up), holding
its recorded memory; it waits for the result of each call it depends on, so a
call that runs late (throttled, frozen) delays everything after it, as it
would delay a real agent. A call process allocates and touches memory along
its recorded profile and burns its recorded CPU share; time it loses is not
made up. Writes a JSON result: start/end (CLOCK_MONOTONIC ns), every call's
exit and the policy's feedback. Next to it, `<out>.bursts` gets one line per
memory event of a call, "<call> <t_ns> <bytes> <kind>":
  burst  the recorded profile climbs by burst_min within the next recorded
         second (logged when the climb starts);
  mark   the call is about to allocate past its cgroup's memory.high (logged
         before the allocation, once per memory.high value): from here the
         kernel throttles it unless the policy raises the mark, so this is the
         moment a policy has to act on.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import sys
import threading
import time

from agentcg.client import Client
from bench.replay.plan import CallPlan, SessionPlan

CHUNK = 4 << 20
STEP_S = 0.01


class Holder:
    """Holds `n` bytes of touched anonymous memory, in 4 MiB chunks, each its
    own anonymous mapping: a chunk given back is unmapped at once, and a
    forked tool call can unmap the agent's chunks (release) so that it holds
    only its own memory, as an exec'd tool would. (Without that, every call
    process would map the agent's whole heap copy-on-write, its resident size
    would equal the agent's, and the kernel's OOM killer would see calls as
    big as agents.)"""

    def __init__(self) -> None:
        self.chunks: list[mmap.mmap] = []

    @property
    def held(self) -> int:
        return len(self.chunks) * CHUNK

    def set(self, n: int) -> None:
        want = (n + CHUNK // 2) // CHUNK
        while len(self.chunks) < want:
            b = mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            b[::4096] = b"\x01" * (CHUNK // 4096)  # fault every page in
            self.chunks.append(b)
        while len(self.chunks) > want:
            self.chunks.pop().close()

    def release(self) -> None:
        """Unmap every chunk (in a forked child: the parent keeps its own)."""
        while self.chunks:
            self.chunks.pop().close()


def _interp(prof: list, t: float) -> float:
    prev_t, prev_b = 0.0, 0.0
    for pt, pb in prof:
        if t < pt:
            if pt <= prev_t:
                return pb
            return prev_b + (pb - prev_b) * (t - prev_t) / (pt - prev_t)
        prev_t, prev_b = pt, pb
    return prev_b


class OwnCgroup:
    """memory.high and memory.current of the cgroup this process runs in
    (read with pread on fds kept open: a few microseconds per look)."""

    def __init__(self, mount: str) -> None:
        self.fds: dict[str, int] = {}
        try:
            with open("/proc/self/cgroup") as f:
                rel = next((ln.split("::", 1)[1].strip() for ln in f if ln.startswith("0::")), None)
            if rel is None:
                return
            for name in ("memory.high", "memory.current"):
                self.fds[name] = os.open(os.path.join(mount, rel.lstrip("/"), name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fds = {}

    def read(self, name: str) -> int | None:
        """The file's value; None for "max" or when it cannot be read."""
        fd = self.fds.get(name)
        if fd is None:
            return None
        try:
            text = os.pread(fd, 64, 0).strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None


def run_call(call: CallPlan, speedup: float, burst_min: int, log_fd: int, n: int, mount: str = "") -> None:
    """The tool call's process body."""
    h = Holder()
    own = OwnCgroup(mount) if mount else None
    marked: int | None = None  # the memory.high already reported as reached
    dur = call.t_end - call.t_start
    tau = 0.0
    deadline = time.monotonic()
    d_tau = STEP_S * speedup
    in_burst = False
    while True:
        upto = [b for t, b in call.profile if tau < t <= tau + d_tau]
        target = int(max([_interp(call.profile, tau)] + upto))
        # a burst: the recorded profile climbs by burst_min within the next recorded second
        ahead = max([b for t, b in call.profile if tau < t <= tau + 1.0] + [target])
        if ahead - h.held >= burst_min and target > h.held and not in_burst:
            os.write(log_fd, f"{n} {time.monotonic_ns()} {target - h.held} burst\n".encode())
            in_burst = True
        elif ahead <= h.held:
            in_burst = False
        grow = target - h.held
        if own is not None and grow > 0:
            high = own.read("memory.high")
            if high is not None and high != marked and (own.read("memory.current") or 0) + grow >= high:
                os.write(log_fd, f"{n} {time.monotonic_ns()} {grow} mark\n".encode())
                marked = high
        h.set(target)
        if call.cpu_frac > 0:
            end = time.perf_counter() + call.cpu_frac * STEP_S
            while time.perf_counter() < end:
                pass
        tau += d_tau
        if tau >= dur:
            break
        deadline += STEP_S
        now = time.monotonic()
        if now < deadline:
            time.sleep(deadline - now)
        else:
            deadline = now  # time lost to throttling or freezing is not made up


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replay.agent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--session", required=True)
    ap.add_argument("--priority", type=int, default=1)
    ap.add_argument("--speedup", type=float, default=10.0)
    ap.add_argument("--burst-min-bytes", type=int, default=32 << 20)
    ap.add_argument("--cgroup-mount", default="/sys/fs/cgroup",
                    help="cgroup2 mount, for each call's memory.high ('' = no mark events)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    with open(a.plan) as f:
        plan = SessionPlan.from_json(f.read())
    client = Client(a.socket)
    client.request("session.create", name=a.session, intent={"priority": a.priority}, exist_ok=True, retry_s=10)
    client.request("session.attach", name=a.session, pid=os.getpid(), retry_s=10)
    burst_path = a.out + ".bursts"
    log_fd = os.open(burst_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    agent = Holder()
    with open("/proc/self/statm") as f:  # the interpreter itself stands for part of the recorded agent
        own_bytes = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0 = time.monotonic()
    t0_ns = time.monotonic_ns()
    lag = 0.0
    done: dict[int, float] = {}
    results: list[dict] = [None] * len(plan.calls)  # type: ignore[list-item]
    cond = threading.Condition()

    def finish(i: int, pid: int, n: int, started: float) -> None:
        _pid, status = os.waitpid(pid, 0)
        end = time.monotonic()
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + sig
        try:
            rep = client.request("call.end", session=a.session, call=n, exit_status=code, retry_s=5)
            extra = (rep.get("stats") or {}).get("extra") or {}
            pol = extra.get("policy") or {}
            fb = [f.get("message", "") for f in rep.get("feedback", [])] + list(pol.get("feedback", []))
        except Exception as exc:  # keep the session going; the result says what happened
            pol, fb = {}, [f"call.end failed: {exc}"]
        results[i] = {"i": i, "n": n, "cmd": plan.calls[i].cmd[:80], "killed": sig == signal.SIGKILL,
                      "signal": sig, "exit": code, "start_s": started - t0, "end_s": end - t0,
                      "sched_end_s": plan.calls[i].t_end / a.speedup, "policy": pol, "feedback": fb[:4]}
        with cond:
            done[i] = end
            cond.notify_all()

    events = [(t, 0, k) for k, (t, _b) in enumerate(plan.agent)] + [(c.t_start, 1, i) for i, c in enumerate(plan.calls)]
    events.sort()
    threads = []
    for t, kind, k in events:
        due = t0 + t / a.speedup + lag
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        if kind == 0:
            agent.set(max(0, plan.agent[k][1] - own_bytes))
            continue
        call = plan.calls[k]
        for j in call.waits_for:
            with cond:
                while j not in done:
                    cond.wait()
            sched = t0 + plan.calls[j].t_end / a.speedup + lag
            if done[j] > sched:
                lag += done[j] - sched
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the tool call
            try:
                os.close(w)
                agent.release()  # a tool is a program of its own: it does not map the agent's memory
                n = int(os.read(r, 32) or b"0")
                if n:
                    run_call(call, a.speedup, a.burst_min_bytes, log_fd, n, a.cgroup_mount)
            finally:
                os._exit(0)
        os.close(r)
        started = time.monotonic()
        try:
            n = client.request("call.start", session=a.session, pid=pid, name=call.cmd[:60] or call.tool,
                               argv=[call.cmd[:200] or call.tool])["call"]
        except Exception as exc:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            results[k] = {"i": k, "error": str(exc), "killed": False}
            done[k] = time.monotonic()
            continue
        try:
            os.write(w, str(n).encode())
        except BrokenPipeError:
            pass  # the call was killed before it read its number: its exit status says so
        finally:
            os.close(w)
        th = threading.Thread(target=finish, args=(k, pid, n, started), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    end_due = t0 + plan.duration_s / a.speedup + lag
    if time.monotonic() < end_due:
        time.sleep(end_due - time.monotonic())
    end_ns = time.monotonic_ns()
    try:
        client.request("session.end", name=a.session, force=True)
    except Exception:
        pass
    with open(a.out, "w") as f:
        json.dump({"session": a.session, "trace": plan.trace, "priority": a.priority, "start_ns": t0_ns,
                   "end_ns": end_ns, "jct_s": (end_ns - t0_ns) / 1e9, "calls": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
