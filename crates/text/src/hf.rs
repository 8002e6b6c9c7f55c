//! Hugging Face's tokenizer files (`tokenizer.json`, `tokenizer_config.json`) read into a
//! [`TokenizerSpec`], so a safetensors checkpoint tokenizes exactly as its GGUF conversion
//! would.
//!
//! Supported: `BPE` models with a `ByteLevel` pre-tokenizer (GPT-2, SmolLM2, Llama 3, Qwen2
//! families; the split pattern is recognized from the `Split` regex or `Digits` step) and
//! `BPE` models with `byte_fallback` and a `Metaspace`/`▁` normalizer (Llama 2, TinyLlama,
//! Mistral). Anything else is a clear [`TextError::Hf`].

use serde_json::Value;

use crate::{TextError, TokenizerSpec};

/// The tokenizer and chat template of a Hugging Face checkpoint.
pub struct HfTokenizer {
    pub spec: TokenizerSpec,
    pub chat_template: Option<String>,
}

fn bad(message: impl Into<String>) -> TextError {
    TextError::Hf {
        message: message.into(),
    }
}

/// Reads `tokenizer.json` and, when present, `tokenizer_config.json`.
pub fn from_hf_files(
    tokenizer_json: &str,
    config_json: Option<&str>,
) -> Result<HfTokenizer, TextError> {
    let tok: Value =
        serde_json::from_str(tokenizer_json).map_err(|e| bad(format!("tokenizer.json: {e}")))?;
    let config: Value = match config_json {
        Some(text) => {
            serde_json::from_str(text).map_err(|e| bad(format!("tokenizer_config.json: {e}")))?
        }
        None => Value::Null,
    };
    let model = &tok["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!(
            "tokenizer model {} (only BPE is supported)",
            model["type"]
        )));
    }
    let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is missing"))?;
    let mut tokens: Vec<Option<String>> = Vec::new();
    let mut types: Vec<i32> = Vec::new();
    let mut put = |id: u64, text: &str, kind: i32| -> Result<(), TextError> {
        let id = usize::try_from(id)
            .ok()
            .filter(|&i| i < 1 << 24)
            .ok_or_else(|| bad(format!("token id {id}")))?;
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
            types.resize(id + 1, 1);
        }
        tokens[id] = Some(text.to_string());
        types[id] = kind;
        Ok(())
    };
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("vocab entry `{text}` has no id")))?;
        let is_byte =
            byte_fallback && text.len() == 6 && text.starts_with("<0x") && text.ends_with('>');
        put(id, text, if is_byte { 6 } else { 1 })?;
    }
    for added in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (added["id"].as_u64(), added["content"].as_str()) else {
            return Err(bad("an added token lacks an id or content"));
        };
        put(
            id,
            text,
            if added["special"].as_bool().unwrap_or(false) {
                3
            } else {
                4
            },
        )?;
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| t.unwrap_or_else(|| format!("[PAD{id}]")))
        .collect();
    let merges = model["merges"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| match m {
                    Value::String(s) => Ok(s.clone()),
                    Value::Array(pair) if pair.len() == 2 => Ok(format!(
                        "{} {}",
                        pair[0].as_str().unwrap_or_default(),
                        pair[1].as_str().unwrap_or_default()
                    )),
                    other => Err(bad(format!("merge {other}"))),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let (kind, pre) = if byte_fallback {
        ("llama", None)
    } else {
        ("gpt2", Some(pre_name(&tok["pre_tokenizer"])?))
    };
    let id_of = |key: &str| -> Option<u32> {
        let v = &config[key];
        let text = v.as_str().or_else(|| v["content"].as_str())?;
        tokens.iter().position(|t| t == text).map(|i| i as u32)
    };
    let spec = TokenizerSpec {
        model: kind.to_string(),
        pre: pre.map(str::to_string),
        bos: id_of("bos_token"),
        eos: id_of("eos_token"),
        unk: id_of("unk_token"),
        pad: id_of("pad_token"),
        add_bos: config["add_bos_token"].as_bool().unwrap_or(kind == "llama"),
        add_eos: config["add_eos_token"].as_bool().unwrap_or(false),
        add_space_prefix: kind == "llama",
        scores: None,
        token_types: Some(types),
        merges,
        tokens,
    };
    let chat_template = match &config["chat_template"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t["name"].as_str() == Some("default"))
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    };
    Ok(HfTokenizer {
        spec,
        chat_template,
    })
}

/// The llama.cpp `pre` name whose split pattern this byte-level pre-tokenizer uses.
fn pre_name(pre: &Value) -> Result<&'static str, TextError> {
    let steps: Vec<&Value> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        Some(_) => vec![pre],
        None => return Err(bad("tokenizer.json has no pre_tokenizer")),
    };
    let kinds: Vec<&str> = steps.iter().filter_map(|s| s["type"].as_str()).collect();
    if !kinds.contains(&"ByteLevel") {
        return Err(bad(format!("pre-tokenizer {kinds:?} is not byte-level")));
    }
    if kinds.contains(&"Digits") {
        return Ok("smollm");
    }
    let pattern = steps
        .iter()
        .find_map(|s| s["pattern"]["Regex"].as_str())
        .unwrap_or("");
    Ok(if pattern.contains(r"\p{N}{1,3}") {
        "llama-bpe"
    } else if pattern.contains(r"\p{N}") && pattern.contains("(?i:") {
        "qwen2"
    } else {
        "default"
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tokenizer;

    const BYTE_LEVEL: &str = r#"{
      "added_tokens": [{"id": 5, "content": "<|im_end|>", "special": true}],
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true},
        {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}]},
      "model": {"type": "BPE", "byte_fallback": false,
        "vocab": {"h": 0, "i": 1, "hi": 2, "Ġ": 3, "!": 4},
        "merges": [["h", "i"]]}
    }"#;

    #[test]
    fn reads_a_byte_level_tokenizer_and_its_config() {
        let config = r#"{"eos_token": {"content": "<|im_end|>"}, "chat_template": "{{ messages[0]['content'] }}"}"#;
        let hf = from_hf_files(BYTE_LEVEL, Some(config)).unwrap();
        assert_eq!(hf.spec.model, "gpt2");
        assert_eq!(hf.spec.pre.as_deref(), Some("smollm"));
        assert_eq!(hf.spec.eos, Some(5));
        assert_eq!(hf.spec.token_types.as_ref().unwrap()[5], 3);
        assert_eq!(
            hf.chat_template.as_deref(),
            Some("{{ messages[0]['content'] }}")
        );
        let tok = Tokenizer::from_spec(hf.spec).unwrap();
        assert_eq!(tok.encode("hi!<|im_end|>", false).unwrap(), [2, 4, 5]);
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        for (json, words) in [
            (r#"{"model": {"type": "Unigram"}}"#, "only BPE"),
            (r#"{"model": {"type": "BPE"}}"#, "vocab"),
            ("not json", "tokenizer.json"),
        ] {
            let err = from_hf_files(json, None).err().unwrap().to_string();
            assert!(err.contains(words), "{err}");
        }
    }
}
