"""Extension hooks: how other parts of agentcgd plug into the session and
tool-call lifecycle without the daemon knowing them.

A hook is any object with some of these methods (all optional):

    on_session_create(session, cgroup_path)            after the session cgroup exists
    on_session_end(session, cgroup_path)               before the session cgroup is removed
    on_call_start(session, call, cgroup_path)          after the tool call's pid is placed in
                                                       its cgroup and before the client is told
                                                       to exec (the tool has not run yet); for
                                                       a call born in its cgroup (clone_into)
                                                       right after the call.started reply, the
                                                       tool already running, and always before
                                                       on_call_end
    on_call_end(session, call, cgroup_path) -> dict    after the call's processes are gone and
                                                       before its cgroup is removed; the dict is
                                                       merged into the call's stats ("extra")
    status() -> dict                                   shown under "hooks" by `agentcg status`
    session_view(session) -> dict                      merged into `agentcg session show`
    async admit_call(session, intent, msg)             awaited before a call.start is placed: may
                                                       hold the start (e.g. until GPU memory is
                                                       free) or refuse it (raise ProtocolError)
    async run(daemon)                                  a long-running task started once the
                                                       socket listens, cancelled at stop
    close()                                            at daemon stop

`session` is a `daemon.state.SessionRecord` (name, uid, intent, limits,
cgroup rel path...), `call` a `daemon.state.CallRecord` (session, n, name,
pid, intent, limits, start_ns...), `cgroup_path` an absolute `pathlib.Path`.
Records are the daemon's own: read them, do not mutate them.

Hooks run on the daemon's event loop: keep them fast and non-blocking. An
exception in a hook is logged with the hook's name and never fails the
request. Register hooks in `daemon/app.py:build()`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("agentcg.daemon.hooks")


def _name(hook: Any) -> str:
    return getattr(hook, "name", None) or type(hook).__name__


class Hooks:
    """Calls every registered hook, isolating their failures."""

    def __init__(self, hooks: list[Any] | None = None):
        self.hooks: list[Any] = list(hooks or [])

    def add(self, hook: Any) -> None:
        self.hooks.append(hook)

    def _each(self, method: str, *args: Any) -> list[tuple[Any, Any]]:
        out = []
        for hook in self.hooks:
            fn = getattr(hook, method, None)
            if fn is None:
                continue
            try:
                out.append((hook, fn(*args)))
            except Exception:  # a plug-in must not take the daemon down
                log.exception("hook %s.%s failed", _name(hook), method)
        return out

    def session_create(self, session: Any, path: Path) -> None:
        self._each("on_session_create", session, path)

    def session_end(self, session: Any, path: Path) -> None:
        self._each("on_session_end", session, path)

    def call_start(self, session: Any, call: Any, path: Path) -> None:
        self._each("on_call_start", session, call, path)

    def call_end(self, session: Any, call: Any, path: Path) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        for _hook, result in self._each("on_call_end", session, call, path):
            if isinstance(result, dict):
                extra.update(result)
        return extra

    def status(self) -> dict[str, Any]:
        return {_name(h): r for h, r in self._each("status") if r is not None}

    def session_view(self, session: Any) -> dict[str, Any]:
        view: dict[str, Any] = {}
        for _hook, result in self._each("session_view", session):
            if isinstance(result, dict):
                view.update(result)
        return view

    @property
    def admits(self) -> bool:
        return any(hasattr(h, "admit_call") for h in self.hooks)

    async def admit_call(self, session: Any, intent: Any, msg: dict[str, Any]) -> None:
        """A hook's refusal (ProtocolError) fails the call.start; any other
        error in a hook is logged and the call goes ahead."""
        from agentcg.protocol import ProtocolError
        for hook in self.hooks:
            fn = getattr(hook, "admit_call", None)
            if fn is None:
                continue
            try:
                await fn(session, intent, msg)
            except ProtocolError:
                raise
            except Exception:  # a plug-in must not take the daemon down
                log.exception("hook %s.admit_call failed", _name(hook))

    def runners(self) -> list[Any]:
        return [h for h in self.hooks if hasattr(h, "run")]

    def close(self) -> None:
        self._each("close")
