//! The OpenAI-compatible routes: `GET /v1/models`, `POST /v1/chat/completions` and
//! `POST /v1/completions`, served by actors of the bundled `chat` guest.
//!
//! Which actor serves a request:
//! - with `X-Tern-Session: ID`, that session's actor: a durable actor made on the session's
//!   first request, kept across idle time (passivated) and restarts. The client sends the
//!   whole conversation as always; the actor keeps its KV cache, so a turn prefills only
//!   the tokens it has not seen.
//! - without it, with prefix reuse on, a fork of the cached actor whose conversation the
//!   request extends (its messages begin with that actor's messages and reply), else a
//!   fresh actor. The actor that answered is cached for the next turn (a few per server,
//!   least recently used first out).
//!
//! `n` choices are served by prefilling the prompt once, forking the actor after it and
//! generating each choice in its own fork, with seeds `seed`, `seed + 1`, ...
//!
//! The guest does the conversational work (template, sampling, stop sequences) and frames
//! its reply as JSON lines (`{"text": ...}`, then `{"finish": ...}` with token counts); this
//! module turns them into OpenAI's JSON or its server-sent events (`data: {...}` chunks,
//! then `data: [DONE]`). An unsupported field is a 400 naming it, never ignored.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::ApiError;
use crate::actors::{ActorHandle, Birth, Delivered, Job, lock, now_ms, random_bytes, random_hex};
use crate::auth::Client;
use crate::metrics::Metrics;
use crate::routes::{AppState, body_bytes};

/// The guest that serves these routes.
const CHAT_GUEST: &str = "chat";
/// The most choices one request may ask for.
const MAX_CHOICES: u64 = 8;
/// The most stop sequences one request may give.
const MAX_STOPS: usize = 4;
/// Tokens generated when a request sets no limit: the session's end comes first.
const UNLIMITED_TOKENS: u64 = 1 << 20;
/// The header that names a durable session.
pub const SESSION_HEADER: &str = "x-tern-session";

/// The routes' own state: sessions and the prefix cache.
pub struct OpenAi {
    /// Session ids to actor ids.
    sessions: Mutex<HashMap<String, String>>,
    /// Held while a session's actor is made, so that two first requests make one actor.
    making: tokio::sync::Mutex<()>,
    cache: Mutex<PrefixCache>,
    /// Whether stateless requests continue in forks of cached actors.
    pub prefix_reuse: bool,
}

impl OpenAi {
    pub fn new(prefix_reuse: bool, cache_actors: usize) -> OpenAi {
        OpenAi {
            sessions: Mutex::default(),
            making: tokio::sync::Mutex::default(),
            cache: Mutex::new(PrefixCache {
                capacity: cache_actors,
                entries: Vec::new(),
                clock: 0,
            }),
            prefix_reuse: prefix_reuse && cache_actors > 0,
        }
    }

    /// Takes the least recently used cached actor out of the cache (for the caller to
    /// delete), to make room on the host.
    pub fn evict_one(&self) -> Option<Arc<ActorHandle>> {
        let mut cache = lock(&self.cache);
        let entry = cache.entries.pop()?;
        Some(entry.actor)
    }

    /// Brings back a session's actor at recovery.
    pub fn recover_session(&self, owner: Option<&str>, session: &str, actor: String) {
        lock(&self.sessions).insert(scoped(owner, session), actor);
    }

    /// The actor this server knows for the session named by `scoped`.
    pub(crate) fn local_session(&self, scoped: &str) -> Option<String> {
        lock(&self.sessions).get(scoped).cloned()
    }
}

/// Actors kept after answering a stateless request, by the conversation they hold.
struct PrefixCache {
    capacity: usize,
    entries: Vec<CacheEntry>,
    clock: u64,
}

struct CacheEntry {
    /// [`conversation_key`] of the messages the actor holds, its reply included.
    key: u64,
    actor: Arc<ActorHandle>,
    used: u64,
}

impl PrefixCache {
    /// The actor holding the longest prefix of `messages` (on `model`), if any.
    fn find(&mut self, model: &str, messages: &[Value]) -> Option<Arc<ActorHandle>> {
        self.clock += 1;
        let clock = self.clock;
        let keys = prefix_keys(model, messages);
        keys.iter().rev().find_map(|&key| {
            let entry = self.entries.iter_mut().find(|e| e.key == key)?;
            entry.used = clock;
            Some(entry.actor.clone())
        })
    }

