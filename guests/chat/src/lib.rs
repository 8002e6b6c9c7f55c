//! The chat actor: everything conversational lives here, in the sandbox; the host only runs
//! the model's forward pass.
//!
//! Messages:
//! - a JSON object `{"config": {...}}` sets the model and sampling (see [`Config`]) and
//!   starts a new conversation;
//! - any other text is the user's next turn. The actor renders the whole conversation with
//!   the model's chat template, feeds the session only the tokens it has not seen, samples
//!   with its own seeded PRNG, and emits text as tokens are generated, until the model's
//!   end-of-turn token or the token limit.

use serde::{Deserialize, Serialize};
use tern_guest::{
    Actor, Candidate, Error, Model, Sampler, SamplerConfig, Session, emit, export_actor,
};

/// Settings sent as `{"config": {...}}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    model: String,
    seed: u64,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    /// Most tokens generated per turn.
    max_tokens: usize,
    /// Positions in the session (prompt and replies, all turns).
    context: u32,
    system: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            model: "default".into(),
            seed: 0,
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            max_tokens: 256,
            context: 4096,
            system: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
struct Turn {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct Command {
    config: Config,
}

/// A conversation on one model.
struct Conversation {
    config: Config,
    model: Model,
    session: Session,
    sampler: Sampler,
    vocab: usize,
    end_tokens: Vec<u32>,
    history: Vec<Turn>,
    /// Tokens in the session, mirrored here to find what must be fed.
    tokens: Vec<u32>,
    logits: Vec<f32>,
}

#[derive(Default)]
struct Chat {
    conversation: Option<Conversation>,
}

impl Conversation {
    fn start(config: Config) -> Result<Conversation, Error> {
        let model = Model::open(&config.model)?;
        let info: serde_json::Value = serde_json::from_str(&model.info_json()?)
            .map_err(|e| Error::guest(format!("model_info: {e}")))?;
        let vocab = info["vocab_size"]
            .as_u64()
            .ok_or_else(|| Error::guest("model_info lacks vocab_size"))?
            as usize;
        let end_tokens = ["eot", "eos"]
            .iter()
            .filter_map(|k| info[k].as_u64())
            .map(|t| t as u32)
            .collect();
        let session = model.session(config.context, vocab)?;
        let sampler = Sampler::new(
            SamplerConfig {
                temperature: config.temperature,
                top_k: config.top_k,
                top_p: config.top_p,
                min_p: config.min_p,
                repeat_penalty: config.repeat_penalty,
                repeat_last_n: 64,
            },
            config.seed,
        );
        let mut history = Vec::new();
        if let Some(system) = &config.system {
            history.push(Turn {
                role: "system".into(),
                content: system.clone(),
            });
        }
        Ok(Conversation {
            config,
            model,
            session,
            sampler,
            vocab,
            end_tokens,
            history,
            tokens: Vec::new(),
            logits: vec![0.0; vocab],
        })
    }

    /// Brings the session to `prompt`, reusing the longest common prefix, and leaves the
    /// next token's logits in `self.logits`.
    fn feed(&mut self, prompt: &[u32]) -> Result<(), Error> {
        let mut common = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        if common == prompt.len() {
            common -= 1; // re-run the last token to get its logits
        }
        self.session.rewind(common)?;
        self.tokens.truncate(common);
        self.session.forward(&prompt[common..], &mut self.logits)?;
        self.tokens.extend_from_slice(&prompt[common..]);
        Ok(())
    }

    fn turn(&mut self, user: &str) -> Result<(), Error> {
        self.history.push(Turn {
            role: "user".into(),
            content: user.to_string(),
        });
        let json = serde_json::to_string(&self.history).map_err(|e| Error::guest(e.to_string()))?;
        let prompt = self.model.tokenize(&self.model.render_chat(&json)?)?;
        if prompt.is_empty() || prompt.len() >= self.config.context as usize {
            self.history.pop();
            return Err(Error::guest(format!(
                "the conversation is {} tokens; the session holds {}",
                prompt.len(),
                self.config.context
            )));
        }
        self.feed(&prompt)?;
        let mut reply = Vec::new();
        let mut pending = Vec::new();
        // Greedy decoding asks the host for the top logit only (on a GPU the logits then
        // never leave it); anything else samples from all of them, once per token as always.
        let greedy = self.sampler.is_greedy();
        let mut top = [Candidate::default()];
        let mut selected = None;
        for _ in 0..self.config.max_tokens {
            let token = match selected.take() {
                Some(token) => token,
                None => self.sampler.sample(&mut self.logits, &self.tokens),
            };
            if self.end_tokens.contains(&token) || token as usize >= self.vocab {
                break;
            }
            pending.extend(self.model.detokenize(&[token])?);
            let valid = utf8_prefix(&pending);
            emit(&pending[..valid])?;
            reply.extend(pending.drain(..valid));
            if self.tokens.len() + 1 >= self.config.context as usize {
                break;
            }
            if greedy {
                self.session.forward_top(&[token], None, &mut top)?;
                selected = Some(top[0].token);
            } else {
                self.session.forward(&[token], &mut self.logits)?;
            }
            self.tokens.push(token);
        }
        emit(&pending)?;
        reply.extend(pending);
        emit(b"\n")?;
        let content = String::from_utf8_lossy(&reply).into_owned();
        self.history.push(Turn {
            role: "assistant".into(),
            content,
        });
        Ok(())
    }
}

/// Length of the longest prefix of `bytes` that is complete UTF-8 (invalid bytes count as
/// complete, so they are passed on rather than held forever).
fn utf8_prefix(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => bytes.len(),
    }
}

impl Actor for Chat {
    fn on_message(&mut self, message: &[u8]) -> Result<(), Error> {
        let text =
            std::str::from_utf8(message).map_err(|_| Error::guest("messages must be UTF-8"))?;
        if text.trim_start().starts_with('{')
            && let Ok(command) = serde_json::from_str::<Command>(text)
        {
            self.conversation = Some(Conversation::start(command.config)?);
            return Ok(());
        }
        if self.conversation.is_none() {
            self.conversation = Some(Conversation::start(Config::default())?);
        }
        self.conversation
            .as_mut()
            .expect("started above")
            .turn(text)
    }
}

export_actor!(Chat);
