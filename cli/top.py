"""agentcg top: a live view of sessions, running calls, memory and the policy.

It redraws on every event of the daemon's stream (`events` with follow,
read by a thread of its own on a second connection) and, for the values that
change without an event (memory, CPU, running time), every --interval
seconds from `status` and `session.show`."""
from __future__ import annotations

import curses
import os
import queue
import sys
import threading
import time
from typing import Any

import click

from agentcg.client import Client, DaemonUnavailable, ProtocolError

from . import output as out
from .common import Api, fail, json_option, not_running_message, socket_path, strip_envelope
from .topview import Frame, Line, frame_lines, merge_actions

POLL_MS = 100          # how often keys and the event queue are looked at
RETRY_S = 1.0          # the event stream's reconnect delay while agentcgd is away
QUIT_KEYS = (ord("q"), ord("Q"))


@click.command()
@click.option("--once", is_flag=True, help="Print one frame to stdout and exit (no terminal control codes).")
@click.option("--interval", "interval_s", metavar="SECONDS", type=click.FloatRange(min=0.1), default=2.0,
              show_default=True, help="Refresh from status/session.show at least this often.")
@click.option("--session", "session_name", metavar="NAME", help="Only this session.")
@json_option
@click.pass_context
def top(ctx: click.Context, once: bool, interval_s: float, session_name: str | None, as_json: bool) -> None:
    """Live view: sessions, their running calls, memory against the limits,
    the memory ladder's level and the policy's last actions.

    \b
    It redraws on each event of the daemon (a call starts or ends, the policy
    acts) and every --interval seconds for memory and CPU. q quits, r
    refreshes now. --once prints one frame for scripts; with --json that
    frame is the daemon's replies ({"status", "sessions": [session.show ...]}).
    The pressure of a session is the PSI stall the policy last acted on
    ("-" while it acted on none): the daemon reports no live PSI reading.

    \b
    Examples:
      agentcg top
      agentcg top --once
      agentcg --json top --once | jq '.sessions[].calls[].stats.memory_current_bytes'
    """
    if as_json and not once:
        fail("--json needs --once (the live view is for a terminal)", 2)
    if once:
        with Api(ctx) as client:
            frame = fetch(client, session_name)
        if as_json:
            click.echo(out.to_json(frame.to_dict()))
        else:
            actions = merge_actions([], _status_actions(frame.status))
            frame.actions = actions
            for line in frame_lines(frame):
                click.echo(line.text.rstrip())
        return
    if not sys.stdout.isatty() or not sys.stdin.isatty():
        fail("the live view needs a terminal; use --once for one frame", 2)
    path = socket_path(ctx)
    with Api(ctx) as client:
        first = fetch(client, session_name)   # agentcgd down: the usual one-line error
    curses.use_env(False)   # the terminal's own size, not a stale exported COLUMNS/LINES
    try:
        curses.wrapper(_live, path, session_name, interval_s, first)
    except KeyboardInterrupt:
        pass


def fetch(client: Client, session_name: str | None) -> Frame:
    """status, then session.show of each session (of one with --session)."""
    status = strip_envelope(client.status())
    names = [s["name"] for s in client.sessions() if session_name in (None, s.get("name"))]
    shows = []
    for name in names:
        try:
            shows.append(client.show(name))
        except ProtocolError as exc:
            if exc.code != "not_found":   # ended between list and show
                raise
    return Frame(status, shows)


def _status_actions(status: dict[str, Any] | None) -> list[dict[str, Any]]:
    policy = ((status or {}).get("hooks") or {}).get("policy") or {}
    return [a for a in policy.get("last_actions") or [] if isinstance(a, dict)]


