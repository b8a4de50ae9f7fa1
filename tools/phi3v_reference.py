"""The trusted reference for Phi-3.5-vision (`microsoft/Phi-3.5-vision-instruct`,
architecture `Phi3VForCausalLM`, remote code only: transformers has no native
class). Importable; tools/make_tiny_phi3v.py and tools/phi3v_compare.py use it.

Composed from transformers' native pieces plus our own code for the rest:

  decoder      transformers `Phi3ForCausalLM` (modeling_phi3.py), config mapped
               from the Phi-3-V config.json by `phi3_text_config`: the Phi-3-V
               `rope_scaling {"type": "su", short_factor, long_factor}` becomes
               `rope_parameters {"rope_type": "longrope", short_factor,
               long_factor, original_max_position_embeddings, rope_theta}`.
               (Passing the old dict as `rope_scaling` fails validation in
               transformers 5.17: "su" is renamed to "longrope" only after the
               original length would have been copied in.) HF then scales cos
               and sin by sqrt(1 + ln(max/orig) / ln(orig)) and, per forward,
               uses the LONG factors iff max(position_ids) + 1 > orig
               (modeling_rope_utils.dynamic_rope_update ->
               longrope_frequency_update) — for every position of that
               forward. With a KV cache each decode step decides for its own
               position only; keys already cached keep the table they were
               rotated with. The original Phi3SuScaledRotaryEmbedding does
               exactly the same (seq_len = max(position_ids) + 1 per call).
  vision tower transformers `CLIPVisionModel`, hidden_states[-2] (the output of
               the second-to-last encoder layer, before post_layernorm), CLS
               row dropped. The real model is CLIP ViT-L/14-336 (24 layers,
               1024 wide, 16 heads, quick_gelu) and the config says so only by
               img_processor.model_name; a Kestrel-only key
               `img_processor.vision_config` (hidden_size, intermediate_size,
               num_hidden_layers, num_attention_heads, patch_size, image_size,
               layer_norm_eps, hidden_act) names a smaller CLIP for tests
               (`clip_vision_config`). The geometry stays 336 px crops, patch
               14: 24 x 24 = 576 patches per crop.
  ours         the image processor (`hd_transform`, `preprocess_image`), the
               prompt processing (`tokenize_prompt`), the image embedding
               (`ImageEmbedding`: 2x2 merge, separators, projector) and the
               chat rendering (`render`), written from the original files
               (image_processing_phi3_v.py, processing_phi3_v.py,
               image_embedding_phi3_v.py, modeling_phi3_v.py of the
               TIGER-AI-Lab/VLM2Vec copy at c76a1d4e, src/vlm_backbone/phi3_v/;
               its processing + image processing equal the merged
               processing_phi3_v.py of Phi-3.5-vision-instruct that VLM2Vec
               also carried at e61ae22, processor/, but for a truncation
               argument).

Image processing (Phi3VImageProcessor.preprocess, num_crops = hd_num):
  1. convert to RGB. If width < height, transpose (PIL Image.TRANSPOSE: swap
     x and y) and remember it.
  2. ratio = W / H (float64). scale = the largest s >= 1 with
     s * ceil(s / ratio) <= num_crops (found by counting up from 1).
     new_w = int(scale * 336); new_h = int(new_w / ratio) (float64 division,
     truncation).
  3. resize with torchvision.transforms.functional.resize(img, [new_h, new_w])
     on the PIL image. Its default interpolation is InterpolationMode.BILINEAR
     and for a PIL input it calls PIL's Image.resize(size, Image.BILINEAR):
     PIL's separable convolution resampling with the triangle filter, its
     support widened by the scale factor when shrinking (antialiased), in
     8-bit fixed point with rounding and clamping (PIL ImagingResample). NOT
     bicubic, and not torch's bilinear.
  4. pad the height to ceil(new_h / 336) * 336 with white (255, 255, 255):
     top = (target - new_h) // 2 rows, the rest at the bottom; no width
     padding (new_w is already a multiple of 336). Transpose back if step 1
     transposed. The result is H x W, both multiples of 336; image_sizes =
     [H, W].
  5. ToTensor (uint8 / 255 in f32) then Normalize with the CLIP mean/std
     ((x - mean) / std in f32).
  6. global view: torch.nn.functional.interpolate of the normalized
     (1, 3, H, W) tensor to (336, 336), mode "bicubic", align_corners False,
     no antialias (even when shrinking), A = -0.75, border taps clamped.
  7. crops: the normalized H x W tensor cut into (H/336) x (W/336) crops of
     336 x 336, row-major (reshape (3, h, 336, w, 336) -> permute to
     (h, w, 3, 336, 336)). pixel_values of an image = [global, crop_0, ...]
     ((1 + h*w), 3, 336, 336). The original then zero-pads each image to
     num_crops + 1 crops and stacks (`pad_crops`); the pad crops are never
     read.
  Tokens per image: (h*w + 1) * 144 + 1 + (h + 1) * 12.

Prompt processing (Phi3VProcessor._convert_images_texts_to_inputs): the
prompt is split on the regex <\\|image_\\d+\\|>; EACH chunk (also an empty one,
e.g. before a leading tag, which gives the BOS alone) is tokenized on its own
with the tokenizer's BOS (add_bos_token true); between chunk i and i+1 go
num_img_tokens of image k placeholders, where k is the number in the i-th tag,
as the id -k. The original checks only that the set of tag numbers is 1..n
and n equals the number of images; its embedding then fills the placeholder
positions in sequence order with the images' features in image order, so a
prompt is well formed only when the tags are <|image_1|>..<|image_n|> in that
order, each once (`tokenize_prompt` enforces that). Without images the
processor tokenizes the whole text in one piece (one BOS; a tag is then plain
text). vLLM writes the placeholders as the `<|image|>` token instead
(32044 in the real vocabulary); `tokenize_prompt(image_token_id=...)` gives
that form.

Image embedding (Phi3ImageEmbedding.hd_feature_transform, order "sub_glb"):
per image, CLIP features F (1 + h*w, 576, C) -> 2x2 merge of each crop:
token (i, j) of the 12 x 12 grid = concat(F[2i, 2j], F[2i, 2j+1],
F[2i+1, 2j], F[2i+1, 2j+1]) (4C wide); the h*w crops placed row-major into
an (12h) x (12w) grid; `sub_GN` (1, 1, 1, 4C) appended at the end of every
grid row; then one `glb_GN` (1, 1, 4C); then the global view's 12 x 12 grid,
again with `sub_GN` ending each of its 12 rows. Then img_projection:
Linear(4C -> H), GELU (exact, erf), Linear(H -> H). The projected rows replace
the token embeddings at the placeholder positions in sequence order
(token embeddings elsewhere; the original clamps negative ids to 0 for the
lookup, which is then overwritten).

Cross-checked against the original code (`cross_check_original`, run by
`tools/make_tiny_phi3v.py OUT --orig .cache/phi3v_orig`, where
.cache/phi3v_orig/phi3v_orig/ holds the five original files, git-ignored;
the figures are recorded in golden/cases.json "cross_check"). Last run
(transformers 5.17, torch 2.11, CPU, f32): every difference is exactly 0.
  - Phi3VImageProcessor.preprocess (original file, unmodified) against
    `preprocess_image` + `pad_crops`: pixel_values, image_sizes and
    num_img_tokens with num_crops 1, 4 and 16 on 500x375, 640x200, 336x336,
    200x640, 1400x90, 90x1000 and 40x30 images: max |diff| 0 (bit-identical).
  - Phi3VProcessor._convert_images_texts_to_inputs (original file,
    unmodified, with the tiny tokenizer) against `tokenize_prompt` on three
    prompts (leading tag, two images, chat): identical ids.
  - Phi3ImageEmbedding.hd_feature_transform (original file, unmodified) at
    the real width C = 1024 on random features, grids 2x2, 1x3, 3x1, 1x1,
    4x4, 2x3 (the object built without its CLIP, sharing our separators and
    projector): max |diff| 0.
  - the whole original Phi3ImageEmbedding.forward with the tiny CLIP (eager
    attention): the original hard-codes CLIP ViT-L/14-336, so its module
    constant CLIP_VIT_LARGE_PATCH14_336_CONFIG is replaced by the tiny CLIP
    config and the one assertion `C == 1024` in reshape_hd_patches_2x2merge
    is textually changed to the tiny width before import (nothing else):
    max |diff| 0 over the inputs_embeds of a two-image prompt.
  - the original Phi3VForCausalLM (modeling_phi3_v.py, eager attention,
    use_cache=False, the same weights) against the reference: logits of a
    two-image prompt of 1370 tokens (short factors) and of 2058 tokens (past
    original_max_position_embeddings 2048: long factors): max |diff| 0.
"""

