//! The binding layer: converts Python objects to the core's types and `SamplerError` to Python
//! exceptions (all in `From<SamplerError> for PyErr`, below). Heavy work runs detached from the
//! interpreter so other Python threads (the training loop) keep running.

use crate::error::SamplerError;
use crate::sampler::Sampler;
use crate::source::{self, Dtype, TokenFile, TokenStorage, TokenView};
use pyo3::buffer::{Element, PyBuffer};
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;

pyo3::import_exception!(lmtools.errors, DataError);

impl From<SamplerError> for PyErr {
    fn from(e: SamplerError) -> PyErr {
        // Every error the core reports is about the data or the arguments describing it.
        DataError::new_err(e.to_string())
    }
}

/// A numpy array (or anything with the buffer protocol) lent to Rust. Holding the `PyBuffer`
/// keeps the exporter alive and its memory in place until the last sampler using it is gone.
struct BufferStorage<T> {
    buf: PyBuffer<T>,
    dtype: Dtype,
}

impl<T: Element + Send + Sync> TokenStorage for BufferStorage<T> {
    fn view(&self) -> TokenView<'_> {
        // SAFETY: `from_buffer` checked that the buffer is 1-D and C-contiguous with items of
        // exactly this type; PyBuffer checked the alignment; the export pins the memory.
        unsafe { TokenView::from_raw(self.buf.buf_ptr() as *const u8, self.buf.item_count(), self.dtype) }
    }
}

