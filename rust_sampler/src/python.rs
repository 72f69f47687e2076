//! The binding layer: converts Python objects to the core's types and `SamplerError` to Python
//! exceptions (all in `From<SamplerError> for PyErr`, below). Heavy work runs detached from the
//! interpreter so other Python threads (the training loop) keep running.

use crate::error::SamplerError;
use crate::rng::batch_key;
use crate::sampler::{Sampler, IGNORE_INDEX};
use crate::source::{self, Dtype, TokenFile, TokenStorage, TokenView};
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyMemoryView, PyTuple};
use std::path::PathBuf;
use std::sync::Arc;

pyo3::import_exception!(lmtools.errors, DataError);
pyo3::import_exception!(lmtools.errors, DataChanged);

impl From<SamplerError> for PyErr {
    fn from(e: SamplerError) -> PyErr {
        // Every error the core reports is about the data or the arguments describing it.
        match e {
            SamplerError::Truncated { .. } => DataChanged::new_err(e.to_string()),
            _ => DataError::new_err(e.to_string()),
        }
    }
}

/// A numpy array (or anything with the buffer protocol) lent to Rust, held as a byte buffer
/// of a `memoryview(...).cast("B")`. Holding it keeps the exporter alive and its memory in place
/// until the last sampler using it is gone.
struct BufferStorage {
    bytes: PyBuffer<u8>,
    dtype: Dtype,
}

impl TokenStorage for BufferStorage {
    fn view(&self) -> TokenView<'_> {
        // SAFETY: `storage_from_buffer` checked that the bytes are a C-contiguous 1-D run of
        // `dtype` items, aligned for it; the export pins the memory while `bytes` lives.
        let len = self.bytes.item_count() / self.dtype.size();
        unsafe { TokenView::from_raw(self.bytes.buf_ptr() as *const u8, len, self.dtype) }
    }
}

/// The integer dtype a struct-module format string describes, given the item size, or why
/// not. PyBuffer's own typed check is not used for the input: PyO3 0.27.2 treats an explicit
/// '<' as foreign and '>' as native on little-endian hosts, so numpy arrays with an explicit
/// byte order would be refused or misread.
fn dtype_from_format(format: &str, itemsize: usize) -> std::result::Result<Dtype, String> {
    let (order, code) = match format.as_bytes() {
        [c] => (b'@', *c),
        [o, c] => (*o, *c),
        _ => {
            return Err(format!(
                "buffer format '{format}' is not a plain integer type"
            ))
        }
    };
    if matches!(order, b'>' | b'!') {
        return Err(format!("the array is big-endian (format '{format}'); pass data.astype(data.dtype.newbyteorder('='))"));
    }
    if !matches!(order, b'@' | b'=' | b'<') {
        return Err(format!(
            "buffer format '{format}' is not a plain integer type"
        ));
    }
    let signed = match code {
        b'b' | b'h' | b'i' | b'l' | b'q' | b'n' => true,
        b'B' | b'H' | b'I' | b'L' | b'Q' | b'N' => false,
        _ => return Err(format!("format '{format}' is not an integer type")),
    };
    Ok(match (signed, itemsize) {
        (true, 1) => Dtype::I8,
        (false, 1) => Dtype::U8,
        (true, 2) => Dtype::I16,
        (false, 2) => Dtype::U16,
        (true, 4) => Dtype::I32,
        (false, 4) => Dtype::U32,
        (true, 8) => Dtype::I64,
        (false, 8) => Dtype::U64,
        _ => {
            return Err(format!(
                "format '{format}' with {itemsize}-byte items is not a supported integer type"
            ))
        }
    })
}