    /// Keeps `actor` under `key`; returns the actors that no longer fit (to delete).
    fn insert(&mut self, key: u64, actor: Arc<ActorHandle>) -> Vec<Arc<ActorHandle>> {
        self.clock += 1;
        let mut out: Vec<_> = self
            .entries
            .iter()
            .position(|e| e.key == key)
            .map(|i| self.entries.swap_remove(i).actor)
            .into_iter()
            .collect();
        self.entries.push(CacheEntry {
            key,
            actor,
            used: self.clock,
        });
        self.entries.sort_by_key(|e| std::cmp::Reverse(e.used));
        while self.entries.len() > self.capacity {
            out.extend(self.entries.pop().map(|e| e.actor));
        }
        out
    }
}

/// `name` in `owner`'s namespace: clients never share sessions or cached conversations.
fn scoped(owner: Option<&str>, name: &str) -> String {
    format!("{}\u{0}{name}", owner.unwrap_or(""))
}

/// A hash of a conversation on a model. A collision costs only speed: the guest compares
/// the tokens it holds with the prompt and keeps only the common prefix.
fn conversation_key(model: &str, messages: &[Value]) -> u64 {
    prefix_keys(model, messages)
        .last()
        .copied()
        .unwrap_or_default()
}

/// [`conversation_key`] of every non-empty prefix of `messages`, shortest first, hashing
/// each message once.
fn prefix_keys(model: &str, messages: &[Value]) -> Vec<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    model.hash(&mut h);
    messages
        .iter()
        .map(|m| {
            m["role"].as_str().hash(&mut h);
            m["content"].as_str().hash(&mut h);
            h.finish()
        })
        .collect()
}

/// `GET /v1/models`.
pub async fn models(State(s): State<Arc<AppState>>) -> Response {
    let created = now_ms() / 1000;
    let data: Vec<Value> = s
        .runtime
        .models()
        .names()
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": created, "owned_by": "tern"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// Chat (messages, rendered with the model's template) or text completion (a raw prompt).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(s): State<Arc<AppState>>,
    Extension(client): Extension<Client>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    complete(s, client, headers, body, Kind::Chat).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(s): State<Arc<AppState>>,
    Extension(client): Extension<Client>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    complete(s, client, headers, body, Kind::Text).await
}

/// A request, checked, in the guest's terms.
struct Plan {
    kind: Kind,
    model: String,
    /// The chat messages as the guest takes them (`role`, `content`).
    messages: Vec<Value>,
    prompt: Option<String>,
    n: u64,
    seed: u64,
    temperature: f64,
    top_p: f64,
    max_tokens: u64,
    stop: Vec<String>,
    /// llama-server's extension: generate `max_tokens` whatever comes.
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
    session: Option<String>,
    /// The client that sent it: its actors and cached conversations are its own.
    owner: Option<String>,
    /// When the request arrived (for the time to its first token).
    arrived: Instant,
}

impl Plan {
    /// The model's name in the client's namespace, for the prefix cache.
    fn scope(&self) -> String {
        scoped(self.owner.as_deref(), &self.model)
    }
}

impl Plan {
    /// The guest's `{"request": ...}` for choice `index` (`max_tokens` 0: prefill only).
    fn guest_request(&self, index: u64, max_tokens: u64) -> Vec<u8> {
        let mut request = json!({
            "model": self.model,
            "seed": self.seed.wrapping_add(index),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": max_tokens,
            "stop": self.stop,
            "ignore_eos": self.ignore_eos,
        });
        match &self.prompt {
            Some(prompt) => request["prompt"] = json!(prompt),
            None => request["messages"] = json!(self.messages),
        }
        json!({ "request": request }).to_string().into_bytes()
    }
}

