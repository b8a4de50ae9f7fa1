#!/usr/bin/env python3
"""Builds the tiny Llama-style tokenizer of the tiny random LLaVA-1.5.

    python3 tools/make_tiny_llava_tokenizer.py OUT_DIR [--pad-vocab-to N] [--check]

Writes OUT_DIR/{tokenizer.json, tokenizer_config.json, special_tokens_map.json}
(tools/make_tiny_llava.py calls `write_tokenizer` for its model folders).

The tokenizer is shaped like Llama-2's as transformers 5.x builds it for
`LlamaTokenizer` (the class llava-hf/llava-1.5-7b-hf names): a BPE with byte
fallback (`fuse_unk`, `<unk>`), no normalizer, a Metaspace pre-tokenizer
(replacement "▁", prepend_scheme "first", split false), the decoder
Replace("▁", " ") + ByteFallback + Fuse + Strip(1 leading space), and a
TemplateProcessing post-processor that prepends `<s>` (add_bos_token true,
add_eos_token false). transformers 5 rebuilds exactly this pipeline from the
vocab and merges of any tokenizer.json it loads as `LlamaTokenizer`, so the
file the Rust `tokenizers` crate reads and what HF runs are the same thing
(checked below on sample strings).

Vocabulary, in Llama's order: `<unk>`=0, `<s>`=1, `</s>`=2, the 256 byte
pieces `<0x00>`..`<0xFF>` = 3..258, then the pieces of a BPE trained here
with the `tokenizers` package on CORPUS (single characters first, then one
piece per merge). "\\n" is not in the training text (lines are fed one by
one), so it encodes as `<0x0A>` by byte fallback, as in Llama-2.
`--pad-vocab-to N` then appends unreachable filler pieces (no merge produces
them) up to N entries, so that N = 32000 gives the real Llama-2 id layout.
Last come LLaVA's added tokens, as in llava-hf/llava-1.5-7b-hf: `<image>`
(the first id after the base vocabulary) and `<pad>`, both special.

Deterministic: the same files every run (`--check` builds twice).
"""

import argparse
import json
import os
import sys

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

SPECIAL = ["<unk>", "<s>", "</s>"]
ADDED = ["<image>", "<pad>"]
# Trained BPE size including the 3 special tokens: 3 + 256 bytes + 509 = 768.
TRAINED_VOCAB_SIZE = 512

# Training text: plain English written for this fixture, with the words of
# chats about pictures and the LLaVA-1.5 prompt words (USER, ASSISTANT).
CORPUS = """\
USER: What is shown in this image? ASSISTANT: The image shows a small bird on a branch.
USER: Describe the picture in detail. ASSISTANT: A red car is parked next to a blue door.
USER: How many people are in the room? ASSISTANT: There are three people in the room.
USER: Compare the two images. ASSISTANT: The first image is brighter than the second one.
USER: Read the text on the sign. ASSISTANT: The sign says that the shop opens at nine.
A chat between a curious human and an artificial intelligence assistant. The assistant gives
helpful, detailed, and polite answers to the human's questions.
The kestrel hovers over the field and looks down at the grass. It is a small falcon with a long
tail, and it can hold itself still in the wind while it watches for a mouse. When it sees one, it
drops, and the picture changes fast.
You are a helpful assistant. The user sends a picture and asks a question about it. Describe this
image. What is in this picture? What do you see in the photo? Answer in one short sentence, then
explain the answer if the user asks for more.
A photo of a red car parked next to a blue door. Two cats sleep on a wooden table in the sun. There
is a dog on the beach, and a woman sits on the sand with her hand raised. The sky is clear and the
water is calm. A train crosses a bridge over a river at night, and the lights of the city shine on
the water. A man in a green jacket rides a bicycle down a narrow street. Children play with a ball
in the park while their parents talk on a bench under a large tree.
The vision encoder cuts the image into square patches of fourteen pixels. Each patch becomes a
vector, and the vectors pass through the layers of the encoder. A small network projects the
features of the second to last layer into the space of the language model, which then writes the
answer one token at a time. The server streams the tokens back to the user.
Colors and shapes: red, orange, yellow, green, blue, purple, black, white, gray, brown, pink. A
circle, a square, a triangle, a line, a dot, a star. The left side, the right side, the top, the
bottom, the center, the corner, the background, the foreground.
Numbers and dates: 1, 2, 3, 10, 42, 100, 2024, 3.14, 12:30, 1998-07-16.
Questions and answers: Is it raining? No, it is not. Where is the book? It is on the shelf, between
the lamp and the clock. Who wrote this letter? My friend wrote it last week, and she will write
again soon. Why is the sky blue? Because the air scatters blue light more than red light.
Tell me a story about a small bird. Once upon a time, a little bird lived in an old tree at the
edge of a quiet town. Every morning it sang to the baker, who gave it a few crumbs of fresh bread.
One day a storm broke the branch of its nest, and the baker built a small wooden house for the bird
above the door of the bakery. From that day on, the bird sang there, and people came from far away
to buy bread and hear its song.
"""


