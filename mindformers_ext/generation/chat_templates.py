"""Chat templates of the three model families, and ``apply_chat_template`` rendering them the way
Hugging Face ``transformers`` does (same Jinja settings, same variables), so that a prompt built
here is byte-identical to ``tokenizer.apply_chat_template(..., tokenize=False)``.

Templates (Jinja source strings):

* ``DEEPSEEK_CODER_INSTRUCT_TEMPLATE``: the ``chat_template`` of deepseek-coder-{1.3b,6.7b,33b}-instruct
  (tokenizer_config.json on the Hub). A default system prompt is used unless a system message is
  present; user turns are ``### Instruction:\\n{content}\\n``, assistant turns
  ``### Response:\\n{content}\\n<|EOT|>\\n``, the generation prompt is ``### Response:\\n``. Quirk
  kept from the original: a custom system message is followed by no newline.
* ``DEEPSEEK_V2_CHAT_TEMPLATE``: DeepSeek-V2(-Lite)-Chat (also DeepSeek-LLM-Chat and
  DeepSeek-Coder-V2-Instruct): ``<｜begin▁of▁sentence｜>User: {msg}\\n\\nAssistant: {reply}<｜end▁of▁sentence｜>``,
  a system message as ``{content}\\n\\n`` before it, generation prompt ``Assistant:``.
* ``WIZARDCODER_TEMPLATE``: WizardCoder's Alpaca prompt (``prompt_no_input`` of its training and
  inference scripts), ``Below is an instruction ...\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:``,
  assistant replies ``{output}<|endoftext|>`` as in its training targets. WizardCoder ships no chat
  template and was trained single-turn; further turns repeat the Instruction/Response pair after
  a blank line (our convention). A system message replaces the Alpaca preamble.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

__all__ = [
    "DEEPSEEK_CODER_INSTRUCT_TEMPLATE",
    "DEEPSEEK_V2_CHAT_TEMPLATE",
    "WIZARDCODER_TEMPLATE",
    "CHAT_TEMPLATES",
    "SPECIAL_TOKENS",
    "get_chat_template",
    "render_chat_template",
    "apply_chat_template",
]

DEEPSEEK_CODER_SYSTEM_PROMPT = (
    "You are an AI programming assistant, utilizing the Deepseek Coder model, developed by "
    "Deepseek Company, and you only answer questions related to computer science. For politically "
    "sensitive questions, security and privacy issues, and other non-computer science questions, "
    "you will refuse to answer"
)

# Layout (newlines, indentation, whitespace control) as in the official file: it decides the text.
DEEPSEEK_CODER_INSTRUCT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}\n"
    "{% set add_generation_prompt = false %}\n"
    "{% endif %}\n"
    "{%- set ns = namespace(found=false) -%}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message['role'] == 'system' -%}\n"
    "        {%- set ns.found = true -%}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{{bos_token}}{%- if not ns.found -%}\n"
    "{{'" + DEEPSEEK_CODER_SYSTEM_PROMPT + "\\n'}}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'system' %}\n"
    "{{ message['content'] }}\n"
    "    {%- else %}\n"
    "        {%- if message['role'] == 'user' %}\n"
    "{{'### Instruction:\\n' + message['content'] + '\\n'}}\n"
    "        {%- else %}\n"
    "{{'### Response:\\n' + message['content'] + '\\n<|EOT|>\\n'}}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "{{'### Response:'}}\n"
    "{% endif %}"
)

DEEPSEEK_V2_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}"
    "{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

WIZARDCODER_SYSTEM_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)

WIZARDCODER_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "    {%- set system_message = messages[0]['content'] -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set system_message = '" + WIZARDCODER_SYSTEM_PROMPT + "' -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{{- system_message + '\\n\\n' -}}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if message['role'] == 'user' -%}\n"
    "        {{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}\n"
    "    {%- elif message['role'] == 'assistant' -%}\n"
    "        {{- '### Response:' + message['content'] + eos_token + '\\n\\n' -}}\n"
    "    {%- else -%}\n"
    "        {{- raise_exception('WizardCoder chat template: unsupported role ' ~ message['role']"
    " ~ ' (only one leading system message, then user/assistant)') -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{- '### Response:' -}}\n"
    "{%- endif -%}"
)

CHAT_TEMPLATES: Dict[str, str] = {
    "deepseek_coder": DEEPSEEK_CODER_INSTRUCT_TEMPLATE,
    "deepseek_v2": DEEPSEEK_V2_CHAT_TEMPLATE,
    "wizardcoder": WIZARDCODER_TEMPLATE,
}

_ALIASES = {
    "deepseek_coder_instruct": "deepseek_coder",
    "deepseek1_5": "deepseek_coder",
    "deepseek_coder_v1_5": "deepseek_coder",
    "deepseek2": "deepseek_v2",
    "deepseek_v2_chat": "deepseek_v2",
    "deepseek_v2_lite": "deepseek_v2",
    "deepseek_v2_ms": "deepseek_v2",  # DeepseekV2Config.model_type
    "deepseek_llm": "deepseek_v2",
    "deepseek_coder_v2": "deepseek_v2",
    "starcoder": "wizardcoder",
    "alpaca": "wizardcoder",
}

# Special-token strings the templates see when neither a tokenizer nor a config names them.
SPECIAL_TOKENS: Dict[str, Dict[str, str]] = {
    "deepseek_coder": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    "deepseek_v2": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    "wizardcoder": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>"},
}

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token", "additional_special_tokens")


def _family_key(family: str) -> str:
    key = family.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in CHAT_TEMPLATES:
        raise KeyError(f"no chat template for model family {family!r}; known: "
                       f"{sorted(CHAT_TEMPLATES)} and aliases {sorted(_ALIASES)}")
    return key


def get_chat_template(family: str) -> str:
    """Our chat template (Jinja source) for ``family``."""
    return CHAT_TEMPLATES[_family_key(family)]


@lru_cache(maxsize=32)
def _compile(template: str):
    """Compile as transformers does: immutable sandbox, trim_blocks + lstrip_blocks, loop controls,
    ``raise_exception``, ``strftime_now`` and a ``tojson`` that does not escape HTML."""
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as err:  # pragma: no cover - jinja2 comes with transformers/mindformers
        raise ImportError("apply_chat_template needs jinja2>=3.1 (pip install jinja2)") from err

    class _GenerationTag(Extension):
        """Accept ``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker); we only
        render its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def _token_text(value: Any) -> Any:
    """A special token as a string: configs store either a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    if isinstance(value, (list, tuple)):
        return [_token_text(v) for v in value]
    if value is not None and not isinstance(value, str):
        return str(value)  # tokenizers.AddedToken
    return value


def _load_config(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer_config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"tokenizer config not found: {path}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _pick_template(template: Any, where: str) -> Optional[str]:
    """HF allows a list of named templates ``[{"name":..., "template":...}]`` or a dict."""
    if template is None or isinstance(template, str):
        return template or None
    if isinstance(template, Mapping):
        named = dict(template)
    elif isinstance(template, (list, tuple)):
        named = {t["name"]: t["template"] for t in template}
    else:
        raise TypeError(f"{where}: chat_template must be a string, got {type(template).__name__}")
    if "default" not in named:
        raise ValueError(f"{where}: several named chat templates {sorted(named)} and no 'default'")
    return named["default"]


def _source_of(tokenizer_or_config: Any) -> tuple:
    """(chat_template or None, special-token variables, description) of a tokenizer, a config
    dict, or a path to tokenizer_config.json / its directory."""
    if tokenizer_or_config is None:
        return None, {}, "no tokenizer"
    if isinstance(tokenizer_or_config, (str, os.PathLike)):
        where = os.fspath(tokenizer_or_config)
        cfg = _load_config(tokenizer_or_config)
        tokens = {k: _token_text(cfg[k]) for k in _SPECIAL_KEYS if cfg.get(k) is not None}
        return _pick_template(cfg.get("chat_template"), where), tokens, where
    if isinstance(tokenizer_or_config, Mapping):
        cfg = tokenizer_or_config
        tokens = {k: _token_text(cfg[k]) for k in _SPECIAL_KEYS if cfg.get(k) is not None}
        return _pick_template(cfg.get("chat_template"), "tokenizer config"), tokens, "config"
    tok = tokenizer_or_config
    where = type(tok).__name__
    tokens: Dict[str, Any] = {}
    stm = getattr(tok, "special_tokens_map", None)
    if isinstance(stm, Mapping):
        tokens = {k: _token_text(v) for k, v in stm.items() if v is not None}
    else:
        for key in _SPECIAL_KEYS:
            val = getattr(tok, key, None)
            if val is not None:
                tokens[key] = _token_text(val)
    return _pick_template(getattr(tok, "chat_template", None), where), tokens, where


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, "
                        f"got {type(messages).__name__}")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {msg!r}")
        out.append(msg)
    return out


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]],
                         add_generation_prompt: bool = True, **variables: Any) -> str:
    """Render a Jinja chat ``template`` with ``messages``, ``add_generation_prompt`` and extra
    ``variables`` (``bos_token``, ``eos_token``, ...), as transformers'
    ``render_jinja_template``."""
    compiled = _compile(template)
    return compiled.render(messages=_check_messages(messages), tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt, **variables)


def apply_chat_template(messages: Sequence[Mapping[str, Any]], tokenizer_or_config: Any = None,
                        family: Optional[str] = None, add_generation_prompt: bool = True,
                        chat_template: Optional[str] = None, **variables: Any) -> str:
    """The prompt text of a conversation.

    The template is, in order: ``chat_template`` if given; the tokenizer's own ``chat_template``
    (``tokenizer_or_config`` may be a tokenizer object, a tokenizer_config.json dict, a path to that
    file or to its directory); else ours for ``family`` ("deepseek_coder", "deepseek_v2",
    "wizardcoder" and aliases). ``bos_token`` / ``eos_token`` (and the other special tokens) come
    from the tokenizer or config, else from the family's defaults; ``variables`` override them.

    The text starts with BOS where the template writes it (DeepSeek), so encode it with
    ``add_special_tokens=False`` (as HF does after rendering) to avoid a doubled BOS.
    """
    template_src, tokens, where = _source_of(tokenizer_or_config)
    fam = _family_key(family) if family else None
    template = chat_template or template_src
    if template is None:
        if fam is None:
            raise ValueError(f"{where} has no chat_template and no family was given; pass "
                             f"family= one of {sorted(CHAT_TEMPLATES)}")
        template = CHAT_TEMPLATES[fam]
    context: Dict[str, Any] = {}
    if fam is not None:
        context.update(SPECIAL_TOKENS[fam])
    context.update(tokens)
    context.update(variables)
    return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                **context)
