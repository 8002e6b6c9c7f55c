//! The CPU forward pass on generated models: batch-invariant, thread-count-invariant and
//! reproducible bit for bit; every weight type runs; bad calls are clear errors.

use std::path::PathBuf;

use tern_model::Model;
use tern_model::generate::{Types, shape, write_random_llama};
use tern_model::quant::DType;

fn tiny(linear: DType, threads: usize) -> Model {
    let dir = std::env::temp_dir().join(format!("tern-forward-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path: PathBuf = dir.join(format!("tiny-{}.gguf", linear.name()));
    if !path.exists() {
        let types = Types {
            linear,
            embd: DType::Q8_0,
        };
        // Tests run in parallel: each writes its own partial file, then renames it whole.
        let partial = path.with_extension(format!("partial-{:?}", std::thread::current().id()));
        write_random_llama(&partial, shape("tiny").unwrap(), types, 7).unwrap();
        std::fs::rename(&partial, &path).unwrap();
    }
    Model::open("tiny", &path, threads).unwrap()
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 11) % 256) as u32).collect()
}

/// Runs `tokens` in the given chunk sizes; returns the last logits and the session.
fn run(model: &Model, tokens: &[u32], chunks: &[usize]) -> (Vec<f32>, tern_model::Session) {
    let mut session = model.new_session(256).unwrap();
    let mut logits = vec![0.0; model.config().n_vocab];
    let mut at = 0;
    for &n in chunks.iter().chain(std::iter::repeat(&1)) {
        if at == tokens.len() {
            break;
        }
        let n = n.min(tokens.len() - at);
        model
            .forward(&mut session, &tokens[at..at + n], &mut logits)
            .unwrap();
        at += n;
    }
    (logits, session)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn results_do_not_depend_on_batching_threads_or_runs() {
    let model = tiny(DType::Q4_1, 2);
    // More than one internal batch, and more than one block of the attention's positions.
    let tokens = prompt(200);
    let (whole, s1) = run(&model, &tokens, &[200]);
    let (chunked, s2) = run(&model, &tokens, &[7, 33, 50, 110]);
    let (single, s3) = run(&model, &tokens, &[1]);
    assert_eq!(bits(&whole), bits(&chunked));
    assert_eq!(bits(&whole), bits(&single));
    let kv = |s: &tern_model::Session| s.host_kv(&model).unwrap().into_owned();
    let (kv1, kv2, kv3) = (kv(&s1), kv(&s2), kv(&s3));
    assert_eq!(bits(&kv1.k), bits(&kv2.k));
    assert_eq!(bits(&kv1.v), bits(&kv3.v));
    let (again, _) = run(&model, &tokens, &[200]);
    assert_eq!(bits(&whole), bits(&again));
    let one_thread = tiny(DType::Q4_1, 1);
    assert_eq!(bits(&whole), bits(&run(&one_thread, &tokens, &[200]).0));
    assert!(whole.iter().all(|v| v.is_finite()));
    let spread = whole.iter().copied().fold(f32::MIN, f32::max)
        - whole.iter().copied().fold(f32::MAX, f32::min);
    assert!(
        spread > 0.1,
        "logits are flat ({spread}): the model is not doing anything"
    );
}

#[test]
fn an_f16_kv_cache_is_batch_invariant_and_half_the_size() {
    let model = tiny(DType::Q4_1, 2).with_kv_type(tern_model::KvType::F16);
    let tokens = prompt(200);
    let (whole, s1) = run(&model, &tokens, &[200]);
    let (chunked, s2) = run(&model, &tokens, &[7, 33, 50, 110]);
    let (single, _) = run(&model, &tokens, &[1]);
    assert_eq!(bits(&whole), bits(&chunked));
    assert_eq!(bits(&whole), bits(&single));
    let (kv1, kv2) = (s1.host_kv(&model).unwrap(), s2.host_kv(&model).unwrap());
    assert_eq!(kv1.kv_type(), tern_model::KvType::F16);
    assert!(kv1.k.is_empty() && kv1.k16 == kv2.k16 && kv1.v16 == kv2.v16);
    // Close to the f32 cache's logits, not equal.
    let (f32s, _) = run(&tiny(DType::Q4_1, 2), &tokens, &[200]);
    let worst = whole
        .iter()
        .zip(&f32s)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(worst > 0.0 && worst < 0.1, "{worst}");
    assert!(model.numerics().precision.contains("f16 KV cache"));
}

#[test]
fn rewinding_and_replaying_gives_the_same_logits() {
    let model = tiny(DType::Q8_0, 2);
    let tokens = prompt(30);
    let (want, mut session) = run(&model, &tokens, &[30]);
    session.rewind(12);
    assert_eq!(session.tokens.len(), 12);
    let mut logits = vec![0.0; model.config().n_vocab];
    model
        .forward(&mut session, &tokens[12..], &mut logits)
        .unwrap();
    assert_eq!(bits(&want), bits(&logits));
}

#[test]
fn every_weight_type_runs() {
    for dtype in [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
    ] {
        let (logits, _) = run(&tiny(dtype, 2), &prompt(5), &[5]);
        assert!(logits.iter().all(|v| v.is_finite()), "{dtype:?}");
    }
}

#[test]
fn bad_calls_are_clear_errors() {
    let model = tiny(DType::Q8_0, 1);
    let vocab = model.config().n_vocab;
    let mut session = model.new_session(8).unwrap();
    let mut logits = vec![0.0; vocab];
    let err = model
        .forward(&mut session, &[vocab as u32], &mut logits)
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let err = model
        .forward(&mut session, &prompt(9), &mut logits)
        .unwrap_err();
    assert!(err.to_string().contains("context full"), "{err}");
    let err = model
        .forward(&mut session, &[1], &mut logits[..10])
        .unwrap_err();
    assert!(err.to_string().contains("logits buffer"), "{err}");
    let err = model.forward(&mut session, &[], &mut logits).unwrap_err();
    assert!(err.to_string().contains("no tokens"), "{err}");
    assert!(model.new_session(0).is_err());
    assert!(model.new_session(1 << 30).is_err());
    // Nothing was appended by the failed calls.
    assert_eq!(session.tokens.len(), 0);
    model
        .forward(&mut session, &prompt(8), &mut logits)
        .unwrap();
}

#[test]
fn the_fast_path_is_batch_invariant_and_close_to_the_reference() {
    let tokens = prompt(90);
    let fast = tiny(DType::Q4_1, 2).with_precision(tern_model::Precision::Fast);
    let (whole, _) = run(&fast, &tokens, &[90]);
    let (chunked, _) = run(&fast, &tokens, &[7, 33, 50]);
    let (single, _) = run(&fast, &tokens, &[1]);
    assert_eq!(bits(&whole), bits(&chunked));
    assert_eq!(bits(&whole), bits(&single));
    let (reference, _) = run(&tiny(DType::Q4_1, 2), &tokens, &[90]);
    assert_ne!(bits(&whole), bits(&reference), "the fast path did not run");
    let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = whole
        .iter()
        .zip(&reference)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    // int8 activations carry about 0.4% relative error per block; over two layers the
    // logits stay within a few percent of their scale.
    assert!(
        worst <= 0.05 * scale,
        "fast path differs by {worst} (scale {scale})"
    );
}

#[test]
fn an_empty_session_still_knows_its_shape() {
    let model = tiny(DType::Q8_0, 1);
    let session = model.new_session(16).unwrap();
    let kv = session.host_kv(&model).unwrap();
    assert_eq!((kv.n_layer(), kv.len, kv.kv_dim()), (2, 0, 32));
}

#[test]
fn a_session_in_kept_memory_starts_zeroed_and_gives_the_same_bits() {
    let model = tiny(DType::Q4_1, 2);
    let tokens = prompt(100);
    let (first, used) = run(&model, &tokens, &[100]);
    assert!(used.host_kv(&model).unwrap().k.iter().any(|&x| x != 0.0));
    // The dropped session's memory comes back, zeroed, to the next session of its size.
    drop(used);
    let fresh = model.new_session(256).unwrap();
    let kv = fresh.host_kv(&model).unwrap();
    assert!(kv.k.iter().chain(&kv.v).all(|&x| x == 0.0));
    drop(kv);
    drop(fresh);
    let (again, _) = run(&model, &tokens, &[1]);
    assert_eq!(bits(&first), bits(&again));
    // Memory made ahead of a restore, and sizes the model refuses.
    model.keep_session_memory(256).unwrap();
    let (ahead, _) = run(&model, &tokens, &[30]);
    assert_eq!(bits(&first), bits(&ahead));
    for bad in [0, model.config().n_ctx_train + 1] {
        assert!(model.keep_session_memory(bad).is_err(), "{bad}");
    }
}
