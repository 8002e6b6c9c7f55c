//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) on a tiny vocabulary; expected ids are
//! what `transformers` gives for the same vocabulary (see `common`).

mod common;

use common::{bpe_byte, tiny_bpe, tiny_bpe_spec};
use tern_text::{StreamDecoder, TextError, Tokenizer};

fn encode(text: &str) -> Vec<u32> {
    tiny_bpe().encode(text, false).expect("encodes")
}

#[test]
fn merges_apply_by_rank_within_words() {
    assert_eq!(encode("hello the hello"), [264, 261, 269]);
    assert_eq!(encode("hellohello"), [264, 264]);
    assert_eq!(encode("tab\there"), [119, 100, 101, 12, 260, 117, 104]);
}

#[test]
fn whitespace_runs_leave_one_space_to_the_next_word() {
    assert_eq!(encode("  the"), [35, 261]);
    assert_eq!(encode("a   b"), [100, 265, 35, 101]);
    assert_eq!(encode("the\n\n\nend"), [119, 260, 268, 13, 104, 113, 103]);
    assert_eq!(encode(" "), [35]);
    assert_eq!(encode(""), Vec::<u32>::new());
}

#[test]
fn digits_and_unicode_are_bytes() {
    // GPT-2's pattern keeps "12345" one word; only "1 2" merges.
    assert_eq!(
        encode("12345 apples"),
        [266, 54, 55, 56, 35, 100, 115, 115, 111, 104, 118]
    );
    // é is C3 A9; 😀 is F0 9F 98 80 with "ðŁ" merging its first two bytes.
    assert_eq!(
        encode("héllo 😀!"),
        [107, 198, 172, 263, 35, 267, 155, 131, 36]
    );
    assert_eq!(&encode("é")[..], [bpe_byte(0xC3), bpe_byte(0xA9)]);
}

#[test]
fn special_tokens_in_text_become_their_ids() {
    let ids = encode("<|im_start|>user\nhello<|im_end|>\n");
    assert_eq!(ids, [1, 120, 118, 104, 117, 13, 264, 2, 13]);
    // A broken special token is plain text; a user-defined token is matched too.
    let ids = encode("<|im_start|<think>x");
    assert_eq!(
        ids,
        [
            63, 127, 108, 112, 98, 118, 119, 100, 117, 119, 127, 270, 123
        ]
    );
    let tokenizer = tiny_bpe();
    assert!(tokenizer.is_control(1) && tokenizer.is_control(2));
    assert!(
        !tokenizer.is_control(270) && !tokenizer.is_control(264) && !tokenizer.is_control(99_999)
    );
}

#[test]
fn add_special_follows_the_spec() {
    let tokenizer = tiny_bpe();
    assert_eq!(tokenizer.encode("hello", true).unwrap(), [264]);
    let mut spec = tiny_bpe_spec();
    spec.add_bos = true;
    spec.add_eos = true;
    let tokenizer = Tokenizer::from_spec(spec).unwrap();
    assert_eq!(tokenizer.encode("hello", true).unwrap(), [1, 264, 2]);
    assert_eq!(tokenizer.encode("hello", false).unwrap(), [264]);
    assert_eq!(
        (tokenizer.bos(), tokenizer.eos(), tokenizer.vocab_size()),
        (Some(1), Some(2), 271)
    );
}

#[test]
fn decoding_joins_bytes_and_replaces_invalid_utf8() {
    let tokenizer = tiny_bpe();
    for text in [
        "hello the hello",
        "héllo 😀!",
        "<|im_start|>user\nhello<|im_end|>\n",
        "  a\t\n b  ",
    ] {
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    }
    assert_eq!(
        tokenizer.decode(&[262, bpe_byte(0xA9)]).unwrap(),
        "ll\u{FFFD}"
    );
    assert_eq!(tokenizer.decode(&[bpe_byte(0xF0)]).unwrap(), "\u{FFFD}");
    assert_eq!(
        tokenizer.decode(&[1, 262, 2]).unwrap(),
        "<|im_start|>ll<|im_end|>"
    );
}

#[test]
fn token_bytes_are_raw_and_may_split_characters() {
    let tokenizer = tiny_bpe();
    assert_eq!(tokenizer.token_bytes(267).unwrap(), [0xF0, 0x9F]);
    assert_eq!(tokenizer.token_bytes(269).unwrap(), b" hello");
    assert_eq!(tokenizer.token_bytes(1).unwrap(), b"<|im_start|>");
    assert_eq!(tokenizer.token_bytes(271), None);
}

#[test]
fn stream_holds_bytes_until_characters_complete() {
    let tokenizer = tiny_bpe();
    let mut stream = StreamDecoder::new(&tokenizer);
    let pieces: Vec<String> = [264, 35, 267, 155, 131, 36]
        .iter()
        .map(|&id| stream.push(&tokenizer, id).unwrap())
        .collect();
    assert_eq!(pieces, ["hello", " ", "", "", "😀", "!"]);
    assert_eq!(stream.finish(), "");
    // An unfinished character comes out as U+FFFD at the end, as `decode` gives it.
    assert_eq!(stream.push(&tokenizer, 267).unwrap(), "");
    assert_eq!(stream.finish(), "\u{FFFD}");
    assert!(matches!(
        stream.push(&tokenizer, 271),
        Err(TextError::InvalidId {
            id: 271,
            n_vocab: 271
        })
    ));
}

#[test]
fn out_of_range_ids_are_errors() {
    let tokenizer = tiny_bpe();
    let err = tokenizer.decode(&[264, 271]).unwrap_err();
    assert!(
        matches!(
            err,
            TextError::InvalidId {
                id: 271,
                n_vocab: 271
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("271"), "{err}");
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    let tokenizer = std::sync::Arc::new(tiny_bpe());
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let tokenizer = tokenizer.clone();
            std::thread::spawn(move || {
                (0..200)
                    .map(|_| tokenizer.encode("hello the hello", false).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for handle in handles {
        assert!(
            handle
                .join()
                .unwrap()
                .iter()
                .all(|ids| ids == &[264, 261, 269])
        );
    }
}

#[test]
fn encoding_stops_at_its_deadline() {
    use std::time::{Duration, Instant};
    let tokenizer = tiny_bpe();
    // Many words, and one long word: both are checked against the deadline.
    for text in ["hello the hello ".repeat(50_000), "l".repeat(200_000)] {
        let err = tokenizer
            .encode_within(&text, false, Instant::now())
            .unwrap_err();
        assert!(
            matches!(err, TextError::TimeLimit { bytes } if bytes == text.len()),
            "{err}"
        );
        let later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(
            tokenizer.encode_within(&text, false, later).unwrap(),
            tokenizer.encode(&text, false).unwrap()
        );
    }
}
