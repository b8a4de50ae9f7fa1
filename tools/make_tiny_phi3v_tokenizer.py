#!/usr/bin/env python3
"""Builds the tiny Llama-style tokenizer of the tiny random Phi-3.5-vision.

    python3 tools/make_tiny_phi3v_tokenizer.py OUT_DIR [--check] [--real-ids]

Writes OUT_DIR/{tokenizer.json, tokenizer_config.json, special_tokens_map.json}
(tools/make_tiny_phi3v.py calls `write_tokenizer`). Shaped like the
tiny-llava tokenizer (tools/make_tiny_llava_tokenizer.py): a BPE with byte
fallback, no normalizer, Metaspace("▁", prepend_scheme "first", split false),
decoder Replace + ByteFallback + Fuse + Strip(1 leading space), and a
TemplateProcessing post-processor that prepends `<s>` (add_bos_token true).
That is the pipeline transformers 5.x builds for `LlamaTokenizer` with
legacy false, so the Rust `tokenizers` crate reading tokenizer.json and HF's
AutoTokenizer give the same ids (checked below on sample strings).

Vocabulary: `<unk>`=0, `<s>`=1, `</s>`=2, the 256 byte pieces = 3..258, the
pieces of a BPE trained here on CORPUS, then Phi-3's added tokens in Phi-3's
order (real ids in brackets): `<|endoftext|>` [32000], `<|assistant|>`
[32001], `<|placeholder1..4|>` [32002..32005], `<|system|>` [32006],
`<|end|>` [32007], `<|placeholder5..6|>` [32008..32009], `<|user|>` [32010],
then `<|image|>` (real id 32044; the ids 32011..32043 between are further
added placeholders we do not reproduce). All added tokens are special, with
lstrip/rstrip/normalized false. The tokenizer has BASE + 12 entries; the
model's vocab_size is larger (rows no token maps to, as in the real model:
32064 rows for ~32045 tokens).

`--real-ids` (tools/phi3v_compare.py's full-size checkpoint) pads the base
vocabulary with unreachable pieces to 32000 and inserts invented added tokens
`<|placeholder7|>`..`<|placeholder39|>` so that the added tokens get their real
ids, `<|image|>` = 32044.

Deterministic: the same files every run (`--check` builds twice).
"""

import argparse
import json
import os
import sys

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

SPECIAL = ["<unk>", "<s>", "</s>"]
# Phi-3's added tokens in id order, then the image token.
ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
         "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
         "<|image|>"]
REAL_IDS = {"<|endoftext|>": 32000, "<|assistant|>": 32001, "<|system|>": 32006, "<|end|>": 32007,
            "<|user|>": 32010, "<|image|>": 32044}
# Trained BPE size including the 3 special tokens: base = 256 + 192 = 448.
TRAINED_VOCAB_SIZE = 192

# Training text: plain English written for this fixture, with the words of
# chats about pictures and of VLM2Vec's embedding instructions.
CORPUS = """\
What is shown in this image? The image shows a small bird on a branch.
Describe the picture in detail. A red car is parked next to a blue door.
How many people are in the room? There are three people in the room.
Compare the two images. The first image is brighter than the second one.
Read the text on the sign. The sign says that the shop opens at nine.
Represent the given image with the following question: What is in the image
Represent the given image. Find me an everyday image that matches the given caption: A cat and a dog.
Represent the given sentence for retrieval. A cat and a dog play in the garden near a tall tree.
You are a helpful assistant. The user sends a picture and asks a question about it. Answer in one
short sentence, then explain the answer if the user asks for more.
The kestrel hovers over the field and looks down at the grass. It is a small falcon with a long
tail, and it can hold itself still in the wind while it watches for a mouse.
A photo of a red car parked next to a blue door. Two cats sleep on a wooden table in the sun. There
is a dog on the beach, and a woman sits on the sand with her hand raised. The sky is clear and the
water is calm. A train crosses a bridge over a river at night, and the lights of the city shine on
the water. A man in a green jacket rides a bicycle down a narrow street.
The vision encoder cuts each crop of the image into square patches of fourteen pixels. Each patch
becomes a vector, and the vectors pass through the layers of the encoder. A small network projects
the features into the space of the language model, which then writes the answer one token at a time.
Colors and shapes: red, orange, yellow, green, blue, purple, black, white, gray, brown, pink. A
circle, a square, a triangle, a line, a dot, a star. The left side, the right side, the top, the
bottom, the center, the corner, the background, the foreground. A tall image and a wide image.
Numbers and dates: 1, 2, 3, 10, 42, 100, 2024, 3.14, 12:30, 1998-07-16.
Tell me a story about a small bird. Once upon a time, a little bird lived in an old tree at the
edge of a quiet town. Every morning it sang to the baker, who gave it a few crumbs of fresh bread.
"""


