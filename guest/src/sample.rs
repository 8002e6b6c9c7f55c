//! Token samplers, run inside the guest so their state (the PRNG) is part of the actor's
//! memory and so of every snapshot.
//!
//! Order of operations, as in llama.cpp: repetition penalty, then greedy (temperature 0) or
//! top-k, temperature, top-p, min-p, and one draw from what remains. Ties break toward the
//! lower token id, so a given seed always gives the same tokens.

/// A small, fast, seeded PRNG (xorshift64*).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Scramble the seed (splitmix64) so that small seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng {
            state: (z ^ (z >> 31)) | 1,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Sampling settings; the defaults are greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 picks the most likely token.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0: none).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recent tokens by this (1: off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
        }
    }
}

/// A sampler with its own seeded PRNG.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub config: SamplerConfig,
    pub rng: Rng,
}

impl Sampler {
    pub fn new(config: SamplerConfig, seed: u64) -> Sampler {
        Sampler {
            config,
            rng: Rng::new(seed),
        }
    }

    /// Whether [`sample`](Self::sample) always picks the largest logit (no temperature, no
    /// repetition penalty): the top logit alone then decides, and a host can select it
    /// (`Session::forward_top`) without the guest reading the logits.
    pub fn is_greedy(&self) -> bool {
        self.config.temperature <= 0.0 && self.config.repeat_penalty == 1.0
    }

    /// Picks the next token from `logits` (modified in place), given the tokens so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let c = &self.config;
        if c.repeat_penalty != 1.0 {
            apply_repeat_penalty(
                logits,
                &history[history.len().saturating_sub(c.repeat_last_n)..],
                c.repeat_penalty,
            );
        }
        if c.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if c.top_k > 0 {
            candidates.truncate(c.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates
            .iter()
            .map(|&(_, l)| ((l - max) / c.temperature).exp())
            .collect();
        normalize(&mut probs);
        let mut keep = probs.len();
        if c.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if c.min_p > 0.0 {
            let floor = probs[0] * c.min_p;
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        probs.truncate(keep);
        normalize(&mut probs);
        let r = self.rng.next_f32();
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if r < cum {
                return candidates[i].0;
            }
        }
        candidates[keep - 1].0
    }
}

/// The index of the largest logit; the lowest index among equals (NaNs are never chosen;
/// 0 when nothing beats negative infinity).
///
/// Eight independent lanes each keep the first maximum of their own elements, so the loop
/// compiles to SIMD (guests are built with `simd128`); lanes are then merged by value and,
/// among equals, by the lowest index, which is the first maximum overall.
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 8;
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut at = [0u32; LANES];
    for (c, chunk) in chunks.enumerate() {
        let first = (c * LANES) as u32;
        for j in 0..LANES {
            let better = chunk[j] > best[j];
            best[j] = if better { chunk[j] } else { best[j] };
            at[j] = if better { first + j as u32 } else { at[j] };
        }
    }
    let (mut value, mut index) = (f32::NEG_INFINITY, u32::MAX);
    for j in 0..LANES {
        if best[j] > value || (best[j] == value && at[j] < index) {
            (value, index) = (best[j], at[j]);
        }
    }
    let base = logits.len() - rest.len();
    for (k, &v) in rest.iter().enumerate() {
        if v > value {
            (value, index) = (v, (base + k) as u32);
        }
    }
    if index == u32::MAX { 0 } else { index }
}

fn apply_repeat_penalty(logits: &mut [f32], recent: &[u32], penalty: f32) {
    let mut seen = recent.to_vec();
    seen.sort_unstable();
    seen.dedup();
    for id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

fn normalize(p: &mut [f32]) {
    let sum: f32 = p.iter().sum();
    if sum > 0.0 {
        p.iter_mut().for_each(|x| *x /= sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_is_the_first_maximum_whatever_the_length() {
        let naive = |x: &[f32]| {
            let mut best = 0;
            for (i, &v) in x.iter().enumerate() {
                if v > x[best] {
                    best = i;
                }
            }
            best as u32
        };
        let mut rng = Rng::new(9);
        for len in [1, 7, 8, 9, 16, 63, 64, 65, 49152, 128_256] {
            // Few distinct values, so maxima tie across lanes and chunks.
            let x: Vec<f32> = (0..len)
                .map(|_| (rng.next_u64() % 5) as f32 - 2.0)
                .collect();
            assert_eq!(argmax(&x), naive(&x), "length {len}");
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 20]), 0);
        assert_eq!(argmax(&[1.0, f32::NAN, 3.0, f32::NAN]), 2);
        let mut late = vec![0.0f32; 1000];
        late[999] = 1.0;
        late[998] = 1.0;
        assert_eq!(argmax(&late), 998);
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplerConfig::default(), 1);
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn a_seed_fixes_the_stream_and_seeds_differ() {
        let config = SamplerConfig {
            temperature: 1.0,
            ..SamplerConfig::default()
        };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(config.clone(), seed);
            (0..40)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_and_min_p_cut_the_tail() {
        let logits = vec![1.0, 5.0, 4.9, -3.0];
        let mut s = Sampler::new(
            SamplerConfig {
                temperature: 1.0,
                top_k: 1,
                ..Default::default()
            },
            3,
        );
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 1);
        }
        let mut s = Sampler::new(
            SamplerConfig {
                temperature: 1.0,
                top_p: 0.5,
                ..Default::default()
            },
            3,
        );
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 1);
        }
        let mut s = Sampler::new(
            SamplerConfig {
                temperature: 1.0,
                min_p: 0.5,
                ..Default::default()
            },
            3,
        );
        for _ in 0..50 {
            assert!([1, 2].contains(&s.sample(&mut logits.clone(), &[])));
        }
    }

    #[test]
    fn repetition_penalty_pushes_recent_tokens_down() {
        let config = SamplerConfig {
            repeat_penalty: 2.0,
            ..SamplerConfig::default()
        };
        let mut s = Sampler::new(config, 0);
        assert_eq!(s.sample(&mut [1.0, 1.5, 0.2], &[1]), 0);
    }

    #[test]
    fn uniform_draws_stay_in_range() {
        let mut r = Rng::new(0);
        for _ in 0..1000 {
            let x = r.next_f32();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
