#!/usr/bin/env python3
"""HF transformers baseline for `kestrel bench throughput`: the same workload
(one synthetic square image and ~INPUT_LEN one-token words per request,
exactly OUTPUT_LEN greedy tokens out) on the same checkpoint and card,
served the way transformers can: batched `generate` with left padding, one
batch of CONCURRENCY requests at a time.

    python3 tools/hf_throughput.py MODEL_DIR [--concurrency 1,8,64] [--batches 1]

Prints one line per concurrency: requests, req/s, output tok/s.
"""
import argparse
import time

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

WORDS = ["the", "cat", "sat", "on", "a", "red", "mat", "and", "looked", "at", "blue", "sky", "while", "it", "was",
         "warm"]


def request(i, input_len, side):
    rng = np.random.default_rng(i)
    text = " ".join(WORDS[j] for j in rng.integers(0, 16, input_len))
    img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return msgs, img


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--batches", type=int, default=1, help="batches timed per concurrency")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    t0 = time.time()
    model = Qwen2VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    proc = AutoProcessor.from_pretrained(args.model)
    proc.tokenizer.padding_side = "left"
    print(f"HF transformers on {torch.cuda.get_device_name()}: loaded in {time.time() - t0:.1f} s")
    print("concurrency  requests  req/s    out tok/s")
    for c in [int(x) for x in args.concurrency.split(",")]:
        def run(batch_ids):
            reqs = [request(i, args.input_len, args.image_size) for i in batch_ids]
            texts = [proc.apply_chat_template(m, add_generation_prompt=True) for m, _ in reqs]
            inputs = proc(text=texts, images=[img for _, img in reqs], padding=True, return_tensors="pt").to("cuda")
            out = model.generate(**inputs, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                                 do_sample=False)
            return (out.shape[1] - inputs["input_ids"].shape[1]) * len(batch_ids)
        with torch.no_grad():
            run(range(min(c, 2)))  # warm-up
            torch.cuda.synchronize()
            t = time.time()
            tokens = sum(run(range(b * c, (b + 1) * c)) for b in range(args.batches))
            torch.cuda.synchronize()
            wall = time.time() - t
        n = c * args.batches
        print(f"{c:>11}  {n:>8}  {n / wall:>6.2f}  {tokens / wall:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
