"""Chat templates: how a (prompt, response) example becomes the text the model reads.

An SFT example is a conversation whose last turn is the assistant's answer. The model is trained
to produce that answer (the *response*) given everything before it (the *prompt*), and at
inference time it is handed the same prompt text. A chat template fixes that text: where each
turn starts and ends, which control tokens mark the roles, and the "generation prompt" (the
header of the assistant turn that the model continues from). Training and sampling must render
prompts identically, so both call :func:`render_prompt` / :func:`encode_prompt` here.

Records (:func:`split_example`): a JSON object with

* ``prompt`` and ``response`` strings (and optionally a ``system`` string), or
* ``messages``: a list of ``{"role": str, "content": str}`` whose last turn has role
  ``assistant``; the turns before it are the prompt, its content is the response.

Templates (:func:`resolve_template`, the ``--chat-template`` option):

* ``auto`` (default): the tokenizer's own template when it has one, else ``default``. A
  Hugging Face tokenizer folder carries it as ``chat_template`` in ``tokenizer_config.json``
  (or as ``chat_template.jinja``), e.g. LLaDA-8B-Instruct's;
* ``default``: the plain template :data:`DEFAULT_TEMPLATE`::

      <|user|>
      What is 2+2?
      <|assistant|>
      4

  (``<|role|>`` then a newline before each turn's content, a newline between turns). Its markers
  are ordinary text, not special tokens, so it works with any tokenizer whose alphabet holds
  ``<|>``, the role names and a newline (a char vocabulary may not: then use ``none`` or a file);
* ``none``: no template: the prompt is the turns' contents joined by newlines, the response is the
  text as it is (tasks such as Sudoku, whose prompt and answer are plain strings);
* a path to a ``.jinja`` file: a Hugging Face style template.

Jinja templates are rendered as transformers' ``apply_chat_template`` renders them (same sandboxed
environment, same globals; :func:`_jinja_environment` says why it is re-created here); the
response is what the template adds after the prompt when the assistant turn is appended (for
LLaDA: the answer followed by ``<|eot_id|>``). A template's control tokens (``<|eot_id|>``, the
BOS) are written as text and must become their special ids, while a user's text must never turn
into a control token: :func:`encode_rendered` reads special-token strings as special ids only for
jinja templates, and the SFT writer refuses a record whose text contains one.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

from ..cli_errors import UserInputError

# The plain template: "<|role|>\n" + content for each turn, "\n" between turns, and "\n<|assistant|>\n"
# as the generation prompt. The last turn gets no trailing newline, so the response is exactly the
# assistant's content (the EOS that follows it is added by the SFT layout).
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\n' }}{% endif %}<|assistant|>\n{% endif %}"
)  # ({{ '\n' }}: trim_blocks would drop a newline written right after a block tag)
NAMED_TEMPLATES = ("auto", "default", "none")
TEMPLATE_HINT = "--chat-template takes auto, default, none or a .jinja file"
RECORD_HINT = ('a record is {"prompt": str, "response": str} or {"messages": [{"role": str, "content": str}, ...]} '
               'ending with an assistant turn')
# tokenizer_config.json entries that templates read (transformers passes its special tokens by name)
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved template: ``name`` (``tokenizer``, ``default``, ``none`` or the file), the jinja
    ``source`` (None for ``none``), the special-token strings the template may read (``bos_token``
    ...), and whether its output holds control tokens written as text (``control_tokens``: the
    tokenizer's own or a file's template; the default and ``none`` write plain text only)."""

    name: str
    source: Optional[str]
    special_tokens: tuple = ()
    control_tokens: bool = False

    def describe(self) -> dict:
        """What the SFT metadata records: the name and a hash of the text (the text itself too)."""
        digest = hashlib.sha256((self.source or "").encode()).hexdigest()[:16] if self.source else None
        return {"name": self.name, "sha256": digest, "source": self.source}


# --- records -------------------------------------------------------------------------------------

