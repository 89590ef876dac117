"""OpenAI-compatible HTTP API of the inference worker (FastAPI on uvicorn).

Routes:
    POST /v1/chat/completions   chat, streaming (SSE) or not
    POST /v1/completions        plain completions, streaming (SSE) or not
    GET  /v1/models             the one model this worker serves
    GET  /health                200 once the engine runs
    GET  /agentcg/stats         the engine's stats (read-only; control ops live on the Unix socket)

Turns of one agent are tied together by a session id in the `X-Agentcg-Session`
request header (`X-Session-Id` is accepted too): the engine then keeps the
session's KV blocks after a turn and reuses them as the prefix of the next one.
A streaming client that goes away mid-answer has its request aborted at once,
which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from agentcg.worker.async_engine import AsyncEngine, EngineClosed, RequestStream
from agentcg.worker.prompts import (MAX_PROMPT_BYTES, ApiError, _short, chat_prompt_ids,  # noqa: F401
                                    check_prompt_bytes, encode_text, messages_bytes, parse_messages,
                                    parse_prompt, completion_prompt_ids, prompt_input)

log = logging.getLogger("agentcg.worker")

SESSION_HEADERS = ("x-agentcg-session", "x-session-id")
SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_STOP_STRINGS = 4
DEFAULT_COMPLETION_MAX_TOKENS = 16      # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 1024          # when the model's context length is unknown
# Fields this worker does not implement, with the values that mean "off".
UNSUPPORTED_FIELDS = {
    "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "logit_bias": ({},),
    "best_of": (1,), "seed": (), "suffix": ("",), "tools": ([],), "response_format": ({"type": "text"},),
}


# ---------------------------------------------------------------------------
# request validation (each error names the field and the value)

def _field(body: dict, name: str, types: tuple, default: Any, what: str) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in types:
        raise ApiError(f"{name}: expected {what}, got {v!r}", param=name)
    if not isinstance(v, types):
        raise ApiError(f"{name}: expected {what}, got {type(v).__name__} {_short(v)}", param=name)
    return v


def _require_unsupported(body: dict, name: str, ok: Any, why: str) -> None:
    v = body.get(name)
    if v is not None and v != ok:
        raise ApiError(f"{name}: {why} (got {_short(v)})", param=name)


def parse_sampling(body: dict, *, chat: bool, prompt_len: int, max_model_len: int | None,
                   pool_tokens: int | None = None) -> dict:
    """Common generation fields -> dict(max_tokens, temperature, stop, stream, include_usage)."""
    stream = _field(body, "stream", (bool,), False, "true or false")
    stream_options = _field(body, "stream_options", (dict,), {}, "an object")
    include_usage = _field(stream_options, "include_usage", (bool,), False, "true or false")

    temperature = float(_field(body, "temperature", (int, float), 1.0, "a number from 0 to 2"))
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(f"temperature: must be between 0 and 2, got {temperature}", param="temperature")

    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    room = None if max_model_len is None else max_model_len - prompt_len
    if room is not None and room < 1:
        raise ApiError(f"the prompt is {prompt_len} tokens, which fills the model's context of "
                       f"{max_model_len} tokens", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    if chat:
        # The rest of the context, but no more than the KV pool can hold next to the prompt.
        default = room if room is not None else DEFAULT_CHAT_MAX_TOKENS
        if pool_tokens is not None and pool_tokens - prompt_len >= 1:
            default = min(default, pool_tokens - prompt_len)
    else:
        default = DEFAULT_COMPLETION_MAX_TOKENS if room is None else min(DEFAULT_COMPLETION_MAX_TOKENS, room)
    max_tokens = _field(body, key, (int,), default, "a positive integer")
    if max_tokens < 1:
        raise ApiError(f"{key}: must be at least 1, got {max_tokens}", param=key)
    if room is not None and max_tokens > room:
        raise ApiError(f"{key}: the prompt ({prompt_len} tokens) plus {key} ({max_tokens}) exceeds "
                       f"the model's context of {max_model_len} tokens", param=key,
                       code="context_length_exceeded")

    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise ApiError(f"stop: expected a string or a list of strings, got {_short(stop)}", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    if any(s == "" for s in stops):
        raise ApiError("stop: empty strings are not allowed", param="stop")

    n = _field(body, "n", (int,), 1, "an integer")
    if n != 1:
        raise ApiError(f"n: only 1 choice per request is supported, got {n}", param="n")
    _require_unsupported(body, "top_p", 1, "only 1 (no nucleus sampling) is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        _require_unsupported(body, name, 0, "penalties are not supported; use 0")
    for name, harmless in UNSUPPORTED_FIELDS.items():
        v = body.get(name)
        if v is not None and not any(v == h and type(v) is type(h) for h in harmless):
            raise ApiError(f"{name}: not supported by this worker (got {_short(v)})", param=name)
    return {"max_tokens": max_tokens, "temperature": temperature, "stop": stops,
            "stream": stream, "include_usage": include_usage}


def session_from_headers(headers: Any) -> str | None:
    for name in SESSION_HEADERS:
        v = headers.get(name)
        if v is not None:
            if not SESSION_RE.match(v):
                raise ApiError(f"{name} header: session id {_short(v)} must match {SESSION_RE.pattern}",
                               param=name)
            return v
    return None


# ---------------------------------------------------------------------------
# token ids -> text, with stop strings

class TextAssembler:
    """Turns generated token ids into text deltas, honouring stop strings.

    Holds back text that could still turn into a stop string and trailing
    bytes of an incomplete UTF-8 character, so that streaming and
    non-streaming answers are the same text.
    """

    def __init__(self, tokenizer: Any, stop: list[str]):
        self._tok = tokenizer
        self._stop = stop
        self.ids: list[int] = []
        self.text = ""        # everything emitted so far
        self.stopped = False  # a stop string was found

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self._tok.decode(self.ids)
        safe = full.rstrip("\ufffd")          # an incomplete multi-byte character
        return self._emit(safe, final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._emit(self._tok.decode(self.ids), final=True)

    def _emit(self, full: str, final: bool) -> str:
        start = len(self.text)
        if self._stop:
            search_from = max(0, start - max(len(s) for s in self._stop))
            hits = [i for i in (full.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.stopped = True
                delta = full[start:cut] if cut > start else ""
                self.text += delta
                return delta
        end = len(full)
        if not final:
            for s in self._stop:
                for k in range(min(len(s) - 1, end - start), 0, -1):
                    if full.endswith(s[:k]):
                        end = min(end, len(full) - k)
                        break
        delta = full[start:end] if end > start else ""
        self.text += delta
        return delta


# ---------------------------------------------------------------------------
# the app

class AbortingStreamingResponse(StreamingResponse):
    """A streaming response that aborts its request however the stream ends."""

    def __init__(self, content: AsyncIterator[str], request_stream: RequestStream, **kw):
        super().__init__(content, **kw)
        self._rs = request_stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._rs.close()     # no-op when the request finished


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"


def create_app(aeng: AsyncEngine, *, model_name: str | None = None, control=None,
               api_key: str | None = None, max_prompt_bytes: int | None = MAX_PROMPT_BYTES) -> FastAPI:
    """The FastAPI app around a started AsyncEngine.

    control: an optional object with async start()/close() (the control socket
    server), run for the lifetime of the app. max_prompt_bytes: the most UTF-8
    bytes of prompt text (or of all chat message contents) a request may
    carry; None for no limit but the body's.
    """
    engine = aeng.engine
    tokenizer = engine.tokenizer
    served = model_name or str(getattr(engine, "model_name", "model"))
    max_model_len = _engine_max_len(engine)
    vocab_size = _vocab_size(engine)
    end_ids = _end_token_ids(engine)
    created = int(time.time())

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if control is not None:
            await control.start()
        try:
            yield
        finally:
            if control is not None:
                await control.close()

    app = FastAPI(title="agentcg inference worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.aeng = aeng
    app.state.model_name = served

    @app.exception_handler(ApiError)
    async def _api_error(_req: HttpRequest, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def _auth(req: HttpRequest, call_next):
        if api_key is not None and req.url.path.startswith(("/v1/", "/agentcg/")):
            if req.headers.get("authorization") != f"Bearer {api_key}":
                e = ApiError("missing or wrong API key in the Authorization header", status=401,
                             type_="authentication_error", code="invalid_api_key")
                return JSONResponse(e.body(), status_code=401)
        return await call_next(req)

    async def read_body(req: HttpRequest) -> dict:
        declared = req.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(f"request body is {declared} bytes; the limit is {MAX_BODY_BYTES} bytes",
                           status=413, code="request_too_large")
        raw = bytearray()
        async for piece in req.stream():          # a chunked body has no Content-Length
            raw += piece
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(f"request body is over the limit of {MAX_BODY_BYTES} bytes",
                               status=413, code="request_too_large")
        try:
            body = await asyncio.to_thread(json.loads, bytes(raw))   # megabytes of JSON: off the loop
        except ValueError as e:
            raise ApiError(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(f"request body: expected a JSON object, got {type(body).__name__}")
        model = body.get("model")
        if model is not None and model != served:
            raise ApiError(f"model: this worker serves {served!r}, not {_short(model)}", param="model",
                           status=404, code="model_not_found")
        return body

    async def start(prompt_ids: list[int], sp: dict, session: str | None) -> RequestStream:
        from agentcg.worker.engine import Request  # torch-side import, only when serving

        req = Request(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=prompt_ids,
            max_tokens=sp["max_tokens"],
            session_id=session,
            temperature=sp["temperature"],
            stop_token_ids=end_ids,
        )
        try:
            return await aeng.submit(req)
        except ValueError as e:
            raise ApiError(str(e)) from None
        except EngineClosed as e:
            raise ApiError(str(e), status=503, type_="server_error") from None

    async def events(rs: RequestStream, asm: TextAssembler) -> AsyncIterator[tuple[str, str | None, int]]:
        """(text delta, finish reason or None, completion tokens so far)."""
        n = 0
        async for ev in rs:
            tid = ev.token_id
            delta = ""
            stop_token = ev.finished and ev.finish_reason == "stop" and tid in end_ids
            if tid is not None and tid >= 0:
                n += 1
                if not stop_token:
                    delta = asm.add(tid)
            if asm.stopped:
                rs.close()                       # a stop string: end it here
                yield delta, "stop", n
                return
            if ev.finished:
                delta += asm.finish()
                yield delta, ("stop" if ev.finish_reason == "stop" else
                              "length" if ev.finish_reason == "length" else "abort"), n
                return
            if delta:
                yield delta, None, n

    async def pool_capacity_tokens() -> int | None:
        """Tokens the device KV pool holds now (it shrinks and grows at run time)."""
        try:
            st = await aeng.call(lambda e: e.stats())
            return int(st["gpu_blocks_online"]) * int(st["block_size"])
        except (KeyError, TypeError, ValueError):
            return None

    def usage(prompt_len: int, n: int) -> dict:
        return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}

    async def complete(kind: str, body: dict, prompt_ids: list[int], sp: dict, session: str | None):
        chat = kind == "chat"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())
        rs = await start(prompt_ids, sp, session)
        asm = TextAssembler(tokenizer, sp["stop"])
        headers = {"X-Agentcg-Session": session} if session else {}

        if not sp["stream"]:
            finish, n = None, 0
            try:
                async for _delta, finish, n in events(rs, asm):
                    pass
            except Exception as e:
                raise ApiError(f"generation failed: {e}", status=500, type_="server_error") from None
            finally:
                rs.close()
            choice: dict = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": asm.text}
            else:
                choice["text"] = asm.text
            return JSONResponse({"id": rid, "object": obj, "created": now, "model": served,
                                 "choices": [choice], "usage": usage(len(prompt_ids), n)},
                                headers=headers)

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                d: dict = {}
                if first:
                    d["role"] = "assistant"
                if delta is not None:
                    d["content"] = delta
                c = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
                o = "chat.completion.chunk"
            else:
                c = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
                o = "text_completion"
            out = {"id": rid, "object": o, "created": now, "model": served, "choices": [c]}
            if sp["include_usage"]:
                out["usage"] = None
            return out

        async def sse() -> AsyncIterator[str]:
            n = 0
            try:
                if chat:
                    yield _sse(chunk("", None, first=True))
                async for delta, finish, n in events(rs, asm):
                    if finish is None:
                        yield _sse(chunk(delta, None))
                    else:
                        if delta:
                            yield _sse(chunk(delta, None))
                        yield _sse(chunk(None if chat else "", finish))
                if sp["include_usage"]:
                    yield _sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                "created": now, "model": served, "choices": [],
                                "usage": usage(len(prompt_ids), n)})
            except Exception as e:  # noqa: BLE001 - reported in-band, the status is already sent
                log.warning("stream %s failed: %s", rid, e)
                err = ApiError(f"generation failed: {e}", status=500, type_="server_error")
                yield _sse(err.body())
            yield "data: [DONE]\n\n"

        return AbortingStreamingResponse(sse(), rs, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", **headers})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: HttpRequest):
        body = await read_body(req)
        session = session_from_headers(req.headers)
        messages = parse_messages(body)
        check_prompt_bytes(messages_bytes(messages), max_prompt_bytes, "messages")
        # rendering and tokenising take seconds for megabytes of text: not on the event loop
        prompt_ids = await asyncio.to_thread(chat_prompt_ids, tokenizer, messages)
        pool_tokens = None
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            pool_tokens = await pool_capacity_tokens()
        sp = parse_sampling(body, chat=True, prompt_len=len(prompt_ids), max_model_len=max_model_len,
                            pool_tokens=pool_tokens)
        return await complete("chat", body, prompt_ids, sp, session)

    @app.post("/v1/completions")
    async def completions(req: HttpRequest):
        body = await read_body(req)
        session = session_from_headers(req.headers)
        prompt = prompt_input(body, vocab_size, max_prompt_bytes)
        ids = await asyncio.to_thread(completion_prompt_ids, tokenizer, prompt)
        sp = parse_sampling(body, chat=False, prompt_len=len(ids), max_model_len=max_model_len)
        return await complete("completion", body, ids, sp, session)

    @app.get("/v1/models")
    async def models():
        card = {"id": served, "object": "model", "created": created, "owned_by": "agentcg"}
        if max_model_len is not None:
            card["max_model_len"] = max_model_len
        card["chat_template"] = getattr(tokenizer, "chat_template_name", "builtin")
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        if not aeng.running:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/agentcg/stats")
    async def stats():
        try:
            return await aeng.stats()
        except EngineClosed as e:
            raise ApiError(str(e), status=503, type_="server_error") from None

    return app


def _engine_max_len(engine: Any) -> int | None:
    model = getattr(engine, "model", None)
    for obj, name in ((engine, "max_model_len"), (getattr(model, "shape", None), "max_positions")):
        v = getattr(obj, name, None) if obj is not None else None
        if isinstance(v, int) and v > 0:
            return v
    return None


def _end_token_ids(engine: Any) -> tuple[int, ...]:
    """The tokens that end an answer (not text): the engine's, else the tokenizer's EOS."""
    ids = getattr(engine, "stop_token_ids", None)
    if ids is not None:
        return tuple(ids)
    eos = getattr(engine.tokenizer, "eos_token_id", None)
    return (eos,) if eos is not None else ()


def _vocab_size(engine: Any) -> int | None:
    for obj in (getattr(getattr(engine, "model", None), "shape", None), engine.tokenizer):
        v = getattr(obj, "vocab_size", None) if obj is not None else None
        if isinstance(v, int) and v > 0:
            return v
    return None
