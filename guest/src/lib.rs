//! Guest SDK for Tern actors: safe Rust over the `tern` ABI (version 1).
//!
//! An actor is a type implementing [`Actor`], exported with [`export_actor!`]. The macro
//! writes the exports Tern calls (`tern_alloc`, `tern_init`, `tern_on_message`); the
//! functions here wrap the host imports, so an actor needs no `unsafe` of its own.
//!
//! ```ignore
//! #[derive(Default)]
//! struct Echo;
//! impl tern_guest::Actor for Echo {
//!     fn on_message(&mut self, msg: &[u8]) -> Result<(), tern_guest::Error> {
//!         tern_guest::emit(msg)
//!     }
//! }
//! tern_guest::export_actor!(Echo);
//! ```

pub mod model;
pub mod sample;
pub mod sys;

mod runtime;

pub use model::{Candidate, Model, Session};
pub use sample::{Rng, Sampler, SamplerConfig};

#[doc(hidden)]
pub use runtime::{__alloc, __init, __on_message, ActorCell};

use std::fmt;

/// An error reported by the host: its negative code and its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub code: i32,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// The host's error codes (the `tern` ABI's table).
pub mod code {
    pub const OUT_OF_BOUNDS: i32 = -1;
    pub const MISALIGNED: i32 = -2;
    pub const OVERFLOW: i32 = -3;
    pub const OVERLAP: i32 = -4;
    /// Any other bad argument.
    pub const INVALID: i32 = -5;
    /// The compute device failed; the call may work on another host.
    pub const DEVICE: i32 = -6;
    pub const OUTPUT_LIMIT: i32 = -7;
    /// No such model on this host.
    pub const NOT_FOUND: i32 = -8;
    /// A budget (KV-cache bytes, sessions) is exhausted.
    pub const BUDGET: i32 = -9;
    /// Host work's input or output is over the host's size limit.
    pub const TOO_LARGE: i32 = -10;
    /// Host work ran past the host's time limit or its work bound (a template's fuel).
    pub const TIME_LIMIT: i32 = -11;
    /// The message was cancelled: its sender stopped waiting for the reply.
    pub const CANCELLED: i32 = -12;
    /// An error the guest raised itself.
    pub const GUEST: i32 = -100;
}

impl Error {
    /// An error raised by the guest itself ([`code::GUEST`]).
    pub fn guest(message: impl Into<String>) -> Error {
        Error {
            code: code::GUEST,
            message: message.into(),
        }
    }
}

/// What an actor does with the messages it is sent.
pub trait Actor: Default {
    /// Called once after instantiation.
    fn init(&mut self) {}
    /// Called for each message; an error is emitted and reported as a negative result.
    fn on_message(&mut self, message: &[u8]) -> Result<(), Error>;
}

/// Turns a host result code into a `Result`, fetching the message on error.
fn check(code: i32) -> Result<i32, Error> {
    if code >= 0 {
        return Ok(code);
    }
    Err(Error {
        code,
        message: last_error(),
    })
}

/// The host's message for the last failed call.
pub fn last_error() -> String {
    let mut buf = vec![0u8; 256];
    let len = sys::last_error(&mut buf);
    if len > buf.len() {
        buf.resize(len, 0);
        sys::last_error(&mut buf);
    }
    buf.truncate(len);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Streams bytes to whoever drives the actor.
pub fn emit(bytes: &[u8]) -> Result<(), Error> {
    check(sys::emit(bytes)).map(drop)
}

/// Streams text to whoever drives the actor.
pub fn emit_str(text: &str) -> Result<(), Error> {
    emit(text.as_bytes())
}

/// `c = a · b` on the actor's device, in place: `a` is `m×k`, `b` is `k×n`, `c` is `m×n`,
/// all row-major.
pub fn matmul_f32(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) -> Result<(), Error> {
    let shapes = [
        (a.len(), m.checked_mul(k)),
        (b.len(), k.checked_mul(n)),
        (c.len(), m.checked_mul(n)),
    ];
    if shapes.iter().any(|&(len, need)| Some(len) != need) {
        return Err(Error::guest(format!(
            "matmul_f32: slice lengths do not match {m}x{k} · {k}x{n}"
        )));
    }
    check(sys::matmul_f32(a, b, c, m, n, k)).map(drop)
}
