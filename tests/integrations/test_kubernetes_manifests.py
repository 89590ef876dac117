"""deploy/kubernetes/ validated with kubernetes-validate (the Kubernetes
OpenAPI JSON schemas, strict: unknown fields are errors), and its
agentcg.toml parsed by agentcgd's own config parser."""
from __future__ import annotations

from pathlib import Path

import pytest

kv = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

from agentcg.core.config import parse_config  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
VERSION = kv.latest_version()


def documents() -> dict[str, dict]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_every_manifest_passes_the_strict_schema():
    docs = documents()
    assert set(docs) == {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"}
    for doc in docs.values():
        kv.validate(doc, VERSION, strict=True)


def test_the_validator_catches_a_misspelt_field():
    ds = documents()["DaemonSet"]
    ds["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, VERSION, strict=True)


def test_the_daemonset_reaches_the_node_tree_and_the_config_parses():
    docs = documents()
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    assert container["command"][:2] == ["nsenter", "--cgroup=/proc/1/ns/cgroup"]
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for name in ("cgroup", "bpffs", "run"):
        assert mounts[name] == host[name]
    assert host["cgroup"] == "/sys/fs/cgroup" and host["bpffs"] == "/sys/fs/bpf" and host["run"] == "/run/agentcg"
    cfg = parse_config(docs["ConfigMap"]["data"]["agentcg.toml"])
    assert cfg.daemon.cgroup_root == "/sys/fs/cgroup/agentcg.slice"
    assert cfg.daemon.runtime_dir == "/run/agentcg" and cfg.daemon.systemd_tree_unit == ""
    assert mounts["config"] + "/agentcg.toml" in container["command"]
