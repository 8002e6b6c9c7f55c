//! The chat actor: everything conversational lives here, in the sandbox; the host only runs
//! the model's forward pass.
//!
//! Messages:
//! - a JSON object `{"config": {...}}` sets the model and sampling (see [`Config`]) and
//!   starts a new conversation;
//! - a JSON object `{"request": {...}}` is one self-contained request (see [`Request`]), as
//!   the server's OpenAI-compatible routes send it: the whole conversation (or a raw prompt)
//!   with its own sampling settings. Its reply is framed as JSON lines: `{"text": ...}` for
//!   each piece of text as it is generated, then one `{"finish": "stop"|"length",
//!   "prompt_tokens", "cached_tokens", "completion_tokens"}`;
//! - any other text is the user's next turn.
//!
//! Either way the actor renders the conversation with the model's chat template, feeds the
//! session only the tokens it has not seen (the longest common prefix with what the session
//! holds is kept, so a conversation that grows by a turn prefills only that turn), samples
//! with its own seeded PRNG, and emits text as tokens are generated, until the model's
//! end-of-turn token, a stop sequence or the token limit.

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

impl Config {
    fn sampler(&self) -> Sampler {
        Sampler::new(
            SamplerConfig {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                repeat_last_n: 64,
            },
            self.seed,
        )
    }
}

/// One self-contained request, sent as `{"request": {...}}`: `messages` (rendered with the
/// chat template) or `prompt` (raw text), and the settings for this reply alone. The
/// conversation's session is kept between requests, so the next request that extends it
/// prefills only what is new. `max_tokens` 0 only prefills the prompt.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Request {
    model: String,
    messages: Option<Vec<Turn>>,
    prompt: Option<String>,
    seed: u64,
    temperature: f32,
    top_p: f32,
    max_tokens: usize,
    stop: Vec<String>,
    /// Generate `max_tokens` whatever comes: an end-of-turn token is fed like any other.
    ignore_eos: bool,
}

