//! HTTP requests carried between nodes over NATS request/reply, replies streamed back.
//!
//! A node sends a request for an actor it does not own to the owner's subject
//! ([`http_subject`]): the method, the URI and the headers as NATS headers, the body as the
//! payload. The owner runs it through its own router (the same key check and handlers as a
//! direct call) and answers on the request's reply inbox with a sequence of messages:
//! `head` (status and headers), numbered `body` chunks as the handler produces them (a
//! streamed reply's events as they happen), then `end`; `ping` every [`PING_EVERY`] while
//! nothing else is sent. A small reply of known length comes as one `whole` message. NATS keeps one connection's messages in order, and the numbering
//! catches a gap. The requester takes a node that says nothing for [`LOST_AFTER`] as lost:
//! a reply not yet begun becomes a 502 saying the message did not complete, a streamed one
//! ends with an `error` event (or an aborted body). A requester whose client leaves tells
//! the owner on the head's cancel subject, which drops the reply there and so cancels the
//! message at the guest's next token.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::HeaderMap;
use axum::Router;
use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tower::ServiceExt;

use crate::actors::lock;

/// How many times a request has been forwarded (a node forwards at most twice).
pub const HOP_HEADER: &str = "x-tern-hops";
/// How often a node answering a forwarded request says it is still at it.
pub const PING_EVERY: Duration = Duration::from_millis(500);
/// Silence after which the answering node is taken as lost.
pub const LOST_AFTER: Duration = Duration::from_secs(3);
/// The largest body chunk per NATS message.
const CHUNK: usize = 256 << 10;
/// Room left in a NATS message for the headers.
const HEAD_ROOM: usize = 16 << 10;

const KIND: &str = "Tern-Kind";
const STATUS: &str = "Tern-Status";
const METHOD: &str = "Tern-Method";
const URI: &str = "Tern-Uri";
const SEQ: &str = "Tern-Seq";
const CANCEL: &str = "Tern-Cancel";
const LENGTH: &str = "Tern-Length";
/// Prefix of the HTTP headers carried as NATS headers.
const HTTP: &str = "H-";

/// The subject a node answers forwarded requests on.
pub fn http_subject(node: &str) -> String {
    format!("tern.node.{node}.http")
}

/// Why a forwarded request got no reply.
#[derive(Debug)]
pub enum ForwardError {
    /// Nobody listens on the node's subject: it is gone.
    NoResponders,
    /// The node went silent before its reply began.
    Lost(String),
    /// The body does not fit in one NATS message.
    TooLarge { bytes: usize, max: usize },
    /// NATS itself failed.
    Nats(String),
}

/// HTTP headers that describe one connection, not the request: never carried.
fn hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::HOST
        || name == header::CONTENT_LENGTH
        || name == header::TRANSFER_ENCODING
        || name.as_str() == "keep-alive"
        || name.as_str() == HOP_HEADER
}

fn kind(message: &async_nats::Message) -> &str {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(KIND))
        .map_or("", |v| v.as_str())
}

fn nats_header<'a>(message: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
}

fn carry_headers(http: &axum::http::HeaderMap, nats: &mut HeaderMap) {
    for (name, value) in http {
        if hop_by_hop(name) {
            continue;
        }
        if let Ok(value) = value.to_str() {
            nats.append(format!("{HTTP}{name}"), value);
        }
    }
}

fn http_headers(message: &async_nats::Message) -> Vec<(HeaderName, HeaderValue)> {
    let Some(headers) = &message.headers else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, values) in headers.iter() {
        let name = name.to_string();
        let Some(http) = name.strip_prefix(HTTP) else {
            continue;
        };
        let Ok(http) = HeaderName::try_from(http.to_ascii_lowercase()) else {
            continue;
        };
        if hop_by_hop(&http) {
            continue;
        }
        for value in values {
            if let Ok(value) = HeaderValue::from_str(value.as_str()) {
                out.push((http.clone(), value));
            }
        }
    }
    out
}

