"""The metrics endpoint of a real agentcgd on this host's cgroup2 tree,
scraped over HTTP and parsed with prometheus_client's own parser."""
from __future__ import annotations

import shutil
import signal
import time
import urllib.error
import urllib.request

import pytest

from conftest import daemon_dirs, remove_daemon_tree, require_cgroup2
from test_daemon_host import Agentcgd
from agentcg.client import Client

pytestmark = pytest.mark.kernel
parser = pytest.importorskip("prometheus_client.parser", reason="the metrics extra (prometheus_client)")


@pytest.fixture
def metrics_daemon(request, tmp_path):
    root, runtime = daemon_dirs(request, require_cgroup2())
    conf = tmp_path / "agentcg.toml"
    conf.write_text('[metrics]\nlisten = "127.0.0.1:0"\n')
    d = Agentcgd(root, runtime, extra_args=["--config", str(conf)]).start()
    yield d
    d.stop(signal.SIGKILL)
    remove_daemon_tree(root)
    shutil.rmtree(runtime, ignore_errors=True)


def metrics_url(client: Client) -> str:
    deadline = time.monotonic() + 10
    while True:
        m = client.status()["hooks"]["metrics"]
        if m["state"] == "serving":
            return f"http://{m['address']}/metrics"
        assert m["state"] == "starting" and time.monotonic() < deadline, m
        time.sleep(0.05)


def scrape(url: str) -> dict[str, list]:
    """metric family name -> its samples (name, labels, value)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f.samples for f in parser.text_string_to_metric_families(text)}


def value(families: dict[str, list], sample: str, **labels: str) -> float | None:
    family = next((f for f in families if sample == f or sample.startswith(f + "_")), None)
    for s in families.get(family, []):
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_scrape_after_calls_then_session_end(metrics_daemon):
    c = Client(metrics_daemon.socket)
    url = metrics_url(c)
    s = c.session("met")
    assert s.run(["true"]).exit_status == 0
    assert s.run(["false"]).exit_status == 1
    assert s.run(["git", "--version"]).exit_status == 0
    with s.tool_call("sleeper") as call:
        h = call.popen(["sleep", "30"])
        m = scrape(url)
        h.kill()
        h.wait()

    assert value(m, "agentcg_sessions") == 1
    assert value(m, "agentcg_session_running_calls", session="met") == 1
    assert value(m, "agentcg_session_calls_started_total", session="met") == 4
    assert value(m, "agentcg_session_calls_ended_total", session="met") == 3
    assert value(m, "agentcg_calls_started_total", command="true") == 1
    assert value(m, "agentcg_calls_started_total", command="sleep") == 1
    assert value(m, "agentcg_calls_ended_total", command="true", result="ok") == 1
    assert value(m, "agentcg_calls_ended_total", command="false", result="failed") == 1
    assert value(m, "agentcg_calls_ended_total", command="git", result="ok") == 1
    assert value(m, "agentcg_call_duration_seconds_count", command="true") == 1
    assert value(m, "agentcg_call_duration_seconds_bucket", command="true", le="+Inf") == 1
    assert value(m, "agentcg_call_duration_seconds_sum", command="true") > 0
    # the sleep's memory, the session's CPU, its PSI (the files cgroup2 has with no controller)
    assert value(m, "agentcg_session_memory_bytes", session="met") > 0
    assert value(m, "agentcg_session_cpu_seconds_total", session="met") > 0
    assert value(m, "agentcg_session_pressure_stall_seconds_total", session="met", resource="memory",
                 kind="some") is not None
    # each request's time in the daemon: 4 call.start, 3 call.end (and the status polls)
    assert value(m, "agentcg_request_duration_seconds_count", op="call.start") == 4
    assert value(m, "agentcg_request_duration_seconds_count", op="call.end") == 3
    assert value(m, "agentcg_request_duration_seconds_count", op="session.create") == 1
    assert value(m, "agentcg_kills_total", reason="policy") == 0

    s.end()
    after = scrape(url)
    assert value(after, "agentcg_sessions") == 0
    session_series = [x for samples in after.values() for x in samples if x.labels.get("session") == "met"]
    assert session_series == []                   # a session's series go with it
    assert value(after, "agentcg_calls_ended_total", command="sleep", result="failed") == 1   # killed
    assert value(after, "agentcg_call_duration_seconds_count", command="sleep") == 1
    assert value(after, "agentcg_request_duration_seconds_count", op="session.end") == 1


def test_other_paths_and_methods(metrics_daemon):
    base = metrics_url(Client(metrics_daemon.socket)).rsplit("/", 1)[0]
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(base + "/nothing", timeout=10)
    assert exc.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(urllib.request.Request(base + "/metrics", data=b"x", method="POST"), timeout=10)
    assert exc.value.code == 405


def test_without_the_package_the_log_and_status_say_so(request, tmp_path, monkeypatch):
    """A daemon whose interpreter cannot import prometheus_client (a package
    of that name that raises ImportError, first on its path) runs on and says why."""
    shim = tmp_path / "shim" / "prometheus_client"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("No module named prometheus_client")\n')
    monkeypatch.setenv("PYTHONPATH", str(shim.parent))
    root, runtime = daemon_dirs(request, require_cgroup2())
    conf = tmp_path / "agentcg.toml"
    conf.write_text('[metrics]\nlisten = "127.0.0.1:0"\n')
    d = Agentcgd(root, runtime, extra_args=["--config", str(conf)]).start()
    try:
        c = Client(d.socket)
        m = c.status()["hooks"]["metrics"]
        assert m["state"] == "unavailable" and "agentcg[metrics]" in m["reason"]
        with c.session("nometrics") as s:
            assert s.run(["true"]).exit_status == 0     # the daemon works on
    finally:
        d.stop(signal.SIGTERM)
        remove_daemon_tree(root)
        shutil.rmtree(runtime, ignore_errors=True)
    log = d.proc.stderr.read().decode()
    assert "prometheus_client is not installed" in log and "no metrics endpoint" in log
