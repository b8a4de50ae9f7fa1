#!/usr/bin/env python3
"""Compares Kestrel's logits with Hugging Face transformers' on the same
random checkpoint, the way vLLM's `check_logprobs_close` does.

    python3 tools/compare_hf_logits.py GOLDEN_DIR OURS_DIR [--json OUT]

GOLDEN_DIR: from tools/make_tiny_qwen2vl.py (--config 2b|7b, or --logits-dump)
or tools/make_tiny_llava.py (--config 7b --logits-dump, or tiny --logits-dump)
or tools/phi3v_compare.py (--config real, or tiny; its reference in place of HF):
per case, HF's greedy continuation (f32 model) and the logits predicting
each of its tokens, from the f32 model and from the same weights in bf16.
OURS_DIR: from `kestrel compare-hf`: our logits on HF's tokens
(teacher-forced) and our own free-running greedy continuation.

The metric (per case, over the k positions that predict HF's tokens):
  top1      fraction of positions whose argmax equals HF f32's
  dlp       max |Δ logprob| over HF f32's top-5 tokens at every position
  tie gap   HF f32's top-1 minus top-2 logit where a top-1 differs
The same metrics for HF's own bf16 run give the noise floor measured in the
same run (REFERENCE.md: bf16 against f32 is not exact on random weights).

The threshold (a case passes when all hold):
  1. dlp(ours) <= 2 * dlp(HF bf16) + 0.01: no less accurate than HF's own bf16
     path, within the factor flash-attention's tests allow a kernel over a
     naive implementation in the same precision.
  2. every position where our top-1 differs from HF f32's is a near-tie: HF's
     top-1/top-2 gap there is below NOISE = 2 * max |Δ logit| of HF bf16
     against HF f32 over the top-5 (the bf16 noise measured on this case).
  3. our free-running greedy continuation equals HF's up to its first
     divergence, and that divergence (if any) is at a near-tie (same NOISE).
Exit status 1 if any case fails.
"""
import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def metrics(test_logits, ref_logits, top=5):
    ref_lp, test_lp = log_softmax(ref_logits), log_softmax(test_logits)
    top5 = np.argsort(-ref_lp, -1)[:, :top]
    dlp = np.abs(np.take_along_axis(test_lp, top5, -1) - np.take_along_axis(ref_lp, top5, -1)).max()
    dlogit = np.abs(np.take_along_axis(test_logits.astype(np.float64), top5, -1)
                    - np.take_along_axis(ref_logits.astype(np.float64), top5, -1)).max()
    agree = test_logits.argmax(-1) == ref_logits.argmax(-1)
    return dict(top1=float(agree.mean()), dlp=float(dlp), dlogit=float(dlogit), disagree=np.nonzero(~agree)[0].tolist())


def gap(logits, pos):
    s = np.sort(logits[pos].astype(np.float64))[::-1]
    return float(s[0] - s[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("golden")
    ap.add_argument("ours")
    ap.add_argument("--json")
    args = ap.parse_args()
    meta = json.load(open(os.path.join(args.golden, "cases.json")))
    rows, ok_all = [], True
    for name in meta["cases"]:
        g = load_file(os.path.join(args.golden, f"{name}.safetensors"))
        o = load_file(os.path.join(args.ours, f"{name}.safetensors"))
        ids_ok = bool(np.array_equal(g["input_ids"], o["input_ids"]))
        ref = g["logits_f32"]
        hb = metrics(g["logits_bf16"], ref)
        us = metrics(o["logits"], ref)
        noise = 2 * hb["dlogit"]
        ties = [p for p in us["disagree"] if gap(ref, p) < noise]
        hf_greedy, our_greedy = g["greedy"].tolist(), o["greedy"].tolist()
        first = next((i for i, (a, b) in enumerate(zip(hf_greedy, our_greedy)) if a != b), None)
        div_tie = first is None or gap(ref, first) < noise
        bound = 2 * hb["dlp"] + 0.01
        ok = ids_ok and us["dlp"] <= bound and len(ties) == len(us["disagree"]) and div_tie
        ok_all &= ok
        rows.append(dict(case=name, prompt_tokens=len(g["input_ids"]), positions=len(ref), ids_equal=ids_ok,
                         top1_ours=us["top1"], top1_hf_bf16=hb["top1"], dlp_ours=us["dlp"], dlp_hf_bf16=hb["dlp"],
                         dlp_bound=bound, noise=noise, near_ties=len(ties), disagreements=len(us["disagree"]),
                         greedy_equal_prefix=len(hf_greedy) if first is None else first,
                         divergence_gap=None if first is None else gap(ref, first), ok=ok))
    hdr = (f"{'case':<11} {'prompt':>6} {'k':>3} {'top1 ours':>9} {'top1 bf16':>9} {'dlp ours':>9} "
           f"{'dlp bf16':>9} {'bound':>7} {'ties':>5} {'greedy=':>7} {'result':>6}")
    print(hdr)
    for r in rows:
        print(f"{r['case']:<11} {r['prompt_tokens']:>6} {r['positions']:>3} {r['top1_ours']:>9.3f} "
              f"{r['top1_hf_bf16']:>9.3f} {r['dlp_ours']:>9.4f} {r['dlp_hf_bf16']:>9.4f} {r['dlp_bound']:>7.4f} "
              f"{r['near_ties']:>2}/{r['disagreements']:<2} {r['greedy_equal_prefix']:>7} {'ok' if r['ok'] else 'FAIL':>6}")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)
    print("all cases pass" if ok_all else "SOME CASES FAIL")
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    main()
