//! Conversations for the batch-invariance tests of every backend: random prompts sent in
//! random pieces at random moments, then greedy decoding; each run alone and then among
//! others, whose bits must not change.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use tern_model::Model;
use tern_model::llama::cpu::argmax;

use crate::common::{Rng, bits};

/// A conversation: a prompt sent in pieces, then greedy decode steps.
#[derive(Clone, Debug)]
pub struct Conversation {
    pub prompt: Vec<u32>,
    pub pieces: Vec<usize>,
    pub decode: usize,
    /// Pauses before each forward pass, in microseconds (varies arrival times).
    pub pauses: Vec<u64>,
}

impl Conversation {
    pub fn random(rng: &mut Rng, vocab: usize) -> Conversation {
        let mut draw = |n: usize| ((rng.f32() + 1.0) / 2.0 * n as f32) as usize % n;
        let len = 1 + draw(160);
        let prompt = (0..len).map(|_| draw(vocab) as u32).collect();
        let mut pieces = Vec::new();
        let mut left = len;
        while left > 0 {
            let piece = (1 + draw(100)).min(left);
            pieces.push(piece);
            left -= piece;
        }
        let decode = 1 + draw(24);
        let pauses = (0..pieces.len() + decode)
            .map(|_| draw(300) as u64)
            .collect();
        Conversation {
            prompt,
            pieces,
            decode,
            pauses,
        }
    }

    /// Every forward pass's logits.
    pub fn run(&self, model: &Model) -> Vec<Vec<f32>> {
        let mut session = model.new_session(256).unwrap();
        let mut logits = vec![0.0; model.config().n_vocab];
        let (mut all, mut at) = (Vec::new(), 0);
        let mut pauses = self.pauses.iter();
        let mut pause = || {
            if let Some(&us) = pauses.next() {
                std::thread::sleep(Duration::from_micros(us));
            }
        };
        for &piece in &self.pieces {
            pause();
            let tokens = &self.prompt[at..at + piece];
            model.forward(&mut session, tokens, &mut logits).unwrap();
            all.push(logits.clone());
            at += piece;
        }
        for _ in 0..self.decode {
            pause();
            let next = argmax(&logits);
            model.forward(&mut session, &[next], &mut logits).unwrap();
            all.push(logits.clone());
        }
        all
    }
}

