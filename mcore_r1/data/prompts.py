"""Prompt building: optional format prompt (jinja) and system prompt, then the chat template.

A format prompt is a jinja file that receives the user's text as ``content`` (with ``<image>``
placeholders where images sit) and returns the wrapped text, e.g. "... reason inside <think>
</think> ... answer inside \\boxed{}". Shipped ones live in ``mcore_r1/data/prompts/`` and are
named without the suffix (``math``, ``r1v``, ``confidence``); anything else is a file path.

The template is applied to the *last user message* only, then the text is split at the
placeholders again, so image positions survive whatever the template does around them. The
chat template is always the model's own (tokenizer or processor), with the generation prompt
appended: the rollout engine and the trainer see byte-identical prompt text.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import jinja2

from mcore_r1.data.formats import Example, flatten_user_text, last_user_index, text_to_parts

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


def shipped_format_prompts() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.jinja"))


@lru_cache(maxsize=16)
def load_format_prompt(name_or_path: str) -> jinja2.Template:
    """A shipped format prompt by name, or a jinja file by path."""
    path = PROMPTS_DIR / f"{name_or_path}.jinja"
    if not path.is_file():
        path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"format prompt {name_or_path!r} is neither a shipped prompt "
                                f"({', '.join(shipped_format_prompts())}) nor a file")
    try:
        return jinja2.Template(path.read_text(encoding="utf-8"), undefined=jinja2.StrictUndefined)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"{path} line {err.lineno}: jinja syntax error: {err.message}") from err


def build_messages(example: Example, format_prompt: Optional[str],
                   system_prompt: Optional[str]) -> list[dict]:
    """The conversation the chat template sees, without image payloads."""
    messages = copy.deepcopy(example.messages)
    if format_prompt:
        i = last_user_index(messages)
        if i is not None:
            text = flatten_user_text(messages[i]["content"])
            messages[i]["content"] = text_to_parts(load_format_prompt(format_prompt).render(content=text))
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    for message in messages:
        # Text-only content as a plain string: text models' chat templates often expect one.
        parts = message["content"]
        if isinstance(parts, list) and all(p["type"] == "text" for p in parts):
            message["content"] = "".join(p["text"] for p in parts)
    return messages


def count_image_parts(messages: list[dict]) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list)
               for p in m["content"] if p["type"] == "image")


def render_chat(processor: Any, messages: list[dict]) -> str:
    """Chat-template text with the assistant generation prompt (tokenizer or VL processor)."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
