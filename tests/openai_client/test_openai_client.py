"""Drives a running `kestrel serve` with the official `openai` Python package.

Run by tools/openai_client_test.sh, which starts the servers and sets:

  KESTREL_BASE_URL        a generate server, e.g. http://127.0.0.1:PORT/v1,
                          started with --limit-mm-per-prompt image=2
  KESTREL_EMBED_BASE_URL  a server started with --task embedding
                          (the embedding checks are skipped when unset)
  KESTREL_MODEL           the served name (default kestrel-tiny-qwen2-vl)

The built-in tiny Qwen2-VL has random weights, so its answers are noise: the
checks assert the shape of every answer and that answers agree with each
other (greedy is repeatable, a stream adds up to the full answer, base64 and
float embeddings are the same numbers), never what the text says.

Prints `ok <name>` per check and stops at the first failure with exit 1.
Plain Python; no test runner needed.
"""

import base64
import math
import os
import struct
import sys
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor

import openai
from openai.types import CreateEmbeddingResponse

from checks_structured import make_checks

MODEL = os.environ.get("KESTREL_MODEL", "kestrel-tiny-qwen2-vl")
BASE_URL = os.environ["KESTREL_BASE_URL"]
EMBED_BASE_URL = os.environ.get("KESTREL_EMBED_BASE_URL")

# The tiny model's LM hidden size (tests/fixtures/tiny-qwen2-vl/config.json
# text_config.hidden_size): the length of an embedding.
HIDDEN = int(os.environ.get("KESTREL_HIDDEN", "128"))
# --limit-mm-per-prompt image=2 in the runner.
IMAGE_LIMIT = 2

# Qwen2-VL image preprocessing (transformers
# models/qwen2_vl/image_processing_qwen2_vl.py `smart_resize`): sides are
# rounded to multiples of patch 14 x merge 2 = 28 within [min, max] pixels
# (the tiny model's preprocessor_config.json size), and each 28x28 block is
# one image token.
FACTOR = 28
MIN_PIXELS, MAX_PIXELS = 3136, 50176


