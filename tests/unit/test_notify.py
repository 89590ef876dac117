"""sd_notify against a real AF_UNIX datagram socket (path and abstract namespace)."""
from __future__ import annotations

import os
import socket

import pytest

from agentcg.daemon import notify


@pytest.fixture
def path_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, {"NOTIFY_SOCKET": str(path)}
    sock.close()


@pytest.fixture
def abstract_socket():
    name = f"agentcg-notify-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    yield sock, {"NOTIFY_SOCKET": "@" + name}
    sock.close()


def test_ready_with_status_reaches_path_socket(path_socket):
    sock, env = path_socket
    assert notify.ready("serving 3 sessions", environ=env) is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 3 sessions\n"


def test_abstract_namespace_socket(abstract_socket):
    sock, env = abstract_socket
    assert notify.watchdog(environ=env) is True
    assert sock.recv(4096) == b"WATCHDOG=1\n"


def test_stopping_and_generic_fields(path_socket):
    sock, env = path_socket
    notify.stopping(environ=env)
    assert sock.recv(4096) == b"STOPPING=1\n"
    notify.notify(environ=env, status="x", mainpid=42, errno=None)
    assert sock.recv(4096) == b"STATUS=x\nMAINPID=42\n"


def test_no_socket_is_a_noop():
    assert notify.notify(environ={}, READY=1) is False
    assert notify.ready(environ={"NOTIFY_SOCKET": ""}) is False
    # unsupported transport: not sent, not raised
    assert notify.ready(environ={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_vanished_socket_does_not_raise(tmp_path):
    env = {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}
    assert notify.watchdog(environ=env) is False


def test_bad_values_name_the_field(path_socket):
    _, env = path_socket
    with pytest.raises(notify.NotifyError, match="STATUS"):
        notify.status("two\nlines", environ=env)
    with pytest.raises(notify.NotifyError, match="bad key"):
        notify.notify(environ=env, **{"bad key": 1})


def test_watchdog_interval():
    assert notify.watchdog_interval_s({}) is None
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    env = {"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": str(os.getpid())}
    assert notify.watchdog_interval_s(env) == 2.5
    env_other = {"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": "1"}
    assert notify.watchdog_interval_s(env_other, pid=7) is None
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "junk"}) is None
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
