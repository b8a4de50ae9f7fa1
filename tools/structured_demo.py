#!/usr/bin/env python3
"""A JSON-schema answer and tool calls from a running OpenAI-compatible
server, through the official `openai` package, printed for a person to read:

    python3 tools/structured_demo.py BASE_URL [--model NAME]

1. response_format json_schema (strict), plain and streamed: the answer,
   parsed and checked against the schema;
2. the client's own helper, `chat.completions.parse` into a pydantic model;
3. tool_choice a named function, then "required" (streamed), with their
   calls and arguments;
4. a second turn that sends the call and its result back.

Exits 1 if an answer does not validate. With random weights the words are
noise; the structure is the point (the constraint, not the model, makes it).
"""
import argparse
import json
import sys
from typing import Literal

import openai
from pydantic import BaseModel, Field

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "celsius": {"type": "integer", "minimum": -60, "maximum": 60},
        "sky": {"enum": ["clear", "cloudy", "rain", "snow"]},
    },
    "required": ["city", "celsius", "sky"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    }
]
ASK = [{"role": "user", "content": "What is the weather in Oslo? Answer as JSON."}]


class Weather(BaseModel):
    city: str = Field(max_length=20)
    celsius: int = Field(ge=-60, le=60)
    sky: Literal["clear", "cloudy", "rain", "snow"]


def check(text):
    v = json.loads(text)
    assert sorted(v) == ["celsius", "city", "sky"], v
    assert isinstance(v["city"], str) and len(v["city"]) <= 20, v
    assert isinstance(v["celsius"], int) and -60 <= v["celsius"] <= 60, v
    assert v["sky"] in SCHEMA["properties"]["sky"]["enum"], v
    return v


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base_url")
    p.add_argument("--model")
    a = p.parse_args()
    cl = openai.OpenAI(base_url=a.base_url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=300)
    model = a.model or cl.models.list().data[0].id
    print(f"openai {openai.__version__}; model {model}")
    # Compact JSON (vLLM's disable_any_whitespace) keeps a random-weight model from wandering in whitespace.
    compact = {"structured_outputs": {"disable_any_whitespace": True}}
    rf = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    extra = {}
    r = cl.chat.completions.create(model=model, messages=ASK, response_format=rf, max_tokens=200, seed=1)
    c = r.choices[0]
    print(f"json_schema: finish_reason={c.finish_reason} tokens={r.usage.completion_tokens}\n  {c.message.content!r}")
    if c.finish_reason == "length":
        # Any whitespace (vLLM's default) lets a random-weight model wander;
        # compact JSON (disable_any_whitespace) cannot.
        extra = compact
        r = cl.chat.completions.create(
            model=model, messages=ASK, response_format=rf, max_tokens=200, seed=1, extra_body=extra
        )
        c = r.choices[0]
        print(f"json_schema, compact: finish_reason={c.finish_reason}\n  {c.message.content}")
    check(c.message.content)
    text = "".join(
        ch.choices[0].delta.content or ""
        for ch in cl.chat.completions.create(
            model=model, messages=ASK, response_format=rf, max_tokens=200, seed=1, stream=True, extra_body=extra
        )
        if ch.choices
    )
    print(f"json_schema streamed: {'same as whole' if text == c.message.content else 'DIFFERENT: ' + text}")
    check(text)
    r = cl.chat.completions.parse(
        model=model, messages=ASK, response_format=Weather, max_tokens=200, seed=2, extra_body=extra
    )
    print(f"parse -> {r.choices[0].message.parsed!r}")
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = cl.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=120, seed=3)
    call = r.choices[0].message.tool_calls[0]
    print(f"tool_choice named: finish_reason={r.choices[0].finish_reason}\n  {call.model_dump_json()}")
    args = json.loads(call.function.arguments)
    assert sorted(args) == ["city", "unit"], args
    calls, finish = {}, None
    for ch in cl.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, seed=4, stream=True,
        parallel_tool_calls=False,
    ):
        if ch.choices:
            for tc in ch.choices[0].delta.tool_calls or []:
                e = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                e["name"] += tc.function.name or ""
                e["arguments"] += tc.function.arguments or ""
            finish = ch.choices[0].finish_reason or finish
    print(f"tool_choice required, streamed: finish_reason={finish}\n  {json.dumps(calls)}")
    assert finish == "tool_calls" and calls, calls
    json.loads(calls[0]["arguments"])
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21, "sky": "clear"})},
    ]
    r = cl.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=16, seed=5)
    print(f"turn two (call + result sent back): prompt_tokens={r.usage.prompt_tokens} "
          f"finish_reason={r.choices[0].finish_reason}")
    print("structured_demo: ok")


if __name__ == "__main__":
    try:
        main()
    except (AssertionError, json.JSONDecodeError) as e:
        print(f"structured_demo: FAILED: {e!r}")
        sys.exit(1)
