//! Image decoding (being written).
