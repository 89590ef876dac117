"""A checkpoint's chat template renders as transformers renders it.

Each case writes a small byte-level BPE tokenizer.json (trained here with
`tokenizers`, nothing downloaded) and a tokenizer_config.json carrying a chat
template, then compares the worker's rendering with transformers'
PreTrainedTokenizerFast.apply_chat_template(..., tokenize=False,
add_generation_prompt=True), and the token ids with its tokenize=True.
"""
from __future__ import annotations

import json

import pytest
from hf_checkpoints import build_llama

from agentcg.worker.chat_template import ChatTemplateError
from agentcg.worker.prompts import ApiError, chat_prompt_ids
from agentcg.worker.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<s>", "</s>", "<unk>", "<|start|>", "<|end|>"]

# Llama-3 shaped: bos_token, a loop with loop.first, whitespace control, raise_exception
LLAMA3_LIKE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|start|>' + message['role'] + '\n\n' + message['content'] | trim + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant\n\n' }}{% endif %}"
)

# Zephyr shaped, written over several lines: trim_blocks / lstrip_blocks decide its whitespace
MULTILINE = """{% for message in messages %}
    {% if message['role'] == 'user' %}
        {{ '<|user|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
        {{ '<|system|>\n' + message['content'] + eos_token }}
    {% else %}
        {{ '<|assistant|>\n' + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
        {{ '<|assistant|>' }}
    {% endif %}
{% endfor %}
{{ {'n': messages | length, 'note': '<é>'} | tojson }}"""

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "  What is 2 + 2?  "},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3? <é>"}]


def _write_tokenizer(directory, chat_template) -> None:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([m["content"] for m in MESSAGES] * 5 + ["assistant user system"] * 5, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
           "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True}, "unk_token": "<unk>",
           "chat_template": chat_template}
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))


def _hf(directory):
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))


def _hf_ids(hf, messages) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


@pytest.mark.parametrize("template", [LLAMA3_LIKE, MULTILINE], ids=["llama3-like", "multiline"])
def test_rendering_and_ids_match_transformers(tmp_path, template):
    _write_tokenizer(tmp_path, template)
    ours, hf = load_tokenizer(tmp_path), _hf(tmp_path)
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES) == expected
    assert chat_prompt_ids(ours, MESSAGES) == _hf_ids(hf, MESSAGES)
    assert ours.chat_template_name == "checkpoint:tokenizer_config.json"


def test_default_of_named_templates_is_used(tmp_path):
    named = [{"name": "tool_use", "template": "TOOLS {{ messages | length }}"},
             {"name": "default", "template": LLAMA3_LIKE}]
    _write_tokenizer(tmp_path, named)
    ours, hf = load_tokenizer(tmp_path), _hf(tmp_path)
    assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)


def test_named_templates_without_default_are_refused(tmp_path):
    _write_tokenizer(tmp_path, [{"name": "tool_use", "template": "x"}])
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: chat_template lists templates \['tool_use'\]"):
        load_tokenizer(tmp_path)


def test_chat_template_jinja_file_is_read(tmp_path):
    _write_tokenizer(tmp_path, None)
    (tmp_path / "chat_template.jinja").write_text(MULTILINE)
    ours, hf = load_tokenizer(tmp_path), _hf(tmp_path)
    assert ours.chat_template_name == "checkpoint:chat_template.jinja"
    assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)


def test_raise_exception_is_a_400_naming_the_message(tmp_path):
    _write_tokenizer(tmp_path, LLAMA3_LIKE)
    ours = load_tokenizer(tmp_path)
    with pytest.raises(ChatTemplateError, match="Unsupported role: tool"):
        ours.apply_chat_template([{"role": "tool", "content": "42"}])
    with pytest.raises(ApiError, match="chat template refused them: Unsupported role: tool") as e:
        chat_prompt_ids(ours, [{"role": "tool", "content": "42"}])
    assert e.value.status == 400 and e.value.param == "messages"


def test_sandbox_blocks_attribute_escapes(tmp_path):
    _write_tokenizer(tmp_path, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        load_tokenizer(tmp_path).apply_chat_template(MESSAGES)


def test_without_template_the_builtin_format_stays(tmp_path):
    _write_tokenizer(tmp_path, None)
    ours = load_tokenizer(tmp_path)
    assert ours.chat_template is None and ours.chat_template_name == "builtin:roles"
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>\nhi\n<|assistant|>\n"


def test_served_chat_uses_the_template_and_models_says_so(tmp_path):
    openai = pytest.importorskip("openai")
    from worker_harness import served

    ckpt = tmp_path / "ckpt"
    _write_tokenizer(ckpt, LLAMA3_LIKE)
    build_llama(ckpt, vocab_size=load_tokenizer(ckpt).vocab_size)
    with served(tmp_path, model=str(ckpt), measure=False, gpu_blocks=32) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused")
        card = client.models.list().data[0]
        r = client.chat.completions.create(model=srv.model, messages=MESSAGES, max_tokens=2, temperature=0)
    assert card.model_extra["chat_template"] == "checkpoint:tokenizer_config.json"
    assert r.usage.prompt_tokens == len(_hf_ids(_hf(ckpt), MESSAGES))
