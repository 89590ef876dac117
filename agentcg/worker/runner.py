"""Turn a StepPlan's batch into tensors, run the model, sample.

StepBatch layout: decoding sequences first (one token each, attention over a
padded gather of their blocks), then prefill spans (several new tokens of one
sequence, with or without a cached prefix).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from agentcg.adapters.kv_torch import GatherPlan, KVPool, SwapHandle, WritePlan


@dataclass
class PrefillSpan:
    t0: int
    t1: int
    ctx_len: int                   # tokens in context after this span
    gather: GatherPlan | None


@dataclass
class StepBatch:
    write_plan: WritePlan
    num_decode: int
    decode_gather: GatherPlan | None
    decode_mask: torch.Tensor | None          # [B, 1, 1, nb*bs] bool, True = attend
    prefills: list[PrefillSpan]
    logits_idx: torch.Tensor                  # [N] token index whose logits are sampled
    max_pos: int = 0
    waits: list[SwapHandle] = field(default_factory=list)

    def wait_layer(self, layer: int) -> None:
        """Called by the forward pass before it writes or reads layer `layer` of
        the cache: swap-ins of this step's sequences issue up to that layer and
        compute waits for that layer's copies only."""
        for h in self.waits:
            h.wait_layer(layer)


def build_batch(items: list[tuple[object, int, list[int]]], kv: KVPool,
                waits: list[SwapHandle]) -> tuple[torch.Tensor, torch.Tensor, StepBatch, list[int]]:
    """items: (seq, n_new, block table). Returns ids, pos, batch and the
    indexes (into items) of the sequences that get a sampled token."""
    bs = kv.bs
    dec = [i for i, (s, n, _) in enumerate(items) if n == 1 and s.num_computed > 0]
    pre = [i for i in range(len(items)) if i not in set(dec)]
    order = dec + pre
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    logits_idx: list[int] = []
    sampled: list[int] = []
    spans: list[PrefillSpan] = []
    for i in order:
        seq, n, table = items[i]
        p0 = seq.num_computed
        t0 = len(ids)
        ids.extend(seq.tokens[p0:p0 + n])
        for p in range(p0, p0 + n):
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
        if p0 + n == len(seq.tokens):
            logits_idx.append(len(ids) - 1)
            sampled.append(i)
        if i in pre:
            ctx = p0 + n
            g = kv.gather_plan(table[:-(-ctx // bs)]) if p0 > 0 else None
            spans.append(PrefillSpan(t0, t0 + n, ctx, g))
    dev = kv.device
    decode_gather = decode_mask = None
    if dec:
        ctx = [items[i][0].num_computed + 1 for i in dec]
        nb = max(-(-c // bs) for c in ctx)
        flat: list[int] = []
        for i in dec:
            table = items[i][2]
            used = table[:-(-(items[i][0].num_computed + 1) // bs)]
            flat.extend(used + [used[0]] * (nb - len(used)))
        decode_gather = kv.gather_plan(flat)
        lens = kv.upload(ctx)
        decode_mask = (torch.arange(nb * bs, device=dev).unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]
    batch = StepBatch(kv.write_plan(slots), len(dec), decode_gather, decode_mask, spans,
                      kv.upload(logits_idx), max(pos), waits)
    # kv.upload: no wait on the copy engine, which an in-flight swap-in may hold
    return kv.upload(ids), kv.upload(pos), batch, sampled


def sample(logits: torch.Tensor, temperatures: list[float], gen: torch.Generator) -> list[int]:
    """logits: [N, vocab] fp32 -> one token per row (greedy where temperature is 0)."""
    out = logits.argmax(dim=-1)
    hot = [i for i, t in enumerate(temperatures) if t > 0]
    if hot:
        idx = torch.tensor(hot, device=logits.device)
        temps = torch.tensor([temperatures[i] for i in hot], device=logits.device).unsqueeze(1)
        probs = torch.softmax(logits.index_select(0, idx) / temps, dim=-1)
        picks = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(out.device)
        out = out.index_copy(0, idx, picks)
    return out.tolist()
