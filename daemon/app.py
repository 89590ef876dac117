"""agentcgd: the composition root, the socket server and the process lifecycle.

    agentcgd [--config /etc/agentcg/agentcg.toml] [--cgroup-root DIR] [--runtime-dir DIR]
             [--no-require-controllers] [--teardown]

Start-up: load the config (the file is optional), check the cgroup hierarchy
(refuse hybrid/v1 hosts unless daemon.require_controllers = false), choose
the root (under systemd the delegated cgroup of the tree unit,
agentcg-tree.service, whose holder process moves into <root>/holder, or
without it the daemon's own service cgroup; else daemon.cgroup_root), move
itself into <root>/daemon unless the tree is the tree unit's, enable the
controllers for the children, rebuild state from state.json + the tree, then
listen on the Unix socket and tell systemd READY=1.

SIGTERM/SIGINT: stop listening, write state, leave sessions and running tool
calls alone (they are accounted by the next start) unless --teardown.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import Any

from agentcg import protocol as p
from agentcg.adapters.cgroupfs import (CgroupFs, CgroupGone, OpenFiles, detect_hierarchy, mount_of,
                                       pid_cgroup)
from agentcg.adapters.executor import Executor
from agentcg.adapters.psi import SignalWatch
from agentcg.core.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config_text

from .events import EventLog
from .hooks import Hooks
from .ratelog import BugLog, LogLimiter
from .handlers import Peer
from .service import Daemon
from .state import Journal, journal_path, make_private
from .systemd_tree import find_tree_root, move_holder

try:  # sd_notify; a no-op outside systemd
    from . import notify as _notify
except ImportError:  # pragma: no cover
    _notify = None

log = logging.getLogger("agentcg.daemon")
REQUIRED_CONTROLLERS = ("cpu", "memory", "pids")
# a client that hangs up mid-request or before its reply: its business, not an error
HANGUPS = (ConnectionError, asyncio.IncompleteReadError)
# errors that say the request was malformed (logged rate-limited, one short line)
MALFORMED = (p.E_BAD_REQUEST, p.E_TOO_LARGE, p.E_VERSION, p.E_UNKNOWN_OP)
INTERNAL_MESSAGE = "internal error in agentcgd (logged by the daemon)"


class StartupError(Exception):
    """The daemon cannot start; the message says why and how to fix it."""


def build(config: Config, *, root: str | None = None, mount: str | None = None,
          hierarchy: dict[str, Any] | None = None) -> Daemon:
    """The composition root: every adapter and collaborator of the daemon is
    made here and passed in; nothing else builds its own. Extension hooks are
    registered here: one `hooks.add(...)` line per hook (see daemon/hooks.py)."""
    cgfs = CgroupFs(root or config.daemon.cgroup_root)
    executor = Executor(cgfs)          # the one writer: admission, moves, kills and the policy
    hooks = Hooks()
    # -- extension hooks: add one line per hook below --------------------------
    if config.bpf.enabled:
        from agentcg.core.attribution import Attribution

        from .automatic import BpfHook
        escape_action = config.bpf.escape_action or config.daemon.straggler_policy
        hooks.add(BpfHook(cgfs.root, rules=config.auto_rules, escape_action=escape_action,
                          runq=config.bpf.runq_latency, network=config.bpf.network,
                          sched_ext=config.bpf.sched_ext, stop_until_placed=config.bpf.stop_until_placed,
                          stop_timeout_ms=config.bpf.stop_timeout_ms,
                          attribution=Attribution(rules=config.auto_rules, escape_action=escape_action)))
    from .policy import PolicyLoop
    hooks.add(PolicyLoop(cgfs, config.ruleset, executor=executor, files=OpenFiles(cgfs), watch=SignalWatch()))
    from .gpu import add_gpu_hooks
    bind_gpu = add_gpu_hooks(config, cgfs, executor, hooks)   # [worker] and [gpu] (docs/gpu.md)
    from .metrics import add_metrics_hook
    bind_metrics = add_metrics_hook(config, hooks)  # [metrics] (docs/metrics.md)
    daemon = Daemon(config, cgfs, hooks, mount=mount, hierarchy=hierarchy, executor=executor,
                    journal=Journal(config.daemon.state_file), events=EventLog(config.daemon.event_log_file))
    bind_gpu(daemon)
    bind_metrics(daemon)
    return daemon


def choose_root(config: Config, environ: dict[str, str], own_cgroup: str | None,
                mount: str) -> tuple[str, bool]:
    """(cgroup root, under_systemd). Under systemd with Delegate=yes the
    service's own cgroup is the root."""
    if config.daemon.use_systemd_cgroup and environ.get("INVOCATION_ID") and own_cgroup:
        path = own_cgroup
        if path.endswith("/daemon"):
            path = path[: -len("/daemon")]
        if path.endswith(".service"):
            return mount.rstrip("/") + path, True
    return config.daemon.cgroup_root, False


