"""README table and PNG plots for the replay results."""
from __future__ import annotations

from pathlib import Path

MB = 1_000_000
LABEL = {"none": "(a) no limits", "static": "(b) static memory.max = budget/N",
         "hint": "(c) per-call memory.high from command", "adaptive": "(d) agentcg adaptive"}


def _f(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(params: dict, results: list[dict]) -> str:
    head = (f"{params['sessions']} sessions ({params['priorities']} priorities), speed-up {params['speedup']}, "
            f"memory x{params['mem_scale']}, budget {params['budget_mb']} MB = {params['budget_mult']} x summed "
            f"average; unlimited peak {params['unlimited_peak_mb']} MB"
            + (f"; agents alone peak {params['agents_alone_peak_mb']} MB" if "agents_alone_peak_mb" in params else "")
            + "\n\n")
    rows = ["| policy | agents lost | tool calls killed | OOM kills | high JCT/solo p50 | high max | "
            "low JCT/solo p50 | peak MB | mean MB | reaction p50/p99 ms (marks acted on) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        hung = r.get("sessions_timed_out") or 0
        lost = f"{r['agents_killed']} ({hung} hung)" if hung else str(r["agents_killed"])
        rows.append(f"| {LABEL.get(r['policy'], r['policy'])} | {lost} | {r['toolcalls_killed']} | "
                    f"{r['oom_events']} | {_f(r['high_jct_vs_solo_p50'])} | {_f(r['high_jct_vs_solo_max'])} | "
                    f"{_f(r['low_jct_vs_solo_p50'])} | {_f(r['mem_peak_mb'], 0)} | {_f(r['mem_mean_mb'], 0)} | "
                    f"{_f(r['reaction_p50_ms'], 1)} / {_f(r['reaction_p99_ms'], 1)} "
                    f"({r.get('marks_with_action', 0)}/{r.get('marks', 0)}) |")
    note = ("\nagents lost: killed, or hung past the replay's time limit (an agent whose memory does not fit "
            "waits in its page faults when the OOM killer may not take it).\n")
    return head + "\n".join(rows) + "\n" + note


def plots(out: Path, raws: dict, results: list[dict], params: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for pol, raw in raws.items():
        xs = [t for t, _b in raw["samples"]]
        ys = [b / MB for _t, b in raw["samples"]]
        ax.plot(xs, ys, label=LABEL.get(pol, pol), lw=1)
    ax.axhline(params["budget_mb"], color="k", ls="--", lw=1, label="budget")
    ax.set_xlabel("seconds (replay time)")
    ax.set_ylabel("parent memory.current (MB)")
    ax.set_title("Memory of all sessions over time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "replay-memory.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["policy"] for r in results]
    hi = [r["high_jct_vs_solo_p50"] or 0 for r in results]
    hmax = [r["high_jct_vs_solo_max"] or 0 for r in results]
    lo = [r["low_jct_vs_solo_p50"] or 0 for r in results]
    x = range(len(names))
    ax.bar([i - 0.27 for i in x], hi, 0.27, label="high priority p50")
    ax.bar(list(x), hmax, 0.27, label="high priority max")
    ax.bar([i + 0.27 for i in x], lo, 0.27, label="low priority p50")
    ax.axhline(1.1, color="k", ls="--", lw=1, label="1.1x target")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("completion time / solo")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "replay-jct.png", dpi=110)
    plt.close(fig)