class EventFeed(threading.Thread):
    """Follows the daemon's event stream into a queue; reconnects after a restart."""

    def __init__(self, path: str, session_name: str | None):
        super().__init__(name="agentcg-top-events", daemon=True)
        self.path, self.session_name = path, session_name
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()

    def run(self) -> None:
        while True:
            try:
                client = Client(socket_path=self.path, reconnect_timeout_s=0)
                for ev in client.events(follow=True, history=False, session=self.session_name):
                    self.events.put(ev)
            except (DaemonUnavailable, ProtocolError, OSError, ValueError):
                pass
            self.events.put({"type": "top.stream_lost"})   # refresh: the daemon may be gone or back
            time.sleep(RETRY_S)

    def drain(self) -> list[dict[str, Any]]:
        got = []
        while True:
            try:
                got.append(self.events.get_nowait())
            except queue.Empty:
                return got


class LiveView:
    def __init__(self, path: str, session_name: str | None, first: Frame):
        self.path, self.session_name = path, session_name
        self.client = Client(socket_path=path, timeout_s=5.0, reconnect_timeout_s=0)
        self.frame = first
        self.actions = merge_actions([], _status_actions(first.status))

    def refresh(self, events: list[dict[str, Any]]) -> None:
        self.actions = merge_actions(self.actions, [e for e in events if e.get("type") == "policy.action"])
        try:
            self.frame = fetch(self.client, self.session_name)
        except DaemonUnavailable as exc:
            self.frame = Frame(None, error=f"{not_running_message(self.path)} ({exc}); retrying")
        except ProtocolError as exc:
            self.frame = Frame(self.frame.status, self.frame.sessions, error=f"{exc.message} [{exc.code}]")
        self.actions = merge_actions(self.actions, _status_actions(self.frame.status))
        self.frame.actions = self.actions

    def lines(self) -> list[Line]:
        self.frame.actions = self.actions
        return frame_lines(self.frame)


def _live(stdscr: Any, path: str, session_name: str | None, interval_s: float, first: Frame) -> None:
    try:
        curses.curs_set(0)
    except curses.error:   # a terminal without cursor control
        pass
    stdscr.timeout(POLL_MS)
    view = LiveView(path, session_name, first)
    feed = EventFeed(path, session_name)
    feed.start()
    draw(stdscr, view.lines())
    last_s = time.monotonic()
    size = stdscr.getmaxyx()   # what curses drew for; the first poll catches a size it missed
    while True:
        key = stdscr.getch()
        if key in QUIT_KEYS:
            return
        resized, size = _resized(size)
        events = feed.drain()
        due = time.monotonic() - last_s >= interval_s
        if events or due or key == ord("r"):
            view.refresh(events)
            last_s = time.monotonic()
        if events or due or resized or key in (ord("r"), curses.KEY_RESIZE):
            draw(stdscr, view.lines(), repaint=resized or key == curses.KEY_RESIZE)


def _terminal_size() -> tuple[int, int]:
    try:
        cols, rows = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return (0, 0)
    return (rows, cols)


def _resized(last: tuple[int, int]) -> tuple[bool, tuple[int, int]]:
    """The size asked of the terminal itself on every poll: curses's own
    KEY_RESIZE needs its SIGWINCH handler, and the signal may reach the
    event thread instead of the one waiting in getch."""
    now = _terminal_size()
    if now == tuple(last) or 0 in now:
        return False, last
    curses.resizeterm(*now)
    return True, now


def draw(stdscr: Any, lines: list[Line], *, repaint: bool = False) -> None:
    """The frame cut to the window: no wrapping, so that a narrow or short
    terminal shows the top-left part, and the help line last. repaint: after
    a resize the terminal's content is not what curses last drew (the
    terminal cropped or reflowed it), so the whole screen is sent again."""
    height, width = stdscr.getmaxyx()
    if repaint:
        stdscr.clear()
    else:
        stdscr.erase()
    body = lines[:max(0, height - 1)]
    for y, line in enumerate(body):
        _put(stdscr, y, line.text, width, curses.A_BOLD if line.bold else curses.A_NORMAL)
    if height >= 2:
        _put(stdscr, height - 1, "q quit  r refresh", width, curses.A_DIM)
    stdscr.refresh()


def _put(stdscr: Any, y: int, text: str, width: int, attr: int) -> None:
    try:   # the bottom-right cell cannot be written without curses reporting an error
        stdscr.addnstr(y, 0, text, max(0, width - 1), attr)
    except curses.error:
        pass
