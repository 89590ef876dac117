"""A checkpoint's own chat template (Jinja2), rendered the way transformers does.

Where it comes from, first found wins:
    chat_template.jinja                 (transformers 5 saves it there)
    tokenizer_config.json "chat_template": a string, or a list of
        {"name": ..., "template": ...} of which the one named "default" is used

The environment matches transformers' `apply_chat_template`: a sandboxed
(immutable) Jinja2 environment with trim_blocks and lstrip_blocks, the
loopcontrols extension, `raise_exception(msg)`, `strftime_now(fmt)`, a
`tojson` filter that does not escape HTML, and as variables `messages`,
`add_generation_prompt`, `tools`/`documents` (None) and the named special
tokens (`bos_token`, `eos_token`, ...) as strings. Templates come with
checkpoints from anywhere, so they run sandboxed.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """The template refused the messages (raise_exception) or failed on them."""


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, text: str, source: str, special_tokens: dict[str, str]) -> None:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{source}: chat template does not parse: {e} (line {e.lineno})") from None
        self.source = source                    # where it came from, e.g. "tokenizer_config.json"
        self.special_tokens = dict(special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except TemplateError as e:
            raise ChatTemplateError(str(e)) from None


def _token_text(val: Any) -> str | None:
    if isinstance(val, dict):           # a serialised AddedToken
        val = val.get("content")
    return val if isinstance(val, str) else None


def special_token_strings(directory: Path) -> dict[str, str]:
    """bos_token, eos_token, ... as strings, from special_tokens_map.json and tokenizer_config.json."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", CONFIG_FILE):
        path = directory / name
        if not path.exists():
            continue
        cfg = json.loads(path.read_text())
        for key in SPECIAL_TOKEN_NAMES:
            text = _token_text(cfg.get(key))
            if text is not None:
                out[key] = text
    return out


def _from_config(path: Path) -> str | None:
    tpl = json.loads(path.read_text()).get("chat_template")
    if tpl is None or isinstance(tpl, str):
        return tpl
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{path}: chat_template lists templates {sorted(map(str, named))} "
                         "but none named 'default'")
    raise ValueError(f"{path}: chat_template must be a string or a list of named templates, "
                     f"got {type(tpl).__name__}")


def load_chat_template(directory: Path | None) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has none."""
    if directory is None:
        return None
    directory = Path(directory)
    text, source = None, None
    if (directory / TEMPLATE_FILE).exists():
        text, source = (directory / TEMPLATE_FILE).read_text(), TEMPLATE_FILE
    elif (directory / CONFIG_FILE).exists():
        text, source = _from_config(directory / CONFIG_FILE), CONFIG_FILE
    if text is None:
        return None
    return ChatTemplate(text, source, special_token_strings(directory))
