//! Counter-based random numbers: every value is a pure function of a counter tuple, so the
//! windows of any (seed, rank, step, micro-batch, row) can be recomputed without replaying the
//! steps before it, and ranks draw independent streams.
//!
//! The mixing function is the SplitMix64 finalizer (a bijection on u64 with full avalanche).
//! A key is built by absorbing each word of the tuple in turn; a row's stream then is plain
//! SplitMix64 started at that key, i.e. the `i`-th value is `mix64(key + i * GOLDEN)`.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (Steele, Lea and Flood 2014; constants from Vigna).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Folds one more counter word into a key. The word is mixed on its own first so that small,
/// neighbouring counters (step 1, 2, 3, ...) land far apart before they meet the key; the
/// additive constants keep the all-zero tuple away from the fixed point `mix64(0) == 0`.
#[inline]
pub fn absorb(key: u64, word: u64) -> u64 {
    mix64(key.wrapping_add(GOLDEN) ^ mix64(word.wrapping_add(0xD1B5_4A32_D192_ED03)))
}

/// The key of one batch: (seed, rank, step, micro).
#[inline]
pub fn batch_key(seed: u64, rank: u64, step: u64, micro: u64) -> u64 {
    let mut k = mix64(seed ^ 0x243F_6A88_85A3_08D3);
    for w in [rank, step, micro] {
        k = absorb(k, w);
    }
    k
}

/// The random stream of one row of one batch.
#[derive(Clone, Debug)]
pub struct Stream {
    key: u64,
    counter: u64,
}

impl Stream {
    pub fn new(key: u64) -> Self {
        Stream { key, counter: 0 }
    }

    pub fn for_row(batch_key: u64, row: u64) -> Self {
        Stream::new(absorb(batch_key, row))
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.counter = self.counter.wrapping_add(1);
        mix64(self.key.wrapping_add(self.counter.wrapping_mul(GOLDEN)))
    }

    /// Uniform in [0, 1) with 53 random bits.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n) without modulo bias: Lemire's multiply-and-shift, rejecting the
    /// `2^64 mod n` low products that would over-represent some outputs and drawing the next
    /// counter value instead. `n` must be non-zero.
    #[inline]
    pub fn bounded(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_counter_same_values() {
        let a: Vec<u64> = {
            let mut s = Stream::for_row(batch_key(7, 0, 123, 1), 5);
            (0..16).map(|_| s.next_u64()).collect()
        };
        let mut s = Stream::for_row(batch_key(7, 0, 123, 1), 5);
        let b: Vec<u64> = (0..16).map(|_| s.next_u64()).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn every_word_of_the_tuple_matters() {
        let base = batch_key(1, 2, 3, 4);
        let others = [
            batch_key(0, 2, 3, 4),
            batch_key(1, 0, 3, 4),
            batch_key(1, 2, 0, 4),
            batch_key(1, 2, 3, 0),
            batch_key(1, 3, 2, 4), // swapped words give another key
        ];
        for o in others {
            assert_ne!(base, o);
        }
    }

    #[test]
    fn ranks_are_independent() {
        // Same seed and step, different ranks: the streams share no values and the bounded
        // draws agree only as often as chance allows.
        let n = 1000u64;
        let draws = |rank: u64| -> Vec<u64> {
            (0..4096u64)
                .map(|row| Stream::for_row(batch_key(42, rank, 10, 0), row).bounded(n))
                .collect()
        };
        let a = draws(0);
        let b = draws(1);
        let equal = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        // Expected 4096 / 1000 ~ 4; a shared stream would give 4096.
        assert!(equal < 20, "{equal} equal draws between ranks");
    }

    #[test]
    fn bounded_stays_in_range() {
        let mut s = Stream::new(3);
        for n in [1u64, 2, 3, 7, 100, 1 << 33, u64::MAX] {
            for _ in 0..1000 {
                assert!(s.bounded(n) < n);
            }
        }
        assert_eq!(Stream::new(9).bounded(1), 0);
    }

    #[test]
    fn bounded_is_uniform_on_a_small_range() {
        // Chi-square over 7 cells with 70_000 draws; 6 degrees of freedom, the 0.999 quantile
        // is 22.46. The streams are deterministic, so this cannot flake.
        let n = 7u64;
        let draws = 70_000u64;
        let mut counts = [0u64; 7];
        for row in 0..draws {
            counts[Stream::for_row(batch_key(5, 0, 0, 0), row).bounded(n) as usize] += 1;
        }
        let expected = draws as f64 / n as f64;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 22.46, "chi2 = {chi2}, counts = {counts:?}");
    }

    #[test]
    fn bounded_has_no_modulo_bias() {
        // n = 3 * 2^62 splits 2^64 into a 4:3 ratio under a plain modulo: the lowest 2^62 values
        // would come up twice as often as the rest. With rejection the lowest quarter of the
        // range gets a quarter of the draws.
        let n = 3u64 << 62;
        let draws = 200_000u64;
        let mut s = Stream::new(11);
        let low = (0..draws).filter(|_| s.bounded(n) < (n / 3)).count() as f64 / draws as f64;
        assert!((low - 1.0 / 3.0).abs() < 0.01, "low share {low}");
    }

    #[test]
    fn unit_floats_in_range() {
        let mut s = Stream::new(1);
        for _ in 0..10_000 {
            let u = s.next_f64();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