async fn complete(
    s: Arc<AppState>,
    client: Client,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let mut plan = plan(&s, &headers, &body, kind)?;
    plan.owner = client.name();
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        random_hex(12)?
    );
    let head = Head {
        id,
        kind,
        created: now_ms() / 1000,
        model: plan.model.clone(),
    };
    let (frames_tx, frames) = mpsc::unbounded_channel();
    let stream = plan.stream;
    let include_usage = plan.include_usage;
    let n = plan.n;
    tokio::spawn(async move {
        let result = run(&s, plan, &frames_tx).await;
        let _ = frames_tx.send(Frame::Done(result));
    });
    if stream {
        let events = Events {
            frames,
            head,
            include_usage,
            started: vec![false; n as usize],
            tail: Default::default(),
            done: false,
        };
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    collect(frames, head, n).await
}

/// What a request's run reports to its response.
enum Frame {
    Text(u64, String),
    Finish(u64, &'static str),
    Done(Result<Outcome, ApiError>),
}

/// Token counts and where the reply came from.
struct Outcome {
    usage: Usage,
    actor: String,
    durable: bool,
}

#[derive(Clone, Copy, Default)]
struct Usage {
    prompt: u64,
    cached: u64,
    completion: u64,
}

impl Usage {
    fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

/// The fields every response object repeats.
struct Head {
    id: String,
    kind: Kind,
    created: u64,
    model: String,
}

impl Head {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn wrap(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": Value::Null,
            "choices": choices,
        })
    }

    /// A streamed choice's piece: a delta for chat, text for completions.
    fn piece(&self, index: u64, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => {
                let mut delta = Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(text) = text {
                    delta.insert("content".into(), json!(text));
                }
                json!({"index": index, "delta": delta, "logprobs": Value::Null, "finish_reason": finish})
            }
            Kind::Text => json!({
                "index": index,
                "text": text.unwrap_or(""),
                "logprobs": Value::Null,
                "finish_reason": finish,
            }),
        }
    }
}

/// A whole (not streamed) response.
async fn collect(
    mut frames: mpsc::UnboundedReceiver<Frame>,
    head: Head,
    n: u64,
) -> Result<Response, ApiError> {
    let mut texts = vec![String::new(); n as usize];
    let mut finishes = vec!["stop"; n as usize];
    let outcome = loop {
        match frames.recv().await {
            Some(Frame::Text(i, text)) => texts[i as usize].push_str(&text),
            Some(Frame::Finish(i, finish)) => finishes[i as usize] = finish,
            Some(Frame::Done(result)) => break result?,
            None => return Err(ApiError::internal("the request's task stopped")),
        }
    };
    let choices = texts
        .into_iter()
        .zip(finishes)
        .enumerate()
        .map(|(index, (text, finish))| match head.kind {
            Kind::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": Value::Null,
                "finish_reason": finish,
            }),
            Kind::Text => json!({
                "index": index,
                "text": text,
                "logprobs": Value::Null,
                "finish_reason": finish,
            }),
        })
        .collect();
    let mut body = head.wrap(false, choices);
    body["usage"] = outcome.usage.json();
    let mut response = axum::Json(body).into_response();
    tern_headers(&mut response, &outcome);
    Ok(response)
}

/// Says which actor answered and whether its state was saved before the answer.
fn tern_headers(response: &mut Response, outcome: &Outcome) {
    let headers = response.headers_mut();
    if let Ok(actor) = HeaderValue::from_str(&outcome.actor) {
        headers.insert("x-tern-actor", actor);
    }
    headers.insert(
        "x-tern-durable",
        HeaderValue::from_static(if outcome.durable { "true" } else { "false" }),
    );
}

/// A streamed response: `data: {chunk}` events as the choices generate, a usage chunk
/// when asked for, then `data: [DONE]`; an error midway is a `data: {"error": ...}` event.
struct Events {
    frames: mpsc::UnboundedReceiver<Frame>,
    head: Head,
    include_usage: bool,
    /// Whether each choice's first chunk (with the role) went out.
    started: Vec<bool>,
    /// The last events, once the run is done.
    tail: std::collections::VecDeque<Event>,
    done: bool,
}

impl Events {
    fn chunk(&self, choices: Vec<Value>, usage: Option<Value>) -> Event {
        let mut chunk = self.head.wrap(true, choices);
        if self.include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        Event::default().data(chunk.to_string())
    }

