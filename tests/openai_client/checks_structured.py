"""Structured outputs and tool calling through the official `openai` client
(imported by test_openai_client.py, which runs them against the generate
server). The tiny model's weights are random: only the constraint makes an
answer valid, so every answer must parse and validate against its schema,
and every forced tool call must carry valid arguments.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from pydantic import BaseModel, Field

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "celsius": {"type": "integer", "minimum": -40, "maximum": 50},
        "sky": {"enum": ["clear", "cloudy", "rain"]},
    },
    "required": ["city", "celsius", "sky"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA, "strict": True}}
ASK = [{"role": "user", "content": "The weather in Oslo, as JSON."}]


class Weather(BaseModel):
    city: str = Field(max_length=10)
    celsius: int = Field(ge=-40, le=50)
    sky: Literal["clear", "cloudy", "rain"]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["utc", "cet"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]


def make_checks(expect, MODEL):
    def valid_weather(text, what):
        try:
            v = json.loads(text)
        except json.JSONDecodeError as e:
            expect(False, f"{what}: not JSON ({e}): {text!r}")
        expect(isinstance(v, dict) and sorted(v) == ["celsius", "city", "sky"], f"{what}: keys of {v!r}")
        expect(isinstance(v["city"], str) and len(v["city"]) <= 10, f"{what}: city in {v!r}")
        expect(isinstance(v["celsius"], int) and -40 <= v["celsius"] <= 50, f"{what}: celsius in {v!r}")
        expect(v["sky"] in ("clear", "cloudy", "rain"), f"{what}: sky in {v!r}")

    def valid_call(call, what):
        expect(call.type == "function" and call.id.startswith("call_"), f"{what}: {call}")
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            expect(sorted(args) == ["city", "unit"] and len(args["city"]) <= 8, f"{what}: {args}")
            expect(args["unit"] in ("c", "f"), f"{what}: {args}")
        else:
            expect(call.function.name == "get_time" and args.get("zone") in ("utc", "cet"), f"{what}: {call}")
        return args

    def json_schema_n2(cl, state):
        r = cl.chat.completions.create(
            model=MODEL, messages=ASK, response_format=RESPONSE_FORMAT, n=2, seed=3, max_tokens=150
        )
        expect(len(r.choices) == 2, f"{len(r.choices)} choices")
        for c in r.choices:
            expect(c.finish_reason == "stop", f"finish_reason {c.finish_reason}")
            valid_weather(c.message.content, f"choice {c.index}")

    def json_schema_stream(cl, state):
        kw = dict(model=MODEL, messages=ASK, response_format=RESPONSE_FORMAT, seed=4, max_tokens=150)
        whole = cl.chat.completions.create(**kw).choices[0].message.content
        text = "".join(
            ch.choices[0].delta.content or "" for ch in cl.chat.completions.create(stream=True, **kw) if ch.choices
        )
        expect(text == whole, f"streamed {text!r} != whole {whole!r}")
        valid_weather(text, "streamed")

    def parse_pydantic(cl, state):
        # The client's own structured-output helper: a strict schema from the
        # pydantic model, and the answer parsed back into it.
        r = cl.chat.completions.parse(model=MODEL, messages=ASK, response_format=Weather, seed=5, max_tokens=150)
        p = r.choices[0].message.parsed
        expect(isinstance(p, Weather), f"parsed is {p!r}")
        expect(p.sky in ("clear", "cloudy", "rain") and -40 <= p.celsius <= 50, f"{p!r}")

    def beside_free_requests(cl, state):
        free = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=16)
        alone = cl.chat.completions.create(**free).choices[0].message.content

        def one(i):
            if i % 2:
                return cl.chat.completions.create(**free).choices[0].message.content
            r = cl.chat.completions.create(
                model=MODEL, messages=ASK, response_format=RESPONSE_FORMAT, seed=i, max_tokens=150
            )
            valid_weather(r.choices[0].message.content, f"constrained {i}")
            return None

        with ThreadPoolExecutor(8) as ex:
            for got in ex.map(one, range(8)):
                expect(got is None or got == alone, f"a free answer changed beside constrained ones: {got!r}")

    def guided_extras(cl, state):
        r = cl.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=20, extra_body={"guided_choice": ["yes", "no"]}, seed=1
        )
        expect(r.choices[0].message.content in ("yes", "no"), f"{r.choices[0].message.content!r}")
        r = cl.completions.create(
            model=MODEL, prompt="Call", max_tokens=20, extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"}, seed=2
        )
        t = r.choices[0].text
        expect(len(t) == 8 and t[3] == "-" and (t[:3] + t[4:]).isdigit(), f"{t!r}")

    def bad_schema_is_400(cl, state):
        import openai

        try:
            cl.chat.completions.create(
                model=MODEL,
                messages=ASK,
                max_tokens=5,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
            )
        except openai.BadRequestError as e:
            expect(e.status_code == 400 and "JSON schema" in str(e), f"{e}")
            return
        expect(False, "an invalid schema was accepted")

    def tool_named(cl, state):
        choice = {"type": "function", "function": {"name": "get_weather"}}
        r = cl.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, seed=6, max_tokens=80)
        m = r.choices[0].message
        expect(len(m.tool_calls or []) == 1 and m.tool_calls[0].function.name == "get_weather", f"{m}")
        valid_call(m.tool_calls[0], "named")
        state["call_message"] = m

    def tool_required_stream(cl, state):
        # One call (parallel_tool_calls false): a random model may write many otherwise.
        kw = dict(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            seed=7,
            max_tokens=120,
        )
        whole = cl.chat.completions.create(**kw).choices[0]
        expect(whole.finish_reason == "tool_calls", f"finish_reason {whole.finish_reason}")
        calls, finish = {}, None
        for ch in cl.chat.completions.create(stream=True, **kw):
            if not ch.choices:
                continue
            for tc in ch.choices[0].delta.tool_calls or []:
                c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                c["name"] += (tc.function.name or "") if tc.function else ""
                c["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = ch.choices[0].finish_reason or finish
        expect(finish == "tool_calls", f"streamed finish_reason {finish}")
        got = [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)]
        want = [(c.function.name, valid_call(c, "required")) for c in whole.message.tool_calls]
        expect(got == want, f"streamed calls {got} != whole {want}")

    def tool_round_trip(cl, state):
        m = state["call_message"]
        call = m.tool_calls[0]
        messages = ASK + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21})},
        ]
        r = cl.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=8, seed=8)
        first = cl.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=1).usage.prompt_tokens
        expect(r.usage.prompt_tokens > first + 10, f"turn two's prompt ({r.usage.prompt_tokens}) lacks the call")

    def tool_auto_hermes(cl, state):
        # A regex makes the random model write a Hermes block, so "auto" has one to read.
        rx = r'<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "(utc|cet)"\}\}\n</tool_call>'
        r = cl.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, max_tokens=150, extra_body={"guided_regex": rx}, seed=9
        )
        c = r.choices[0]
        expect(c.finish_reason == "tool_calls" and c.message.content is None, f"{c}")
        expect(len(c.message.tool_calls) == 1, f"{c}")
        valid_call(c.message.tool_calls[0], "auto")

    return [
        ("structured json_schema n=2", json_schema_n2),
        ("structured json_schema streamed", json_schema_stream),
        ("structured parse into pydantic", parse_pydantic),
        ("structured beside free requests", beside_free_requests),
        ("structured guided_choice and guided_regex", guided_extras),
        ("structured bad schema is 400", bad_schema_is_400),
        ("tools named function", tool_named),
        ("tools required, streamed", tool_required_stream),
        ("tools round trip", tool_round_trip),
        ("tools auto (hermes)", tool_auto_hermes),
    ]
