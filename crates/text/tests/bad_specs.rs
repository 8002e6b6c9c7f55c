//! Inconsistent tokenizer specs are errors that say what is wrong, never panics.

mod common;

use common::{tiny_bpe_spec, tiny_spm_spec};
use tern_text::{TextError, Tokenizer, TokenizerSpec};

fn error(spec: TokenizerSpec) -> TextError {
    Tokenizer::from_spec(spec).expect_err("the spec is refused")
}

#[test]
fn empty_vocabulary() {
    let spec = TokenizerSpec {
        model: "gpt2".into(),
        ..TokenizerSpec::default()
    };
    assert!(matches!(error(spec), TextError::EmptyVocab));
}

#[test]
fn unknown_model() {
    let mut spec = tiny_bpe_spec();
    spec.model = "wordpiece".into();
    let err = error(spec);
    assert!(matches!(err, TextError::UnsupportedModel { .. }), "{err}");
    assert!(err.to_string().contains("wordpiece"), "{err}");
}

#[test]
fn merge_naming_an_unknown_token() {
    let mut spec = tiny_bpe_spec();
    spec.merges.as_mut().unwrap().push("he zzz".into());
    let err = error(spec);
    assert!(
        matches!(&err, TextError::MergeUnknownToken { rank: 11, token, .. } if token == "zzz"),
        "{err}"
    );
}

#[test]
fn malformed_merges() {
    for merge in ["hello", "a b c", ""] {
        let mut spec = tiny_bpe_spec();
        spec.merges.as_mut().unwrap().insert(0, merge.into());
        let err = error(spec);
        assert!(
            matches!(err, TextError::BadMerge { rank: 0, .. }),
            "{merge:?}: {err}"
        );
    }
}

#[test]
fn special_ids_outside_the_vocabulary() {
    let mut spec = tiny_bpe_spec();
    spec.eos = Some(271);
    let err = error(spec);
    assert!(
        matches!(
            err,
            TextError::SpecialOutOfRange {
                role: "eos",
                id: 271,
                n_vocab: 271
            }
        ),
        "{err}"
    );
}

#[test]
fn arrays_of_the_wrong_length() {
    let mut spec = tiny_bpe_spec();
    spec.token_types.as_mut().unwrap().pop();
    assert!(matches!(
        error(spec),
        TextError::LengthMismatch {
            field: "token_types",
            ..
        }
    ));
    let mut spec = tiny_spm_spec();
    spec.scores.as_mut().unwrap().push(0.0);
    assert!(matches!(
        error(spec),
        TextError::LengthMismatch {
            field: "scores",
            ..
        }
    ));
}

#[test]
fn sentencepiece_without_merges_or_scores() {
    let mut spec = tiny_spm_spec();
    spec.scores = None;
    assert!(matches!(error(spec), TextError::MissingScores));
}

#[test]
fn minimal_specs_still_work() {
    // No types, no merges, no special tokens: every byte is its own token.
    let tokens: Vec<String> = (0..=255u8)
        .map(|b| common::byte_char(b).to_string())
        .collect();
    let spec = TokenizerSpec {
        model: "gpt2".into(),
        tokens,
        ..TokenizerSpec::default()
    };
    let tokenizer = Tokenizer::from_spec(spec).unwrap();
    assert_eq!(tokenizer.encode("hi!", true).unwrap(), [104, 105, 33]);
    assert_eq!(tokenizer.decode(&[104, 105, 33]).unwrap(), "hi!");
    // A byte-level vocabulary missing bytes drops what it cannot spell, as transformers does.
    let spec = TokenizerSpec {
        model: "gpt2".into(),
        tokens: vec!["a".into()],
        ..TokenizerSpec::default()
    };
    let tokenizer = Tokenizer::from_spec(spec).unwrap();
    assert_eq!(tokenizer.encode("abc a", false).unwrap(), [0, 0]);
}
