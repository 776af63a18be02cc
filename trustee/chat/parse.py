"""Parse an assistant completion into typed values, in one of three call syntaxes.

- 'qwen' (Qwen3 / Hermes) and 'chatml' (the same blocks written as plain text): each
  `<tool_call>{json}</tool_call>` block is one call;
- 'llama3' (Llama 3.x JSON calls): from the first line that starts with `{` (optionally after
  `<|python_tag|>`) to the end, one or more `{"name": ..., "parameters": {...}}` objects
  separated by whitespace or `;`; prose before that line is the message content;
- 'mistral' (`[TOOL_CALLS]`): after the marker, a JSON list of `{"name", "arguments"}`
  objects (or one object); each element is one call.

Every call becomes a `ToolCall` or a `ToolCallError` (invalid JSON, not an object, missing
name, unknown tool, arguments violating the tool's JSON schema, unclosed block). Errors are
values: the environment shows them to the policy and counts them; nothing is dropped
silently. Called by the episode runner after each policy turn and by the tool simulator
(argument validation happens here, in code, before any model call).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import msgspec

from trustee.chat.fastcheck import compile_check
from trustee.chat.formats import FAMILIES, family
from trustee.types import Message, ToolCall, ToolCallError, ToolSpec

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)
_END_TOKENS = tuple(dict.fromkeys(t for f in FAMILIES.values() for t in f.end_tokens))
# Llama 3: a call turn's JSON starts a line, optionally after <|python_tag|>.
_LLAMA_CALL_START = re.compile(r"^[ \t]*(?:<\|python_tag\|>)?[ \t]*(?=\{)", re.MULTILINE)
_DECODER = json.JSONDecoder()
# A raw call text, or an error found while splitting the turn (e.g. an unclosed block).
_Item = str | ToolCallError


def canonical_json(obj: Any) -> str:
    """Key-sorted compact JSON: the normal form used to compare calls."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _schema_validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


@dataclass
class ParsedTurn:
    """One assistant turn: the message to record, calls that parsed, and errors in order of
    appearance. `blocks` is the number of calls written (well-formed or not)."""

    message: Message
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)
    blocks: int = 0


class ToolCallParser:
    """Parses completions against one task's tool set (schemas compiled once), in the call
    syntax of `format` (a `chat.formats` family name)."""

    def __init__(self, tools: list[ToolSpec], format: str = "qwen"):
        self.format = family(format).name
        self._split = _SPLITTERS[self.format]
        # Llama 3 writes a call's arguments under "parameters"; "arguments" is accepted too.
        self._arg_keys = ("parameters", "arguments") if self.format == "llama3" else ("arguments",)
        self.tools = {t.name: t for t in tools}
        if len(self.tools) != len(tools):
            raise ValueError(f"tool names are not unique: {[t.name for t in tools]}")
        self._validators = {t.name: _schema_validator(t.parameters) for t in tools}
        # A plain-Python "certainly valid" check per schema (None: jsonschema only); a call it
        # does not pass goes through jsonschema, whose message the policy sees.
        self._certainly_valid = {t.name: compile_check(t.parameters) for t in tools}

    def validate(self, call: ToolCall) -> ToolCallError | None:
        """Check a call against the tool set: unknown name or schema violation."""
        if call.name not in self.tools:
            known = sorted(self.tools)
            return ToolCallError(
                kind="unknown_tool",
                message=f"tool {call.name!r} not found; known: {known}",
                raw=canonical_json({"name": call.name, "arguments": call.arguments}),
                name=call.name,
            )
        fast = self._certainly_valid[call.name]
        if fast is not None and fast(call.arguments):
            return None
        err = jsonschema.exceptions.best_match(self._validators[call.name].iter_errors(call.arguments))
        if err is not None:
            where = "/".join(str(p) for p in err.absolute_path) or "arguments"
            return ToolCallError(
                kind="schema",
                message=f"invalid arguments for {call.name!r} at {where}: {err.message}",
                raw=canonical_json({"name": call.name, "arguments": call.arguments}),
                name=call.name,
            )
        return None

    def parse_block(self, raw: str) -> ToolCall | ToolCallError:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            return ToolCallError(kind="invalid_json", message=f"tool call is not valid JSON: {e}", raw=raw)
        if not isinstance(obj, dict):
            return ToolCallError(
                kind="not_an_object",
                message=f'tool call must be a JSON object {{"name": ..., "{self._arg_keys[0]}": {{...}}}}',
                raw=raw,
            )
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            return ToolCallError(kind="missing_name", message='tool call has no string "name"', raw=raw)
        args = next((obj[k] for k in self._arg_keys if k in obj), {})
        if isinstance(args, str):  # some models emit arguments as a JSON string
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                return ToolCallError(
                    kind="invalid_json",
                    message=f"arguments of {name!r} are not valid JSON: {e}",
                    raw=raw,
                    name=name,
                )
        if not isinstance(args, dict):
            return ToolCallError(
                kind="not_an_object",
                message=f'"{self._arg_keys[0]}" of {name!r} must be a JSON object',
                raw=raw,
                name=name,
            )
        call = ToolCall(name=name, arguments=args)
        return self.validate(call) or call

    def parse(self, text: str) -> ParsedTurn:
        """Parse decoded completion text (special tokens kept)."""
        for end in _END_TOKENS:
            if text.endswith(end):
                text = text[: -len(end)]
                break
        reasoning = ""
        m = _THINK.match(text)
        if m:
            reasoning = m.group(1).strip("\n")
            text = text[m.end() :]
        content, items = self._split(text)
        calls: list[ToolCall] = []
        errors: list[ToolCallError] = []
        for i, item in enumerate(items):
            out = self.parse_block(item.strip()) if isinstance(item, str) else item
            if isinstance(out, ToolCall):
                calls.append(out)
            else:
                errors.append(msgspec.structs.replace(out, index=i))
        msg = Message(role="assistant", content=content, reasoning=reasoning, tool_calls=calls)
        return ParsedTurn(message=msg, calls=calls, errors=errors, blocks=len(items))


