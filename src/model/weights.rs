//! Safetensors weights (being written).
