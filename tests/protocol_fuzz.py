"""The protocol fuzzer shared by tests/kernel/test_protocol_fuzz.py and
bench/fuzz.py: hypothesis strategies for what a client can send, a driver
that sends one input per connection to a real agentcgd, and the properties
every answer must have.

Inputs: requests built from each op's schema (agentcg.protocol.SCHEMAS), each
field well-typed, wrongly typed, missing, or joined by extra fields, with
huge, negative, float and unicode values; and raw bytes: truncated,
invalid UTF-8, not an object, many lines, no newline, deep nesting, lines
over the size limit, random bytes.

Properties, per input: the connection is answered and closed within
`deadline_s` (never hangs); each complete line gets one answer, a line over
the cap gets too_large and the connection is closed; every error carries a
documented code and never `internal`.

Well-typed pids are only ever the driver's own sleeping child, the daemon's
pid, or out of range: a root caller may place any process, and the fuzzer
must never move one of the host's into a test cgroup.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from agentcg import protocol as p

# session names the fuzzer may create; other names it draws are never valid ones
NAMES = ("fz-a", "fz-b", "fz-c")
SMALL_MAX_BYTES = 64 * 1024     # the fuzzed daemon's line cap: cheap to exceed


# -- strategies ---------------------------------------------------------------
def _odd_text() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=20), st.sampled_from(["", "\ud800", "\udfff\ud800", "\x00", "é" * 50,
                                                            "../../etc", "s-fz-a", "\U0001f600", " " * 3]))


_SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.sampled_from([0, -1, 1 << 31, 1 << 63, -(1 << 63) - 1, 10 ** 100]),
    st.floats(), st.sampled_from([0.5, -0.0, 1e308, 1.5e-300]),
    _odd_text())
ANY_JSON = st.recursive(_SCALARS, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(_odd_text(), kids, max_size=4)), max_leaves=12)

_INTENTS = st.one_of(
    st.fixed_dictionaries({}, optional={
        "memory": st.sampled_from(["64M", "2G", "0", "-1", "1e3", "huge"]),
        "cpu": st.sampled_from(["latency", "batch", "7", "x"]),
        "pids": st.one_of(st.integers(-5, 100000), st.just("64")),
        "duration": st.sampled_from(["10s", "1h", "-1s"]),
        "priority": st.integers(-100, 100)}),
    st.sampled_from(["memory=64M", "cpu=latency,pids=64", "memory", "=", "memory=2G memory=1G"]),
    st.dictionaries(_odd_text(), ANY_JSON, max_size=3))


def _good(name: str, spec: p.Field, pids: tuple[int, ...]) -> st.SearchStrategy[Any]:
    """A well-typed value for a field (valid or not for the handler)."""
    if name == "pid":
        return st.one_of(st.sampled_from(pids), st.integers(p.PID_MAX + 1, 1 << 40), st.integers(-(1 << 40), 0))
    if name in ("session",) or name == "name" and spec.required:
        return st.one_of(st.sampled_from(NAMES), _odd_text().map(lambda t: t + "/"))
    if spec.choices:
        return st.one_of(st.sampled_from(spec.choices), _odd_text())
    return {"str": _odd_text(), "bool": st.booleans(), "intent": _INTENTS,
            "str_list": st.lists(_odd_text(), max_size=5),
            "int": st.one_of(st.integers(-3, 6), st.integers(), st.integers(0, 1 << 33))}[spec.kind]


@st.composite
def requests(draw: Any, pids: tuple[int, ...]) -> dict[str, Any]:
    """A request for some op: each field omitted, well-typed or of any JSON
    type; sometimes extra fields, a wrong envelope."""
    op = draw(st.sampled_from(p.OPS))
    msg: dict[str, Any] = {"v": 1, "id": draw(st.integers(0, 1 << 20)), "op": op}
    for name, spec in p.SCHEMAS[op].items():
        how = draw(st.sampled_from(["good"] * 6 + ["wrong", "missing"]))
        if how == "good":
            msg[name] = draw(_good(name, spec, pids))
        elif how == "wrong":
            msg[name] = draw(ANY_JSON)
    if op == "events" and msg.get("follow") is True and draw(st.booleans()):
        msg["follow"] = False      # a followed stream ends only when the driver hangs up
    # hypothesis leans to the first choice and to small integers: those are the plain cases
    if draw(st.integers(0, 9)) == 9:
        msg.update(draw(st.dictionaries(_odd_text(), ANY_JSON, max_size=3)))
    tweak = draw(st.integers(0, 19))
    if tweak == 16:
        msg["v"] = draw(ANY_JSON)
    elif tweak == 17:
        msg["id"] = draw(ANY_JSON)
    elif tweak == 18:
        msg["op"] = draw(_odd_text())
    elif tweak == 19:
        del msg[draw(st.sampled_from(sorted(msg, key=str)))]
    return msg


def _line(msg: Any, ascii_only: bool = True) -> bytes:
    """One line as a client might write it: NaN and Infinity tokens allowed,
    and without ensure_ascii a lone surrogate becomes bytes that are not UTF-8."""
    return json.dumps(msg, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") + b"\n"


def request_lines(pids: tuple[int, ...]) -> st.SearchStrategy[bytes]:
    return st.tuples(requests(pids), st.booleans()).map(lambda t: _line(*t))


@st.composite
def raw_inputs(draw: Any, pids: tuple[int, ...], max_bytes: int = SMALL_MAX_BYTES) -> bytes:
    """Bytes for one connection, mutated from requests or from nothing."""
    line = draw(request_lines(pids))
    kind = draw(st.sampled_from(["truncate", "utf8", "non_object", "many", "no_newline", "deep",
                                 "over_limit", "random", "flip", "near_limit"]))
    if kind == "truncate":
        return line[: draw(st.integers(0, max(0, len(line) - 1)))]
    if kind == "utf8":
        at = draw(st.integers(0, len(line) - 1))
        return line[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                                                 b"\xc0\xaf", b"\x80"])) + line[at:]
    if kind == "non_object":
        return _line(draw(ANY_JSON.filter(lambda v: not isinstance(v, dict))))
    if kind == "many":
        return b"".join(draw(request_lines(pids)) for _ in range(draw(st.integers(2, 30))))
    if kind == "no_newline":
        return line.rstrip(b"\n")
    if kind == "deep":
        depth = draw(st.sampled_from([p.MAX_DEPTH, p.MAX_DEPTH + 1, 1000, 20000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        body = opener * depth + b"1" + closer * depth if opener == b'{"a":' else opener * depth + closer * depth
        return b'{"v":1,"id":3,"op":"status","x":' + body + b"}\n"
    if kind == "over_limit":
        pad = b"a" * (max_bytes + draw(st.integers(0, 4096)))
        tail = draw(st.sampled_from([b'"}\n', b'"}', b'"}\n' + line]))
        return b'{"v":1,"id":5,"op":"status","x":"' + pad + tail
    if kind == "near_limit":
        head = b'{"v":1,"id":6,"op":"status","x":"'
        n = max_bytes - len(head) - 3 + draw(st.integers(-2, 2))
        return head + b"b" * n + b'"}\n'
    if kind == "random":
        return draw(st.binary(max_size=300))
    data = bytearray(line)
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def inputs(pids: tuple[int, ...]) -> st.SearchStrategy[bytes]:
    return st.one_of(request_lines(pids), raw_inputs(pids))


def run(driver: "Driver", n: int, seed: int, daemon_pid: int) -> None:
    """Send n inputs drawn by hypothesis (generation only: the properties are
    tallied, so that one run reports every violation it finds)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as with_seed

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @with_seed(seed)
    @given(data=st.data())
    def one(data: Any) -> None:
        driver.send(data.draw(inputs((driver.sleeper_pid(), daemon_pid)), label="input"))

    one()


