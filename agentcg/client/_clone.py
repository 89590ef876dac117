"""Start a command directly inside a cgroup: CLONE_INTO_CGROUP, Linux >= 5.7.

The child is born in the cgroup whose directory fd the daemon sent, so the
tool never runs outside it and the kernel has no process to migrate (a
migration takes the cgroup threadgroup lock for writing, which waits for an
RCU grace period).

The child of a multi-threaded process is a copy of the calling thread only:
a lock another thread held at the clone (the interpreter lock, which a
waiting thread asks for every switch interval; malloc's; stdio's) is never
released in the child. So the child runs no Python and no locking C library
code from the clone to the execve. Two ways, in this order:

  posix_spawn   posix_spawn(3) with POSIX_SPAWN_SETCGROUP (glibc >= 2.39):
                the C library's clone3(CLONE_VM|CLONE_VFORK|CLONE_INTO_CGROUP).
  helper        spawn.c, built by scripts/setup.sh into _spawn.so next to this
                file, called through ctypes.CDLL (the interpreter lock is
                released during the call): clone3(CLONE_INTO_CGROUP|CLONE_PIDFD)
                with CLONE_VM|CLONE_VFORK on a stack of its own (x86-64; a fork
                elsewhere), then raw system calls only: signal defaults,
                descriptors, oom_score_adj, chdir, execve. A program that cannot
                be executed exits 127 and its errno comes back to the caller
                (what posix_spawn refuses goes to the helper for that report).

Where neither exists (glibc < 2.39 and no helper built) `spawn` returns None
and the client asks the daemon to place a waiting child by pid instead (the
trampoline in client/core.py); `method()` says, once in a debug log, which
way this process uses. Everything the child needs (argv, envp, paths, fds) is
built as C data before the clone.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

# clone3 errors after which the pid-placement path is used instead
FALLBACK_ERRNOS = (errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EINVAL, errno.E2BIG,
                   errno.EOPNOTSUPP)
# Popen keyword arguments this path implements; anything else uses the trampoline
SUPPORTED_KWARGS = frozenset({"env", "cwd", "stdin", "stdout", "stderr", "pass_fds"})
HELPER_PATH = Path(__file__).with_name("_spawn.so")   # built from spawn.c by scripts/setup.sh
HELPER_SHARE_MEMORY = True      # CLONE_VM|CLONE_VFORK where the helper can; tests turn it off

log = logging.getLogger("agentcg.client")


class SpawnRequest(ctypes.Structure):
    """struct agentcg_spawn (spawn.c)."""
    _fields_ = [("path", ctypes.c_char_p), ("argv", ctypes.c_void_p), ("envp", ctypes.c_void_p),
                ("cwd", ctypes.c_char_p), ("dups", ctypes.c_void_p), ("keep", ctypes.c_void_p),
                ("oom_score_adj", ctypes.c_char_p)] + [
               (name, ctypes.c_int32) for name in ("n_dups", "n_keep", "oom_len", "cgroup_fd", "share_memory",
                                                   "pidfd", "exec_errno", "errno_fd")]


_helper: Any = None


def helper() -> Any:
    """The spawn helper (ctypes.CDLL of _spawn.so), or None where it was not built."""
    global _helper
    if _helper is None:
        try:
            lib = ctypes.CDLL(str(HELPER_PATH))
        except OSError as exc:
            log.debug("spawn helper %s not loadable: %s", HELPER_PATH, exc)
            _helper = False
        else:
            lib.agentcg_spawn.argtypes = [ctypes.POINTER(SpawnRequest)]
            lib.agentcg_spawn.restype = ctypes.c_long
            lib.agentcg_spawn_can_share_memory.restype = ctypes.c_int
            _helper = lib
    return _helper or None


_method_logged = False


def method() -> str | None:
    """How this process starts a child inside a cgroup: "posix_spawn" (glibc
    >= 2.39), "helper" (the C helper), or None: no way that is safe in a
    multi-threaded caller, so the daemon places a waiting child by pid."""
    global _method_logged
    how = "posix_spawn" if USE_POSIX_SPAWN and posix_spawn_lib() else "helper" if helper() else None
    if not _method_logged:
        _method_logged = True
        log.debug("tool calls start in their cgroup through %s", how or
                  "the daemon's pid placement (no posix_spawn with SETCGROUP, no spawn helper)")
    return how


def supported(popen_kwargs: dict[str, Any]) -> bool:
    """Whether clone_into can start a command with these Popen arguments (no PIPEs)."""
    if set(popen_kwargs) - SUPPORTED_KWARGS:
        return False
    for key in ("stdin", "stdout", "stderr"):
        v = popen_kwargs.get(key)
        if v is None or v == subprocess.DEVNULL:
            continue
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            continue
        if hasattr(v, "fileno"):
            continue
        return False  # PIPE, STDOUT and the like
    return sys.platform.startswith("linux")


def _cstr_array(items: Sequence[bytes]) -> Any:
    arr = (ctypes.c_char_p * (len(items) + 1))()
    arr[:-1] = list(items)
    arr[-1] = None
    return arr


class Prepared:
    """A command turned into C data, ready for the child."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Any = None,
                 stdin: Any = None, stdout: Any = None, stderr: Any = None, pass_fds: Sequence[int] = ()):
        environ = os.environ if env is None else env
        prog = argv[0]
        if "/" not in prog:
            found = shutil.which(prog, path=environ.get("PATH", os.defpath))
            if found is None:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", prog)
            prog = found
        self.argv = list(argv)
        self.path = os.fsencode(prog)
        self.c_argv = _cstr_array([os.fsencode(a) for a in argv])
        if env is None and os.supports_bytes_environ:   # already encoded: no fsencode per variable
            self.c_envp = _cstr_array([k + b"=" + v for k, v in os.environb.items()])
        else:
            self.c_envp = _cstr_array([os.fsencode(k) + b"=" + os.fsencode(v) for k, v in environ.items()])
        self.cwd = os.fsencode(os.fspath(cwd)) if cwd is not None else None
        self.pass_fds = sorted({int(fd) for fd in pass_fds if int(fd) > 2})
        # stdio: private close-on-exec copies, dup2'ed onto 0-2 in the child
        self.dups: list[tuple[int, int]] = []
        self._owned: list[int] = []
        self.stderr_fd = 2
        try:
            for target, v in ((0, stdin), (1, stdout), (2, stderr)):
                if v is None:
                    continue
                if v == subprocess.DEVNULL and not hasattr(v, "fileno"):
                    src = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                else:
                    src = os.dup(v if isinstance(v, int) else v.fileno())
                self._owned.append(src)
                self.dups.append((src, target))
                if target == 2:
                    self.stderr_fd = src
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self._owned:
            try:
                os.close(fd)
            except OSError:
                pass
        self._owned = []


