"""Human output: compact tables, sizes, durations, plain-words feedback."""
from __future__ import annotations

import json
import time
from typing import Any, Iterable, Sequence

from agentcg.units import format_bytes


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; numbers right-aligned."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    numeric = [all(_looks_numeric(r[i]) for r in cells) if cells else False for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in cells:
        parts = [v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _looks_numeric(text: str) -> bool:
    t = text.rstrip("KMGTPBms%").replace(".", "", 1)
    return t.isdigit() or text == "-"


def size(n: Any) -> str:
    return format_bytes(n) if isinstance(n, int) else "-"


def duration_ns(ns: Any) -> str:
    """1_500_000_000 -> '1.5s', 2_300_000 -> '2.3ms'."""
    if not isinstance(ns, (int, float)):
        return "-"
    if ns >= 60_000_000_000:
        minutes, rest = divmod(ns / 1e9, 60)
        return f"{int(minutes)}m{rest:02.0f}s"
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.1f}s"
    if ns >= 1_000_000:
        return f"{ns / 1e6:.1f}ms"
    return f"{ns / 1e3:.0f}us"


def age(ns_since_epoch: Any, *, now_s: float | None = None) -> str:
    if not isinstance(ns_since_epoch, (int, float)) or ns_since_epoch <= 0:
        return "-"
    now = time.time() if now_s is None else now_s
    return duration_ns(max(0.0, now - ns_since_epoch / 1e9) * 1e9) + " ago"


def clock(ns_since_epoch: Any) -> str:
    if not isinstance(ns_since_epoch, (int, float)) or ns_since_epoch <= 0:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(ns_since_epoch / 1e9))


def to_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_default)


def _default(obj: Any) -> Any:
    for attr in ("to_dict", "_asdict"):
        fn = getattr(obj, attr, None)
        if callable(fn):
            return fn()
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    return str(obj)


def feedback_lines(feedback: Any) -> list[str]:
    """Plain-words lines from the feedback the daemon returned (strings or dicts
    with a 'message' and an optional 'suggestion')."""
    out = []
    for item in feedback or []:
        if isinstance(item, str):
            out.append(item)
            continue
        if not isinstance(item, dict):
            item = _default(item)
        if isinstance(item, dict):
            msg = item.get("message") or item.get("text") or item.get("kind") or str(item)
            hint = item.get("suggestion")
            out.append(f"{msg} {hint}" if hint and hint not in msg else msg)
        else:
            out.append(str(item))
    return out
