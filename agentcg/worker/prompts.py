"""Prompts of API requests: validation, size limit, chat rendering, token ids.

Everything here that tokenises or renders is plain blocking code; the server
runs it off the event loop (a prompt of megabytes takes seconds), after the
size check, which is cheap and runs first.
"""
from __future__ import annotations

from typing import Any

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_PROMPT_BYTES = 8 * 1024 * 1024      # UTF-8 bytes of prompt text per request (--max-prompt-bytes)


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type_
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."

def _message_text(i: int, msg: Any) -> dict:
    if not isinstance(msg, dict):
        raise ApiError(f"messages[{i}]: expected an object, got {_short(msg)}", param=f"messages[{i}]")
    role = msg.get("role")
    if role not in CHAT_ROLES:
        raise ApiError(f"messages[{i}].role: expected one of {', '.join(CHAT_ROLES)}, got {role!r}",
                       param=f"messages[{i}].role")
    content = msg.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ApiError(f"messages[{i}].content[{j}]: only text parts are supported, got {_short(part)}",
                               param=f"messages[{i}].content")
        content = "".join(parts)
    elif not isinstance(content, str):
        raise ApiError(f"messages[{i}].content: expected a string or a list of text parts, "
                       f"got {_short(content)}", param=f"messages[{i}].content")
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(f"messages: expected a non-empty list of messages, got {_short(msgs)}",
                       param="messages")
    return [_message_text(i, m) for i, m in enumerate(msgs)]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt text, starting with the model's BOS token when it has one."""
    if getattr(tokenizer, "bos_token_id", None) is not None:
        try:
            return list(tokenizer.encode(text, add_bos=True))
        except TypeError:
            pass
    return list(tokenizer.encode(text))


def check_prompt_bytes(text_bytes: int, limit_bytes: int | None, param: str) -> None:
    """Refuse a prompt over the size limit before anything tokenises it."""
    if limit_bytes is not None and text_bytes > limit_bytes:
        raise ApiError(f"{param}: the prompt text is {text_bytes} bytes; the limit is {limit_bytes} bytes "
                       f"(--max-prompt-bytes)", param=param, status=413, code="prompt_too_large")


def messages_bytes(messages: list[dict]) -> int:
    return sum(len(m["content"].encode("utf-8")) for m in messages)


def prompt_input(body: dict, vocab_size: int | None, limit_bytes: int | None = None) -> str | list[int]:
    """The validated `prompt` of a completion request: a text (size-checked) or token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                              # a batch of one
    if isinstance(p, str):
        check_prompt_bytes(len(p.encode("utf-8")), limit_bytes, "prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad = [t for t in p if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise ApiError(f"prompt: token id {bad[0]} is outside the vocabulary of {vocab_size}", param="prompt")
        return list(p)
    if isinstance(p, list) and len(p) > 1:
        raise ApiError(f"prompt: a batch of {len(p)} prompts is not supported; send one request per prompt",
                       param="prompt")
    raise ApiError(f"prompt: expected a string or a list of token ids, got {_short(p)}", param="prompt")


def completion_prompt_ids(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """Token ids of a validated prompt (blocking: tokenises a text)."""
    ids = encode_text(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ApiError("prompt: encodes to no tokens", param="prompt")
    return ids


def parse_prompt(body: dict, tokenizer: Any, vocab_size: int | None) -> list[int]:
    return completion_prompt_ids(tokenizer, prompt_input(body, vocab_size))


def chat_prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of a chat (blocking: renders and tokenises).

    A checkpoint's own chat template writes its special tokens (BOS included)
    itself, so its text is encoded as is, like transformers does; the built-in
    formats get the model's BOS in front."""
    from agentcg.worker.chat_template import ChatTemplateError

    try:
        rendered = tokenizer.apply_chat_template(messages)
    except ChatTemplateError as e:
        raise ApiError(f"messages: the model's chat template refused them: {e}", param="messages") from None
    if getattr(tokenizer, "chat_template", None) is not None:
        return list(tokenizer.encode(rendered))
    return encode_text(tokenizer, rendered)