# -- the driver ---------------------------------------------------------------
@dataclass
class Tally:
    """What a run saw (merged across processes as dicts)."""
    inputs: int = 0
    lines: int = 0          # answers owed (inputs that open a followed stream not counted)
    answers: int = 0
    followed: int = 0       # inputs that opened an events stream with follow: answered once
    codes: Counter = field(default_factory=Counter)
    hangs: int = 0
    violations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "lines": self.lines, "answers": self.answers, "followed": self.followed,
                "codes": dict(self.codes), "hangs": self.hangs, "violations": self.violations[:20],
                "violation_count": len(self.violations)}


def expected_answers(data: bytes, max_bytes: int) -> tuple[int, bool]:
    """(answers the daemon owes for `data`, whether it then closes early):
    one per complete line; a line over the cap ends the connection with too_large;
    a trailing line without newline gets one bad_request."""
    parts = data.split(b"\n")
    n = 0
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if len(part) + (0 if last else 1) > max_bytes:
            return n + 1, True
        if last:
            return n + (1 if part else 0), bool(part)
        n += 1
    return n, False   # pragma: no cover


def _follows(data: bytes) -> bool:
    return b'"follow":true' in data.replace(b" ", b"")


class Driver:
    """Sends inputs to the daemon at `socket_path` as this process's uid."""

    def __init__(self, socket_path: str, max_bytes: int = SMALL_MAX_BYTES, deadline_s: float = 30.0):
        self.path = socket_path
        self.max_bytes = max_bytes
        self.deadline_s = deadline_s
        self.tally = Tally()
        self._sleeper: subprocess.Popen | None = None
        self._zombies: list[subprocess.Popen] = []

    # a child to offer as a pid: alive, or a zombie we have not reaped (its pid cannot be reused)
    def sleeper_pid(self) -> int:
        s = self._sleeper
        if s is not None:
            try:
                info = os.waitid(os.P_PID, s.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = True
            if info is None:
                return s.pid
            self._zombies.append(s)
        self._sleeper = subprocess.Popen(["sleep", "100000"])
        return self._sleeper.pid

    def close(self) -> None:
        for proc in self._zombies + ([self._sleeper] if self._sleeper else []):
            try:
                proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self._zombies, self._sleeper = [], None

    def send(self, data: bytes) -> None:
        """One connection: send data, half-close, read answers to the end; check them."""
        t = self.tally
        t.inputs += 1
        want, _closes = expected_answers(data, self.max_bytes)
        follow = _follows(data)
        answers, buf = 0, b""
        deadline = time.monotonic() + self.deadline_s
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.path)
            s.settimeout(self.deadline_s)
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass    # closed for too_large while we still sent: the answer is waiting
            done = False
            while not done:
                try:
                    s.settimeout(max(0.01, deadline - time.monotonic()))
                    chunk = s.recv(1 << 16)
                except socket.timeout:
                    t.hangs += 1
                    t.violations.append(f"no answer within {self.deadline_s}s: {data[:120]!r}")
                    return
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    answers += self._check(raw, data)
                    if follow and b'"stream":true' in raw:
                        done = True     # a followed stream: answered; it runs until we hang up
        if follow:
            t.followed += 1
            return
        t.lines += want
        t.answers += answers
        if answers != want:
            t.violations.append(f"{answers} answers for {want} lines: {data[:120]!r}")

    def _check(self, raw: bytes, data: bytes) -> int:
        try:
            msg = json.loads(raw)
        except ValueError:
            self.tally.violations.append(f"reply not JSON: {raw[:120]!r}")
            return 0
        if "ok" not in msg:
            return 0         # an event or the end of a stream
        if msg["ok"] is False:
            err = msg.get("error") or {}
            code = err.get("code")
            self.tally.codes[code] += 1
            if code not in p.ERROR_CODES or code == p.E_INTERNAL or not isinstance(err.get("message"), str):
                self.tally.violations.append(f"error {err!r} for {data[:120]!r}")
        else:
            self.tally.codes["ok"] += 1
        return 1


