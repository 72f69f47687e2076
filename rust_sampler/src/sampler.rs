//! The window sampler: which windows a batch holds, and the gather that copies them out.
//!
//! Sources come in groups. Within a group every valid window of every file is equally likely
//! (shards); across groups a row first picks a group by weight (mixtures). A window lies in one
//! file: starts run over `0..=len - T - 1` in each file, so the T + 1 tokens that make the
//! inputs and their shifted targets never straddle two files.
//!
//! Document-aligned sampling (`align_to_documents`) narrows the starts to the document starts
//! (0 and every position after an end-of-text id), each equally likely; a window may still run
//! on past its document's end.
//!
//! Loss masks (`with_masks`, chat data): a file may have a uint8 mask beside it, one value per
//! token, 1 where that token is a training target. The gather writes `IGNORE_INDEX` into every
//! target whose mask value is 0 (the inputs are never masked), and aligned to documents such a
//! file's windows start only at conversation starts (an end-of-text id whose mask value is 0).

use crate::error::{Result, SamplerError};
use crate::rng::Stream;
use crate::source::{
    conversation_starts, document_starts, with_slice, Dtype, Token, TokenFile, TokenView,
};
use rayon::prelude::*;
use std::sync::Arc;

/// Below this many tokens a batch is gathered on the calling thread. Waking the pool and
/// waiting for it costs tens of microseconds, and a prefetching single thread already nears
/// memory bandwidth: on 2 cores the pool only wins from about 200K tokens a batch on.
const PARALLEL_MIN_TOKENS: usize = 1 << 18;
/// Rows are handed to the pool in tasks of at least this many tokens.
const ROW_TASK_TOKENS: usize = 1 << 14;

/// The target id of a position that is not trained: torch's default `ignore_index`, so
/// `F.cross_entropy` averages over the trained targets only.
pub const IGNORE_INDEX: i64 = -100;

/// Files sampled together, uniformly over all their windows.
#[derive(Debug)]
struct Group {
    /// Indices into `Sampler::files`.
    files: Vec<usize>,
    /// `first_window[i]`: number of windows in the group's files before file i.
    first_window: Vec<u64>,
    windows: u64,
}

/// Where one row's window lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub file: usize,
    pub start: u64,
}

#[derive(Debug)]
pub struct Sampler {
    files: Vec<Arc<TokenFile>>,
    groups: Vec<Group>,
    /// Cumulative normalized weights, the last one exactly 1.
    cum_weights: Vec<f64>,
    context_length: usize,
    /// A pool of its own (`with_threads`); None runs on rayon's global pool.
    pool: Option<rayon::ThreadPool>,
    /// Per file, the allowed window starts when aligned to documents; None: every start.
    doc_starts: Option<Vec<Vec<u64>>>,
    /// When set, every gathered id must lie in `0..vocab_size`; a batch holding another is refused.
    vocab_size: Option<u64>,
    /// Per file, its loss mask (None: every target trained); empty when no file has one.
    masks: Vec<Option<Arc<TokenFile>>>,
}

/// Why a row's window was refused.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// An id outside the vocabulary bound.
    Id(Window, i64),
    /// A mask value other than 0 or 1 among the window's targets.
    Mask(Window),
}

impl Sampler {
    /// `groups`: (weight, files). Weights are relative and need not sum to one; with a single
    /// group the weight is ignored.
    pub fn new(groups: Vec<(f64, Vec<Arc<TokenFile>>)>, context_length: usize) -> Result<Sampler> {
        if context_length == 0 {
            return Err(SamplerError::Argument(
                "context_length must be positive".into(),
            ));
        }
        if groups.is_empty() || groups.iter().all(|(_, f)| f.is_empty()) {
            return Err(SamplerError::Argument(
                "no token sources given; pass at least one token file or array".into(),
            ));
        }
        let need = context_length as u64 + 1;
        let mut files = Vec::new();
        let mut out_groups = Vec::new();
        let mut weights = Vec::new();
        for (weight, group_files) in groups {
            if !(weight.is_finite() && weight > 0.0) {
                return Err(SamplerError::Argument(format!(
                    "mixture weight {weight} is not a positive number; give each source a weight > 0"
                )));
            }
            if group_files.is_empty() {
                return Err(SamplerError::Argument(
                    "a weighted source holds no token files".into(),
                ));
            }
            let mut g = Group {
                files: Vec::new(),
                first_window: Vec::new(),
                windows: 0,
            };
            for f in group_files {
                if f.is_mask() {
                    return Err(SamplerError::Argument(format!(
                        "{}: is a loss mask, not a token file; pass it in masks=, at its token file's place",
                        f.name()
                    )));
                }
                let len = f.len() as u64;
                if len < need {
                    return Err(SamplerError::TooShort {
                        name: f.name().to_string(),
                        len,
                        context_length,
                    });
                }
                g.first_window.push(g.windows);
                g.windows += len - context_length as u64;
                g.files.push(files.len());
                files.push(f);
            }
            out_groups.push(g);
            weights.push(weight);
        }
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut cum_weights: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        if let Some(last) = cum_weights.last_mut() {
            *last = 1.0;
        }
        Ok(Sampler {
            files,
            groups: out_groups,
            cum_weights,
            context_length,
            pool: None,
            doc_starts: None,
            vocab_size: None,
            masks: Vec::new(),
        })
    }

    /// Gives files their loss masks: `masks[i]` belongs to `files()[i]` (groups flattened in
    /// order); None leaves that file unmasked (every target trained), so plain and chat data
    /// mix. A mask must hold uint8 values, as many as its file holds tokens. Call it before
    /// `align_to_documents`, whose starts depend on the masks.
    pub fn with_masks(mut self, masks: Vec<Option<Arc<TokenFile>>>) -> Result<Sampler> {
        if self.doc_starts.is_some() {
            return Err(SamplerError::Argument(
                "loss masks must be given before the windows are aligned to documents".into(),
            ));
        }
        if masks.len() != self.files.len() {
            return Err(SamplerError::Argument(format!(
                "masks holds {} entries but the sampler reads {} token files; give one mask or None \
                 per file, in the order of Sampler.files (groups flattened)",
                masks.len(),
                self.files.len()
            )));
        }
        for (f, m) in self.files.iter().zip(&masks) {
            let Some(m) = m else { continue };
            if m.dtype() != Dtype::U8 {
                return Err(SamplerError::Argument(format!(
                    "{}: holds {} values, not a loss mask; open loss masks with TokenFile.open_mask \
                     (a uint8 .npy)",
                    m.name(),
                    m.dtype().name()
                )));
            }
            if m.len() != f.len() {
                return Err(SamplerError::MaskLength {
                    mask: m.name().to_string(),
                    mask_len: m.len() as u64,
                    tokens: f.name().to_string(),
                    tokens_len: f.len() as u64,
                });
            }
        }
        self.masks = if masks.iter().any(Option::is_some) {
            masks
        } else {
            Vec::new()
        };
        Ok(self)
    }