class ClonedProcess:
    """A child started inside its cgroup: the parts of subprocess.Popen a tool call uses."""

    def __init__(self, args: list[str], pid: int, pidfd: int, exec_errno: int | None):
        self.args = args
        self.pid = pid
        self.pidfd = pidfd
        self.exec_errno = exec_errno
        self.how = "helper-vfork"           # or "helper-fork", "posix_spawn"
        self.returncode: int | None = None
        self.stdin = self.stdout = self.stderr = None

    def _reap(self, status: int) -> int:
        self.returncode = os.waitstatus_to_exitcode(status)
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._reap(status)
        return self.returncode

    def wait_exited(self, timeout: float | None = None) -> bool:
        """Wait until the child exits without reaping it (its pid stays valid)."""
        if self.returncode is not None:
            return True
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return bool(p.poll(-1 if timeout is None else max(0, int(timeout * 1000))))

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        if timeout is not None:
            p = select.poll()
            p.register(self.pidfd, select.POLLIN)
            if not p.poll(max(0, int(timeout * 1000))):
                raise subprocess.TimeoutExpired(self.args, timeout)
        _pid, status = os.waitpid(self.pid, 0)
        return self._reap(status)

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[None, None]:
        if input:
            raise ValueError("input: this process has no stdin pipe")
        self.wait(timeout)
        return None, None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self.pidfd >= 0:
            signal.pidfd_send_signal(self.pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


# posix_spawn(3) flags (glibc <spawn.h>)
POSIX_SPAWN_SETSIGDEF = 0x04
POSIX_SPAWN_SETCGROUP = 0x100          # glibc >= 2.39
# room for posix_spawnattr_t (336 bytes on x86-64), posix_spawn_file_actions_t
# (80) and sigset_t (128) on every glibc architecture
_ATTR_BYTES, _ACTIONS_BYTES, _SIGSET_BYTES = 1024, 512, 256
USE_POSIX_SPAWN = True                 # tests turn it off to exercise the helper

_spawn_lib: Any = None


def posix_spawn_lib() -> Any:
    """The C library when it has posix_spawn with the cgroup attribute, else None."""
    global _spawn_lib
    if _spawn_lib is None:
        lib = ctypes.CDLL(None, use_errno=True)
        names = ("posix_spawn", "posix_spawnattr_init", "posix_spawnattr_destroy", "posix_spawnattr_setflags",
                 "posix_spawnattr_setsigdefault", "posix_spawnattr_setcgroup_np",
                 "posix_spawn_file_actions_init", "posix_spawn_file_actions_destroy",
                 "posix_spawn_file_actions_adddup2", "posix_spawn_file_actions_addclose",
                 "posix_spawn_file_actions_addclosefrom_np", "posix_spawn_file_actions_addchdir_np",
                 "sigemptyset", "sigaddset")
        if not sys.platform.startswith("linux") or not all(hasattr(lib, n) for n in names):
            _spawn_lib = False
        else:
            lib.posix_spawnattr_setflags.argtypes = [ctypes.c_void_p, ctypes.c_short]
            lib.posix_spawnattr_setcgroup_np.argtypes = [ctypes.c_void_p, ctypes.c_int]
            for n in ("posix_spawn_file_actions_adddup2",):
                getattr(lib, n).argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
            for n in ("posix_spawn_file_actions_addclose", "posix_spawn_file_actions_addclosefrom_np"):
                getattr(lib, n).argtypes = [ctypes.c_void_p, ctypes.c_int]
            lib.posix_spawn_file_actions_addchdir_np.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.posix_spawn.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            _spawn_lib = lib
    return _spawn_lib or None


def _open_fds() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))


