"""Parse an assistant completion in the Qwen3/Hermes format into typed values.

Every `<tool_call>` block becomes a `ToolCall` or a `ToolCallError` (invalid JSON, not an
object, missing name, unknown tool, arguments violating the tool's JSON schema, unclosed
block). Errors are values: the environment shows them to the policy and counts them;
nothing is dropped silently. Called by the episode runner after each policy turn and by the
tool simulator (argument validation happens here, in code, before any model call).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import msgspec

from trustee.types import Message, ToolCall, ToolCallError, ToolSpec

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


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
    appearance. `blocks` is the number of `<tool_call>` blocks seen."""

    message: Message
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)
    blocks: int = 0


class ToolCallParser:
    """Parses completions against one task's tool set (schemas compiled once)."""

    def __init__(self, tools: list[ToolSpec]):
        self.tools = {t.name: t for t in tools}
        if len(self.tools) != len(tools):
            raise ValueError(f"tool names are not unique: {[t.name for t in tools]}")
        self._validators = {t.name: _schema_validator(t.parameters) for t in tools}

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
                message='tool call must be a JSON object {"name": ..., "arguments": {...}}',
                raw=raw,
            )
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            return ToolCallError(kind="missing_name", message='tool call has no string "name"', raw=raw)
        args = obj.get("arguments", {})
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
                message=f'"arguments" of {name!r} must be a JSON object',
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
        calls: list[ToolCall] = []
        errors: list[ToolCallError] = []
        blocks = 0
        first = text.find("<tool_call>")
        content = (text if first < 0 else text[:first]).strip()
        for block in _BLOCK.finditer(text):
            out = self.parse_block(block.group(1).strip())
            if isinstance(out, ToolCall):
                calls.append(out)
            else:
                errors.append(msgspec.structs.replace(out, index=blocks))
            blocks += 1
        tail = text[_last_end(text) :]
        if "<tool_call>" in tail:
            blocks += 1
            errors.append(
                ToolCallError(
                    kind="unclosed",
                    message="<tool_call> block is not closed with </tool_call>",
                    raw=tail[tail.find("<tool_call>") :],
                    index=blocks - 1,
                )
            )
        msg = Message(role="assistant", content=content, reasoning=reasoning, tool_calls=calls)
        return ParsedTurn(message=msg, calls=calls, errors=errors, blocks=blocks)


def _last_end(text: str) -> int:
    i = text.rfind("</tool_call>")
    return 0 if i < 0 else i + len("</tool_call>")


def error_observation(err: ToolCallError) -> Message:
    """The tool result the policy sees for a failed call."""
    return Message(role="tool", content=canonical_json({"error": err.message}), name=err.name)