    /// Whether any file has a loss mask.
    pub fn is_masked(&self) -> bool {
        !self.masks.is_empty()
    }

    /// Per file, its loss mask; empty when no file has one.
    pub fn masks(&self) -> &[Option<Arc<TokenFile>>] {
        &self.masks
    }

    fn mask_of(&self, file: usize) -> Option<&TokenFile> {
        self.masks.get(file).and_then(|m| m.as_deref())
    }

    /// Windows start only at document starts: 0 and every position after a token equal to
    /// `eot`; in a file with a loss mask, only at conversation starts (a token equal to `eot`
    /// whose mask value is 0). The index of starts is built once, by a parallel scan of each
    /// file. A masked file without a conversation start that leaves room for a window is an
    /// error.
    pub fn align_to_documents(mut self, eot: i64) -> Result<Sampler> {
        let t = self.context_length;
        let mut starts: Vec<Vec<u64>> = Vec::with_capacity(self.files.len());
        for (i, f) in self.files.iter().enumerate() {
            let file_starts = match self.mask_of(i) {
                Some(m) => {
                    let mask = m.bytes().expect("with_masks checked the mask is uint8");
                    let found = conversation_starts(f.view(), mask, eot, t);
                    if found.is_empty() {
                        return Err(SamplerError::NoConversation {
                            name: f.name().to_string(),
                            mask: m.name().to_string(),
                            eot,
                            context_length: t,
                        });
                    }
                    found
                }
                // Never empty: `new` checked that every file holds one window, at 0.
                None => document_starts(f.view(), eot, t),
            };
            starts.push(file_starts);
        }
        for g in &mut self.groups {
            g.windows = 0;
            for (slot, &f) in g.files.iter().enumerate() {
                g.first_window[slot] = g.windows;
                g.windows += starts[f].len() as u64;
            }
        }
        self.doc_starts = Some(starts);
        Ok(self)
    }

    pub fn is_document_aligned(&self) -> bool {
        self.doc_starts.is_some()
    }

    /// Gathers large batches on a pool of `threads` threads of its own instead of rayon's
    /// global pool (sized to all cores).
    pub fn with_threads(mut self, threads: usize) -> Result<Sampler> {
        if threads == 0 {
            return Err(SamplerError::Argument(
                "num_threads must be positive, or None for all cores".into(),
            ));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("lmtools-sampler-{i}"))
            .build()
            .map_err(|e| {
                SamplerError::Argument(format!(
                    "cannot start {threads} sampler threads ({e}); use fewer"
                ))
            })?;
        self.pool = Some(pool);
        Ok(self)
    }

    /// Refuses batches holding an id outside `0..vocab_size` (None: no check). The check is a
    /// max over the window being copied, whose bytes the gather reads anyway.
    pub fn with_vocab_bound(mut self, vocab_size: Option<u64>) -> Result<Sampler> {
        if vocab_size == Some(0) {
            return Err(SamplerError::Argument(
                "vocab_size must be positive, or None for no id check".into(),
            ));
        }
        self.vocab_size = vocab_size;
        Ok(self)
    }

    pub fn vocab_size(&self) -> Option<u64> {
        self.vocab_size
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }
    pub fn files(&self) -> &[Arc<TokenFile>] {
        &self.files
    }
    pub fn num_tokens(&self) -> u64 {
        self.files.iter().map(|f| f.len() as u64).sum()
    }
    pub fn num_windows(&self) -> u64 {
        self.groups.iter().map(|g| g.windows).sum()
    }

    /// The window of one row: a pure function of (seed, rank, step, micro, row).
    #[inline]
    fn window(&self, key: u64, row: usize) -> Window {
        let mut stream = Stream::for_row(key, row as u64);
        let group = if self.groups.len() == 1 {
            &self.groups[0]
        } else {
            let u = stream.next_f64();
            let g = self
                .cum_weights
                .partition_point(|&c| c <= u)
                .min(self.groups.len() - 1);
            &self.groups[g]
        };
        let w = stream.bounded(group.windows);
        // Last file whose first window is <= w.
        let i = group.first_window.partition_point(|&f| f <= w) - 1;
        let file = group.files[i];
        let local = w - group.first_window[i];
        let start = match &self.doc_starts {
            Some(starts) => starts[file][local as usize],
            None => local,
        };
        Window { file, start }
    }

    /// The windows of one batch, row by row. `key`: the batch's `rng::batch_key`.
    pub fn windows(&self, batch_size: usize, key: u64) -> Vec<Window> {
        (0..batch_size).map(|row| self.window(key, row)).collect()
    }

    /// Gathers one batch into `inputs` and `targets` (each `batch_size * T` int64 values, row
    /// major): row r holds tokens `[s, s + T)` and `[s + 1, s + T + 1)` of its window. Rows are
    /// filled in parallel when the batch is large enough to pay for it. `key`: the batch's
    /// `rng::batch_key`.
    pub fn fill(&self, inputs: &mut [i64], targets: &mut [i64], key: u64) -> Result<()> {
        self.fill_masked(inputs, targets, None, key)
    }

