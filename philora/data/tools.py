"""Tool calling: the tools a conversation offers, the calls its assistant makes and the results it is given,
checked and put in one shape, and the text syntax a chat template writes calls in.

The shape is OpenAI's:
- tools: `[{"type": "function", "function": {"name", "description"?, "parameters"?}}]`; a bare
  `{"name", "description", "parameters"}` (mlx-lm's and Phi's way of writing them) is taken as the function;
- an assistant message's `tool_calls`: `[{"id", "type": "function", "function": {"name", "arguments"}}]`, the
  arguments an object (JSON text is parsed), ids made up (`call_<turn>_<k>`) where the data has none;
- a tool result: `{"role": "tool", "content", "tool_call_id", "name"}`, answering a call of the assistant turn
  just before it.

`Syntax` is how the calls look in the model's text: `<tool_call>{json}</tool_call>` one per call (ChatML and
Hermes-style templates, Qwen2.5), or Phi-4-mini's `<|tool_call|>[{json}, ...]<|/tool_call|>`. It writes calls
into an answer and reads them back out of generated text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


class BadTools(ValueError):
    """Tools, calls or tool results that do not fit together; the message names the place and the fix."""


JSON_TYPES = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


def json_text(value: Any, place: str, fix: str) -> Any:
    """A value given as JSON text, parsed (other values as they are); BadTools naming the place and `fix`."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise BadTools(f"{place} is not valid JSON ({e.msg} at column {e.colno}); {fix}") from None


def check_tools(value: Any, place: str = "tools") -> list[dict[str, Any]]:
    """The tools of a row or request in OpenAI's shape; a list, or JSON text of one."""
    value = json_text(value, place, "give a JSON list of function schemas")
    if not isinstance(value, list):
        raise BadTools(f"{place} is a {type(value).__name__}; give a list of function schemas")
    tools, names = [], set()
    for i, tool in enumerate(value):
        at = f"{place}[{i}]"
        if not isinstance(tool, dict):
            raise BadTools(f'{at} is a {type(tool).__name__}; give {{"type": "function", "function": {{"name": ...}}}}')
        if "function" in tool:
            if tool.get("type", "function") != "function":
                raise BadTools(f"{at}.type is {tool['type']!r}; only function tools are supported")
            function, at = tool["function"], f"{at}.function"
        else:
            function = tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadTools(f"{at}.name is missing; every function needs a name")
        name = function["name"]
        if name in names:
            raise BadTools(f"{at}.name {name!r} is defined twice; give each tool its own name")
        names.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise BadTools(f"{at}.parameters is a {type(parameters).__name__}; give a JSON schema object")
        required = parameters.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise BadTools(f"{at}.parameters.required must be a list of argument names")
        properties = parameters.get("properties", {})
        if not isinstance(properties, dict):
            raise BadTools(f"{at}.parameters.properties must be an object of argument schemas")
        clean = {"name": name}
        if "description" in function:
            clean["description"] = function["description"]
        clean["parameters"] = parameters
        tools.append({"type": "function", "function": clean})
    return tools


