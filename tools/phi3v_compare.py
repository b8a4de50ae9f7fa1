#!/usr/bin/env python3
"""Phi-3.5-vision at its published shapes against the reference, for the GPU
host (tools/gpu_compare.sh shape `phi3v`; `phi3vtiny` runs the same path on
the tiny config, anywhere).

    python3 tools/phi3v_compare.py OUT_DIR [--config real|tiny] [--load] [--device cuda|cpu]
                                   [--max-new-tokens 32] [--seed 0] [--ours DIR]

1. Unless --load, writes to OUT_DIR a random checkpoint in the layout of
   microsoft/Phi-3.5-vision-instruct: config.json (tools/make_tiny_phi3v.py
   make_config("real"): decoder 32 layers, 3072 wide, 32 heads of 96, 32 KV
   heads, intermediate 8192, vocab 32064, longrope with 48 short and 48 long
   factors, original length 4096, max 131072; CLIP ViT-L/14-336, 24 layers,
   1024 wide, named only by img_processor.model_name as in the real config),
   the weights in bf16 in two shards plus model.safetensors.index.json under
   the real tensor names, generation_config.json, preprocessor_config.json
   (num_crops 4) and the tiny tokenizer with the real id layout
   (tools/make_tiny_phi3v_tokenizer.py --real-ids: <|endoftext|> 32000,
   <|end|> 32007, <|user|> 32010, <|image|> 32044), whose tokenizer_config.json
   carries Kestrel's chat template (phi3v_reference.KESTREL_CHAT_TEMPLATE,
   which renders the OpenAI-style image parts the cases use). With --load the
   folder is used as it is (any Phi-3-V checkpoint and tokenizer).
2. Writes OUT_DIR/golden/: the case images (PNG), cases.json (messages naming
   the image files, the rendered prompt, num_crops) and per case
   NAME.safetensors with `input_ids` (the <|image|>-id form), `greedy` (the
   reference's greedy continuation in f32, HF generate), `logits_f32` and
   `logits_bf16` (k, vocab): the logits predicting each greedy token,
   teacher-forced in one forward, from the weights loaded in f32 and,
   separately from disk, in bf16 (HF's own bf16 noise: the bound of
   tools/compare_hf_logits.py). This is the format `kestrel compare-hf` and
   tools/compare_hf_logits.py read (as make_tiny_llava.py --logits-dump).
3. With --ours DIR (a `kestrel compare-hf --golden OUT_DIR/golden --out DIR`
   result), runs tools/compare_hf_logits.py on the two.

The reference is tools/phi3v_reference.py (transformers Phi3ForCausalLM +
CLIPVisionModel + our image processor and image embedding), cross-checked
against the original remote code by tools/make_tiny_phi3v.py --orig.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_tiny_phi3v as tiny  # noqa: E402
import make_tiny_phi3v_tokenizer  # noqa: E402
import phi3v_reference as ref  # noqa: E402

NUM_CROPS = 4
BIG_CASES = {
    "text_only": tiny.CASES["text_only"],
    "square_image": [{"role": "user", "content": [tiny.img("img_336x336.png"),
                                                  tiny.txt("Describe this image in detail.")]}],
    "two_images": tiny.CASES["two_images"],
    "wide_image": [{"role": "user", "content": [tiny.img("pre_wide_1400x90.png"),
                                                tiny.txt("Read the text on the sign.")]}],
}


def shard(sd, n):
    """Splits {name: tensor} into n shards of about equal bytes, names in order."""
    total = sum(v.numel() * v.element_size() for v in sd.values())
    shards, cur, size = [], {}, 0
    for k in sorted(sd):
        cur[k] = sd[k]
        size += sd[k].numel() * sd[k].element_size()
        if size >= total / n * (len(shards) + 1) and len(shards) < n - 1:
            shards.append(cur)
            cur = {}
    shards.append(cur)
    return shards


@torch.no_grad()
def write_checkpoint(out, kind, seed, device):
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    tok = make_tiny_phi3v_tokenizer.write_tokenizer(out, verbose=False, real_ids=kind == "real")
    tc_path = os.path.join(out, "tokenizer_config.json")
    tc = json.load(open(tc_path))
    tc["chat_template"] = ref.KESTREL_CHAT_TEMPLATE
    tiny.write_json(tc_path, tc)
    cfg = tiny.make_config(kind, tok)
    tiny.write_json(os.path.join(out, "config.json"), cfg)
    tiny.write_json(os.path.join(out, "generation_config.json"),
                    {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                     "pad_token_id": tok["<|endoftext|>"], "transformers_version": "4.38.1"})
    tiny.write_json(os.path.join(out, "preprocessor_config.json"), {
        "do_convert_rgb": True, "image_mean": list(ref.CLIP_MEAN), "image_processor_type": "Phi3VImageProcessor",
        "image_std": list(ref.CLIP_STD), "num_crops": NUM_CROPS, "num_img_tokens": 144,
        "processor_class": "Phi3VProcessor"})
    torch.manual_seed(seed)
    with torch.device(device):
        model = ref.Phi3VReference(cfg)
    tiny.randomize(model, seed)
    sd = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.checkpoint_state_dict().items()}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    parts = shard(sd, 2 if kind == "real" else 1)
    weight_map = {}
    for i, part in enumerate(parts):
        fn = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" if len(parts) > 1 else "model.safetensors"
        save_file(part, os.path.join(out, fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in part})
    if len(parts) > 1:
        total = sum(v.numel() * v.element_size() for v in sd.values())
        tiny.write_json(os.path.join(out, "model.safetensors.index.json"),
                        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    n_params = sum(v.numel() for v in sd.values())
    print(f"wrote {kind} checkpoint to {out}: {n_params:,} parameters (bf16), "
          f"<|image|> = {tok['<|image|>']}", flush=True)


def case_inputs(tokenizer, messages, files, image_token):
    prompt = ref.render(messages)
    images = [ref.preprocess_image(files[f], NUM_CROPS) for f in tiny.image_files(messages)]
    ids = ref.tokenize_prompt(tokenizer, prompt, [i["num_img_tokens"] for i in images], image_token_id=image_token)
    return prompt, images, ids


@torch.no_grad()
def forced_logits(model, ids, images, image_token, tokens):
    """Logits (k, vocab) f32 at the positions predicting `tokens`, one forward."""
    n = len(ids)
    full = list(ids) + [int(t) for t in tokens[:-1]]
    out = model(full, images, image_token_id=image_token).logits[0, n - 1:]
    return out.float().cpu().contiguous()


@torch.no_grad()
def dump(args):
    from safetensors.torch import save_file
    from transformers import LlamaTokenizer
    gdir = os.path.join(args.out, "golden")
    os.makedirs(gdir, exist_ok=True)
    tokenizer = LlamaTokenizer.from_pretrained(args.out)
    image_token = tokenizer.convert_tokens_to_ids("<|image|>")
    cfg = json.load(open(os.path.join(args.out, "config.json")))
    names = sorted({f for m in BIG_CASES.values() for f in tiny.image_files(m)})
    files = tiny.materialize(gdir, names)
    meta = {"reference": "tools/phi3v_reference.py", "config": args.config, "num_crops": NUM_CROPS,
            "image_token_id": image_token, "chat_template": ref.KESTREL_CHAT_TEMPLATE, "cases": {}}
    results = {}
    model = ref.Phi3VReference.from_pretrained(args.out, dtype=torch.float32, device=args.device)
    for name, messages in BIG_CASES.items():
        prompt, images, ids = case_inputs(tokenizer, messages, files, image_token)
        emb, _ = model.embed(ids, images, image_token_id=image_token)
        gen = model.lm.generate(inputs_embeds=emb, attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                             device=emb.device),
                                max_new_tokens=args.max_new_tokens, do_sample=False, top_k=None, top_p=None,
                                temperature=None)
        new = gen[0].cpu()
        results[name] = {"input_ids": torch.tensor(ids, dtype=torch.int32), "greedy": new.to(torch.int32),
                         "logits_f32": forced_logits(model, ids, images, image_token, new)}
        meta["cases"][name] = {"messages": messages, "prompt": prompt, "files": tiny.image_files(messages),
                               "num_crops": NUM_CROPS, "tokens": len(ids),
                               "rope_table": ref.rope_table(cfg, len(ids) + len(new) - 2)}
        print(f"{name}: {len(ids)} tokens, greedy {new.tolist()[:8]}...", flush=True)
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    # HF's bf16 path: the same weights loaded from disk in bf16 (not cast in place).
    bf = ref.Phi3VReference.from_pretrained(args.out, dtype=torch.bfloat16, device=args.device)
    for name, messages in BIG_CASES.items():
        _, images, ids = case_inputs(tokenizer, messages, files, image_token)
        results[name]["logits_bf16"] = forced_logits(bf, ids, images, image_token, results[name]["greedy"])
        save_file({k: v.contiguous() for k, v in results[name].items()}, os.path.join(gdir, f"{name}.safetensors"))
    tiny.write_json(os.path.join(gdir, "cases.json"), meta)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--config", default="real", choices=["real", "tiny"])
    ap.add_argument("--load", action="store_true", help="use the checkpoint already in OUT_DIR")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ours", default=None, help="a kestrel compare-hf output folder to judge")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if not args.load:
        write_checkpoint(args.out, args.config, args.seed, args.device)
    dump(args)
    if args.ours:
        sys.exit(subprocess.call([sys.executable, os.path.join(HERE, "compare_hf_logits.py"),
                                  os.path.join(args.out, "golden"), args.ours]))


if __name__ == "__main__":
    main()
