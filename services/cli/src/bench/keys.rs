//! Key choice for the bench: a tiny xorshift PRNG and a uniform or hot/cold key space.
//!
//! A general-purpose RNG crate would work, but this costs a few nanoseconds per key and needs
//! no dependency; statistical quality beyond "spread evenly" does not matter for load.

/// xorshift64* (Vigna): fast, 2^64-1 period; the high bits are the good ones.
#[derive(Debug, Clone)]
pub struct XorShift64 {
    state: u64,
}

impl XorShift64 {
    /// A generator whose stream depends on `seed`; distinct seeds give unrelated streams.
    pub fn seeded(seed: u64) -> Self {
        // splitmix64 spreads small, consecutive seeds (worker ids) and never yields the
        // all-zero state that would make xorshift stick at zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        XorShift64 {
            state: if z == 0 { 0x2545_F491_4F6C_DD1D } else { z },
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A fair coin from the top bit.
    pub fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }
}

/// Maps 32 random bits onto `0..n` without division (Lemire's multiply-shift).
fn below(bits32: u64, n: u64) -> u64 {
    ((bits32 & 0xFFFF_FFFF) * n) >> 32
}

/// Which keys (`k0..k{count-1}`) the bench touches, and how often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpace {
    count: u64,
    /// Keys `0..hot_count` get [`HOT_SHARE_OF_TEN`]/10 of the picks; 0 = uniform.
    hot_count: u64,
}

/// Tenths of the picks that go to the hot keys under `--hot`.
const HOT_SHARE_OF_TEN: u64 = 9;

impl KeySpace {
    /// Every key equally likely.
    pub fn uniform(count: u64) -> Self {
        KeySpace {
            count: count.max(1),
            hot_count: 0,
        }
    }

    /// 90% of picks on the first 1% of keys (at least one key), the rest on the others.
    pub fn hot(count: u64) -> Self {
        let count = count.max(1);
        let hot_count = (count / 100).max(1);
        KeySpace {
            count,
            // With one key or a hot set covering everything there is nothing to skew.
            hot_count: if hot_count < count { hot_count } else { 0 },
        }
    }

    /// Picks a key index in `0..count`.
    pub fn pick(&self, rng: &mut XorShift64) -> u64 {
        // count <= 10^7 < 2^32, so the high 32 bits give an index with negligible bias; the
        // low 32 bits, independent of them, decide hot or cold.
        let bits = rng.next_u64();
        let index_bits = bits >> 32;
        if self.hot_count == 0 {
            return below(index_bits, self.count);
        }
        if below(bits, 10) < HOT_SHARE_OF_TEN {
            below(index_bits, self.hot_count)
        } else {
            self.hot_count + below(index_bits, self.count - self.hot_count)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAWS: u64 = 1_000_000;

    #[test]
    fn seeds_give_different_nonzero_streams() {
        let mut a = XorShift64::seeded(0);
        let mut b = XorShift64::seeded(1);
        let first_a: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        let first_b: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        assert_ne!(first_a, first_b);
        assert!(first_a.iter().chain(&first_b).all(|&x| x != 0));
    }

    #[test]
    fn coin_is_fair() {
        let mut rng = XorShift64::seeded(7);
        let heads = (0..DRAWS).filter(|_| rng.coin()).count() as f64;
        assert!(
            (heads / DRAWS as f64 - 0.5).abs() < 0.005,
            "heads share {heads}"
        );
    }

    #[test]
    fn uniform_spreads_over_every_key() {
        let space = KeySpace::uniform(1_000);
        let mut rng = XorShift64::seeded(3);
        let mut hits = vec![0u32; 1_000];
        for _ in 0..DRAWS {
            let k = space.pick(&mut rng) as usize;
            hits[k] += 1;
        }
        // Expected 1000 per key; a fair generator stays well within ±25%.
        assert!(
            hits.iter().all(|&h| (750..=1250).contains(&h)),
            "{:?}",
            hits.iter().min()
        );
    }

    #[test]
    fn hot_sends_ninety_percent_to_one_percent_of_keys() {
        let space = KeySpace::hot(100_000);
        assert_eq!(space.hot_count, 1_000);
        let mut rng = XorShift64::seeded(11);
        let mut hot_hits = 0u64;
        let mut hot_seen = vec![false; 1_000];
        let mut max_seen = 0;
        for _ in 0..DRAWS {
            let k = space.pick(&mut rng);
            assert!(k < 100_000);
            max_seen = max_seen.max(k);
            if k < 1_000 {
                hot_hits += 1;
                hot_seen[k as usize] = true;
            }
        }
        let share = hot_hits as f64 / DRAWS as f64;
        assert!((share - 0.9).abs() < 0.005, "hot share {share}");
        assert!(hot_seen.iter().all(|&seen| seen), "every hot key is used");
        assert!(
            max_seen > 99_000,
            "cold picks reach the end of the key space"
        );
    }

    #[test]
    fn tiny_key_spaces_stay_in_range() {
        let mut rng = XorShift64::seeded(5);
        for count in [1, 2, 3, 99, 100, 101] {
            for space in [KeySpace::uniform(count), KeySpace::hot(count)] {
                for _ in 0..10_000 {
                    assert!(space.pick(&mut rng) < count);
                }
            }
        }
        assert_eq!(KeySpace::hot(1).hot_count, 0);
        assert_eq!(KeySpace::hot(50).hot_count, 1);
    }
}
