"""Swap bandwidth of session-sized KV (8B shape) next to a plain pinned copy
and block-by-block copying, in one run.

    python bench/kv_swap.py [--sizes-gib 1,4,8] [--out bench/results]

Writes kv_swap.json: swap_out_gbps / swap_in_gbps (largest size), per-size
rows, pinned_copy_gbps (same size, contiguous, one copy), per_block_gbps
(each 64 KiB layer-block copied on its own), device name, bit-exact check.
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
from agentcg.adapters.kv_torch import KVPool  # noqa: E402
from agentcg.worker.shapes import get_shape  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, repeats):
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-gib", default="1,4,8")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    shape = get_shape(args.shape)
    sizes = [float(s) for s in args.sizes_gib.split(",")]
    probe = KVPool(n_layers=shape.n_layers, kv_heads=shape.n_kv_heads, head_dim=shape.head_dim,
                   block_size=args.block_size, chunk_blocks=1, num_chunks=1, host_blocks=0,
                   device=dev, dtype=dtype)
    bb = probe.block_bytes
    del probe
    max_blocks = int(max(sizes) * (1 << 30) // bb)
    chunk_blocks = max(1, max_blocks // 4)
    num_chunks = 6                       # pool 1.5x the largest session: blocks are scattered
    print(f"device {dev}, block {bb >> 10} KiB, pool {num_chunks * chunk_blocks} blocks, host {max_blocks}", flush=True)
    kv = KVPool(n_layers=shape.n_layers, kv_heads=shape.n_kv_heads, head_dim=shape.head_dim,
                block_size=args.block_size, chunk_blocks=chunk_blocks, num_chunks=num_chunks,
                host_blocks=max_blocks, device=dev, dtype=dtype)
    default_dev = kv.dev_stream if dev.type == "cuda" else None     # two streams: dev != link
    other_dev = kv.link_stream if dev.type == "cuda" else None       # one stream: dev == link
    g = torch.Generator(device=dev).manual_seed(0)
    for c in kv.chunks:
        c.normal_(generator=g)
    rows = []
    for size in sizes:
        n = int(size * (1 << 30) // bb)
        nbytes = n * bb
        perm = torch.randperm(num_chunks * chunk_blocks, generator=torch.Generator().manual_seed(1))
        src = perm[:n].tolist()
        dst = perm[n:2 * n].tolist() if 2 * n <= len(perm) else perm[:n].flip(0).tolist()
        runs = [(0, n, 0)]
        if dev.type == "cuda":          # gathers and copies on one stream, same run
            kv.dev_stream = other_dev
            t2_out = timed(lambda: kv.swap_out("s", src, runs), dev, args.repeats)
            t2_in = timed(lambda: kv.swap_in("s", dst, runs), dev, args.repeats)
            kv.dev_stream = default_dev
        # snapshot after the other variant ran: src and dst may overlap at the largest size
        before = torch.stack([kv.gather(layer, kv.gather_plan(src[:8])) for layer in (0, kv.L - 1)]).clone()
        t_out = timed(lambda: kv.swap_out("s", src, runs), dev, args.repeats)
        t_in = timed(lambda: kv.swap_in("s", dst, runs), dev, args.repeats)
        after = torch.stack([kv.gather(layer, kv.gather_plan(dst[:8])) for layer in (0, kv.L - 1)])
        exact = bool(torch.equal(before, after))
        # plain pinned copy of the same bytes, contiguous
        elems = nbytes // 2
        d = torch.empty(elems, dtype=dtype, device=dev)
        h = kv.host[:elems]
        t_h2d = timed(lambda: d.copy_(h, non_blocking=True), dev, args.repeats)
        t_d2h = timed(lambda: h.copy_(d, non_blocking=True), dev, args.repeats)
        del d
        row = {"size_gib": size, "bytes": nbytes, "blocks": n,
               "swap_out_gbps": nbytes / t_out / 1e9, "swap_in_gbps": nbytes / t_in / 1e9,
               "pinned_d2h_gbps": nbytes / t_d2h / 1e9, "pinned_h2d_gbps": nbytes / t_h2d / 1e9,
               "bit_exact": exact}
        if dev.type == "cuda":
            row["one_stream_swap_out_gbps"] = nbytes / t2_out / 1e9
            row["one_stream_swap_in_gbps"] = nbytes / t2_in / 1e9
        row["pinned_copy_gbps"] = min(row["pinned_d2h_gbps"], row["pinned_h2d_gbps"])
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    # block by block: each layer slab of each block is its own copy (first size)
    n = int(sizes[0] * (1 << 30) // bb)
    host = kv.host_run(0, n)                                  # [L, n, 2, bs, H, D]

    def per_block():
        for i in range(n):
            c, lb = divmod(i, chunk_blocks)
            for layer in range(kv.L):
                host[layer, i].copy_(kv.chunks[c][layer, lb], non_blocking=True)
    t_pb = timed(per_block, dev, 1)
    per_block_gbps = n * bb / t_pb / 1e9
    big = rows[-1]
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "shape": args.shape, "block_bytes": bb, "layer_block_bytes": bb // kv.L,
           "swap_out_gbps": round(big["swap_out_gbps"], 2), "swap_in_gbps": round(big["swap_in_gbps"], 2),
           "pinned_copy_gbps": round(big["pinned_copy_gbps"], 2), "per_block_gbps": round(per_block_gbps, 2),
           "swap_out_vs_pinned": round(big["swap_out_gbps"] / big["pinned_d2h_gbps"], 3),
           "swap_in_vs_pinned": round(big["swap_in_gbps"] / big["pinned_h2d_gbps"], 3),
           "bit_exact": all(r["bit_exact"] for r in rows), "rows": rows, "torch": torch.__version__}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "kv_swap.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}))


if __name__ == "__main__":
    main()
