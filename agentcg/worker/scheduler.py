"""Which sequences run this step, and who leaves the device when blocks run out.

No torch: the scheduler works on Sequence records and the KVBlockManager, and
returns a StepPlan; swap plans it makes are carried out by the engine.

Continuous batching: every step runs each running sequence's next tokens (one
for a decoding sequence, a chunk of its prompt for a prefilling one) and admits
waiting sequences while the token budget and the block pool allow. When blocks
run out, idle session contexts leave first (swapped to host or dropped), then
running sequences of the lowest priority (latest arrival first) are preempted:
swapped out or dropped for recompute, as the cost model says.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from agentcg.core.kv_blocks import GPU, HOST, KVBlockManager, SwapPlan
from agentcg.worker.costmodel import RECOMPUTE, SWAP, CostModel

WAITING, RUNNING, SWAPPED, FINISHED = "waiting", "running", "swapped", "finished"


@dataclass
class Sequence:
    request_id: str
    tokens: list[int]
    prompt_len: int
    max_tokens: int
    priority: int
    arrival: int
    session_id: str | None = None
    temperature: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    num_computed: int = 0            # tokens whose K/V are in the cache
    state: str = WAITING
    prefilled_tokens: int = 0        # tokens this request ran through prefill
    reused_tokens: int = 0           # tokens taken from the session's cached context
    preemptions: int = 0

    @property
    def owner(self) -> str:
        return "req:" + self.request_id

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def order(self) -> tuple:
        return (-self.priority, self.arrival)


@dataclass
class SessionContext:
    """An idle session's cached context: tokens[:len] have K/V in table ses:<id>."""
    session_id: str
    tokens: list[int]
    keep: bool = False               # suspend(mode=keep): stay on the device
    last_used: int = 0
    expires_at_s: float | None = None

    @property
    def owner(self) -> str:
        return "ses:" + self.session_id


@dataclass
class Preemption:
    request_id: str
    mode: str
    reason: str


@dataclass
class StepPlan:
    batch: list[tuple[Sequence, int]] = field(default_factory=list)   # (seq, tokens to run)
    swaps: list[SwapPlan] = field(default_factory=list)               # in order of decision
    preempted: list[Preemption] = field(default_factory=list)
    evicted_sessions: list[tuple[str, str]] = field(default_factory=list)   # (session, swap|drop)


