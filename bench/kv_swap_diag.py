"""Where a swap's time goes (H100, 8B block shape): gather, scatter and link copy of one
staging piece timed alone, and a whole 4 GiB swap for several staging sizes,
slot counts and host pacing depths.  python bench/kv_swap_diag.py  (CUDA only)"""
import sys, time, json
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agentcg.adapters.kv_torch import KVPool

dev = torch.device("cuda")
res = {}
for slot_mib, nslots, pace in ((64, 3, 0), (64, 3, 1), (64, 3, 2), (64, 4, 3), (256, 3, 2)):
    kv = KVPool(n_layers=32, kv_heads=8, head_dim=128, block_size=16, chunk_blocks=1024, num_chunks=3,
                host_blocks=2048, device=dev, dtype=torch.bfloat16, slot_bytes=slot_mib << 20, num_slots=nslots)
    kv.pace_depth = pace
    perm = torch.randperm(3072, generator=torch.Generator().manual_seed(1))
    src, dst = perm[:2048].tolist(), perm[1024:3072].tolist()
    runs = [(0, 2048, 0)]
    for name, fn in (("out", lambda: kv.swap_out("s", src, runs)), ("in", lambda: kv.swap_in("s", dst, runs))):
        fn(); torch.cuda.synchronize()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
        res[f"{name}_{slot_mib}M_x{nslots}_pace{pace}_gbps"] = round(2048 * kv.block_bytes / min(ts) / 1e9, 2)
    p = kv.pieces(runs)[0]
    plan = kv.gather_plan(src[p.first_index + p.a:p.first_index + p.b])
    view = kv._staging_view(0, p)
    host = kv.host_run(p.run_start, p.run_n)[p.l0:p.l1, p.a:p.b]
    def ev_time(f, n=10):
        f(); s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n): f()
        e.record(); e.synchronize(); return s.elapsed_time(e) / n
    nb = view.numel() * 2
    res[f"piece_{slot_mib}M_gather_ms"] = round(ev_time(lambda: kv._gather_piece(p, plan, view)), 3)
    res[f"piece_{slot_mib}M_scatter_ms"] = round(ev_time(lambda: kv._scatter_piece(p, plan, view)), 3)
    res[f"piece_{slot_mib}M_d2h_ms"] = round(ev_time(lambda: host.copy_(view, non_blocking=True)), 3)
    res[f"piece_{slot_mib}M_bytes"] = nb
    print(json.dumps(res), flush=True)
    del kv; torch.cuda.empty_cache()
