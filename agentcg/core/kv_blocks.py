"""KV cache block bookkeeping: which block holds what, and where it lives.

Pure Python, no torch, no clocks. The tensor side (agentcg/adapters/kv_torch.py)
follows the plans this module emits.

Vocabulary
- A *block* holds the keys and values of `block_size` consecutive tokens for
  every layer. Device blocks are numbered 0..gpu_blocks-1 and grouped into
  *chunks* of `chunk_blocks` consecutive ids; each chunk is one separately
  allocated tensor, so the device pool can shrink by whole chunks.
- Host *slots* are numbered 0..host_blocks-1 in one pinned buffer. A table that
  is swapped out occupies one or more *runs* of consecutive slots; a run of n
  slots is laid out layer-major ([layers, n, ...]) so that each layer of a run is
  one contiguous range and a whole run is one contiguous range: the copy engine
  moves it in a few large transfers.
- An *owner* is anything that holds a block table: a running sequence
  ("req:<id>") or an idle session's cached context ("ses:<id>").
- Plans are lists of moves `(index, src, dst)`: `index` is the position of the
  block in the owner's table, `src`/`dst` are block ids or slot ids.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

GPU = "gpu"
HOST = "host"


class KVBlockError(RuntimeError):
    """A bookkeeping request that cannot be met; the message says which and why."""


class OutOfBlocks(KVBlockError):
    """Not enough free blocks (device or host) for the request."""


@dataclass
class BlockTable:
    """The blocks of one owner, in token order. `where` says which pool the ids
    refer to; `runs` lists (first_slot, n_slots) host runs when on the host."""
    owner: str
    where: str = GPU
    blocks: list[int] = field(default_factory=list)
    runs: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class SwapPlan:
    """Move one owner's table between pools.

    direction: "out" (device -> host) or "in" (host -> device).
    moves: (index in table, src block/slot, dst block/slot), in table order.
    runs: the host runs the plan reads or writes, each (first_slot, n_slots,
    first_index): slots first_slot..first_slot+n_slots-1 hold table indexes
    first_index..first_index+n_slots-1.
    """
    owner: str
    direction: str
    moves: tuple[tuple[int, int, int], ...]
    runs: tuple[tuple[int, int, int], ...]

    @property
    def num_blocks(self) -> int:
        return len(self.moves)


@dataclass(frozen=True)
class MovePlan:
    """Device-to-device block moves that empty chunks before they are freed:
    (owner, index in table, src block, dst block)."""
    chunks: tuple[int, ...]
    moves: tuple[tuple[str, int, int, int], ...]


class KVBlockManager:
    """Device block pool (in chunks), host slot pool, ref counts, tables."""

    def __init__(self, *, block_size: int, gpu_blocks: int, host_blocks: int,
                 chunk_blocks: int) -> None:
        for name, value in (("block_size", block_size), ("chunk_blocks", chunk_blocks)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if gpu_blocks <= 0:
            raise ValueError(f"gpu_blocks must be positive, got {gpu_blocks}")
        if host_blocks < 0:
            raise ValueError(f"host_blocks must not be negative, got {host_blocks}")
        self.block_size = block_size
        self.chunk_blocks = chunk_blocks
        self.num_chunks = -(-gpu_blocks // chunk_blocks)
        self.gpu_capacity = self.num_chunks * chunk_blocks
        self.host_blocks = host_blocks
        self.online = [True] * self.num_chunks
        self._free: list[int] = list(range(self.gpu_capacity))   # min-heap of free ids
        heapq.heapify(self._free)
        self._free_set = set(self._free)
        self.ref = [0] * self.gpu_capacity
        # host: free extents (start, length), sorted by start, coalesced
        self._host_free: list[tuple[int, int]] = [(0, host_blocks)] if host_blocks else []
        self.tables: dict[str, BlockTable] = {}

    # ---------------------------------------------------------------- queries
    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_gpu(self) -> int:
        return len(self._free_set)

    @property
    def num_online_gpu(self) -> int:
        return sum(self.online) * self.chunk_blocks

    @property
    def num_free_host(self) -> int:
        return sum(n for _, n in self._host_free)

    def table(self, owner: str) -> BlockTable:
        try:
            return self.tables[owner]
        except KeyError:
            raise KVBlockError(f"no block table for owner {owner!r}") from None

    def find_table(self, owner: str) -> BlockTable | None:
        return self.tables.get(owner)

    def chunk_of(self, block: int) -> int:
        return block // self.chunk_blocks

    def gpu_blocks_of_chunk(self, chunk: int) -> range:
        return range(chunk * self.chunk_blocks, (chunk + 1) * self.chunk_blocks)

    # ------------------------------------------------------------- allocation
    def _pop_free(self) -> int:
        while self._free:
            b = heapq.heappop(self._free)
            if b in self._free_set:
                self._free_set.discard(b)
                return b
        raise OutOfBlocks("device block pool is empty")

    def _release(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] < 0:
            raise KVBlockError(f"block {block} released more often than taken")
        if self.ref[block] == 0 and self.online[self.chunk_of(block)]:
            self._free_set.add(block)
            heapq.heappush(self._free, block)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free_gpu

    def allocate(self, owner: str, n: int) -> list[int]:
        """Append n fresh device blocks to owner's table (created if needed).
        Lowest ids first, so that high chunks stay empty for shrink()."""
        t = self.tables.get(owner)
        if t is None:
            t = self.tables[owner] = BlockTable(owner)
        if t.where != GPU:
            raise KVBlockError(f"owner {owner!r} is on the {t.where}; swap it in before growing it")
        if n > self.num_free_gpu:
            raise OutOfBlocks(f"owner {owner!r} needs {n} device blocks, {self.num_free_gpu} free")
        new = [self._pop_free() for _ in range(n)]
        for b in new:
            self.ref[b] = 1
        t.blocks.extend(new)
        return new

    def ensure_tokens(self, owner: str, num_tokens: int) -> list[int]:
        """Grow owner's device table to hold num_tokens tokens; returns new blocks."""
        t = self.tables.get(owner)
        have = len(t.blocks) if t else 0
        need = self.blocks_for_tokens(num_tokens) - have
        return self.allocate(owner, need) if need > 0 else []

    def extra_blocks_needed(self, owner: str, num_tokens: int) -> int:
        t = self.tables.get(owner)
        have = len(t.blocks) if t else 0
        return max(0, self.blocks_for_tokens(num_tokens) - have)

    def share(self, src_owner: str, dst_owner: str, num_blocks: int) -> list[int]:
        """dst_owner takes a reference on the first num_blocks device blocks of
        src_owner (prefix sharing). dst must not exist yet."""
        src = self.table(src_owner)
        if src.where != GPU:
            raise KVBlockError(f"owner {src_owner!r} is on the {src.where}; cannot share")
        if dst_owner in self.tables:
            raise KVBlockError(f"owner {dst_owner!r} already has a table")
        if num_blocks > len(src.blocks):
            raise KVBlockError(f"owner {src_owner!r} has {len(src.blocks)} blocks, asked to share {num_blocks}")
        blocks = src.blocks[:num_blocks]
        for b in blocks:
            self.ref[b] += 1
        self.tables[dst_owner] = BlockTable(dst_owner, GPU, list(blocks))
        return blocks

    def rename(self, src_owner: str, dst_owner: str) -> BlockTable:
        """Hand a whole table to another owner (a session's context to the
        request that continues it, and back)."""
        if dst_owner in self.tables:
            raise KVBlockError(f"owner {dst_owner!r} already has a table")
        t = self.tables.pop(src_owner)
        t.owner = dst_owner
        self.tables[dst_owner] = t
        return t

    def truncate(self, owner: str, num_tokens: int) -> list[int]:
        """Keep only the blocks that hold the first num_tokens tokens (device
        tables only); returns the released block ids."""
        t = self.table(owner)
        if t.where != GPU:
            raise KVBlockError(f"owner {owner!r} is on the {t.where}; cannot truncate")
        keep = self.blocks_for_tokens(num_tokens)
        dropped = t.blocks[keep:]
        del t.blocks[keep:]
        for b in dropped:
            self._release(b)
        return dropped

    def free(self, owner: str) -> int:
        """Release every block or slot of owner; returns how many. Unknown owner: 0."""
        t = self.tables.pop(owner, None)
        if t is None:
            return 0
        if t.where == GPU:
            for b in t.blocks:
                self._release(b)
        else:
            for start, n in t.runs:
                self._host_release(start, n)
        return len(t.blocks)

    # ------------------------------------------------------------------ host
    def _host_take(self, n: int) -> list[tuple[int, int]]:
        """n slots as few runs as possible: first fit, else the largest extents."""
        if n > self.num_free_host:
            raise OutOfBlocks(f"host pool has {self.num_free_host} free slots, need {n}")
        for i, (start, length) in enumerate(self._host_free):
            if length >= n:
                if length == n:
                    del self._host_free[i]
                else:
                    self._host_free[i] = (start + n, length - n)
                return [(start, n)]
        runs: list[tuple[int, int]] = []
        left = n
        for start, length in sorted(self._host_free, key=lambda e: -e[1]):
            take = min(length, left)
            runs.append((start, take))
            left -= take
            if left == 0:
                break
        for start, take in runs:
            i = next(i for i, e in enumerate(self._host_free) if e[0] == start)
            length = self._host_free[i][1]
            if take == length:
                del self._host_free[i]
            else:
                self._host_free[i] = (start + take, length - take)
        return runs

    def _host_release(self, start: int, n: int) -> None:
        ext = self._host_free
        ext.append((start, n))
        ext.sort()
        merged: list[tuple[int, int]] = []
        for s, length in ext:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            elif merged and merged[-1][0] + merged[-1][1] > s:
                raise KVBlockError(f"host slots {s}..{s + length - 1} released twice")
            else:
                merged.append((s, length))
        self._host_free = merged

    # ------------------------------------------------------------------ swaps
    def can_swap_out(self, owner: str) -> bool:
        t = self.tables.get(owner)
        return (t is not None and t.where == GPU and len(t.blocks) <= self.num_free_host
                and all(self.ref[b] == 1 for b in t.blocks))

    def swap_out(self, owner: str) -> SwapPlan:
        """Move owner's table to the host: take host runs, release the device
        blocks (the tensor side must finish reading them before they are
        written again: it orders its streams so), return the plan."""
        t = self.table(owner)
        if t.where != GPU:
            raise KVBlockError(f"owner {owner!r} is already on the {t.where}")
        shared = [b for b in t.blocks if self.ref[b] != 1]
        if shared:
            raise KVBlockError(f"owner {owner!r} shares blocks {shared[:4]}; cannot swap them out")
        runs = self._host_take(len(t.blocks))
        moves, plan_runs, idx = [], [], 0
        for start, n in runs:
            plan_runs.append((start, n, idx))
            for j in range(n):
                moves.append((idx, t.blocks[idx], start + j))
                idx += 1
        for b in t.blocks:
            self._release(b)
        t.where, t.blocks, t.runs = HOST, [m[2] for m in moves], runs
        return SwapPlan(owner, "out", tuple(moves), tuple(plan_runs))

    def can_swap_in(self, owner: str) -> bool:
        t = self.tables.get(owner)
        return t is not None and t.where == HOST and len(t.blocks) <= self.num_free_gpu

    def swap_in(self, owner: str) -> SwapPlan:
        """Move owner's table back to the device: take device blocks, release
        the host runs, return the plan."""
        t = self.table(owner)
        if t.where != HOST:
            raise KVBlockError(f"owner {owner!r} is already on the {t.where}")
        n = len(t.blocks)
        if n > self.num_free_gpu:
            raise OutOfBlocks(f"owner {owner!r} needs {n} device blocks to swap in, {self.num_free_gpu} free")
        dst = [self._pop_free() for _ in range(n)]
        for b in dst:
            self.ref[b] = 1
        moves = tuple((i, t.blocks[i], dst[i]) for i in range(n))
        runs, idx = [], 0
        for start, length in t.runs:
            runs.append((start, length, idx))
            idx += length
        for start, length in t.runs:
            self._host_release(start, length)
        t.where, t.blocks, t.runs = GPU, dst, []
        return SwapPlan(owner, "in", moves, tuple(runs))

    # ---------------------------------------------------------- shrink / grow
    def plan_shrink(self, num_chunks: int) -> tuple[list[int], list[str]]:
        """Pick the highest online chunks to take offline. Returns (chunks,
        owners that must leave the device first because the remaining chunks
        cannot take their blocks). Nothing changes yet."""
        online = [c for c in range(self.num_chunks) if self.online[c]]
        chunks = sorted(online, reverse=True)[:max(0, num_chunks)]
        doomed = set(chunks)
        live = sum(1 for c in chunks for b in self.gpu_blocks_of_chunk(c) if self.ref[b] > 0)
        room = sum(1 for b in self._free_set if self.chunk_of(b) not in doomed)
        evict: list[str] = []
        if live > room:
            # owners with blocks in the doomed chunks, largest first
            owners = sorted(((sum(1 for b in t.blocks if self.chunk_of(b) in doomed), o)
                             for o, t in self.tables.items() if t.where == GPU), reverse=True)
            short = live - room
            for n, o in owners:
                if short <= 0 or n == 0:
                    break
                evict.append(o)
                short -= n
        return chunks, evict

    def take_offline(self, chunks: list[int]) -> MovePlan:
        """Move live blocks out of `chunks` into free blocks elsewhere and mark
        the chunks offline. Raises OutOfBlocks when the rest cannot hold them
        (evict owners first, see plan_shrink)."""
        doomed = set(chunks)
        for c in doomed:
            if not 0 <= c < self.num_chunks or not self.online[c]:
                raise KVBlockError(f"chunk {c} is not online")
        live = [b for c in chunks for b in self.gpu_blocks_of_chunk(c) if self.ref[b] > 0]
        for b in [b for b in self._free_set if self.chunk_of(b) in doomed]:
            self._free_set.discard(b)
        if len(live) > self.num_free_gpu:
            for c in doomed:       # undo
                for b in self.gpu_blocks_of_chunk(c):
                    if self.ref[b] == 0:
                        self._free_set.add(b)
                        heapq.heappush(self._free, b)
            raise OutOfBlocks(f"{len(live)} live blocks in chunks {sorted(doomed)}, "
                              f"only {self.num_free_gpu} free elsewhere")
        remap: dict[int, int] = {}
        for b in live:
            nb = self._pop_free()
            self.ref[nb] = self.ref[b]
            self.ref[b] = 0
            remap[b] = nb
        moves = []
        for o, t in self.tables.items():
            if t.where != GPU:
                continue
            for i, b in enumerate(t.blocks):
                if b in remap:
                    moves.append((o, i, b, remap[b]))
                    t.blocks[i] = remap[b]
        for c in doomed:
            self.online[c] = False
        return MovePlan(tuple(sorted(doomed)), tuple(moves))

    def bring_online(self, num_chunks: int) -> list[int]:
        """Mark up to num_chunks offline chunks online (lowest first)."""
        chunks = [c for c in range(self.num_chunks) if not self.online[c]][:max(0, num_chunks)]
        for c in chunks:
            self.online[c] = True
            for b in self.gpu_blocks_of_chunk(c):
                self.ref[b] = 0
                self._free_set.add(b)
                heapq.heappush(self._free, b)
        return chunks

    # -------------------------------------------------------------- checking
    def check(self) -> None:
        """Raise KVBlockError if an invariant does not hold (tests, debugging)."""
        counts = [0] * self.gpu_capacity
        host_used: list[tuple[int, int]] = []
        for o, t in self.tables.items():
            if t.where == GPU:
                for b in t.blocks:
                    if not self.online[self.chunk_of(b)]:
                        raise KVBlockError(f"owner {o!r} holds block {b} of an offline chunk")
                    counts[b] += 1
            else:
                if sum(n for _, n in t.runs) != len(t.blocks):
                    raise KVBlockError(f"owner {o!r}: runs do not cover its {len(t.blocks)} slots")
                host_used.extend(t.runs)
        for b in range(self.gpu_capacity):
            if counts[b] != self.ref[b]:
                raise KVBlockError(f"block {b}: ref count {self.ref[b]}, held by {counts[b]} tables")
            free = b in self._free_set
            if free != (counts[b] == 0 and self.online[self.chunk_of(b)]):
                raise KVBlockError(f"block {b}: free={free} but ref={counts[b]}")
        spans = sorted(host_used + self._host_free)
        pos = 0
        for s, n in spans:
            if s != pos:
                raise KVBlockError(f"host slots: gap or overlap at slot {pos} (next span starts at {s})")
            pos = s + n
        if pos != self.host_blocks:
            raise KVBlockError(f"host slots cover {pos} of {self.host_blocks}")