class Scheduler:
    def __init__(self, bm: KVBlockManager, cost: CostModel, *, max_batch: int,
                 max_step_tokens: int) -> None:
        self.bm = bm
        self.cost = cost
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.seqs: dict[str, Sequence] = {}
        self.sessions: dict[str, SessionContext] = {}
        self.tick = 0
        self.preemptions = {SWAP: 0, RECOMPUTE: 0}

    # ---------------------------------------------------------------- queues
    def add(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = seq

    def in_state(self, state: str) -> list[Sequence]:
        return sorted((s for s in self.seqs.values() if s.state == state), key=Sequence.order)

    # -------------------------------------------------------------- eviction
    def preempt(self, seq: Sequence, plan: StepPlan, why: str) -> None:
        t = self.bm.find_table(seq.owner)
        nblocks = len(t.blocks) if t else 0
        mode, reason = self.cost.choose(
            num_tokens=seq.num_computed, nbytes=nblocks * self.block_bytes,
            host_has_room=self.bm.can_swap_out(seq.owner))
        if mode == SWAP and t is not None and t.where == GPU and nblocks:
            plan.swaps.append(self.bm.swap_out(seq.owner))
            seq.state = SWAPPED
        else:
            mode = RECOMPUTE
            self.bm.free(seq.owner)
            seq.num_computed = 0
            seq.state = WAITING
        seq.preemptions += 1
        self.preemptions[mode] += 1
        plan.preempted.append(Preemption(seq.request_id, mode, f"{why}; {reason}"))
        plan.batch[:] = [(s, n) for s, n in plan.batch if s is not seq]

    block_bytes = 0    # set by the engine: bytes of one block (all layers)

    def evict_session(self, ctx: SessionContext, plan: StepPlan, mode: str | None = None) -> str:
        """Move an idle session's context off the device: swap or drop."""
        t = self.bm.find_table(ctx.owner)
        if t is None or t.where != GPU:
            return "none"
        if mode is None:
            mode, _ = self.cost.choose(num_tokens=len(ctx.tokens), nbytes=len(t.blocks) * self.block_bytes,
                                       host_has_room=self.bm.can_swap_out(ctx.owner))
            mode = "swap" if mode == SWAP else "drop"
        if mode == "swap" and self.bm.can_swap_out(ctx.owner):
            plan.swaps.append(self.bm.swap_out(ctx.owner))
        else:
            mode = "drop"
            self.bm.free(ctx.owner)
            del self.sessions[ctx.session_id]
        plan.evicted_sessions.append((ctx.session_id, mode))
        return mode

    def _evict_one_session(self, plan: StepPlan) -> bool:
        cands = [c for c in self.sessions.values()
                 if not c.keep and (t := self.bm.find_table(c.owner)) is not None and t.where == GPU]
        if not cands:
            cands = [c for c in self.sessions.values()
                     if (t := self.bm.find_table(c.owner)) is not None and t.where == GPU]
        if not cands:
            return False
        self.evict_session(min(cands, key=lambda c: c.last_used), plan)
        return True

    def _make_room(self, need: int, plan: StepPlan, victims: list[Sequence], why: str) -> bool:
        """Free blocks until `need` are free: idle sessions first, then victims
        (consumed from the end of the list)."""
        while self.bm.num_free_gpu < need:
            if self._evict_one_session(plan):
                continue
            if not victims:
                return False
            self.preempt(victims.pop(), plan, why)
        return True

    # -------------------------------------------------------------- schedule
    def schedule(self) -> StepPlan:
        self.tick += 1
        plan = StepPlan()
        budget = self.max_step_tokens
        running = self.in_state(RUNNING)
        # 1. running sequences, highest priority first; the lowest are victims
        victims = list(running)
        while victims:
            seq = victims.pop(0)
            if len(plan.batch) >= self.max_batch or budget <= 0:
                break
            n = min(len(seq.tokens) - seq.num_computed, budget)
            need = self.bm.extra_blocks_needed(seq.owner, seq.num_computed + n)
            if not self._make_room(need, plan, victims, f"no free block for {seq.request_id}"):
                self.preempt(seq, plan, "no free block for itself")
                continue
            self.bm.ensure_tokens(seq.owner, seq.num_computed + n)
            plan.batch.append((seq, n))
            budget -= n
        # 2. swapped sequences come back before new work is admitted
        for seq in self.in_state(SWAPPED):
            if len(plan.batch) >= self.max_batch or budget <= 0:
                break
            t = self.bm.table(seq.owner)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            need = max(len(t.blocks), self.bm.blocks_for_tokens(seq.num_computed + n))
            if not self._make_room(need, plan, [], "swap-in"):
                break
            plan.swaps.append(self.bm.swap_in(seq.owner))
            self.bm.truncate(seq.owner, seq.num_computed)
            self.bm.ensure_tokens(seq.owner, seq.num_computed + n)
            seq.state = RUNNING
            plan.batch.append((seq, n))
            budget -= n
        # 3. admit waiting sequences
        for seq in self.in_state(WAITING):
            if len(plan.batch) >= self.max_batch or budget <= 0:
                break
            n = min(len(seq.tokens) - seq.num_computed, budget)
            need = self.bm.extra_blocks_needed(seq.owner, seq.num_computed + n)
            lower = [s for s, _ in plan.batch if s.priority < seq.priority]
            lower.sort(key=Sequence.order)
            if not self._make_room(need, plan, lower, f"admitting {seq.request_id} (priority {seq.priority})"):
                break
            self.bm.ensure_tokens(seq.owner, seq.num_computed + n)
            seq.state = RUNNING
            plan.batch.append((seq, n))
            budget -= n
        return plan

    # ---------------------------------------------------------------- stats
    def session_table(self) -> dict:
        out = {}
        for sid, ctx in self.sessions.items():
            t = self.bm.find_table(ctx.owner)
            out[sid] = {"tokens": len(ctx.tokens), "keep": ctx.keep,
                        "where": t.where if t else "none",
                        "blocks_gpu": len(t.blocks) if t and t.where == GPU else 0,
                        "blocks_host": len(t.blocks) if t and t.where == HOST else 0,
                        "expires_at_s": ctx.expires_at_s}
        return out
