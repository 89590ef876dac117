"""clone_into pieces without a daemon: the spawn helper's request layout and
build, which Popen arguments the clone_into path takes, argv resolution, and file descriptors
travelling with a reply line (SCM_RIGHTS) from the daemon's writer to the
client's reader."""
from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import socket
import subprocess

import pytest

from agentcg import protocol as p
from agentcg.client import _clone


def test_spawn_request_matches_the_helper_struct():
    # struct agentcg_spawn in spawn.c: seven pointers, then eight int32
    ptr = ctypes.sizeof(ctypes.c_void_p)
    offsets = {name: getattr(_clone.SpawnRequest, name).offset for name, _ in _clone.SpawnRequest._fields_}
    assert offsets["oom_score_adj"] == 6 * ptr and offsets["n_dups"] == 7 * ptr
    assert offsets["errno_fd"] == 7 * ptr + 7 * 4
    assert ctypes.sizeof(_clone.SpawnRequest) == 7 * ptr + 8 * 4


def test_spawn_helper_is_built_and_calls_nothing_in_the_child():
    """scripts/setup.sh builds the helper; the child code (child_main) makes
    raw system calls only: no call into the C library, whose locks another
    thread of the caller may hold."""
    assert _clone.helper() is not None, f"{_clone.HELPER_PATH} missing: make -C agentcg/client"
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("no objdump")
    text = subprocess.run([objdump, "-d", str(_clone.HELPER_PATH)], capture_output=True, text=True,
                          check=True).stdout
    body = text.split("<child_main>:", 1)[1].split("\n\n", 1)[0]
    assert "syscall" in body or "svc" in body
    assert "@plt" not in body and "call" not in body.replace("syscall", "")


@pytest.mark.parametrize("kwargs, ok", [
    ({}, True),
    ({"stdout": subprocess.DEVNULL, "stderr": 2, "env": {}, "cwd": "/"}, True),
    ({"stdout": subprocess.PIPE}, False),          # pipes need Popen: the trampoline path
    ({"stderr": subprocess.STDOUT}, False),
    ({"start_new_session": True}, False),
    ({"preexec_fn": lambda: None}, False),
])
def test_supported_popen_arguments(kwargs, ok):
    assert _clone.supported(kwargs) is ok


def test_prepared_resolves_the_program_and_refuses_a_missing_one(tmp_path):
    prep = _clone.Prepared(["sh", "-c", "true"], env={"PATH": "/usr/bin:/bin", "A": "b"})
    try:
        assert os.path.isabs(prep.path.decode()) and prep.path.endswith(b"/sh")
        assert [prep.c_argv[i] for i in range(3)] == [b"sh", b"-c", b"true"] and prep.c_argv[3] is None
        assert prep.c_envp[0] in (b"PATH=/usr/bin:/bin", b"A=b") and prep.c_envp[2] is None
    finally:
        prep.close()
    with pytest.raises(FileNotFoundError) as err:
        _clone.Prepared(["no-such-program-agentcg"], env={"PATH": str(tmp_path)})
    assert "no-such-program-agentcg" in str(err.value)


def test_stdio_is_duplicated_and_closed(tmp_path):
    with open(tmp_path / "out", "w") as f:
        prep = _clone.Prepared(["/bin/true"], stdout=f, stderr=subprocess.DEVNULL)
        targets = [t for _src, t in prep.dups]
        owned = [s for s, _t in prep.dups]
        assert targets == [1, 2] and prep.stderr_fd == owned[1]
        assert all(not os.get_inheritable(fd) for fd in owned)
        prep.close()
        for fd in owned:
            with pytest.raises(OSError):
                os.fstat(fd)


def test_line_reader_keeps_fds_sent_with_a_line():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        socket.send_fds(a, [b'{"v":1,"id":1,"ok":true}\n'], [r])
        reader = p.LineReader(b)
        assert p.decode(reader.readline())["ok"] is True
        fds = reader.take_fds()
        assert len(fds) == 1 and fds[0] != r
        assert not os.get_inheritable(fds[0])          # MSG_CMSG_CLOEXEC
        os.write(w, b"x")
        assert os.read(fds[0], 1) == b"x"              # the same pipe
        os.close(fds[0])
        assert reader.take_fds() == []
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_daemon_writer_sends_fds_in_order_with_queued_lines():
    from agentcg.daemon.app import send_with_fds

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()

    async def server() -> None:
        _reader, writer = await asyncio.open_unix_connection(sock=a)
        writer.write(b'{"v":1,"id":1,"ok":true}\n')
        await send_with_fds(writer, b'{"v":1,"id":2,"ok":true,"cgroup_fd":true}\n', [r])
        await writer.drain()
        writer.close()

    try:
        asyncio.run(server())
        reader = p.LineReader(b)
        assert p.decode(reader.readline())["id"] == 1
        second = p.decode(reader.readline())
        assert second["id"] == 2 and second["cgroup_fd"] is True
        fds = reader.take_fds()
        assert len(fds) == 1
        os.write(w, b"y")
        assert os.read(fds[0], 1) == b"y"
        os.close(fds[0])
        assert reader.readline() is None
    finally:
        for fd in (r, w):
            os.close(fd)
        b.close()