/// The replies to this node's forwarded requests: one wildcard subscription, each
/// request's messages handed to its own channel by the last token of their subject.
pub struct Replies {
    prefix: String,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, mpsc::UnboundedSender<async_nats::Message>>>,
}

/// One request's replies; dropping it stops their delivery.
struct Waiting {
    replies: Arc<Replies>,
    id: u64,
    rx: mpsc::UnboundedReceiver<async_nats::Message>,
}

impl Waiting {
    async fn next(&mut self) -> Option<async_nats::Message> {
        self.rx.recv().await
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        lock(&self.replies.waiting).remove(&self.id);
    }
}

impl Replies {
    /// Subscribes to the replies of `client`'s forwarded requests and hands them out on
    /// the runtime `on`.
    pub(crate) async fn start(
        client: &async_nats::Client,
        on: &tokio::runtime::Handle,
    ) -> Result<Arc<Replies>, async_nats::SubscribeError> {
        let prefix = client.new_inbox();
        let mut subscription = client.subscribe(format!("{prefix}.*")).await?;
        let replies = Arc::new(Replies {
            prefix,
            next: AtomicU64::new(0),
            waiting: Mutex::default(),
        });
        let weak = Arc::downgrade(&replies);
        on.spawn(async move {
            while let Some(message) = subscription.next().await {
                let Some(replies) = weak.upgrade() else {
                    return;
                };
                let id = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|id| id.parse::<u64>().ok());
                if let Some(tx) = id.and_then(|id| lock(&replies.waiting).get(&id).cloned()) {
                    let _ = tx.send(message);
                }
            }
        });
        Ok(replies)
    }

    /// A fresh reply subject and the channel its messages arrive on.
    fn open(self: &Arc<Self>) -> (String, Waiting) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.waiting).insert(id, tx);
        let waiting = Waiting {
            replies: self.clone(),
            id,
            rx,
        };
        (format!("{}.{id}", self.prefix), waiting)
    }
}

