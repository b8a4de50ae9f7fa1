#!/usr/bin/env python3
"""Builds the tiny random LLaVA-1.5 that Kestrel tests against, and dumps what
Hugging Face transformers computes on it.

    python3 tools/make_tiny_llava.py OUT_DIR [--config tiny|7b] [--dtype float32|bfloat16]
                                     [--seed 0] [--no-dump] [--logits-dump] [--device cpu|cuda]

Writes to OUT_DIR a model folder as users download one from llava-hf
(config.json, model.safetensors as transformers 5.x writes it,
generation_config.json, preprocessor_config.json for CLIPImageProcessor,
processor_config.json for LlavaProcessor, tokenizer files from
tools/make_tiny_llava_tokenizer.py) and NO chat template (many LLaVA-1.5
folders have none; Kestrel ships its own, CHAT_TEMPLATE below, also written to
src/model/llava/chat_template.jinja, the template Kestrel ships). Unless --no-dump, OUT_DIR/golden/ gets the
synthetic input images (PNG), cases.json and per case NAME.safetensors (f32
unless said):
  input_ids (n,) i32, position_ids (n,) i32 = arange (attention all ones),
  pixel_values (images, 3, S, S) as the default processor made them,
  vision.embeddings (images*(1+P), D): CLIP embeddings + pre_layrnorm
      (encoder hidden_states[0]; CLS row first per image),
  vision.layer.{i} (images*(1+P), D): output of CLIP encoder layer i
      (hidden_states[i+1]),
  vision.features (images*P, D): hidden_states[-2] without the CLS row,
  projector (images*P, H): multi_modal_projector output,
  decoder.embeds (n, H): token embeddings with the image features scattered in,
  decoder.layer.{i} (n, H): output of decoder layer i (before the final norm),
  decoder.norm (n, H): the final RMSNorm of the last layer's output,
  logits (n, V) at every position, greedy (k,) i32: the tokens of
      model.generate(do_sample=False, max_new_tokens=8) (fewer on EOS).
plus golden/preprocess_336.safetensors: CLIP preprocessing at the real size
(shortest edge 336, centre crop 336) of three larger synthetic images
(every 5th row of each plane, and whole-plane sums: see dump_preprocess_336).
(Images with the tiny config: S = 56, P = 16 patches, D = 64, H = 128.)

--config 7b builds a random checkpoint with the published
llava-hf/llava-1.5-7b-hf shapes (CLIP ViT-L/14-336 + Llama-2-7B, bf16 on
disk) for the GPU comparison; run it with --no-dump (or --logits-dump: greedy
tokens plus teacher-forced f32 and bf16 logits, as make_tiny_qwen2vl.py does
for its big shapes). Its tokenizer is the tiny one with the BPE vocabulary
padded by unreachable filler pieces to 32000 entries, so `<image>` = 32000 and
`<pad>` = 32001 as in the real checkpoint, and config vocab_size 32064 (ids
32002..32063 are embedding rows no token maps to, as in the real model).

Weights are random, as in make_tiny_qwen2vl.py, with a spread chosen so that
logits have real margins: linear (and conv) weights N(0, 1/fan_in), token
embeddings N(0, 4/hidden), norm weights 1 + N(0, 0.1), biases N(0, 0.1);
CLIP's class_embedding and position embeddings N(0, 1) (the scale of a patch
embedding of unit-variance pixels). The model is saved in --dtype (bf16 by
default: the tiny fixture stays ~1.3 MB) and the goldens are computed in f32
by the model reloaded from the saved folder, as a user would load it.

Prompt rendering (the LLaVA-1.5 authors' "USER: <image>\\n{question}
ASSISTANT:", extended to any OpenAI-style conversation). `render` below is the
reference; CHAT_TEMPLATE renders exactly the same (asserted with jinja2 and
with transformers' apply_chat_template):
  - message content is a string, or a list of parts rendered in order and
    concatenated: an image part ({"type": "image"} or {"type": "image_url"})
    renders as "<image>\\n"; a text part renders as its text, followed by
    "\\n" unless it is the message's last part; other parts render nothing;
  - a user message renders as "USER: " + content + " ";
  - an assistant message renders as "ASSISTANT: " + content + "</s>";
  - any other message (system) renders as content + " ";
  - the generation prompt is "ASSISTANT:".
  No default system prompt, no BOS in the text (the tokenizer prepends <s>).
  E.g. [image, "What is this?"] -> "USER: <image>\\nWhat is this? ASSISTANT:";
  ["Compare", image, "with", image, "please."] ->
  "USER: Compare\\n<image>\\nwith\\n<image>\\nplease. ASSISTANT:".

Needs torch, transformers 5.x, torchvision, pillow, numpy, safetensors, jinja2.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import make_tiny_llava_tokenizer  # noqa: E402

TEMPLATE_FILE = os.path.join(ROOT, "src", "model", "llava", "chat_template.jinja")

# One line, no whitespace outside the {{ }} blocks, so trim_blocks /
# lstrip_blocks (transformers sets both) change nothing.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% else %}{{ ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def render_content(content):
    if isinstance(content, str):
        return content
    out = []
    for i, part in enumerate(content):
        if part["type"] in ("image", "image_url"):
            out.append("<image>\n")
        elif part["type"] == "text":
            out.append(part["text"] + ("\n" if i + 1 < len(content) else ""))
    return "".join(out)


def render(messages, add_generation_prompt=True):
    """The reference prompt rendering (see the docstring)."""
    out = []
    for m in messages:
        text = render_content(m["content"])
        if m["role"] == "user":
            out.append("USER: " + text + " ")
        elif m["role"] == "assistant":
            out.append("ASSISTANT: " + text + "</s>")
        else:
            out.append(text + " ")
    if add_generation_prompt:
        out.append("ASSISTANT:")
    return "".join(out)


def check_template(conversations, tokenizer=None):
    """CHAT_TEMPLATE == render on every conversation, with plain jinja2 and
    with transformers' apply_chat_template when a tokenizer is given."""
    import jinja2
    for env in (jinja2.Environment(), jinja2.Environment(trim_blocks=True, lstrip_blocks=True)):
        t = env.from_string(CHAT_TEMPLATE)
        for msgs in conversations:
            for gen in (True, False):
                a, b = t.render(messages=msgs, add_generation_prompt=gen), render(msgs, gen)
                assert a == b, f"jinja renders {a!r}, render() {b!r}"
    if tokenizer is not None:
        for msgs in conversations:
            a = tokenizer.apply_chat_template(msgs, chat_template=CHAT_TEMPLATE, tokenize=False,
                                              add_generation_prompt=True)
            assert a == render(msgs), f"apply_chat_template renders {a!r}, render() {render(msgs)!r}"