import json
import math
import os
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP = 336                # crop side in pixels
PATCH = 14                # CLIP patch side
GRID = CROP // PATCH      # 24 patches per crop side
MERGED = GRID // 2        # 12: the 2x2-merged grid side
TOKENS_PER_CROP = MERGED * MERGED  # 144
TAG = re.compile(r"<\|image_\d+\|>")  # the original's pattern

# CLIP ViT-L/14-336, what the real checkpoint's img_processor is
# (image_embedding_phi3_v.py CLIP_VIT_LARGE_PATCH14_336_CONFIG).
CLIP_VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      patch_size=14, image_size=336, layer_norm_eps=1e-5, hidden_act="quick_gelu")


# ----------------------------------------------------------------------------
# Image processing
# ----------------------------------------------------------------------------

def hd_scale(width, height, num_crops):
    """(transposed, scale, new_w, new_h, padded_h) of the HD transform in the
    transposed frame (width >= height there)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP)
    new_h = int(new_w / ratio)
    padded_h = int(math.ceil(new_h / CROP) * CROP)
    return transposed, scale, new_w, new_h, padded_h


def hd_size(width, height, num_crops):
    """[H, W] (image_sizes) of the HD image, without computing it."""
    transposed, _, new_w, _, padded_h = hd_scale(width, height, num_crops)
    return [new_w, padded_h] if transposed else [padded_h, new_w]


def num_image_tokens(h_crops, w_crops):
    return (h_crops * w_crops + 1) * TOKENS_PER_CROP + 1 + (h_crops + 1) * MERGED


def hd_transform(img, num_crops):
    """The HD image (PIL, RGB): steps 1-4 of the module docstring."""
    import torchvision.transforms.functional as TF
    img = img.convert("RGB")
    transposed, _, new_w, new_h, padded_h = hd_scale(img.size[0], img.size[1], num_crops)
    if transposed:
        img = img.transpose(Image.TRANSPOSE)
    img = TF.resize(img, [new_h, new_w])  # PIL bilinear (torchvision's default on PIL input)
    top = (padded_h - new_h) // 2
    img = TF.pad(img, [0, top, 0, padded_h - new_h - top], fill=[255, 255, 255])
    if transposed:
        img = img.transpose(Image.TRANSPOSE)
    return img


def normalize(img):
    """ToTensor + Normalize: (3, H, W) f32."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return x.sub(mean).div(std)


