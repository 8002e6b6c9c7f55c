//! A streamed reply as server-sent events: `output` events (`{"text": ...}`) as the guest
//! emits, then one `done` event (`{"code": ..., "durable": ...}`) or one `error` event (`{"error": ...}`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::response::sse::Event;
use tokio::sync::{mpsc, oneshot};

use crate::ApiError;
use crate::actors::Delivered;

/// The events of one message, read from the actor's output stream and then its reply.
pub struct ReplyEvents {
    output: mpsc::UnboundedReceiver<Vec<u8>>,
    output_done: bool,
    reply: Option<oneshot::Receiver<Result<Delivered, ApiError>>>,
    /// The final event, when held back behind the last text.
    last: Option<Event>,
    text: Utf8Carry,
}

impl ReplyEvents {
    pub fn new(
        output: mpsc::UnboundedReceiver<Vec<u8>>,
        reply: oneshot::Receiver<Result<Delivered, ApiError>>,
    ) -> ReplyEvents {
        ReplyEvents {
            output,
            output_done: false,
            reply: Some(reply),
            last: None,
            text: Utf8Carry::default(),
        }
    }
}

impl futures_core::Stream for ReplyEvents {
    type Item = Result<Event, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // The actor's thread drops the output sender before it sends the reply, so the
        // output ends before the reply is read.
        while !this.output_done {
            match this.output.poll_recv(cx) {
                Poll::Ready(Some(bytes)) => {
                    let text = this.text.push(&bytes);
                    if !text.is_empty() {
                        return Poll::Ready(Some(Ok(output_event(&text))));
                    }
                }
                Poll::Ready(None) => this.output_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        let Some(reply) = this.reply.as_mut() else {
            return Poll::Ready(this.last.take().map(Ok));
        };
        let result = match Pin::new(reply).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(result) => result,
        };
        this.reply = None;
        let event = match result {
            Ok(Ok(delivered)) => done_event(delivered.reply.code, delivered.durable),
            Ok(Err(e)) => error_event(&e),
            Err(_) => error_event(&ApiError::internal("the actor's thread stopped")),
        };
        // Bytes held back as an unfinished character go out (replaced) before the end.
        let rest = this.text.finish();
        if rest.is_empty() {
            return Poll::Ready(Some(Ok(event)));
        }
        this.last = Some(event);
        Poll::Ready(Some(Ok(output_event(&rest))))
    }
}

fn output_event(text: &str) -> Event {
    Event::default()
        .event("output")
        .data(serde_json::json!({ "text": text }).to_string())
}

fn done_event(code: i32, durable: bool) -> Event {
    Event::default()
        .event("done")
        .data(serde_json::json!({ "code": code, "durable": durable }).to_string())
}

fn error_event(e: &ApiError) -> Event {
    Event::default().event("error").data(e.body().to_string())
}

/// Turns a byte stream into text without splitting a character across two events: a
/// character cut at the end of one emit is held back until the next completes it.
#[derive(Default)]
pub struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    /// The text `bytes` completes; invalid bytes become U+FFFD.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut text = String::new();
        let mut rest = &self.pending[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // The first `valid_up_to` bytes are valid UTF-8 by definition.
                    text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        // An unfinished character at the end: keep it for the next push.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        text
    }

    /// Whatever is still held back, replaced.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::Utf8Carry;

    #[test]
    fn holds_back_a_split_character() {
        let mut carry = Utf8Carry::default();
        let euro = "€".as_bytes();
        assert_eq!(carry.push(&[b'a', euro[0]]), "a");
        assert_eq!(carry.push(&euro[1..]), "€");
        assert_eq!(carry.push(&[0xff, b'b']), "\u{fffd}b");
        assert_eq!(carry.push(&euro[..2]), "");
        assert_eq!(carry.finish(), "\u{fffd}");
    }
}