fn storage_from_buffer(array: &Bound<'_, PyAny>) -> PyResult<Box<dyn TokenStorage>> {
    let not_integer = |why: String| {
        DataError::new_err(format!("token data must be a 1-D integer array: {why}; convert it, e.g. data.astype(numpy.int64)"))
    };
    let view = PyMemoryView::from(array)
        .map_err(|_| not_integer(format!("got {}, which has no buffer", type_name(array))))?;
    let format: String = view.getattr("format")?.extract()?;
    let itemsize: usize = view.getattr("itemsize")?.extract()?;
    let ndim: usize = view.getattr("ndim")?.extract()?;
    let dtype = dtype_from_format(&format, itemsize).map_err(not_integer)?;
    if ndim != 1 {
        let shape = view.getattr("shape")?.repr()?.to_string();
        return Err(DataError::new_err(format!(
            "token arrays are 1-D; got {ndim} dimensions with shape {shape}; pass data.reshape(-1)"
        )));
    }
    if !view.getattr("c_contiguous")?.is_truthy()? {
        return Err(DataError::new_err(
            "the token array is not contiguous (a strided view); pass numpy.ascontiguousarray(data)",
        ));
    }
    let bytes = PyBuffer::<u8>::get(&view.call_method1("cast", ("B",))?)?;
    if !(bytes.buf_ptr() as usize).is_multiple_of(dtype.size()) {
        return Err(DataError::new_err(
            "the token array is misaligned; pass numpy.ascontiguousarray(data)",
        ));
    }
    Ok(Box::new(BufferStorage { bytes, dtype }))
}

/// One token file or array.
#[pyclass(frozen, name = "TokenFile", module = "lmtools._sampler")]
pub struct PyTokenFile {
    inner: Arc<TokenFile>,
}

#[pymethods]
impl PyTokenFile {
    /// Memory-maps a `.npy` token file (dtype from its header) or a raw one (dtype required).
    #[staticmethod]
    #[pyo3(signature = (path, dtype = None))]
    fn open(py: Python<'_>, path: PathBuf, dtype: Option<String>) -> PyResult<Self> {
        let f = py.detach(|| TokenFile::open(&path, dtype.as_deref()))?;
        Ok(PyTokenFile { inner: Arc::new(f) })
    }

    /// Memory-maps a loss mask: a 1-D uint8 `.npy` ("|u1"), one value per token of its token
    /// file, 1 where that token is a training target.
    #[staticmethod]
    fn open_mask(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let f = py.detach(|| TokenFile::open_mask(&path))?;
        Ok(PyTokenFile { inner: Arc::new(f) })
    }

    /// Wraps a 1-D, C-contiguous integer array without copying it.
    #[staticmethod]
    #[pyo3(signature = (array, name = None))]
    fn from_buffer(array: &Bound<'_, PyAny>, name: Option<String>) -> PyResult<Self> {
        let storage = storage_from_buffer(array)?;
        let name = name.unwrap_or_else(|| "array".to_string());
        Ok(PyTokenFile {
            inner: Arc::new(TokenFile::from_storage(name, storage)),
        })
    }

    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }
    #[getter]
    fn path(&self) -> Option<PathBuf> {
        self.inner.path().map(|p| p.to_path_buf())
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.dtype().name()
    }
    #[getter]
    fn mmapped(&self) -> bool {
        self.inner.is_mapped()
    }
    fn __len__(&self) -> usize {
        self.inner.len()
    }
    /// (min, max) token id by a parallel scan (remembered), or None when empty.
    fn token_range(&self, py: Python<'_>) -> PyResult<Option<(i64, i64)>> {
        let inner = &self.inner;
        let range = py.detach(|| inner.token_range());
        inner.check_not_truncated()?;
        Ok(range)
    }
    fn __repr__(&self) -> String {
        format!(
            "TokenFile({:?}, dtype={}, len={})",
            self.inner.name(),
            self.inner.dtype().name(),
            self.inner.len()
        )
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "an object".into())
}

/// A writable (B, T) int64 output buffer.
fn output(obj: &Bound<'_, PyAny>, what: &str, t: usize) -> PyResult<PyBuffer<i64>> {
    let buf = PyBuffer::<i64>::get(obj).map_err(|_| {
        DataError::new_err(format!(
            "{what} must be an int64 array of shape (batch_size, {t}); got {}",
            type_name(obj)
        ))
    })?;
    let foreign = matches!(buf.format().to_bytes().first(), Some(b'>' | b'!'));
    if foreign
        || buf.readonly()
        || buf.dimensions() != 2
        || !buf.is_c_contiguous()
        || buf.shape()[1] != t
        || buf.shape()[0] == 0
    {
        return Err(DataError::new_err(format!(
            "{what} must be a writable, C-contiguous int64 array of shape (batch_size, {t}); got shape {:?}",
            buf.shape()
        )));
    }
    Ok(buf)
}

