//! Media: decoding images (and, later, fetching them safely).

pub mod image;