TEMPLATE_TESTS = [
    [{"role": "user", "content": "Hi there."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"}]},
     {"role": "assistant", "content": "A cat."},
     {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image_url", "image_url": {"url": "x"}},
                                  {"type": "image", "image": "b.png"}, {"type": "text", "text": "these?"},
                                  {"type": "text", "text": "Two lines."}]},
     {"role": "assistant", "content": [{"type": "text", "text": "Dogs."}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": "a.png"}]}],
]


def make_config(kind, tok):
    from transformers import LlavaConfig
    if kind == "tiny":
        vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, image_size=56, patch_size=14, num_channels=3, projection_dim=64,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5)
        text = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_act="silu",
                    rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                    tie_word_embeddings=False, vocab_size=tok["vocab"], bos_token_id=1, eos_token_id=2,
                    pad_token_id=tok["<pad>"], attention_bias=False, mlp_bias=False)
    elif kind == "7b":
        vision = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, image_size=336, patch_size=14, num_channels=3, projection_dim=768,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5)
        text = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
                    rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                    tie_word_embeddings=False, vocab_size=32064, bos_token_id=1, eos_token_id=2,
                    pad_token_id=tok["<pad>"], attention_bias=False, mlp_bias=False)
        assert tok["<image>"] == 32000 and tok["<pad>"] == 32001, tok
    else:
        raise ValueError(kind)
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok["<image>"],
                       image_seq_length=patches, projector_hidden_act="gelu",
                       vision_feature_select_strategy="default", vision_feature_layer=-2,
                       multimodal_projector_bias=True, tie_word_embeddings=False, pad_token_id=tok["<pad>"])


@torch.no_grad()
def randomize(model, seed):
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        shape = p.shape
        rnd = lambda: torch.randn(shape, generator=g, device=dev)  # noqa: E731
        if name.endswith("class_embedding") or "vision_tower" in name and "position_embedding" in name:
            v = rnd()
        elif name.endswith("bias"):
            v = rnd() * 0.1
        elif p.dim() == 1:  # norm weights
            v = 1.0 + rnd() * 0.1
        elif "embed_tokens" in name:
            v = rnd() * (2.0 / math.sqrt(shape[1]))
        else:  # linear and conv weights
            v = rnd() / math.sqrt(math.prod(shape[1:]))
        p.copy_(v.to(p.dtype))