def start_agentcgd(root: str, runtime: str, log_path: str,
                   max_bytes: int = SMALL_MAX_BYTES) -> subprocess.Popen:
    """A real agentcgd on cgroup root `root` (any cgroup2 mount will do: no
    controllers are required), logging at info to log_path, with a line cap
    of max_bytes; returns once it listens."""
    import sys
    cfg = os.path.join(runtime, "fuzz.toml")
    with open(cfg, "w") as f:
        f.write(f"[daemon]\nmax_message_bytes = {max_bytes}\n")
    sock = os.path.join(runtime, "agentcg.sock")
    args = [sys.executable, "-m", "agentcg.daemon.app", "--config", cfg, "--cgroup-root", root,
            "--runtime-dir", runtime, "--log-level", "info", "--no-require-controllers"]
    proc = subprocess.Popen(args, stderr=open(log_path, "w"), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not os.path.exists(sock):
        if proc.poll() is not None:
            raise RuntimeError(f"agentcgd exited: {open(log_path).read()}")
        if time.monotonic() > deadline:
            raise RuntimeError("agentcgd did not start listening")
        time.sleep(0.02)
    return proc


def daemon_pid(socket_path: str) -> int:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(socket_path)
        s.sendall(p.encode(p.request(1, "status")))
        return int(p.raise_for_error(p.LineReader(s).messages().__next__())["daemon"]["pid"])


def fork_as(uid: int | None, fn: Any) -> tuple[int, int]:
    """Start fn() -> dict in a forked child with uid/gid `uid` (None: this
    process's own); (its pid, the read end of the pipe it writes its dict to)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        out: dict[str, Any] = {"error": "child failed"}
        try:
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            out = fn()
        except BaseException as exc:  # report, never return into the parent's code
            out = {"error": repr(exc)}
        finally:
            with os.fdopen(w, "w") as f:
                json.dump(out, f)
            os._exit(0)
    os.close(w)
    return pid, r


def collect(pid: int, r: int) -> dict[str, Any]:
    """The dict of a child from fork_as (waited for), or {"error": ...}."""
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text) if text else {"error": "child wrote nothing"}


def as_uid(uid: int, fn: Any) -> dict[str, Any]:
    """Run fn() -> dict in a forked child with uid/gid `uid`; its dict
    (through a pipe), or {"error": ...}."""
    return collect(*fork_as(uid, fn))
