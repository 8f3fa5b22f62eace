"""Chat templates: messages -> prompt text, rendered the way Hugging Face renders them.

The model's own Jinja template (from tokenizer_config.json, chat_template.jinja or the .ef meta)
runs in a sandboxed, immutable Jinja environment with trim_blocks and lstrip_blocks, the
loopcontrols extension and a `{% generation %}` block (rendered as its body), plus what HF
templates expect: `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that does not
escape HTML, `bos_token` / `eos_token` strings, `messages`, `tools`, `documents` and
`add_generation_prompt`.

Models without a template get FALLBACK_TEMPLATE, ChatML:
    <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n
Its end marker "<|im_end|>" is then also a stop string (`ChatTemplate.stop_strings`) because
such a model may have no special token for it.
"""
from __future__ import annotations

import json
from datetime import datetime

from .errors import EfError, FormatError

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool", "developer")


def _environment():
    """The Jinja environment HF templates are written against (built once, lazily)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here
        it renders its body unchanged, as it does in HF when masks are not requested."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENV = None


def environment():
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    return _ENV


def check_messages(messages) -> list[dict]:
    """Messages as a list of {"role": str, "content": str | list, ...}; EfError otherwise."""
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)):
        raise EfError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise EfError("messages is empty: give at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise EfError(f"message {i} must be a dict with a 'role' string, got {m!r:.80}")
        if "content" in m and not isinstance(m["content"], (str, list, type(None))):
            raise EfError(f"message {i}: 'content' must be text, got {type(m['content']).__name__}")
        out.append(dict(m))
    return out


class ChatTemplate:
    """A compiled chat template. `source` is a template string, HF's named templates
    {name: template} (uses "default", or "tool_use" when tools are given) or None (fallback)."""

    def __init__(self, source=None, *, bos_token: str | None = None, eos_token: str | None = None,
                 where: str = "model"):
        self.where = where
        self.named = source if isinstance(source, dict) else None
        self.is_fallback = not source
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self._compiled: dict[str, object] = {}
        if self.named is not None and "default" not in self.named:
            raise FormatError(f"{where}: named chat templates {sorted(self.named)} have no 'default'")
        self.source = FALLBACK_TEMPLATE if self.is_fallback else source
        self._compile(self._pick(None))

    @property
    def stop_strings(self) -> tuple:
        return ("<|im_end|>",) if self.is_fallback else ()

    def _pick(self, tools) -> str:
        if self.named is None:
            return self.source
        return self.named.get("tool_use") if tools and "tool_use" in self.named else self.named["default"]

    def _compile(self, text: str):
        if text not in self._compiled:
            import jinja2
            try:
                self._compiled[text] = environment().from_string(text)
            except jinja2.TemplateSyntaxError as e:
                raise FormatError(f"{self.where}: chat template does not compile "
                                  f"(line {e.lineno}: {e.message})") from None
        return self._compiled[text]

    def render(self, messages, *, add_generation_prompt: bool = True, tools=None, documents=None,
               **extra) -> str:
        """The prompt text for `messages` (plus any template variables in `extra`, such as
        enable_thinking=False)."""
        import jinja2
        msgs = check_messages(messages)
        template = self._compile(self._pick(tools))
        values = dict(bos_token=self.bos_token, eos_token=self.eos_token)
        values.update(extra)
        try:
            return template.render(messages=msgs, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **values)
        except jinja2.TemplateError as e:
            raise EfError(f"chat template of {self.where} rejected the conversation: {e}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise EfError(f"chat template of {self.where} failed on these messages ({type(e).__name__}: {e})") from None