    fn piece(&mut self, index: u64, text: Option<&str>, finish: Option<&str>) -> Event {
        let first = !std::mem::replace(&mut self.started[index as usize], true);
        let piece = self.head.piece(index, text, first, finish);
        self.chunk(vec![piece], None)
    }
}

impl futures_core::Stream for Events {
    type Item = Result<Event, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(this.tail.pop_front().map(Ok));
        }
        let event = match this.frames.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Frame::Text(i, text))) => this.piece(i, Some(&text), None),
            Poll::Ready(Some(Frame::Finish(i, finish))) => this.piece(i, None, Some(finish)),
            Poll::Ready(Some(Frame::Done(result))) => {
                this.done = true;
                match result {
                    Ok(outcome) if this.include_usage => {
                        let usage = this.chunk(Vec::new(), Some(outcome.usage.json()));
                        this.tail.push_back(usage);
                    }
                    Ok(_) => {}
                    Err(e) => this
                        .tail
                        .push_back(Event::default().data(e.body().to_string())),
                }
                this.tail.push_back(Event::default().data("[DONE]"));
                return Poll::Ready(this.tail.pop_front().map(Ok));
            }
        };
        Poll::Ready(Some(Ok(event)))
    }
}

/// Runs a request: finds or makes its actor, generates every choice and reports their
/// text as it comes.
async fn run(
    s: &Arc<AppState>,
    plan: Plan,
    frames: &mpsc::UnboundedSender<Frame>,
) -> Result<Outcome, ApiError> {
    let openai = &s.openai;
    let (base, reused) = match &plan.session {
        Some(session) => (
            session_actor(s, session, plan.owner.as_deref()).await?,
            true,
        ),
        None => {
            // A cached actor may be evicted (deleted) between the lookup and the fork: then
            // the conversation is prefilled fresh, with the same result.
            let forked = match cached_actor(s, &plan) {
                Some(cached) => s.fork(&cached, 1, true).await.ok(),
                None => None,
            };
            match forked.and_then(|mut forks| forks.pop()) {
                Some(fork) => (fork, false),
                None => {
                    let birth = Birth {
                        owner: plan.owner.clone(),
                        ..Birth::ephemeral(CHAT_GUEST)
                    };
                    (start_chat(s, birth).await?, false)
                }
            }
        }
    };
    // Ephemeral actors made for this request, deleted at the end unless cached.
    let mut made: Vec<Arc<ActorHandle>> = Vec::new();
    if !reused {
        made.push(base.clone());
    }
    let result = generate(s, &plan, &base, &mut made, frames).await;
    let keep = match (&result, &plan.session, openai.prefix_reuse) {
        (Ok((_, _, replier)), None, true) if plan.kind == Kind::Chat => Some(replier.clone()),
        _ => None,
    };
    for actor in &made {
        if keep.as_ref().is_none_or(|(kept, _)| kept.id != actor.id) {
            let _ = s.actors.remove(&actor.id);
        }
    }
    let (usage, durable, _) = result?;
    let m = &s.metrics;
    m.prompt_tokens.fetch_add(usage.prompt, Ordering::Relaxed);
    m.cached_tokens.fetch_add(usage.cached, Ordering::Relaxed);
    m.completion_tokens
        .fetch_add(usage.completion, Ordering::Relaxed);
    if let Some((actor, reply)) = keep {
        let mut conversation = plan.messages.clone();
        conversation.push(json!({"role": "assistant", "content": reply}));
        let key = conversation_key(&plan.scope(), &conversation);
        for old in lock(&openai.cache).insert(key, actor) {
            let _ = s.actors.remove(&old.id);
        }
    }
    Ok(Outcome {
        usage,
        actor: base.id.clone(),
        durable,
    })
}

