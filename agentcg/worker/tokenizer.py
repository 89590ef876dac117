"""Tokenizers: a checkpoint's tokenizer.json through `tokenizers`, or bytes.

Both offer encode(str) -> list[int], decode(list[int]) -> str, eos_token_id,
bos_token_id, vocab_size, apply_chat_template(messages) -> str and
chat_template_name. A checkpoint's own chat template (chat_template.py), when
it has one, is set as `chat_template` and renders the chat; otherwise a
built-in format does.
"""
from __future__ import annotations

import json
from pathlib import Path

from agentcg.worker.chat_template import ChatTemplate, load_chat_template


def _render_chat(messages: list[dict], header: str, end: str) -> str:
    parts = []
    for m in messages:
        role = m.get("role", "user")
        content = m.get("content", "")
        if isinstance(content, list):      # OpenAI content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(header.format(role=role) + str(content) + end)
    parts.append(header.format(role="assistant"))
    return "".join(parts)


def _template_name(template: ChatTemplate | None, builtin: str) -> str:
    """What /v1/models reports: "checkpoint:<file>" or "builtin:<format>"."""
    return f"checkpoint:{template.source}" if template is not None else f"builtin:{builtin}"


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; 256 = BOS, 257 = EOS, 258 = PAD.

    A checkpoint without tokenizer.json passes its own BOS/EOS ids (or None):
    the model was trained to end on those, not on 257."""

    pad_token_id = 258
    vocab_size = 259

    def __init__(self, eos_token_id: int | None = 257, bos_token_id: int | None = 256) -> None:
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    chat_template: ChatTemplate | None = None

    @property
    def chat_template_name(self) -> str:
        return _template_name(self.chat_template, "roles")

    def apply_chat_template(self, messages: list[dict]) -> str:
        if self.chat_template is not None:
            return self.chat_template.render(messages)
        return _render_chat(messages, "<|{role}|>\n", "\n")


class HFTokenizer:
    """tokenizer.json of a checkpoint directory, via the `tokenizers` package."""

    def __init__(self, directory: Path, eos_token_id: int | None = None,
                 bos_token_id: int | None = None) -> None:
        from tokenizers import Tokenizer  # optional dependency, only for checkpoints

        self._tok = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        cfg_path = Path(directory) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

        def tok_id(key: str) -> int | None:
            val = cfg.get(key)
            if isinstance(val, dict):
                val = val.get("content")
            return self._tok.token_to_id(val) if isinstance(val, str) else None

        self.eos_token_id = tok_id("eos_token") if tok_id("eos_token") is not None else eos_token_id
        self.bos_token_id = tok_id("bos_token") if tok_id("bos_token") is not None else bos_token_id
        self._llama3 = self._tok.token_to_id("<|start_header_id|>") is not None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    chat_template: ChatTemplate | None = None

    @property
    def chat_template_name(self) -> str:
        return _template_name(self.chat_template, "llama3" if self._llama3 else "roles")

    def apply_chat_template(self, messages: list[dict]) -> str:
        if self.chat_template is not None:
            return self.chat_template.render(messages)
        if self._llama3:
            return _render_chat(messages, "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>")
        return _render_chat(messages, "<|{role}|>\n", "\n")


def load_tokenizer(directory: Path | None, eos_token_id: int | None = None,
                   bos_token_id: int | None = None):
    if directory is None:
        return ByteTokenizer()
    if (Path(directory) / "tokenizer.json").exists():
        tok: HFTokenizer | ByteTokenizer = HFTokenizer(Path(directory), eos_token_id, bos_token_id)
    else:
        tok = ByteTokenizer(eos_token_id, bos_token_id)
    tok.chat_template = load_chat_template(Path(directory))
    return tok
