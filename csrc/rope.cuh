// What the RoPE kernels share (rope.cu, and qkv_rope.cu, which fuses M-RoPE
// with the q/k/v bias and the KV-cache write): the frequencies, M-RoPE's
// section of a frequency, and the rotation of one (i, i + half) pair. One
// definition, so the fused kernel and the composition of the separate ones
// give bit-identical results on the GPU (tests/kernels/qkv_rope.rs checks).
// Angles go through sincosf, not __sincosf: they reach ~3e4 rad (position x
// inv_freq up to 1), where the fast intrinsic's error grows with |angle|;
// sincosf does a full range reduction and stays within 2 ulp.
#pragma once
#include "common.cuh"

// theta^(-i / n), computed in double and rounded to f32. In f32 the rounding of
// the exponent i/n is amplified by ln(theta) (~14 for theta = 1e6) into several
// ulps of inv_freq; double gives the correctly rounded value, the same one the
// CPU reference computes, so both sides form the same f32 angle.
__device__ __forceinline__ float inv_freq(float theta, int i, int n) {
    return (float)pow((double)theta, -(double)i / (double)n);
}

// M-RoPE's position row of frequency i: 0 (temporal) for i < s0, 1 (height)
// for s0 <= i < s0 + s1, 2 (width) after.
__device__ __forceinline__ int mrope_row(int i, int s0, int s1) { return i < s0 ? 0 : (i < s0 + s1 ? 1 : 2); }

// Frequency i of a token whose RoPE reads a table of per-sequence inverse
// frequencies (longrope: a short and a long table, (tables, half) f32, made on
// the host from the checkpoint's factors): the table is the token's position
// row 1 (its row 0 gives the angle), clamped into range so bad device data
// cannot read outside the tables.
__device__ __forceinline__ float table_freq(const float* __restrict__ table, int tables, int sel, int i, int half) {
    sel = sel < 0 ? 0 : (sel >= tables ? tables - 1 : sel);
    return table[(size_t)sel * half + i];
}

// (a, b) = (x[i], x[i + half]) turned by the angle whose cosine and sine are
// (c, s): (a c - b s, b c + a s). The fused multiply-adds are written out so
// that every kernel rounds the same way, whatever the compiler would contract.
__device__ __forceinline__ float2 rotate_pair(float a, float b, float c, float s) {
    return make_float2(__fmaf_rn(a, c, -b * s), __fmaf_rn(b, c, a * s));
}
