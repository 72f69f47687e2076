//! rust_sampler: memory-mapped token files and a deterministic, parallel window sampler.
//!
//! The core (`npy`, `source`, `rng`, `sampler`) is plain Rust and knows nothing of Python;
//! `python.rs` (feature `python`) is the only binding layer.

#[cfg(target_endian = "big")]
compile_error!(
    "rust_sampler reads little-endian token files in place and supports little-endian targets only"
);

pub mod error;
pub mod fault;
pub mod npy;
pub mod rng;
pub mod sampler;
pub mod source;

#[cfg(feature = "python")]
mod python;

pub use error::{Result, SamplerError};
pub use sampler::{Sampler, Window, IGNORE_INDEX};
pub use source::{Dtype, TokenFile, TokenStorage, TokenView};