/// The choices of `plan` on `base`: one generates on `base` itself; several prefill on
/// `base` and generate in forks of it. Returns the usage, whether `base` was saved, and the
/// actor of choice 0 with its reply.
async fn generate(
    s: &Arc<AppState>,
    plan: &Plan,
    base: &Arc<ActorHandle>,
    made: &mut Vec<Arc<ActorHandle>>,
    frames: &mpsc::UnboundedSender<Frame>,
) -> Result<(Usage, bool, (Arc<ActorHandle>, String)), ApiError> {
    if plan.n == 1 {
        let body = plan.guest_request(0, plan.max_tokens);
        let (usage, delivered, reply) = deliver(s, base, body, 0, plan.arrived, frames).await?;
        return Ok((usage, delivered.durable, (base.clone(), reply)));
    }
    let prefill = plan.guest_request(0, 0);
    let (mut usage, delivered, _) = deliver(s, base, prefill, 0, plan.arrived, frames).await?;
    let forks = s.fork(base, plan.n as usize, true).await?;
    made.extend(forks.iter().cloned());
    let runs = forks.iter().enumerate().map(|(i, actor)| {
        let body = plan.guest_request(i as u64, plan.max_tokens);
        let (s, actor, frames, arrived) = (s.clone(), actor.clone(), frames.clone(), plan.arrived);
        tokio::spawn(async move { deliver(&s, &actor, body, i as u64, arrived, &frames).await })
    });
    let runs: Vec<_> = runs.collect();
    let mut first = String::new();
    usage.completion = 0;
    for (i, run) in runs.into_iter().enumerate() {
        let (choice, _, reply) = run
            .await
            .map_err(|e| ApiError::internal(format!("a choice's task failed: {e}")))??;
        usage.completion += choice.completion;
        if i == 0 {
            first = reply;
        }
    }
    Ok((usage, delivered.durable, (forks[0].clone(), first)))
}

/// Sends one guest request and relays its framed reply as choice `index`; returns the
/// token counts, the delivery and the reply's text.
async fn deliver(
    s: &AppState,
    actor: &ActorHandle,
    body: Vec<u8>,
    index: u64,
    arrived: Instant,
    frames: &mpsc::UnboundedSender<Frame>,
) -> Result<(Usage, Delivered, String), ApiError> {
    let (stream, mut output) = mpsc::unbounded_channel();
    let (reply_tx, reply) = oneshot::channel();
    s.post(
        actor,
        Job::Message {
            body,
            stream: Some(stream),
            reply: reply_tx,
        },
    )?;
    let mut first_text = None;
    let mut lines = Lines::default();
    let mut text = String::new();
    let mut usage = Usage::default();
    let mut guest_error = None;
    while let Some(bytes) = output.recv().await {
        for line in lines.push(&bytes) {
            match parse_line(&line) {
                Line::Text(piece) => {
                    if first_text.is_none() {
                        first_text = Some(Instant::now());
                        Metrics::observe(&s.metrics.first_token, arrived.elapsed().as_secs_f64());
                    }
                    text.push_str(&piece);
                    if frames.send(Frame::Text(index, piece)).is_err() {
                        // The client left: dropping the output cancels the generation.
                        return Err(ApiError::internal("the client went away"));
                    }
                }
                Line::Finish(finish, counts) => {
                    usage = counts;
                    let _ = frames.send(Frame::Finish(index, finish));
                }
                Line::Error(message) => guest_error = Some(message),
            }
        }
    }
    let delivered = reply.await.map_err(|_| {
        ApiError::internal(format!(
            "actor `{}`'s thread stopped unexpectedly",
            actor.id
        ))
    })??;
    if delivered.reply.code != 0 {
        return Err(guest_failure(delivered.reply.code, guest_error));
    }
    if let Some(first) = first_text
        && usage.completion > 1
    {
        let per_token = first.elapsed().as_secs_f64() / (usage.completion - 1) as f64;
        Metrics::observe(&s.metrics.per_token, per_token);
    }
    Ok((usage, delivered, text))
}

/// An error the chat guest returned, by its ABI code.
fn guest_failure(code: i32, message: Option<String>) -> ApiError {
    let message = message.unwrap_or_else(|| format!("the chat actor failed with code {code}"));
    match code {
        // The host's KV memory is spoken for: retry later. (An actor's own budget is too
        // small for the session: that will not change.)
        -9 if message.contains("host's") => ApiError::busy(message, 5),
        -9 => ApiError::bad_request(message),
        // Too large, or the conversation does not fit the session.
        -10 | -100 => ApiError::bad_request(message).param("messages"),
        -12 => ApiError::internal("the request was cancelled"),
        _ => ApiError::internal(message),
    }
}

/// Splits emitted bytes into lines.
#[derive(Default)]
struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let Some(last) = self.pending.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let done: Vec<u8> = self.pending.drain(..=last).collect();
        done.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }
}

