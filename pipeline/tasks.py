"""Annotation tasks: what a run asks of each image, and how each answer is checked and typed.

A run asks every image one or more tasks (``JobConfig.tasks``, validated in ``pipeline.config``).
The image is prepared and encoded once; each task gets its own prompt, selection where the
pruning method reads the text, and generation. Without a task spec the run has one implicit
task, the row's ``prompt`` column as free text, and the output keeps the one-answer layout
(``answer``, ``prompt_tokens``, ...); with one, every task has its own columns
(``<name>``, ``<name>_error``, ...: ``task_fields``). docs/tasks.md is the user's page.

No torch, Ray or engine here: the config, the stages, both engines and the output schema read it.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from pipeline.config import JobConfig, TaskConfig

# The columns every task has beside its answer column (``<name>``), in output order.
TASK_SUFFIXES = {
    "error": pa.string(),
    "prompt_tokens": pa.int32(),
    "generated_tokens": pa.int32(),
    "prompt_truncated": pa.bool_(),
    "visual_tokens_kept": pa.int32(),
    "kept_indices": pa.list_(pa.int32()),
    "nouns": pa.list_(pa.string()),
    "flops": pa.int64(),
    "kv_cache_bytes": pa.int64(),
}
# Shared columns a task's columns must not shadow (the input's other columns: pipeline.plan).
SHARED_COLUMNS = frozenset({
    "id", "prompt", "error", "answer", "method", "keep", "visual_tokens_in", "encoder_patches", "extractor",
    "text_ms", "prepare_ms", "encode_ms", "prune_ms", "decode_ms", "image",
})


def template_columns(template: str) -> list[str]:
    """The row columns a prompt template names, in order of first use; ``ValueError`` for a
    template ``str.format`` would not take as plain ``{column}`` fields."""
    columns: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"prompt template: {e} (write {{{{ and }}}} for literal braces)") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(f"prompt template: {{{field}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} is not a plain {{column}} field")
        if field not in columns:
            columns.append(field)
    return columns


def check_json_schema(schema: Mapping[str, Any]) -> None:
    """``ValueError`` unless ``schema`` is a valid JSON Schema (its own draft's meta-schema)."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise ValueError(f"schema is not a valid JSON Schema: {e.message}{f' (at {where})' if where else ''}") from None


def reserved_column(name: str, names: list[str]) -> str:
    """Why task ``name`` cannot be a column beside the shared ones and ``names``' columns, or ""."""
    if name in SHARED_COLUMNS:
        return "is a column every output has; choose another name"
    for other in names:
        for suffix in TASK_SUFFIXES:
            if name == f"{other}_{suffix}":
                return f"is the column {suffix!r} of task {other!r}; choose another name"
    return ""


def implicit_task() -> TaskConfig:
    """The task of a run without a task spec: each row's ``prompt`` column, as free text."""
    from pipeline.config import TaskConfig

    return TaskConfig(name="answer", prompt="{prompt}")


@dataclass(frozen=True)
class TaskSpec:
    """A run's tasks, resolved once: what the stages and the output step are handed."""

    tasks: tuple[TaskConfig, ...]
    one_answer: bool  # no task spec: the implicit task, written as today's `answer` columns

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


def one_answer() -> TaskSpec:
    """The spec of a run without a task spec."""
    return TaskSpec((implicit_task(),), True)


def task_spec(cfg: JobConfig) -> TaskSpec:
    """The tasks a run asks of every image, in order (the implicit one without a task spec)."""
    return TaskSpec(tuple(cfg.tasks), False) if cfg.tasks else one_answer()


def input_columns(tasks: tuple[TaskConfig, ...]) -> list[str]:
    """The input columns the tasks' prompts read."""
    return list(dict.fromkeys(c for t in tasks for c in template_columns(t.prompt)))


def read_text(value: object) -> tuple[str | None, str]:
    """``(text, error)`` of one column value a prompt reads: a string as is; bytes decoded as
    UTF-8 (null when they are not: ``invalid prompt``); null, empty or whitespace-only ->
    ``missing prompt`` (the text kept as read)."""
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"invalid prompt: not valid UTF-8 ({e.reason} at byte {e.start})"
    if not isinstance(value, str):
        return None, "missing prompt"
    return value, "" if value.strip() else "missing prompt"


def render(template: str, values: Mapping[str, str | None], errors: Mapping[str, str]) -> tuple[str, str]:
    """``(prompt, error)``: ``template`` filled from a row's read column values (``read_text``).
    A template that is one column alone is that column's text; otherwise a column's error
    names the column."""
    columns = template_columns(template)
    for c in columns:
        if errors.get(c):
            if template == f"{{{c}}}":
                return "", errors[c]
            kind, _, detail = errors[c].partition(": ")
            return "", f"{kind}: column {c!r}" + (f": {detail}" if detail else " is null or empty")
    return template.format(**{c: values[c] for c in columns}), ""


# ---- constraints and answers ---------------------------------------------------------------


@dataclass(frozen=True)
class Constraint:
    """What a constrained answer may be, as both engines take it: exactly one of ``choices``, or
    a JSON value of ``json_schema`` (canonical JSON text, so equal schemas are equal keys)."""

    choices: tuple[str, ...] = ()
    json_schema: str = ""

    def __post_init__(self) -> None:
        if bool(self.choices) == bool(self.json_schema):
            raise ValueError("a constraint is choices or a JSON schema, exactly one")

    @property
    def choice_grammar(self) -> str:
        """"Exactly one of the labels" as an EBNF grammar (xgrammar's dialect, which both engines
        compile), the labels escaped as vLLM's own ``choice`` grammar escapes them, after an
        optional space: sentencepiece-style tokenizers (LLaVA's Llama, the tiny models) write a
        word after the prompt as a space-prefixed token, and a grammar without the space would
        force the model into spellings it never uses. The engines strip the space."""
        escapes = {"\\": r"\\", '"': r"\"", "\n": r"\n", "\r": r"\r", "\t": r"\t"}

        def escape(ch: str) -> str:
            if ch in escapes:
                return escapes[ch]
            return f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch

        labels = " | ".join('"' + "".join(escape(ch) for ch in c) + '"' for c in self.choices)
        return f'root ::= " "? ({labels})'


def constraint(task: TaskConfig) -> Constraint | None:
    if task.type == "choice":
        return Constraint(choices=tuple(task.choices or ()))
    if task.type == "json":
        return Constraint(json_schema=json.dumps(task.json_schema, sort_keys=True, separators=(",", ":")))
    return None


def parse_answer(task: TaskConfig, text: str, generated_tokens: int, max_new_tokens: int) -> tuple[Any, str]:
    """``(value, error)`` of a generated answer: the text for ``text``; the label for ``choice``;
    the parsed value for ``json``, validated against the schema. A constrained answer fails only
    when generation stopped first (``max_new_tokens``) or the engine did not constrain it;
    ``invalid answer: ...`` names which, with the text's start."""
    if task.type == "text":
        return text, ""
    cut = generated_tokens >= max_new_tokens
    shown = repr(text[:120]) + ("..." if len(text) > 120 else "")
    if task.type == "choice":
        if text in (task.choices or ()):
            return text, ""
        why = f"stopped at max_new_tokens ({max_new_tokens}) before a label was complete" if cut else "not one of the labels"
        return None, f"invalid answer: {why}: {shown}"
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        why = (f"stopped at max_new_tokens ({max_new_tokens}) before the JSON closed" if cut
               else f"not JSON ({e.msg} at character {e.pos})")
        return None, f"invalid answer: {why}: {shown}"
    try:
        jsonschema.validate(value, task.json_schema or {})
    except jsonschema.ValidationError as e:
        return None, f"invalid answer: does not validate against the schema: {e.message[:200]}"
    return value, ""


# ---- output types ------------------------------------------------------------------------

_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


def json_arrow_type(schema: Mapping[str, Any]) -> pa.DataType:
    """The Arrow type a JSON answer of ``schema`` is stored as, queryable without parsing where
    the schema pins the shape: an object with ``properties`` (and no other properties allowed,
    which is what the constrained decoders generate) -> struct; an array with ``items`` -> list;
    string / integer / number / boolean (or a nullable one, or an enum of strings) -> that scalar.
    Anything else (unions, free-form objects) -> the value's compact JSON text (string)."""
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: nullable, and every Arrow column is
        rest = [k for k in kind if k != "null"]
        kind = rest[0] if len(rest) == 1 else None
    if kind is None and "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
        kind = "string"
    if kind in _SCALARS and not any(k in schema for k in ("anyOf", "oneOf", "allOf")):
        return _SCALARS[kind]
    if kind == "object" and schema.get("properties") and not schema.get("additionalProperties"):
        return pa.struct([pa.field(k, json_arrow_type(v)) for k, v in schema["properties"].items()])
    if kind == "array" and isinstance(schema.get("items"), Mapping):
        return pa.list_(json_arrow_type(schema["items"]))
    return pa.string()


def to_arrow_value(value: Any, kind: pa.DataType) -> Any:
    """A parsed JSON value as ``pa.array`` takes it for ``kind`` (``json_arrow_type``)."""
    if value is None:
        return None
    if pa.types.is_struct(kind):
        return {f.name: to_arrow_value(value.get(f.name), f.type) for f in kind}
    if pa.types.is_list(kind):
        return [to_arrow_value(v, kind.value_type) for v in value]
    if pa.types.is_string(kind) and not isinstance(value, str):
        return json.dumps(value, separators=(",", ":"))
    if pa.types.is_string(kind) and isinstance(value, str):
        return value
    if pa.types.is_floating(kind):
        return float(value)
    return value


def answer_type(task: TaskConfig) -> pa.DataType:
    """The Arrow type of a task's answer column: text and labels as strings, JSON as ``json_arrow_type``."""
    return json_arrow_type(task.json_schema or {}) if task.type == "json" else pa.string()


def task_fields(task: TaskConfig) -> list[pa.Field]:
    """A task's output columns: its answer (``<name>``), then ``<name>_<suffix>`` (``TASK_SUFFIXES``)."""
    return [pa.field(task.name, answer_type(task))] + [pa.field(f"{task.name}_{s}", t) for s, t in TASK_SUFFIXES.items()]