def check_calls(value: Any, place: str, tools: list[dict[str, Any]], turn: int = 0) -> list[dict[str, Any]]:
    """An assistant message's tool calls in OpenAI's shape, each naming one of `tools` with arguments that fit
    its schema's required fields and simple types."""
    if not isinstance(value, list) or not value:
        raise BadTools(f"{place} must be a non-empty list of calls (or leave it out)")
    defined = {t["function"]["name"]: t["function"] for t in tools}
    calls = []
    for k, call in enumerate(value):
        at = f"{place}[{k}]"
        if not isinstance(call, dict):
            raise BadTools(f'{at} is a {type(call).__name__}; give {{"function": {{"name": ..., "arguments": ...}}}}')
        function = call.get("function", call)  # also {"name", "arguments"}, as Hermes-style data writes calls
        if not isinstance(function, dict):
            raise BadTools(f"{at}.function is a {type(function).__name__}; give an object with name and arguments")
        name = function.get("name")
        if name not in defined:
            offered = ", ".join(sorted(defined)) or "none"
            raise BadTools(f"{at} calls {name!r}, which this row's tools do not define (they define: {offered})")
        arguments = parse_arguments(function.get("arguments", {}), f"{at}.function.arguments")
        problem = argument_problem(arguments, defined[name].get("parameters", {}))
        if problem:
            raise BadTools(f"{at}: {name}(...) {problem}")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise BadTools(f"{at}.id is {call_id!r}; give the call's id as a string")
        calls.append(
            {
                "id": call_id or f"call_{turn}_{k}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return calls


def parse_arguments(value: Any, place: str) -> dict[str, Any]:
    """Call arguments as an object: JSON text is parsed."""
    if isinstance(value, str) and not value.strip():
        return {}
    value = json_text(value, place, "write them as a JSON object")
    if not isinstance(value, dict):
        raise BadTools(f"{place} is a {type(value).__name__}; the arguments must be a JSON object")
    return value


def argument_problem(arguments: dict[str, Any], schema: dict[str, Any]) -> str | None:
    """What is wrong with arguments against a function's parameter schema: a required one missing, one the schema
    does not allow, or a value of the wrong simple type. Nested schemas are not checked."""
    missing = [r for r in schema.get("required", []) if r not in arguments]
    if missing:
        return f"lacks required argument {', '.join(map(repr, missing))}"
    properties = schema.get("properties", {})
    if schema.get("additionalProperties") is False:
        unknown = [a for a in arguments if a not in properties]
        if unknown:
            return f"has argument {', '.join(map(repr, unknown))}, which its schema does not allow"
    for key, value in arguments.items():
        kind = properties.get(key, {}).get("type") if isinstance(properties.get(key), dict) else None
        kinds = kind if isinstance(kind, list) else [kind] if isinstance(kind, str) else []
        allowed = tuple(t for k in kinds for t in JSON_TYPES.get(k, ()))
        if kinds and all(k in JSON_TYPES for k in kinds) and not _is(value, allowed):
            return f"argument {key!r} is {json.dumps(value)[:40]}, not of type {'/'.join(kinds)}"
    return None


def _is(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # a JSON boolean is not a number
        return bool in types
    return isinstance(value, types)


def sharegpt_calls(value: Any, place: str, tools: list[dict[str, Any]], turn: int) -> list[dict[str, Any]]:
    """A ShareGPT function_call turn's value: the JSON of one `{"name", "arguments"}` or of a list of them."""
    calls = json_text(value, place, "give the call as JSON")
    return check_calls(calls if isinstance(calls, list) else [calls], place, tools, turn)


def sharegpt_results(value: Any, calls: list[dict[str, Any]], place: str) -> list[dict[str, Any]]:
    """A ShareGPT observation turn: one tool message per call of the function_call turn before it (a JSON list
    of results when it made several)."""
    results = [value]
    if len(calls) > 1:
        results = json_text(value, place, f"give a JSON list of {len(calls)} results, one per call")
        if not isinstance(results, list) or len(results) != len(calls):
            raise BadTools(
                f"{place}: the function_call before it made {len(calls)} calls; give a JSON list of "
                f"{len(calls)} results, one per call, in order"
            )
    return [
        {"role": "tool", "content": r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)} for r in results
    ]


def check_results(messages: list[dict[str, Any]], field: str = "messages") -> None:
    """Every tool message answers a call of the assistant turn before it (by tool_call_id when given, else in
    order), at most once; a tool message gets the id and name of the call it answers."""
    pending: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            pending = list(m.get("tool_calls", []))
            continue
        if m["role"] != "tool":
            pending = []
            continue
        if not pending:
            raise BadTools(
                f"{field}[{i}] is a tool result with no call before it; put it right after the assistant message "
                "whose tool_calls it answers"
            )
        wanted = m.get("tool_call_id")
        match = next((c for c in pending if c["id"] == wanted), None) if wanted is not None else pending[0]
        if match is None:
            ids = ", ".join(c["id"] for c in pending)
            raise BadTools(f"{field}[{i}].tool_call_id is {wanted!r}; the calls waiting for a result are {ids}")
        name = m.get("name")
        if name is not None and name != match["function"]["name"]:
            raise BadTools(f"{field}[{i}].name is {name!r}, but call {match['id']} is to {match['function']['name']!r}")
        pending.remove(match)
        m["tool_call_id"], m["name"] = match["id"], match["function"]["name"]


@dataclass(frozen=True)
class Syntax:
    """How a template writes tool calls in an assistant's text."""

    open: str
    close: str
    as_list: bool  # one block holding a JSON list of calls (Phi-4-mini), or one block per call (Hermes)
    after_content: str  # between an answer's text and its calls

    def answer(self, content: str, calls: list[dict[str, Any]]) -> str:
        """An assistant answer as the template writes it: its text, then its calls."""
        return f"{content}{self.after_content}{self.write(calls)}" if content else self.write(calls)

    def write(self, calls: list[dict[str, Any]]) -> str:
        items = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
        if self.as_list:
            return f"{self.open}{json.dumps(items, ensure_ascii=False)}{self.close}"
        return "\n".join(f"{self.open}\n{json.dumps(item, ensure_ascii=False)}\n{self.close}" for item in items)

    def parse(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content, calls) of generated text; calls as {"name", "arguments": object}. Text whose call blocks are
        not all valid calls is all content, with no calls. A last block left open (generation stopped before its
        closing marker) is read to the end of the text."""
        blocks = list(re.finditer(re.escape(self.open) + r"(.*?)(?:" + re.escape(self.close) + r"|$)", text, re.S))
        if not blocks:
            return text, []
        calls = []
        for block in blocks:
            try:
                found = json.loads(block.group(1))
            except json.JSONDecodeError:
                return text, []
            items = found if isinstance(found, list) and self.as_list else [found]
            for item in items:
                if not (isinstance(item, dict) and isinstance(item.get("name"), str)):
                    return text, []
                arguments = item.get("arguments", item.get("parameters", {}))
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments)
                    except json.JSONDecodeError:
                        return text, []
                if not isinstance(arguments, dict):
                    return text, []
                calls.append({"name": item["name"], "arguments": arguments})
        return _outside(text, blocks).strip(), calls


def _outside(text: str, blocks: list[re.Match[str]]) -> str:
    pieces, at = [], 0
    for block in blocks:
        pieces.append(text[at : block.start()])
        at = block.end()
    pieces.append(text[at:])
    return "".join(pieces)


HERMES = Syntax("<tool_call>", "</tool_call>", as_list=False, after_content="\n")
PHI4 = Syntax("<|tool_call|>", "<|/tool_call|>", as_list=True, after_content="")