/// One line of the guest's framed reply.
enum Line {
    Text(String),
    Finish(&'static str, Usage),
    /// The guest's error report (`error: ...`).
    Error(String),
}

fn parse_line(line: &str) -> Line {
    if let Some(message) = line.strip_prefix("error: ") {
        return Line::Error(message.to_string());
    }
    let Ok(value) = serde_json::from_str::<Value>(line) else {
        return Line::Error(format!("the chat actor wrote an unexpected line: {line}"));
    };
    if let Some(text) = value["text"].as_str() {
        return Line::Text(text.to_string());
    }
    let count = |k: &str| value[k].as_u64().unwrap_or(0);
    let finish = if value["finish"] == "length" {
        "length"
    } else {
        "stop"
    };
    Line::Finish(
        finish,
        Usage {
            prompt: count("prompt_tokens"),
            cached: count("cached_tokens"),
            completion: count("completion_tokens"),
        },
    )
}

/// A new actor of the chat guest.
async fn start_chat(s: &Arc<AppState>, birth: Birth) -> Result<Arc<ActorHandle>, ApiError> {
    let (_, module) = s
        .modules
        .find(&s.runtime, CHAT_GUEST)
        .await
        .map_err(|_| ApiError::internal("the chat guest is not installed beside `tern`"))?;
    s.start_actor(module, birth).await
}

/// The cached actor the request's conversation extends, if prefix reuse is on.
fn cached_actor(s: &AppState, plan: &Plan) -> Option<Arc<ActorHandle>> {
    if !s.openai.prefix_reuse || plan.kind != Kind::Chat {
        return None;
    }
    lock(&s.openai.cache).find(&plan.scope(), &plan.messages)
}

/// The actor of `owner`'s session `session`, made on first use.
async fn session_actor(
    s: &Arc<AppState>,
    session: &str,
    owner: Option<&str>,
) -> Result<Arc<ActorHandle>, ApiError> {
    let key = scoped(owner, session);
    let _making = s.openai.making.lock().await;
    let known = lock(&s.openai.sessions).get(&key).cloned();
    if let Some(actor) = known.and_then(|id| s.actors.get(&id).ok()) {
        return Ok(actor);
    }
    // In a cluster the session may have been made on another node.
    let mut replace = false;
    if let Some(cluster) = &s.cluster
        && let Some(id) = cluster
            .session_actor(&key)
            .await
            .map_err(crate::cluster::route::cluster_error)?
    {
        match s.activate(&id).await {
            Ok(actor) => {
                lock(&s.openai.sessions).insert(key, id);
                return Ok(actor);
            }
            Err(e) if e.status == StatusCode::NOT_FOUND => replace = true,
            Err(e) => return Err(e),
        }
    }
    let birth = Birth {
        session: Some(session.to_string()),
        owner: owner.map(String::from),
        ..Birth::fresh(CHAT_GUEST)
    };
    let mut actor = start_chat(s, birth).await?;
    if let Some(cluster) = &s.cluster {
        let bound = cluster
            .bind_session(&key, &actor.id, replace)
            .await
            .map_err(crate::cluster::route::cluster_error)?;
        if bound != actor.id {
            // Another node made the session's actor meanwhile: that one serves it.
            let _ = s.actors.remove(&actor.id);
            actor = s.activate(&bound).await?;
        }
    }
    lock(&s.openai.sessions).insert(key, actor.id.clone());
    Ok(actor)
}

/// The scoped name of a request's session (its client's and the `X-Tern-Session`
/// header's), if it names one.
pub(crate) fn request_session(headers: &HeaderMap, client: Option<&str>) -> Option<String> {
    session(headers)
        .ok()
        .flatten()
        .map(|name| scoped(client, &name))
}

/// Checks a request and turns it into a [`Plan`]; any field this server does not support
/// (or supports only at its default) is a 400 naming it.
fn plan(s: &AppState, headers: &HeaderMap, body: &[u8], kind: Kind) -> Result<Plan, ApiError> {
    let mut fields = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => fields,
        Ok(_) => return Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => {
            return Err(ApiError::bad_request(format!(
                "the body is not valid JSON: {e}"
            )));
        }
    };
    let (own, required): (&[&str], &str) = match kind {
        Kind::Chat => (
            &["messages", "max_completion_tokens", "response_format"],
            "messages",
        ),
        Kind::Text => (&["prompt", "echo", "best_of", "suffix"], "prompt"),
    };
    const COMMON: &[&str] = &[
        "model",
        "stream",
        "stream_options",
        "seed",
        "temperature",
        "top_p",
        "max_tokens",
        "n",
        "stop",
        "user",
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
        "ignore_eos",
    ];
    if let Some(field) = fields
        .keys()
        .find(|k| !COMMON.contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        return Err(
            ApiError::bad_request(format!("the field `{field}` is not supported")).param(field),
        );
    }
    // Accepted only at their defaults (null counts as absent).
    fields.retain(|_, v| !v.is_null());
    for (field, default) in [
        ("frequency_penalty", json!(0)),
        ("presence_penalty", json!(0)),
        ("logprobs", json!(false)),
        ("echo", json!(false)),
        ("best_of", json!(1)),
        ("response_format", json!({"type": "text"})),
    ] {
        if let Some(v) = fields.get(field)
            && !same_value(v, &default)
            && !(field == "logprobs" && v == &json!(0))
        {
            return Err(ApiError::bad_request(format!(
                "`{field}` is supported only at its default, {default}"
            ))
            .param(field));
        }
    }
    if fields.contains_key("suffix") {
        return Err(ApiError::bad_request("`suffix` is not supported").param("suffix"));
    }
    let model = match fields.get("model") {
        None => "default".to_string(),
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(ApiError::bad_request("`model` must be a string").param("model")),
    };
    let names = s.runtime.models().names();
    let model = if model == "default" {
        names.first().cloned().unwrap_or(model)
    } else {
        model
    };
    if !s.runtime.models().contains(&model) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!(
                "no model `{model}`; this server offers {}",
                s.runtime.models().offered()
            ),
        )
        .param("model"));
    }
    if !fields.contains_key(required) {
        return Err(ApiError::bad_request(format!("`{required}` is required")).param(required));
    }
    let (messages, prompt) = match kind {
        Kind::Chat => (messages(&fields["messages"])?, None),
        Kind::Text => (Vec::new(), Some(prompt(&fields["prompt"])?)),
    };
    let stream = flag(&fields, "stream")?;
    let ignore_eos = flag(&fields, "ignore_eos")?;
    let include_usage = match fields.get("stream_options") {
        None => false,
        Some(Value::Object(o)) if o.keys().all(|k| k == "include_usage") => {
            if !stream {
                return Err(
                    ApiError::bad_request("`stream_options` needs `stream: true`")
                        .param("stream_options"),
                );
            }
            o.get("include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "`stream_options` takes only `include_usage` (a boolean)",
            )
            .param("stream_options"));
        }
    };
    let n = integer(&fields, "n", 1, MAX_CHOICES)?.unwrap_or(1);
    let seed = match fields.get("seed") {
        None => u64::from_le_bytes(random_bytes()?),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|i| i as u64))
            .ok_or_else(|| ApiError::bad_request("`seed` must be an integer").param("seed"))?,
    };
    let temperature = number(&fields, "temperature", 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = number(&fields, "top_p", 0.0, 1.0)?.unwrap_or(1.0);
    if top_p <= 0.0 {
        return Err(ApiError::bad_request("`top_p` must be above 0").param("top_p"));
    }
    let max_tokens = match integer(&fields, "max_completion_tokens", 1, u32::MAX.into())? {
        Some(max) => Some(max),
        None => integer(&fields, "max_tokens", 1, u32::MAX.into())?,
    }
    .unwrap_or(UNLIMITED_TOKENS);
    let stop = match fields.get("stop") {
        None => Vec::new(),
        Some(Value::String(stop)) => vec![stop.clone()],
        Some(Value::Array(stops))
            if stops.len() <= MAX_STOPS && stops.iter().all(Value::is_string) =>
        {
            stops
                .iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        }
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "`stop` is a string or up to {MAX_STOPS} strings"
            ))
            .param("stop"));
        }
    };
    if let Some(user) = fields.get("user")
        && !user.is_string()
    {
        return Err(ApiError::bad_request("`user` must be a string").param("user"));
    }
    Ok(Plan {
        kind,
        model,
        messages,
        prompt,
        n,
        seed,
        temperature,
        top_p,
        max_tokens,
        stop,
        ignore_eos,
        stream,
        include_usage,
        session: session(headers)?,
        owner: None,
        arrived: Instant::now(),
    })
}

