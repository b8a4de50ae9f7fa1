//! M-RoPE position ids (being written).
