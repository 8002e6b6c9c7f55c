//! Batched steps on the CPU are batch-invariant: a conversation gives the same logits, bit
//! for bit, alone, in one step beside other sequences, and among up to 63 other
//! conversations whose forward passes the step scheduler gathers with its own.

// The GPU tests' helpers; this file uses a few of them.
#[allow(dead_code, unused_macros)]
mod common;
#[path = "common/conversations.rs"]
mod conversations;

use std::sync::Arc;

use common::{Rng, bits, model_file};
use conversations::{
    Conversation, alone_and_together, one_request_among_random_load_gives_one_output,
    one_step_gives_each_session_its_own_bits,
};
use tern_model::llama::cpu::{KvCache, Seq};
use tern_model::quant::DType;
use tern_model::{Model, Precision};

fn tiny(precision: Precision) -> Model {
    let path = model_file("tiny", DType::Q4_1, DType::Q8_0);
    Model::open("tiny", &path, 2)
        .unwrap()
        .with_precision(precision)
}

#[test]
fn conversations_get_the_same_bits_alone_and_among_up_to_63_others() {
    for precision in [Precision::Reference, Precision::Fast] {
        let model = tiny(precision);
        let vocab = model.config().n_vocab;
        let mut rng = Rng(0x5eed_0001);
        for others in [1, 7, 63] {
            let conversations: Vec<_> = (0..=others)
                .map(|_| Conversation::random(&mut rng, vocab))
                .collect();
            alone_and_together(&model, &conversations);
        }
    }
}

#[test]
fn one_step_through_the_model_gives_each_session_its_own_bits() {
    let model = tiny(Precision::Fast);
    one_step_gives_each_session_its_own_bits(&model, &[0, 5, 40, 100], &[30, 1, 64, 3]);
}

#[test]
fn one_step_over_several_sequences_gives_each_its_own_bits() {
    let model = tiny(Precision::Fast);
    let vocab = model.config().n_vocab;
    let prompt = |n: usize, salt: usize| -> Vec<u32> {
        (0..n).map(|i| ((i * 31 + salt) % vocab) as u32).collect()
    };
    // Sequences at different positions, with different numbers of new tokens; two of
    // them want logits.
    let history = [0usize, 5, 40, 100];
    let new = [30usize, 1, 64, 3];
    let alone: Vec<(Vec<f32>, KvCache)> = (0..4)
        .map(|i| {
            let mut cache = model.llama.new_cache(256).unwrap();
            let mut logits = vec![0.0; vocab];
            let tokens = prompt(history[i] + new[i], i);
            model
                .llama
                .forward(&mut cache, &tokens, &mut logits)
                .unwrap();
            (logits, cache)
        })
        .collect();
    let mut caches: Vec<KvCache> = (0..4)
        .map(|i| {
            let mut cache = model.llama.new_cache(256).unwrap();
            if history[i] > 0 {
                let mut logits = vec![0.0; vocab];
                let tokens = prompt(history[i], i);
                model
                    .llama
                    .forward(&mut cache, &tokens, &mut logits)
                    .unwrap();
            }
            cache
        })
        .collect();
    let mut logits = vec![vec![0.0; vocab]; 4];
    let tokens: Vec<Vec<u32>> = (0..4)
        .map(|i| prompt(history[i] + new[i], i)[history[i]..].to_vec())
        .collect();
    let mut seqs: Vec<Seq<'_>> = caches
        .iter_mut()
        .zip(logits.iter_mut())
        .zip(&tokens)
        .enumerate()
        .map(|(i, ((cache, logits), tokens))| Seq {
            cache,
            tokens,
            logits: (i != 1).then_some(&mut logits[..]),
        })
        .collect();
    model.llama.forward_batch(&mut seqs).unwrap();
    for i in 0..4 {
        if i != 1 {
            assert_eq!(
                bits(&[logits[i].clone()]),
                bits(&[alone[i].0.clone()]),
                "sequence {i}"
            );
        }
        assert_eq!(caches[i].len, history[i] + new[i]);
        assert_eq!(
            bits(&[caches[i].k.clone(), caches[i].v.clone()]),
            bits(&[alone[i].1.k.clone(), alone[i].1.v.clone()]),
            "sequence {i}'s cache"
        );
    }
    // A bad sequence fails the whole call before anything runs.
    let mut cache = model.llama.new_cache(4).unwrap();
    let mut bad = [Seq {
        cache: &mut cache,
        tokens: &[1, 2, 3, 4, 5],
        logits: None,
    }];
    assert!(model.llama.forward_batch(&mut bad).is_err());
    assert_eq!(cache.len, 0);
}

#[test]
fn a_thousand_runs_of_one_request_among_random_load_give_one_output() {
    one_request_among_random_load_gives_one_output(Arc::new(tiny(Precision::Fast)), 1000);
}