def image_tokens(w, h):
    hb, wb = round(h / FACTOR) * FACTOR, round(w / FACTOR) * FACTOR
    if hb * wb > MAX_PIXELS:
        beta = math.sqrt(h * w / MAX_PIXELS)
        hb, wb = math.floor(h / beta / FACTOR) * FACTOR, math.floor(w / beta / FACTOR) * FACTOR
    elif hb * wb < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (h * w))
        hb, wb = math.ceil(h * beta / FACTOR) * FACTOR, math.ceil(w * beta / FACTOR) * FACTOR
    return (hb // FACTOR) * (wb // FACTOR)


def png(w, h, seed):
    """A valid 8-bit RGB PNG of w x h with a seed-dependent pattern (no Pillow)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(
        b"\x00" + bytes(v for x in range(w) for v in ((x * 7 + seed) & 255, (y * 5 + seed) & 255, (x ^ y) & 255))
        for y in range(h)
    )
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit depth, RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def data_url(w, h, seed):
    return "data:image/png;base64," + base64.b64encode(png(w, h, seed)).decode()


IMG_A = (56, 84)  # 2 x 3 = 6 image tokens
IMG_B = (84, 56)
URL_A = data_url(*IMG_A, seed=1)
URL_B = data_url(*IMG_B, seed=2)


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text):
    return {"type": "text", "text": text}


ONE_IMAGE = [{"role": "user", "content": [image_part(URL_A), text_part("What is in this picture?")]}]
TWO_IMAGES = [
    {
        "role": "user",
        "content": [
            text_part("Compare the first picture"),
            image_part(URL_A),
            text_part("with the second one"),
            image_part(URL_B),
            text_part("in one sentence."),
        ],
    }
]


class CheckFailed(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def client(base_url):
    # No retries: a 5xx or a dropped connection must fail the check, not be
    # papered over. Generous timeout: CI runs a debug build on the CPU.
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def check_usage(u, min_prompt, what):
    expect(u is not None, f"{what}: no usage")
    expect(
        u.total_tokens == u.prompt_tokens + u.completion_tokens,
        f"{what}: usage total_tokens {u.total_tokens} != prompt {u.prompt_tokens} + completion {u.completion_tokens}",
    )
    expect(
        u.prompt_tokens > min_prompt,
        f"{what}: prompt_tokens {u.prompt_tokens} should exceed the {min_prompt} image tokens",
    )


def check_completion(r, max_tokens, min_prompt, what):
    expect(r.object == "chat.completion", f"{what}: object is {r.object!r}")
    expect(r.model == MODEL, f"{what}: model is {r.model!r}, expected {MODEL!r}")
    expect(len(r.choices) == 1, f"{what}: {len(r.choices)} choices, expected 1")
    c = r.choices[0]
    expect(c.index == 0, f"{what}: choice index {c.index}")
    expect(c.finish_reason in ("stop", "length"), f"{what}: finish_reason {c.finish_reason!r}")
    expect(c.message.role == "assistant", f"{what}: role {c.message.role!r}")
    expect(isinstance(c.message.content, str), f"{what}: content {c.message.content!r} is not a string")
    check_usage(r.usage, min_prompt, what)
    n = r.usage.completion_tokens
    expect(1 <= n <= max_tokens, f"{what}: completion_tokens {n} outside [1, {max_tokens}]")
    if c.finish_reason == "length":
        expect(n == max_tokens, f"{what}: finish_reason length after {n} of {max_tokens} tokens")


# ---- chat ----


def greedy(cl, messages, **kw):
    return cl.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8, **kw)


def chat_one_image(cl, state):
    r = greedy(cl, ONE_IMAGE)
    check_completion(r, 8, image_tokens(*IMG_A), "one image")
    again = greedy(cl, ONE_IMAGE)
    expect(
        again.choices[0].message.content == r.choices[0].message.content,
        f"temperature 0 is not repeatable: {r.choices[0].message.content!r} then {again.choices[0].message.content!r}",
    )
    expect(again.usage == r.usage, f"same request, different usage: {r.usage} then {again.usage}")
    state["one_image"] = r


def chat_two_images(cl, state):
    r = greedy(cl, TWO_IMAGES)
    check_completion(r, 8, image_tokens(*IMG_A) + image_tokens(*IMG_B), "two images")
    one = state["one_image"].usage.prompt_tokens
    expect(
        r.usage.prompt_tokens >= one + image_tokens(*IMG_B),
        f"two images: prompt_tokens {r.usage.prompt_tokens} is not at least one image's {one} "
        f"+ {image_tokens(*IMG_B)} image tokens",
    )
    state["two_images"] = r


def chat_stream(cl, state):
    full = state["one_image"]
    chunks = list(greedy(cl, ONE_IMAGE, stream=True, stream_options={"include_usage": True}))
    expect(len(chunks) >= 2, f"stream: {len(chunks)} chunks")
    for i, ch in enumerate(chunks):
        expect(ch.object == "chat.completion.chunk", f"stream: chunk {i} object {ch.object!r}")
        expect(ch.model == MODEL, f"stream: chunk {i} model {ch.model!r}")
        expect(ch.id == chunks[0].id, f"stream: chunk {i} id {ch.id!r} != first chunk's {chunks[0].id!r}")
    last, body = chunks[-1], chunks[:-1]
    expect(last.choices == [], f"stream: last chunk has choices {last.choices}")
    expect(last.usage is not None, "stream: last chunk has no usage")
    expect(last.usage == full.usage, f"stream usage {last.usage} != non-streaming usage {full.usage}")
    for i, ch in enumerate(body):
        expect(ch.usage is None, f"stream: chunk {i} (not the last) carries usage {ch.usage}")
        expect(len(ch.choices) == 1 and ch.choices[0].index == 0, f"stream: chunk {i} choices {ch.choices}")
    expect(body[0].choices[0].delta.role == "assistant", f"stream: first delta {body[0].choices[0].delta}")
    finishes = [ch.choices[0].finish_reason for ch in body if ch.choices[0].finish_reason is not None]
    expect(len(finishes) == 1, f"stream: {len(finishes)} chunks carry a finish_reason: {finishes}")
    expect(
        finishes[0] == full.choices[0].finish_reason,
        f"stream finish_reason {finishes[0]!r} != non-streaming {full.choices[0].finish_reason!r}",
    )
    expect(
        body[-1].choices[0].finish_reason is not None,
        "stream: the finish_reason is not on the last choice chunk",
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in body)
    expect(
        text == full.choices[0].message.content,
        f"stream deltas add up to {text!r}, non-streaming answer is {full.choices[0].message.content!r}",
    )


def chat_concurrent(cl, state):
    """Requests in flight together (batched by the engine) answer as they do
    alone: greedy decoding on the CPU does not depend on the batch."""
    asks = [ONE_IMAGE, TWO_IMAGES] * 3
    with ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(lambda m: greedy(cl, m), asks))
    for i, (m, r) in enumerate(zip(asks, got)):
        alone = state["one_image" if m is ONE_IMAGE else "two_images"]
        expect(
            r.choices[0].message.content == alone.choices[0].message.content and r.usage == alone.usage,
            f"concurrent request {i}: {r.choices[0].message.content!r} ({r.usage}), "
            f"alone: {alone.choices[0].message.content!r} ({alone.usage})",
        )


def models_list(cl, state):
    ids = [m.id for m in cl.models.list()]
    expect(MODEL in ids, f"models.list() gives {ids}, without {MODEL!r}")


# ---- errors ----


def expect_error(cls, status, mentions, call, what):
    """`call` must raise `cls` with `status`, and the error message must
    mention `mentions` (case-insensitive), so that it failed for the reason
    the check means."""
    try:
        r = call()
    except cls as e:
        expect(e.status_code == status, f"{what}: status {e.status_code}, expected {status}")
        msg = e.body.get("message") if isinstance(e.body, dict) else None
        expect(isinstance(msg, str) and msg, f"{what}: error body {e.body!r} has no message")
        expect(mentions.lower() in msg.lower(), f"{what}: error message {msg!r} does not mention {mentions!r}")
        return
    except openai.APIStatusError as e:
        raise CheckFailed(f"{what}: {type(e).__name__} (status {e.status_code}: {e.message}), expected {cls.__name__}")
    raise CheckFailed(f"{what}: succeeded ({r}), expected {cls.__name__} ({status})")


def error_too_many_images(cl, state):
    parts = [image_part(u) for u in (URL_A, URL_B, URL_A)] + [text_part("Three pictures.")]
    expect_error(
        openai.BadRequestError,
        400,
        "image",
        lambda: greedy(cl, [{"role": "user", "content": parts}]),
        f"{IMAGE_LIMIT + 1} images with --limit-mm-per-prompt image={IMAGE_LIMIT}",
    )
    # A streamed request is refused with the status, before any event.
    expect_error(
        openai.BadRequestError,
        400,
        "image",
        lambda: list(greedy(cl, [{"role": "user", "content": parts}], stream=True)),
        f"{IMAGE_LIMIT + 1} images, streamed",
    )


def error_bad_base64(cl, state):
    bad = [{"role": "user", "content": [image_part("data:image/png;base64,!!not*base64!!"), text_part("Hi")]}]
    expect_error(openai.BadRequestError, 400, "base64", lambda: greedy(cl, bad), "invalid base64 image")


def error_max_tokens_zero(cl, state):
    expect_error(
        openai.BadRequestError,
        400,
        "max_tokens",
        lambda: cl.chat.completions.create(model=MODEL, messages=ONE_IMAGE, max_tokens=0),
        "max_tokens=0",
    )


def error_unknown_model(cl, state):
    expect_error(
        openai.NotFoundError,
        404,
        "no-such-model",
        lambda: cl.chat.completions.create(model="no-such-model", messages=ONE_IMAGE, max_tokens=8),
        "unknown model",
    )


# ---- embeddings ----


def check_vector(v, n, what):
    expect(isinstance(v, list) and all(isinstance(x, float) for x in v), f"{what}: not a list of floats")
    expect(len(v) == n, f"{what}: {len(v)} values, expected {n}")
    norm = math.sqrt(sum(x * x for x in v))
    expect(abs(norm - 1) < 1e-3, f"{what}: norm {norm}, expected 1")


def chat_embedding(cl, **extra):
    """vLLM's chat-form embedding request: `messages` instead of `input`
    (vllm/entrypoints/openai/protocol.py `EmbeddingChatRequest`), which
    `embeddings.create` cannot send without an `input`."""
    body = {"model": MODEL, "messages": ONE_IMAGE, "encoding_format": "float", **extra}
    return cl.post("/embeddings", body=body, cast_to=CreateEmbeddingResponse)


def embed_text(cl, state):
    r = cl.embeddings.create(model=MODEL, input=["a red square", "two blue circles"], encoding_format="float")
    expect(r.object == "list", f"text embedding: object {r.object!r}")
    expect(r.model == MODEL, f"text embedding: model {r.model!r}")
    expect([d.index for d in r.data] == [0, 1], f"text embedding: indices {[d.index for d in r.data]}")
    for d in r.data:
        expect(d.object == "embedding", f"text embedding: data object {d.object!r}")
        check_vector(d.embedding, HIDDEN, f"text embedding {d.index}")
    expect(r.data[0].embedding != r.data[1].embedding, "two different texts got the same embedding")
    expect(r.usage.total_tokens == r.usage.prompt_tokens > 0, f"text embedding: usage {r.usage}")
    # Without encoding_format the client asks for base64 and decodes it itself.
    default = cl.embeddings.create(model=MODEL, input=["a red square", "two blue circles"])
    for d, f in zip(default.data, r.data):
        expect(close(d.embedding, f.embedding), f"text embedding {d.index}: client-decoded base64 != float")


def close(a, b, tol=1e-6):
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def embed_chat_image(cl, state):
    r = chat_embedding(cl)
    expect(len(r.data) == 1, f"chat embedding: {len(r.data)} vectors, expected 1")
    check_vector(r.data[0].embedding, HIDDEN, "chat embedding")
    expect(r.usage.total_tokens == r.usage.prompt_tokens, f"chat embedding: usage {r.usage}")
    expect(
        r.usage.prompt_tokens > image_tokens(*IMG_A),
        f"chat embedding: prompt_tokens {r.usage.prompt_tokens} should exceed {image_tokens(*IMG_A)} image tokens",
    )
    again = chat_embedding(cl)
    expect(close(again.data[0].embedding, r.data[0].embedding), "chat embedding: same request, different vector")
    state["chat_embedding"] = r.data[0].embedding


def embed_dimensions(cl, state):
    r = chat_embedding(cl, dimensions=16)
    check_vector(r.data[0].embedding, 16, "dimensions=16")
    t = cl.embeddings.create(model=MODEL, input="a red square", dimensions=16, encoding_format="float")
    check_vector(t.data[0].embedding, 16, "text, dimensions=16")


def embed_base64(cl, state):
    r = chat_embedding(cl, encoding_format="base64")
    b64 = r.data[0].embedding
    expect(isinstance(b64, str), f"base64 embedding is a {type(b64).__name__}, not a string")
    raw = base64.b64decode(b64, validate=True)
    expect(len(raw) == 4 * HIDDEN, f"base64 embedding: {len(raw)} bytes, expected {4 * HIDDEN} (f32)")
    v = list(struct.unpack(f"<{HIDDEN}f", raw))
    want = state["chat_embedding"]
    # The float form is the same f32 numbers printed as JSON; reading them
    # back must give the same f32 bits.
    f32 = list(struct.unpack(f"<{HIDDEN}f", struct.pack(f"<{HIDDEN}f", *want)))
    expect(v == f32, f"base64 decodes to {v[:4]}..., float form is {want[:4]}...")


def embed_models_list(cl, state):
    models_list(cl, state)


CHECKS = [
    (BASE_URL, [
        ("chat one image", chat_one_image),
        ("chat two images", chat_two_images),
        ("chat stream", chat_stream),
        ("chat concurrent", chat_concurrent),
        ("models list", models_list),
        ("error too many images", error_too_many_images),
        ("error invalid base64 image", error_bad_base64),
        ("error max_tokens 0", error_max_tokens_zero),
        ("error unknown model", error_unknown_model),
    ] + make_checks(expect, MODEL)),
    (EMBED_BASE_URL, [
        ("embeddings text", embed_text),
        ("embeddings chat image", embed_chat_image),
        ("embeddings dimensions", embed_dimensions),
        ("embeddings base64", embed_base64),
        ("embeddings models list", embed_models_list),
    ]),
]


def main():
    print(f"openai {openai.__version__}; generate server {BASE_URL}; embedding server {EMBED_BASE_URL}")
    passed, state = 0, {}
    for base_url, checks in CHECKS:
        if base_url is None:
            print(f"skip {', '.join(name for name, _ in checks)} (KESTREL_EMBED_BASE_URL not set)")
            continue
        cl = client(base_url)
        for name, check in checks:
            try:
                check(cl, state)
            except CheckFailed as e:
                print(f"FAIL {name}: {e}")
                print(f"openai_client: {passed} passed, 1 failed")
                return 1
            except Exception as e:  # an unexpected openai error or a bug here
                traceback.print_exc()
                print(f"FAIL {name}: {type(e).__name__}: {e}")
                print(f"openai_client: {passed} passed, 1 failed")
                return 1
            print(f"ok {name}", flush=True)
            passed += 1
    print(f"openai_client: {passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
