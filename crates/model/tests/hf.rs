//! A Hugging Face checkpoint (safetensors + config.json + tokenizer.json) runs like the GGUF
//! conversion of the same weights: the test converts a generated GGUF model to Hugging Face
//! layout (undoing llama.cpp's Q/K permutation, so the rotary pairs differ) and compares.

use std::path::Path;

use tern_model::Model;
use tern_model::generate::{Types, shape, write_random_llama};
use tern_model::gguf::{GgufFile, Value};
use tern_model::quant::DType;
use tern_model::safetensors::write_safetensors;

/// HF row order from llama.cpp's: `hf[h, t*half + j] = gguf[h, 2j + t]`.
fn unpermute(data: &[u8], rows: usize, cols: usize, n_head: usize) -> Vec<u8> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let row_bytes = cols * 4;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_head {
        for t in 0..2 {
            for j in 0..half {
                let (dst, src) = (h * head_dim + t * half + j, h * head_dim + 2 * j + t);
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

fn convert(gguf_path: &Path, dir: &Path) {
    let file = GgufFile::open(gguf_path).unwrap();
    let s = shape("tiny").unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in &file.tensors {
        let data = file.data(t).to_vec();
        let dims: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        let hf_name = |n: &str| -> String {
            if let Some(rest) = n.strip_prefix("blk.") {
                let (layer, what) = rest.split_once('.').unwrap();
                let what = match what {
                    "attn_norm.weight" => "input_layernorm.weight",
                    "ffn_norm.weight" => "post_attention_layernorm.weight",
                    "attn_q.weight" => "self_attn.q_proj.weight",
                    "attn_k.weight" => "self_attn.k_proj.weight",
                    "attn_v.weight" => "self_attn.v_proj.weight",
                    "attn_output.weight" => "self_attn.o_proj.weight",
                    "ffn_gate.weight" => "mlp.gate_proj.weight",
                    "ffn_up.weight" => "mlp.up_proj.weight",
                    "ffn_down.weight" => "mlp.down_proj.weight",
                    other => panic!("unexpected {other}"),
                };
                return format!("model.layers.{layer}.{what}");
            }
            match n {
                "token_embd.weight" => "model.embed_tokens.weight".into(),
                "output_norm.weight" => "model.norm.weight".into(),
                other => panic!("unexpected {other}"),
            }
        };
        let data = if t.name.ends_with("attn_q.weight") {
            unpermute(&data, dims[0], dims[1], s.n_head)
        } else if t.name.ends_with("attn_k.weight") {
            unpermute(&data, dims[0], dims[1], s.n_head_kv)
        } else {
            data
        };
        tensors.push((hf_name(&t.name), dims, data));
    }
    let refs: Vec<(&str, DType, Vec<usize>, &[u8])> = tensors
        .iter()
        .map(|(n, d, b)| (n.as_str(), DType::F32, d.clone(), b.as_slice()))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &refs).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": s.n_embd, "intermediate_size": s.n_ff, "num_attention_heads": s.n_head,
        "num_hidden_layers": s.n_layer, "num_key_value_heads": s.n_head_kv, "vocab_size": s.n_vocab,
        "max_position_embeddings": s.n_ctx, "rope_theta": s.rope_base, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .unwrap();
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        let t = t.as_str().unwrap();
        if id < 256 {
            vocab.insert(t.to_string(), id.into());
        } else {
            added.push(serde_json::json!({"id": id, "content": t, "special": true}));
        }
    }
    let tokenizer = serde_json::json!({
        "added_tokens": added,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}]},
        "model": {"type": "BPE", "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let template = file
        .get("tokenizer.chat_template")
        .and_then(Value::as_str)
        .unwrap();
    let tconfig = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), tconfig.to_string()).unwrap();
}

#[test]
fn a_safetensors_checkpoint_runs_like_its_gguf() {
    let dir = std::env::temp_dir().join(format!("tern-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gguf = dir.join("tiny.gguf");
    write_random_llama(
        &gguf,
        shape("tiny").unwrap(),
        Types {
            linear: DType::F32,
            embd: DType::F32,
        },
        3,
    )
    .unwrap();
    let hf_dir = dir.join("hf");
    std::fs::create_dir_all(&hf_dir).unwrap();
    convert(&gguf, &hf_dir);
    let a = Model::open("gguf", &gguf, 2).unwrap();
    let b = Model::open("hf", &hf_dir, 2).unwrap();
    for text in [
        "hello world",
        "<|im_start|>user\n12 apples<|im_end|>",
        "é🙂",
    ] {
        assert_eq!(
            a.tokenizer.encode(text, false).unwrap(),
            b.tokenizer.encode(text, false).unwrap(),
            "{text:?}"
        );
    }
    let ids = a
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog", false)
        .unwrap();
    let (mut sa, mut sb) = (a.new_session(64).unwrap(), b.new_session(64).unwrap());
    let vocab = a.config().n_vocab;
    let (mut la, mut lb) = (vec![0.0; vocab], vec![0.0; vocab]);
    a.forward(&mut sa, &ids, &mut la).unwrap();
    b.forward(&mut sb, &ids, &mut lb).unwrap();
    let scale = la.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = la
        .iter()
        .zip(&lb)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        worst <= 1e-4 * scale.max(1.0),
        "logits differ by {worst} (scale {scale})"
    );
    assert_eq!(
        tern_model::llama::cpu::argmax(&la),
        tern_model::llama::cpu::argmax(&lb)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn broken_checkpoints_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("tern-hf-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = Model::open("x", &dir, 1)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["MistralForCausalLM"], "model_type": "mistral"}"#,
    )
    .unwrap();
    let err = Model::open("x", &dir, 1)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("Mistral"), "{err}");
    std::fs::write(
        dir.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\xff{}",
    )
    .unwrap();
    let err = tern_model::safetensors::SafetensorsFile::open(&dir.join("model.safetensors"))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("header"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