def synthetic_image(w, h, seed, cell=1):
    """Smooth gradients plus noise: deterministic and not trivially compressible.
    The noise is constant over cell x cell blocks (cell > 1 keeps big PNGs small)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 100 * np.sin(x / (w / 3.0) + seed)
    gch = 127 + 100 * np.cos(y / (h / 2.0) - seed)
    b = 255 * (x + y) / (w + h)
    noise = rng.normal(0, 12, (-(-h // cell), -(-w // cell), 3)).repeat(cell, 0).repeat(cell, 1)[:h, :w]
    img = np.stack([r, gch, b], -1) + noise
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


# Each case: chat messages; images are (w, h, seed) triples.
CASES = {
    "text_only": [{"role": "user", "content": [{"type": "text", "text": "Tell me a story about a small bird."}]}],
    "one_image": [{"role": "user", "content": [{"type": "image", "image": (70, 70, 1)},
                                               {"type": "text", "text": "What is shown in this image?"}]}],
    "wide_image": [{"role": "user", "content": [{"type": "image", "image": (120, 50, 2)},
                                                {"type": "text", "text": "Read the text on the sign."}]}],
    "two_images": [{"role": "user", "content": [{"type": "text", "text": "Compare this image"},
                                                {"type": "image", "image": (80, 64, 3)},
                                                {"type": "text", "text": "with this one."},
                                                {"type": "image", "image": (45, 110, 4)},
                                                {"type": "text", "text": "What differs?"}]}],
    "multi_turn": [{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": [{"type": "image", "image": (60, 90, 5)},
                                                {"type": "text", "text": "Describe the picture."}]},
                   {"role": "assistant", "content": "A red car is parked next to a blue door."},
                   {"role": "user", "content": "What color is the door?"}],
}
# The real shapes use real image sizes (the GPU comparison).
BIG_CASES = {
    "text_only": CASES["text_only"],
    "one_image": [{"role": "user", "content": [{"type": "image", "image": (640, 480, 1)},
                                               {"type": "text", "text": "Describe this image in detail."}]}],
    "wide_image": [{"role": "user", "content": [{"type": "image", "image": (1400, 90, 2)},
                                                {"type": "text", "text": "Read the text on the sign."}]}],
    "two_images": [{"role": "user", "content": [{"type": "text", "text": "Compare this image"},
                                                {"type": "image", "image": (448, 448, 3)},
                                                {"type": "text", "text": "with this one."},
                                                {"type": "image", "image": (320, 640, 4)},
                                                {"type": "text", "text": "What differs?"}]}],
}
# CLIP preprocessing at the real 336 size: (w, h, seed); noise in 4x4 blocks.
PREPROCESS_336 = {"landscape_500x375": (500, 375, 21), "square_336x336": (336, 336, 22),
                  "tall_200x640": (200, 640, 23)}
# preprocess_336.safetensors keeps these rows of each 336x336 plane (every
# 5th, 0..335): the whole tensor would be 4 MB.
ROWS_336 = list(range(0, 336, 5))


def image_processor_kwargs(size):
    return dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_resize=True,
                do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                do_convert_rgb=True, resample=3,
                image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--config", default="tiny", choices=["tiny", "7b"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="weights on disk; HF then computes in f32 on them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-dump", action="store_true")
    ap.add_argument("--logits-dump", action="store_true",
                    help="the big shapes' dump (greedy + f32/bf16 teacher-forced logits) even for --config tiny")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 8 (tiny) or 32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.max_new_tokens is None:
        args.max_new_tokens = 8 if args.config == "tiny" else 32

    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    # The template file the Rust side embeds, checked against render().
    check_template(TEMPLATE_TESTS + list(CASES.values()))
    with open(TEMPLATE_FILE, "w") as f:
        f.write(CHAT_TEMPLATE)  # no trailing newline: the template is exactly this text

    os.makedirs(args.out, exist_ok=True)
    for f in ("chat_template.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(args.out, f)):
            os.remove(os.path.join(args.out, f))
    tok = make_tiny_llava_tokenizer.write_tokenizer(
        args.out, pad_vocab_to=32000 if args.config == "7b" else None, verbose=False)
    cfg = make_config(args.config, tok)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    torch.manual_seed(args.seed)
    with torch.device(args.device if args.config != "tiny" else "cpu"):
        model = LlavaForConditionalGeneration(cfg)
    randomize(model, args.seed)
    model = model.to(dtype)
    model.save_pretrained(args.out, safe_serialization=True)
    # The reference computes in f32 on exactly the values on disk, loaded as a
    # user would load them.
    del model
    size = cfg.vision_config.image_size
    CLIPImageProcessor(**image_processor_kwargs(size)).save_pretrained(args.out)
    with open(os.path.join(args.out, "preprocessor_config.json")) as f:
        pc = json.load(f)
    pc["processor_class"] = "LlavaProcessor"
    with open(os.path.join(args.out, "preprocessor_config.json"), "w") as f:
        json.dump(pc, f, indent=2, sort_keys=True)
        f.write("\n")
    # As in llava-hf/llava-1.5-7b-hf: the image token count is
    # (S/14)^2 + num_additional_image_tokens - 1 (strategy "default") = P.
    with open(os.path.join(args.out, "processor_config.json"), "w") as f:
        json.dump({"image_token": "<image>", "num_additional_image_tokens": 1,
                   "patch_size": cfg.vision_config.patch_size, "processor_class": "LlavaProcessor",
                   "vision_feature_select_strategy": "default"}, f, indent=2)
        f.write("\n")
    print(f"wrote {args.config} model to {args.out} ({dtype}); vocab {tok['vocab']}, "
          f"<image> = {tok['<image>']}, <pad> = {tok['<pad>']}")
    if args.no_dump:
        return
    model = LlavaForConditionalGeneration.from_pretrained(args.out, dtype=torch.float32).to(args.device).eval()
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(args.out)
    check_template(TEMPLATE_TESTS + list(CASES.values()), processor.tokenizer)
    if args.config == "tiny" and not args.logits_dump:
        dump(args, model, processor)
        dump_preprocess_336(args, processor)
        verify(args)
    else:
        dump_logits(args, model, processor)


def materialize_case(name, messages, gdir):
    """Writes a case's synthetic images to gdir; returns (messages naming the
    files, PIL images, file names)."""
    images, files = [], []
    msgs = json.loads(json.dumps(messages))
    for m in msgs:
        if isinstance(m["content"], str):
            continue
        for part in m["content"]:
            if part["type"] == "image":
                w, h, s = part["image"]
                fn = f"{name}_img{len(images)}.png"
                img = synthetic_image(w, h, s)
                img.save(os.path.join(gdir, fn))
                images.append(img)
                files.append(fn)
                part["image"] = fn
    return msgs, images, files


def processor_inputs(processor, msgs, images, device):
    text = render(msgs)
    kw = {"images": images} if images else {}
    return text, processor(text=[text], return_tensors="pt", **kw).to(device)


def other_backend_pixels(processor, images):
    """pixel_values from CLIP's other image-processor backend (PIL if the
    default is torchvision, and vice versa), with the same settings."""
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    default = type(processor.image_processor)
    other = CLIPImageProcessorPil if default is CLIPImageProcessor else CLIPImageProcessor
    ip = other(**processor.image_processor.to_dict() | {"image_processor_type": other.__name__})
    return other.__name__, ip(images, return_tensors="pt")["pixel_values"].float()


@torch.no_grad()
def dump(args, model, processor):
    from safetensors.torch import save_file
    gdir = os.path.join(args.out, "golden")
    os.makedirs(gdir, exist_ok=True)
    ip = processor.image_processor
    meta = {"processor": type(processor).__name__, "image_processor_backend": type(ip).__name__,
            "image_processor": {k: v for k, v in ip.to_dict().items() if not k.startswith("_")},
            "chat_template": CHAT_TEMPLATE, "cases": {}}
    vt, proj = model.model.vision_tower, model.model.multi_modal_projector
    lm = model.model.language_model
    for name, messages in CASES.items():
        msgs, images, files = materialize_case(name, messages, gdir)
        text, inputs = processor_inputs(processor, msgs, images, model.device)
        assert set(inputs.keys()) <= {"input_ids", "attention_mask", "pixel_values"}, inputs.keys()
        assert bool((inputs["attention_mask"] == 1).all())
        captured = {}

        def keep(key, take_input=False):
            def hook(_mod, inp, out):
                if take_input:
                    captured[key + ".in"] = inp[0].detach().float().cpu().contiguous()
                captured[key] = (out[0] if isinstance(out, tuple) else out).detach().float().cpu().contiguous()
            return hook

        handles = [vt.pre_layrnorm.register_forward_hook(keep("vision.embeddings"))]
        for i, layer in enumerate(vt.encoder.layers):
            handles.append(layer.register_forward_hook(keep(f"vision.layer.{i}")))
        handles.append(proj.register_forward_hook(keep("projector", take_input=True)))
        for i, layer in enumerate(lm.layers):
            handles.append(layer.register_forward_hook(keep(f"decoder.layer.{i}")))
        handles.append(lm.norm.register_forward_hook(keep("decoder.norm")))

        def pre_layer0(_mod, a, kwargs):
            hs = a[0] if a else kwargs["hidden_states"]
            captured["decoder.embeds"] = hs.detach().float().cpu().contiguous()
        handles.append(lm.layers[0].register_forward_pre_hook(pre_layer0, with_kwargs=True))

        out = model(**inputs, use_cache=False, output_hidden_states=True)
        for h in handles:
            h.remove()

        n = inputs["input_ids"].shape[1]
        t = {"input_ids": inputs["input_ids"][0].to(torch.int32).cpu().contiguous(),
             "position_ids": torch.arange(n, dtype=torch.int32)}
        if images:
            t["pixel_values"] = inputs["pixel_values"].float().cpu().contiguous()
            d = captured["vision.embeddings"].shape[-1]
            t["vision.embeddings"] = captured["vision.embeddings"].reshape(-1, d)
            for i in range(len(vt.encoder.layers)):
                t[f"vision.layer.{i}"] = captured[f"vision.layer.{i}"].reshape(-1, d)
            t["vision.features"] = captured["projector.in"].reshape(-1, d)
            t["projector"] = captured["projector"].reshape(-1, captured["projector"].shape[-1])
            # Cross-checks: hooks agree with the CLIP tower's own hidden_states
            # and with LLaVA's feature selection (layer -2, CLS dropped).
            vh = vt(inputs["pixel_values"], output_hidden_states=True).hidden_states
            assert len(vh) == len(vt.encoder.layers) + 1
            assert torch.equal(vh[0].float().cpu().reshape(-1, d), t["vision.embeddings"])
            for i in range(len(vh) - 1):
                assert torch.equal(vh[i + 1].float().cpu().reshape(-1, d), t[f"vision.layer.{i}"])
            assert torch.equal(vh[-2][:, 1:].float().cpu().reshape(-1, d), t["vision.features"])
            mask = inputs["input_ids"][0].cpu() == model.config.image_token_id
            assert int(mask.sum()) == t["projector"].shape[0]
            assert torch.equal(captured["decoder.embeds"][0][mask], t["projector"])
        t["decoder.embeds"] = captured["decoder.embeds"][0]
        for i in range(len(lm.layers)):
            t[f"decoder.layer.{i}"] = captured[f"decoder.layer.{i}"][0]
        t["decoder.norm"] = captured["decoder.norm"][0]
        t["logits"] = out.logits[0].float().cpu().contiguous()
        # HF's output_hidden_states: [embeds, layer 0, ..., layer L-2, norm(layer L-1)]
        # in transformers 5.17 (the last entry is after the final norm).
        hs = out.hidden_states
        assert len(hs) == len(lm.layers) + 1
        assert torch.equal(hs[0][0].float().cpu(), t["decoder.embeds"])
        for i in range(len(lm.layers) - 1):
            assert torch.equal(hs[i + 1][0].float().cpu(), t[f"decoder.layer.{i}"])
        last_is_normed = torch.equal(hs[-1][0].float().cpu(), t["decoder.norm"])
        assert torch.allclose(lm.norm(captured[f"decoder.layer.{len(lm.layers) - 1}"]).float()[0], t["decoder.norm"])
        gen = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, top_k=None,
                             top_p=None, temperature=None)
        new = gen[0, n:]
        t["greedy"] = new.to(torch.int32).cpu().contiguous()
        assert int(new[0]) == int(t["logits"][-1].argmax())
        t = {k: v.clone().contiguous() for k, v in t.items()}
        save_file(t, os.path.join(gdir, f"{name}.safetensors"))
        case = {"messages": msgs, "prompt": text, "files": files,
                "greedy_text": processor.tokenizer.decode(new, skip_special_tokens=False)}
        if images:
            other, px = other_backend_pixels(processor, images)
            case["backend_max_abs_diff"] = {other: float((px - t["pixel_values"]).abs().max())}
        meta["cases"][name] = case
        meta["hf_hidden_states_last_is_normed"] = last_is_normed
        print(f"{name}: {n} tokens, {len(images)} images, greedy {new.tolist()}"
              + (f", {other} max|diff| {case['backend_max_abs_diff'][other]:.3g}" if images else ""))
    meta["preprocess_336"] = {}
    with open(os.path.join(gdir, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)


@torch.no_grad()
def dump_preprocess_336(args, processor):
    """preprocess_336.safetensors: `pixel_values` (3 images, 3, len(ROWS_336), 336)
    = rows ROWS_336 of each plane of what the default CLIP image processor
    (shortest edge 336, centre crop 336) makes of the images, `row_index`
    (i32), and over the whole 336x336 planes `plane_sum` / `plane_abs_max`
    (3, 3); cases.json gets the other backend's max |difference| per image."""
    from safetensors.torch import save_file
    gdir = os.path.join(args.out, "golden")
    ip_cls = type(processor.image_processor)
    ip = ip_cls(**image_processor_kwargs(336))
    images, files = [], []
    for name, (w, h, s) in PREPROCESS_336.items():
        img = synthetic_image(w, h, s, cell=4)
        fn = f"preprocess_336_{name}.png"
        img.save(os.path.join(gdir, fn))
        images.append(img)
        files.append(fn)
    px = ip(images, return_tensors="pt")["pixel_values"].float()
    assert px.shape == (3, 3, 336, 336), px.shape
    proc = type(processor)(image_processor=ip, tokenizer=processor.tokenizer, patch_size=14,
                           vision_feature_select_strategy="default", num_additional_image_tokens=1)
    assert torch.equal(proc(text=["<image>"] * 3, images=[[i] for i in images],
                            return_tensors="pt")["pixel_values"].float(), px)
    other, px2 = other_backend_pixels(proc, images)
    rows = torch.tensor(ROWS_336)
    t = {"pixel_values": px[:, :, rows].contiguous(), "row_index": rows.to(torch.int32),
         "plane_sum": px.double().sum((2, 3)).float(), "plane_abs_max": px.abs().amax((2, 3))}
    save_file(t, os.path.join(gdir, "preprocess_336.safetensors"))
    diffs = (px2 - px).abs().amax((1, 2, 3)).tolist()
    with open(os.path.join(gdir, "cases.json")) as f:
        meta = json.load(f)
    meta["preprocess_336"] = {
        "image_processor_backend": ip_cls.__name__, "other_backend": other,
        "image_processor": {k: v for k, v in ip.to_dict().items() if not k.startswith("_")},
        "rows_kept": f"every 5th row of each 336x336 plane ({len(ROWS_336)} rows, listed in row_index)",
        "files": files,
        "images": {fn: {"width": w, "height": h, "backend_max_abs_diff": d}
                   for fn, (w, h, _), d in zip(files, PREPROCESS_336.values(), diffs)},
    }
    with open(os.path.join(gdir, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"preprocess_336: {ip_cls.__name__} vs {other} max|diff| per image {[f'{d:.3g}' for d in diffs]}")


@torch.no_grad()
def verify(args):
    """Reloads the saved folder from scratch and recomputes one image case:
    the goldens must reproduce."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    gdir = os.path.join(args.out, "golden")
    model = LlavaForConditionalGeneration.from_pretrained(args.out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.out)
    with open(os.path.join(gdir, "cases.json")) as f:
        meta = json.load(f)
    print(f"{'case':12} {'tokens':>6} {'images':>6} {'greedy':42} {'|logits|max':>11} {'min gap':>8}  check")
    for name, case in meta["cases"].items():
        g = load_file(os.path.join(gdir, f"{name}.safetensors"))
        images = [Image.open(os.path.join(gdir, fn)).convert("RGB") for fn in case["files"]]
        assert render(case["messages"]) == case["prompt"]
        kw = {"images": images} if images else {}
        inputs = processor(text=[case["prompt"]], return_tensors="pt", **kw)
        ok = torch.equal(inputs["input_ids"][0].to(torch.int32), g["input_ids"])
        if images:
            ok &= torch.equal(inputs["pixel_values"].float(), g["pixel_values"])
        check = "ids+pixels"
        if name == "two_images":  # one full recomputation
            logits = model(**inputs, use_cache=False).logits[0].float()
            gen = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, top_k=None,
                                 top_p=None, temperature=None)[0, inputs["input_ids"].shape[1]:]
            ok &= torch.equal(logits, g["logits"]) and torch.equal(gen.to(torch.int32), g["greedy"])
            check = "ids+pixels+logits+greedy"
        assert ok, f"{name}: the reloaded folder does not reproduce the goldens"
        # Smallest top-1 minus top-2 logit over the greedy steps (teacher-forced):
        # how much numerical error a reimplementation can afford before greedy flips.
        top2 = forced_logits(model, inputs, g["greedy"].long()).topk(2, dim=-1).values
        gap = float((top2[:, 0] - top2[:, 1]).min())
        print(f"{name:12} {g['input_ids'].numel():6d} {len(images):6d} {str(g['greedy'].tolist()):42} "
              f"{float(g['logits'].abs().max()):11.3f} {gap:8.4f}  {check} ok")
    g = load_file(os.path.join(gdir, "preprocess_336.safetensors"))
    ip = type(processor.image_processor)(**image_processor_kwargs(336))
    px = ip([Image.open(os.path.join(gdir, fn)).convert("RGB") for fn in meta["preprocess_336"]["files"]],
            return_tensors="pt")["pixel_values"].float()
    assert torch.equal(px[:, :, g["row_index"].long()], g["pixel_values"]), "preprocess_336 does not reproduce"
    print(f"preprocess_336: pixel_values {tuple(g['pixel_values'].shape)} ok")


@torch.no_grad()
def forced_logits(model, inputs, tokens):
    """f32 logits at the positions predicting `tokens`, teacher-forced."""
    n = inputs["input_ids"].shape[1]
    full = dict(inputs)
    ids = torch.cat([inputs["input_ids"], tokens[None, :-1].to(inputs["input_ids"].device)], 1)
    full["input_ids"] = ids
    full["attention_mask"] = torch.ones_like(ids)
    if "pixel_values" in full:
        full["pixel_values"] = full["pixel_values"].to(model.dtype)
    out = model(**full, use_cache=False)
    return out.logits[0, n - 1:].float().cpu().contiguous()


@torch.no_grad()
def dump_logits(args, model, processor):
    """For the full-size shapes: HF's greedy continuation in f32, and the
    logits predicting each of its tokens from the f32 model and from the
    same weights loaded in bf16 (HF's own bf16 noise, for the bound)."""
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration
    gdir = os.path.join(args.out, "golden")
    os.makedirs(gdir, exist_ok=True)
    meta = {"processor": type(processor).__name__, "image_processor_backend": type(processor.image_processor).__name__,
            "config": args.config, "chat_template": CHAT_TEMPLATE, "cases": {}}
    results = {}
    cases = BIG_CASES if args.config != "tiny" else CASES
    for name, messages in cases.items():
        msgs, images, files = materialize_case(name, messages, gdir)
        text, inputs = processor_inputs(processor, msgs, images, model.device)
        gen = model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                             do_sample=False, top_k=None, top_p=None, temperature=None)
        new = gen[0, inputs["input_ids"].shape[1]:]
        results[name] = dict(input_ids=inputs["input_ids"][0].to(torch.int32).cpu().contiguous(),
                             greedy=new.to(torch.int32).cpu().contiguous(),
                             logits_f32=forced_logits(model, inputs, new))
        if images:
            results[name]["pixel_values"] = inputs["pixel_values"].float().cpu().contiguous()
        meta["cases"][name] = {"messages": msgs, "prompt": text, "files": files}
        print(f"{name}: {inputs['input_ids'].shape[1]} tokens, greedy {new.tolist()[:8]}...", flush=True)
    model.to("cpu")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    bf = LlavaForConditionalGeneration.from_pretrained(args.out, dtype=torch.bfloat16).to(args.device).eval()
    for name, messages in cases.items():
        msgs, images, _ = materialize_case(name, messages, gdir)
        _, inputs = processor_inputs(processor, msgs, images, bf.device)
        results[name]["logits_bf16"] = forced_logits(bf, inputs, results[name]["greedy"].long())
        save_file(results[name], os.path.join(gdir, f"{name}.safetensors"))
    with open(os.path.join(gdir, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