def posix_spawn(prep: Prepared, cgroup_fd: int) -> "ClonedProcess | None":
    """posix_spawn the prepared command into the cgroup behind `cgroup_fd`:
    stdio dup'ed, pass_fds kept and every other descriptor above 2 closed,
    SIGPIPE and SIGXFSZ back to their defaults (as Popen does), cwd. Returns
    None when this C library cannot, or posix_spawn failed (the caller then
    takes the helper, which reports the failure its own way)."""
    lib = posix_spawn_lib() if USE_POSIX_SPAWN else None
    if lib is None:
        return None
    attr = ctypes.create_string_buffer(_ATTR_BYTES)
    actions = ctypes.create_string_buffer(_ACTIONS_BYTES)
    sigs = ctypes.create_string_buffer(_SIGSET_BYTES)
    if lib.posix_spawnattr_init(attr) != 0:
        return None
    if lib.posix_spawn_file_actions_init(actions) != 0:
        lib.posix_spawnattr_destroy(attr)
        return None
    pid = ctypes.c_int(0)
    try:
        lib.sigemptyset(sigs)
        lib.sigaddset(sigs, signal.SIGPIPE)
        lib.sigaddset(sigs, signal.SIGXFSZ)
        err = (lib.posix_spawnattr_setsigdefault(attr, sigs)
               or lib.posix_spawnattr_setcgroup_np(attr, cgroup_fd)
               or lib.posix_spawnattr_setflags(attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETCGROUP))
        for src, target in prep.dups:
            err = err or lib.posix_spawn_file_actions_adddup2(actions, src, target)
        keep = prep.pass_fds
        for fd in keep:   # dup2 onto itself clears close-on-exec
            err = err or lib.posix_spawn_file_actions_adddup2(actions, fd, fd)
        if keep:
            for fd in _open_fds():
                if 2 < fd < keep[-1] and fd not in keep:
                    err = err or lib.posix_spawn_file_actions_addclose(actions, fd)
        err = err or lib.posix_spawn_file_actions_addclosefrom_np(actions, (keep[-1] if keep else 2) + 1)
        if prep.cwd is not None:
            err = err or lib.posix_spawn_file_actions_addchdir_np(actions, prep.cwd)
        if not err:
            err = lib.posix_spawn(ctypes.byref(pid), prep.path, actions, attr, prep.c_argv, prep.c_envp)
    finally:
        lib.posix_spawn_file_actions_destroy(actions)
        lib.posix_spawnattr_destroy(attr)
    if err:
        return None
    try:
        pidfd = os.pidfd_open(pid.value)    # our unreaped child: its pid cannot be reused yet
    except OSError:                         # out of descriptors: no half-started call
        os.kill(pid.value, signal.SIGKILL)
        os.waitpid(pid.value, 0)
        raise
    proc = ClonedProcess(prep.argv, pid.value, pidfd, None)
    proc.how = "posix_spawn"
    return proc