/// Sends the request (`parts`, `body`) to `node` and returns its reply, streamed.
pub async fn forward(
    client: &async_nats::Client,
    replies: &Arc<Replies>,
    node: &str,
    parts: &Parts,
    body: Bytes,
    hops: u32,
) -> Result<Response<Body>, ForwardError> {
    let max = client.server_info().max_payload;
    if body.len() + HEAD_ROOM > max {
        return Err(ForwardError::TooLarge {
            bytes: body.len(),
            max: max.saturating_sub(HEAD_ROOM),
        });
    }
    let nats = |e: &dyn std::fmt::Display| ForwardError::Nats(e.to_string());
    let (inbox, mut replies) = replies.open();
    let mut headers = HeaderMap::new();
    headers.insert(METHOD, parts.method.as_str());
    headers.insert(URI, parts.uri.to_string());
    carry_headers(&parts.headers, &mut headers);
    headers.insert(format!("{HTTP}{HOP_HEADER}"), hops.to_string());
    client
        .publish_with_reply_and_headers(http_subject(node), inbox, headers, body)
        .await
        .map_err(|e| nats(&e))?;
    let head = loop {
        let message = match tokio::time::timeout(LOST_AFTER, replies.next()).await {
            Ok(Some(message)) => message,
            _ => {
                return Err(ForwardError::Lost(format!(
                    "node `{node}` went silent while it ran this request"
                )));
            }
        };
        if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Err(ForwardError::NoResponders);
        }
        match kind(&message) {
            "head" => break message,
            "whole" => return Ok(whole(&message)),
            "error" => {
                return Err(ForwardError::Lost(
                    String::from_utf8_lossy(&message.payload).into_owned(),
                ));
            }
            _ => continue, // ping
        }
    };
    let cancel = nats_header(&head, CANCEL).map(String::from);
    let mut builder = Response::builder().status(status_of(&head));
    // A whole reply keeps its length, so that it is not sent in chunks.
    if let Some(length) = nats_header(&head, LENGTH).and_then(|l| l.parse::<u64>().ok()) {
        builder = builder.header(header::CONTENT_LENGTH, length);
    }
    let mut events = false;
    for (name, value) in http_headers(&head) {
        if name == header::CONTENT_TYPE {
            events = value.as_bytes().starts_with(b"text/event-stream");
        }
        builder = builder.header(name, value);
    }
    let (tx, rx) = mpsc::channel(16);
    let node = node.to_string();
    tokio::spawn(async move {
        let mut next_seq = 0u64;
        let failure = loop {
            let message = match tokio::time::timeout(LOST_AFTER, replies.next()).await {
                Ok(Some(message)) => message,
                _ => break format!("node `{node}` was lost while it streamed this reply"),
            };
            match kind(&message) {
                "body" => {
                    let seq = nats_header(&message, SEQ).and_then(|s| s.parse::<u64>().ok());
                    if seq != Some(next_seq) {
                        break format!("part of node `{node}`'s reply was lost");
                    }
                    next_seq += 1;
                    if tx.send(Ok(message.payload)).await.is_err() {
                        return; // The client left.
                    }
                }
                "end" => return,
                "error" => break String::from_utf8_lossy(&message.payload).into_owned(),
                _ => {} // ping
            }
        };
        tracing::warn!(error = %failure, "a forwarded reply failed");
        let last = if events {
            let data = serde_json::json!({"error": {"message": failure, "type": "node_lost"}});
            Ok(Bytes::from(format!("event: error\ndata: {data}\n\n")))
        } else {
            Err(std::io::Error::other(failure))
        };
        let _ = tx.send(last).await;
    });
    let body = Body::from_stream(Streamed {
        rx,
        cancel: cancel.map(|subject| (client.clone(), subject)),
        done: false,
    });
    builder
        .body(body)
        .map_err(|e| ForwardError::Nats(e.to_string()))
}

/// The HTTP status a reply's first message carries (502 if it carries none that is valid).
fn status_of(message: &async_nats::Message) -> StatusCode {
    nats_header(message, STATUS)
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY)
}

/// A reply that came whole in one message.
fn whole(message: &async_nats::Message) -> Response<Body> {
    let mut response = Response::new(Body::from(message.payload.clone()));
    *response.status_mut() = status_of(message);
    for (name, value) in http_headers(message) {
        response.headers_mut().append(name, value);
    }
    response
}

/// A forwarded reply's body; dropped before its end (the client left), it tells the
/// answering node to cancel.
struct Streamed {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    cancel: Option<(async_nats::Client, String)>,
    done: bool,
}

impl futures_core::Stream for Streamed {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(None) = polled {
            self.done = true;
        }
        polled
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let (Some((client, subject)), Ok(rt)) =
            (self.cancel.take(), tokio::runtime::Handle::try_current())
        {
            rt.spawn(async move {
                let _ = client.publish(subject, Bytes::new()).await;
            });
        }
    }
}

/// Answers the requests forwarded to `node` with `router`, until the subscription ends.
pub async fn serve(client: async_nats::Client, node: String, router: Router) {
    let mut requests = match client.subscribe(http_subject(&node)).await {
        Ok(requests) => requests,
        Err(e) => {
            tracing::error!(error = %e, "cannot take forwarded requests");
            return;
        }
    };
    while let Some(message) = requests.next().await {
        tokio::spawn(answer(client.clone(), router.clone(), message));
    }
}

fn head_message(kind: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(KIND, kind);
    headers
}

/// The first message of a reply (`kind` `head` or `whole`): its status and headers.
fn reply_head(kind: &str, response: &Response<Body>) -> HeaderMap {
    let mut head = head_message(kind);
    head.insert(STATUS, response.status().as_u16().to_string());
    carry_headers(response.headers(), &mut head);
    head
}

