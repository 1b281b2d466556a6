"""The data formats: what a record must hold, and how it becomes token ids and labels.

Each format is a small object with the same four parts, so the data module needs no branches:

- ``record(row)``: validate one raw row (see :mod:`ftlab.data.records`) into a plain dict, or
  raise a :class:`~ftlab.errors.DataError` naming the file, line/row and field. No tokenizer.
- ``encode(record, tokenizer)``: token ids and labels (an :class:`~ftlab.data.encode.Encoded`).
- ``prompt(record)`` / ``reference(record)``: for formats with one reference answer per record
  (``generative``), the text a greedy generation starts from and the answer it is scored on.
- ``fingerprint()``: everything besides records and tokenizer that changes the token ids
  (template, lengths), for the tokenised-data cache.

Formats (``data.format``):

- ``instruction``: ``{instruction, input?, output}`` (Alpaca), loss on ``output`` + <eos>; with
  ``data.template=chat``, rendered as a two-turn conversation by the model's chat template.
- ``chat``: ``{messages: [{role, content}, ...]}`` rendered with the model's chat template,
  loss on every assistant turn (the template's end-of-turn token included).
- ``sharegpt``: ``{conversations: [{from, value}, ...]}`` (roles human/gpt/system), the same
  conversations under ShareGPT's names: mapped to ``chat`` messages, then handled exactly alike.
- ``text``: documents for continued pre-training, cut into ``max_length`` blocks, loss on all.
- ``classification``: ``{text, label}`` for a sequence-classification head.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ftlab.config import DataSettings
from ftlab.data.encode import (Encoded, encode_classification, encode_example, encode_prompt,
                               encode_segments)
from ftlab.data.records import Row
from ftlab.data.templates import (CHAT, check_chat_template, chat_segments, instruction_messages,
                                  render_chat, render_prompt, resolve_chat_template)
from ftlab.errors import DataError

CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's roles (human, gpt, system), and the chat names too, since many ShareGPT-style files
# mix them: as written -> the role the chat template gets.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant", "tool": "tool"}
# How a conversation is written, by format: the keys of each turn and its roles.
CHAT_STYLES = {"chat": ("role", "content", {r: r for r in CHAT_ROLES}),
               "sharegpt": ("from", "value", SHAREGPT_ROLES)}


def _text(row: Row, data: dict, key: str, required: bool = True, at: str | None = None) -> str:
    """A string field: present (if required), a string, not blank. ``at`` names it in errors."""
    value, at = data.get(key), at or key
    if value is None:
        if required:
            raise row.error(at, "missing (a required field)")
        return ""
    if not isinstance(value, str):
        raise row.error(at, f"must be a string, got {type(value).__name__} {_short(value)}")
    if required and not value.strip():
        raise row.error(at, "is empty")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _object(row: Row) -> dict:
    if not isinstance(row.data, dict):
        raise row.error(None, f"expected a record (JSON object), got {type(row.data).__name__} "
                              f"{_short(row.data)}")
    return row.data


@dataclass
class InstructionFormat:
    """Alpaca records. ``data.template=chat`` renders each one as a user turn (instruction,
    then input) and an assistant turn (output) through the model's chat template, as TRL and
    LLaMA-Factory do for instruct models; the loss is then on the assistant turn as the
    template writes it (end-of-turn token included), exactly as for ``chat`` records."""

    settings: DataSettings
    name: str = "instruction"
    generative: bool = True
    _template: tuple[str, str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.settings.template == CHAT:
            check_chat_template(self.settings.chat_template)

    def record(self, row: Row) -> dict[str, str]:
        data, f = _object(row), self.settings.fields
        return {"instruction": _text(row, data, f["instruction"]),
                "input": _text(row, data, f["input"], required=False),
                "output": _text(row, data, f["output"])}

    def template(self, tokenizer) -> tuple[str, str]:
        """The chat template (``data.template=chat`` only) and where it came from."""
        if self._template is None:
            self._template = resolve_chat_template(tokenizer, self.settings.chat_template,
                                                   "data.template=chat")
        return self._template

    def encode(self, record: dict, tokenizer) -> Encoded:
        s = self.settings
        if s.template == CHAT:
            segments = chat_segments(tokenizer, self.template(tokenizer)[0], instruction_messages(record))
            return encode_segments(segments, tokenizer, s.max_length, s.train_on_prompt)
        return encode_example(render_prompt(record, s.template), record["output"], tokenizer,
                              s.max_length, s.train_on_prompt)

    def prompt_ids(self, record: dict, tokenizer) -> list[int]:
        if self.settings.template == CHAT:
            text = render_chat(tokenizer, self.template(tokenizer)[0], instruction_messages(record)[:-1],
                               add_generation_prompt=True)
            return encode_prompt(text, tokenizer)
        return encode_prompt(render_prompt(record, self.settings.template), tokenizer)

    def shown(self, record: dict) -> str:
        return record["instruction"] + (" | " + record["input"] if record["input"] else "")

    def reference(self, record: dict) -> str:
        return record["output"]

    def fingerprint(self, tokenizer) -> dict:
        if self.settings.template == CHAT:
            template = self.template(tokenizer)[0]
            return {"template": CHAT, "chat_template": hashlib.sha256(template.encode()).hexdigest()}
        return {"template": self.settings.template}


@dataclass
class ChatFormat:
    settings: DataSettings
    name: str = "chat"
    generative: bool = True
    _template: tuple[str, str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_chat_template(self.settings.chat_template)

    def record(self, row: Row) -> dict:
        """``{"messages": [{role, content}, ...]}`` whatever the style it is written in
        (``chat``: role/content; ``sharegpt``: from/value with human/gpt roles)."""
        data = _object(row)
        role_key, content_key, roles = CHAT_STYLES[self.name]
        key = self.settings.fields["conversations" if self.name == "sharegpt" else "messages"]
        shape = f"{{{role_key}, {content_key}}}"
        messages = data.get(key)
        if messages is None:
            other, fmt = ("messages", "chat") if self.name == "sharegpt" else ("conversations", "sharegpt")
            hint = f"; the record has {other!r}, which data={fmt} reads" if other in data else ""
            raise row.error(key, "missing (a required field)" + hint)
        if not isinstance(messages, list):
            raise row.error(key, f"must be a list of {shape} messages, got "
                                 f"{type(messages).__name__}")
        if not messages:
            raise row.error(key, "is empty")
        out = []
        for i, message in enumerate(messages):
            at = f"{key}[{i}]"
            if not isinstance(message, dict):
                raise row.error(at, f"must be a {shape} object, got {type(message).__name__}")
            role = _text(row, message, role_key, at=f"{at}.{role_key}").strip()
            if role not in roles:
                raise row.error(f"{at}.{role_key}", f"must be one of {', '.join(roles)}, got {role!r}")
            content = _text(row, message, content_key, at=f"{at}.{content_key}")
            out.append({"role": roles[role], "content": content})
        if out[-1]["role"] != "assistant":
            raise row.error(f"{key}[{len(out) - 1}].{role_key}",
                            f"the last message must be the assistant's answer, got "
                            f"{messages[-1][role_key].strip()!r}")
        if out[0]["role"] == "assistant":
            raise row.error(f"{key}[0].{role_key}", "the conversation must not start with the assistant")
        return {"messages": out}

    def template(self, tokenizer) -> tuple[str, str]:
        if self._template is None:
            self._template = resolve_chat_template(tokenizer, self.settings.chat_template,
                                                   f"data.format={self.name}")
        return self._template

    def encode(self, record: dict, tokenizer) -> Encoded:
        s = self.settings
        segments = chat_segments(tokenizer, self.template(tokenizer)[0], record["messages"])
        return encode_segments(segments, tokenizer, s.max_length, s.train_on_prompt)

    def prompt_ids(self, record: dict, tokenizer) -> list[int]:
        text = render_chat(tokenizer, self.template(tokenizer)[0], record["messages"][:-1],
                           add_generation_prompt=True)
        return encode_prompt(text, tokenizer)

    def shown(self, record: dict) -> str:
        return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "user")

    def reference(self, record: dict) -> str:
        return record["messages"][-1]["content"]

    def fingerprint(self, tokenizer) -> dict:
        template = self.template(tokenizer)[0]
        return {"chat_template": hashlib.sha256(template.encode()).hexdigest()}


@dataclass
class TextFormat:
    """Documents; blocks are cut by the data module (they span documents), not per record."""

    settings: DataSettings
    name: str = "text"
    generative: bool = False

    def record(self, row: Row) -> dict[str, str]:
        return {"text": _text(row, _object(row), self.settings.fields["text"])}

    def fingerprint(self, tokenizer) -> dict:
        return {}


@dataclass
class ClassificationFormat:
    settings: DataSettings
    name: str = "classification"
    generative: bool = False
    labels: list[str] = field(default_factory=list)

    def record(self, row: Row) -> dict[str, str]:
        data, f = _object(row), self.settings.fields
        text = _text(row, data, f["text"])
        label = data.get(f["label"])
        if label is None:
            raise row.error(f["label"], "missing (a required field)")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise row.error(f["label"], f"must be a string or an integer, got "
                                        f"{type(label).__name__} {_short(label)}")
        label = str(label).strip()
        if not label:
            raise row.error(f["label"], "is empty")
        return {"text": text, "label": label}

    def set_labels(self, train: list[tuple[Row, dict]]) -> None:
        """The label set: ``data.labels`` if given, else every label of the training file."""
        if self.settings.labels:
            self.labels = list(self.settings.labels)
        else:
            found = {rec["label"] for _, rec in train}
            numeric = all(v.lstrip("-").isdigit() for v in found)
            self.labels = sorted(found, key=int if numeric else str)
        if len(self.labels) < 2:
            where = train[0][0].file if train else self.settings.path
            raise DataError(f"{where}: classification needs at least two labels, found only {self.labels}")

    def check_label(self, row: Row, record: dict) -> None:
        if record["label"] not in self.labels:
            origin = "data.labels" if self.settings.labels else "the labels of the training data"
            raise row.error(self.settings.fields["label"],
                            f"label {record['label']!r} is not in the label set "
                            f"({origin}: {', '.join(self.labels)})")

    def encode(self, record: dict, tokenizer) -> tuple[list[int], int, bool]:
        ids, truncated = encode_classification(record["text"], tokenizer, self.settings.max_length)
        return ids, self.labels.index(record["label"]), truncated

    def fingerprint(self, tokenizer) -> dict:
        return {"labels": self.labels}


FORMATS = {"instruction": InstructionFormat, "chat": ChatFormat, "text": TextFormat,
           "classification": ClassificationFormat,
           "sharegpt": lambda settings: ChatFormat(settings, name="sharegpt")}


def build_format(settings: DataSettings):
    return FORMATS[settings.format](settings)
