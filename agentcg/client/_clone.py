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


def spawn(prep: Prepared, cgroup_fd: int, oom_score_adj: int | None = None) -> ClonedProcess:
    """clone3 into the cgroup behind `cgroup_fd` and exec the prepared command.
    oom_score_adj: written to the child's /proc/self/oom_score_adj before the
    exec (the daemon's value for tool calls: the OOM killer takes them before
    the agent; raising it needs no privilege), so every process of the call
    inherits it. Raises OSError (errno from clone3: ENOSYS, EPERM, EACCES...) when the
    child could not be created; an exec failure is reported by the returned
    process (exit 127, `exec_errno`)."""
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
