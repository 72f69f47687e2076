//! Token sources: a named, read-only, 1-D run of integer tokens. The bytes live in a memory
//! map the crate opened itself (`.npy` or raw `.bin`) or in memory someone else owns (a numpy
//! array lent through the buffer protocol; the binding layer keeps it alive).

use crate::error::{Result, SamplerError};
use crate::{fault, npy};
use memmap2::Mmap;
use rayon::prelude::*;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Integer dtypes a source may hold. Files are limited to the four token dtypes; arrays lent
/// from Python may be any integer type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::U8 => "uint8",
            Dtype::I8 => "int8",
            Dtype::U16 => "uint16",
            Dtype::I16 => "int16",
            Dtype::U32 => "uint32",
            Dtype::I32 => "int32",
            Dtype::U64 => "uint64",
            Dtype::I64 => "int64",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::U8 | Dtype::I8 => 1,
            Dtype::U16 | Dtype::I16 => 2,
            Dtype::U32 | Dtype::I32 => 4,
            Dtype::U64 | Dtype::I64 => 8,
        }
    }

    /// numpy's type code without the byte order ("u2" for uint16).
    pub fn code(self) -> &'static str {
        match self {
            Dtype::U8 => "u1",
            Dtype::I8 => "i1",
            Dtype::U16 => "u2",
            Dtype::I16 => "i2",
            Dtype::U32 => "u4",
            Dtype::I32 => "i4",
            Dtype::U64 => "u8",
            Dtype::I64 => "i8",
        }
    }

    /// The dtypes a token file may hold, by numpy name or type string ("uint16", "u2", "<u2").
    pub fn parse_file_dtype(s: &str) -> Option<Dtype> {
        let code = s.strip_prefix('<').unwrap_or(s);
        FILE_DTYPES
            .into_iter()
            .find(|d| d.name() == s || d.code() == code)
    }
}

/// The dtypes a token file may hold: the one definition (Python reads it as
/// `lmtools._sampler.TOKEN_DTYPES`).
pub const FILE_DTYPES: [Dtype; 4] = [Dtype::U16, Dtype::U32, Dtype::I32, Dtype::I64];

/// "uint16, uint32, int32 or int64": the token dtypes, as messages list them.
pub fn file_dtypes_text() -> String {
    let names: Vec<&str> = FILE_DTYPES.iter().map(|d| d.name()).collect();
    format!(
        "{} or {}",
        names[..names.len() - 1].join(", "),
        names[names.len() - 1]
    )
}

