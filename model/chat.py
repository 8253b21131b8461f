"""Chat messages rendered with the model's own template, exactly as transformers renders them.

A model's ``tokenizer_config.json`` carries its chat template (Jinja2). Every tier renders a
conversation with this module, so the cloud tier, every edge node and the router turn the same
messages into the same prompt text for the same model version. The Jinja environment is the one
transformers' ``apply_chat_template`` builds (sandboxed, ``trim_blocks``/``lstrip_blocks``, loop
controls, ``tojson``, ``raise_exception``, ``strftime_now``), so a template written for
transformers renders here to the same string.

The rendered text already holds the template's special tokens (``<|im_start|>``, or
``{{ bos_token }}`` where the template starts with one), so it is tokenized without adding BOS,
as transformers does. Edge nodes import this without torch: Jinja2 and the stdlib only.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.errors import InvalidRequest
from core.request import ChatMessage

# A template's own error message (e.g. "Conversation roles must alternate") is the user's to
# read, bounded like every message Tandem returns.
_MAX_ERROR_CHARS = 300


class ChatTemplate:
    """One compiled chat template with the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str | None]) -> None:
        self.source = source
        self._template = _compile(source)
        self._special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages``; ``InvalidRequest`` if the template refuses them."""
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self._special_tokens,
            )
        except jinja2.TemplateError as e:
            raise InvalidRequest(
                f"the model's chat template refused these messages: {str(e)[:_MAX_ERROR_CHARS]}"
            ) from None


def template_source(config: dict[str, Any]) -> str | None:
    """The chat template of a ``tokenizer_config.json`` (its "default" one if it names several)."""
    value = config.get("chat_template")
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


class _AssistantTracker(jinja2.ext.Extension):
    # transformers' {% generation %} block marks assistant tokens for training masks; rendering
    # ignores the mark and keeps the body.
    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it an instance attribute)

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' (and so every model's) does not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_AssistantTracker, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the model's chat template does not compile: {e}") from e