    /// `fill`, and in the same pass over the same rows: in a file with a loss mask, every target
    /// whose mask value is 0 becomes `IGNORE_INDEX` (the inputs are never masked, and the id
    /// bound is checked on the real ids). `mask`, when given (`batch_size * T` bytes), receives
    /// each row's mask values `[s + 1, s + T + 1)`, all ones for a file without a mask. A mask
    /// value other than 0 or 1 refuses the batch.
    pub fn fill_masked(
        &self,
        inputs: &mut [i64],
        targets: &mut [i64],
        mask: Option<&mut [u8]>,
        key: u64,
    ) -> Result<()> {
        let t = self.context_length;
        if inputs.len() != targets.len() || !inputs.len().is_multiple_of(t) || inputs.is_empty() {
            return Err(SamplerError::Argument(format!(
                "inputs and targets must both have shape (batch_size, {t}) with batch_size >= 1; got {} and {} values",
                inputs.len(),
                targets.len()
            )));
        }
        if let Some(m) = &mask {
            if m.len() != inputs.len() {
                return Err(SamplerError::Argument(format!(
                    "mask must have the shape of inputs (batch_size, {t}); got {} values for {}",
                    m.len(),
                    inputs.len()
                )));
            }
        }
        // Views are taken once per batch, not per row: the storage is behind a trait object.
        let views: Vec<TokenView<'_>> = self.files.iter().map(|f| f.view()).collect();
        let mask_views: Vec<Option<&[u8]>> = (0..self.files.len())
            .map(|i| self.mask_of(i).and_then(TokenFile::bytes))
            .collect();
        // Rows go out in tasks of whole rows; each task gathers its rows in order, prefetching
        // the next window (and its mask) while it widens the current one (the windows are
        // scattered over a file far larger than the caches, so their first touch is a trip to
        // memory).
        let rows_per_task = (ROW_TASK_TOKENS / t).max(1);
        let bound = self.vocab_size;
        // The first row (in row order) refused, and why.
        let fill_rows = |first_row: usize,
                         xs: &mut [i64],
                         ys: &mut [i64],
                         mut ms: Option<&mut [u8]>|
         -> Option<(usize, Refusal)> {
            let rows = xs.len() / t;
            let windows: Vec<Window> = (first_row..first_row + rows)
                .map(|r| self.window(key, r))
                .collect();
            let slice = |w: &Window| (w.file, w.start as usize);
            let fetch = |w: &Window| {
                let (f, s) = slice(w);
                with_slice!(views[f], v => prefetch(&v[s..s + t + 1]));
                if let Some(m) = mask_views[f] {
                    prefetch(&m[s + 1..s + t + 1]);
                }
            };
            if let Some(w) = windows.first() {
                fetch(w);
            }
            let mut bad = None;
            for (i, (x, y)) in xs.chunks_mut(t).zip(ys.chunks_mut(t)).enumerate() {
                if let Some(next) = windows.get(i + 1) {
                    fetch(next);
                }
                let (f, s) = slice(&windows[i]);
                match bound {
                    None => with_slice!(views[f], v => copy_row(&v[s..s + t + 1], x, y)),
                    Some(vocab) => {
                        // Ids as u64: a negative id wraps to a huge one, so one max finds both.
                        let top = with_slice!(views[f], v => copy_row_max(&v[s..s + t + 1], x, y));
                        if top >= vocab && bad.is_none() {
                            bad = Some((first_row + i, Refusal::Id(windows[i], top as i64)));
                        }
                    }
                }
                let out = ms.as_deref_mut().map(|m| &mut m[i * t..(i + 1) * t]);
                match mask_views[f] {
                    Some(m) => {
                        let values = &m[s + 1..s + t + 1];
                        if mask_targets(values, y) > 1 && bad.is_none() {
                            bad = Some((first_row + i, Refusal::Mask(windows[i])));
                        }
                        if let Some(out) = out {
                            out.copy_from_slice(values);
                        }
                    }
                    None => {
                        if let Some(out) = out {
                            out.fill(1);
                        }
                    }
                }
            }
            bad
        };
        let bad = if inputs.len() < PARALLEL_MIN_TOKENS {
            fill_rows(0, inputs, targets, mask)
        } else {
            let task = rows_per_task * t;
            let tasks = inputs.len().div_ceil(task);
            let mask_chunks: Vec<Option<&mut [u8]>> = match mask {
                Some(m) => m.chunks_mut(task).map(Some).collect(),
                None => (0..tasks).map(|_| None).collect(),
            };
            let run = move || {
                inputs
                    .par_chunks_mut(task)
                    .zip(targets.par_chunks_mut(task))
                    .zip(mask_chunks.into_par_iter())
                    .enumerate()
                    .filter_map(|(i, ((xs, ys), ms))| fill_rows(i * rows_per_task, xs, ys, ms))
                    .min_by_key(|&(row, _)| row)
            };
            match &self.pool {
                Some(pool) => pool.install(run),
                None => run(),
            }
        };
        // A file truncated under the copy read zeros, not its tokens (see `fault`). The mark is
        // sticky, so every later batch is refused too.
        self.files
            .iter()
            .chain(self.masks.iter().flatten())
            .try_for_each(|f| f.check_not_truncated())?;
        match bad {
            None => Ok(()),
            Some((_, Refusal::Id(w, id))) => Err(SamplerError::IdOutOfRange {
                name: self.files[w.file].name().to_string(),
                id,
                start: w.start,
                vocab_size: bound.unwrap_or(0),
            }),
            Some((_, Refusal::Mask(w))) => {
                let m = self
                    .mask_of(w.file)
                    .expect("a mask refusal comes from a masked file");
                let from = w.start as usize + 1;
                let values = &m.bytes().unwrap_or(&[])[from..from + t];
                let (j, &value) = values
                    .iter()
                    .enumerate()
                    .find(|(_, &v)| v > 1)
                    .unwrap_or((0, &values[0]));
                Err(SamplerError::BadMask {
                    mask: m.name().to_string(),
                    value,
                    position: (from + j) as u64,
                })
            }
        }
    }
}