def train():
    """The trained BPE: (vocab {piece: id}, merges [(a, b)]); ids 0..2 are SPECIAL."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Training splits words on spaces (each gets its "▁"), so no piece spans a
    # word boundary, as with SentencePiece; the saved tokenizer does not split
    # (split=False, Llama's setting) and BPE then gives the same pieces.
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


def build(pad_vocab_to=None):
    """tokenizer.json as a dict, and the ids of the added tokens."""
    trained, merges = train()
    pieces = [p for p, _ in sorted(trained.items(), key=lambda kv: kv[1])]
    vocab = SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + pieces[len(SPECIAL):]
    assert len(set(vocab)) == len(vocab), "a trained piece collides with a byte piece"
    if pad_vocab_to is not None:
        if pad_vocab_to < len(vocab):
            sys.exit(f"--pad-vocab-to {pad_vocab_to} is below the trained size {len(vocab)}")
        # Unreachable: no merge yields them (ignore_merges is off, so a whole
        # word is never looked up in the vocabulary directly).
        vocab += [f"<unused{i}>" for i in range(pad_vocab_to - len(vocab))]
    n = len(vocab)
    added = [{"id": n + i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, c in enumerate(ADDED)]
    special = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, c in enumerate(SPECIAL)]
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


def tokenizer_config(tj):
    """Keys and values of llava-hf/llava-1.5-7b-hf's tokenizer_config.json, with these ids."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in tj["added_tokens"]
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

SAMPLES = [
    "USER: <image>\nWhat is shown in this image? ASSISTANT:",
    "USER: Compare\n<image>\nwith\n<image>\nplease. ASSISTANT:",
    "Tell me a story about a small bird.",
    "  two leading spaces, a tab\tand caf\u00e9 \u732b zebra-quokka 2025!",
    "A chat.</s>USER: hi<pad><unk> ASSISTANT:",
]


def dumps(obj):
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_tokenizer(out_dir, pad_vocab_to=None, check=False, verbose=True):
    """Writes the tokenizer files to out_dir; returns {"<image>": id, "<pad>": id, "vocab": size}."""
    tj, ids = build(pad_vocab_to)
    files = {
        "tokenizer.json": dumps(tj),
        "tokenizer_config.json": dumps(tokenizer_config(tj)),
        "special_tokens_map.json": dumps(SPECIAL_TOKENS_MAP),
    }
    if check and dumps(build(pad_vocab_to)[0]) != files["tokenizer.json"]:
        sys.exit("make_tiny_llava_tokenizer: two builds differ; training is not deterministic")
    os.makedirs(out_dir, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    vocab = max(ids.values()) + 1
    verify(out_dir, ids, vocab, verbose)
    return dict(ids, vocab=vocab)


def verify(out_dir, ids, vocab, verbose):
    """The `tokenizers` library (what Rust runs) and transformers' AutoTokenizer
    agree on the ids of SAMPLES, with BOS, and decode them back."""
    raw = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    assert raw.get_vocab_size(with_added_tokens=True) == vocab
    for t, i in ids.items():
        assert raw.token_to_id(t) == i, (t, i)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        print("transformers not installed: skipped the AutoTokenizer comparison", file=sys.stderr)
        return
    hf = AutoTokenizer.from_pretrained(out_dir)
    assert len(hf) == vocab, (len(hf), vocab)
    for s in SAMPLES:
        a = raw.encode(s).ids
        b = hf(s)["input_ids"]
        assert a == b, f"tokenizers and transformers disagree on {s!r}:\n{a}\n{b}"
        assert a[0] == 1 and a[-1] != 2, a
        back = hf.decode(b, skip_special_tokens=False)
        assert back == "<s>" + s or back == "<s> " + s, (s, back)  # transformers joins specials its own way
        assert raw.decode(a, skip_special_tokens=True) == hf.decode(b, skip_special_tokens=True), s
        if verbose:
            print(f"  {s!r}: {len(a)} tokens {a[:24]}{' ...' if len(a) > 24 else ''}")
    assert hf.convert_tokens_to_ids("<image>") == ids["<image>"]
    assert hf.pad_token_id == ids["<pad>"] and hf.bos_token_id == 1 and hf.eos_token_id == 2 and hf.unk_token_id == 0
    assert raw.token_to_id("\n") is None and 3 + 0x0A in raw.encode(SAMPLES[0]).ids, "'\\n' should be <0x0A>"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--pad-vocab-to", type=int, default=None, help="e.g. 32000 for Llama-2's id layout")
    ap.add_argument("--check", action="store_true", help="build twice and fail unless both builds are identical")
    args = ap.parse_args()
    info = write_tokenizer(args.out, args.pad_vocab_to, check=args.check)
    print(f"wrote {args.out}: vocab {info['vocab']}, <image> = {info['<image>']}, <pad> = {info['<pad>']}")


if __name__ == "__main__":
    main()
