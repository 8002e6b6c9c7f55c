//! The largest logits of a forward pass: what a sampler needs from a vocabulary of 10^5
//! entries when it keeps only the top few (greedy decoding keeps one).
//!
//! Order: by logit, largest first, in IEEE total order (`f32::total_cmp`: -NaN < -inf <
//! ... < -0 < +0 < ... < +inf < +NaN); equal logits by token, smaller first. Every backend
//! selects with this order, so the candidates are the same bits everywhere the logits are.

/// At most this many candidates per call.
pub const MAX_TOP: usize = 64;

/// One of the largest logits: its token and value, 8 bytes (`u32` token, then the `f32`
/// logit's bits, little-endian), as the guest ABI lays them out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Candidate {
    pub token: u32,
    pub logit: f32,
}

/// Refuses a request for `k` of `vocab` logits: more than [`MAX_TOP`] or than the
/// vocabulary holds.
pub fn check_k(k: usize, vocab: usize) -> Result<(), crate::ModelError> {
    if k > MAX_TOP || k > vocab {
        return Err(crate::ModelError::Invalid(format!(
            "{k} top logits asked for (at most {MAX_TOP}, and no more than the vocabulary)"
        )));
    }
    Ok(())
}

/// A logit's position in IEEE total order as an unsigned integer (larger sorts later).
pub fn order_key(logit: f32) -> u32 {
    let bits = logit.to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// Whether `a` comes before `b` in the candidates' order.
fn before(a: Candidate, b: Candidate) -> bool {
    let (ka, kb) = (order_key(a.logit), order_key(b.logit));
    ka > kb || (ka == kb && a.token < b.token)
}

/// Writes the `out.len()` largest of `logits` into `out`, in the module's order (`out` no
/// longer than `logits`).
pub fn top_k(logits: &[f32], out: &mut [Candidate]) {
    let k = out.len().min(logits.len());
    if k == 0 {
        return;
    }
    let mut n = 0;
    for (token, &logit) in logits.iter().enumerate() {
        let c = Candidate {
            token: token as u32,
            logit,
        };
        if n == k && !before(c, out[k - 1]) {
            continue;
        }
        // Insert in order; the last one drops out when the list is full.
        let mut at = n.min(k - 1);
        if n < k {
            n += 1;
        }
        while at > 0 && before(c, out[at - 1]) {
            out[at] = out[at - 1];
            at -= 1;
        }
        out[at] = c;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(logits: &[f32], k: usize) -> Vec<Candidate> {
        let mut all: Vec<Candidate> = logits
            .iter()
            .enumerate()
            .map(|(t, &logit)| Candidate {
                token: t as u32,
                logit,
            })
            .collect();
        all.sort_by(|a, b| b.logit.total_cmp(&a.logit).then(a.token.cmp(&b.token)));
        all.truncate(k);
        all
    }

    #[test]
    fn selects_as_a_full_sort_does() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut logits: Vec<f32> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) % 200) as f32 / 8.0 - 12.0 // many ties
            })
            .collect();
        logits[17] = f32::INFINITY;
        logits[99] = -0.0;
        logits[100] = 0.0;
        for k in [1, 2, 7, 64] {
            let mut out = vec![Candidate::default(); k];
            top_k(&logits, &mut out);
            let want = reference(&logits, k);
            assert_eq!(
                out.iter()
                    .map(|c| (c.token, c.logit.to_bits()))
                    .collect::<Vec<_>>(),
                want.iter()
                    .map(|c| (c.token, c.logit.to_bits()))
                    .collect::<Vec<_>>(),
                "k = {k}"
            );
        }
    }

    #[test]
    fn ties_go_to_the_smaller_token_and_nan_sorts_by_its_sign() {
        let logits = [1.0, 3.0, 3.0, f32::NAN, -f32::NAN, 2.0];
        let mut out = [Candidate::default(); 4];
        top_k(&logits, &mut out);
        let tokens: Vec<u32> = out.iter().map(|c| c.token).collect();
        assert_eq!(tokens, [3, 1, 2, 5]);
    }

    #[test]
    fn more_wanted_than_there_are_logits() {
        let mut out = [Candidate::default(); 3];
        top_k(&[0.5, 1.5], &mut out[..2]);
        assert_eq!(out[0].token, 1);
        assert_eq!(out[1].token, 0);
    }
}
