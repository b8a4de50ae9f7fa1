//! Image and video preprocessing (being written).
