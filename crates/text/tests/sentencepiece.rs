//! SentencePiece BPE (`tokenizer.ggml.model = "llama"`) on a tiny vocabulary with byte
//! fallback; expected ids are what `transformers` gives for the same vocabulary (see `common`).

mod common;

use common::{tiny_spm, tiny_spm_spec};
use tern_text::{StreamDecoder, TextError, Tokenizer};

#[test]
fn merges_derived_from_scores() {
    let tokenizer = tiny_spm();
    assert_eq!(tokenizer.encode("hello world", false).unwrap(), [263, 268]);
    assert_eq!(
        tokenizer.encode("world hello world", false).unwrap(),
        [268, 263, 268]
    );
    // "▁w" outranks "▁▁", so the second space stays alone.
    assert_eq!(
        tokenizer.encode("hello  world", false).unwrap(),
        [263, 270, 268]
    );
    assert_eq!(tokenizer.encode("héllo", false).unwrap(), [259, 280, 262]);
}

#[test]
fn prefix_space_only_at_the_start_of_the_text() {
    let tokenizer = tiny_spm();
    // A leading space already is the prefix.
    assert_eq!(tokenizer.encode(" hello", false).unwrap(), [263]);
    assert_eq!(tokenizer.encode(" ", false).unwrap(), [270]);
    assert_eq!(tokenizer.encode("", false).unwrap(), Vec::<u32>::new());
    // Text right after a special token gets none.
    assert_eq!(
        tokenizer.encode("<s>hello</s>", false).unwrap(),
        [1, 271, 272, 262, 2]
    );
    assert_eq!(tokenizer.encode("a<unk>", false).unwrap(), [270, 279, 0]);
}

#[test]
fn unknown_characters_fall_back_to_bytes() {
    let tokenizer = tiny_spm();
    // € is E2 82 AC: byte tokens 0xE2 + 3, ...
    assert_eq!(
        tokenizer.encode("hello€!", false).unwrap(),
        [263, 229, 133, 175, 278]
    );
}

#[test]
fn bos_is_added_on_request() {
    let tokenizer = tiny_spm();
    assert_eq!(
        tokenizer.encode("hello world", true).unwrap(),
        [1, 263, 268]
    );
    assert_eq!(tokenizer.encode("", true).unwrap(), [1]);
    let mut spec = tiny_spm_spec();
    spec.add_bos = false;
    spec.add_eos = true;
    let tokenizer = Tokenizer::from_spec(spec).unwrap();
    assert_eq!(tokenizer.encode("hello", true).unwrap(), [263, 2]);
}

#[test]
fn explicit_merges_take_precedence_over_scores() {
    let mut spec = tiny_spm_spec();
    // Only "l l" and "▁ h": nothing else merges.
    spec.merges = Some(vec!["l l".into(), "▁ h".into()]);
    let tokenizer = Tokenizer::from_spec(spec).unwrap();
    assert_eq!(
        tokenizer.encode("hello", false).unwrap(),
        [259, 272, 261, 274]
    );
}

#[test]
fn decoding_strips_one_leading_space_and_fuses_bytes() {
    let tokenizer = tiny_spm();
    for (ids, text) in [
        (vec![263, 268], "hello world"),
        (vec![263, 270, 268], "hello  world"),
        (vec![263, 229, 133, 175, 278], "hello€!"),
        (vec![270], ""),
        // Special tokens decode as written; the strip only applies to a leading space.
        (vec![1, 263, 268], "<s> hello world"),
        (vec![229, 133], "\u{FFFD}\u{FFFD}"),
        (vec![229, 133, 175, 36], "€!"),
    ] {
        assert_eq!(tokenizer.decode(&ids).unwrap(), text, "{ids:?}");
    }
}

#[test]
fn token_bytes_use_spaces_and_raw_bytes() {
    let tokenizer = tiny_spm();
    assert_eq!(tokenizer.token_bytes(263).unwrap(), b" hello");
    assert_eq!(tokenizer.token_bytes(3 + 0xE2).unwrap(), [0xE2]);
    assert_eq!(tokenizer.token_bytes(1).unwrap(), b"<s>");
}

#[test]
fn stream_matches_decode() {
    let tokenizer = tiny_spm();
    for ids in [
        vec![263, 268],
        vec![263, 229, 133, 175, 278],
        vec![229, 133, 263],
        vec![1, 263, 270, 268],
    ] {
        let mut stream = StreamDecoder::new(&tokenizer);
        let mut text = String::new();
        for &id in &ids {
            text += &stream.push(&tokenizer, id).unwrap();
        }
        text += &stream.finish();
        assert_eq!(text, tokenizer.decode(&ids).unwrap(), "{ids:?}");
    }
    // "€" only comes out with its last byte.
    let mut stream = StreamDecoder::new(&tokenizer);
    let pieces: Vec<String> = [263, 229, 133, 175]
        .iter()
        .map(|&id| stream.push(&tokenizer, id).unwrap())
        .collect();
    assert_eq!(pieces, ["hello", "", "", "€"]);
}

#[test]
fn encoding_stops_at_its_deadline() {
    use std::time::{Duration, Instant};
    let tokenizer = tiny_spm();
    // The whole text is one word here.
    let text = "hello world ".repeat(20_000);
    let err = tokenizer
        .encode_within(&text, false, Instant::now())
        .unwrap_err();
    assert!(matches!(err, TextError::TimeLimit { .. }), "{err}");
    let later = Instant::now() + Duration::from_secs(3600);
    assert_eq!(
        tokenizer.encode_within(&text, false, later).unwrap(),
        tokenizer.encode(&text, false).unwrap()
    );
}
