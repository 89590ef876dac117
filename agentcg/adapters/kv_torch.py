"""The KV cache tensors: device block pool, host pool, and copies between them.

This is the only module that allocates the KV pools or copies KV data. It
follows plans from agentcg/core/kv_blocks.py and never decides anything.

Layouts (L layers, cb blocks per chunk, bs tokens per block, H kv heads, D head dim):
- device chunk c:  [L, cb, 2, bs, H, D]   one tensor per chunk; block b lives in
  chunk b // cb at index b % cb; per layer a block is one contiguous
  [2, bs, H, D] slab (keys, then values).
- host pool:       flat [host_blocks * L*2*bs*H*D], pinned when the device is CUDA.
  A run of n slots starting at slot s is the range [s*E, (s+n)*E) (E = elements
  per block) viewed as [L, n, 2, bs, H, D]: layer-major, so layer l of a run is
  one contiguous range and the whole run is one contiguous range.
- staging buffers: flat, `slot_bytes` each, on the device; a piece of a swap
  (layers l0..l1, blocks a..b of a run) is gathered into one and moved in one copy.

On CUDA, swaps run on dedicated streams apart from the compute stream: `dev`
gathers/scatters blocks between the pool and staging (device kernels), `link`
does the host<->device copies; events order them against each other and
against compute (per layer for swap-in, so that a prefill can start on layer 0
while later layers are still in transit). two_streams=False puts both on one
stream (measured side by side in bench/results/kv_swap_streams.json).

A swap-in may be issued lazily (swap_in(lazy=True)): its pieces go out as the
forward pass asks for each layer (SwapHandle.wait_layer), a few layers ahead
of compute on CUDA, so that the prefill of a resumed sequence starts at once
instead of after the host has queued every copy. On CPU the same code runs
with plain tensors: issuing a piece is the copy itself and happens exactly
when the layer is waited for, and the destination blocks read as NaN until
then, so a missing wait shows up in the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class WritePlan:
    """Where the new tokens' K/V go: per chunk, (chunk, token index or None
    for all tokens in order, destination rows (K rows then V rows))."""
    parts: list[tuple[int, torch.Tensor | None, torch.Tensor]]


@dataclass
class GatherPlan:
    """Which blocks to read: per chunk, (chunk, output positions or None when
    the output is exactly this chunk's list, local block ids). m = total."""
    parts: list[tuple[int, torch.Tensor | None, torch.Tensor]]
    m: int
    # per part: (first output position, first local block, count) where both
    # are consecutive ranges (then a slice copy replaces the indexed one), else None
    spans: list[tuple[int, int, int] | None] = field(default_factory=list)


@dataclass
class Piece:
    """One transfer of a swap: layers l0..l1-1 x table indexes a..b-1 of a host
    run that starts at slot run_start and has run_n slots; the run holds table
    indexes first_index..first_index+run_n-1."""
    run_start: int
    run_n: int
    first_index: int
    l0: int
    l1: int
    a: int
    b: int


@dataclass
class SwapHandle:
    """A swap in flight.

    A swap-in is a list of pieces (transfers of a staging slot, layer-major)
    that are issued in order, all at once or on demand: wait_layer(l) issues
    the pieces up to layer l + pool.lookahead, then makes the current stream
    wait for layer l only (CUDA: layer_ready[l], an event on the copy stream).
    On CPU, issuing a piece is the copy itself, so with lookahead 0 layer l is
    copied exactly when its reader asks for it: the same path as on CUDA, with
    the copy stream's progress driven by the waits.
    done: event after the last copy (None on CPU, or before the last piece is issued)."""
    owner: str
    direction: str
    nbytes: int
    layer_ready: list = field(default_factory=list)
    done: object = None
    start: object = None
    keep: list = field(default_factory=list)      # tensors that must outlive the copies
    blocks: list[int] = field(default_factory=list)     # device blocks written by a swap-in
    pool: "KVPool | None" = None
    pieces: list[Piece] = field(default_factory=list)
    plans: list[GatherPlan] = field(default_factory=list)
    last_piece: list[int] = field(default_factory=list)  # per layer: index of its last piece
    issued: int = 0                                      # pieces issued so far
    links: list = field(default_factory=list)            # per issued piece: its link copy's event (CUDA)

    def fully_issued(self) -> bool:
        return self.issued >= len(self.pieces)

    def issue_through(self, layer: int) -> None:
        """Issue the pieces up to the last one of `layer`."""
        last = self.last_piece[layer] if self.last_piece else -1
        while self.issued <= last:
            self.pool._issue_piece(self, self.issued)
            self.issued += 1

    def issue_all(self) -> None:
        while not self.fully_issued():
            self.pool._issue_piece(self, self.issued)
            self.issued += 1

    def wait_layer(self, layer: int) -> None:
        """Before compute reads or writes layer `layer` of these blocks."""
        if self.pieces:
            self.issue_through(min(len(self.last_piece) - 1, layer + self.pool.lookahead))
        if self.layer_ready and self.layer_ready[layer] is not None:
            torch.cuda.current_stream(self.pool.device).wait_event(self.layer_ready[layer])

    def settle(self) -> None:
        """Compute from here on sees the whole swap done (issues what is left)."""
        self.issue_all()
        if self.done is not None:
            torch.cuda.current_stream(self.pool.device).wait_event(self.done)

    def is_done(self) -> bool:
        return self.fully_issued() and (self.done is None or self.done.query())

    def synchronize(self) -> None:
        self.issue_all()
        if self.done is not None:
            self.done.synchronize()

    def seconds(self) -> float | None:
        """Link time of the swap (CUDA events), once done."""
        if self.done is None or self.start is None or not self.is_done():
            return None
        return self.start.elapsed_time(self.done) / 1000.0


class KVPool:
    """Device KV chunks and the host pool."""

    def __init__(self, *, n_layers: int, kv_heads: int, head_dim: int, block_size: int,
                 chunk_blocks: int, num_chunks: int, host_blocks: int,
                 device: torch.device, dtype: torch.dtype, slot_bytes: int = 64 << 20,
                 num_slots: int = 3, online: list[bool] | None = None, two_streams: bool = True,
                 lookahead: int | None = None, poison_in_flight: bool | None = None) -> None:
        self.L, self.H, self.D, self.bs = n_layers, kv_heads, head_dim, block_size
        self.cb = chunk_blocks
        self.device = torch.device(device)
        self.dtype = dtype
        self.elem_bytes = torch.empty((), dtype=dtype).element_size()
        self.block_layer_elems = 2 * block_size * kv_heads * head_dim
        self.block_elems = n_layers * self.block_layer_elems
        self.block_bytes = self.block_elems * self.elem_bytes
        self.chunk_bytes = self.block_bytes * chunk_blocks
        self.cuda = self.device.type == "cuda"
        self.chunks: list[torch.Tensor | None] = [None] * num_chunks
        for c in range(num_chunks):
            if online is None or online[c]:
                self.alloc_chunk(c)
        # host pool: flat [host_blocks * block_elems]
        self.host = torch.empty(host_blocks * self.block_elems, dtype=dtype,
                                pin_memory=self.cuda)
        self.slot_elems = max(self.block_layer_elems, slot_bytes // self.elem_bytes)
        self.num_slots = num_slots
        self._staging: list[torch.Tensor | None] = [None] * num_slots
        if self.cuda:
            self.link_stream = torch.cuda.Stream(self.device)
            self.dev_stream = self.link_stream
            if two_streams:
                self.dev_stream = torch.cuda.Stream(self.device)
        self._slot_free: list = [None] * num_slots
        # pace_depth > 0: the host issues piece i only once the link copy of
        # piece i - pace_depth is done. Measured no faster on an H100 than
        # queueing the whole swap (bench/kv_swap_diag.py), and it would hold the
        # host back from issuing compute that overlaps a swap-in: off by default.
        self.pace_depth = 0
        self._link_last = None          # last event recorded on the link stream by a swap
        # swap-in pieces issued ahead of the layer a wait asks for: on CUDA the
        # copy stream gets work queued beyond the layer compute is on; on CPU
        # (0) each layer is copied when its reader waits for it
        self.lookahead = (2 if self.cuda else 0) if lookahead is None else lookahead
        # CPU: a swap-in's destination blocks read as NaN until their layer is
        # issued, as on a device where the copy has not landed yet, so that a
        # read without the wait shows in the output
        self.poison_in_flight = (not self.cuda) if poison_in_flight is None else poison_in_flight
        self._in_flight: list[SwapHandle] = []     # swap-ins not yet done
        self.trace: list[tuple] | None = None      # when a list: ("ready"|"read"|"write", layer) in order

    # ---------------------------------------------------------------- chunks
    def alloc_chunk(self, c: int) -> None:
        if self.chunks[c] is None:
            # [L, cb, 2, bs, H, D]
            self.chunks[c] = torch.zeros(self.L, self.cb, 2, self.bs, self.H, self.D,
                                         dtype=self.dtype, device=self.device)

    def free_chunk(self, c: int) -> None:
        self.chunks[c] = None

    def release_memory(self) -> None:
        """Hand freed chunk memory back to the device (CUDA) or the allocator."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def online_bytes(self) -> int:
        return sum(self.chunk_bytes for t in self.chunks if t is not None)

    # ----------------------------------------------------------------- plans
    def upload(self, values: list[int]) -> torch.Tensor:
        """Index list -> int64 tensor on the device, without holding the host.

        torch.tensor(values, device=cuda) copies from pageable memory and
        waits for that copy; while a swap-in keeps the host->device copy
        engine busy, the wait lasts until the swap has landed and serialises
        the next step's launch behind it. Here the values go through pinned
        memory in an asynchronous copy on the current stream (the caching
        host allocator keeps the pinned block until that copy is done)."""
        if not self.cuda:
            return torch.tensor(values, dtype=torch.long)
        if self._link_last is None or self._link_last.query():
            # link idle: the plain copy is cheaper on the host (decode steps)
            return torch.tensor(values, dtype=torch.long, device=self.device)
        host = torch.tensor(values, dtype=torch.long).pin_memory()
        return host.to(self.device, non_blocking=True)

    _idx = upload

    def write_plan(self, slots: list[int]) -> WritePlan:
        """slots[i] = global slot (block * bs + offset) of new token i."""
        by_chunk: dict[int, tuple[list[int], list[int], list[int]]] = {}
        bs2 = 2 * self.bs
        for i, s in enumerate(slots):
            b, off = divmod(s, self.bs)
            c, lb = divmod(b, self.cb)
            toks, krows, vrows = by_chunk.setdefault(c, ([], [], []))
            toks.append(i)
            krows.append(lb * bs2 + off)
            vrows.append(lb * bs2 + self.bs + off)
        parts = []
        for c, (toks, krows, vrows) in by_chunk.items():
            tok = None if len(by_chunk) == 1 else self._idx(toks)
            parts.append((c, tok, self._idx(krows + vrows)))
        return WritePlan(parts)

    def gather_plan(self, blocks: list[int]) -> GatherPlan:
        by_chunk: dict[int, tuple[list[int], list[int]]] = {}
        for i, b in enumerate(blocks):
            c, lb = divmod(b, self.cb)
            pos, loc = by_chunk.setdefault(c, ([], []))
            pos.append(i)
            loc.append(lb)
        parts = []
        spans = []
        for c, (pos, loc) in by_chunk.items():
            parts.append((c, None if len(by_chunk) == 1 else self._idx(pos), self._idx(loc)))
            n = len(pos)
            spans.append((pos[0], loc[0], n) if pos[-1] - pos[0] == n - 1 and loc[-1] - loc[0] == n - 1
                         and all(loc[i + 1] == loc[i] + 1 for i in range(n - 1)) else None)
        return GatherPlan(parts, len(blocks), spans)

    # ------------------------------------------------------------ attention
    def write(self, layer: int, plan: WritePlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, H, D] for the plan's tokens."""
        if self.trace is not None:
            self.trace.append(("write", layer))
        for c, tok, rows in plan.parts:
            kk, vv = (k, v) if tok is None else (k.index_select(0, tok), v.index_select(0, tok))
            dst = self.chunks[c][layer].view(-1, self.H, self.D)    # [cb*2*bs, H, D]
            dst.index_copy_(0, rows, torch.cat([kk, vv]).to(self.dtype))

    def gather(self, layer: int, plan: GatherPlan) -> torch.Tensor:
        """-> [m, 2, bs, H, D]: the plan's blocks of one layer, in plan order."""
        if self.trace is not None:
            self.trace.append(("read", layer))
        if len(plan.parts) == 1 and plan.parts[0][1] is None:
            c, _, loc = plan.parts[0]
            return self.chunks[c][layer].index_select(0, loc)
        out = torch.empty(plan.m, 2, self.bs, self.H, self.D, dtype=self.dtype, device=self.device)
        for (c, pos, loc), span in zip(plan.parts, plan.spans):
            if span is not None:                  # consecutive blocks: one slice copy
                p0, l0, n = span
                out[p0:p0 + n].copy_(self.chunks[c][layer, l0:l0 + n])
            else:
                out.index_copy_(0, pos, self.chunks[c][layer].index_select(0, loc))
        return out

    def move_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Device-to-device block copies src -> dst (all layers), for shrink."""
        self.settle_swap_ins()                   # blocks being swapped in move only once they are in
        for src, dst in pairs:
            sc, sl = divmod(src, self.cb)
            dc, dl = divmod(dst, self.cb)
            self.chunks[dc][:, dl].copy_(self.chunks[sc][:, sl])

    # ----------------------------------------------------------------- swaps
    def host_run(self, start: int, n: int) -> torch.Tensor:
        """-> [L, n, 2, bs, H, D] view of host slots start..start+n-1."""
        e = self.block_elems
        return self.host[start * e:(start + n) * e].view(self.L, n, 2, self.bs, self.H, self.D)

    def pieces(self, runs: list[tuple[int, int, int]], one_layer: bool = False) -> list[Piece]:
        """Split host runs into transfers of at most one staging slot, each one
        contiguous on the host: several whole layers (unless one_layer), or part
        of one layer. Ordered layer-major so that early layers arrive first."""
        out = []
        per_layer = self.block_layer_elems
        for start, n, first in runs:
            layer_elems = n * per_layer
            if layer_elems <= self.slot_elems:
                step = 1 if one_layer else max(1, self.slot_elems // layer_elems)
                for l0 in range(0, self.L, step):
                    out.append(Piece(start, n, first, l0, min(self.L, l0 + step), 0, n))
            else:
                per = max(1, self.slot_elems // per_layer)
                for l0 in range(self.L):
                    for a in range(0, n, per):
                        out.append(Piece(start, n, first, l0, l0 + 1, a, min(n, a + per)))
        out.sort(key=lambda p: (p.l0, p.run_start, p.a))
        return out

    def _staging_view(self, slot: int, p: Piece) -> torch.Tensor:
        if self._staging[slot] is None:
            # a lazy swap-in may first need it inside the forward pass: a buffer made
            # in inference mode could not be written by later swaps outside it
            with torch.inference_mode(False):
                self._staging[slot] = torch.empty(self.slot_elems, dtype=self.dtype, device=self.device)
        n = (p.l1 - p.l0) * (p.b - p.a) * self.block_layer_elems
        # [l1-l0, b-a, 2, bs, H, D]
        return self._staging[slot][:n].view(p.l1 - p.l0, p.b - p.a, 2, self.bs, self.H, self.D)

    def _piece_plans(self, pieces: list[Piece], blocks: list[int]) -> list[GatherPlan]:
        """Index tensors of every piece, made before any copy is issued: making
        them later, inside the copy streams, would stall the host on those streams."""
        memo: dict[tuple[int, int], GatherPlan] = {}       # the layer slices of one block range share it
        out = []
        for p in pieces:
            key = (p.first_index + p.a, p.first_index + p.b)
            if key not in memo:
                memo[key] = self.gather_plan(blocks[key[0]:key[1]])
            out.append(memo[key])
        return out

    def _gather_piece(self, p: Piece, plan: GatherPlan, out: torch.Tensor) -> list[torch.Tensor]:
        keep = []
        for (c, pos, loc), span in zip(plan.parts, plan.spans):
            src = self.chunks[c][p.l0:p.l1]                         # [nl, cb, 2, bs, H, D]
            if span is not None:                   # consecutive blocks: one slice copy
                p0, l0, n = span
                out[:, p0:p0 + n].copy_(src[:, l0:l0 + n])
            elif pos is None:
                torch.index_select(src, 1, loc, out=out)
            else:
                out.index_copy_(1, pos, src.index_select(1, loc))
                keep.append(pos)
            keep.append(loc)
        return keep

    def _scatter_piece(self, p: Piece, plan: GatherPlan, src: torch.Tensor) -> list[torch.Tensor]:
        keep = []
        for (c, pos, loc), span in zip(plan.parts, plan.spans):
            dst = self.chunks[c][p.l0:p.l1]
            if span is not None:                   # consecutive blocks: one slice copy
                p0, l0, n = span
                dst[:, l0:l0 + n].copy_(src[:, p0:p0 + n])
                continue
            dst.index_copy_(1, loc, src if pos is None else src.index_select(1, pos))
            keep.append(loc)
            if pos is not None:
                keep.append(pos)
        return keep

    def swap_out(self, owner: str, gpu_blocks: list[int], runs: list[tuple[int, int, int]]) -> SwapHandle:
        """Copy gpu_blocks (table order) to the host runs. The blocks may be
        reused by compute as soon as this returns: the compute stream waits
        for the gathers."""
        self.issue_swap_ins()
        pieces = self.pieces(runs)
        plans = self._piece_plans(pieces, gpu_blocks)
        nbytes = len(gpu_blocks) * self.block_bytes
        if not self.cuda or not pieces:
            for i, p in enumerate(pieces):
                view = self._staging_view(0, p)
                self._gather_piece(p, plans[i], view)
                self.host_run(p.run_start, p.run_n)[p.l0:p.l1, p.a:p.b].copy_(view)
            return SwapHandle(owner, "out", nbytes, pool=self)
        compute = torch.cuda.current_stream(self.device)
        ready = torch.cuda.Event()
        ready.record(compute)
        self.dev_stream.wait_event(ready)
        start = torch.cuda.Event(enable_timing=True)
        done = torch.cuda.Event(enable_timing=True)
        keep: list[torch.Tensor] = []
        links: list = []
        for i, p in enumerate(pieces):
            if self.pace_depth and i >= self.pace_depth:
                links[i - self.pace_depth].synchronize()
            s = i % self.num_slots
            view = self._staging_view(s, p)
            with torch.cuda.stream(self.dev_stream):
                if self._slot_free[s] is not None:
                    self.dev_stream.wait_event(self._slot_free[s])
                keep += self._gather_piece(p, plans[i], view)
                gathered = torch.cuda.Event()
                gathered.record(self.dev_stream)
            with torch.cuda.stream(self.link_stream):
                self.link_stream.wait_event(gathered)
                if i == 0:
                    start.record(self.link_stream)
                self.host_run(p.run_start, p.run_n)[p.l0:p.l1, p.a:p.b].copy_(view, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.link_stream)
                self._slot_free[s] = ev
                links.append(ev)
        compute.wait_event(gathered)           # freed blocks are rewritten only after the last gather
        done.record(self.link_stream)
        self._link_last = done
        return SwapHandle(owner, "out", nbytes, [], done, start, keep, pool=self)

    def issue_swap_ins(self) -> None:
        """Issue every piece of the swap-ins in flight. Called before a new swap:
        its copies then queue behind them, and the host slots they read, which
        the block manager has already freed, are read before anyone reuses them."""
        for h in self._in_flight:
            h.issue_all()
        self._in_flight = [h for h in self._in_flight if not h.is_done()]

    def settle_swap_ins(self) -> None:
        """Compute from here on sees every swap-in done."""
        for h in self._in_flight:
            h.settle()
        self._in_flight = [h for h in self._in_flight if not h.is_done()]

    def swap_in(self, owner: str, gpu_blocks: list[int], runs: list[tuple[int, int, int]],
                lazy: bool = False) -> SwapHandle:
        """Copy the host runs into gpu_blocks (table order). Compute that reads
        or writes layer l of these blocks calls handle.wait_layer(l) first.
        lazy: issue the pieces only as waits ask for them (handle.issue_all()
        issues the rest); else all of them now."""
        self.issue_swap_ins()
        # lazy: one layer per piece, so that layer l is ready without waiting for
        # l+1..; eager (the whole swap queued at once): as few pieces as fit
        pieces = self.pieces(runs, one_layer=lazy)
        h = SwapHandle(owner, "in", len(gpu_blocks) * self.block_bytes, [None] * self.L,
                       blocks=list(gpu_blocks), pool=self, pieces=pieces,
                       plans=self._piece_plans(pieces, gpu_blocks), last_piece=[-1] * self.L)
        for i, p in enumerate(pieces):
            for layer in range(p.l0, p.l1):
                h.last_piece[layer] = i
        if self.cuda and pieces:
            # copies start after the compute issued so far (which may still use these blocks)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            self.dev_stream.wait_event(ready)
            self.link_stream.wait_event(ready)
            h.start = torch.cuda.Event(enable_timing=True)
        elif self.poison_in_flight:
            for c, _, loc in self.gather_plan(gpu_blocks).parts:
                self.chunks[c].index_fill_(1, loc, float("nan"))
        self._in_flight.append(h)
        if not lazy:
            h.issue_all()
        return h

    def _issue_piece(self, h: SwapHandle, i: int) -> None:
        """Issue piece i of swap-in h: host -> staging on the link stream, staging
        -> blocks on the device stream; record layer_ready for the layers it completes."""
        p = h.pieces[i]
        s = i % self.num_slots
        view = self._staging_view(s if self.cuda else 0, p)
        src = self.host_run(p.run_start, p.run_n)[p.l0:p.l1, p.a:p.b]
        ev = None
        if not self.cuda:
            view.copy_(src)
            self._scatter_piece(p, h.plans[i], view)
        else:
            if self.pace_depth and i >= self.pace_depth:
                h.links[i - self.pace_depth].synchronize()
            with torch.cuda.stream(self.link_stream):
                if self._slot_free[s] is not None:
                    self.link_stream.wait_event(self._slot_free[s])
                if i == 0:
                    h.start.record(self.link_stream)
                view.copy_(src, non_blocking=True)
                loaded = torch.cuda.Event()
                loaded.record(self.link_stream)
                self._link_last = loaded
            with torch.cuda.stream(self.dev_stream):
                self.dev_stream.wait_event(loaded)
                h.keep += self._scatter_piece(p, h.plans[i], view)
                ev = torch.cuda.Event()
                ev.record(self.dev_stream)
                self._slot_free[s] = ev
            h.links.append(loaded)
        for layer in range(p.l0, p.l1):
            if h.last_piece[layer] == i:
                h.layer_ready[layer] = ev
                if self.trace is not None:
                    self.trace.append(("ready", layer))
        if i == len(h.pieces) - 1 and self.cuda:
            # done: after the last scatter, timed on the link stream
            all_in = torch.cuda.Event()
            all_in.record(self.dev_stream)
            self.link_stream.wait_event(all_in)
            done = torch.cuda.Event(enable_timing=True)
            done.record(self.link_stream)
            h.done = done
            self._link_last = done

    # --------------------------------------------------------- measurements
    def measure_link_gbps(self, nbytes: int = 256 << 20, repeats: int = 3) -> dict:
        """Plain pinned host<->device copy bandwidth of this machine (GB/s,
        1e9 bytes per second). On CPU: a memory copy of the same size."""
        n = max(1, nbytes // self.elem_bytes)
        if not self.cuda:
            import time
            a = torch.empty(n, dtype=self.dtype)
            b = torch.empty(n, dtype=self.dtype)
            b.copy_(a)
            t0 = time.perf_counter()
            for _ in range(repeats):
                b.copy_(a)
            dt = (time.perf_counter() - t0) / repeats
            g = nbytes / dt / 1e9
            return {"h2d_gbps": g, "d2h_gbps": g}
        host = torch.empty(n, dtype=self.dtype, pin_memory=True)
        dev = torch.empty(n, dtype=self.dtype, device=self.device)
        out = {}
        for name, dst, src in (("h2d_gbps", dev, host), ("d2h_gbps", host, dev)):
            dst.copy_(src, non_blocking=True)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(repeats):
                dst.copy_(src, non_blocking=True)
            e.record()
            e.synchronize()
            out[name] = nbytes * repeats / (s.elapsed_time(e) / 1000.0) / 1e9
        return out