def spawn(prep: Prepared, cgroup_fd: int, oom_score_adj: int | None = None) -> ClonedProcess | None:
    """Start the prepared command inside the cgroup behind `cgroup_fd`:
    posix_spawn where the C library can, else the C helper. None when
    neither can (the caller then places a waiting child by pid).
    oom_score_adj: the daemon's value for tool calls (the OOM killer takes
    them before the agent; raising it needs no privilege), inherited by every
    process of the call. The helper's child writes it before its exec;
    posix_spawn has no such hook, so the caller writes it right after the
    spawn (until then the child keeps the agent's value: the race can only
    spare the tool, never expose the agent). Raises OSError (errno from
    clone3: ENOSYS, EPERM, EACCES...) when the child could not be created; an
    exec failure is reported by the returned process (exit 127, `exec_errno`)."""
    proc = posix_spawn(prep, cgroup_fd)
    if proc is not None:
        if oom_score_adj is not None:
            try:
                with open(f"/proc/{proc.pid}/oom_score_adj", "w") as f:
                    f.write(str(int(oom_score_adj)))
            except OSError:
                pass  # already gone: nothing to protect against
        return proc
    if helper() is None:
        return None
    return helper_spawn(prep, cgroup_fd, oom_score_adj)


def helper_spawn(prep: Prepared, cgroup_fd: int, oom_score_adj: int | None = None,
                 share_memory: bool | None = None) -> ClonedProcess:
    """clone3 into the cgroup behind `cgroup_fd` and exec the prepared command
    through the C helper (C only in the child; see the module docstring).
    The interpreter lock is released during the call (ctypes.CDLL)."""
    lib = helper()
    if lib is None:
        raise OSError(errno.ENOSYS, f"spawn helper {HELPER_PATH} not built (scripts/setup.sh builds it)")
    dups = (ctypes.c_int32 * (2 * len(prep.dups) or 1))(*[fd for pair in prep.dups for fd in pair])
    keep = (ctypes.c_int32 * (len(prep.pass_fds) or 1))(*prep.pass_fds)
    adj = None if oom_score_adj is None else str(int(oom_score_adj)).encode()
    share = HELPER_SHARE_MEMORY if share_memory is None else share_memory
    req = SpawnRequest(path=prep.path, argv=ctypes.cast(prep.c_argv, ctypes.c_void_p),
                       envp=ctypes.cast(prep.c_envp, ctypes.c_void_p), cwd=prep.cwd,
                       dups=ctypes.cast(dups, ctypes.c_void_p), keep=ctypes.cast(keep, ctypes.c_void_p),
                       oom_score_adj=adj, n_dups=len(prep.dups), n_keep=len(prep.pass_fds),
                       oom_len=len(adj or b""), cgroup_fd=cgroup_fd, share_memory=int(share))
    pid = lib.agentcg_spawn(ctypes.byref(req))
    if pid < 0:
        raise OSError(-pid, f"clone3(CLONE_INTO_CGROUP): {os.strerror(-pid)}")
    proc = ClonedProcess(prep.argv, pid, req.pidfd, req.exec_errno or None)
    proc.how = "helper-vfork" if req.share_memory else "helper-fork"
    return proc
