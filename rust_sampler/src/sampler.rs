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

use crate::error::{Result, SamplerError};
use crate::rng::Stream;
use crate::source::{document_starts, with_slice, Token, TokenFile, TokenView};
use rayon::prelude::*;
use std::sync::Arc;

/// Below this many tokens a batch is gathered on the calling thread. Waking the pool and
/// waiting for it costs tens of microseconds, and a prefetching single thread already nears
/// memory bandwidth: on 2 cores the pool only wins from about 200K tokens a batch on.
const PARALLEL_MIN_TOKENS: usize = 1 << 18;
/// Rows are handed to the pool in tasks of at least this many tokens.
const ROW_TASK_TOKENS: usize = 1 << 14;

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
        })
    }

    /// Windows start only at document starts: 0 and every position after a token equal to
    /// `eot`. The index of starts is built once, by a parallel scan of each file.
    pub fn align_to_documents(mut self, eot: i64) -> Sampler {
        let t = self.context_length;
        let starts: Vec<Vec<u64>> = self
            .files
            .iter()
            .map(|f| document_starts(f.view(), eot, t))
            .collect();
        for g in &mut self.groups {
            g.windows = 0;
            for (slot, &f) in g.files.iter().enumerate() {
                g.first_window[slot] = g.windows;
                // Never empty: `new` checked that every file holds one window, at 0.
                g.windows += starts[f].len() as u64;
            }
        }
        self.doc_starts = Some(starts);
        self
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
        let t = self.context_length;
        if inputs.len() != targets.len() || !inputs.len().is_multiple_of(t) || inputs.is_empty() {
            return Err(SamplerError::Argument(format!(
                "inputs and targets must both have shape (batch_size, {t}) with batch_size >= 1; got {} and {} values",
                inputs.len(),
                targets.len()
            )));
        }
        // Views are taken once per batch, not per row: the storage is behind a trait object.
        let views: Vec<TokenView<'_>> = self.files.iter().map(|f| f.view()).collect();
        // Rows go out in tasks of whole rows; each task gathers its rows in order, prefetching
        // the next window while it widens the current one (the windows are scattered over
        // a file far larger than the caches, so their first touch is a trip to memory).
        let rows_per_task = (ROW_TASK_TOKENS / t).max(1);
        let bound = self.vocab_size;
        // The first row (in row order) holding an id outside the bound: (row, window, id).
        let fill_rows =
            |first_row: usize, xs: &mut [i64], ys: &mut [i64]| -> Option<(usize, Window, i64)> {
                let rows = xs.len() / t;
                let windows: Vec<Window> = (first_row..first_row + rows)
                    .map(|r| self.window(key, r))
                    .collect();
                let slice = |w: &Window| (w.file, w.start as usize);
                if let Some(w) = windows.first() {
                    let (f, s) = slice(w);
                    with_slice!(views[f], v => prefetch(&v[s..s + t + 1]));
                }
                let mut bad = None;
                for (i, (x, y)) in xs.chunks_mut(t).zip(ys.chunks_mut(t)).enumerate() {
                    if let Some(next) = windows.get(i + 1) {
                        let (f, s) = slice(next);
                        with_slice!(views[f], v => prefetch(&v[s..s + t + 1]));
                    }
                    let (f, s) = slice(&windows[i]);
                    match bound {
                        None => with_slice!(views[f], v => copy_row(&v[s..s + t + 1], x, y)),
                        Some(vocab) => {
                            // Ids as u64: a negative id wraps to a huge one, so one max finds both.
                            let top =
                                with_slice!(views[f], v => copy_row_max(&v[s..s + t + 1], x, y));
                            if top >= vocab && bad.is_none() {
                                bad = Some((first_row + i, windows[i], top as i64));
                            }
                        }
                    }
                }
                bad
            };
        let bad = if inputs.len() < PARALLEL_MIN_TOKENS {
            fill_rows(0, inputs, targets)
        } else {
            let mut run = move || {
                inputs
                    .par_chunks_mut(rows_per_task * t)
                    .zip(targets.par_chunks_mut(rows_per_task * t))
                    .enumerate()
                    .filter_map(|(task, (xs, ys))| fill_rows(task * rows_per_task, xs, ys))
                    .min_by_key(|&(row, _, _)| row)
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
            .try_for_each(|f| f.check_not_truncated())?;
        if let (Some((_, w, id)), Some(vocab)) = (bad, bound) {
            return Err(SamplerError::IdOutOfRange {
                name: self.files[w.file].name().to_string(),
                id,
                start: w.start,
                vocab_size: vocab,
            });
        }
        Ok(())
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
        .align_to_documents(0);
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

    struct Fixed64(Vec<i64>);
    impl TokenStorage for Fixed64 {
        fn view(&self) -> TokenView<'_> {
            TokenView::I64(&self.0)
        }
    }
}