def preprocess_image(img, num_crops):
    """One image -> {"pixel_values": (1 + h*w, 3, 336, 336) f32 [global, crops
    row-major], "image_size": [H, W], "grid": (h, w), "num_img_tokens": int}."""
    hd = normalize(hd_transform(img, num_crops))
    _, H, W = hd.shape
    h, w = H // CROP, W // CROP
    glb = F.interpolate(hd[None], size=(CROP, CROP), mode="bicubic")[0]
    crops = hd.reshape(3, h, CROP, w, CROP).permute(1, 3, 0, 2, 4).reshape(h * w, 3, CROP, CROP)
    return {"pixel_values": torch.cat([glb[None], crops]).contiguous(), "image_size": [H, W], "grid": (h, w),
            "num_img_tokens": num_image_tokens(h, w)}


def pad_crops(pixel_values, num_crops):
    """The original's batch layout: zero crops appended up to num_crops + 1."""
    n = pixel_values.shape[0]
    if n >= num_crops + 1:
        return pixel_values
    return torch.cat([pixel_values, pixel_values.new_zeros(num_crops + 1 - n, *pixel_values.shape[1:])])


# ----------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------

def tokenize_prompt(tokenizer, text, num_img_tokens, image_token_id=None):
    """Phi3VProcessor's ids for `text` with len(num_img_tokens) images: each
    chunk between <|image_k|> tags tokenized with its own BOS, image k's
    placeholders as -k (or as image_token_id when given). Tags must be
    <|image_1|>..<|image_n|> in order, each once."""
    if not num_img_tokens:
        return list(tokenizer(text)["input_ids"])
    tags = TAG.findall(text)
    want = [f"<|image_{i + 1}|>" for i in range(len(num_img_tokens))]
    if tags != want:
        raise ValueError(f"image tags {tags}, expected {want}")
    ids = []
    for i, chunk in enumerate(TAG.split(text)):
        ids += list(tokenizer(chunk)["input_ids"])
        if i < len(tags):
            ids += [-(i + 1) if image_token_id is None else image_token_id] * num_img_tokens[i]
    return ids


# The real chat template (tokenizer_config.json of Phi-3.5-vision-instruct):
# string content only.
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] "
                 "+ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != "
                 "'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}")

