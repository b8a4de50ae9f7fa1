#!/usr/bin/env python3
"""One chat request with an image (as a data URL) to an OpenAI-compatible
server, the way vLLM's docs send one: with the official `openai` package when
it is installed, else with the standard library (urllib) and the same JSON.

    python3 tools/chat_image_client.py BASE_URL IMAGE [IMAGE ...] [--prompt TEXT] [--max-tokens 32]
                                       [--model NAME] [--no-stream] [--embeddings]

BASE_URL is the server root (http://127.0.0.1:8000). The model name is the
first one /v1/models lists unless --model is given. Sends the request once
plain and once streamed (stream_options.include_usage) and prints both
answers with their token counts; exits 1 if either is empty or fails.
Several images go in one message, in order, before the text (vLLM's
multi-image example). With --embeddings it instead posts the message to
/v1/embeddings as vLLM's guide does for VLM2Vec (`requests.post` with
`messages`; urllib here), then the text alone and the image alone, and
prints each vector's size, norm and first values.
"""
import argparse
import base64
import json
import mimetypes
import sys
import urllib.request


def data_url(path):
    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def messages(images, prompt):
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    if prompt:
        parts.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": parts}]


def embeddings(args):
    base = args.base_url.rstrip("/")
    model = args.model or json.load(urllib.request.urlopen(base + "/v1/models", timeout=60))["data"][0]["id"]
    print(f"model: {model} (POST /v1/embeddings with messages)")
    ok = True
    for kind, imgs, text in [("image + text", args.image, args.prompt), ("text only", [], args.prompt),
                             ("image only", args.image[:1], "")]:
        body = {"model": model, "messages": messages(imgs, text), "encoding_format": "float"}
        r = json.load(post(base + "/v1/embeddings", body))
        v = r["data"][0]["embedding"]
        norm = sum(x * x for x in v) ** 0.5
        print(f"{kind}: {len(v)} values, norm {norm:.6f}, prompt tokens {r['usage']['prompt_tokens']}, "
              f"first {[round(x, 5) for x in v[:4]]}")
        ok &= len(v) > 0 and abs(norm - 1) < 1e-3
    return ok


def with_openai(args, msgs):
    import openai
    client = openai.OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key="EMPTY", timeout=600)
    print(f"client: openai {openai.__version__}")
    model = args.model or client.models.list().data[0].id
    print(f"model: {model}")
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=args.max_tokens, temperature=0)
    answers = [(r.choices[0].message.content, r.choices[0].finish_reason, r.usage.prompt_tokens,
                r.usage.completion_tokens)]
    if args.stream:
        parts, finish, usage = [], None, None
        for chunk in client.chat.completions.create(model=model, messages=msgs, max_tokens=args.max_tokens,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        answers.append(("".join(parts), finish, usage and usage.prompt_tokens, usage and usage.completion_tokens))
    return answers


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


def with_urllib(args, msgs):
    print("client: urllib (no openai package here)")
    base = args.base_url.rstrip("/")
    model = args.model or json.load(urllib.request.urlopen(base + "/v1/models", timeout=60))["data"][0]["id"]
    print(f"model: {model}")
    body = {"model": model, "messages": msgs, "max_tokens": args.max_tokens, "temperature": 0}
    r = json.load(post(base + "/v1/chat/completions", body))
    answers = [(r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"],
                r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"])]
    if args.stream:
        parts, finish, usage = [], None, {}
        with post(base + "/v1/chat/completions",
                  dict(body, stream=True, stream_options={"include_usage": True})) as resp:
            for line in resp:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    parts.append(chunk["choices"][0]["delta"].get("content") or "")
                    finish = chunk["choices"][0].get("finish_reason") or finish
                usage = chunk.get("usage") or usage
        answers.append(("".join(parts), finish, usage.get("prompt_tokens"), usage.get("completion_tokens")))
    return answers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("image", nargs="+")
    ap.add_argument("--prompt", default="What is shown in this image?")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model")
    ap.add_argument("--no-stream", dest="stream", action="store_false")
    ap.add_argument("--embeddings", action="store_true")
    args = ap.parse_args()
    if args.embeddings:
        sys.exit(0 if embeddings(args) else 1)
    msgs = messages(args.image, args.prompt)
    try:
        import openai  # noqa: F401
        have_openai = True
    except ImportError:
        have_openai = False
    answers = (with_openai if have_openai else with_urllib)(args, msgs)
    ok = True
    for kind, (text, finish, n_in, n_out) in zip(["chat", "chat, streamed"], answers):
        print(f"{kind}: {n_in} prompt tokens, {n_out} completion tokens, finish_reason {finish}")
        print(f"  {text!r}")
        ok &= bool(text) and bool(n_out)
    if len(answers) == 2 and answers[0][0] != answers[1][0]:
        print("note: the streamed answer differs from the plain one (both greedy)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
