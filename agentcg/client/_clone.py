"""Start a command directly inside a cgroup: clone3(CLONE_INTO_CGROUP), Linux >= 5.7.

Standard library only (ctypes over the C library). The child is born in the
cgroup whose directory fd the daemon sent, so the tool never runs outside it
and the kernel has no process to migrate (a migration takes the cgroup
threadgroup lock for writing, which waits for an RCU grace period).

Everything the child needs (argv, envp, paths, fds) is built as C data before
the clone; the child only calls C functions through ctypes (dup2, chdir,
signal, open, write, close, execve, _exit) and never returns to the caller's code. A failed
execve writes its errno to a close-on-exec pipe and exits 127, the usual
exec-error pipe: the parent reads 0 bytes when the exec worked.

`PyDLL` keeps the interpreter lock held across the calls, so the child (a copy
of the calling thread only) never waits for a lock another thread held.

That child is a fork: the kernel copies the caller's page tables and the
child's first writes fault in copies of its pages, so its cost grows with
the caller's memory (2 ms for a 20 MB interpreter, 7 ms at 120 MB on a small
VM). Where the C library offers posix_spawn(3) with POSIX_SPAWN_SETCGROUP
(glibc >= 2.39) the child is made by the C library instead: clone3 with
CLONE_VM|CLONE_VFORK|CLONE_INTO_CGROUP on a stack of its own, C code only
until the execve, no copy of the caller's memory. The clone3 path above
stays for older C libraries and for what posix_spawn refuses (a program
that cannot be executed: the clone3 child reports it as exit status 127).
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import shutil
import signal
import subprocess
import sys
from typing import Any, Sequence

SYS_clone3 = 435
SYS_close_range = 436
CLONE_PIDFD = 0x00001000
CLONE_INTO_CGROUP = 0x200000000
CLOSE_RANGE_CLOEXEC = 1 << 2
F_SETFD = 2

# clone3 errors after which the pid-placement path is used instead
FALLBACK_ERRNOS = (errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EINVAL, errno.E2BIG,
                   errno.EOPNOTSUPP)
# Popen keyword arguments this path implements; anything else uses the trampoline
SUPPORTED_KWARGS = frozenset({"env", "cwd", "stdin", "stdout", "stderr", "pass_fds"})


class CloneArgs(ctypes.Structure):
    """struct clone_args (include/uapi/linux/sched.h), version 2: 88 bytes."""
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


CLONE_ARGS_SIZE_VER2 = 88

_libc: Any = None


def libc() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.PyDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        for name, args in (("execve", [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]),
                           ("dup2", [ctypes.c_int, ctypes.c_int]),
                           ("chdir", [ctypes.c_char_p]),
                           ("fcntl", [ctypes.c_int, ctypes.c_int, ctypes.c_int]),
                           ("write", [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]),
                           ("open", [ctypes.c_char_p, ctypes.c_int]),
                           ("close", [ctypes.c_int]),
                           ("_exit", [ctypes.c_int])):
            fn = getattr(lib, name)
            fn.argtypes = args
        lib.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        lib.signal.restype = ctypes.c_void_p
        _libc = lib
    return _libc


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
    """A child started by clone3: the parts of subprocess.Popen a tool call uses."""

    def __init__(self, args: list[str], pid: int, pidfd: int, exec_errno: int | None):
        self.args = args
        self.pid = pid
        self.pidfd = pidfd
        self.exec_errno = exec_errno
        self.how = "clone3"                 # or "posix_spawn"
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
USE_POSIX_SPAWN = True                 # tests turn it off to exercise the clone3 path

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
    takes the clone3 path, which reports the failure its own way)."""
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


def spawn(prep: Prepared, cgroup_fd: int, oom_score_adj: int | None = None) -> ClonedProcess:
    """Start the prepared command inside the cgroup behind `cgroup_fd`:
    posix_spawn where the C library can, else clone3 and exec.
    oom_score_adj: the daemon's value for tool calls (the OOM killer takes
    them before the agent; raising it needs no privilege), inherited by every
    process of the call. On the clone3 path the child writes it before its
    exec; posix_spawn has no such hook, so the caller writes it right after
    the spawn (until then the child keeps the agent's value: the race can
    only spare the tool, never expose the agent). Raises OSError (errno from
    clone3: ENOSYS, EPERM, EACCES...) when the child could not be created; an
    exec failure is reported by the returned
    process (exit 127, `exec_errno`)."""
    proc = posix_spawn(prep, cgroup_fd)
    if proc is not None:
        if oom_score_adj is not None:
            try:
                with open(f"/proc/{proc.pid}/oom_score_adj", "w") as f:
                    f.write(str(int(oom_score_adj)))
            except OSError:
                pass  # already gone: nothing to protect against
        return proc
    return clone3_spawn(prep, cgroup_fd, oom_score_adj)


def clone3_spawn(prep: Prepared, cgroup_fd: int, oom_score_adj: int | None = None) -> ClonedProcess:
    """clone3 into the cgroup behind `cgroup_fd` and exec the prepared command
    (a fork of the caller; see the module docstring)."""
    lib = libc()
    pidfd = ctypes.c_int(-1)
    args = CloneArgs(flags=CLONE_INTO_CGROUP | CLONE_PIDFD, pidfd=ctypes.addressof(pidfd),
                     exit_signal=signal.SIGCHLD, cgroup=cgroup_fd)
    r, w = os.pipe()  # both close-on-exec
    err = ctypes.c_int(0)
    dups = prep.dups
    pass_fds = prep.pass_fds
    c_path, c_argv, c_envp, c_cwd = prep.path, prep.c_argv, prep.c_envp, prep.cwd
    adj = None if oom_score_adj is None else ctypes.create_string_buffer(str(int(oom_score_adj)).encode())
    adj_len = 0 if adj is None else len(adj.value)
    try:
        pid = lib.syscall(SYS_clone3, ctypes.byref(args), ctypes.c_size_t(CLONE_ARGS_SIZE_VER2))
        if pid == 0:  # the child: C calls only, never back to the caller
            try:
                lib.signal(signal.SIGPIPE, None)      # SIG_DFL, as Popen's restore_signals
                lib.signal(signal.SIGXFSZ, None)
                lib.syscall(SYS_close_range, ctypes.c_uint(3), ctypes.c_uint(0xFFFFFFFF), ctypes.c_uint(CLOSE_RANGE_CLOEXEC))
                for src, target in dups:
                    lib.dup2(src, target)
                for fd in pass_fds:
                    lib.fcntl(fd, F_SETFD, 0)
                if adj is not None:
                    afd = lib.open(b"/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
                    if afd >= 0:
                        lib.write(afd, adj, adj_len)
                        lib.close(afd)
                if c_cwd is None or lib.chdir(c_cwd) == 0:
                    lib.execve(c_path, c_argv, c_envp)
                err.value = ctypes.get_errno()
                lib.write(w, ctypes.addressof(err), 4)
            finally:
                lib._exit(127)
        if pid < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"clone3(CLONE_INTO_CGROUP): {os.strerror(e)}")
    finally:
        os.close(w)
    try:
        data = b""
        while True:
            chunk = os.read(r, 4 - len(data))
            if not chunk:
                break
            data += chunk
            if len(data) == 4:
                break
    finally:
        os.close(r)
    exec_errno = int.from_bytes(data, sys.byteorder) if len(data) == 4 else None
    return ClonedProcess(prep.argv, pid, pidfd.value, exec_errno)