# Kestrel's extension for OpenAI-style list content: identical to
# CHAT_TEMPLATE on string content; an image part renders as "<|image_k|>\n"
# with k counting images from 1 over the whole conversation; a text part as
# its text, plus "\n" unless it is the message's last part; other parts
# render nothing. One line, no whitespace outside the blocks (trim_blocks /
# lstrip_blocks change nothing).
KESTREL_CHAT_TEMPLATE = (
    "{% set ns = namespace(image=0) %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "{% set ns.image = ns.image + 1 %}{{ '<|image_' + ns.image|string + '|>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '<|assistant|>\n' }}{% endif %}"
)


def render(messages, add_generation_prompt=True):
    """The reference rendering of KESTREL_CHAT_TEMPLATE."""
    out, k = [], 0
    for m in messages:
        out.append(f"<|{m['role']}|>\n")
        c = m["content"]
        if isinstance(c, str):
            out.append(c)
        else:
            for i, part in enumerate(c):
                if part["type"] in ("image", "image_url"):
                    k += 1
                    out.append(f"<|image_{k}|>\n")
                elif part["type"] == "text":
                    out.append(part["text"] + ("\n" if i + 1 < len(c) else ""))
        out.append("<|end|>\n")
    if add_generation_prompt and messages[-1]["role"] != "assistant":
        out.append("<|assistant|>\n")
    return "".join(out)


def check_templates(conversations):
    """KESTREL_CHAT_TEMPLATE == render() everywhere, and == CHAT_TEMPLATE on
    string content (plain jinja2, with and without trim/lstrip_blocks)."""
    import jinja2
    for env in (jinja2.Environment(), jinja2.Environment(trim_blocks=True, lstrip_blocks=True)):
        ours, real = env.from_string(KESTREL_CHAT_TEMPLATE), env.from_string(CHAT_TEMPLATE)
        for msgs in conversations:
            for gen in (True, False):
                a, b = ours.render(messages=msgs, add_generation_prompt=gen), render(msgs, gen)
                assert a == b, f"template renders {a!r}, render() {b!r}"
                if all(isinstance(m["content"], str) for m in msgs):
                    c = real.render(messages=msgs, add_generation_prompt=gen)
                    assert a == c, f"ours {a!r} vs the real template {c!r}"


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------

def phi3_text_config(cfg):
    """transformers.Phi3Config for the decoder of a Phi-3-V config.json dict."""
    from transformers import Phi3Config
    rs = cfg.get("rope_scaling")
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    if rs is not None:
        if rs.get("type", rs.get("rope_type")) not in ("su", "longrope"):
            raise ValueError(f"rope_scaling type {rs} not supported")
        assert len(rs["short_factor"]) == len(rs["long_factor"]) == head_dim // 2, rs
        rope.update(rope_type="longrope", short_factor=list(rs["short_factor"]), long_factor=list(rs["long_factor"]),
                    original_max_position_embeddings=cfg["original_max_position_embeddings"])
    return Phi3Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        hidden_act=cfg.get("hidden_act", "silu"), max_position_embeddings=cfg["max_position_embeddings"],
        original_max_position_embeddings=cfg["original_max_position_embeddings"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5), tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        rope_parameters=rope, bos_token_id=cfg.get("bos_token_id", 1), eos_token_id=cfg.get("eos_token_id", 2),
        pad_token_id=cfg.get("pad_token_id"), sliding_window=cfg.get("sliding_window"),
        attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0)


def clip_vision_config(cfg):
    """transformers.CLIPVisionConfig of the img_processor: the Kestrel-only
    img_processor.vision_config when present, else CLIP ViT-L/14-336."""
    from transformers import CLIPVisionConfig
    ip = cfg["img_processor"]
    if ip.get("name") != "clip_vision_model":
        raise ValueError(f"img_processor {ip} not supported")
    v = dict(CLIP_VIT_L_336, **ip.get("vision_config", {}))
    if (v["image_size"], v["patch_size"]) != (CROP, PATCH):
        raise ValueError("the HD transform needs 336 px crops and patch 14")
    if v["hidden_size"] != ip["image_dim_out"]:
        raise ValueError(f"image_dim_out {ip['image_dim_out']} != CLIP width {v['hidden_size']}")
    return CLIPVisionConfig(num_channels=3, projection_dim=v["hidden_size"], attention_dropout=0.0, **v)


def rope_table(cfg, max_position):
    """Which factors HF uses for a forward whose largest position is max_position."""
    if cfg.get("rope_scaling") is None:
        return "none"
    return "long" if max_position + 1 > cfg["original_max_position_embeddings"] else "short"


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------

class ImageEmbedding(nn.Module):
    """model.vision_embed_tokens: CLIP, separators and projector (ours, from
    image_embedding_phi3_v.py Phi3ImageEmbedding with hd_transform_order
    "sub_glb", projection_cls "mlp", use_hd_transform and learnable
    separators)."""

    def __init__(self, cfg, attn_implementation="eager"):
        super().__init__()
        from transformers import CLIPVisionModel
        el = cfg["embd_layer"]
        if not (el.get("use_hd_transform") and el.get("with_learnable_separator")
                and el.get("hd_transform_order") == "sub_glb" and el.get("projection_cls") == "mlp"):
            raise ValueError(f"embd_layer {el} not supported")
        ip = cfg["img_processor"]
        self.layer_idx = ip.get("layer_idx", -2)
        if ip.get("type_feature", "patch") != "patch":
            raise ValueError("only type_feature 'patch'")
        self.img_processor = CLIPVisionModel._from_config(clip_vision_config(cfg),
                                                          attn_implementation=attn_implementation)
        c4, hidden = 4 * ip["image_dim_out"], cfg["hidden_size"]
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, c4))      # (1, 1, 4C)
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, c4))   # (1, 1, 1, 4C)
        self.img_projection = nn.Sequential(nn.Linear(c4, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def clip_features(self, pixel_values):
        """(N, 3, 336, 336) -> (N, 576, C): hidden_states[layer_idx], CLS dropped."""
        out = self.img_processor(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.layer_idx][:, 1:]

    @staticmethod
    def merge2x2(f, h, w):
        """(h*w, 576, C) crops, row-major -> (12h, 12w, 4C)."""
        n, l, c = f.shape
        assert n == h * w and l == GRID * GRID
        x = f.reshape(n, MERGED, 2, MERGED, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, MERGED, MERGED, 4 * c)
        return x.reshape(h, w, MERGED, MERGED, 4 * c).permute(0, 2, 1, 3, 4).reshape(h * MERGED, w * MERGED, 4 * c)

    def with_row_separators(self, grid):
        """(rows, cols, 4C) -> (rows * (cols + 1), 4C), sub_GN ending each row."""
        rows = grid.shape[0]
        sep = self.sub_GN.reshape(1, 1, -1).expand(rows, 1, -1).to(grid.dtype)
        return torch.cat([grid, sep], dim=1).reshape(-1, grid.shape[-1])

    def merge(self, features, grid):
        """One image's CLIP features (1 + h*w, 576, C) [global first] -> the
        sequence before the projector (num_img_tokens, 4C)."""
        h, w = grid
        sub = self.with_row_separators(self.merge2x2(features[1:1 + h * w], h, w))
        glb = self.with_row_separators(self.merge2x2(features[:1], 1, 1))
        return torch.cat([sub, self.glb_GN.reshape(1, -1).to(sub.dtype), glb])

    def forward(self, images):
        """images: preprocess_image() dicts. Returns per image (features
        (1+h*w, 576, C), merged (T, 4C), projected (T, H))."""
        out = []
        p = self.img_projection[0].weight
        for im in images:
            feats = self.clip_features(im["pixel_values"].to(p.device, p.dtype))
            merged = self.merge(feats, im["grid"])
            out.append((feats, merged, self.img_projection(merged)))
        return out


class Phi3VReference(nn.Module):
    """Phi-3-V: transformers' Phi3ForCausalLM with our ImageEmbedding mounted at
    model.vision_embed_tokens, so that state_dict() names are the checkpoint's
    (but for CLIP, whose transformers 5 names lack the checkpoint's
    `vision_model.` prefix: see checkpoint_name)."""

    def __init__(self, cfg, attn_implementation="eager"):
        super().__init__()
        from transformers import Phi3ForCausalLM
        self.cfg = cfg
        self.lm = Phi3ForCausalLM._from_config(phi3_text_config(cfg), attn_implementation=attn_implementation)
        self.lm.model.vision_embed_tokens = ImageEmbedding(cfg, attn_implementation)

    @property
    def vision(self):
        return self.lm.model.vision_embed_tokens

    @staticmethod
    def checkpoint_name(name):
        pre = "model.vision_embed_tokens.img_processor."
        return name.replace(pre, pre + "vision_model.", 1) if name.startswith(pre) else name

    def checkpoint_state_dict(self):
        return {self.checkpoint_name(k): v for k, v in self.lm.state_dict().items()}

    def load_checkpoint(self, tensors):
        """Loads {checkpoint name: tensor}; every name must be known and every
        parameter given (model.vision_embed_tokens.wte.weight, an alias of
        model.embed_tokens.weight, is accepted if equal)."""
        own = self.checkpoint_state_dict()
        tensors = dict(tensors)
        wte = tensors.pop("model.vision_embed_tokens.wte.weight", None)
        unknown = sorted(set(tensors) - set(own))
        missing = sorted(set(own) - set(tensors))
        if unknown or missing:
            raise KeyError(f"unknown {unknown[:8]}, missing {missing[:8]}")
        if wte is not None:
            assert torch.equal(wte, tensors["model.embed_tokens.weight"])
        inv = {self.checkpoint_name(k): k for k in self.lm.state_dict()}
        self.lm.load_state_dict({inv[k]: v for k, v in tensors.items()}, strict=True)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        from safetensors.torch import load_file
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        files = sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors"))
        tensors = {}
        for fn in files:
            tensors.update(load_file(os.path.join(path, fn)))
        with torch.device(device):
            model = cls(cfg)  # built for real (not on "meta"): the non-persistent buffers are set up
        model.load_checkpoint({k: v.to(device) for k, v in tensors.items()})
        model = model.to(dtype)
        # The rotary tables stay f32, as in a model that transformers loads in
        # bf16 from disk (a cast would round inv_freq to bf16: REFERENCE.md).
        rot = model.lm.model.rotary_emb
        model.lm.model.rotary_emb = type(rot)(model.lm.config).to(device)
        return model.eval()

    def embed(self, input_ids, images, image_token_id=None):
        """input_ids (n,) with the images' placeholders (negative ids, or
        image_token_id when given) and the images' preprocess_image() dicts
        -> (inputs_embeds (1, n, H), ImageEmbedding outputs per image)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.lm.device)
        mask = (ids < 0) if image_token_id is None else (ids < 0) | (ids == image_token_id)
        emb = self.lm.model.embed_tokens(ids.clamp(min=0).masked_fill(mask, 0))
        vis = self.vision(images) if images else []
        if vis:
            feats = torch.cat([v[2] for v in vis]).to(emb.dtype)
            if feats.shape[0] != int(mask.sum()):
                raise ValueError(f"{int(mask.sum())} placeholders for {feats.shape[0]} image features")
            emb = emb.clone()
            emb[mask] = feats
        elif bool(mask.any()):
            raise ValueError("placeholders without images")
        return emb[None], vis

    def forward(self, input_ids, images=(), image_token_id=None, **kw):
        emb, _ = self.embed(input_ids, list(images), image_token_id)
        return self.lm(inputs_embeds=emb, use_cache=False, **kw)


# ----------------------------------------------------------------------------
# Cross-check against the original remote code
# ----------------------------------------------------------------------------

def import_original(orig_dir, clip_overrides=None):
    """Imports the original files from orig_dir/phi3v_orig/ (a package of
    configuration_phi3_v.py, image_embedding_phi3_v.py,
    image_processing_phi3_v.py, processing_phi3_v.py, modeling_phi3_v.py).
    With clip_overrides (a dict of CLIPVisionConfig fields), a patched copy of
    image_embedding_phi3_v.py is imported instead whose ViT-L/14-336 config
    constant is replaced by those fields and whose width assertion reads
    the new width; returns the modules as a dict."""
    import importlib
    import sys
    import types
    pkg_dir = os.path.join(orig_dir, "phi3v_orig")
    name = "phi3v_orig" if clip_overrides is None else "phi3v_orig_tiny"
    if name in sys.modules:
        return {k: sys.modules[f"{name}.{k}"] for k in
                ("configuration_phi3_v", "image_embedding_phi3_v", "image_processing_phi3_v",
                 "processing_phi3_v", "modeling_phi3_v")}
    pkg = types.ModuleType(name)
    pkg.__path__ = [pkg_dir]
    sys.modules[name] = pkg
    mods = {}
    for mod in ("configuration_phi3_v", "image_processing_phi3_v", "image_embedding_phi3_v", "processing_phi3_v",
                "modeling_phi3_v"):
        path = os.path.join(pkg_dir, mod + ".py")
        with open(path) as f:
            src = f.read()
        if mod == "image_embedding_phi3_v" and clip_overrides is not None:
            src = _patch_clip(src, clip_overrides)
        m = types.ModuleType(f"{name}.{mod}")
        m.__file__ = path
        m.__package__ = name
        sys.modules[f"{name}.{mod}"] = m
        exec(compile(src, path, "exec"), m.__dict__)
        mods[mod] = m
    importlib.invalidate_caches()
    return mods


def _patch_clip(src, v):
    start = src.index("CLIP_VIT_LARGE_PATCH14_336_CONFIG = CLIPVisionConfig(")
    end = src.index(")", start) + 1
    fields = ", ".join(f"{k}={v[k]!r}" for k in sorted(v))
    src = src[:start] + f"CLIP_VIT_LARGE_PATCH14_336_CONFIG = CLIPVisionConfig({fields})" + src[end:]
    assert src.count("C == 1024") == 1
    return src.replace("C == 1024", f"C == {v['hidden_size']}")


def _orig_embedding_shell(mod, vision, hd_order="sub_glb"):
    """An original Phi3ImageEmbedding without its CLIP, sharing our
    separators and projector (for the real-width check)."""
    obj = mod.Phi3ImageEmbedding.__new__(mod.Phi3ImageEmbedding)
    nn.Module.__init__(obj)
    obj.hd_transform_order = hd_order
    obj.glb_GN, obj.sub_GN, obj.img_projection = vision.glb_GN, vision.sub_GN, vision.img_projection
    return obj


@torch.no_grad()
def cross_check_original(orig_dir, model, tokenizer, images, seed=0):
    """Runs the checks listed in the module docstring; returns {check: max |diff|}
    and raises if a check that must be exact is not. `images`: PIL images of
    assorted shapes. `model`: a Phi3VReference (the tiny one)."""
    res = {}
    orig = import_original(orig_dir)
    # 1. image processor, bit for bit.
    worst = 0.0
    for nc in (1, 4, 16):
        ip = orig["image_processing_phi3_v"].Phi3VImageProcessor(num_crops=nc)
        for img in images:
            o = ip.preprocess([img], return_tensors="pt")
            r = preprocess_image(img, nc)
            assert o["image_sizes"][0].tolist() == r["image_size"], (o["image_sizes"], r["image_size"])
            assert int(o["num_img_tokens"][0]) == r["num_img_tokens"]
            assert o["pixel_values"].shape[1] == max(nc + 1, r["pixel_values"].shape[0])
            d = float((o["pixel_values"][0] - pad_crops(r["pixel_values"], nc)).abs().max())
            worst = max(worst, d)
    res["image_processor_pixel_values_max_abs_diff"] = worst
    assert worst == 0.0, f"pixel values differ from the original by {worst}"
    # 2. prompt processing.
    proc = orig["processing_phi3_v"].Phi3VProcessor.__new__(orig["processing_phi3_v"].Phi3VProcessor)
    proc.tokenizer, proc.num_img_tokens = tokenizer, 144
    prompts = ["<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n",
               "<|image_1|> Represent the given image.",
               "<|user|>\nCompare\n<|image_1|>\nwith\n<|image_2|>\nplease.<|end|>\n<|assistant|>\n"]
    for p in prompts:
        n = len(TAG.findall(p))
        toks = [757, 313][:n] if n == 2 else [757]
        feats = {"pixel_values": torch.zeros(n, 2, 3, 4, 4), "image_sizes": torch.tensor([[672, 672]] * n),
                 "num_img_tokens": toks}
        o = proc._convert_images_texts_to_inputs(feats, p, return_tensors="pt")["input_ids"][0].tolist()
        assert o == tokenize_prompt(tokenizer, p, toks), p
    res["prompt_ids_equal"] = len(prompts)
    # 3. the HD feature transform at the real width, on random features.
    emb_mod = orig["image_embedding_phi3_v"]
    g = torch.Generator().manual_seed(seed)
    real_c, hidden = 1024, 48
    shell_vision = nn.Module()
    shell_vision.glb_GN = nn.Parameter(torch.randn(1, 1, 4 * real_c, generator=g))
    shell_vision.sub_GN = nn.Parameter(torch.randn(1, 1, 1, 4 * real_c, generator=g))
    shell_vision.img_projection = nn.Sequential(nn.Linear(4 * real_c, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    shell = _orig_embedding_shell(emb_mod, shell_vision)
    worst = 0.0
    for grids in ([(2, 2), (1, 3)], [(3, 1), (1, 1)], [(4, 4), (2, 3)]):
        ncrop = max(h * w for h, w in grids) + 1
        feats = torch.randn(len(grids), ncrop, 576, real_c, generator=g)
        sizes = torch.tensor([[h * CROP, w * CROP] for h, w in grids])
        o = shell.hd_feature_transform(feats, sizes)
        mine = []
        for i, (h, w) in enumerate(grids):
            merged = ImageEmbedding.merge(shell_vision_as_embedding(shell_vision), feats[i, :1 + h * w], (h, w))
            mine.append(shell_vision.img_projection(merged))
        worst = max(worst, float((o - torch.cat(mine)).abs().max()))
    res["hd_feature_transform_real_width_max_abs_diff"] = worst
    assert worst == 0.0, worst
    # 4. the whole original Phi3ImageEmbedding.forward with the tiny CLIP.
    vcfg = clip_vision_config(model.cfg)
    tiny = import_original(orig_dir, clip_overrides={k: getattr(vcfg, k) for k in CLIP_VIT_L_336})
    ocfg = _orig_config(tiny, model.cfg)
    oemb = tiny["image_embedding_phi3_v"].Phi3ImageEmbedding(ocfg, wte=model.lm.model.embed_tokens,
                                                             **model.cfg["embd_layer"])
    sd = {k: v for k, v in model.vision.state_dict().items()}
    oemb.img_processor.load_state_dict(
        {k[len("img_processor."):]: v for k, v in sd.items() if k.startswith("img_processor.")}, strict=True)
    for k in ("glb_GN", "sub_GN"):
        getattr(oemb, k).copy_(sd[k])
    oemb.img_projection.load_state_dict(model.vision.img_projection.state_dict())
    oemb.img_processor.config._attn_implementation = "eager"  # as ours (it defaults to sdpa)
    oemb.eval()
    worst = 0.0
    nc = 4
    ims = [preprocess_image(images[0], nc), preprocess_image(images[1], nc)]
    pv = torch.stack([pad_crops(i["pixel_values"], nc) for i in ims])
    sizes = torch.tensor([i["image_size"] for i in ims])
    text = tokenizer("<|user|>\nx")["input_ids"]
    ids = text + [-1] * ims[0]["num_img_tokens"] + text + [-2] * ims[1]["num_img_tokens"] + text
    o = oemb(torch.tensor([ids]), pixel_values=pv, image_sizes=sizes)[0]
    r, _ = model.embed(ids, ims)
    worst = float((o - r[0]).abs().max())
    res["image_embedding_tiny_clip_max_abs_diff"] = worst
    res["image_embedding_tiny_clip_max_abs"] = float(r.abs().max())
    assert worst < 1e-5, worst
    # 5. the original decoder (Phi3VForCausalLM) with the same weights.
    res.update(_cross_check_decoder(tiny, model, ids, ims, pv, sizes))
    return res


def shell_vision_as_embedding(v):
    """Lets ImageEmbedding.merge run on an object holding only sub_GN/glb_GN."""
    e = ImageEmbedding.__new__(ImageEmbedding)
    nn.Module.__init__(e)
    e.sub_GN, e.glb_GN = v.sub_GN, v.glb_GN
    return e


def _orig_config(mods, cfg):
    """The original Phi3VConfig of a config.json dict (a deep copy: transformers
    5 rewrites the rope_scaling dict it is given in place)."""
    import copy
    cfg = copy.deepcopy(cfg)
    ocfg = mods["configuration_phi3_v"].Phi3VConfig(**{k: v for k, v in cfg.items()
                                                      if k not in ("architectures", "auto_map", "model_type")})
    ocfg._attn_implementation = "eager"
    return ocfg


def _cross_check_decoder(tiny, model, ids, ims, pv, sizes):
    m = tiny["modeling_phi3_v"]
    cfg = model.cfg
    ocfg = _orig_config(tiny, cfg)
    om = m.Phi3VForCausalLM(ocfg).eval()
    sd = model.lm.state_dict()  # transformers 5 names (CLIP without vision_model.), as the original's modules have
    missing, unexpected = om.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("wte.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    out = {}
    orig_len = cfg["original_max_position_embeddings"]
    text = [1] + list(range(300, 340))
    long_ids = ids + (text * (orig_len // len(text) + 1))[: max(0, orig_len + 10 - len(ids))]
    for name, seq in (("short", ids), ("long", long_ids)):
        a = om(input_ids=torch.tensor([seq]), pixel_values=pv, image_sizes=sizes, use_cache=False).logits[0]
        b = model(seq, ims).logits[0]
        assert rope_table(cfg, len(seq) - 1) == name
        out[f"decoder_logits_{name}_rope_{len(seq)}_tokens_max_abs_diff"] = float((a - b).abs().max())
        out[f"decoder_logits_{name}_rope_max_abs_logit"] = float(b.abs().max())
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (name, float((a - b).abs().max()))
    return out
