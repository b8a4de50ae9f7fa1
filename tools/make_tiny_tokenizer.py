#!/usr/bin/env python3
"""Build the tiny Qwen2-VL tokenizer used by the CPU tests.

Writes src/model/builtin/tiny-qwen2-vl/{tokenizer.json, tokenizer_config.json,
chat_template.json}.

The tokenizer is a byte-level BPE shaped exactly like Qwen2's: the
normalizer, pre-tokenizer (Split on Qwen2's regex, then ByteLevel without its
own regex), post-processor and decoder are copied verbatim from the real Qwen
tokenizer.json, and so is the list of special tokens, in Qwen's order. Only
the vocabulary differs: it is trained here on a small built-in English text
(~480 entries), and the special tokens are appended right after it, so their
ids are small (the script prints them).

The real tokenizer.json comes from tools/fetch_qwen_tokenizer.sh (or pass
--qwen-dir). The chat template is the published Qwen2-VL-Instruct one (see
QWEN2_VL_CHAT_TEMPLATE below for where it was taken from).

Deterministic: the same files every run (checked by `--check`).

    python3 tools/make_tiny_tokenizer.py [--qwen-dir DIR] [--check]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "src", "model", "builtin", "tiny-qwen2-vl")

# Size of the trained BPE vocabulary: the 256 byte symbols plus ~224 merges.
BPE_VOCAB_SIZE = 480

# The Qwen2-VL-Instruct chat template, as published in the model's
# chat_template.json and tokenizer_config.json (Qwen/Qwen2-VL-2B-Instruct and
# -7B-Instruct carry the same one). Copied from transformers'
# tests/models/qwen2_vl/test_processor_qwen2_vl.py (`prepare_processor_dict`,
# which mirrors Qwen/Qwen2-VL-7B-Instruct); a copy of the 7B tokenizer_config.json
# quoted in a public write-up has the identical string.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text: plain English written for this fixture, with the words a
# chat about pictures tends to use, so that prompts split into few tokens.
CORPUS = """\
The kestrel hovers over the field and looks down at the grass. It is a small
falcon with a long tail, and it can hold itself still in the wind while it
watches for a mouse. When it sees one, it drops, and the picture changes fast.

You are a helpful assistant. The user sends a picture or a video and asks a
question about it. Describe this image. What is shown in this picture? What do
you see in the video? How many people are in the room? Read the text on the
sign. Answer in one short sentence, then explain the answer if the user asks.

A photo of a red car parked next to a blue door. Two cats sleep on a wooden
table in the sun. There is a dog on the beach, and a woman sits on the sand
with her hand raised. The sky is clear and the water is calm. A train crosses
a bridge over a river at night, and the lights of the city shine on the water.

The model reads the image as a grid of patches. Each patch becomes a vector,
and the vectors pass through the layers of the vision encoder. The merger joins
four patches into one token for the language model, which then writes the
answer one token at a time. The server streams the tokens back to the user.

Numbers and dates: 1, 2, 3, 10, 42, 100, 2024, 3.14, 12:30, 1998-07-16.
Questions and answers: Is it raining? No, it is not. Where is the book? It is
on the shelf, between the lamp and the clock. Who wrote this letter? My friend
wrote it last week, and she will write again soon.
"""


def load_real(qwen_dir):
    path = os.path.join(qwen_dir, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def special_tokens_of(real):
    """Qwen's special added tokens, in id order (<|endoftext|> ... <|video_pad|>)."""
    toks = sorted((t for t in real["added_tokens"] if t["special"]), key=lambda t: t["id"])
    ids = [t["id"] for t in toks]
    assert ids == list(range(ids[0], ids[0] + len(ids))), f"special ids are not contiguous: {ids}"
    assert toks[0]["content"] == "<|endoftext|>" and toks[-1]["content"] == "<|video_pad|>", toks
    return toks


def train(real):
    pre = real["pre_tokenizer"]
    split, byte_level = pre["pretokenizers"]
    assert split["type"] == "Split" and byte_level["type"] == "ByteLevel", pre
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split["pattern"]["Regex"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return json.loads(tok.to_str())


def build(real):
    trained = train(real)
    vocab = trained["model"]["vocab"]
    merges = trained["model"]["merges"]
    n = len(vocab)
    assert sorted(vocab.values()) == list(range(n)), "trained vocab ids are not 0..n-1"

    # The model section keeps Qwen's BPE options (dropout, unk, byte_fallback,
    # ignore_merges, ...) and only swaps in the trained vocab and merges.
    model = {k: v for k, v in real["model"].items()}
    model["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    model["merges"] = merges

    added = []
    for i, t in enumerate(special_tokens_of(real)):
        t = dict(t)
        t["id"] = n + i
        added.append(t)

    out = {}
    for key in real:
        if key == "model":
            out[key] = model
        elif key == "added_tokens":
            out[key] = added
        else:
            out[key] = real[key]  # version, truncation, padding, normalizer, pre_tokenizer, post_processor, decoder
    return out, added


def tokenizer_config(added):
    # Same keys and values as Qwen2-VL-Instruct's tokenizer_config.json, with
    # the tiny ids.
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(t["id"]): {
                "content": t["content"],
                "lstrip": t["lstrip"],
                "normalized": t["normalized"],
                "rstrip": t["rstrip"],
                "single_word": t["single_word"],
                "special": t["special"],
            }
            for t in added
        },
        "additional_special_tokens": [t["content"] for t in added if t["content"] != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": QWEN2_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "padding_side": "left",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def dumps(obj):
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qwen-dir", help="folder with the real Qwen tokenizer.json (default: fetch it)")
    ap.add_argument("--check", action="store_true", help="build twice and fail unless both builds are identical")
    ap.add_argument("--out", default=OUT_DIR)
    args = ap.parse_args()

    qwen_dir = args.qwen_dir or os.environ.get("KESTREL_QWEN_TOKENIZER_DIR")
    if not qwen_dir:
        script = os.path.join(ROOT, "tools", "fetch_qwen_tokenizer.sh")
        qwen_dir = subprocess.run([script], check=True, capture_output=True, text=True).stdout.strip()
    real = load_real(qwen_dir)

    tok_json, added = build(real)
    files = {
        "tokenizer.json": dumps(tok_json),
        "tokenizer_config.json": dumps(tokenizer_config(added)),
        "chat_template.json": dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}),
    }
    if args.check:
        again = dumps(build(real)[0])
        if again != files["tokenizer.json"]:
            sys.exit("make_tiny_tokenizer: two builds differ; training is not deterministic")

    # The tokenizers library must read back what we wrote and agree on the ids.
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "tokenizer.json")
        with open(p, "w", encoding="utf-8") as f:
            f.write(files["tokenizer.json"])
        back = Tokenizer.from_file(p)
    for t in added:
        assert back.token_to_id(t["content"]) == t["id"], t

    os.makedirs(args.out, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            f.write(text)

    print(f"BPE vocab {len(tok_json['model']['vocab'])}, merges {len(tok_json['model']['merges'])}, "
          f"len(tokenizer) {back.get_vocab_size(with_added_tokens=True)}")
    print("special tokens:")
    for t in added:
        print(f"  {t['id']:4d} {t['content']}")
    for name, text in files.items():
        print(f"wrote {os.path.relpath(os.path.join(args.out, name), ROOT)} ({len(text.encode())} bytes)")


if __name__ == "__main__":
    main()
