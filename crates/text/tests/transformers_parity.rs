//! Parity with Hugging Face `transformers` on real and generated GGUF vocabularies.
//!
//! Runs only when `TERN_TEXT_FIXTURES` names a folder of `*.json` fixtures, as written by
//! `tests/parity/make_fixtures.py`, which loads GGUF files with
//! `AutoTokenizer.from_pretrained(dir, gguf_file=..)`:
//!
//! ```json
//! { "spec": { TokenizerSpec fields },
//!   "cases": [ { "text": "..", "ids": [..], "ids_special": [..], "decoded": ".." } ],
//!   "decodes": [ { "ids": [..], "text": ".." } ],
//!   "chats": [ { "name": "..", "template": "..", "bos": "..", "eos": "..", "messages": [..],
//!                "add_generation_prompt": true, "text": ".." or null, "error": null or ".." } ] }
//! ```
//!
//! Vocabularies are not committed; without the variable this test checks nothing and says so.

use std::path::Path;

use serde::Deserialize;
use tern_text::{ChatTemplate, Message, StreamDecoder, Tokenizer, TokenizerSpec};

#[derive(Deserialize)]
struct Fixture {
    spec: TokenizerSpec,
    cases: Vec<Case>,
    decodes: Vec<Decode>,
    #[serde(default)]
    chats: Vec<Chat>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    ids_special: Vec<u32>,
    decoded: String,
}

#[derive(Deserialize)]
struct Decode {
    ids: Vec<u32>,
    text: String,
}

#[derive(Deserialize)]
struct Chat {
    name: String,
    template: String,
    bos: String,
    eos: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    /// The rendered prompt, or `None` where the template raised `error`.
    text: Option<String>,
    error: Option<String>,
}

/// Counts of one fixture's checks.
#[derive(Default)]
struct Tally {
    checked: usize,
    skipped: usize,
    failures: Vec<String>,
}

impl Tally {
    fn check<T: PartialEq + std::fmt::Debug>(
        &mut self,
        what: &str,
        input: &str,
        ours: T,
        theirs: T,
    ) {
        self.checked += 1;
        if ours != theirs && self.failures.len() < 20 {
            self.failures.push(format!(
                "{what} {input:?}\n  ours:   {ours:?}\n  theirs: {theirs:?}"
            ));
        } else if ours != theirs {
            self.failures.push(String::new());
        }
    }
}

fn stream(tokenizer: &Tokenizer, ids: &[u32]) -> String {
    let mut decoder = StreamDecoder::new(tokenizer);
    let mut text = String::new();
    for &id in ids {
        text += &decoder.push(tokenizer, id).expect("ids are in range");
    }
    text + &decoder.finish()
}

/// The clock `strftime_now` reads in fixture templates: 2024-07-26 00:00 UTC, in milliseconds.
fn clock() -> i64 {
    1_721_952_000_000
}

fn run_fixture(path: &Path) -> Tally {
    let fixture: Fixture = serde_json::from_slice(&std::fs::read(path).expect("readable fixture"))
        .expect("valid fixture");
    // The stream may keep valid characters of an invalid SentencePiece byte run (see
    // `StreamDecoder`), so those ids are only checked through `decode`.
    let per_byte_runs = fixture.spec.model == "llama";
    let tokenizer = Tokenizer::from_spec(fixture.spec).expect("the spec builds");
    let n_vocab = tokenizer.vocab_size() as u32;
    let mut tally = Tally::default();
    for case in &fixture.cases {
        // transformers gives a default special token an id past the vocabulary when the
        // vocabulary lacks it; there is no such id here.
        if case
            .ids
            .iter()
            .chain(&case.ids_special)
            .any(|&id| id >= n_vocab)
        {
            tally.skipped += 1;
            continue;
        }
        tally.check(
            "encode",
            &case.text,
            tokenizer.encode(&case.text, false).ok(),
            Some(case.ids.clone()),
        );
        let special = tokenizer.encode(&case.text, true).ok();
        tally.check(
            "encode+special",
            &case.text,
            special,
            Some(case.ids_special.clone()),
        );
        tally.check(
            "decode",
            &case.text,
            tokenizer.decode(&case.ids).ok(),
            Some(case.decoded.clone()),
        );
        tally.check(
            "stream",
            &case.text,
            stream(&tokenizer, &case.ids),
            case.decoded.clone(),
        );
    }
    for decode in &fixture.decodes {
        let label = format!("{:?}", decode.ids);
        tally.check(
            "decode ids",
            &label,
            tokenizer.decode(&decode.ids).ok(),
            Some(decode.text.clone()),
        );
        if !(per_byte_runs && decode.text.contains('\u{FFFD}')) {
            tally.check(
                "stream ids",
                &label,
                stream(&tokenizer, &decode.ids),
                decode.text.clone(),
            );
        }
    }
    for chat in &fixture.chats {
        let label = format!(
            "{} {:?} {}",
            chat.name, chat.messages, chat.add_generation_prompt
        );
        let template =
            ChatTemplate::new(&chat.template, &chat.bos, &chat.eos).expect("template compiles");
        let ours = template.render(&chat.messages, chat.add_generation_prompt, &clock);
        match (&chat.text, &chat.error) {
            (Some(text), _) => tally.check(
                "chat",
                &label,
                ours.map_err(|e| e.to_string()),
                Ok(text.clone()),
            ),
            (None, Some(error)) => {
                // Ours says where the error came from around the template's own message.
                let raised = ours.as_ref().err().map(|e| e.to_string());
                let ours = match raised {
                    Some(raised) if raised.contains(error.as_str()) => Some(error.clone()),
                    other => other,
                };
                tally.check("chat error", &label, ours, Some(error.clone()));
            }
            (None, None) => panic!("chat fixture {label} has neither text nor error"),
        }
    }
    tally
}

#[test]
fn ids_and_text_match_transformers() {
    let Some(dir) = std::env::var_os("TERN_TEXT_FIXTURES") else {
        eprintln!("TERN_TEXT_FIXTURES is not set: no transformers fixtures checked");
        return;
    };
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("TERN_TEXT_FIXTURES is a folder")
        .map(|entry| entry.expect("readable folder").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no *.json fixtures in {dir:?}");
    let mut failed = 0;
    for path in &paths {
        let tally = run_fixture(path);
        eprintln!(
            "{}: {} checks, {} failed, {} cases skipped",
            path.display(),
            tally.checked,
            tally.failures.len(),
            tally.skipped
        );
        for failure in tally.failures.iter().filter(|f| !f.is_empty()) {
            eprintln!("  {failure}");
        }
        failed += tally.failures.len();
    }
    assert_eq!(failed, 0, "{failed} checks differ from transformers");
}
