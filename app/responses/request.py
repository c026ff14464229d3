"""A Responses API request body -> the chat-completions request the engine runs.

What is translated (and how) is the README's "Responses API" section. The proxy is stateless: anything
that needs a stored response or conversation (``previous_response_id``, ``store: true``, ``conversation``,
``background``, ``item_reference`` inputs, stored ``prompt`` templates) and every hosted tool (web search,
file search, computer use, MCP, ...) is refused with a 400 naming the field, never silently dropped:
an agent that relies on server-side state must learn at once that it has none here.
"""

from __future__ import annotations

from typing import Any

from app.errors import InvalidRequest

Json = dict[str, Any]

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_MAX_OUTPUT_TOKENS = 10**9


def _bad(param: str, msg: str, code: str = "invalid_request") -> InvalidRequest:
    return InvalidRequest(f"'{param}': {msg}", param=param, code=code)


def _stateless(param: str, what: str) -> InvalidRequest:
    return _bad(
        param,
        f"{what} is not supported: this proxy is stateless and stores no responses. "
        "Send the whole conversation in 'input' instead.",
        code="unsupported_parameter",
    )


def _num(body: Json, name: str, lo: float, hi: float, *, integer: bool = False) -> None:
    v = body.get(name)
    if v is None:
        return
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if not ok or isinstance(v, bool):
        raise _bad(name, f"must be {'an integer' if integer else 'a number'}")
    if not lo <= v <= hi:
        raise _bad(name, f"must be between {lo:g} and {hi:g}")