def raise_fd_limit() -> int:
    """Each spare call cgroup and running call keeps its accounting files
    open (about 10 descriptors): take the hard limit as the soft one (systemd
    starts services with a soft limit of 1024). Returns the soft limit now."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, want, exc)
    return soft


def prepare(config: Config, environ: dict[str, str] | None = None) -> Daemon:
    environ = dict(os.environ if environ is None else environ)
    info = detect_hierarchy()
    cfg = config.daemon
    needed = [c for c in REQUIRED_CONTROLLERS if c in cfg.controllers]
    refusal = info.refusal(needed)
    if refusal and cfg.require_controllers:
        raise StartupError(refusal)
    if info.cgroup2_mount is None:
        raise StartupError(refusal or "no cgroup2 mount")
    root, systemd = choose_root(config, environ, pid_cgroup("self"), info.cgroup2_mount)
    # the tree unit's cgroup, never restarted with the daemon (daemon/systemd_tree.py)
    tree_unit = find_tree_root(cfg.systemd_tree_unit, root, info.cgroup2_mount) if systemd else None
    root = tree_unit or root
    mount = mount_of(root) if Path(root).parent.exists() else None
    if mount is None:
        raise StartupError(f"daemon.cgroup_root: {root!r} is not inside a cgroup2 mount "
                           f"(cgroup2 is at {info.cgroup2_mount})")
    if refusal:
        log.warning("running without enforcement: %s", refusal.split(". Fix:")[0])
    daemon = build(config, root=root, mount=mount, hierarchy=info.to_dict())
    cgfs, executor = daemon.cgfs, daemon.executor
    cgfs.create("")
    if not systemd:
        executor.enable_down_to_root(mount, cfg.controllers)
    if tree_unit:
        move_holder(cgfs, executor)   # the daemon stays in its own unit (CPUWeight= there)
    else:
        cgfs.create("daemon")
        executor.place("daemon", os.getpid())
    # its own leaf is inside the budget: agents (-900) and calls (+500) must
    # not leave the daemon as the OOM killer's largest candidate
    if os.geteuid() == 0:
        executor.oom_score_adj(os.getpid(), cfg.oom_score_adj)
    try:
        daemon.enabled_controllers = executor.enable_controllers("", cfg.controllers)
    except OSError as exc:
        log.warning("cannot enable controllers %s in %s: %s", cfg.controllers, root, exc)
        daemon.enabled_controllers = cgfs.subtree_control("")
    if "cpu" in daemon.enabled_controllers and not tree_unit:
        # the controller must get the CPU when the calls it controls take all of it
        try:
            executor.set("daemon", "cpu.weight", str(cfg.cpu_weight), "daemon.cpu_weight")
        except (OSError, CgroupGone) as exc:
            log.warning("daemon cgroup cpu.weight not set: %s", exc)
    missing = [c for c in needed if c not in daemon.enabled_controllers]
    if missing and cfg.require_controllers:
        raise StartupError(f"cannot enable controllers {missing} in {root}: is the cgroup delegated "
                           "(Delegate=yes) and are they enabled in its parent?")
    secure_runtime_dir(cfg)
    daemon.restore()
    how = f"systemd delegation, {cfg.systemd_tree_unit}" if tree_unit else "systemd delegation"
    log.info("cgroup root %s (%s), controllers %s", root, how if systemd else "configured",
             " ".join(sorted(daemon.enabled_controllers)) or "none")
    return daemon


def runtime_dir_mode(cfg: Any) -> int:
    """0711 where the socket lives in the runtime directory (every uid must
    reach that known path; nobody but root may list or read the rest), else 0700."""
    inside = os.path.normpath(os.path.dirname(cfg.socket)) == os.path.normpath(cfg.runtime_dir)
    return 0o711 if inside else 0o700


def secure_runtime_dir(cfg: Any) -> None:
    """Make the runtime directory with its mode, tighten one left looser (by
    an older version or by hand), and put the state file, the journal and
    the event log at 0600 if they exist already. A shared directory (sticky,
    like /tmp) or one owned by another uid is not changed, only reported."""
    path = Path(cfg.runtime_dir)
    mode = runtime_dir_mode(cfg)
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid() or st.st_mode & stat.S_ISVTX:
        log.warning("runtime directory %s is shared or not ours (mode %o, uid %d): left as it is; "
                    "use a directory of its own, e.g. /run/agentcg", path, stat.S_IMODE(st.st_mode), st.st_uid)
    elif stat.S_IMODE(st.st_mode) != mode:
        log.info("runtime directory %s: mode %o -> %o", path, stat.S_IMODE(st.st_mode), mode)
        os.chmod(path, mode)
    for name in (cfg.state_file, journal_path(cfg.state_file), cfg.event_log_file):
        make_private(name)


def _peer(writer: asyncio.StreamWriter, conn: int) -> Peer:
    sock = writer.get_extra_info("socket")
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    return Peer(pid=pid, uid=uid, gid=gid, conn=conn)


async def send_with_fds(writer: asyncio.StreamWriter, data: bytes, fds: list[int],
                        raw: socket.socket | None = None) -> None:
    """Write `data` with `fds` attached (SCM_RIGHTS) to its first byte, in
    order with what the transport already queued. `raw`: a socket object on
    a dup of the connection's descriptor (made here and closed when None)."""
    transport = writer.transport
    while transport.get_write_buffer_size():
        await writer.drain()
        if transport.get_write_buffer_size():
            await asyncio.sleep(0.001)
    own = raw is None
    if own:
        raw = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
    try:
        while True:
            try:
                sent = socket.send_fds(raw, [data], fds)
                break
            except BlockingIOError:
                await asyncio.sleep(0.001)
    finally:
        if own:
            raw.close()
    if sent < len(data):
        writer.write(data[sent:])


