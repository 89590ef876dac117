"""The inference engine: model + paged KV cache + scheduler + swap engine.

Not thread-safe: one thread calls add_request/abort/step/suspend/resume/
shrink/grow/stats. Every step() runs one scheduler iteration and returns the
tokens it produced. A finishing request reports its last token with
finished=True; for finish_reason "stop" that token is the stop/EOS token
itself (not text).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from agentcg.adapters.kv_torch import KVPool
from agentcg.core.kv_blocks import GPU, HOST, KVBlockManager
from agentcg.worker.costmodel import CostModel
from agentcg.worker.model import Llama, resolve_device, resolve_dtype
from agentcg.worker.runner import build_batch, sample
from agentcg.worker.scheduler import (FINISHED, RUNNING, SWAPPED, WAITING, Scheduler, SessionContext,
                                      Sequence, StepPlan)
from agentcg.worker.swap import SwapEngine
from agentcg.worker.tokenizer import load_tokenizer


@dataclass
class EngineConfig:
    model: str = "tiny"                 # named shape (random weights) or checkpoint directory
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    dtype: str | None = None            # default bf16 on CUDA, fp32 on CPU
    block_size: int = 16                # tokens per KV block
    gpu_blocks: int | None = None       # None: fit to gpu_memory_fraction (CUDA) or 512 (CPU)
    host_blocks: int | None = None      # None: host_bytes worth of blocks
    max_batch: int = 32
    seed: int = 0
    chunk_blocks: int | None = None     # blocks per separately allocated pool chunk (None: ~16 chunks)
    gpu_memory_fraction: float = 0.9
    host_bytes: int = 8 << 30
    max_step_tokens: int = 8192         # prefill tokens per step (chunked prefill beyond)
    preempt_mode: str | None = None     # None: cost model; "swap" / "recompute" force one
    measure: bool = True                # measure link bandwidth and prefill speed at start-up
    overlap_swap_in: bool = True        # a resumed sequence's prefill waits per layer for its swap-in
                                        # (False: for the whole swap-in before the step starts)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int = 64
    session_id: str | None = None
    priority: int = 0
    temperature: float = 0.0
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class TokenEvent:
    request_id: str
    token_id: int
    finished: bool
    finish_reason: str | None           # "stop" | "length" | "abort"


def end_tokens(model_eos_ids: tuple[int, ...], tokenizer_eos_id: int | None) -> tuple[int, ...]:
    """Every token that ends a generation: the model's end tokens (a checkpoint
    may list several, e.g. end of text and end of turn) and the tokenizer's
    EOS, which chat checkpoints sometimes set to the end-of-turn token only."""
    ids = list(model_eos_ids)
    if tokenizer_eos_id is not None and tokenizer_eos_id not in ids:
        ids.append(tokenizer_eos_id)
    return tuple(ids)


class EngineError(ValueError):
    """A request or control call the engine cannot accept; the message says why."""


class Engine:
    def __init__(self, cfg: EngineConfig, progress: Callable[[str], None] | None = None,
                 model: Llama | None = None) -> None:
        """model: weights already loaded (shared with another engine, read only) instead of
        loading cfg.model; it must be on this engine's device, in its dtype."""
        self.cfg = cfg
        say = progress or (lambda msg: None)
        if cfg.block_size <= 0:
            raise EngineError(f"block_size must be positive, got {cfg.block_size}")
        if cfg.max_batch <= 0:
            raise EngineError(f"max_batch must be positive, got {cfg.max_batch}")
        if cfg.preempt_mode not in (None, "swap", "recompute"):
            raise EngineError(f"preempt_mode must be swap, recompute or unset, got {cfg.preempt_mode!r}")
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        t0 = time.monotonic()
        if model is None:
            say(f"loading model {cfg.model} on {self.device} ({str(self.dtype).replace('torch.', '')})")
            model = Llama.load(cfg.model, self.device, self.dtype, cfg.seed, say)
        elif model.device != self.device or model.dtype != self.dtype:
            raise EngineError(f"shared model is on {model.device} in {model.dtype}; this engine is "
                              f"{self.device} in {self.dtype}")
        self.model = model
        shape = self.model.shape
        self.model_name = shape.name if shape.name else cfg.model
        self.tokenizer = load_tokenizer(None if cfg.model == shape.name else cfg.model,
                                        shape.eos_token_id, shape.bos_token_id)
        self.stop_token_ids = end_tokens(shape.eos_token_ids, self.tokenizer.eos_token_id)
        say(f"model ready: {shape.param_count() / 1e9:.2f}B parameters in {time.monotonic() - t0:.1f}s")
        block_bytes = shape.kv_bytes_per_token(self.model.w["emb"].element_size()) * cfg.block_size
        gpu_blocks = cfg.gpu_blocks
        if gpu_blocks is None:
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                reserve = total * (1 - cfg.gpu_memory_fraction) + (4 << 30)
                gpu_blocks = max(16, int((free - reserve) // block_bytes))
            else:
                gpu_blocks = 512
        host_blocks = cfg.host_blocks
        if host_blocks is None:
            host_blocks = cfg.host_bytes // block_bytes
            if self.device.type != "cuda":
                host_blocks = min(host_blocks, 2 * gpu_blocks)
        chunk_blocks = cfg.chunk_blocks or max(1, math.ceil(gpu_blocks / 16))
        self.bm = KVBlockManager(block_size=cfg.block_size, gpu_blocks=gpu_blocks,
                                 host_blocks=host_blocks, chunk_blocks=chunk_blocks)
        say(f"KV pool: {self.bm.gpu_capacity} blocks of {cfg.block_size} tokens on {self.device} "
            f"({self.bm.num_chunks} chunks), {host_blocks} host blocks")
        self.kv = KVPool(n_layers=shape.n_layers, kv_heads=shape.n_kv_heads, head_dim=shape.head_dim,
                         block_size=cfg.block_size, chunk_blocks=chunk_blocks,
                         num_chunks=self.bm.num_chunks, host_blocks=host_blocks,
                         device=self.device, dtype=self.dtype)
        self.swapper = SwapEngine(self.kv)
        self.cost = self._measure_costs(say) if cfg.measure else CostModel(25.0, 25.0, 1e4)
        self.cost.force = cfg.preempt_mode
        self.sched = Scheduler(self.bm, self.cost, max_batch=cfg.max_batch, max_step_tokens=cfg.max_step_tokens)
        self.sched.block_bytes = self.kv.block_bytes
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self._arrival = 0
        self.counters = {"prefilled_tokens": 0, "reused_tokens": 0, "decoded_tokens": 0, "steps": 0,
                         "evicted_sessions": 0, "dropped_sessions": 0}
        self.log: list[str] = []       # recent decisions with their reasons
        # seconds, for suspend ttl_s deadlines; a replay with its own time base replaces it
        self.clock: Callable[[], float] = time.monotonic
        say("engine ready")

    # ------------------------------------------------------------- measuring
    def _measure_costs(self, say) -> CostModel:
        link = self.kv.measure_link_gbps(64 << 20 if self.kv.cuda else 8 << 20)
        n = 1024 if self.kv.cuda else 64
        ids = [i % self.model.shape.vocab_size for i in range(n)]
        self.model.reference_forward(ids[:16])
        if self.kv.cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        self.model.reference_forward(ids)
        if self.kv.cuda:
            torch.cuda.synchronize(self.device)
        tps = n / max(1e-9, time.perf_counter() - t0)
        say(f"measured: link {link['h2d_gbps']:.1f}/{link['d2h_gbps']:.1f} GB/s (h2d/d2h), "
            f"prefill {tps:.0f} tokens/s")
        return CostModel(link["h2d_gbps"], link["d2h_gbps"], tps)

    def _note(self, msg: str) -> None:
        self.log.append(msg)
        del self.log[:-200]

    # -------------------------------------------------------------- requests
    def add_request(self, req: Request) -> None:
        if not req.prompt_token_ids:
            raise EngineError(f"request {req.request_id!r}: prompt_token_ids is empty")
        if req.max_tokens <= 0:
            raise EngineError(f"request {req.request_id!r}: max_tokens must be positive, got {req.max_tokens}")
        if req.request_id in self.sched.seqs:
            raise EngineError(f"request {req.request_id!r} already exists")
        vocab = self.model.shape.vocab_size
        bad = [t for t in req.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise EngineError(f"request {req.request_id!r}: token ids {bad[:5]} outside vocabulary 0..{vocab - 1}")
        need = self.bm.blocks_for_tokens(len(req.prompt_token_ids) + req.max_tokens)
        if need > self.bm.num_online_gpu:
            raise EngineError(f"request {req.request_id!r}: {len(req.prompt_token_ids)} prompt + {req.max_tokens} "
                              f"tokens need {need} KV blocks, the pool has {self.bm.num_online_gpu}")
        self._arrival += 1
        seq = Sequence(req.request_id, list(req.prompt_token_ids), len(req.prompt_token_ids), req.max_tokens,
                       req.priority, self._arrival, req.session_id, req.temperature, tuple(req.stop_token_ids))
        if req.session_id is not None:
            self._adopt_session(seq)
        self.sched.add(seq)

    def _adopt_session(self, seq: Sequence) -> None:
        """Continue a session: reuse the cached K/V of the longest common prefix."""
        ctx = self.sched.sessions.get(seq.session_id)
        if ctx is None:
            return
        if any(s.session_id == seq.session_id and s.state != FINISHED for s in self.sched.seqs.values()):
            return          # a turn of this session is still running: start cold
        common = 0
        for a, b in zip(ctx.tokens, seq.tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(seq.tokens) - 1)       # the last prompt token is always run
        del self.sched.sessions[seq.session_id]
        if common <= 0:
            self.bm.free(ctx.owner)
            return
        t = self.bm.rename(ctx.owner, seq.owner)
        self.swapper.rename(ctx.owner, seq.owner)
        seq.num_computed = common
        seq.reused_tokens = common
        self.counters["reused_tokens"] += common
        if t.where == GPU:
            self.bm.truncate(seq.owner, common)
        else:
            seq.state = SWAPPED          # the scheduler swaps it in (then truncates)

    def abort(self, request_id: str) -> None:
        seq = self.sched.seqs.pop(request_id, None)
        if seq is None:
            return
        self.bm.free(seq.owner)
        seq.state = FINISHED

    def has_work(self) -> bool:
        """Requests to run, or swap-in copies still to issue (a prefetch)."""
        return any(s.state != FINISHED for s in self.sched.seqs.values()) or self.swapper.has_unissued()

    def _holds(self, owner: str, blocks: list[int]) -> bool:
        t = self.bm.find_table(owner)
        return t is not None and t.where == GPU and set(blocks) <= set(t.blocks)

    # ------------------------------------------------------------------ step
    def _run_swaps(self, plan: StepPlan) -> None:
        for sp in plan.swaps:
            self.swapper.run(sp)
        for p in plan.preempted:
            self._note(f"preempted {p.request_id} by {p.mode}: {p.reason}")
        for sid, mode in plan.evicted_sessions:
            self.counters["evicted_sessions"] += 1
            self._note(f"session {sid} context {'swapped to host' if mode == 'swap' else 'dropped'} to make room")

    def step(self) -> list[TokenEvent]:
        self._expire_sessions()
        self.swapper.poll()
        plan = self.sched.schedule()
        self._run_swaps(plan)
        waits = self.swapper.for_step({seq.owner for seq, _ in plan.batch}, self._holds,
                                      overlap=self.cfg.overlap_swap_in)
        if not plan.batch:
            return []
        self.counters["steps"] += 1
        items = [(seq, n, self.bm.table(seq.owner).blocks) for seq, n in plan.batch]
        ids, pos, batch, sampled = build_batch(items, self.kv, waits)
        logits = self.model.forward(ids, pos, batch, self.kv)
        toks = sample(logits, [items[i][0].temperature for i in sampled], self._gen)
        for seq, n in plan.batch:
            if not (n == 1 and seq.generated > 0 and seq.num_computed == len(seq.tokens) - 1):
                seq.prefilled_tokens += n
                self.counters["prefilled_tokens"] += n
            else:
                self.counters["decoded_tokens"] += 1
            seq.num_computed += n
        events = []
        for i, tok in zip(sampled, toks):
            seq = items[i][0]
            seq.tokens.append(tok)
            reason = None
            if tok in seq.stop_token_ids or tok in self.stop_token_ids:
                reason = "stop"
            elif seq.generated >= seq.max_tokens:
                reason = "length"
            events.append(TokenEvent(seq.request_id, tok, reason is not None, reason))
            if reason:
                self._finish(seq)
        return events

    def _finish(self, seq: Sequence) -> None:
        seq.state = FINISHED
        self.sched.seqs.pop(seq.request_id, None)
        if seq.session_id is None:
            self.bm.free(seq.owner)
            return
        old = self.sched.sessions.pop(seq.session_id, None)
        if old is not None:
            self.bm.free(old.owner)
        self.bm.truncate(seq.owner, seq.num_computed)
        self.bm.rename(seq.owner, "ses:" + seq.session_id)
        self.swapper.rename(seq.owner, "ses:" + seq.session_id)
        self.sched.sessions[seq.session_id] = SessionContext(seq.session_id, seq.tokens[:seq.num_computed],
                                                             last_used=self.sched.tick)

    def _expire_sessions(self) -> None:
        now = self.clock()
        for sid, ctx in list(self.sched.sessions.items()):
            if ctx.expires_at_s is not None and now >= ctx.expires_at_s:
                self.bm.free(ctx.owner)
                del self.sched.sessions[sid]
                self.counters["dropped_sessions"] += 1
                self._note(f"session {sid} context dropped: suspend ttl ran out")

    # --------------------------------------------------------------- control
    def _session(self, session_id: str) -> SessionContext:
        ctx = self.sched.sessions.get(session_id)
        if ctx is None:
            busy = any(s.session_id == session_id for s in self.sched.seqs.values())
            raise EngineError(f"session {session_id!r} " + ("has a request running" if busy
                                                             else "has no cached context"))
        return ctx

    def suspend(self, session_id: str, mode: str = "swap", ttl_s: float | None = None) -> dict:
        """Park an idle session's context: swap (to host), keep (stay on device,
        evicted last), drop (free it). ttl_s: drop it after that many seconds."""
        if mode not in ("swap", "keep", "drop"):
            raise EngineError(f"suspend mode must be swap, keep or drop, got {mode!r}")
        if ttl_s is not None and ttl_s < 0:
            raise EngineError(f"ttl_s must not be negative, got {ttl_s}")
        ctx = self._session(session_id)
        t = self.bm.table(ctx.owner)
        nbytes = len(t.blocks) * self.kv.block_bytes
        result = {"session": session_id, "mode": mode, "tokens": len(ctx.tokens), "kv_bytes": nbytes}
        if mode == "drop":
            self.bm.free(ctx.owner)
            del self.sched.sessions[session_id]
            self.counters["dropped_sessions"] += 1
            return result | {"where": "none"}
        ctx.keep = mode == "keep"
        ctx.expires_at_s = self.clock() + ttl_s if ttl_s is not None else None
        if mode == "swap" and t.where == GPU:
            if not self.bm.can_swap_out(ctx.owner):
                raise EngineError(f"session {session_id!r}: host pool has {self.bm.num_free_host} free blocks, "
                                  f"needs {len(t.blocks)}")
            plan = StepPlan()
            self.sched.evict_session(ctx, plan, "swap")
            self._run_swaps(plan)
        return result | {"where": self.bm.table(ctx.owner).where}

    def resume(self, session_id: str) -> dict:
        """Start bringing a swapped session's context back to the device ahead
        of its next request. The copies are issued by the next step: layer by
        layer with the prefill if the request is there by then, else in full
        (asynchronous on CUDA)."""
        ctx = self._session(session_id)
        ctx.keep = False
        ctx.expires_at_s = None
        ctx.last_used = self.sched.tick
        t = self.bm.table(ctx.owner)
        result = {"session": session_id, "tokens": len(ctx.tokens), "kv_bytes": len(t.blocks) * self.kv.block_bytes}
        if t.where == HOST:
            plan = StepPlan()
            if not self.sched._make_room(len(t.blocks), plan, [], f"resume {session_id}"):
                self._run_swaps(plan)
                raise EngineError(f"session {session_id!r}: needs {len(t.blocks)} device blocks, "
                                  f"{self.bm.num_free_gpu} free")
            plan.swaps.append(self.bm.swap_in(ctx.owner))
            self._run_swaps(plan)
            return result | {"where": GPU, "swapped_in": True}
        return result | {"where": t.where, "swapped_in": False}

    def shrink(self, nbytes: int) -> dict:
        """Give back at least nbytes of device KV memory (whole chunks); live
        blocks move to the remaining chunks, idle sessions and then running
        sequences leave the device if they do not fit."""
        if nbytes < 0:
            raise EngineError(f"shrink nbytes must not be negative, got {nbytes}")
        online = sum(self.bm.online)
        n = min(online - 1, math.ceil(nbytes / self.kv.chunk_bytes))
        if n <= 0:
            return {"freed_bytes": 0, "chunks": [], "pool_bytes": self.kv.online_bytes(),
                    "reason": "nothing to free" if nbytes == 0 else "the pool keeps at least one chunk"}
        chunks, evict = self.bm.plan_shrink(n)
        plan = StepPlan()
        for owner in evict:
            if owner.startswith("ses:"):
                self.sched.evict_session(self.sched.sessions[owner[4:]], plan)
            else:
                seq = self.sched.seqs[owner[4:]]
                self.sched.preempt(seq, plan, "pool shrink")
        self._run_swaps(plan)
        moves = self.bm.take_offline(chunks)
        self.kv.move_blocks([(m[2], m[3]) for m in moves.moves])
        for c in chunks:
            self.kv.free_chunk(c)
        self.kv.release_memory()
        return {"freed_bytes": len(chunks) * self.kv.chunk_bytes, "chunks": sorted(chunks),
                "moved_blocks": len(moves.moves), "evicted": plan.evicted_sessions,
                "preempted": [(p.request_id, p.mode) for p in plan.preempted],
                "pool_bytes": self.kv.online_bytes()}

    def grow(self, nbytes: int) -> dict:
        """Take back up to nbytes of device memory for the KV pool (whole chunks,
        up to the size the pool started with)."""
        if nbytes < 0:
            raise EngineError(f"grow nbytes must not be negative, got {nbytes}")
        n = math.ceil(nbytes / self.kv.chunk_bytes)
        offline = [c for c in range(self.bm.num_chunks) if not self.bm.online[c]][:n]
        done = []
        for c in offline:
            try:
                self.kv.alloc_chunk(c)
            except torch.OutOfMemoryError:
                break
            done.append(c)
        self.bm.bring_online(len(done))
        return {"grown_bytes": len(done) * self.kv.chunk_bytes, "chunks": done,
                "pool_bytes": self.kv.online_bytes()}

    def stats(self) -> dict:
        seqs = {s.request_id: {"state": s.state, "tokens": len(s.tokens), "computed": s.num_computed,
                               "prefilled_tokens": s.prefilled_tokens, "reused_tokens": s.reused_tokens,
                               "preemptions": s.preemptions, "priority": s.priority,
                               "session": s.session_id}
                for s in self.sched.seqs.values()}
        return {
            "model": self.model_name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "block_size": self.cfg.block_size, "block_bytes": self.kv.block_bytes,
            "gpu_blocks_online": self.bm.num_online_gpu, "gpu_blocks_free": self.bm.num_free_gpu,
            "gpu_pool_bytes": self.kv.online_bytes(), "chunks_online": sum(self.bm.online),
            "chunks_total": self.bm.num_chunks, "chunk_bytes": self.kv.chunk_bytes,
            "host_blocks": self.bm.host_blocks, "host_blocks_free": self.bm.num_free_host,
            "sessions": self.sched.session_table(), "requests": seqs,
            "running": sum(1 for s in self.sched.seqs.values() if s.state == RUNNING),
            "waiting": sum(1 for s in self.sched.seqs.values() if s.state == WAITING),
            "swapped": sum(1 for s in self.sched.seqs.values() if s.state == SWAPPED),
            "preemptions": dict(self.sched.preemptions), "cost_model": self.cost.as_dict(),
            "swap": self.swapper.stats(), **self.counters, "recent": self.log[-20:],
        }