async fn answer(client: async_nats::Client, router: Router, message: async_nats::Message) {
    let Some(reply) = message.reply.clone() else {
        return;
    };
    let send = |headers: HeaderMap, payload: Bytes| {
        let (client, reply) = (client.clone(), reply.clone());
        async move { client.publish_with_headers(reply, headers, payload).await }
    };
    let request = match rebuild(&message) {
        Ok(request) => request,
        Err(e) => {
            let _ = send(head_message("error"), Bytes::from(e)).await;
            return;
        }
    };
    // The first ping is due one period from now. (An interval's immediate first tick is
    // not immediate: the timer rounds it to its next millisecond, which a request waited.)
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let running = router.oneshot(request);
    tokio::pin!(running);
    let response = loop {
        tokio::select! {
            response = &mut running => break response,
            _ = ping.tick() => {
                let _ = send(head_message("ping"), Bytes::new()).await;
            }
        }
    };
    let Ok(response) = response;
    // A small reply of known length goes back whole, in one message.
    let length = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|l| l.to_str().ok())
        .and_then(|l| l.parse::<usize>().ok());
    if length.is_some_and(|l| l <= CHUNK) {
        let head = reply_head("whole", &response);
        let (_, body) = response.into_parts();
        match axum::body::to_bytes(body, CHUNK).await {
            Ok(bytes) => {
                let _ = send(head, bytes).await;
            }
            Err(e) => {
                let _ = send(head_message("error"), Bytes::from(e.to_string())).await;
            }
        }
        return;
    }
    let cancel_subject = client.new_inbox();
    let mut cancel = match client.subscribe(cancel_subject.clone()).await {
        Ok(cancel) => cancel,
        Err(e) => {
            let _ = send(head_message("error"), Bytes::from(e.to_string())).await;
            return;
        }
    };
    let mut head = reply_head("head", &response);
    head.insert(CANCEL, cancel_subject);
    if let Some(length) = response.headers().get(header::CONTENT_LENGTH)
        && let Ok(length) = length.to_str()
    {
        head.insert(LENGTH, length);
    }
    if send(head, Bytes::new()).await.is_err() {
        return;
    }
    let mut body = response.into_body().into_data_stream();
    let mut seq = 0u64;
    loop {
        tokio::select! {
            chunk = body.next() => match chunk {
                Some(Ok(bytes)) => {
                    for piece in bytes.chunks(CHUNK) {
                        let mut headers = head_message("body");
                        headers.insert(SEQ, seq.to_string());
                        seq += 1;
                        if send(headers, bytes.slice_ref(piece)).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Err(e)) => {
                    let _ = send(head_message("error"), Bytes::from(e.to_string())).await;
                    return;
                }
                None => {
                    let _ = send(head_message("end"), Bytes::new()).await;
                    return;
                }
            },
            _ = ping.tick() => {
                let _ = send(head_message("ping"), Bytes::new()).await;
            }
            // The requester's client left: dropping the body cancels the message.
            _ = cancel.next() => return,
        }
    }
}

/// The HTTP request a forwarded message carries.
fn rebuild(message: &async_nats::Message) -> Result<Request<Body>, String> {
    let method = nats_header(message, METHOD).ok_or("a forwarded request without a method")?;
    let uri = nats_header(message, URI).ok_or("a forwarded request without a URI")?;
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in http_headers(message) {
        builder = builder.header(name, value);
    }
    if let Some(hops) = message
        .headers
        .as_ref()
        .and_then(|h| h.get(format!("{HTTP}{HOP_HEADER}").as_str()))
    {
        builder = builder.header(HOP_HEADER, hops.as_str());
    }
    builder
        .body(Body::from(message.payload.clone()))
        .map_err(|e| format!("a forwarded request is malformed: {e}"))
}
