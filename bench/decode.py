"""Decode step time at batch 1 and 32 against the HBM roofline (weight bytes
divided by measured device memory bandwidth).

    python bench/decode.py [--model llama3-8b] [--context 512] [--out bench/results]
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


def device_bandwidth_gbps(dev: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second (1e9)."""
    if dev.type != "cuda":
        return float("nan")
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty(n, dtype=torch.uint8, device=dev)
    b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    e.synchronize()
    return 2 * n * 10 / (s.elapsed_time(e) / 1e3) / 1e9


def step_ms(eng: Engine, batch: int, context: int, steps: int, tag: str) -> float:
    g = torch.Generator().manual_seed(batch)
    vocab = eng.model.shape.vocab_size
    for i in range(batch):
        eng.add_request(Request(f"{tag}{i}", torch.randint(0, vocab, (context,), generator=g).tolist(),
                                max_tokens=steps + 8))
    while eng.stats()["waiting"]:
        eng.step()                           # prefill
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        evs = eng.step()                     # returns after the sampled tokens reach the host
        times.append(time.perf_counter() - t0)
        if len(evs) != batch:
            raise RuntimeError(f"decode step produced {len(evs)} tokens for batch {batch}")
    for i in range(batch):
        eng.abort(f"{tag}{i}")
    return statistics.median(times[3:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    blocks = 32 * ((args.context + args.steps + 16) // 16 + 2) + 64
    eng = Engine(EngineConfig(model=args.model, device=args.device, gpu_blocks=blocks, host_blocks=0,
                              max_batch=32, max_step_tokens=32 * args.context),
                 progress=lambda m: print(m, flush=True))
    bw = device_bandwidth_gbps(eng.device)
    wbytes = eng.model.weight_bytes()
    b1 = step_ms(eng, 1, args.context, args.steps, "a")
    b32 = step_ms(eng, 32, args.context, args.steps, "b")
    out = {"device": torch.cuda.get_device_name(eng.device) if eng.device.type == "cuda" else "cpu",
           "model": args.model, "context_tokens": args.context, "weight_bytes": wbytes,
           "hbm_gbps": round(bw, 1), "roofline_ms_b1": round(wbytes / (bw * 1e9) * 1e3, 3),
           "step_ms_b1": round(b1, 3), "step_ms_b32": round(b32, 3),
           "b1_vs_roofline": round(b1 / (wbytes / (bw * 1e9) * 1e3), 3) if bw == bw else None,
           "tokens_per_s_b32": round(32 / b32 * 1e3, 1), "torch": torch.__version__}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
