"""The pure policy core: a snapshot in, actions out (see planner.py)."""
# importing the rule modules registers their rules
from agentcg.core.policy import baselines, cpu, detectors, grants, ladder  # noqa: F401
from agentcg.core.policy.model import (
    Action, CallView, CgroupView, HostView, MemEvents, PolicyState, Psi, PsiSample, Reason,
    SessionView, Snapshot, TriggerEvent,
)
from agentcg.core.policy.planner import Decision, decide, plan
from agentcg.core.policy.registry import PolicyConfigError, Ruleset, default_ruleset, load_ruleset, registered

__all__ = [
    "Action", "CallView", "CgroupView", "Decision", "HostView", "MemEvents", "PolicyConfigError",
    "PolicyState", "Psi", "PsiSample", "Reason", "Ruleset", "SessionView", "Snapshot", "TriggerEvent", "decide",
    "default_ruleset", "load_ruleset", "plan", "registered",
]