def _split_qwen(text: str) -> tuple[str, list[_Item]]:
    first = text.find("<tool_call>")
    content = (text if first < 0 else text[:first]).strip()
    items: list[_Item] = [b.group(1) for b in _BLOCK.finditer(text)]
    tail = text[_last_end(text) :]
    if "<tool_call>" in tail:
        items.append(
            ToolCallError(
                kind="unclosed",
                message="<tool_call> block is not closed with </tool_call>",
                raw=tail[tail.find("<tool_call>") :],
            )
        )
    return content, items


def _split_llama3(text: str) -> tuple[str, list[_Item]]:
    m = _LLAMA_CALL_START.search(text)
    if m is None:
        return text.strip(), []
    content = text[: m.start()].strip()
    rest = text[m.end() :]
    items: list[_Item] = []
    i = 0
    while True:
        while i < len(rest) and (rest[i].isspace() or rest[i] == ";"):
            i += 1
        if i >= len(rest):
            return content, items
        try:
            _, j = _DECODER.raw_decode(rest, i)
        except json.JSONDecodeError as e:
            msg = f"tool call is not valid JSON: {e}"
            items.append(ToolCallError(kind="invalid_json", message=msg, raw=rest[i:]))
            return content, items
        items.append(rest[i:j])
        i = j


def _split_mistral(text: str) -> tuple[str, list[_Item]]:
    cut = text.find("[TOOL_CALLS]")
    if cut < 0:
        return text.strip(), []
    content, raw = text[:cut].strip(), text[cut + len("[TOOL_CALLS]") :].strip()
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        err = ToolCallError(
            kind="invalid_json", message=f"[TOOL_CALLS] is not followed by valid JSON: {e}", raw=raw
        )
        return content, [err]
    objs = obj if isinstance(obj, list) else [obj]
    return content, [json.dumps(o, ensure_ascii=False) for o in objs]


_SPLITTERS = {"qwen": _split_qwen, "llama3": _split_llama3, "mistral": _split_mistral, "chatml": _split_qwen}


def _last_end(text: str) -> int:
    i = text.rfind("</tool_call>")
    return 0 if i < 0 else i + len("</tool_call>")


def error_observation(err: ToolCallError) -> Message:
    """The tool result the policy sees for a failed call."""
    return Message(role="tool", content=canonical_json({"error": err.message}), name=err.name)
