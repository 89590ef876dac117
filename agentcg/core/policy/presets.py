"""Named rulesets. "adaptive" is agentcg's default; "static" and "hint" are the
baselines the replay benchmark compares against; "none" changes nothing."""
from __future__ import annotations

PRESETS: dict[str, list[dict]] = {
    "adaptive": [
        {"name": "psi_pressure", "args": {"kind": "some", "stall_threshold_us": 10_000, "window_us": 500_000}},
        {"name": "burst_borrow", "args": {}},
        {"name": "call_cap", "args": {}},
        {"name": "cpu_classes", "args": {}},
        {"name": "boost_blocking", "args": {}},
        {"name": "throttle", "args": {}},
        {"name": "reclaim", "args": {"escalate_after_ns": 20_000_000}},
        {"name": "freeze", "args": {"escalate_after_ns": 50_000_000}},
        {"name": "kill", "args": {}},
    ],
    "static": [{"name": "static_session_max", "args": {}}],
    "hint": [{"name": "command_hint_high", "args": {}}],
    "none": [],
}