def _bad(where: Optional[str], what: str) -> UserInputError:
    return UserInputError(f"{where + ': ' if where else ''}{what}; {RECORD_HINT}")


def split_example(record: dict, where: Optional[str] = None) -> tuple[list[dict], str]:
    """(the messages before the last assistant turn, the last assistant turn's content) of a
    record (module docstring). ``where`` (e.g. ``"data.jsonl line 3"``) starts the one-line
    UserInputError of a bad record: missing or conflicting fields, a non-string field, a message
    that is not a role/content object, or a conversation that does not end with the assistant."""
    if not isinstance(record, dict):
        raise _bad(where, f"the record is a JSON {type(record).__name__}, not an object")
    has_pair = "prompt" in record or "response" in record
    if has_pair and "messages" in record:
        raise _bad(where, "the record has both 'messages' and 'prompt'/'response': give one form")
    if has_pair:
        for key in ("prompt", "response") + (("system",) if "system" in record else ()):
            if key not in record:
                raise _bad(where, f"the record has no {key!r} field")
            if not isinstance(record[key], str):
                raise _bad(where, f"{key!r} is a JSON {type(record[key]).__name__}, not a string")
        system = [{"role": "system", "content": record["system"]}] if "system" in record else []
        return system + [{"role": "user", "content": record["prompt"]}], record["response"]
    if "messages" not in record:
        raise _bad(where, f"the record has neither 'prompt'/'response' nor 'messages' (keys: {sorted(record)})")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise _bad(where, "'messages' must be a non-empty list")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _bad(where, f"messages[{i}] is not an object with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                raise _bad(where, f"messages[{i}].{key} is a JSON {type(message[key]).__name__}, not a string")
        checked.append({"role": message["role"], "content": message["content"]})
    if checked[-1]["role"] != "assistant":
        raise _bad(where, f"the last message has role {checked[-1]['role']!r}, not 'assistant' (the response)")
    return checked[:-1], checked[-1]["content"]


# --- templates -----------------------------------------------------------------------------------

def tokenizer_folder(tokenizer) -> Optional[str]:
    """The folder of a tokenizer built from a file or a Hugging Face folder (where
    ``tokenizer_config.json`` would be), or None."""
    path = getattr(tokenizer, "path", None)
    if not path:
        return None
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def _token_string(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _own_template(folder: Optional[str]) -> tuple[Optional[str], dict]:
    """(the chat template of a Hugging Face tokenizer folder or None, its special-token strings).
    transformers reads ``chat_template.jinja`` first, then ``chat_template`` in
    ``tokenizer_config.json`` (a string, or a list of named templates of which ``default`` is used)."""
    if folder is None:
        return None, {}
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
        from ..cli_errors import read_json

        config = read_json(config_path, "a tokenizer config")
    specials = {key: _token_string(config.get(key)) for key in _SPECIAL_TOKEN_KEYS}
    specials = {key: value for key, value in specials.items() if value is not None}
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read(), specials
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise UserInputError(f"{config_path}: 'chat_template' is not a string; pass --chat-template default, none "
                             f"or a .jinja file")
    return template, specials


def resolve_template(template, tokenizer) -> ChatTemplate:
    """The :class:`ChatTemplate` that ``template`` names for ``tokenizer``: None or ``auto``,
    ``default``, ``none``, a ``.jinja`` file, or a ChatTemplate (returned as it is)."""
    if isinstance(template, ChatTemplate):
        return template
    name = "auto" if template is None else template
    if not isinstance(name, str) or not name:
        raise UserInputError(f"chat template {template!r}: {TEMPLATE_HINT}")
    if name == "none":
        return ChatTemplate("none", None)
    folder = tokenizer_folder(tokenizer)
    own, specials = _own_template(folder) if name != "default" else (None, {})
    if name == "default" or (name == "auto" and own is None):
        return ChatTemplate("default", DEFAULT_TEMPLATE)
    if name == "auto":
        return ChatTemplate("tokenizer", own, tuple(sorted(specials.items())), control_tokens=True)
    if not os.path.isfile(name):
        raise UserInputError(f"chat template {name} not found; {TEMPLATE_HINT}")
    with open(name, encoding="utf-8") as f:
        source = f.read()
    _compiled(source, name)  # a syntax error names the file now
    specials = _own_template(folder)[1]
    return ChatTemplate(name, source, tuple(sorted(specials.items())), control_tokens=True)


def _jinja_environment():
    """The sandboxed environment transformers renders chat templates in (transformers 4.45-5.x,
    ``utils/chat_template_utils._compile_jinja_template``): trim_blocks, lstrip_blocks, loop
    controls, ``raise_exception``, a JSON ``tojson`` and ``strftime_now``. Re-created with jinja2
    (a torch dependency) because transformers is optional here and keeps this function private;
    tests/unit/test_sft_data.py checks that both render a template identically."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=16)
def _compiled(source: str, name: str):
    import jinja2

    try:
        return _jinja_environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise UserInputError(f"chat template {name} is not a valid jinja template (line {err.lineno}: "
                             f"{err.message})") from None


def _render(t: ChatTemplate, messages: list[dict], add_generation_prompt: bool) -> str:
    import jinja2

    try:
        return _compiled(t.source, t.name).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  **dict(t.special_tokens))
    except jinja2.exceptions.TemplateError as err:  # raise_exception() of the template, or a bad construct
        raise UserInputError(f"chat template {t.name} refused the conversation ({err})") from None


def render_prompt(messages: list[dict], tokenizer, template=None) -> str:
    """The text the model sees before its response: the conversation ``messages`` rendered by the
    template (see :func:`resolve_template`) with the generation prompt (the assistant header)."""
    t = resolve_template(template, tokenizer)
    if t.source is None:
        return "\n".join(m["content"] for m in messages)
    return _render(t, messages, add_generation_prompt=True)


def render_response(text: str, tokenizer, template=None, messages: Optional[list[dict]] = None) -> str:
    """The text of the response as the template writes it after the prompt: what rendering the
    conversation with the assistant turn ``text`` appended adds to :func:`render_prompt`'s text
    (LLaDA's template: ``text`` + ``<|eot_id|>``; the default and ``none``: ``text``). A template
    whose full conversation does not start with its prompt cannot be split and is refused."""
    t = resolve_template(template, tokenizer)
    if t.source is None:
        return text
    messages = list(messages or [])
    prompt = _render(t, messages, add_generation_prompt=True)
    full = _render(t, messages + [{"role": "assistant", "content": text}], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise UserInputError(f"chat template {t.name} renders a conversation that does not start with its own "
                             f"prompt (generation prompt included), so prompt and response cannot be told apart; "
                             f"use --chat-template default or a template whose assistant turn extends the prompt")
    return full[len(prompt):]


def special_token_strings(tokenizer) -> tuple[str, ...]:
    """The strings of the tokenizer's special tokens (empty for tokenizers whose specials cannot be
    written as text, such as the char tokenizer)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return ()
    return tuple(tok.content for tok in backend.get_added_tokens_decoder().values() if tok.special)


def encode_rendered(text: str, tokenizer, template=None) -> list[int]:
    """Token ids of text that ``template`` rendered: special-token strings written by a jinja
    template (``<|eot_id|>``) become their ids; with the default template and ``none`` the text is
    plain and is encoded as raw text (special-token strings stay ordinary characters)."""
    t = resolve_template(template, tokenizer)
    if t.control_tokens and hasattr(tokenizer, "encode_with_special_tokens"):
        return tokenizer.encode_with_special_tokens(text)
    return tokenizer.encode(text)


def encode_prompt(messages: list[dict], tokenizer, template=None) -> list[int]:
    """The prompt token ids a model fine-tuned with ``template`` expects: what the SFT data holds
    before the response (use this at sampling and evaluation time)."""
    t = resolve_template(template, tokenizer)
    return encode_rendered(render_prompt(messages, tokenizer, t), tokenizer, t)
