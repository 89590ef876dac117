"""Agent plans: recorded tool calls from the traces, synthetic token contexts.

An agent is one trace. Its tool calls are the trace's calls taken in order,
one at a time (a call that starts before the previous chosen one ended is a
parallel or nested call and is skipped, as are `Task` calls, which wrap a
sub-agent's own LLM turns). Each call lasts its recorded duration divided by
the speed-up factor.

The LLM side is synthetic but deterministic (seeded): turn 0 sends a system
and task prompt of `system_tokens` tokens; after call k the agent sends its
whole context so far (every earlier prompt and answer) plus the tool's result
(a log-normal number of tokens, mean `result_tokens`) and a short
`glue_tokens` prompt, and asks for `answer_tokens` tokens. The traces do not
record output sizes, so result sizes are drawn, not replayed.
"""
from __future__ import annotations

import glob
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

SKIPPED_TOOLS = {"Task"}


@dataclass(frozen=True)
class ToolCall:
    tool: str
    cmd: str                      # the Bash command line, else the tool name
    duration_s: float             # recorded duration / speed-up

    @property
    def command(self) -> str:
        """What a duration history is kept under."""
        return self.cmd or self.tool


@dataclass(frozen=True)
class AgentPlan:
    name: str                     # also the engine session name
    trace: str                    # <model>__<task>
    added: tuple[tuple[int, ...], ...]   # tokens each turn adds to the context
    calls: tuple[ToolCall, ...]   # calls[k] runs between turn k and turn k + 1
    answer_tokens: int

    @property
    def turns(self) -> int:
        return len(self.added)

    def max_context_tokens(self) -> int:
        return sum(len(a) for a in self.added) + self.turns * self.answer_tokens


@dataclass(frozen=True)
class PlanConfig:
    agents: int = 8
    max_turns: int = 12           # LLM turns per agent (tool calls = turns - 1)
    system_tokens: int = 512
    result_tokens: int = 192      # mean tool-result size
    glue_tokens: int = 8
    answer_tokens: int = 16
    speedup: float = 20.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("agents", "max_turns", "system_tokens", "result_tokens", "glue_tokens", "answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not self.speedup > 0:
            raise ValueError(f"speedup: must be positive, got {self.speedup}")


def load_trace(path: str | Path) -> dict:
    with open(path) as f:
        return json.load(f)


def sequential_calls(trace: dict, speedup: float) -> list[ToolCall]:
    """The trace's tool calls one at a time, in order, durations scaled."""
    out: list[ToolCall] = []
    busy_until = -math.inf
    for c in sorted(trace["tool_calls"], key=lambda c: c["t_start"]):
        if c["tool"] in SKIPPED_TOOLS or c["t_start"] < busy_until:
            continue
        busy_until = c["t_end"]
        out.append(ToolCall(c["tool"], c.get("cmd") or "", max(0.0, c["t_end"] - c["t_start"]) / speedup))
    return out


def token_range(vocab_size: int) -> int:
    """Prompt tokens are drawn below this: the byte range for byte vocabularies
    (so no special token is sent), else everything below Llama 3's specials."""
    return 256 if vocab_size < 1000 else min(vocab_size, 128000)


def trace_files(trace_dir: str | Path) -> list[str]:
    files = sorted(glob.glob(str(Path(trace_dir) / "*.json")))
    if not files:
        raise SystemExit(f"no traces (*.json) in {trace_dir}")
    return files


def build_plans(trace_dir: str | Path, cfg: PlanConfig, vocab_size: int) -> tuple[list[AgentPlan], list[str]]:
    """-> (plans, the trace files not sampled). Traces with fewer than two
    sequential calls are not sampled (an agent needs tool calls)."""
    rng = random.Random(cfg.seed)
    files = trace_files(trace_dir)
    usable = [f for f in files if len(sequential_calls(load_trace(f), cfg.speedup)) >= 2]
    if len(usable) < cfg.agents:
        raise SystemExit(f"{trace_dir}: {len(usable)} traces with tool calls, {cfg.agents} agents asked for")
    chosen = rng.sample(usable, cfg.agents)
    hi = token_range(vocab_size)
    sigma = 0.8                                       # spread of result sizes (log-normal)
    mu = math.log(cfg.result_tokens) - sigma * sigma / 2
    plans = []
    for i, f in enumerate(chosen):
        trace = load_trace(f)
        calls = sequential_calls(trace, cfg.speedup)[:cfg.max_turns - 1]
        added = [tuple(rng.randrange(hi) for _ in range(cfg.system_tokens))]
        for _ in calls:
            n = min(8 * cfg.result_tokens, max(1, round(rng.lognormvariate(mu, sigma)))) + cfg.glue_tokens
            added.append(tuple(rng.randrange(hi) for _ in range(n)))
        plans.append(AgentPlan(f"agent{i:02d}", Path(f).stem, tuple(added), tuple(calls), cfg.answer_tokens))
    return plans, [f for f in files if f not in chosen]


def history(files: list[str], speedup: float) -> list[tuple[str, float]]:
    """(command, scaled duration) of every sequential call in `files`: the host's
    duration history from earlier runs, for the estimators that learn from it."""
    return [(c.command, c.duration_s) for f in files for c in sequential_calls(load_trace(f), speedup)]