/// A typed view of a source's tokens.
#[derive(Clone, Copy, Debug)]
pub enum TokenView<'a> {
    U8(&'a [u8]),
    I8(&'a [i8]),
    U16(&'a [u16]),
    I16(&'a [i16]),
    U32(&'a [u32]),
    I32(&'a [i32]),
    U64(&'a [u64]),
    I64(&'a [i64]),
}

/// Runs `$body` with `$s` bound to the typed slice inside a `TokenView`.
macro_rules! with_slice {
    ($view:expr, $s:ident => $body:expr) => {
        match $view {
            TokenView::U8($s) => $body,
            TokenView::I8($s) => $body,
            TokenView::U16($s) => $body,
            TokenView::I16($s) => $body,
            TokenView::U32($s) => $body,
            TokenView::I32($s) => $body,
            TokenView::U64($s) => $body,
            TokenView::I64($s) => $body,
        }
    };
}
pub(crate) use with_slice;

impl<'a> TokenView<'a> {
    pub fn len(&self) -> usize {
        with_slice!(*self, s => s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reinterprets `len` tokens of `dtype` starting at `ptr`.
    ///
    /// # Safety
    /// `ptr` must be aligned for `dtype` and valid for reads of `len * dtype.size()` bytes for
    /// `'a`, and nothing may free that memory during `'a`.
    pub unsafe fn from_raw(ptr: *const u8, len: usize, dtype: Dtype) -> TokenView<'a> {
        use std::slice::from_raw_parts as raw;
        match dtype {
            Dtype::U8 => TokenView::U8(raw(ptr, len)),
            Dtype::I8 => TokenView::I8(raw(ptr.cast(), len)),
            Dtype::U16 => TokenView::U16(raw(ptr.cast(), len)),
            Dtype::I16 => TokenView::I16(raw(ptr.cast(), len)),
            Dtype::U32 => TokenView::U32(raw(ptr.cast(), len)),
            Dtype::I32 => TokenView::I32(raw(ptr.cast(), len)),
            Dtype::U64 => TokenView::U64(raw(ptr.cast(), len)),
            Dtype::I64 => TokenView::I64(raw(ptr.cast(), len)),
        }
    }
}

/// Token element types, widened to the int64 that `torch.nn.Embedding` takes.
pub trait Token: Copy + Send + Sync {
    fn widen(self) -> i64;
}

macro_rules! impl_token {
    ($($t:ty),*) => {$(
        impl Token for $t {
            #[inline(always)]
            fn widen(self) -> i64 {
                // u64 ids beyond i64::MAX wrap; no vocabulary comes near.
                self as i64
            }
        }
    )*};
}
impl_token!(u8, i8, u16, i16, u32, i32, u64, i64);

/// Whatever holds a source's bytes.
pub trait TokenStorage: Send + Sync {
    fn view(&self) -> TokenView<'_>;
    /// Whether the bytes shrank under a read (a mapped file truncated by another process).
    fn truncated(&self) -> bool {
        false
    }
}

/// A file mapped read-only; the tokens start `offset` bytes in.
struct MappedFile {
    // Declared before the map: fields drop in order, and the guard must go first.
    guard: fault::Guard,
    // An empty file cannot be mapped; it is simply a zero-length source.
    map: Option<Mmap>,
    offset: usize,
    len: usize,
    dtype: Dtype,
}

impl TokenStorage for MappedFile {
    fn view(&self) -> TokenView<'_> {
        match &self.map {
            // SAFETY: `open_mapped` checked that offset + len * size lies inside the map and
            // that the offset is aligned for the dtype (maps start page-aligned).
            Some(map) => unsafe {
                TokenView::from_raw(map.as_ptr().add(self.offset), self.len, self.dtype)
            },
            None => unsafe {
                TokenView::from_raw(
                    std::ptr::NonNull::<u64>::dangling().as_ptr().cast(),
                    0,
                    self.dtype,
                )
            },
        }
    }
    fn truncated(&self) -> bool {
        self.guard.truncated()
    }
}

/// Reads and checks the header of a `.npy` token file, and that the file holds every token
/// the header promises.
pub fn read_npy_header(path: &Path) -> Result<npy::NpyHeader> {
    let io = |source| SamplerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    read_npy_header_from(&mut file, file_len, path, npy::Kind::Tokens)
}

fn read_npy_header_from(
    file: &mut File,
    file_len: u64,
    path: &Path,
    kind: npy::Kind,
) -> Result<npy::NpyHeader> {
    let io = |source| SamplerError::Io {
        path: path.to_path_buf(),
        source,
    };
    // A 1-D header is about a hundred bytes; 64 KiB leaves room for anything numpy writes.
    let mut head = Vec::with_capacity(4096);
    file.take(65_536).read_to_end(&mut head).map_err(io)?;
    let h = npy::parse_header_as(&head, path, kind)?;
    let need = (h.data_offset as u64).saturating_add(h.len.saturating_mul(h.dtype.size() as u64));
    if file_len < need {
        let what = match kind {
            npy::Kind::Tokens => "tokens",
            npy::Kind::Mask => "mask values",
        };
        return Err(SamplerError::format(
            path,
            format!(
                "is truncated: the header promises {} {what} ({need} bytes) but the file has {file_len} bytes; write it again",
                h.len
            ),
        ));
    }
    if h.data_offset % h.dtype.size() != 0 {
        return Err(SamplerError::format(
            path,
            "the .npy header leaves the data misaligned; save it again with numpy.save",
        ));
    }
    Ok(h)
}

/// A named source of tokens.
pub struct TokenFile {
    name: String,
    path: Option<PathBuf>,
    storage: Box<dyn TokenStorage>,
    dtype: Dtype,
    len: usize,
    /// Opened by `open_mask`: a loss mask, not tokens.
    mask: bool,
    range: OnceLock<Option<(i64, i64)>>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("len", &self.len)
            .finish()
    }
}

impl TokenFile {
    /// Opens a token file: `.npy` (dtype from the header) or a raw little-endian file
    /// (nanoGPT's `.bin`), whose dtype must be given.
    pub fn open(path: &Path, dtype: Option<&str>) -> Result<TokenFile> {
        let io = |source| SamplerError::Io {
            path: path.to_path_buf(),
            source,
        };
        let is_npy = has_npy_suffix(path);
        let mut file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if meta.is_dir() {
            return Err(SamplerError::format(
                path,
                "is a folder; pass the token files inside it",
            ));
        }
        let file_len = meta.len();
        let (dtype, offset, len) = if is_npy {
            let h = read_npy_header_from(&mut file, file_len, path, npy::Kind::Tokens)?;
            if let Some(d) = dtype {
                let given = Dtype::parse_file_dtype(d);
                if given != Some(h.dtype) {
                    return Err(SamplerError::format(
                        path,
                        format!("header says dtype {} but dtype={d} was given; drop the dtype argument for .npy files", h.dtype.name()),
                    ));
                }
            }
            (h.dtype, h.data_offset, h.len)
        } else {
            let d = dtype.ok_or_else(|| {
                SamplerError::format(
                    path,
                    format!(
                        "is a raw token file; pass its dtype ({}), or save it as .npy",
                        file_dtypes_text()
                    ),
                )
            })?;
            let dtype = Dtype::parse_file_dtype(d).ok_or_else(|| {
                SamplerError::Argument(format!(
                    "dtype '{d}' is not a token dtype; use {}",
                    file_dtypes_text()
                ))
            })?;
            if file_len % dtype.size() as u64 != 0 {
                return Err(SamplerError::format(
                    path,
                    format!("has {file_len} bytes, not a whole number of {} tokens; check the dtype or the file", dtype.name()),
                ));
            }
            let head = {
                let mut buf = [0u8; 6];
                let n = (&mut file).take(6).read(&mut buf).map_err(io)?;
                buf[..n].to_vec()
            };
            if head == npy::MAGIC {
                return Err(SamplerError::format(
                    path,
                    "is a .npy file under another name; rename it to .npy",
                ));
            }
            (dtype, 0usize, file_len / dtype.size() as u64)
        };
        TokenFile::map(path, &file, file_len, dtype, offset, len, false)
    }

    /// Opens a loss mask: a `.npy` file whose header says uint8 ("|u1"), 1-D, one value per
    /// token of its token file (1: that token is a training target). Mapped and guarded against
    /// truncation as token files are; any other dtype, or a raw file, is refused.
    pub fn open_mask(path: &Path) -> Result<TokenFile> {
        let io = |source| SamplerError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if meta.is_dir() {
            return Err(SamplerError::format(
                path,
                format!("is a folder; {}", npy::MASK_FIX),
            ));
        }
        if !has_npy_suffix(path) {
            return Err(SamplerError::format(
                path,
                format!("is not a .npy file; {}", npy::MASK_FIX),
            ));
        }
        let file_len = meta.len();
        let h = read_npy_header_from(&mut file, file_len, path, npy::Kind::Mask)?;
        TokenFile::map(path, &file, file_len, h.dtype, h.data_offset, h.len, true)
    }

    /// Maps `len` items of `dtype` that start `offset` bytes into `file` (already checked to
    /// hold them).
    fn map(
        path: &Path,
        file: &File,
        file_len: u64,
        dtype: Dtype,
        offset: usize,
        len: u64,
        mask: bool,
    ) -> Result<TokenFile> {
        let io = |source| SamplerError::Io {
            path: path.to_path_buf(),
            source,
        };
        let len = usize::try_from(len).map_err(|_| {
            SamplerError::format(path, "is too large for this machine's address space")
        })?;
        let map = if file_len == 0 {
            None
        } else {
            // SAFETY: the map is read-only. Another process may truncate the file while it is
            // mapped: the guard turns the fault of a read past its new end into a mark the
            // sampler checks (see `fault`).
            Some(unsafe { Mmap::map(file) }.map_err(io)?)
        };
        let guard = match &map {
            Some(m) => fault::Guard::register(m.as_ptr(), m.len()),
            None => fault::Guard::register(std::ptr::null(), 0),
        };
        Ok(TokenFile {
            name: path.display().to_string(),
            path: Some(path.to_path_buf()),
            storage: Box::new(MappedFile {
                guard,
                map,
                offset,
                len,
                dtype,
            }),
            dtype,
            len,
            mask,
            range: OnceLock::new(),
        })
    }

    /// Wraps memory owned elsewhere; the storage must keep it alive and unchanged in size.
    pub fn from_storage(name: String, storage: Box<dyn TokenStorage>) -> TokenFile {
        let view = storage.view();
        let len = view.len();
        let dtype = match view {
            TokenView::U8(_) => Dtype::U8,
            TokenView::I8(_) => Dtype::I8,
            TokenView::U16(_) => Dtype::U16,
            TokenView::I16(_) => Dtype::I16,
            TokenView::U32(_) => Dtype::U32,
            TokenView::I32(_) => Dtype::I32,
            TokenView::U64(_) => Dtype::U64,
            TokenView::I64(_) => Dtype::I64,
        };
        TokenFile {
            name,
            path: None,
            storage,
            dtype,
            len,
            mask: false,
            range: OnceLock::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn is_mapped(&self) -> bool {
        self.path.is_some()
    }
    /// Whether this is a loss mask opened by `open_mask` (not tokens).
    pub fn is_mask(&self) -> bool {
        self.mask
    }
    /// The values as bytes when the source holds uint8 (a loss mask); else None.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self.view() {
            TokenView::U8(s) => Some(s),
            _ => None,
        }
    }
    pub fn view(&self) -> TokenView<'_> {
        self.storage.view()
    }
    /// Whether the file shrank under a read of its map; what was read since is not its data.
    pub fn truncated(&self) -> bool {
        self.storage.truncated()
    }
    /// The truncation error for this file, if it was truncated under a read.
    pub fn check_not_truncated(&self) -> Result<()> {
        if self.truncated() {
            return Err(SamplerError::Truncated {
                name: self.name.clone(),
            });
        }
        Ok(())
    }

    /// The smallest and largest token, or None for an empty source. A parallel scan the first
    /// time, remembered after.
    pub fn token_range(&self) -> Option<(i64, i64)> {
        *self
            .range
            .get_or_init(|| with_slice!(self.view(), s => min_max(s)))
    }
}

/// Offsets at which a document starts and a window of `context_length` + 1 tokens still fits:
/// 0 and every position right after an `eot` token, ascending. A parallel scan in chunks; only
/// the offsets are kept (8 bytes a document), never a copy of the tokens.
pub fn document_starts(view: TokenView<'_>, eot: i64, context_length: usize) -> Vec<u64> {
    let len = view.len();
    if len <= context_length {
        return Vec::new();
    }
    let last_start = (len - context_length - 1) as u64;
    let after_eot = with_slice!(view, s => positions_after(s, eot));
    let mut starts = Vec::with_capacity(after_eot.len() + 1);
    starts.push(0);
    starts.extend(after_eot.into_iter().filter(|&p| p <= last_start));
    starts
}

/// Offsets at which a conversation starts and a window of `context_length` + 1 tokens still
/// fits: every p with `tokens[p] == eot` and `mask[p] == 0` (the end-of-text id that opens a
/// conversation; the assistant's end of turn is the same id with mask 1), ascending. A parallel
/// scan in chunks, like `document_starts`. `mask` holds one value per token.
pub fn conversation_starts(
    view: TokenView<'_>,
    mask: &[u8],
    eot: i64,
    context_length: usize,
) -> Vec<u64> {
    let len = view.len().min(mask.len());
    if len <= context_length {
        return Vec::new();
    }
    // Only starts up to len - T - 1 are kept, so only they are scanned.
    let n = len - context_length;
    with_slice!(view, s => positions_opening(&s[..n], &mask[..n], eot))
}

fn positions_opening<T: Token>(s: &[T], mask: &[u8], eot: i64) -> Vec<u64> {
    const CHUNK: usize = 1 << 20;
    let per_chunk: Vec<Vec<u64>> = s
        .par_chunks(CHUNK)
        .zip(mask.par_chunks(CHUNK))
        .enumerate()
        .map(|(c, (tokens, mask))| {
            let base = (c * CHUNK) as u64;
            tokens
                .iter()
                .zip(mask)
                .enumerate()
                .filter(|(_, (&v, &m))| m == 0 && v.widen() == eot)
                .map(|(i, _)| base + i as u64)
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(per_chunk.iter().map(Vec::len).sum());
    for part in per_chunk {
        out.extend(part);
    }
    out
}

fn has_npy_suffix(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
}

fn positions_after<T: Token>(s: &[T], eot: i64) -> Vec<u64> {
    const CHUNK: usize = 1 << 20;
    let per_chunk: Vec<Vec<u64>> = s
        .par_chunks(CHUNK)
        .enumerate()
        .map(|(c, chunk)| {
            let base = (c * CHUNK) as u64 + 1;
            chunk
                .iter()
                .enumerate()
                .filter(|(_, &v)| v.widen() == eot)
                .map(|(i, _)| base + i as u64)
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(per_chunk.iter().map(Vec::len).sum());
    for part in per_chunk {
        out.extend(part);
    }
    out
}

fn min_max<T: Token + Ord>(s: &[T]) -> Option<(i64, i64)> {
    const CHUNK: usize = 1 << 20;
    s.par_chunks(CHUNK)
        .map(|c| {
            // min/max over a chunk vectorize; the widening happens once per chunk.
            let lo = c.iter().copied().min()?;
            let hi = c.iter().copied().max()?;
            Some((lo.widen(), hi.widen()))
        })
        .reduce(
            || None,
            |a, b| match (a, b) {
                (Some((a0, a1)), Some((b0, b1))) => Some((a0.min(b0), a1.max(b1))),
                (x, None) | (None, x) => x,
            },
        )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    pub(crate) fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rust_sampler_test_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn write_npy_u16(path: &Path, tokens: &[u16]) {
        let dict = format!(
            "{{'descr': '<u2', 'fortran_order': False, 'shape': ({},), }}",
            tokens.len()
        );
        let mut body = dict.into_bytes();
        let pad = (64 - (10 + body.len() + 1) % 64) % 64;
        body.extend(std::iter::repeat_n(b' ', pad));
        body.push(b'\n');
        let mut f = File::create(path).unwrap();
        f.write_all(npy::MAGIC).unwrap();
        f.write_all(&[1, 0]).unwrap();
        f.write_all(&(body.len() as u16).to_le_bytes()).unwrap();
        f.write_all(&body).unwrap();
        for t in tokens {
            f.write_all(&t.to_le_bytes()).unwrap();
        }
    }

    #[test]
    fn opens_npy_and_reads_tokens() {
        let p = temp_path("a.npy");
        let tokens: Vec<u16> = (0..1000).map(|i| (i * 7 % 5000) as u16).collect();
        write_npy_u16(&p, &tokens);
        let f = TokenFile::open(&p, None).unwrap();
        assert_eq!((f.len(), f.dtype()), (1000, Dtype::U16));
        match f.view() {
            TokenView::U16(s) => assert_eq!(s, &tokens[..]),
            v => panic!("wrong view {v:?}"),
        }
        let (lo, hi) = (
            *tokens.iter().min().unwrap() as i64,
            *tokens.iter().max().unwrap() as i64,
        );
        assert_eq!(f.token_range(), Some((lo, hi)));
        assert!(f.is_mapped());
    }

    pub(crate) fn write_npy_u8(path: &Path, values: &[u8]) {
        let dict = format!(
            "{{'descr': '|u1', 'fortran_order': False, 'shape': ({},), }}",
            values.len()
        );
        let mut body = dict.into_bytes();
        let pad = (64 - (10 + body.len() + 1) % 64) % 64;
        body.extend(std::iter::repeat_n(b' ', pad));
        body.push(b'\n');
        let mut f = File::create(path).unwrap();
        f.write_all(npy::MAGIC).unwrap();
        f.write_all(&[1, 0]).unwrap();
        f.write_all(&(body.len() as u16).to_le_bytes()).unwrap();
        f.write_all(&body).unwrap();
        f.write_all(values).unwrap();
    }

    #[test]
    fn opens_a_mask_and_refuses_other_files_as_masks() {
        let p = temp_path("m_mask.npy");
        let values: Vec<u8> = (0..777).map(|i| (i % 3 == 0) as u8).collect();
        write_npy_u8(&p, &values);
        let m = TokenFile::open_mask(&p).unwrap();
        assert_eq!((m.len(), m.dtype(), m.is_mask()), (777, Dtype::U8, true));
        assert_eq!(m.bytes(), Some(&values[..]));
        assert!(m.is_mapped());
        // A uint8 .npy is no token file.
        let e = TokenFile::open(&p, None).unwrap_err().to_string();
        assert!(e.contains("dtype '|u1'"), "{e}");
        // Token files, raw files and truncated masks are no masks.
        let t = temp_path("m_tokens.npy");
        write_npy_u16(&t, &[1, 2, 3]);
        assert!(!TokenFile::open(&t, None).unwrap().is_mask());
        let e = TokenFile::open_mask(&t).unwrap_err().to_string();
        assert!(
            e.contains("m_tokens.npy: has dtype '<u2'")
                && e.contains("must be a uint8 .npy loss mask"),
            "{e}"
        );
        let raw = temp_path("m_raw.bin");
        std::fs::write(&raw, [0u8, 1, 1, 0]).unwrap();
        let e = TokenFile::open_mask(&raw).unwrap_err().to_string();
        assert!(
            e.contains("m_raw.bin: is not a .npy file") && e.contains("uint8 .npy loss mask"),
            "{e}"
        );
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        let e = TokenFile::open_mask(&p).unwrap_err().to_string();
        assert!(
            e.contains("truncated") && e.contains("777 mask values"),
            "{e}"
        );
        let e = TokenFile::open_mask(&std::env::temp_dir())
            .unwrap_err()
            .to_string();
        assert!(e.contains("folder"), "{e}");
    }

    #[test]
    fn conversation_starts_are_eot_with_mask_zero_that_fit() {
        // eot 9: openers (mask 0) at 0, 4 and 9; ends of turn (mask 1) at 3 and 8.
        let ids: Vec<u32> = vec![9, 1, 2, 9, 9, 3, 4, 5, 9, 9, 6, 7];
        let mask: Vec<u8> = vec![0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1];
        assert_eq!(
            conversation_starts(TokenView::U32(&ids), &mask, 9, 2),
            vec![0, 4, 9]
        );
        // T = 3: the last start is 12 - 4 = 8, so 9 no longer fits.
        assert_eq!(
            conversation_starts(TokenView::U32(&ids), &mask, 9, 3),
            vec![0, 4]
        );
        assert!(conversation_starts(TokenView::U32(&ids), &mask, 9, 12).is_empty());
        // Across the scan's chunk edge.
        let n = (1 << 20) + 10;
        let mut ids = vec![1u32; n];
        let mut mask = vec![1u8; n];
        for p in [0, (1 << 20) - 1, 1 << 20, n - 2] {
            ids[p] = 0;
            mask[p] = 0;
        }
        ids[5] = 0; // an end of turn: mask 1
        assert_eq!(
            conversation_starts(TokenView::U32(&ids), &mask, 0, 4),
            vec![0, (1 << 20) - 1, 1 << 20]
        );
        assert_eq!(
            conversation_starts(TokenView::U32(&ids), &mask, 0, 1),
            vec![0, (1 << 20) - 1, 1 << 20, n as u64 - 2]
        );
    }

    #[test]
    fn truncated_npy_data_is_an_error() {
        let p = temp_path("trunc.npy");
        write_npy_u16(&p, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = TokenFile::open(&p, None).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn raw_bin_needs_a_dtype() {
        let p = temp_path("raw.bin");
        let tokens: Vec<u32> = (0..100).collect();
        std::fs::write(
            &p,
            tokens
                .iter()
                .flat_map(|t| t.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
        .unwrap();
        assert!(TokenFile::open(&p, None)
            .unwrap_err()
            .to_string()
            .contains("pass its dtype"));
        assert!(TokenFile::open(&p, Some("float32"))
            .unwrap_err()
            .to_string()
            .contains("not a token dtype"));
        let f = TokenFile::open(&p, Some("uint32")).unwrap();
        assert_eq!(f.len(), 100);
        assert_eq!(f.token_range(), Some((0, 99)));
        // 400 bytes are not a whole number of int64 tokens? They are (50); 402 are not.
        std::fs::write(&p, vec![0u8; 402]).unwrap();
        assert!(TokenFile::open(&p, Some("int64"))
            .unwrap_err()
            .to_string()
            .contains("whole number"));
    }

    #[test]
    fn missing_file_and_folder() {
        let e = TokenFile::open(Path::new("/nonexistent/x.npy"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("file not found"), "{e}");
        let e = TokenFile::open(&std::env::temp_dir(), Some("uint16"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("folder"), "{e}");
    }

    #[test]
    fn empty_raw_file_is_an_empty_source() {
        let p = temp_path("empty.bin");
        std::fs::write(&p, b"").unwrap();
        let f = TokenFile::open(&p, Some("uint16")).unwrap();
        assert!(f.is_empty());
        assert_eq!(f.token_range(), None);
    }

    #[test]
    fn min_max_over_many_chunks() {
        let mut v: Vec<i32> = (0..3_000_000).map(|i| i % 1000).collect();
        v[2_500_000] = -5;
        v[10] = 77_777;
        assert_eq!(min_max(&v), Some((-5, 77_777)));
    }
}