impl Default for Request {
    fn default() -> Self {
        Request {
            model: "default".into(),
            messages: None,
            prompt: None,
            seed: 0,
            temperature: 1.0,
            top_p: 1.0,
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Turn {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
enum Command {
    #[serde(rename = "config")]
    Config(Config),
    #[serde(rename = "request")]
    Request(Request),
}

/// Why a reply ended.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Finish {
    /// The model's end-of-turn token or a stop sequence.
    Stop,
    /// The token limit or the end of the session.
    Length,
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

/// How many tokens a reply's prompt had, and how many of them the session already held.
struct Fed {
    prompt: usize,
    cached: usize,
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
        let sampler = config.sampler();
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
    fn feed(&mut self, prompt: &[u32]) -> Result<Fed, Error> {
        if prompt.is_empty() || prompt.len() >= self.config.context as usize {
            return Err(Error::guest(format!(
                "the conversation is {} tokens; the session holds {}",
                prompt.len(),
                self.config.context
            )));
        }
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
        Ok(Fed {
            prompt: prompt.len(),
            cached: common,
        })
    }

    /// The token ids of the conversation `history`, rendered for the assistant's reply.
    fn render(&self, history: &[Turn]) -> Result<Vec<u32>, Error> {
        let json = serde_json::to_string(history).map_err(|e| Error::guest(e.to_string()))?;
        self.model.tokenize(&self.model.render_chat(&json)?)
    }

    /// A turn of the interactive protocol: the reply is plain text and a newline.
    fn turn(&mut self, user: &str) -> Result<(), Error> {
        self.history.push(Turn {
            role: "user".into(),
            content: user.to_string(),
        });
        let fed = self
            .render(&self.history)
            .and_then(|prompt| self.feed(&prompt));
        if let Err(e) = fed {
            self.history.pop();
            return Err(e);
        }
        let mut out = Output::new(false, Vec::new());
        self.generate(self.config.max_tokens, false, &mut out)?;
        out.finish()?;
        emit(b"\n")?;
        self.history.push(Turn {
            role: "assistant".into(),
            content: String::from_utf8_lossy(&out.text).into_owned(),
        });
        Ok(())
    }

    /// A self-contained request: its reply is framed (see the module's documentation).
    fn request(&mut self, request: Request) -> Result<(), Error> {
        self.sampler = Config {
            seed: request.seed,
            temperature: request.temperature,
            top_k: 0,
            top_p: request.top_p,
            min_p: 0.0,
            repeat_penalty: 1.0,
            ..self.config.clone()
        }
        .sampler();
        let fed = match (&request.messages, &request.prompt) {
            (Some(messages), None) => {
                let prompt = self.render(messages)?;
                let fed = self.feed(&prompt)?;
                self.history = messages.clone();
                fed
            }
            (None, Some(text)) => {
                let prompt = self.model.tokenize(text)?;
                self.history.clear();
                self.feed(&prompt)?
            }
            _ => {
                return Err(Error::guest(
                    "a request has `messages` or `prompt`, not both",
                ));
            }
        };
        let mut out = Output::new(true, request.stop);
        let (finish, completion) = if request.max_tokens == 0 {
            (Finish::Length, 0)
        } else {
            self.generate(request.max_tokens, request.ignore_eos, &mut out)?
        };
        out.finish()?;
        let finish = serde_json::json!({
            "finish": if finish == Finish::Stop { "stop" } else { "length" },
            "prompt_tokens": fed.prompt,
            "cached_tokens": fed.cached,
            "completion_tokens": completion,
        });
        emit(format!("{finish}\n").as_bytes())?;
        if request.messages.is_some() && request.max_tokens > 0 {
            self.history.push(Turn {
                role: "assistant".into(),
                content: String::from_utf8_lossy(&out.text).into_owned(),
            });
        }
        Ok(())
    }

    /// Samples up to `max_tokens` tokens after what was fed (past end-of-turn tokens too
    /// with `ignore_eos`), passing their text to `out`; says why it stopped and how many
    /// tokens it generated.
    fn generate(
        &mut self,
        max_tokens: usize,
        ignore_eos: bool,
        out: &mut Output,
    ) -> Result<(Finish, usize), Error> {
        // Greedy decoding asks the host for the top logit only (on a GPU the logits then
        // never leave it); anything else samples from all of them, once per token as always.
        let greedy = self.sampler.is_greedy();
        let mut top = [Candidate::default()];
        let mut selected = None;
        for generated in 0..max_tokens {
            let token = match selected.take() {
                Some(token) => token,
                None => self.sampler.sample(&mut self.logits, &self.tokens),
            };
            if token as usize >= self.vocab || self.end_tokens.contains(&token) && !ignore_eos {
                return Ok((Finish::Stop, generated));
            }
            if out.push(&self.model.detokenize(&[token])?)? {
                return Ok((Finish::Stop, generated + 1));
            }
            if self.tokens.len() + 1 >= self.config.context as usize {
                return Ok((Finish::Length, generated + 1));
            }
            if greedy {
                self.session.forward_top(&[token], None, &mut top)?;
                selected = Some(top[0].token);
            } else {
                self.session.forward(&[token], &mut self.logits)?;
            }
            self.tokens.push(token);
        }
        Ok((Finish::Length, max_tokens))
    }
}

/// A reply's text on its way out: emitted as soon as it is whole UTF-8 and cannot be the
/// start of a stop sequence, plain or framed as `{"text": ...}` lines.
struct Output {
    framed: bool,
    stop: Vec<String>,
    /// The reply so far (cut before a stop sequence once one is found).
    text: Vec<u8>,
    /// How much of `text` was emitted.
    emitted: usize,
}

impl Output {
    fn new(framed: bool, stop: Vec<String>) -> Output {
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        Output {
            framed,
            stop,
            text: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token's bytes; says whether a stop sequence ended the reply.
    fn push(&mut self, bytes: &[u8]) -> Result<bool, Error> {
        self.text.extend_from_slice(bytes);
        let from = self.emitted;
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| find(&self.text[from..], s.as_bytes()))
            .min()
        {
            self.text.truncate(from + at);
            self.finish()?;
            return Ok(true);
        }
        let held = self
            .stop
            .iter()
            .map(|s| partial_suffix(&self.text[from..], s.as_bytes()))
            .max()
            .unwrap_or(0);
        let end = from + utf8_prefix(&self.text[from..self.text.len() - held]);
        if end == self.emitted && self.framed {
            // A frame for every token, even one whose text is empty or held back, as
            // streaming clients count tokens by their chunks.
            emit(b"{\"text\":\"\"}\n")?;
        }
        self.send(end)?;
        Ok(false)
    }

    /// Emits whatever is left.
    fn finish(&mut self) -> Result<(), Error> {
        self.send(self.text.len())
    }

    fn send(&mut self, end: usize) -> Result<(), Error> {
        if end <= self.emitted {
            return Ok(());
        }
        let piece = &self.text[self.emitted..end];
        if self.framed {
            let line = serde_json::json!({ "text": String::from_utf8_lossy(piece) });
            emit(format!("{line}\n").as_bytes())?;
        } else {
            emit(piece)?;
        }
        self.emitted = end;
        Ok(())
    }
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The length of the longest end of `text` that begins `stop` (shorter than `stop`).
fn partial_suffix(text: &[u8], stop: &[u8]) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.ends_with(&stop[..n]))
        .unwrap_or(0)
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
        if let Some(command) = command(text)? {
            return match command {
                Command::Config(config) => {
                    self.conversation = Some(Conversation::start(config)?);
                    Ok(())
                }
                Command::Request(request) => self.conversation(&request.model)?.request(request),
            };
        }
        self.conversation("default")?.turn(text)
    }
}

/// The command `text` holds: `None` for a user's turn, an error for an object that names a
/// command but is not a valid one (so a mistyped request is never taken for chat).
fn command(text: &str) -> Result<Option<Command>, Error> {
    if !text.trim_start().starts_with('{') {
        return Ok(None);
    }
    let Ok(serde_json::Value::Object(object)) = serde_json::from_str(text) else {
        return Ok(None);
    };
    if object.len() != 1 || !object.contains_key("config") && !object.contains_key("request") {
        return Ok(None);
    }
    serde_json::from_value(serde_json::Value::Object(object))
        .map(Some)
        .map_err(|e| Error::guest(format!("a bad command: {e}")))
}

impl Chat {
    /// The conversation on `model`, started (with the default settings) if there is none
    /// or it is on another model.
    fn conversation(&mut self, model: &str) -> Result<&mut Conversation, Error> {
        let current = self.conversation.as_ref().map(|c| c.config.model.as_str());
        let wanted = match current {
            Some(name) if model == "default" || name == model => None,
            _ => Some(model),
        };
        if let Some(model) = wanted {
            self.conversation = Some(Conversation::start(Config {
                model: model.to_string(),
                ..Config::default()
            })?);
        }
        Ok(self.conversation.as_mut().expect("started above"))
    }
}

export_actor!(Chat);