class Server:
    """Serves one connection per client: requests in order, one reply each
    (an `events` request: a stream). Nothing a client sends may end the
    daemon, surface an exception's text, or write more than a trickle to the
    log: malformed requests are logged one short line each, rate-limited per
    uid; a bug gets its traceback once per site (BugLog)."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.max_bytes = daemon.cfg.max_message_bytes
        self._conns = itertools.count(1)
        self.bad_log = LogLimiter(log)
        self.bugs = BugLog(log)

    async def _send(self, writer: asyncio.StreamWriter, msg: dict[str, Any],
                    fds: list[int] | None = None, raw: socket.socket | None = None) -> None:
        try:
            data = p.encode(msg, self.max_bytes)
        except p.MessageTooLarge:
            data = p.encode(p.error_reply(msg.get("id"), p.E_TOO_LARGE,
                                          f"reply longer than {self.max_bytes} bytes"), self.max_bytes)
            fds = None
        if fds:
            await send_with_fds(writer, data, fds, raw)
        else:
            writer.write(data)
        await writer.drain()

    def _refused(self, peer: Peer, rid: int | None, exc: p.ProtocolError) -> dict[str, Any]:
        if exc.code in MALFORMED:
            self.bad_log.log(logging.INFO, peer.uid, "uid %d pid %d: %s: %s",
                             peer.uid, peer.pid, exc.code, p.show(exc.message, 120))
        return p.error_reply(rid, exc.code, exc.message)

    async def _answer(self, writer: asyncio.StreamWriter, msg: dict[str, Any], peer: Peer,
                      raw: list[socket.socket]) -> None:
        """Answer one decoded request. `raw`: the connection's socket object
        for replies that carry fds (made at the first, kept in raw[0])."""
        rid, op = p.check_request(msg)
        if op == "events":
            await self._send(writer, p.ok_reply(rid, stream=True))
            async for ev in self.daemon.stream_events(msg, peer):
                await self._send(writer, p.event_message(rid, ev))
            await self._send(writer, p.end_message(rid))
            return
        reply = await self.daemon.handle(msg, peer)
        fds = reply.pop("_fds", None)
        if not fds:
            await self._send(writer, reply)
            return
        try:
            if not raw:
                raw.append(socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno())))
            await self._send(writer, reply, fds, raw[0])
        finally:
            for fd in fds:
                os.close(fd)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer,
                     raw: list[socket.socket]) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                await self._send(writer, self._refused(peer, None, p.MessageTooLarge(self.max_bytes)))
                return
            if not line:
                return
            if len(line) > self.max_bytes:   # the cap counts the newline; the reader's limit does not
                await self._send(writer, self._refused(peer, None, p.MessageTooLarge(self.max_bytes)))
                return
            if not line.endswith(b"\n"):
                # the stream ended inside a message: say so, and read no further
                err = p.ProtocolError(p.E_BAD_REQUEST, "stream ended inside a message (no newline)")
                await self._send(writer, self._refused(peer, None, err))
                return
            msg: Any = None
            try:
                msg = p.decode(line)
                await self._answer(writer, msg, peer, raw)
                continue
            except HANGUPS:
                raise
            except p.ProtocolError as exc:
                reply = self._refused(peer, p.reply_id(msg), exc)
            except Exception as exc:  # a bug must not kill the daemon, nor show the client its text
                self.bugs.report(f"uid {peer.uid} pid {peer.pid}: request failed", exc)
                reply = p.error_reply(p.reply_id(msg), p.E_INTERNAL, INTERNAL_MESSAGE)
            await self._send(writer, reply)

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = next(self._conns)
        try:
            peer = _peer(writer, conn)
        except OSError:
            writer.close()
            return
        raw: list[socket.socket] = []
        try:
            await self._serve(reader, writer, peer, raw)
        except HANGUPS as exc:
            log.debug("uid %d pid %d hung up: %s", peer.uid, peer.pid, type(exc).__name__)
        except Exception as exc:  # in the reply path itself
            self.bugs.report(f"uid {peer.uid} pid {peer.pid}: connection failed", exc)
        finally:
            self.daemon.connection_closed(conn)
            for sock in raw:
                sock.close()
            try:
                writer.close()
            except Exception:
                pass


async def serve(daemon: Daemon, *, teardown: bool = False, stop: asyncio.Event | None = None) -> None:
    cfg = daemon.cfg
    path = cfg.socket
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # bound under a temporary name, then renamed over the old socket: a client
    # never finds no socket during a restart (it would take the daemon for
    # stopped), only one that refuses until this one listens
    tmp = f"{path}.{os.getpid()}.new"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    server = Server(daemon)
    srv = await asyncio.start_unix_server(server.client, path=tmp, limit=cfg.max_message_bytes)
    os.chmod(tmp, cfg.socket_mode)
    os.replace(tmp, path)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    tasks = [asyncio.create_task(daemon.watch())]
    for hook in daemon.hooks.runners():
        tasks.append(asyncio.create_task(hook.run(daemon)))
    if _notify is not None:
        _notify.ready(f"serving on {path}")
        wd = _notify.watchdog_interval_s()
        if wd:
            async def _watchdog() -> None:
                while True:
                    _notify.watchdog()
                    await asyncio.sleep(wd / 2)
            tasks.append(asyncio.create_task(_watchdog()))
    log.info("listening on %s", path)
    await stop.wait()
    if _notify is not None:
        _notify.stopping("stopping")
    srv.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if teardown:
        await daemon.teardown()
    daemon.save()
    daemon.hooks.close()
    daemon.journal.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    log.info("stopped (%s)", "tree torn down" if teardown else "sessions and tool calls left running")


def load_config(path: str) -> Config:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        text = None
    return load_config_text(path, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="agentcgd",
        description="agentcg daemon: one cgroup v2 per agent session and per tool call, "
                    "limits from declared intents, stats and plain-words feedback.")
    ap.add_argument("--config", default=os.environ.get("AGENTCG_CONFIG", DEFAULT_CONFIG_PATH),
                    help="TOML config file (optional; default %(default)s)")
    ap.add_argument("--cgroup-root", help="override daemon.cgroup_root")
    ap.add_argument("--runtime-dir", help="override daemon.runtime_dir (socket, state, events)")
    ap.add_argument("--no-require-controllers", action="store_true",
                    help="start on a cgroup2 tree without memory/cpu/pids controllers (testing)")
    ap.add_argument("--teardown", action="store_true",
                    help="on stop, kill all tool calls and remove the cgroup tree")
    ap.add_argument("--log-level", default=None, help="debug, info, warning, error")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"agentcgd: bad config: {exc}", file=sys.stderr)
        return 2
    import dataclasses
    over: dict[str, Any] = {}
    if args.cgroup_root:
        over["cgroup_root"] = args.cgroup_root
    if args.runtime_dir:
        over["runtime_dir"] = args.runtime_dir
    if args.no_require_controllers:
        over["require_controllers"] = False
    if over:
        config = dataclasses.replace(config, daemon=dataclasses.replace(config.daemon, **over))
    logging.basicConfig(level=(args.log_level or config.daemon.log_level).upper(),
                        format="agentcgd %(levelname)s %(name)s: %(message)s")
    raise_fd_limit()
    try:
        daemon = prepare(config)
    except StartupError as exc:
        print(f"agentcgd: refusing to start: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"agentcgd: cannot set up the cgroup tree: {exc}", file=sys.stderr)
        return 3
    asyncio.run(serve(daemon, teardown=args.teardown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