/// Asks the CPU to start loading a window into cache (a hint; a no-op off x86-64).
#[inline(always)]
fn prefetch<T>(window: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(window);
        let base = window.as_ptr() as *const i8;
        let mut offset = 0;
        while offset < bytes {
            // SAFETY: prefetching is a hint and never faults; the address lies in the window.
            unsafe { _mm_prefetch(base.add(offset), _MM_HINT_T0) };
            offset += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = window;
}

/// Widens one window of T + 1 tokens into a row of inputs and a row of targets.
#[inline]
fn copy_row<T: Token>(window: &[T], x: &mut [i64], y: &mut [i64]) {
    let (head, tail) = (&window[..x.len()], &window[1..]);
    for (o, &v) in x.iter_mut().zip(head) {
        *o = v.widen();
    }
    for (o, &v) in y.iter_mut().zip(tail) {
        *o = v.widen();
    }
}

/// Sets the targets whose mask value is 0 to `IGNORE_INDEX`; returns the OR of the values, so
/// a result above 1 says a value other than 0 or 1 is among them.
#[inline]
fn mask_targets(mask: &[u8], y: &mut [i64]) -> u8 {
    let mut any = 0u8;
    for (o, &m) in y.iter_mut().zip(mask) {
        any |= m;
        if m == 0 {
            *o = IGNORE_INDEX;
        }
    }
    any
}

/// `copy_row`, returning the largest id of the window read as u64 (negative ids wrap high).
/// The max is taken in the loop that widens the inputs (one pass, vectorized); the targets add
/// only the window's last id.
#[inline]
fn copy_row_max<T: Token>(window: &[T], x: &mut [i64], y: &mut [i64]) -> u64 {
    let (head, tail) = (&window[..x.len()], &window[1..]);
    let mut top = 0u64;
    for (o, &v) in x.iter_mut().zip(head) {
        let w = v.widen();
        *o = w;
        top = top.max(w as u64);
    }
    for (o, &v) in y.iter_mut().zip(tail) {
        *o = v.widen();
    }
    window.last().map_or(top, |&v| top.max(v.widen() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::batch_key;
    use crate::source::{TokenStorage, TokenView};

    struct VecStorage(Vec<u32>);
    impl TokenStorage for VecStorage {
        fn view(&self) -> TokenView<'_> {
            TokenView::U32(&self.0)
        }
    }

    /// A source whose token at position i is `base + i`, so a row tells where it came from.
    fn source(name: &str, base: u32, len: u32) -> Arc<TokenFile> {
        Arc::new(TokenFile::from_storage(
            name.into(),
            Box::new(VecStorage((base..base + len).collect())),
        ))
    }

    #[test]
    fn rows_are_windows_and_targets_shift() {
        let s = Sampler::new(vec![(1.0, vec![source("a", 0, 500)])], 16).unwrap();
        let (b, t) = (32, 16);
        let (mut x, mut y) = (vec![0i64; b * t], vec![0i64; b * t]);
        s.fill(&mut x, &mut y, batch_key(1, 0, 5, 0)).unwrap();
        let windows = s.windows(b, batch_key(1, 0, 5, 0));
        for r in 0..b {
            let start = windows[r].start as i64;
            assert!(start < 500 - 16);
            for j in 0..t {
                assert_eq!(x[r * t + j], start + j as i64);
                assert_eq!(y[r * t + j], start + j as i64 + 1);
            }
        }
    }

    #[test]
    fn large_batches_take_the_parallel_path_and_agree() {
        let t = 4096;
        let b = PARALLEL_MIN_TOKENS / t + 3; // past the threshold, rows not a multiple of a task
        let s = Sampler::new(
            vec![
                (1.0, vec![source("a", 7, 1_000_000)]),
                (1.0, vec![source("b", 0, 50_000)]),
            ],
            t,
        )
        .unwrap();
        let (mut x, mut y) = (vec![0i64; b * t], vec![0i64; b * t]);
        s.fill(&mut x, &mut y, batch_key(4, 1, 2, 3)).unwrap();
        for (r, w) in s.windows(b, batch_key(4, 1, 2, 3)).iter().enumerate() {
            let first = w.start as i64 + if w.file == 0 { 7 } else { 0 };
            assert_eq!(x[r * t], first);
            assert_eq!(x[r * t + t - 1], first + t as i64 - 1);
            assert_eq!(y[r * t + t - 1], first + t as i64);
        }
    }

    #[test]
    fn own_pool_gives_the_same_batches() {
        let t = 4096;
        let b = PARALLEL_MIN_TOKENS / t + 1;
        let make = || Sampler::new(vec![(1.0, vec![source("a", 0, 100_000)])], t).unwrap();
        let (mut x1, mut y1) = (vec![0i64; b * t], vec![0i64; b * t]);
        let (mut x2, mut y2) = (vec![0i64; b * t], vec![0i64; b * t]);
        make()
            .fill(&mut x1, &mut y1, batch_key(1, 0, 0, 0))
            .unwrap();
        make()
            .with_threads(3)
            .unwrap()
            .fill(&mut x2, &mut y2, batch_key(1, 0, 0, 0))
            .unwrap();
        assert!(x1 == x2 && y1 == y2);
        assert!(make().with_threads(0).is_err());
    }

    #[test]
    fn every_start_and_nothing_else() {
        // len 20, T 4: starts 0..=15, 16 of them.
        let s = Sampler::new(vec![(1.0, vec![source("a", 0, 20)])], 4).unwrap();
        let mut seen = [0u32; 16];
        for step in 0..200 {
            for w in s.windows(16, batch_key(9, 0, step, 0)) {
                seen[w.start as usize] += 1; // out of range would panic here
            }
        }
        assert!(seen.iter().all(|&c| c > 0), "{seen:?}");
    }

    #[test]
    fn shards_never_straddle_and_are_uniform_over_windows() {
        // Windows: 10 - 4 = 6 in the first file, 30 - 4 = 26 in the second.
        let s = Sampler::new(
            vec![(1.0, vec![source("a", 0, 10), source("b", 1000, 30)])],
            4,
        )
        .unwrap();
        assert_eq!(s.num_windows(), 32);
        let mut in_a = 0;
        let n = 64_000;
        for w in s.windows(n, batch_key(3, 0, 0, 0)) {
            let len = if w.file == 0 { 10 } else { 30 };
            assert!(w.start + 4 < len);
            in_a += (w.file == 0) as usize;
        }
        let share = in_a as f64 / n as f64;
        assert!((share - 6.0 / 32.0).abs() < 0.01, "{share}");
    }

    #[test]
    fn mixture_weights_are_honoured() {
        let s = Sampler::new(
            vec![
                (0.7, vec![source("a", 0, 100)]),
                (0.3, vec![source("b", 0, 10_000)]),
            ],
            8,
        )
        .unwrap();
        let n = 50_000;
        let in_a = s
            .windows(n, batch_key(1, 0, 0, 0))
            .iter()
            .filter(|w| w.file == 0)
            .count() as f64
            / n as f64;
        assert!((in_a - 0.7).abs() < 0.01, "{in_a}");
    }

    #[test]
    fn deterministic_and_rank_dependent() {
        let s = Sampler::new(vec![(1.0, vec![source("a", 0, 1_000_000)])], 64).unwrap();
        let batch = |seed, rank, step, micro| s.windows(8, batch_key(seed, rank, step, micro));
        let base = batch(1, 0, 7, 0);
        assert_eq!(base, batch(1, 0, 7, 0));
        for other in [
            batch(1, 1, 7, 0),
            batch(1, 0, 8, 0),
            batch(1, 0, 7, 1),
            batch(2, 0, 7, 0),
        ] {
            assert_ne!(base, other);
        }
        // A row's window does not depend on the batch size.
        assert_eq!(base[..4], s.windows(4, batch_key(1, 0, 7, 0))[..]);
    }

    /// A u32 source from explicit tokens.
    fn tokens(name: &str, ids: Vec<u32>) -> Arc<TokenFile> {
        Arc::new(TokenFile::from_storage(
            name.into(),
            Box::new(VecStorage(ids)),
        ))
    }

    #[test]
    fn document_starts_are_zero_and_after_each_eot_that_fits() {
        // eot = 9 at 2, 5, 6 and 10; T = 3 so starts run up to 11 - 4 = 7.
        let ids = vec![1, 2, 9, 3, 4, 9, 9, 5, 6, 7, 9];
        let starts = document_starts(TokenView::U32(&ids), 9, 3);
        assert_eq!(starts, vec![0, 3, 6, 7]);
        assert!(document_starts(TokenView::U32(&ids[..3]), 9, 3).is_empty());
    }

    #[test]
    fn document_starts_across_scan_chunks() {
        // Boundaries on both sides of the 2^20 chunk edge.
        let n = (1 << 20) + 10;
        let mut ids = vec![1u32; n];
        for p in [0, (1 << 20) - 1, 1 << 20, n - 2] {
            ids[p] = 0;
        }
        let starts = document_starts(TokenView::U32(&ids), 0, 4);
        assert_eq!(starts, vec![0, 1, 1 << 20, (1 << 20) + 1]);
        let starts = document_starts(TokenView::U32(&ids), 0, 0);
        assert_eq!(starts, vec![0, 1, 1 << 20, (1 << 20) + 1, n as u64 - 1]);
    }

    #[test]
    fn aligned_windows_start_at_documents_and_cover_them_all() {
        // Documents of lengths 3, 5, 1, 7 in file a; 2, 9 in file b (eot = 0 ends each).
        let doc = |len: u32| (1..len).chain([0]).collect::<Vec<u32>>();
        let a: Vec<u32> = [3, 5, 1, 7].into_iter().flat_map(doc).collect();
        let b: Vec<u32> = [2, 9].into_iter().flat_map(doc).collect();
        let s = Sampler::new(
            vec![(1.0, vec![tokens("a", a.clone()), tokens("b", b.clone())])],
            4,
        )
        .unwrap()
        .align_to_documents(0)
        .unwrap();
        assert!(s.is_document_aligned());
        // a: starts 0, 3, 8, 9 (16 tokens, last start 11); b: 0, 2 (11 tokens, last start 6).
        assert_eq!(s.num_windows(), 6);
        let mut seen = std::collections::BTreeSet::new();
        for step in 0..100 {
            for w in s.windows(8, batch_key(5, 0, step, 0)) {
                let src = if w.file == 0 { &a } else { &b };
                let st = w.start as usize;
                assert!(st == 0 || src[st - 1] == 0, "{w:?}");
                seen.insert((w.file, w.start));
            }
        }
        let all: std::collections::BTreeSet<_> =
            [(0, 0), (0, 3), (0, 8), (0, 9), (1, 0), (1, 2)].into();
        assert_eq!(seen, all);
        // The gather copies the aligned windows.
        let (mut x, mut y) = (vec![0i64; 8 * 4], vec![0i64; 8 * 4]);
        s.fill(&mut x, &mut y, batch_key(5, 0, 3, 0)).unwrap();
        for (r, w) in s.windows(8, batch_key(5, 0, 3, 0)).iter().enumerate() {
            let src = if w.file == 0 { &a } else { &b };
            let st = w.start as usize;
            assert_eq!(x[r * 4], src[st] as i64);
            assert_eq!(y[r * 4 + 3], src[st + 4] as i64);
        }
    }

    #[test]
    fn aligned_windows_are_deterministic_and_keep_mixture_weights() {
        let doc = |len: u32| (1..len).chain([0]).collect::<Vec<u32>>();
        let a: Vec<u32> = (0..500).flat_map(|i| doc(3 + i % 11)).collect();
        let make = || {
            Sampler::new(
                vec![
                    (0.25, vec![tokens("a", a.clone())]),
                    (0.75, vec![tokens("b", a.clone())]),
                ],
                16,
            )
            .unwrap()
            .align_to_documents(0)
            .unwrap()
        };
        assert_eq!(
            make().windows(64, batch_key(1, 2, 3, 0)),
            make().windows(64, batch_key(1, 2, 3, 0))
        );
        assert_ne!(
            make().windows(64, batch_key(1, 2, 3, 0)),
            make().windows(64, batch_key(1, 2, 4, 0))
        );
        let n = 40_000;
        let in_a = make()
            .windows(n, batch_key(7, 0, 0, 0))
            .iter()
            .filter(|w| w.file == 0)
            .count();
        assert!((in_a as f64 / n as f64 - 0.25).abs() < 0.01);
    }

    #[test]
    fn bad_arguments() {
        let short = Sampler::new(vec![(1.0, vec![source("tiny", 0, 8)])], 8)
            .unwrap_err()
            .to_string();
        assert!(
            short.contains("tiny") && short.contains("9 tokens"),
            "{short}"
        );
        assert!(Sampler::new(vec![(1.0, vec![source("a", 0, 9)])], 8).is_ok());
        assert!(Sampler::new(vec![(1.0, vec![source("a", 0, 9)])], 0).is_err());
        assert!(Sampler::new(vec![], 8).is_err());
        for w in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = Sampler::new(
                vec![
                    (w, vec![source("a", 0, 100)]),
                    (1.0, vec![source("b", 0, 100)]),
                ],
                8,
            );
            assert!(e.unwrap_err().to_string().contains("weight"));
        }
        let s = Sampler::new(vec![(1.0, vec![source("a", 0, 100)])], 8).unwrap();
        let (mut x, mut y) = (vec![0i64; 15], vec![0i64; 15]);
        assert!(s.fill(&mut x, &mut y, batch_key(0, 0, 0, 0)).is_err());
        let (mut x, mut y) = (vec![0i64; 16], vec![0i64; 8]);
        assert!(s.fill(&mut x, &mut y, batch_key(0, 0, 0, 0)).is_err());
    }

    #[test]
    fn vocab_bound_refuses_a_batch_with_an_id_outside() {
        // Ids 0..99 everywhere but one 5000 at position 4321 of "b".
        let mut b: Vec<u32> = (0..10_000).map(|i| i % 100).collect();
        b[4321] = 5000;
        let make = |bound| {
            Sampler::new(
                vec![(
                    1.0,
                    vec![
                        tokens("a", (0..10_000).map(|i| i % 100).collect()),
                        tokens("b", b.clone()),
                    ],
                )],
                64,
            )
            .unwrap()
            .with_vocab_bound(bound)
            .unwrap()
        };
        // Small batches (one thread) and large ones (the pool) alike.
        for rows in [8usize, 8192] {
            let (mut x, mut y) = (vec![0i64; rows * 64], vec![0i64; rows * 64]);
            let mut refused = 0;
            let steps = if rows == 8 { 400 } else { 4 };
            for step in 0..steps {
                let key = batch_key(1, 0, step, 0);
                let hits = make(None)
                    .windows(rows, key)
                    .iter()
                    .any(|w| w.file == 1 && (w.start..=w.start + 64).contains(&4321));
                assert!(make(None).fill(&mut x, &mut y, key).is_ok());
                assert!(make(Some(5001)).fill(&mut x, &mut y, key).is_ok());
                match make(Some(100)).fill(&mut x, &mut y, key) {
                    Ok(()) => assert!(!hits),
                    Err(e) => {
                        assert!(hits);
                        let m = e.to_string();
                        assert!(m.starts_with("b: holds token id 5000 "), "{m}");
                        assert!(m.contains("outside 0..99"), "{m}");
                        refused += 1;
                    }
                }
            }
            assert!(refused > 0);
        }
        assert!(make(None).with_vocab_bound(Some(0)).is_err());
    }

    #[test]
    fn vocab_bound_catches_negative_ids() {
        let data: Vec<i64> = (0..200).map(|i| if i == 50 { -3 } else { i % 7 }).collect();
        let f = Arc::new(TokenFile::from_storage(
            "neg".into(),
            Box::new(Fixed64(data)),
        ));
        let s = Sampler::new(vec![(1.0, vec![f])], 199)
            .unwrap()
            .with_vocab_bound(Some(7))
            .unwrap();
        let (mut x, mut y) = (vec![0i64; 199], vec![0i64; 199]);
        let e = s
            .fill(&mut x, &mut y, batch_key(0, 0, 0, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("token id -3"), "{e}");
    }

    struct Bytes(Vec<u8>);
    impl TokenStorage for Bytes {
        fn view(&self) -> TokenView<'_> {
            TokenView::U8(&self.0)
        }
    }

    /// A uint8 source, standing in for a loss mask.
    fn mask(name: &str, values: Vec<u8>) -> Arc<TokenFile> {
        Arc::new(TokenFile::from_storage(
            name.into(),
            Box::new(Bytes(values)),
        ))
    }

    /// A chat file: conversations of random lengths, each opened by eot 0 with mask 0, then
    /// user tokens (mask 0), then assistant tokens ending with eot 0 (mask 1). Token ids are
    /// distinct per position (so a row tells where it came from) apart from the eots.
    fn chat(len: usize, seed: u64) -> (Vec<u32>, Vec<u8>) {
        let mut rng = crate::rng::Stream::new(seed);
        let (mut ids, mut m) = (Vec::with_capacity(len), Vec::with_capacity(len));
        while ids.len() < len {
            let user = 1 + rng.bounded(6) as usize;
            let assistant = 1 + rng.bounded(8) as usize;
            ids.push(0);
            m.push(0);
            for _ in 0..user {
                ids.push(ids.len() as u32 + 1);
                m.push(0);
            }
            for _ in 0..assistant {
                ids.push(ids.len() as u32 + 1);
                m.push(1);
            }
            ids.push(0);
            m.push(1);
        }
        ids.truncate(len);
        m.truncate(len);
        (ids, m)
    }

    /// What a masked gather must produce for one row: the inputs, and the targets with
    /// IGNORE_INDEX wherever the mask is 0.
    fn reference_row(
        ids: &[u32],
        m: Option<&[u8]>,
        s: usize,
        t: usize,
    ) -> (Vec<i64>, Vec<i64>, Vec<u8>) {
        let x = ids[s..s + t].iter().map(|&v| v as i64).collect();
        let y = (0..t)
            .map(|j| match m {
                Some(m) if m[s + 1 + j] == 0 => IGNORE_INDEX,
                _ => ids[s + 1 + j] as i64,
            })
            .collect();
        let mo = (0..t).map(|j| m.map_or(1, |m| m[s + 1 + j])).collect();
        (x, y, mo)
    }

    #[test]
    fn masked_targets_equal_the_reference_and_the_mask_buffer_the_window() {
        let (ids, m) = chat(5_000, 1);
        let t = 32;
        for aligned in [false, true] {
            let mut s = Sampler::new(vec![(1.0, vec![tokens("chat", ids.clone())])], t)
                .unwrap()
                .with_masks(vec![Some(mask("chat_mask", m.clone()))])
                .unwrap();
            if aligned {
                s = s.align_to_documents(0).unwrap();
            }
            assert!(s.is_masked());
            let b = 64;
            for step in 0..20 {
                let key = batch_key(3, 0, step, 0);
                let (mut x, mut y, mut mo) =
                    (vec![0i64; b * t], vec![0i64; b * t], vec![7u8; b * t]);
                s.fill_masked(&mut x, &mut y, Some(&mut mo), key).unwrap();
                let (mut x2, mut y2) = (vec![0i64; b * t], vec![0i64; b * t]);
                s.fill(&mut x2, &mut y2, key).unwrap();
                assert!(x == x2 && y == y2, "the mask buffer changes nothing else");
                for (r, w) in s.windows(b, key).iter().enumerate() {
                    let st = w.start as usize;
                    if aligned {
                        assert!(ids[st] == 0 && m[st] == 0, "{w:?} is no conversation start");
                    }
                    let (rx, ry, rm) = reference_row(&ids, Some(&m), st, t);
                    assert_eq!(x[r * t..(r + 1) * t], rx[..]);
                    assert_eq!(y[r * t..(r + 1) * t], ry[..]);
                    assert_eq!(mo[r * t..(r + 1) * t], rm[..]);
                }
            }
        }
    }

    #[test]
    fn aligned_masked_windows_cover_every_conversation_start() {
        let (ids, m) = chat(400, 2);
        let t = 8;
        let want: std::collections::BTreeSet<u64> = (0..=ids.len() - t - 1)
            .filter(|&p| ids[p] == 0 && m[p] == 0)
            .map(|p| p as u64)
            .collect();
        let s = Sampler::new(vec![(1.0, vec![tokens("chat", ids.clone())])], t)
            .unwrap()
            .with_masks(vec![Some(mask("chat_mask", m.clone()))])
            .unwrap()
            .align_to_documents(0)
            .unwrap();
        assert_eq!(s.num_windows(), want.len() as u64);
        let mut seen = std::collections::BTreeSet::new();
        for step in 0..300 {
            seen.extend(
                s.windows(16, batch_key(1, 0, step, 0))
                    .iter()
                    .map(|w| w.start),
            );
        }
        assert_eq!(seen, want);
        // Unaligned, a masked file starts anywhere (only its targets are masked).
        let s = Sampler::new(vec![(1.0, vec![tokens("chat", ids.clone())])], t)
            .unwrap()
            .with_masks(vec![Some(mask("chat_mask", m))])
            .unwrap();
        assert_eq!(s.num_windows(), (ids.len() - t) as u64);
    }

    #[test]
    fn mixtures_of_masked_and_unmasked_files() {
        let (chat_ids, chat_mask) = chat(3_000, 3);
        // A plain file: documents of 5 tokens ended by eot 0, ids 1000 + position otherwise.
        let plain: Vec<u32> = (0..2_000u32)
            .map(|i| if i % 5 == 4 { 0 } else { 1000 + i })
            .collect();
        let t = 16;
        let files = || {
            vec![
                tokens("plain", plain.clone()),
                tokens("chat", chat_ids.clone()),
            ]
        };
        let masks = || vec![None, Some(mask("chat_mask", chat_mask.clone()))];
        for weighted in [false, true] {
            for aligned in [false, true] {
                let groups = if weighted {
                    files().into_iter().map(|f| (1.0, vec![f])).collect()
                } else {
                    vec![(1.0, files())]
                };
                let mut s = Sampler::new(groups, t)
                    .unwrap()
                    .with_masks(masks())
                    .unwrap();
                if aligned {
                    s = s.align_to_documents(0).unwrap();
                }
                let b = 128;
                let key = batch_key(9, 1, 4, 2);
                let (mut x, mut y, mut mo) =
                    (vec![0i64; b * t], vec![0i64; b * t], vec![9u8; b * t]);
                s.fill_masked(&mut x, &mut y, Some(&mut mo), key).unwrap();
                let mut used = [0usize; 2];
                for (r, w) in s.windows(b, key).iter().enumerate() {
                    used[w.file] += 1;
                    let st = w.start as usize;
                    let (rx, ry, rm) = if w.file == 0 {
                        if aligned {
                            assert!(st == 0 || plain[st - 1] == 0);
                        }
                        reference_row(&plain, None, st, t)
                    } else {
                        if aligned {
                            assert!(chat_ids[st] == 0 && chat_mask[st] == 0);
                        }
                        reference_row(&chat_ids, Some(&chat_mask), st, t)
                    };
                    assert_eq!(x[r * t..(r + 1) * t], rx[..]);
                    assert_eq!(y[r * t..(r + 1) * t], ry[..]);
                    assert_eq!(mo[r * t..(r + 1) * t], rm[..]);
                }
                assert!(used[0] > 0 && used[1] > 0, "{used:?}");
            }
        }
        // All None: no masks at all, and the plain gather.
        let s = Sampler::new(vec![(1.0, files())], t)
            .unwrap()
            .with_masks(vec![None, None])
            .unwrap();
        assert!(!s.is_masked());
    }

    #[test]
    fn masked_parallel_path_equals_the_small_batch_path() {
        let (ids, m) = chat(400_000, 4);
        let t = 1024;
        let b = PARALLEL_MIN_TOKENS / t + 5; // past the threshold, rows not a multiple of a task
        let make = |threads: Option<usize>| {
            let s = Sampler::new(
                vec![
                    (1.0, vec![tokens("chat", ids.clone())]),
                    (1.0, vec![source("plain", 0, 100_000)]),
                ],
                t,
            )
            .unwrap()
            .with_masks(vec![Some(mask("chat_mask", m.clone())), None])
            .unwrap()
            .align_to_documents(0)
            .unwrap()
            .with_vocab_bound(Some(1 << 30))
            .unwrap();
            match threads {
                Some(n) => s.with_threads(n).unwrap(),
                None => s,
            }
        };
        let key = batch_key(5, 2, 7, 1);
        let gather = |s: &Sampler| {
            let (mut x, mut y, mut mo) = (vec![0i64; b * t], vec![0i64; b * t], vec![0u8; b * t]);
            s.fill_masked(&mut x, &mut y, Some(&mut mo), key).unwrap();
            (x, y, mo)
        };
        let big = gather(&make(None));
        assert_eq!(big, gather(&make(Some(3))));
        // Row by row on the calling thread (batches of one row stay below the threshold): the
        // rows of a batch do not depend on its size, so the same rows come out.
        let s = make(None);
        let windows = s.windows(b, key);
        for (r, w) in windows.iter().enumerate().step_by(37) {
            let (rx, ry, rm) = if w.file == 0 {
                reference_row(&ids, Some(&m), w.start as usize, t)
            } else {
                let plain: Vec<u32> = (0..100_000).collect();
                reference_row(&plain, None, w.start as usize, t)
            };
            assert_eq!(big.0[r * t..(r + 1) * t], rx[..]);
            assert_eq!(big.1[r * t..(r + 1) * t], ry[..]);
            assert_eq!(big.2[r * t..(r + 1) * t], rm[..]);
        }
        let small_b = 16;
        let (mut x, mut y, mut mo) = (
            vec![0i64; small_b * t],
            vec![0i64; small_b * t],
            vec![0u8; small_b * t],
        );
        s.fill_masked(&mut x, &mut y, Some(&mut mo), key).unwrap();
        assert_eq!(x[..], big.0[..small_b * t]);
        assert_eq!(y[..], big.1[..small_b * t]);
        assert_eq!(mo[..], big.2[..small_b * t]);
        // Without the mask buffer, the same targets.
        let (mut x2, mut y2) = (vec![0i64; b * t], vec![0i64; b * t]);
        s.fill(&mut x2, &mut y2, key).unwrap();
        assert!(x2 == big.0 && y2 == big.1);
        assert!(big.1.contains(&IGNORE_INDEX));
    }

    #[test]
    fn mask_errors() {
        let ids: Vec<u32> = (0..100).collect();
        let make =
            || Sampler::new(vec![(1.0, vec![tokens("data/train.npy", ids.clone())])], 8).unwrap();
        // A mask of another length names both files and both lengths.
        let e = make()
            .with_masks(vec![Some(mask("data/train_mask.npy", vec![1; 99]))])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "data/train_mask.npy holds 99 mask values but data/train.npy holds 100 tokens; \
             prepare the folder again"
        );
        // A list of the wrong length.
        let e = make().with_masks(vec![None, None]).unwrap_err();
        assert!(matches!(e, SamplerError::Argument(_)), "{e}");
        assert!(e
            .to_string()
            .contains("masks holds 2 entries but the sampler reads 1 token files"));
        // Something other than uint8 as a mask.
        let e = make()
            .with_masks(vec![Some(tokens("other.npy", ids.clone()))])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("other.npy: holds uint32 values, not a loss mask"),
            "{e}"
        );
        // Masks after alignment.
        let e = make()
            .align_to_documents(0)
            .unwrap()
            .with_masks(vec![None])
            .unwrap_err();
        assert!(e.to_string().contains("before"), "{e}");
        // A masked file without a conversation start that fits: eot 0 at 0 is trained (mask 1),
        // and the one opener at 95 leaves no room for 9 tokens.
        let mut ids = ids.clone();
        ids[95] = 0;
        let mut m = vec![1u8; 100];
        m[95] = 0;
        let e = Sampler::new(vec![(1.0, vec![tokens("data/train.npy", ids.clone())])], 8)
            .unwrap()
            .with_masks(vec![Some(mask("data/train_mask.npy", m))])
            .unwrap()
            .align_to_documents(0)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("data/train.npy: no conversation start")
                && e.contains("data/train_mask.npy"),
            "{e}"
        );
        // A mask value other than 0 or 1 refuses the batch, naming the mask and the position.
        let mut m = vec![1u8; 100];
        m[50] = 3;
        let s = make()
            .with_masks(vec![Some(mask("data/train_mask.npy", m))])
            .unwrap();
        let mut refused = 0;
        for step in 0..50 {
            let key = batch_key(0, 0, step, 0);
            let hits = s
                .windows(4, key)
                .iter()
                .any(|w| (w.start + 1..=w.start + 8).contains(&50));
            let (mut x, mut y) = (vec![0i64; 32], vec![0i64; 32]);
            match s.fill(&mut x, &mut y, key) {
                Ok(()) => assert!(!hits),
                Err(e) => {
                    assert!(hits);
                    assert!(
                        e.to_string()
                            .starts_with("data/train_mask.npy: holds mask value 3 at position 50;"),
                        "{e}"
                    );
                    refused += 1;
                }
            }
        }
        assert!(refused > 0);
        // A mask buffer of another shape, and a mask passed as a token file.
        let s = make();
        let (mut x, mut y, mut mo) = (vec![0i64; 16], vec![0i64; 16], vec![0u8; 8]);
        assert!(s.fill_masked(&mut x, &mut y, Some(&mut mo), 0).is_err());
        let p = crate::source::tests::temp_path("sampler_mask.npy");
        crate::source::tests::write_npy_u8(&p, &[0; 20]);
        let f = Arc::new(TokenFile::open_mask(&p).unwrap());
        let e = Sampler::new(vec![(1.0, vec![f])], 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a loss mask, not a token file"), "{e}");
    }

    #[test]
    fn masked_windows_are_deterministic_and_the_vocab_check_reads_real_ids() {
        // The id beyond the bound lies where the mask is 0: the check still refuses it.
        let (mut ids, m) = chat(2_000, 5);
        let p = (1..ids.len()).find(|&p| m[p] == 0 && ids[p] != 0).unwrap();
        ids[p] = 1 << 20;
        let make = |bound| {
            Sampler::new(vec![(1.0, vec![tokens("chat", ids.clone())])], 16)
                .unwrap()
                .with_masks(vec![Some(mask("chat_mask", m.clone()))])
                .unwrap()
                .with_vocab_bound(bound)
                .unwrap()
        };
        let mut refused = 0;
        for step in 0..400 {
            let key = batch_key(2, 0, step, 0);
            let hits = make(None)
                .windows(8, key)
                .iter()
                .any(|w| (w.start as usize..=w.start as usize + 16).contains(&p));
            let (mut x, mut y) = (vec![0i64; 8 * 16], vec![0i64; 8 * 16]);
            match make(Some(1 << 19)).fill(&mut x, &mut y, key) {
                Ok(()) => assert!(!hits),
                Err(e) => {
                    assert!(
                        hits && e.to_string().contains(&format!("token id {}", 1 << 20)),
                        "{e}"
                    );
                    refused += 1;
                }
            }
            let (mut x2, mut y2) = (vec![0i64; 8 * 16], vec![0i64; 8 * 16]);
            make(None).fill(&mut x, &mut y, key).unwrap();
            make(None).fill(&mut x2, &mut y2, key).unwrap();
            assert!(x == x2 && y == y2);
        }
        assert!(refused > 0);
    }

    struct Fixed64(Vec<i64>);
    impl TokenStorage for Fixed64 {
        fn view(&self) -> TokenView<'_> {
            TokenView::I64(&self.0)
        }
    }
}
