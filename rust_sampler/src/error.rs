//! The one error type of the crate. Every failure a user can cause (a missing or malformed
//! file, a dtype that is not a token dtype, a file too short for the context, a bad argument)
//! is a variant here; `python.rs` maps it to a Python exception in one place.

use std::fmt;
use std::io;
use std::path::PathBuf;

#[derive(Debug)]
pub enum SamplerError {
    /// The file could not be opened, read or mapped.
    Io { path: PathBuf, source: io::Error },
    /// The file exists but is not a usable token file (bad magic, truncated, wrong dtype, ...).
    Format { path: PathBuf, reason: String },
    /// A token source holds fewer than `context_length + 1` tokens.
    TooShort {
        name: String,
        len: u64,
        context_length: usize,
    },
    /// An argument is out of range or inconsistent (weights, shapes, context length, ...).
    Argument(String),
    /// A mapped file shrank under a read (another process truncated it); what was read is void.
    Truncated { name: String },
    /// A gathered window holds an id outside `0..vocab_size` (the bound the sampler was given).
    IdOutOfRange {
        name: String,
        id: i64,
        start: u64,
        vocab_size: u64,
    },
    /// A loss mask holds another number of values than its token file holds tokens.
    MaskLength {
        mask: String,
        mask_len: u64,
        tokens: String,
        tokens_len: u64,
    },
    /// A masked token file has no conversation start with room for a window.
    NoConversation {
        name: String,
        mask: String,
        eot: i64,
        context_length: usize,
    },
    /// A gathered mask window holds a value other than 0 or 1.
    BadMask {
        mask: String,
        value: u8,
        position: u64,
    },
}

pub type Result<T> = std::result::Result<T, SamplerError>;

impl SamplerError {
    pub(crate) fn format(path: &std::path::Path, reason: impl Into<String>) -> Self {
        SamplerError::Format {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for SamplerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SamplerError::Io { path, source } if source.kind() == io::ErrorKind::NotFound => {
                write!(f, "{}: file not found; check the path", path.display())
            }
            SamplerError::Io { path, source } => {
                write!(
                    f,
                    "{}: cannot read the file ({source}); check that it exists and is readable",
                    path.display()
                )
            }
            SamplerError::Format { path, reason } => write!(f, "{}: {reason}", path.display()),
            SamplerError::TooShort {
                name,
                len,
                context_length,
            } => write!(
                f,
                "{name}: holds {len} tokens but a window needs context_length + 1 = {} tokens; \
                 use a smaller context_length or more data",
                *context_length as u64 + 1
            ),
            SamplerError::Argument(msg) => f.write_str(msg),
            SamplerError::Truncated { name } => write!(
                f,
                "{name} shrank while the run was reading it (truncated under its memory map); \
                 stopped, and the batch read past its end discarded"
            ),
            SamplerError::IdOutOfRange {
                name,
                id,
                start,
                vocab_size,
            } => write!(
                f,
                "{name}: holds token id {id} (in the window at token {start}), outside 0..{} for \
                 vocab_size {vocab_size}; the batch is refused: the file changed since its \
                 meta.json was written, or holds another tokenizer's ids; prepare it again",
                vocab_size.saturating_sub(1)
            ),
            SamplerError::MaskLength {
                mask,
                mask_len,
                tokens,
                tokens_len,
            } => write!(
                f,
                "{mask} holds {mask_len} mask values but {tokens} holds {tokens_len} tokens; \
                 prepare the folder again"
            ),
            SamplerError::NoConversation {
                name,
                mask,
                eot,
                context_length,
            } => write!(
                f,
                "{name}: no conversation start leaves room for a window of context_length + 1 = {} \
                 tokens (a conversation starts at an end-of-text id {eot} whose value in {mask} is \
                 0); use a smaller context_length, or prepare the folder again",
                *context_length as u64 + 1
            ),
            SamplerError::BadMask {
                mask,
                value,
                position,
            } => write!(
                f,
                "{mask}: holds mask value {value} at position {position}; a loss mask holds only 0 \
                 (not trained) and 1 (a training target); prepare the folder again"
            ),
        }
    }
}

impl std::error::Error for SamplerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SamplerError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