/// A writable (B, T) uint8 buffer for the mask windows, of the inputs' shape.
fn mask_output(obj: &Bound<'_, PyAny>, shape: &[usize]) -> PyResult<PyBuffer<u8>> {
    let want = || {
        format!("mask must be a writable, C-contiguous uint8 array of the inputs' shape {shape:?}")
    };
    let buf = PyBuffer::<u8>::get(obj)
        .map_err(|_| DataError::new_err(format!("{}; got {}", want(), type_name(obj))))?;
    let format = buf.format().to_bytes();
    let is_u8 = matches!(format, b"B" | b"=B" | b"<B" | b"@B" | b">B" | b"!B");
    if !is_u8 || buf.readonly() || !buf.is_c_contiguous() || buf.shape() != shape {
        return Err(DataError::new_err(format!(
            "{}; got shape {:?}, format '{}'{}",
            want(),
            buf.shape(),
            String::from_utf8_lossy(format),
            if buf.readonly() { ", read-only" } else { "" }
        )));
    }
    Ok(buf)
}

/// Whether the `a` and `b` byte ranges overlap.
fn overlap(a: usize, a_len: usize, b: usize, b_len: usize) -> bool {
    a < b + b_len && b < a + a_len
}

/// `windows()` builds a list; past this many rows a typo would exhaust memory instead.
const MAX_WINDOWS: usize = 1 << 26;

/// Samples windows from token sources and gathers them into caller-provided buffers.
#[pyclass(frozen, name = "Sampler", module = "lmtools._sampler")]
pub struct PySampler {
    inner: Arc<Sampler>,
    files: Vec<Py<PyTokenFile>>,
    // Read-only attributes, fixed when the sampler is built.
    #[pyo3(get)]
    context_length: usize,
    #[pyo3(get)]
    num_tokens: u64,
    #[pyo3(get)]
    num_windows: u64,
    #[pyo3(get)]
    document_aligned: bool,
    #[pyo3(get)]
    vocab_size: Option<u64>,
    #[pyo3(get)]
    masked: bool,
}

