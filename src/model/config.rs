//! Qwen2-VL config (being written).
