#[cfg(feature = "python")]
mod python;
