"""bench/agent_jct at CI size: the five placement policies and the resident
reference replay the same agents to the end on the real tiny engine, and
swapping, dropping, recomputing or evicting a context never changes what an
agent generates (greedy decoding: the tokens must be identical)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")

from bench.agent_jct.plan import PlanConfig  # noqa: E402
from bench.agent_jct.run import DEFAULT_TRACES, PRESETS, main, run_benchmark, write  # noqa: E402

TRACES = Path(DEFAULT_TRACES)
POLICIES = ["recompute", "lru", "infercept", "continuum", "agentcg", "resident"]

pytestmark = pytest.mark.skipif(not TRACES.is_dir(), reason=f"no traces at {TRACES}")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    # float64: the recompute and the cached-prefix paths round differently, and
    # batches depend on timing; in float64 no greedy tie is close enough to flip
    opts = replace(PRESETS["cpu"], dtype="float64", pool_frac=0.4,
                   plan=PlanConfig(agents=4, max_turns=5, system_tokens=96, result_tokens=48,
                                   answer_tokens=8, speedup=100.0, seed=3))
    result, runs = run_benchmark(opts)
    out = tmp_path_factory.mktemp("jct") / "agent_jct.json"
    write(result, out)
    return result, runs, out


def test_every_policy_finishes_every_agent(bench):
    result, runs, _ = bench
    assert [r["policy"] for r in result["policies"]] == POLICIES
    for r in result["policies"]:
        assert r["agents_finished"] == r["agents"] == 4, r
        assert r["turns"] == sum(p.turns for p in [a.plan for a in runs[r["policy"]].agents])
        assert not r["truncated"]
        assert r["ttft_after_tool_count"] == r["turns"] - r["agents"]


def test_generated_tokens_identical_across_policies(bench):
    _, runs, _ = bench
    ref = {a.plan.name: a.outputs for a in runs["resident"].agents}
    assert all(len(o) == 5 for o in ref.values())
    for name, run in runs.items():
        for a in run.agents:
            assert a.outputs == ref[a.plan.name], f"{name}: {a.plan.name} generated other tokens"


def test_policies_use_their_mechanisms(bench):
    result, _, _ = bench
    by = {r["policy"]: r for r in result["policies"]}
    # recompute prefills every context again; the resident pool never does
    assert by["recompute"]["recompute_tokens"] > 0 and by["recompute"]["idle_held_block_s"] == 0
    assert by["resident"]["recompute_tokens"] == 0 and by["resident"]["swap_out_bytes"] == 0
    assert by["resident"]["evicted_sessions"] == 0
    # the pool is smaller than the contexts: the LRU cache must evict
    assert by["lru"]["evicted_sessions"] > 0
    assert by["continuum"]["decisions"].get("keep", 0) > 0
    assert sum(by["agentcg"]["decisions"].values()) > 0
    for r in result["policies"]:
        assert r["swap_in_bytes"] <= r["swap_out_bytes"]


def test_result_file_keys(bench):
    _, _, out = bench
    doc = json.loads(out.read_text())
    assert {"policies", "device", "params", "comparisons", "note"} <= doc.keys()
    for r in doc["policies"]:
        assert {"policy", "jct_mean_s", "jct_p95_s", "ttft_after_tool_p50_ms", "ttft_after_tool_p99_ms",
                "idle_held_block_s", "swap_out_bytes", "swap_in_bytes", "recompute_tokens"} <= r.keys()
        assert r["jct_mean_s"] > 0 and r["ttft_after_tool_p99_ms"] >= r["ttft_after_tool_p50_ms"]
    p = doc["params"]
    assert {"model", "shape", "agents", "pool_blocks", "speedup", "seed", "commit"} <= p.keys()
    assert p["pool_blocks"] < p["context_blocks_total"] <= p["resident_pool_blocks"]
    assert doc["device"]["type"] == "cpu" and doc["comparisons"]["targets_apply"] is False
    assert doc["all_outputs_identical"] is True


def test_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        main(["--pool-frac", "1.5"])
    assert "--pool-frac" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--agents", "0"])
    assert "agents" in capsys.readouterr().err