fn storage_from<T: Element + Send + Sync + 'static>(obj: &Bound<'_, PyAny>, dtype: Dtype) -> Option<PyResult<Box<dyn TokenStorage>>> {
    let buf = PyBuffer::<T>::get(obj).ok()?;
    if buf.dimensions() != 1 {
        return Some(Err(DataError::new_err(format!(
            "token arrays are 1-D; got {} dimensions with shape {:?}; pass data.reshape(-1)",
            buf.dimensions(),
            buf.shape()
        ))));
    }
    if !buf.is_c_contiguous() {
        return Some(Err(DataError::new_err(
            "the token array is not contiguous (a strided view); pass numpy.ascontiguousarray(data)",
        )));
    }
    Some(Ok(Box::new(BufferStorage { buf, dtype })))
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

    /// Wraps a 1-D, C-contiguous integer array without copying it.
    #[staticmethod]
    #[pyo3(signature = (array, name = None))]
    fn from_buffer(array: &Bound<'_, PyAny>, name: Option<String>) -> PyResult<Self> {
        let storage = storage_from::<u16>(array, Dtype::U16)
            .or_else(|| storage_from::<u32>(array, Dtype::U32))
            .or_else(|| storage_from::<i32>(array, Dtype::I32))
            .or_else(|| storage_from::<i64>(array, Dtype::I64))
            .or_else(|| storage_from::<u8>(array, Dtype::U8))
            .or_else(|| storage_from::<i8>(array, Dtype::I8))
            .or_else(|| storage_from::<i16>(array, Dtype::I16))
            .or_else(|| storage_from::<u64>(array, Dtype::U64))
            .unwrap_or_else(|| {
                let dtype = array.getattr("dtype").map(|d| d.to_string()).unwrap_or_else(|_| type_name(array));
                Err(DataError::new_err(format!(
                    "token data must be a 1-D integer array; got {dtype}; convert it, e.g. data.astype(numpy.int64)"
                )))
            })?;
        let name = name.unwrap_or_else(|| "array".to_string());
        Ok(PyTokenFile { inner: Arc::new(TokenFile::from_storage(name, storage)) })
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
    fn token_range(&self, py: Python<'_>) -> Option<(i64, i64)> {
        let inner = self.inner.clone();
        py.detach(move || inner.token_range())
    }
    fn __repr__(&self) -> String {
        format!("TokenFile({:?}, dtype={}, len={})", self.inner.name(), self.inner.dtype().name(), self.inner.len())
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "an object".into())
}

/// A writable (B, T) int64 output buffer.
fn output(obj: &Bound<'_, PyAny>, what: &str, t: usize) -> PyResult<PyBuffer<i64>> {
    let buf = PyBuffer::<i64>::get(obj).map_err(|_| {
        DataError::new_err(format!("{what} must be an int64 array of shape (batch_size, {t}); got {}", type_name(obj)))
    })?;
    if buf.readonly() || buf.dimensions() != 2 || !buf.is_c_contiguous() || buf.shape()[1] != t || buf.shape()[0] == 0 {
        return Err(DataError::new_err(format!(
            "{what} must be a writable, C-contiguous int64 array of shape (batch_size, {t}); got shape {:?}",
            buf.shape()
        )));
    }
    Ok(buf)
}

/// Samples windows from token sources and gathers them into caller-provided buffers.
#[pyclass(frozen, name = "Sampler", module = "lmtools._sampler")]
pub struct PySampler {
    inner: Arc<Sampler>,
    files: Vec<Py<PyTokenFile>>,
    pool: Option<rayon::ThreadPool>,
}

#[pymethods]
impl PySampler {
    #[new]
    #[pyo3(signature = (groups, context_length, num_threads = None))]
    fn new(
        groups: Vec<(f64, Vec<Bound<'_, PyTokenFile>>)>,
        context_length: i64,
        num_threads: Option<usize>,
    ) -> PyResult<Self> {
        let context_length = usize::try_from(context_length)
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| DataError::new_err(format!("context_length must be a positive integer; got {context_length}")))?;
        let mut files = Vec::new();
        let core_groups = groups
            .into_iter()
            .map(|(w, fs)| {
                let inner = fs.iter().map(|f| f.get().inner.clone()).collect();
                files.extend(fs.into_iter().map(Bound::unbind));
                (w, inner)
            })
            .collect();
        let inner = Sampler::new(core_groups, context_length)?;
        let pool = match num_threads {
            None => None,
            Some(0) => return Err(DataError::new_err("num_threads must be positive, or None for all cores")),
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("lmtools-sampler-{i}"))
                    .build()
                    .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("cannot start sampler threads: {e}")))?,
            ),
        };
        Ok(PySampler { inner: Arc::new(inner), files, pool })
    }

    /// Fills `inputs` and `targets` (writable C-contiguous int64, shape (B, T)) with the batch
    /// of (seed, rank, step, micro). Runs without the GIL.
    #[pyo3(signature = (inputs, targets, seed, rank = 0, step = 0, micro = 0))]
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
        if xp < yp + bytes && yp < xp + bytes {
            return Err(DataError::new_err("inputs and targets must not share memory"));
        }
        let sampler = &*self.inner;
        let pool = self.pool.as_ref();
        py.detach(move || {
            // SAFETY: both buffers are exported (held by `x` and `y` for this whole call),
            // writable, contiguous, n items each and disjoint. Other Python threads could still
            // write to them concurrently; the facade never lends a buffer it is filling.
            let xs = unsafe { std::slice::from_raw_parts_mut(xp as *mut i64, n) };
            let ys = unsafe { std::slice::from_raw_parts_mut(yp as *mut i64, n) };
            match pool {
                Some(p) => p.install(|| sampler.fill(xs, ys, seed, rank, step, micro)),
                None => sampler.fill(xs, ys, seed, rank, step, micro),
            }
        })?;
        drop((x, y));
        Ok(())
    }

    /// The windows of a batch as (file index, start) pairs, without gathering.
    #[pyo3(signature = (batch_size, seed, rank = 0, step = 0, micro = 0))]
    fn windows(&self, batch_size: usize, seed: u64, rank: u64, step: u64, micro: u64) -> Vec<(usize, u64)> {
        self.inner.windows(batch_size, seed, rank, step, micro).into_iter().map(|w| (w.file, w.start)).collect()
    }

    #[getter]
    fn context_length(&self) -> usize {
        self.inner.context_length()
    }
    #[getter]
    fn num_tokens(&self) -> u64 {
        self.inner.num_tokens()
    }
    #[getter]
    fn num_windows(&self) -> u64 {
        self.inner.num_windows()
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
    m.add_class::<PyTokenFile>()?;
    m.add_class::<PySampler>()?;
    m.add_function(wrap_pyfunction!(read_npy_header, m)?)?;
    Ok(())
}