#[pymethods]
impl PySampler {
    /// `doc_eot`: when given, windows start only at document starts (0 and every position
    /// after this end-of-text id); the index of starts is built here, without the GIL.
    /// `vocab_size`: when given, a batch holding an id outside 0..vocab_size is refused.
    /// `masks`: one loss mask (`TokenFile.open_mask`) or None per file, in the order of `files`;
    /// a masked file's untrained targets are gathered as IGNORE_INDEX, and with `doc_eot` its
    /// windows start only at conversation starts.
    #[new]
    #[pyo3(signature = (groups, context_length, num_threads = None, doc_eot = None, vocab_size = None, masks = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        groups: Vec<(f64, Vec<Bound<'_, PyTokenFile>>)>,
        context_length: i64,
        num_threads: Option<usize>,
        doc_eot: Option<i64>,
        vocab_size: Option<u64>,
        masks: Option<Vec<Option<Bound<'_, PyTokenFile>>>>,
    ) -> PyResult<Self> {
        let context_length = usize::try_from(context_length)
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| {
                DataError::new_err(format!(
                    "context_length must be a positive integer; got {context_length}"
                ))
            })?;
        let mut files = Vec::new();
        let core_groups = groups
            .into_iter()
            .map(|(w, fs)| {
                let inner = fs.iter().map(|f| f.get().inner.clone()).collect();
                files.extend(fs.into_iter().map(Bound::unbind));
                (w, inner)
            })
            .collect();
        let mut inner = Sampler::new(core_groups, context_length)?;
        if let Some(masks) = masks {
            let masks = masks
                .iter()
                .map(|m| m.as_ref().map(|m| m.get().inner.clone()))
                .collect();
            inner = inner.with_masks(masks)?;
        }
        if let Some(eot) = doc_eot {
            inner = py.detach(move || inner.align_to_documents(eot))?;
        }
        if let Some(n) = num_threads {
            inner = inner.with_threads(n)?;
        }
        inner = inner.with_vocab_bound(vocab_size)?;
        Ok(PySampler {
            vocab_size,
            context_length: inner.context_length(),
            num_tokens: inner.num_tokens(),
            num_windows: inner.num_windows(),
            document_aligned: inner.is_document_aligned(),
            masked: inner.is_masked(),
            inner: Arc::new(inner),
            files,
        })
    }

    /// Fills `inputs` and `targets` (writable C-contiguous int64, shape (B, T)) with the batch
    /// of (seed, rank, step, micro); a masked file's untrained targets are IGNORE_INDEX. `mask`,
    /// when given (writable C-contiguous uint8 of the same shape), receives each row's mask
    /// values (all ones for a file without a mask). Runs without the GIL.
    #[pyo3(signature = (inputs, targets, seed, rank = 0, step = 0, micro = 0, *, mask = None))]
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        py: Python<'_>,
        inputs: &Bound<'_, PyAny>,
        targets: &Bound<'_, PyAny>,
        seed: u64,
        rank: u64,
        step: u64,
        micro: u64,
        mask: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let t = self.inner.context_length();
        let x = output(inputs, "inputs", t)?;
        let y = output(targets, "targets", t)?;
        if x.shape() != y.shape() {
            return Err(DataError::new_err(format!(
                "inputs and targets must have the same shape; got {:?} and {:?}",
                x.shape(),
                y.shape()
            )));
        }
        let n = x.item_count();
        let (xp, yp) = (x.buf_ptr() as usize, y.buf_ptr() as usize);
        let bytes = n * std::mem::size_of::<i64>();
        if overlap(xp, bytes, yp, bytes) {
            return Err(DataError::new_err(
                "inputs and targets must not share memory",
            ));
        }
        let m = mask.map(|m| mask_output(m, x.shape())).transpose()?;
        let mp = m.as_ref().map(|m| m.buf_ptr() as usize);
        if let Some(mp) = mp {
            if overlap(mp, n, xp, bytes) || overlap(mp, n, yp, bytes) {
                return Err(DataError::new_err(
                    "mask must not share memory with inputs or targets",
                ));
            }
        }
        let sampler = &*self.inner;
        py.detach(move || {
            // SAFETY: the buffers are exported (held by `x`, `y` and `m` for this whole call),
            // writable, contiguous, n items each and disjoint. Other Python threads could still
            // write to them concurrently; the facade never lends a buffer it is filling.
            let xs = unsafe { std::slice::from_raw_parts_mut(xp as *mut i64, n) };
            let ys = unsafe { std::slice::from_raw_parts_mut(yp as *mut i64, n) };
            let ms = mp.map(|mp| unsafe { std::slice::from_raw_parts_mut(mp as *mut u8, n) });
            sampler.fill_masked(xs, ys, ms, batch_key(seed, rank, step, micro))
        })?;
        drop((x, y, m));
        Ok(())
    }

    /// The windows of a batch as (file index, start) pairs, without gathering.
    #[pyo3(signature = (batch_size, seed, rank = 0, step = 0, micro = 0))]
    fn windows(
        &self,
        batch_size: usize,
        seed: u64,
        rank: u64,
        step: u64,
        micro: u64,
    ) -> PyResult<Vec<(usize, u64)>> {
        if batch_size > MAX_WINDOWS {
            return Err(DataError::new_err(format!(
                "batch_size {batch_size} is too large; ask for at most {MAX_WINDOWS} windows"
            )));
        }
        Ok(self
            .inner
            .windows(batch_size, batch_key(seed, rank, step, micro))
            .into_iter()
            .map(|w| (w.file, w.start))
            .collect())
    }

    /// The sources in order, groups flattened: `windows()` file indices point into this list.
    #[getter]
    fn files(&self, py: Python<'_>) -> Vec<Py<PyTokenFile>> {
        self.files.iter().map(|f| f.clone_ref(py)).collect()
    }
}

/// Parses and checks a `.npy` token file's header: (dtype name, token count, data offset).
#[pyfunction]
fn read_npy_header(py: Python<'_>, path: PathBuf) -> PyResult<(&'static str, u64, usize)> {
    let h = py.detach(|| source::read_npy_header(&path))?;
    Ok((h.dtype.name(), h.len, h.data_offset))
}

#[pymodule]
fn _sampler(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The one definition of what a token file may hold and how a .npy file starts.
    let names: Vec<&str> = source::FILE_DTYPES.iter().map(|d| d.name()).collect();
    m.add("TOKEN_DTYPES", PyTuple::new(m.py(), names)?)?;
    m.add("NPY_MAGIC", PyBytes::new(m.py(), crate::npy::MAGIC))?;
    // The target id of an untrained position (torch's default ignore_index).
    m.add("IGNORE_INDEX", IGNORE_INDEX)?;
    m.add_class::<PyTokenFile>()?;
    m.add_class::<PySampler>()?;
    m.add_function(wrap_pyfunction!(read_npy_header, m)?)?;
    Ok(())
}