def to_chat(body: object, *, max_messages: int) -> Json:
    """The chat request for a Responses ``body``; raises InvalidRequest naming the Responses field."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise _bad("model", "is required")
    if not isinstance(model, str) or not model:
        raise _bad("model", "must be a non-empty string")
    if body.get("previous_response_id") is not None:
        raise _stateless("previous_response_id", "continuing a stored response")
    if body.get("conversation") is not None:
        raise _stateless("conversation", "a stored conversation")
    if body.get("store") is True:
        raise _stateless("store", "storing the response (store: true)")
    if body.get("background") is True:
        raise _stateless("background", "a background response")
    if body.get("prompt") is not None:
        raise _stateless("prompt", "a stored prompt template")
    for name in ("stream", "store", "background", "parallel_tool_calls"):
        v = body.get(name)
        if v is not None and not isinstance(v, bool):
            raise _bad(name, "must be a boolean")
    _num(body, "temperature", 0, 2)
    _num(body, "top_p", 0, 1)
    _num(body, "max_output_tokens", 1, _MAX_OUTPUT_TOKENS, integer=True)
    md = body.get("metadata")
    if md is not None and not isinstance(md, dict):
        raise _bad("metadata", "must be an object")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("instructions", "must be a string")

    messages: list[Json] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    messages.extend(_messages(body.get("input")))
    messages = _one_leading_system(messages)
    if not messages:
        raise _bad("input", "is required (a string or an array of input items)")
    if len(messages) > max_messages:
        raise _bad("input", f"makes {len(messages)} chat messages; the limit is {max_messages}")

    chat: Json = {"model": model, "messages": messages}
    for name in ("temperature", "top_p", "parallel_tool_calls", "user", "cascade"):
        if body.get(name) is not None:
            chat[name] = body[name]
    for name in ("service_tier", "safety_identifier", "prompt_cache_key"):  # the same in chat
        v = body.get(name)
        if v is not None and not isinstance(v, str):
            raise _bad(name, "must be a string")
        if v is not None:
            chat[name] = v
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    tc = _tool_choice(body.get("tool_choice"))
    if tc is not None:
        chat["tool_choice"] = tc
    rf = _response_format(body.get("text"))
    if rf is not None:
        chat["response_format"] = rf
    verbosity = _verbosity(body.get("text"))
    if verbosity is not None:
        chat["verbosity"] = verbosity
    effort = _reasoning_effort(body.get("reasoning"))
    if effort is not None:
        chat["reasoning_effort"] = effort
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


# --- input items -----------------------------------------------------------------------------------------


def _messages(value: object) -> list[Json]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _bad("input", "must be a string or an array of input items")
    out: list[Json] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(where, "must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            msg = _message(item, where)
            if msg is not None:
                out.append(msg)
        elif kind == "function_call":
            _function_call(item, where, out)
        elif kind == "function_call_output":
            out.append(_function_output(item, where))
        elif kind == "reasoning":
            continue  # a model's reasoning passed back: chat upstreams take none, and need none
        elif kind == "item_reference":
            raise _stateless(f"{where}.type", "an item_reference (a stored item)")
        else:
            raise _bad(
                f"{where}.type",
                f"'{str(kind)[:64]}' is not supported; input items are messages, function_call and "
                "function_call_output",
                code="unsupported_value",
            )
    return out


def _one_leading_system(messages: list[Json]) -> list[Json]:
    """``instructions`` and leading system/developer inputs as one system message: many chat templates
    (Mistral's, Gemma's, ...) accept a single system message, first."""
    k = 0
    while k < len(messages) and messages[k]["role"] == "system" and isinstance(messages[k]["content"], str):
        k += 1
    if k < 2:
        return messages
    joined = "\n\n".join(m["content"] for m in messages[:k] if m["content"])
    return [{"role": "system", "content": joined}, *messages[k:]]


def _message(item: Json, where: str) -> Json | None:
    role = item.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise _bad(f"{where}.role", "must be one of user, assistant, system, developer")
    chat_role = _ROLES[role]
    content = item.get("content")
    if isinstance(content, str):
        return {"role": chat_role, "content": content}
    if not isinstance(content, list):
        raise _bad(f"{where}.content", "must be a string or an array of content parts")
    parts = [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
    if chat_role != "user" or all(p["type"] == "text" for p in parts):
        # Only user messages take images and files in chat; everywhere else the text is what counts.
        if chat_role != "user" and any(p["type"] != "text" for p in parts):
            raise _bad(f"{where}.content", f"a {role} message can only carry text parts")
        # Parts are separate pieces of text (an answer and its refusal, a question and a document):
        # one line break between them, not run together ("hello" + "nope" is not "hellonope").
        text = "\n".join(p["text"] for p in parts if p["text"])
        if chat_role == "assistant" and not text:
            return None
        return {"role": chat_role, "content": text}
    return {"role": chat_role, "content": parts}


def _part(p: object, where: str) -> Json:
    if not isinstance(p, dict):
        raise _bad(where, "must be an object")
    kind = p.get("type")
    if kind in ("input_text", "output_text", "text"):
        text = p.get("text")
        if not isinstance(text, str):
            raise _bad(f"{where}.text", "is required and must be a string")
        return {"type": "text", "text": text}
    if kind == "refusal":
        refusal = p.get("refusal")
        return {"type": "text", "text": refusal if isinstance(refusal, str) else ""}
    if kind == "input_image":
        url = p.get("image_url")
        if not isinstance(url, str) or not url:
            raise _bad(
                f"{where}.image_url",
                "is required: a URL or a data: URL (file_id needs OpenAI's file store, which this "
                "proxy does not have)",
            )
        image: Json = {"url": url}
        if isinstance(p.get("detail"), str) and p["detail"] in ("low", "high", "auto"):
            image["detail"] = p["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        data = p.get("file_data")
        if not isinstance(data, str) or not data:
            raise _bad(f"{where}.file_data", "is required (file_id and file_url are not supported)")
        file: Json = {"file_data": data}
        if isinstance(p.get("filename"), str):
            file["filename"] = p["filename"]
        return {"type": "file", "file": file}
    raise _bad(f"{where}.type", f"'{str(kind)[:64]}' is not a supported content part", "unsupported_value")


def _function_call(item: Json, where: str, out: list[Json]) -> None:
    call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{where}.call_id", "is required and must be a string")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}.name", "is required and must be a string")
    if not isinstance(args, str):
        raise _bad(f"{where}.arguments", "is required and must be a JSON string")
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
    last = out[-1] if out else None
    # Calls made in one turn (parallel calls, or text then calls) are one assistant message in chat.
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        # content "" rather than null: llama-cpp-python's server rejects a null assistant content.
        out.append({"role": "assistant", "content": "", "tool_calls": [call]})


def _function_output(item: Json, where: str) -> Json:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{where}.call_id", "is required and must be a string")
    output = item.get("output")
    if isinstance(output, list):
        texts = []
        for j, p in enumerate(output):
            part = _part(p, f"{where}.output[{j}]")
            if part["type"] != "text":
                raise _bad(f"{where}.output[{j}].type", "only text parts can be a function's output")
            texts.append(part["text"])
        output = "".join(texts)
    if not isinstance(output, str):
        raise _bad(f"{where}.output", "is required: a string or an array of input_text parts")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


# --- tools and formats -----------------------------------------------------------------------------------


def _tools(value: object) -> list[Json]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("tools", "must be an array")
    out: list[Json] = []
    for i, t in enumerate(value):
        if not isinstance(t, dict):
            raise _bad(f"tools[{i}]", "must be an object")
        kind = t.get("type")
        if kind != "function":
            raise _bad(
                f"tools[{i}].type",
                f"'{str(kind)[:64]}' tools are not supported: this proxy forwards function tools only",
                code="unsupported_value",
            )
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name", "is required and must be a string")
        fn: Json = {"name": name}
        desc = t.get("description")
        if isinstance(desc, str):
            fn["description"] = desc
        params = t.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _bad(f"tools[{i}].parameters", "must be a JSON schema object")
        fn["parameters"] = params if params is not None else {"type": "object", "properties": {}}
        strict = t.get("strict")
        if isinstance(strict, bool):
            fn["strict"] = strict
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(value: object) -> object:
    if value is None:
        return None
    if value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if not isinstance(name, str) or not name:
            raise _bad("tool_choice.name", "is required and must be a string")
        return {"type": "function", "function": {"name": name}}
    if isinstance(value, dict) and value.get("type") == "allowed_tools":
        mode, tools = value.get("mode"), value.get("tools")
        if mode not in ("auto", "required") or not isinstance(tools, list):
            raise _bad("tool_choice", "allowed_tools needs mode (auto, required) and tools")
        names = [t.get("name") for t in tools if isinstance(t, dict) and t.get("type") == "function"]
        if len(names) != len(tools) or not all(isinstance(n, str) for n in names):
            raise _bad("tool_choice.tools", "only function tools can be allowed")
        allowed = [{"type": "function", "function": {"name": n}} for n in names]
        return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": allowed}}
    raise _bad("tool_choice", "must be auto, none, required, or a function tool choice")


def _response_format(text: object) -> Json | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _bad("text", "must be an object")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _bad("text.format", "must be an object")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        name, schema = fmt.get("name"), fmt.get("schema")
        if not isinstance(name, str) or not name:
            raise _bad("text.format.name", "is required and must be a string")
        if not isinstance(schema, dict):
            raise _bad("text.format.schema", "is required and must be a JSON schema object")
        js: Json = {"name": name, "schema": schema}
        for key in ("description", "strict"):
            if fmt.get(key) is not None:
                js[key] = fmt[key]
        return {"type": "json_schema", "json_schema": js}
    raise _bad("text.format.type", "must be text, json_object or json_schema")


def _verbosity(text: object) -> str | None:
    v = text.get("verbosity") if isinstance(text, dict) else None  # ``text`` itself: _response_format
    if v is not None and v not in ("low", "medium", "high"):
        raise _bad("text.verbosity", "must be low, medium or high")
    return v


def _reasoning_effort(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("reasoning", "must be an object")
    effort = value.get("effort")
    if effort is not None and not isinstance(effort, str):
        raise _bad("reasoning.effort", "must be a string")
    return effort
