"""Time to first token of a session's next turn after a pause, three ways in
one run: context kept on the device, swapped to host and brought back
(swap-in overlapped layer by layer with the new tokens' prefill), dropped and
recomputed.

    python bench/resume.py [--context 32768] [--new 64] [--model llama3-8b] [--out bench/results]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    bs = 16
    turns_tokens = args.context + (args.repeats * 3 + 2) * (args.new + 1)
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

    turn()                                   # builds the context (prefill of the whole prompt)
    turn()                                   # warm-up of the resident path
    turn()
    res = {"resident": [], "swapped": [], "recompute": []}
    prefilled = {}
    issue = []                               # host time to issue the swap-in
    for _ in range(args.repeats):
        sync()
        before = eng.counters["prefilled_tokens"]
        res["resident"].append(turn())
        prefilled["resident"] = eng.counters["prefilled_tokens"] - before
        eng.suspend("s", "swap")
        eng.swapper.synchronize()
        sync()
        before = eng.counters["prefilled_tokens"]
        t0 = time.perf_counter()
        eng.resume("s")                      # prefetch issued when the request arrives
        issue.append(time.perf_counter() - t0)
        dt = turn()
        res["swapped"].append(time.perf_counter() - t0)
        prefilled["swapped"] = eng.counters["prefilled_tokens"] - before
        eng.suspend("s", "drop")
        sync()
        before = eng.counters["prefilled_tokens"]
        res["recompute"].append(turn())
        prefilled["recompute"] = eng.counters["prefilled_tokens"] - before
        del dt
    kv_bytes = eng.stats()["sessions"]["s"]["blocks_gpu"] * eng.kv.block_bytes
    link = eng.kv.measure_link_gbps(1 << 30)
    pinned = min(link["h2d_gbps"], link["d2h_gbps"])
    ms = {k: statistics.median(v) * 1e3 for k, v in res.items()}
    bound = max(ms["resident"], kv_bytes / (link["h2d_gbps"] * 1e9) * 1e3)
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "model": args.model, "context_tokens": args.context, "new_tokens": args.new,
           "ttft_resident_ms": round(ms["resident"], 2), "ttft_swapped_ms": round(ms["swapped"], 2),
           "ttft_recompute_ms": round(ms["recompute"], 2), "kv_bytes": kv_bytes,
           "pinned_copy_gbps": round(pinned, 2), "pinned_h2d_gbps": round(link["h2d_gbps"], 2),
           "bound_ms": round(bound, 2), "swapped_vs_bound": round(ms["swapped"] / bound, 3),
           "recompute_vs_swapped": round(ms["recompute"] / ms["swapped"], 2),
           "resume_issue_ms": round(statistics.median(issue) * 1e3, 2), "prefilled_tokens": prefilled,
           "raw_ms": {k: [round(x * 1e3, 2) for x in v] for k, v in res.items()}, "torch": torch.__version__}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "resume.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
