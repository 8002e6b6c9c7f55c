//! The actor side of `tern bench decode`. Messages (plain text):
//! - `open <model> <vocab> <context>`: opens the model and a session;
//! - `prefill <id> <id> ...`: feeds these token ids in one call;
//! - `decode <n>`: generates `n` tokens greedily, one forward call each, ignoring
//!   end-of-turn, and emits the last token id;
//! - `decode_top <n>`: the same, each step asking the host for the top logit only
//!   (`forward_top` with one candidate and no logits) instead of scanning the logits;
//! - `argmax <reps>`: takes the argmax of the current logits `reps` times (the guest's
//!   share of a greedy decode step, timed by the host) and emits it;
//! - `ballast <mib>`: holds `mib` MiB of pseudo-random bytes (incompressible guest state,
//!   for `tern bench snapshot`).
//!
//! The host times each message; the same work done directly on the engine is the baseline.

use tern_guest::sample::argmax;
use tern_guest::{Actor, Candidate, Error, Model, Session, emit_str, export_actor};

#[derive(Default)]
struct Bench {
    state: Option<(Session, Vec<f32>)>,
    ballast: Vec<u8>,
}

fn number<T: std::str::FromStr>(word: Option<&str>) -> Result<T, Error> {
    word.and_then(|w| w.parse().ok())
        .ok_or_else(|| Error::guest("expected a number"))
}

impl Actor for Bench {
    fn on_message(&mut self, message: &[u8]) -> Result<(), Error> {
        let text =
            std::str::from_utf8(message).map_err(|_| Error::guest("messages must be UTF-8"))?;
        let mut words = text.split_whitespace();
        match words.next() {
            Some("open") => {
                let model = Model::open(words.next().unwrap_or("default"))?;
                let vocab: usize = number(words.next())?;
                let context: u32 = number(words.next())?;
                self.state = Some((model.session(context, vocab)?, vec![0.0; vocab]));
            }
            Some("prefill") => {
                let (session, logits) = self
                    .state
                    .as_mut()
                    .ok_or_else(|| Error::guest("open first"))?;
                let ids: Vec<u32> = words.map(|w| number(Some(w))).collect::<Result<_, _>>()?;
                session.forward(&ids, logits)?;
            }
            Some("decode") => {
                let (session, logits) = self
                    .state
                    .as_mut()
                    .ok_or_else(|| Error::guest("open first"))?;
                let n: usize = number(words.next())?;
                let mut token = argmax(logits);
                for _ in 0..n {
                    session.forward(&[token], logits)?;
                    token = argmax(logits);
                }
                emit_str(&token.to_string())?;
            }
            Some("decode_top") => {
                let (session, logits) = self
                    .state
                    .as_mut()
                    .ok_or_else(|| Error::guest("open first"))?;
                let n: usize = number(words.next())?;
                let mut top = [Candidate::default()];
                top[0].token = argmax(logits);
                for _ in 0..n {
                    session.forward_top(&[top[0].token], None, &mut top)?;
                }
                emit_str(&top[0].token.to_string())?;
            }
            Some("argmax") => {
                let (_, logits) = self
                    .state
                    .as_ref()
                    .ok_or_else(|| Error::guest("open first"))?;
                let reps: usize = number(words.next())?;
                let mut token = 0;
                for _ in 0..reps {
                    token = argmax(std::hint::black_box(logits));
                }
                emit_str(&token.to_string())?;
            }
            Some("ballast") => {
                let mib: usize = number(words.next())?;
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                self.ballast = (0..mib << 17)
                    .flat_map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x.to_le_bytes()
                    })
                    .collect();
            }
            _ => {
                return Err(Error::guest(
                    "expected open, prefill, decode, decode_top, argmax or ballast",
                ));
            }
        }
        Ok(())
    }
}

export_actor!(Bench);
