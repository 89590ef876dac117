"""Network intent in the kernel: cgroup BPF on a test cgroup, traffic only in a
network namespace made for the test (lo up, plus the address 10.200.0.1 on it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kill_and_remove, require_bpf, require_cgroup2

pytestmark = pytest.mark.kernel

NS_ADDR = "10.200.0.1"

SERVER = r"""
import socket, sys
from pyroute2 import netns
netns.setns(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 0)); s.listen(64)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hi"); c.close()
"""

CLIENT = r"""
import json, socket, sys
from pyroute2 import netns
netns.setns(sys.argv[1])
port = int(sys.argv[2])
sys.stdin.readline()          # placed in the cgroup by now
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = "ok"
    except OSError as e:
        out[name] = e.errno
def tcp(host):
    s = socket.create_connection((host, port), timeout=2)
    assert s.recv(2) == b"hi"; s.close()
attempt("socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
attempt("unix", lambda: [x.close() for x in socket.socketpair(socket.AF_UNIX)])
attempt("loopback", lambda: tcp("127.0.0.1"))
attempt("remote", lambda: tcp(sys.argv[3]))
print(json.dumps(out), flush=True)
"""


@pytest.fixture
def netns_env():
    require_bpf()
    mnt = require_cgroup2()
    pyroute2 = pytest.importorskip("pyroute2")
    from pyroute2 import NetNS, netns
    name = f"agentcg-test-{os.getpid()}"
    netns.create(name)
    server = None
    cg = mnt / f"agentcg-test-net-{os.getpid()}"
    cg.mkdir()
    try:
        ns = NetNS(name)
        try:
            lo = ns.link_lookup(ifname="lo")[0]
            ns.link("set", index=lo, state="up")
            # a non-loopback address, local to the namespace (on lo: no extra driver needed)
            ns.addr("add", index=lo, address=NS_ADDR, prefixlen=32)
        finally:
            ns.close()
        server = subprocess.Popen([sys.executable, "-c", SERVER, name], stdout=subprocess.PIPE, text=True)
        port = int(server.stdout.readline())
        yield name, port, cg
    finally:
        if server is not None:
            server.kill()
            server.wait()
        kill_and_remove(cg)
        netns.remove(name)


def _client(name, port, cg) -> dict:
    p = subprocess.Popen([sys.executable, "-c", CLIENT, name, str(port), NS_ADDR],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    (cg / "cgroup.procs").write_text(str(p.pid))
    out, _ = p.communicate("go\n", timeout=30)
    return json.loads(out)


def test_none_local_full(netns_env):
    import errno

    from agentcg.adapters.bpf import NetPolicy, cgroup_id
    name, port, cg = netns_env
    cgid = cgroup_id(cg)
    with NetPolicy(cg) as net:
        assert len(net.links) == 9
        full = _client(name, port, cg)
        assert full == {"socket": "ok", "unix": "ok", "loopback": "ok", "remote": "ok"}
        st = net.net_stats(cgid)
        assert st["tx_bytes"] > 0 and st["rx_bytes"] > 0 and st["denied"] == 0

        net.set_mode(cgid, "none")
        none = _client(name, port, cg)
        assert none == {"socket": errno.EPERM, "unix": "ok", "loopback": errno.EPERM, "remote": errno.EPERM}

        net.set_mode(cgid, "local")
        local = _client(name, port, cg)
        assert local == {"socket": "ok", "unix": "ok", "loopback": "ok", "remote": errno.EPERM}
        assert net.net_stats(cgid)["denied"] >= 3
        assert net.denied_total >= 3

        net.set_mode(cgid, "full")
        assert _client(name, port, cg)["remote"] == "ok"
        with pytest.raises(ValueError, match="network='wide'"):
            net.set_mode(cgid, "wide")
