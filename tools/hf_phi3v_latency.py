#!/usr/bin/env python3
"""The reference's latency beside `kestrel bench decode` on a Phi-3.5-vision
folder (transformers has no Phi3V class, so tools/hf_latency.py cannot load
one): tools/phi3v_reference.py's model in bf16 on the same card, in the same
run, with tools/hf_latency.py's measures and output lines:

1. TTFT: one synthetic IMAGE_SIZE² image and INPUT_LEN one-token words in
   the chat template, from the reference processor's output on the GPU
   (pixel values, ids) to the first token: the image embedding, the
   placement and the prefill (`generate(inputs_embeds=..., max_new_tokens=1)`
   of transformers' Phi3ForCausalLM); preprocessing timed apart.
2. Decode: BATCH text prompts of INPUT_LEN words generating exactly
   OUTPUT_LEN tokens with Phi3ForCausalLM.generate (KV cache, greedy);
   decode tok/s = BATCH·(OUTPUT_LEN − 1) over the time past the first token.

    python3 tools/hf_phi3v_latency.py MODEL_DIR [--batch 1] [--repeat 5] [--device cuda]
"""
import argparse
import os
import sys
import time

import torch
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_latency import timed  # noqa: E402
from hf_throughput import WORDS, request  # noqa: E402
import phi3v_reference as ref  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--batch", default="1")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--num-crops", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    t0 = time.time()
    model = ref.Phi3VReference.from_pretrained(args.model, dtype=torch.bfloat16, device=args.device)
    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    tok.padding_side = "left"
    image_token = tok.convert_tokens_to_ids("<|image|>")
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"reference (Phi3ForCausalLM + CLIPVisionModel, bf16) on {card}: loaded in {time.time() - t0:.1f} s")

    msgs, img = request(0, args.input_len, args.image_size)
    text = ref.render(msgs)

    def prepare():
        p = ref.preprocess_image(img, args.num_crops)
        ids = ref.tokenize_prompt(tok, text, [p["num_img_tokens"]], image_token)
        p = dict(p, pixel_values=p["pixel_values"].to(args.device, torch.bfloat16))
        return ids, p
    prep = timed(prepare, args.repeat)
    ids, p = prepare()

    def first():
        with torch.no_grad():
            emb, _ = model.embed(ids, [p], image_token)
            model.lm.generate(inputs_embeds=emb, max_new_tokens=1, do_sample=False)
    ttft = timed(first, args.repeat)
    print(f"TTFT {args.image_size}x{args.image_size} image + {args.input_len} words ({len(ids)} prompt tokens): "
          f"{ttft * 1e3:.1f} ms model + {prep * 1e3:.1f} ms preprocessing (median of {args.repeat})", flush=True)

    print("batch  decode tok/s  ms/step")
    for b in [int(x) for x in args.batch.split(",")]:
        texts = [ref.render([{"role": "user", "content": " ".join(
            WORDS[(7 * i + j) % len(WORDS)] for j in range(args.input_len))}]) for i in range(b)]
        enc = tok(texts, padding=True, return_tensors="pt").to(args.device)

        def gen(n):
            return lambda: model.lm.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        with torch.no_grad():
            f = timed(gen(1), args.repeat)
            total = timed(gen(args.output_len), max(1, args.repeat // 2))
        steps = args.output_len - 1
        print(f"{b:>5}  {b * steps / (total - f):>12.1f}  {(total - f) * 1e3 / steps:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