/// Whether `v` equals `default` (numbers compared as numbers).
fn same_value(v: &Value, default: &Value) -> bool {
    match (v.as_f64(), default.as_f64()) {
        (Some(a), Some(b)) => a == b,
        _ => v == default,
    }
}

fn flag(fields: &Map<String, Value>, field: &str) -> Result<bool, ApiError> {
    match fields.get(field) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::bad_request(format!("`{field}` must be a boolean")).param(field)),
    }
}

fn integer(
    fields: &Map<String, Value>,
    field: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, ApiError> {
    let Some(v) = fields.get(field) else {
        return Ok(None);
    };
    match v.as_u64() {
        Some(i) if (min..=max).contains(&i) => Ok(Some(i)),
        _ => Err(ApiError::bad_request(format!(
            "`{field}` must be an integer from {min} to {max}"
        ))
        .param(field)),
    }
}

fn number(
    fields: &Map<String, Value>,
    field: &str,
    min: f64,
    max: f64,
) -> Result<Option<f64>, ApiError> {
    let Some(v) = fields.get(field) else {
        return Ok(None);
    };
    match v.as_f64() {
        Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
        _ => Err(
            ApiError::bad_request(format!("`{field}` must be a number from {min} to {max}"))
                .param(field),
        ),
    }
}

/// Chat messages in the guest's shape: `system` (or `developer`), `user` and `assistant`
/// turns whose content is a string or text parts.
fn messages(value: &Value) -> Result<Vec<Value>, ApiError> {
    let bad = |i: usize, what: String| {
        ApiError::bad_request(format!("messages[{i}]: {what}")).param(format!("messages[{i}]"))
    };
    let Some(list) = value.as_array().filter(|l| !l.is_empty()) else {
        return Err(
            ApiError::bad_request("`messages` must be a non-empty array").param("messages"),
        );
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let Some(m) = m.as_object() else {
                return Err(bad(i, "must be an object".into()));
            };
            if let Some(k) = m
                .keys()
                .find(|k| !["role", "content", "name"].contains(&k.as_str()))
            {
                return Err(bad(i, format!("the field `{k}` is not supported")));
            }
            let role = match m.get("role").and_then(Value::as_str) {
                Some("developer") => "system",
                Some(role @ ("system" | "user" | "assistant")) => role,
                Some(role) => return Err(bad(i, format!("the role `{role}` is not supported"))),
                None => return Err(bad(i, "`role` is required".into())),
            };
            let content = match m.get("content") {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                        (Some("text"), Some(text)) => Ok(text),
                        _ => Err(bad(i, "only text content parts are supported".into())),
                    })
                    .collect::<Result<String, _>>()?,
                _ => return Err(bad(i, "`content` must be a string or text parts".into())),
            };
            Ok(json!({"role": role, "content": content}))
        })
        .collect()
}

/// A completion's prompt: a string (or an array holding one).
fn prompt(value: &Value) -> Result<String, ApiError> {
    match value {
        Value::String(p) => Ok(p.clone()),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            Ok(a[0].as_str().unwrap_or("").into())
        }
        _ => Err(ApiError::bad_request(
            "`prompt` must be a string (token arrays and batches are not supported)",
        )
        .param("prompt")),
    }
}

/// The session a request names, checked: 1 to 128 of `A-Z a-z 0-9 . _ : -`.
fn session(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(SESSION_HEADER) else {
        return Ok(None);
    };
    let ok = |id: &str| {
        (1..=128).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
    };
    match value.to_str() {
        Ok(id) if ok(id) => Ok(Some(id.to_string())),
        _ => Err(ApiError::bad_request(
            "`X-Tern-Session` must be 1 to 128 of A-Z, a-z, 0-9, `.`, `_`, `:` and `-`",
        )
        .param("X-Tern-Session")),
    }
}
