//! A small deterministic PRNG (xorshift64) for workload generators: the benchmark and the tests.
//! Deterministic so a failing or surprising run replays from its printed seed; not for anything
//! that needs unpredictability.

/// xorshift64. A zero state would stay zero, so [`Rng::new`] maps seed 0 to 1.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 { 1 } else { seed })
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n`; `n` must be non-zero. The modulo bias is irrelevant for workloads.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