def train():
    """The trained BPE: (vocab {piece: id}, merges [(a, b)]); ids 0..2 are SPECIAL."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Training splits words on spaces so that no piece spans a word boundary
    # (as with SentencePiece); the saved tokenizer does not split.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=TRAINED_VOCAB_SIZE, min_frequency=1, show_progress=False,
                                  special_tokens=SPECIAL)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    assert sorted(vocab.values()) == list(range(len(vocab))), "trained vocab ids are not 0..n-1"
    assert [vocab[s] for s in SPECIAL] == [0, 1, 2], vocab
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges


def build(real_ids=False):
    """tokenizer.json as a dict, and {added token: id}. real_ids: pad the base
    vocabulary with unreachable pieces to 32000 and put invented
    `<|placeholder7..39|>` added tokens before `<|image|>`, so that the added
    tokens have the real ids (32000.., `<|image|>` = 32044)."""
    trained, merges = train()
    pieces = [p for p, _ in sorted(trained.items(), key=lambda kv: kv[1])]
    vocab = SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + pieces[len(SPECIAL):]
    assert len(set(vocab)) == len(vocab), "a trained piece collides with a byte piece"
    added_names = list(ADDED)
    if real_ids:
        # Unreachable: no merge yields them (ignore_merges is off).
        vocab += [f"<unused{i}>" for i in range(32000 - len(vocab))]
        added_names = ADDED[:-1] + [f"<|placeholder{7 + i}|>" for i in range(33)] + ADDED[-1:]
    n = len(vocab)

    def entry(i, c):
        return {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}
    added = [entry(n + i, c) for i, c in enumerate(added_names)]
    special = [entry(i, c) for i, c in enumerate(SPECIAL)]
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special + added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": {p: i for i, p in enumerate(vocab)},
            "merges": [list(m) for m in merges],
        },
    }
    return tj, {t["content"]: t["id"] for t in added}


# The chat template of microsoft/Phi-3.5-vision-instruct's tokenizer_config.json
# (the one of Phi-3-vision-128k-instruct; see tests/fixtures/tiny-phi3v/README.md
# for the sources). String content only; no BOS in the text.
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] "
                 "+ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != "
                 "'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}")


def tokenizer_config(tj):
    """The keys of Phi-3.5-vision-instruct's tokenizer_config.json, with these ids."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in tj["added_tokens"]
        },
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "processor_class": "Phi3VProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


# As in the real special_tokens_map.json (which lists <|end|> twice).
SPECIAL_TOKENS_MAP = {
    "additional_special_tokens": ["<|system|>", "<|end|>", "<|user|>", "<|end|>"],
    "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
}

SAMPLES = [
    "<|user|>\n",
    "\nWhat is shown in this image?<|end|>\n<|assistant|>\n",
    "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nTell me a story about a small bird.<|end|>\n",
    " Represent the given image with the following question: What is in the image",
    "A cat and a dog",
    "",
    "  two leading spaces, a tab\tand caf\u00e9 \u732b zebra-quokka 2025!",
    "<|image|><|endoftext|></s><unk>",
]


def dumps(obj):
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_tokenizer(out_dir, check=False, verbose=True, real_ids=False):
    """Writes the tokenizer files to out_dir; returns {added token: id, "base": n, "size": n + 12}."""
    tj, ids = build(real_ids)
    files = {
        "tokenizer.json": dumps(tj),
        "tokenizer_config.json": dumps(tokenizer_config(tj)),
        "special_tokens_map.json": dumps(SPECIAL_TOKENS_MAP),
    }
    if check and dumps(build(real_ids)[0]) != files["tokenizer.json"]:
        sys.exit("make_tiny_phi3v_tokenizer: two builds differ; training is not deterministic")
    os.makedirs(out_dir, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    size = max(ids.values()) + 1
    verify(out_dir, ids, size, verbose)
    if real_ids:
        assert all(ids[t] == i for t, i in REAL_IDS.items()), ids
    return dict(ids, base=min(ids.values()), size=size)


def verify(out_dir, ids, size, verbose):
    """The `tokenizers` library (what Rust runs) and transformers' AutoTokenizer
    (LlamaTokenizer)
    agree on SAMPLES (each with its BOS) and decode them back."""
    raw = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    assert raw.get_vocab_size(with_added_tokens=True) == size
    for t, i in ids.items():
        assert raw.token_to_id(t) == i, (t, i)
    # tokenizer_config.json names LlamaTokenizer (what AutoTokenizer and
    # Phi3VProcessor load); called by name so that a config.json with an
    # auto_map beside it does not ask about remote code.
    from transformers import LlamaTokenizer
    hf = LlamaTokenizer.from_pretrained(out_dir)
    assert len(hf) == size, (len(hf), size)
    for s in SAMPLES:
        a = raw.encode(s).ids
        b = hf(s)["input_ids"]
        assert a == b, f"tokenizers and transformers disagree on {s!r}:\n{a}\n{b}"
        assert a[0] == 1 and (len(a) == 1 or a[1] != 1), a
        assert raw.decode(a, skip_special_tokens=True) == hf.decode(b, skip_special_tokens=True), s
        if verbose:
            print(f"  {s!r}: {len(a)} tokens {a[:24]}{' ...' if len(a) > 24 else ''}")
    assert hf("")["input_ids"] == [1], "an empty chunk must tokenize to its BOS alone"
    assert hf.bos_token_id == 1 and hf.unk_token_id == 0
    assert hf.eos_token_id == ids["<|endoftext|>"] and hf.pad_token_id == ids["<|endoftext|>"]
    assert hf.convert_tokens_to_ids("<|image|>") == ids["<|image|>"]
    assert raw.token_to_id("\n") is None, "'\\n' should be <0x0A> (byte fallback)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--check", action="store_true", help="build twice and fail unless both builds are identical")
    ap.add_argument("--real-ids", action="store_true", help="the real id layout (32000.., <|image|> = 32044)")
    args = ap.parse_args()
    info = write_tokenizer(args.out, check=args.check, real_ids=args.real_ids)
    print(f"wrote {args.out}: {info['size']} tokens, added from {info['base']}, <|image|> = {info['<|image|>']}")


if __name__ == "__main__":
    main()
