"""Turns policy actions into cgroup writes: the policy's only writer.

`apply(action, dry_run=...)` returns what it did, or what it would do, as one
line with old -> new and the reason. A cgroup that vanished in between (the
call ended) is reported as "gone", not raised.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from agentcg.adapters.cgroupfs import GONE_ERRNOS, CgroupFs, CgroupGone
from agentcg.core.policy.model import Action

log = logging.getLogger("agentcg.policy")


@dataclass(frozen=True)
class Applied:
    action: Action
    outcome: str  # "done" | "dry-run" | "gone" | "failed: ..."
    t_ns: int

    def line(self) -> str:
        prefix = "would set " if self.outcome == "dry-run" else ""
        suffix = "" if self.outcome in ("done", "dry-run") else f" [{self.outcome}]"
        return f"{prefix}{self.action.render()}{suffix}"

    def to_dict(self) -> dict:
        d = self.action.to_dict()
        d.update(outcome=self.outcome, t_ns=self.t_ns, line=self.line())
        return d


def _text(value) -> str:
    return "max" if value is None else str(value)


class Executor:
    def __init__(self, cgfs: CgroupFs):
        self.cgfs = cgfs

    def apply(self, action: Action, *, dry_run: bool) -> Applied:
        now = time.monotonic_ns()
        if dry_run:
            applied = Applied(action, "dry-run", now)
            log.info("%s", applied.line())
            return applied
        try:
            if action.kind == "set":
                self.cgfs._write(action.target, action.knob, _text(action.new))
            elif action.kind == "freeze":
                self.cgfs._write(action.target, "cgroup.freeze", "1")
            elif action.kind == "thaw":
                self.cgfs._write(action.target, "cgroup.freeze", "0")
            elif action.kind == "kill":
                leaf = action.target.rsplit("/", 1)[-1]
                if not leaf.startswith("c-"):
                    raise ValueError(f"refusing to kill {action.target}: not a tool call")
                self.cgfs._write(action.target, "cgroup.kill", "1")
            else:
                raise ValueError(f"action kind {action.kind!r} unknown")
            outcome = "done"
        except CgroupGone:
            outcome = "gone"
        except OSError as exc:
            outcome = "gone" if exc.errno in GONE_ERRNOS else f"failed: {exc.strerror}"
        applied = Applied(action, outcome, time.monotonic_ns())
        log.info("%s", applied.line())
        return applied
