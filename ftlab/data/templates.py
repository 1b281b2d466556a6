"""Templates: how a record becomes the text the model reads.

- Instruction records use a prompt template (Alpaca by default, or a format string from
  ``data.template``); the loss is taken on what follows the prompt. ``data.template=chat``
  renders them instead as a user turn and an assistant turn through the chat template below.
- Chat records are rendered by the model's own chat template (the Jinja template shipped with
  its tokenizer; SmolLM2 has a ChatML one), or by ``data.chat_template`` when the model has
  none. The assistant turns are found by rendering the conversation one turn at a time, so any
  template that renders conversations incrementally works, not only ChatML.
"""

from __future__ import annotations

from ftlab.errors import ConfigError

ALPACA = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

# ChatML (the format of SmolLM2 and Qwen), for models whose tokenizer has no template.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"chatml": CHATML}


# data.template=chat: instruction records rendered by the model's chat template.
CHAT = "chat"


def instruction_messages(record: dict[str, str]) -> list[dict[str, str]]:
    """An instruction record as a conversation: the user asks (the instruction, then a blank
    line and the input if there is one) and the assistant answers with the output."""
    question = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": record["output"]}]


def render_prompt(record: dict[str, str], template: str = "alpaca") -> str:
    """The prompt part of an instruction record; the loss is taken on what follows it."""
    if template == "alpaca":
        return (ALPACA_WITH_INPUT if record.get("input") else ALPACA).format(**record)
    if "{instruction}" not in template:
        raise ValueError(f"unknown template {template!r}")
    # A custom format string: {instruction} and {input}; a missing input renders as "".
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def resolve_chat_template(tokenizer, configured: str | None,
                          needed_by: str = "data.format=chat") -> tuple[str, str]:
    """``(template, where it came from)``: the model's own, else ``data.chat_template``."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if own:
        return own, "the model's own chat template"
    if configured:
        return CHAT_TEMPLATES.get(configured, configured), f"data.chat_template ({configured[:40]!r})"
    raise ConfigError(f"{needed_by}: the model's tokenizer has no chat template; set "
                      "data.chat_template=chatml or to a Jinja template string")


def check_chat_template(configured: str | None) -> None:
    """Compile a configured Jinja template now, before any weights load."""
    if not configured or configured in CHAT_TEMPLATES:
        return
    try:
        import jinja2

        jinja2.Environment().parse(configured)
    except Exception as err:  # noqa: BLE001  jinja2.TemplateSyntaxError and friends
        raise ConfigError(f"data.chat_template is not a valid Jinja template: {err}") from None


def render_chat(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def chat_segments(tokenizer, template: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, is_assistant_turn)`` pieces.

    For assistant message i: render messages[:i] with the generation prompt (what the model
    sees before it answers) and messages[:i+1]; the difference is the answer as the template
    writes it, end-of-turn token included. Everything else is prompt.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, template, messages[:i], add_generation_prompt=True) if i else ""
        after = render_chat(tokenizer, template, messages[: i + 1], add_generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise ConfigError("the chat template does not render a conversation turn by turn "
                              "(an earlier turn changes when a later one is added), so the "
                              "assistant turns cannot be located; set data.train_on_prompt=true "
                              "or use another template")
        if len(before) > len(done):
            segments.append((before[len(done):], False))
        segments.append((after[len(before):], True))
        done = after
    full = render_chat(tokenizer, template, messages, add_generation_prompt=False)
    if not full.startswith(done):
        raise ConfigError("the chat template does not render a conversation turn by turn")
    if len(full) > len(done):
        segments.append((full[len(done):], False))
    return segments
