"""Time to first token of a session's next turn after a pause, in one run:
context kept on the device, swapped to host and brought back (three ways, see
below), dropped and recomputed.

Swapped variants (the request for the next turn follows resume() at once,
except in `arrival`):
- overlapped: the swap-in is issued layer by layer as the new tokens' prefill
  asks for each layer; layer i's attention waits for layer i's copy only.
- arrival: as overlapped, with no resume(): the request finds its context on host.
- eager: every copy is queued by resume() before the prefill is launched,
  then the prefill waits per layer (the arrangement measured before the
  overlapped one, bench/results/resume.json; for the 8B shape at 32k tokens a
  layer is larger than a staging slot, so its pieces are the same as then).
- serial: the prefill waits for the whole swap-in.
Each variant is warmed up once, then all of them are timed in turn, --repeats
times; the medians are reported against the issue's bound,
max(ttft_resident_ms, copy_ms) (copy_ms: kv_bytes at the pinned h2d bandwidth).

    python bench/resume.py          # on a GPU: llama3-8b shape, 32k context, all variants side by side
    python bench/resume.py [--context 32768] [--new 64] [--model llama3-8b] [--repeats 5] [--out bench/results]
    python bench/resume.py --model small --context 2048 --device cpu      # a quick check without a GPU

Writes resume_overlap.json (--name) under --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agentcg.worker.engine import Engine, EngineConfig, Request  # noqa: E402

SWAPPED = ("overlapped", "arrival", "eager", "serial")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default="resume_overlap.json")
    args = ap.parse_args()
    bs = 16
    turns = (args.repeats + 1) * (len(SWAPPED) + 2)          # warm-up and timed turns
    turns_tokens = args.context + turns * (args.new + 1)
    blocks = (turns_tokens // bs + 64) * 2
    eng = Engine(EngineConfig(model=args.model, device=args.device, block_size=bs, gpu_blocks=blocks,
                              host_blocks=blocks, max_step_tokens=turns_tokens + 1024, max_batch=4),
                 progress=lambda m: print(m, flush=True))
    dev = eng.device
    vocab = eng.model.shape.vocab_size
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, vocab, (args.context,), generator=g).tolist()
    counter = [0]

    def turn() -> float:
        """Send the session's next turn; seconds to its first token."""
        nonlocal ctx
        counter[0] += 1
        new = torch.randint(0, vocab, (args.new,), generator=g).tolist()
        prompt = ctx + new
        t0 = time.perf_counter()
        eng.add_request(Request(f"t{counter[0]}", prompt, max_tokens=1, session_id="s"))
        first = None
        while eng.has_work():
            for ev in eng.step():
                first = ev.token_id
        dt = time.perf_counter() - t0
        ctx = prompt + [first]
        return dt

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    issue: dict[str, list[float]] = {k: [] for k in SWAPPED}     # host time in resume()

    def swapped(variant: str) -> float:
        eng.suspend("s", "swap")
        eng.swapper.synchronize()
        sync()
        eng.cfg.overlap_swap_in = variant != "serial"
        eng.swapper.lazy = variant != "eager"
        t0 = time.perf_counter()
        if variant != "arrival":
            eng.resume("s")                  # prefetch issued when the request arrives
            issue[variant].append(time.perf_counter() - t0)
        turn()
        dt = time.perf_counter() - t0
        eng.cfg.overlap_swap_in, eng.swapper.lazy = True, True
        return dt

    turn()                                   # builds the context (prefill of the whole prompt)
    turn()                                   # warm-up of the resident path
    for variant in SWAPPED:                  # warm-up of each swapped path
        swapped(variant)
    res = {k: [] for k in ("resident", *SWAPPED, "recompute")}
    for v in issue.values():
        v.clear()
    prefilled = {}
    for _ in range(args.repeats):
        for k in res:
            sync()
            before = eng.counters["prefilled_tokens"]
            if k == "resident":
                res[k].append(turn())
            elif k == "recompute":
                eng.suspend("s", "drop")
                sync()
                res[k].append(turn())
            else:
                res[k].append(swapped(k))
            prefilled[k] = eng.counters["prefilled_tokens"] - before
    kv_bytes = eng.stats()["sessions"]["s"]["blocks_gpu"] * eng.kv.block_bytes
    link = eng.kv.measure_link_gbps(1 << 30 if dev.type == "cuda" else 64 << 20)
    ms = {k: statistics.median(v) * 1e3 for k, v in res.items()}
    copy_ms = kv_bytes / (link["h2d_gbps"] * 1e9) * 1e3
    bound = max(ms["resident"], copy_ms)
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "model": args.model, "context_tokens": args.context, "new_tokens": args.new,
           "ttft_resident_ms": round(ms["resident"], 2), "ttft_swapped_ms": round(ms["overlapped"], 2),
           **{f"ttft_swapped_{k}_ms": round(ms[k], 2) for k in SWAPPED},
           "ttft_recompute_ms": round(ms["recompute"], 2), "kv_bytes": kv_bytes,
           "pinned_h2d_gbps": round(link["h2d_gbps"], 2), "copy_ms": round(copy_ms, 2),
           "bound_ms": round(bound, 2),
           **{f"{k}_vs_bound": round(ms[k] / bound, 3) for k in SWAPPED},
           "target_vs_bound": 1.1,
           "recompute_vs_swapped": round(ms["recompute"] / ms["overlapped"], 2),
           "resume_issue_ms": {k: round(statistics.median(v) * 1e3, 2) for k, v in issue.items() if v},
           "prefilled_tokens": prefilled,
           "raw_ms": {k: [round(x * 1e3, 2) for x in v] for k, v in res.items()}, "torch": torch.__version__}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / args.name).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