/// Each conversation alone, then all of them at once (started together); every one's
/// logits must be the bits it got alone.
pub fn alone_and_together(model: &Model, conversations: &[Conversation]) {
    let alone: Vec<_> = conversations.iter().map(|c| bits(&c.run(model))).collect();
    let before = model.step_stats();
    let start = Barrier::new(conversations.len());
    let together: Vec<_> = std::thread::scope(|s| {
        let runs: Vec<_> = conversations
            .iter()
            .map(|c| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    bits(&c.run(model))
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert!(
            a == t,
            "conversation {i} of {} differs beside the others: {:?}",
            conversations.len(),
            conversations[i]
        );
    }
    let after = model.step_stats();
    let (steps, chunks) = (after.steps - before.steps, after.chunks - before.chunks);
    // Two conversations may never overlap on so small a model; 64 always do.
    if conversations.len() > 32 {
        assert!(
            steps < chunks,
            "no step held two forward passes ({steps} steps)"
        );
    }
}

/// One step over sessions at different positions with different numbers of new tokens
/// (`history[i]` then `new[i]` tokens each): every session's logits, and those of one more
/// token after it, are the bits it gets alone from the same two calls. A step with one bad
/// session fails before any runs.
pub fn one_step_gives_each_session_its_own_bits(model: &Model, history: &[usize], new: &[usize]) {
    let vocab = model.config().n_vocab;
    let prompt = |i: usize| -> Vec<u32> {
        (0..history[i] + new[i])
            .map(|p| ((p * 31 + i * 7 + 3) % vocab) as u32)
            .collect()
    };
    let n_ctx = 1 + history
        .iter()
        .zip(new)
        .map(|(h, n)| h + n)
        .max()
        .unwrap_or(0);
    let fresh = |i: usize| {
        let mut session = model.new_session(n_ctx).unwrap();
        if history[i] > 0 {
            let mut logits = vec![0.0; vocab];
            model
                .forward(&mut session, &prompt(i)[..history[i]], &mut logits)
                .unwrap();
        }
        session
    };
    let next = |session: &mut tern_model::Session, logits: &[f32]| {
        let mut after = vec![0.0; vocab];
        model
            .forward(session, &[argmax(logits)], &mut after)
            .unwrap();
        after
    };
    let alone: Vec<(Vec<f32>, Vec<f32>)> = (0..history.len())
        .map(|i| {
            let mut session = fresh(i);
            let mut logits = vec![0.0; vocab];
            model
                .forward(&mut session, &prompt(i)[history[i]..], &mut logits)
                .unwrap();
            let after = next(&mut session, &logits);
            (logits, after)
        })
        .collect();
    let mut sessions: Vec<_> = (0..history.len()).map(fresh).collect();
    let tokens: Vec<Vec<u32>> = (0..history.len())
        .map(|i| prompt(i)[history[i]..].to_vec())
        .collect();
    let mut logits = vec![vec![0.0; vocab]; history.len()];
    let mut steps: Vec<(&mut tern_model::Session, &[u32], &mut [f32])> = sessions
        .iter_mut()
        .zip(&tokens)
        .zip(logits.iter_mut())
        .map(|((s, t), l)| (s, &t[..], &mut l[..]))
        .collect();
    model.forward_many(&mut steps).unwrap();
    for (i, session) in sessions.iter_mut().enumerate() {
        assert_eq!(session.n_ctx(), n_ctx);
        assert!(
            bits(&[logits[i].clone()]) == bits(&[alone[i].0.clone()]),
            "session {i}'s logits differ in a step beside others"
        );
        let after = next(session, &logits[i]);
        assert!(
            bits(&[after]) == bits(&[alone[i].1.clone()]),
            "session {i}'s cache differs after a step beside others"
        );
    }
    // A session given more tokens than it holds fails the whole step before anything runs.
    let mut small = model.new_session(4).unwrap();
    let mut other = model.new_session(8).unwrap();
    let (mut a, mut b) = (vec![0.0; vocab], vec![0.0; vocab]);
    let mut bad: Vec<(&mut tern_model::Session, &[u32], &mut [f32])> = vec![
        (&mut other, &[1, 2][..], &mut a[..]),
        (&mut small, &[1, 2, 3, 4, 5][..], &mut b[..]),
    ];
    assert!(model.forward_many(&mut bad).is_err());
    assert_eq!((small.tokens.len(), other.tokens.len()), (0, 0));
}

/// `runs` runs of one request while three threads run random conversations on the same
/// model give one output, the one it gives alone.
pub fn one_request_among_random_load_gives_one_output(model: Arc<Model>, runs: usize) {
    let vocab = model.config().n_vocab;
    let request = Conversation {
        prompt: (0..12).map(|i| (i * 41 % vocab) as u32).collect(),
        pieces: vec![12],
        decode: 6,
        pauses: Vec::new(),
    };
    let want = bits(&request.run(&model));
    let stop = Arc::new(AtomicBool::new(false));
    // Random load: three threads running random conversations the whole time.
    let load: Vec<_> = (0..3)
        .map(|t| {
            let (model, stop) = (model.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0xbad_10ad + t);
                while !stop.load(Ordering::Relaxed) {
                    Conversation::random(&mut rng, vocab).run(&model);
                }
            })
        })
        .collect();
    let mut outputs = std::collections::HashSet::new();
    for _ in 0..runs {
        outputs.insert(bits(&request.run(&model)));
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.join().unwrap();
    }
    assert_eq!(outputs.len(), 1, "{} different outputs", outputs.len());
    assert!(outputs.contains(&want));
}
