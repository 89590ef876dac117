"""Per-policy figures from the runs, the comparisons against the targets, and
the markdown table for the README."""
from __future__ import annotations

from bench.agent_jct.policies import Policy
from bench.agent_jct.replay import PolicyRun

# what the GPU run (llama3-8b shape on a GPU) is meant to show
TARGETS = {"jct_mean_recompute_over_agentcg_min": 2.0, "jct_mean_continuum_over_agentcg_min": 1.2,
           "ttft_p99_agentcg_over_resident_max": 1.1}


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def summarise(run: PolicyRun, policy: Policy, reference: PolicyRun | None) -> dict:
    done = [a for a in run.agents if a.end_s is not None]
    jct = [a.end_s for a in done]                         # every agent starts at t = 0
    ttft = [x for a in run.agents for x in a.ttft_after_tool_s]
    same = None
    if reference is not None:
        ref = {a.plan.name: a.outputs for a in reference.agents}
        same = all(a.outputs == ref[a.plan.name] for a in run.agents)
    mean = sum(jct) / len(jct) if jct else None
    return {
        "policy": run.policy, "description": policy.description,
        "jct_mean_s": _r(mean), "jct_p95_s": _r(percentile(jct, 0.95)),
        "ttft_after_tool_p50_ms": _r(None if not ttft else percentile(ttft, 0.5) * 1e3, 2),
        "ttft_after_tool_p99_ms": _r(None if not ttft else percentile(ttft, 0.99) * 1e3, 2),
        "ttft_after_tool_count": len(ttft),
        "idle_held_block_s": _r(run.idle_held_block_s, 2),
        "swap_out_bytes": run.swap_out_bytes, "swap_in_bytes": run.swap_in_bytes,
        "recompute_tokens": run.recompute_tokens, "prefilled_tokens": run.prefilled_tokens,
        "agents": len(run.agents), "agents_finished": len(done),
        "turns": sum(len(a.outputs) for a in run.agents),
        "generated_tokens": sum(len(o) for a in run.agents for o in a.outputs),
        "outputs_identical_to_resident": same,
        "decisions": run.decisions, "preemptions": run.preemptions,
        "evicted_sessions": run.engine_counters.get("evicted_sessions", 0),
        "ttl_dropped_sessions": run.engine_counters.get("dropped_sessions", 0),
        "makespan_s": _r(run.makespan_s), "wall_s": _r(run.wall_s), "truncated": run.truncated,
    }


def comparisons(rows: list[dict], targets_apply: bool) -> dict:
    by = {r["policy"]: r for r in rows}

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = by.get(a, {}).get(key), by.get(b, {}).get(key)
        return _r(x / y) if x is not None and y else None

    out = {"jct_mean_recompute_over_agentcg": ratio("recompute", "agentcg", "jct_mean_s"),
           "jct_mean_continuum_over_agentcg": ratio("continuum", "agentcg", "jct_mean_s"),
           "jct_mean_lru_over_agentcg": ratio("lru", "agentcg", "jct_mean_s"),
           "jct_mean_infercept_over_agentcg": ratio("infercept", "agentcg", "jct_mean_s"),
           "ttft_p99_agentcg_over_resident": ratio("agentcg", "resident", "ttft_after_tool_p99_ms"),
           "targets": TARGETS, "targets_apply": targets_apply}
    if targets_apply:
        out["targets_met"] = {
            "jct_recompute": (out["jct_mean_recompute_over_agentcg"] or 0) >= TARGETS["jct_mean_recompute_over_agentcg_min"],
            "jct_continuum": (out["jct_mean_continuum_over_agentcg"] or 0) >= TARGETS["jct_mean_continuum_over_agentcg_min"],
            "ttft_resident": (out["ttft_p99_agentcg_over_resident"] or 1e9) <= TARGETS["ttft_p99_agentcg_over_resident_max"],
        }
    return out


def markdown(result: dict) -> str:
    head = ("| policy | JCT mean s | JCT p95 s | TTFT after tool p50 / p99 ms | idle-held block·s | "
            "swap out / in MiB | recompute tokens | same tokens |")
    lines = [head, "|" + "---|" * 8]
    for r in result["policies"]:
        mib = f"{r['swap_out_bytes'] / 2**20:.1f} / {r['swap_in_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['policy']} | {r['jct_mean_s']} | {r['jct_p95_s']} | {r['ttft_after_tool_p50_ms']} / "
                     f"{r['ttft_after_tool_p99_ms']} | {r['idle_held_block_s']} | {mib} | {r['recompute_tokens']} | "
                     f"{'yes' if r['outputs_identical_to_resident'] else 'no'} |")
    return "\n".join(lines)
