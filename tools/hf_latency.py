#!/usr/bin/env python3
"""HF transformers latency baseline beside `kestrel bench serve` and `kestrel
bench decode`, on the same checkpoint and card in the same run:

1. TTFT: one request of one synthetic IMAGE_SIZE² image and ~INPUT_LEN
   one-token words (tools/hf_throughput.py's `request`), from the processor's
   output on the GPU to the first generated token (`generate` with
   max_new_tokens=1), median of --repeat runs after a warm-up. Preprocessing
   is timed apart: Kestrel's TTFT includes it, so both are printed.
2. Decode: BATCH text prompts of INPUT_LEN words generating exactly
   OUTPUT_LEN tokens; decode tok/s = BATCH·(OUTPUT_LEN − 1) over the time
   past the first token (total − the same prompts' 1-token time).

    python3 tools/hf_latency.py MODEL_DIR [--batch 1] [--repeat 5] [--device cuda]

Any family transformers has a class for: the model class is the one
config.json's `architectures` names (Qwen2VLForConditionalGeneration,
LlavaForConditionalGeneration, ...). A folder without a chat template (many
LLaVA-1.5 ones) gets the one Kestrel ships for its model_type
(src/model/<model_type>/chat_template.jinja), so both render the same prompt.
"""
import argparse
import json
import os
import statistics
import time

import torch
import transformers
from transformers import AutoProcessor

from hf_throughput import WORDS, request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat):
    """Median seconds of `repeat` synchronized runs of fn, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def load(model_dir, device):
    """The model (bf16, on device) in the class config.json names, and its
    processor with a chat template."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cls = getattr(transformers, cfg["architectures"][0])
    model = cls.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    if getattr(proc, "chat_template", None) is None:
        builtin = os.path.join(ROOT, "src", "model", cfg["model_type"], "chat_template.jinja")
        with open(builtin) as f:
            proc.chat_template = f.read()
        print(f"{model_dir} has no chat template; using Kestrel's {os.path.relpath(builtin, ROOT)}")
    return model, proc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes for the decode figure")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    t0 = time.time()
    model, proc = load(args.model, args.device)
    proc.tokenizer.padding_side = "left"
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"HF transformers ({type(model).__name__}) on {card}: loaded in {time.time() - t0:.1f} s")

    msgs, img = request(0, args.input_len, args.image_size)
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    prep = timed(lambda: proc(text=[text], images=[img], return_tensors="pt").to(args.device), args.repeat)
    inputs = proc(text=[text], images=[img], return_tensors="pt").to(args.device)
    with torch.no_grad():
        ttft = timed(lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False), args.repeat)
    n_in = inputs["input_ids"].shape[1]
    print(f"TTFT {args.image_size}x{args.image_size} image + {args.input_len} words ({n_in} prompt tokens): "
          f"{ttft * 1e3:.1f} ms model + {prep * 1e3:.1f} ms preprocessing (median of {args.repeat})", flush=True)

    print("batch  decode tok/s  ms/step")
    for b in [int(x) for x in args.batch.split(",")]:
        texts = [proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": " ".join(
                WORDS[(7 * i + j) % len(WORDS)] for j in range(args.input_len))}]}],
            add_generation_prompt=True) for i in range(b)]
        enc = proc(text=texts, padding=True, return_tensors="pt").to(args.device)

        def gen(n):
            return lambda: model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        with torch.no_grad():
            first = timed(gen(1), args.repeat)
            total = timed(gen(args.output_len), max(1, args.repeat // 2))
        steps = args.output_len - 1
        print(f"{b:>5}  {b * steps / (total - first):>12.1f}  {(total - first) * 1e3 / steps:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
