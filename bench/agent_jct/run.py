"""Multi-turn coding agents replayed against the real worker engine under five
KV placement policies and the resident reference, one after the other in one
run, over one copy of the model's weights, on the same agent plans.

    python -m bench.agent_jct                                   # CPU, tiny shape
    python -m bench.agent_jct --preset gpu --max-seconds 540    # GPU, llama3-8b shape

Writes bench/results/agent_jct.json (agent_jct-gpu.json for the gpu preset,
or --out). gpu_run(max_seconds) is the GPU run for a suite script. See
bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from agentcg.worker.engine import Engine, EngineConfig, Request
from agentcg.worker.model import Llama, resolve_device, resolve_dtype

from bench.agent_jct import plan as planmod
from bench.agent_jct.clock import make_clock
from bench.agent_jct.plan import PlanConfig
from bench.agent_jct.policies import Policy, all_policies
from bench.agent_jct.replay import PolicyRun, run_policy
from bench.agent_jct.report import comparisons, markdown, summarise

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRACES = REPO.parent / "shared" / "traces" / "dev"


@dataclass(frozen=True)
class Options:
    model: str = "tiny"
    device: str = "cpu"
    dtype: str | None = None
    plan: PlanConfig = PlanConfig()
    pool_frac: float = 0.5            # device pool / the agents' summed final contexts
    block_size: int = 16
    request_gap_ms: float = 10.0      # tool result -> next request (the prefetch's lead)
    declared_noise: float = 0.5       # sigma of ln(declared / true) for infercept
    max_seconds: float | None = None  # the whole run; each policy gets an equal share
    traces: str = str(DEFAULT_TRACES)
    policies: tuple[str, ...] = ()    # empty: all
    clock: str = "auto"               # auto: cpu time on CPU, wall time on CUDA (clock.py)


PRESETS = {
    "cpu": Options(),
    "gpu": Options(model="llama3-8b", device="cuda",
                   plan=PlanConfig(agents=16, max_turns=16, system_tokens=4096, result_tokens=1024,
                                   answer_tokens=32, speedup=10.0), max_seconds=540.0),
}


def log(msg: str) -> None:
    print(f"[agent_jct {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "cpus": os.cpu_count(),
            "host": platform.node(), "processor": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    return info


def pool_sizes(plans: list[planmod.AgentPlan], opts: Options) -> dict[str, int]:
    """Device blocks for the policies (pool_frac of the summed final contexts, at
    least the largest single request) and for the resident reference (all)."""
    per = [math.ceil(p.max_context_tokens() / opts.block_size) + 1 for p in plans]
    total = sum(per)
    pool = max(max(per) + 2, math.ceil(opts.pool_frac * total))
    return {"pool_blocks": pool, "resident_pool_blocks": total + 2 * len(plans),
            "host_blocks": total + 2 * len(plans), "context_blocks_total": total}


def _engine(opts: Options, model: Llama, gpu_blocks: int, host_blocks: int, policy: Policy,
            cost: dict | None) -> Engine:
    cfg = EngineConfig(model=opts.model, device=opts.device, dtype=opts.dtype, block_size=opts.block_size,
                       gpu_blocks=gpu_blocks, host_blocks=host_blocks, max_batch=max(32, opts.plan.agents),
                       seed=opts.plan.seed, preempt_mode=policy.preempt_mode, measure=cost is None)
    e = Engine(cfg, model=model)
    if cost is not None:          # every policy decides on the same measured costs
        e.cost.h2d_gbps, e.cost.d2h_gbps = cost["h2d_gbps"], cost["d2h_gbps"]
        e.cost.prefill_tokens_per_s = cost["prefill_tokens_per_s"]
    return e


def _warm_up(engine: Engine, vocab: int) -> None:
    hi = planmod.token_range(vocab)
    for i, n in enumerate((64, 512)):
        engine.add_request(Request(f"warm{i}", [(7 * j) % hi for j in range(n)], max_tokens=4))
    while engine.has_work():
        engine.step()


def run_benchmark(opts: Options) -> tuple[dict, dict[str, PolicyRun]]:
    """-> (the result document, the runs by policy name, with every agent's tokens)."""
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    clock_kind = opts.clock if opts.clock != "auto" else ("wall" if device.type == "cuda" else "cpu")
    if clock_kind == "cpu":
        torch.set_num_threads(1)        # the clock counts this thread's CPU time: all of the work
    t_start = time.monotonic()
    log(f"building model {opts.model} on {device}")
    model = Llama.load(opts.model, device, dtype, opts.plan.seed)
    plans, rest = planmod.build_plans(opts.traces, opts.plan, model.shape.vocab_size)
    history = planmod.history(rest, opts.plan.speedup)
    sizes = pool_sizes(plans, opts)
    policies = [p for p in all_policies(opts.declared_noise) if not opts.policies or p.name in opts.policies]
    if not policies:
        raise SystemExit(f"--policies: none of {', '.join(opts.policies)} is a policy")
    probe = _engine(opts, model, sizes["pool_blocks"], 64, Policy(), None)
    _warm_up(probe, model.shape.vocab_size)
    cost = probe.cost.as_dict()
    block_bytes = probe.kv.block_bytes
    del probe
    log(f"{len(plans)} agents, {sum(p.turns for p in plans)} turns, pool {sizes['pool_blocks']} blocks of "
        f"{sizes['context_blocks_total']} needed; costs {cost}")
    runs: dict[str, PolicyRun] = {}
    for i, pol in enumerate(policies):
        share = None
        if opts.max_seconds is not None:
            left = opts.max_seconds - (time.monotonic() - t_start)
            share = max(1.0, left / (len(policies) - i))
        blocks = sizes["resident_pool_blocks"] if pol.resident else sizes["pool_blocks"]
        engine = _engine(opts, model, blocks, sizes["host_blocks"], pol, cost)
        runs[pol.name] = run_policy(engine, pol, plans, history=history, request_gap_s=opts.request_gap_ms / 1e3,
                                    speedup=opts.plan.speedup, seed=opts.plan.seed, clock=make_clock(clock_kind),
                                    max_seconds=share)
        engine.bm.check()
        log(f"{pol.name}: makespan {runs[pol.name].makespan_s:.1f} s ({clock_kind} clock), wall "
            f"{runs[pol.name].wall_s:.1f} s" + (" (time limit reached)" if runs[pol.name].truncated else ""))
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref = runs.get("resident")
    rows = [summarise(runs[p.name], p, ref) for p in policies]
    s = model.shape
    targets_apply = device.type == "cuda" and opts.model == "llama3-8b"
    result = {
        "benchmark": "agent_jct",
        "note": ("GPU run of the llama3-8b shape: these are the target figures." if targets_apply else
                 f"{device.type.upper()} run of the {opts.model} shape: the figures show the policies' mechanics "
                 "(who holds, swaps and recomputes what), not the target figures, which need the llama3-8b "
                 "shape on a GPU (python -m bench.agent_jct --preset gpu)."),
        "policies": rows,
        "device": device_info(device),
        "params": {
            "model": opts.model, "dtype": str(dtype).replace("torch.", ""),
            "shape": {"n_layers": s.n_layers, "dim": s.dim, "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads,
                      "ffn_dim": s.ffn_dim, "vocab_size": s.vocab_size},
            "agents": opts.plan.agents, **asdict(opts.plan), **sizes, "block_size": opts.block_size,
            "block_bytes": block_bytes, "pool_frac": opts.pool_frac, "request_gap_ms": opts.request_gap_ms,
            "declared_noise_sigma": opts.declared_noise, "max_seconds": opts.max_seconds,
            "cost_model": cost, "clock": clock_kind, "torch_threads": torch.get_num_threads(),
            "commit": commit(), "traces_dir": opts.traces,
            "traces": [p.trace for p in plans], "history_calls": len(history),
        },
        "comparisons": comparisons(rows, targets_apply),
        "all_outputs_identical": all(r["outputs_identical_to_resident"] for r in rows) if ref else None,
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    return result, runs


def parse_args(argv: list[str] | None) -> tuple[Options, Path]:
    ap = argparse.ArgumentParser(prog="python -m bench.agent_jct", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                    help="defaults for the other options: cpu (tiny shape, CI-sized) or gpu (llama3-8b shape)")
    ap.add_argument("--model", help="worker shape: tiny, small, llama3-8b (random weights, nothing downloaded)")
    ap.add_argument("--device", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", help="float32, bfloat16, float16, float64 (default: the worker's for the device)")
    ap.add_argument("--agents", type=int, help="agents replayed at once")
    ap.add_argument("--max-turns", type=int, help="LLM turns per agent (tool calls = turns - 1)")
    ap.add_argument("--system-tokens", type=int, help="tokens of the first prompt")
    ap.add_argument("--result-tokens", type=int, help="mean tokens of a tool result (log-normal)")
    ap.add_argument("--answer-tokens", type=int, help="tokens generated per turn")
    ap.add_argument("--speedup", type=float, help="recorded tool-call durations are divided by this")
    ap.add_argument("--seed", type=int, help="trace sample, token contents, weights, declared-duration noise")
    ap.add_argument("--pool-frac", type=float, help="device KV pool as a fraction of the summed final contexts")
    ap.add_argument("--request-gap-ms", type=float, help="tool call end -> the agent's next request")
    ap.add_argument("--declared-noise", type=float, help="infercept: sigma of ln(declared/true duration)")
    ap.add_argument("--max-seconds", type=float, help="time limit of the whole run (policies share it equally)")
    ap.add_argument("--policies", help="comma-separated subset (recompute,lru,infercept,continuum,agentcg,resident)")
    ap.add_argument("--clock", choices=("auto", "wall", "cpu"),
                    help="time base: wall, or cpu (this thread's CPU time, idle skipped); auto: cpu on CPU, wall on CUDA")
    ap.add_argument("--traces", help=f"trace directory (default {DEFAULT_TRACES})")
    ap.add_argument("--out", type=Path, help="result file (default bench/results/agent_jct.json, "
                                             "agent_jct-gpu.json for --preset gpu)")
    a = ap.parse_args(argv)
    o = PRESETS[a.preset]
    pl = {k: v for k, v in {"agents": a.agents, "max_turns": a.max_turns, "system_tokens": a.system_tokens,
                            "result_tokens": a.result_tokens, "answer_tokens": a.answer_tokens,
                            "speedup": a.speedup, "seed": a.seed}.items() if v is not None}
    top = {k: v for k, v in {"model": a.model, "device": a.device, "dtype": a.dtype, "pool_frac": a.pool_frac,
                             "request_gap_ms": a.request_gap_ms, "declared_noise": a.declared_noise,
                             "max_seconds": a.max_seconds, "traces": a.traces, "clock": a.clock}.items() if v is not None}
    if a.policies:
        top["policies"] = tuple(x.strip() for x in a.policies.split(",") if x.strip())
    if "pool_frac" in top and not 0 < top["pool_frac"] <= 1:
        ap.error(f"--pool-frac: expected 0 < x <= 1, got {top['pool_frac']}")
    try:
        out = a.out or REPO / "bench" / "results" / ("agent_jct-gpu.json" if a.preset == "gpu" else "agent_jct.json")
        return replace(o, plan=replace(o.plan, **pl), **top), out
    except ValueError as e:
        ap.error(str(e))
        raise


def gpu_run(max_seconds: float, out: Path | None = None) -> dict:
    """The GPU figures: llama3-8b shape on cuda within max_seconds (for bench/gpu_suite.sh)."""
    opts = replace(PRESETS["gpu"], max_seconds=max_seconds)
    result, _ = run_benchmark(opts)
    write(result, out or REPO / "bench" / "results" / "agent_jct-gpu.json")
    return result


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    opts, out = parse_args(argv)
    result, _ = run_benchmark(opts)
    write(result, out)
    print(markdown(result))
    print(json.dumps(result["comparisons"]))
    return 0
