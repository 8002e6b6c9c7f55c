//! [`ChatTemplate`]: a model's Jinja chat template, rendered as `transformers`'
//! `apply_chat_template(messages, tokenize=False)` renders it.
//!
//! `transformers` renders with Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls) and adds
//! `raise_exception`, `strftime_now` and a `tojson` that is Python's `json.dumps`. Here the
//! engine is `minijinja` set up the same way, with Python's string and dict methods
//! (`.strip()`, `.startswith()`, `.items()`, ...) and Python's spelling of printed values
//! (`None`, `True`, `['a', 'b']`). The template sees `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`, and `tools` and `documents` as `none`.
//!
//! Templates come from model files and run on the host, outside any guest's time limit, so a
//! render is bounded: at most [`RENDER_FUEL`] units of work (minijinja's fuel: one per
//! instruction, plus one per 64 bytes of data the template creates), [`RECURSION_LIMIT`]
//! levels of nesting, and [`MAX_RENDER_BYTES`] of output. A template that runs past any of
//! them fails with [`TextError::TemplateLimit`]; `range()` itself refuses more than 100,000
//! items. The render runs on a thread of its own with a [`RENDER_STACK_BYTES`] stack, so the
//! recursion limit holds whatever stack the caller has left, and a panic in the engine is an
//! error. `strftime_now` never reads the system clock: it asks the caller's clock, and only
//! when the template calls it.
//!
//! What fuel does not bound: minijinja charges for a value's text only after writing it, so a
//! template that prints (`~`, `|string`, `|join`, `|pprint`) a list holding the same list many
//! times, nested, can take seconds and gigabytes before it stops; and a value nested a million
//! levels deep (`{% set ns.a = [ns.a] %}` in a loop) needs more stack to drop than
//! [`RENDER_STACK_BYTES`]. Chat templates are therefore trusted as part of a model the
//! operator installed; the bounds here stop mistakes and runaway loops, not a hostile author.

use std::collections::BTreeMap;
use std::io;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Output, State};
use serde::{Deserialize, Serialize};

use crate::TextError;
use crate::pyfmt::{self, LimitExceeded};

/// The most output one render may write, in bytes: far more than any model's context holds.
pub const MAX_RENDER_BYTES: usize = 4 << 20;

/// The work one render may do, in minijinja fuel. SmolLM2's and Llama 3's templates cost about
/// 30 fuel per message plus 6 per 100 bytes of text (300 messages of 4 KB: 80,000 to
/// 100,000; 4 MB of text: 320,000), so this leaves room for heavier templates and tens of
/// thousands of messages, and takes about 40 ms to burn.
pub const RENDER_FUEL: u64 = 1_000_000;

/// The stack of the thread a render runs on: minijinja's recursion limit needs under 1 MiB;
/// the rest lets a value nested as deep as [`RENDER_FUEL`] allows be dropped. Only the pages
/// a render touches are ever committed.
pub const RENDER_STACK_BYTES: usize = 64 << 20;

/// How deep loops, conditions and macro calls may nest (minijinja counts a macro call as
/// several levels).
pub const RECURSION_LIMIT: usize = 500;

/// The context key that carries the caller's clock reading to `strftime_now`. The space makes
/// it a name no template can spell.
const CLOCK_KEY: &str = "tern clock ms";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

const NAME: &str = "chat_template";

/// A compiled chat template with the special tokens it may print.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source` (a GGUF's `tokenizer.chat_template`); `bos_token` and `eos_token` are
    /// the spellings of the model's BOS and EOS tokens, which templates print.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, TextError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| TextError::TemplateSyntax {
                message: describe(&e),
            })?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter("wordcount", wordcount);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| TextError::TemplateSyntax {
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt text for `messages`; `add_generation_prompt` appends the header that opens
    /// the assistant's reply.
    ///
    /// `now` is the clock `strftime_now` reads: the current time as milliseconds since the
    /// Unix epoch (UTC). It is called at most once, and only when the template calls
    /// `strftime_now`; the time is then the same for every call in the render.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        now: &dyn Fn() -> i64,
    ) -> Result<String, TextError> {
        // Render without a clock first; a template that asks for the time stops at once
        // (Jinja cannot catch the error) and is rendered again with one reading.
        match self.render_on_own_stack(messages, add_generation_prompt, None) {
            Err(Failure::NeedsClock) => {
                match self.render_on_own_stack(messages, add_generation_prompt, Some(now())) {
                    Ok(text) => Ok(text),
                    Err(Failure::Text(e)) => Err(e),
                    Err(Failure::NeedsClock) => Err(TextError::TemplateRender {
                        message: "strftime_now found no clock".to_string(),
                    }),
                }
            }
            Err(Failure::Text(e)) => Err(e),
            Ok(text) => Ok(text),
        }
    }

    /// [`ChatTemplate::render_at`] on a thread with a [`RENDER_STACK_BYTES`] stack.
    fn render_on_own_stack(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        now_ms: Option<i64>,
    ) -> Result<String, Failure> {
        std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name("chat-template".to_string())
                .stack_size(RENDER_STACK_BYTES)
                .spawn_scoped(scope, || {
                    self.render_at(messages, add_generation_prompt, now_ms)
                })
                .map_err(|e| TextError::TemplateRender {
                    message: format!("cannot start a thread to render on: {e}"),
                })?;
            worker.join().unwrap_or_else(|_| {
                Err(Failure::Text(TextError::TemplateRender {
                    message: "the template engine panicked".to_string(),
                }))
            })
        })
    }

    /// One bounded render; `now_ms` is the clock reading `strftime_now` gives, if any.
    fn render_at(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        now_ms: Option<i64>,
    ) -> Result<String, Failure> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TextError::TemplateSyntax {
                message: describe(&e),
            })?;
        let ctx = Value::from_object(BTreeMap::from([
            ("messages", Value::from(Serde(messages))),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", Value::from(self.bos_token.as_str())),
            ("eos_token", Value::from(self.eos_token.as_str())),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
            (CLOCK_KEY, now_ms.map_or(Value::UNDEFINED, Value::from)),
        ]));
        let mut out = BoundedOutput::default();
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.bytes).map_err(|e| {
                Failure::Text(TextError::TemplateRender {
                    message: e.to_string(),
                })
            }),
            Err(_) if out.exceeded => Err(Failure::Text(TextError::TemplateLimit {
                what: "bytes of output",
                limit: MAX_RENDER_BYTES as u64,
            })),
            Err(e) => Err(classify(&e)),
        }
    }
}

/// Why a render stopped.
enum Failure {
    /// The template called `strftime_now` and no clock reading was given.
    NeedsClock,
    Text(TextError),
}

impl From<TextError> for Failure {
    fn from(e: TextError) -> Failure {
        Failure::Text(e)
    }
}

/// Sorts a render error: the clock request, a limit, or the template's own failure.
fn classify(error: &Error) -> Failure {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if e.is::<NeedsClock>() {
            return Failure::NeedsClock;
        }
        if let Some(limit) = e.downcast_ref::<LimitExceeded>() {
            return Failure::Text(TextError::TemplateLimit {
                what: limit.what,
                limit: limit.limit,
            });
        }
        if let Some(e) = e.downcast_ref::<Error>() {
            if e.kind() == ErrorKind::OutOfFuel {
                return Failure::Text(TextError::TemplateLimit {
                    what: "units of fuel (work)",
                    limit: RENDER_FUEL,
                });
            }
            if e.kind() == ErrorKind::InvalidOperation
                && e.detail() == Some("recursion limit exceeded")
            {
                return Failure::Text(TextError::TemplateLimit {
                    what: "levels of recursion",
                    limit: RECURSION_LIMIT as u64,
                });
            }
        }
        cause = e.source();
    }
    Failure::Text(TextError::TemplateRender {
        message: describe(error),
    })
}

/// The render's output, refused past [`MAX_RENDER_BYTES`].
#[derive(Default)]
struct BoundedOutput {
    bytes: Vec<u8>,
    /// A write was refused.
    exceeded: bool,
}

impl io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDER_BYTES {
            self.exceeded = true;
            return Err(io::Error::other("chat template output is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The source of the error `strftime_now` raises when the render has no clock reading yet.
#[derive(Debug, thiserror::Error)]
#[error("strftime_now needs the clock")]
struct NeedsClock;

/// An error with its chain of causes and, where known, the template line.
fn describe(error: &Error) -> String {
    let mut message = match error.kind() {
        // The template's own words, without minijinja's prefix.
        ErrorKind::InvalidOperation if error.detail().is_some() => {
            error.detail().unwrap_or_default().to_string()
        }
        _ => error.to_string(),
    };
    if let Some(line) = error.line() {
        message.push_str(&format!(" (line {line})"));
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

/// `raise_exception(message)`: templates call it to refuse a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the caller's clock reading as UTC, formatted like Python's
/// `strftime`. Without a reading it fails with [`NeedsClock`], and [`ChatTemplate::render`]
/// renders again with one.
fn strftime_now(state: &State, format: String) -> Result<Value, Error> {
    match state.lookup(CLOCK_KEY).and_then(|ms| ms.as_i64()) {
        Some(ms) => Ok(Value::from(pyfmt::strftime(&format, ms.div_euclid(1000)))),
        None => Err(
            Error::new(ErrorKind::InvalidOperation, "strftime_now needs the clock")
                .with_source(NeedsClock),
        ),
    }
}

/// `tojson`: Python's `json.dumps(value, ensure_ascii=False, indent=.., separators=..,
/// sort_keys=..)`, as `transformers` defines it.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            // Clamped: a template is not allowed to ask for gigabytes of spaces.
            None => Some(" ".repeat(v.as_i64().unwrap_or(0).clamp(0, 64) as usize)),
        },
        None => None,
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let part = |i: usize| -> Result<String, Error> {
                let s = v.get_item(&Value::from(i))?;
                s.as_str().map(str::to_string).ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson separators must be two strings",
                    )
                })
            };
            (part(0)?, part(1)?)
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let options = pyfmt::JsonOptions {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    pyfmt::json(value, &options, 0, &mut out, MAX_RENDER_BYTES)?;
    Ok(Value::from(out))
}

/// `wordcount`: Jinja2's count of `\w+` runs.
fn wordcount(text: &str) -> usize {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .count()
}

/// Prints values as Jinja2 does, with Python's `str()`: `None`, `True`, `['a', 1]`, `1e+20`.
fn python_formatter(out: &mut Output, state: &mut State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => {
            let mut text = String::new();
            pyfmt::repr(value, 0, &mut text, MAX_RENDER_BYTES)?;
            out.write_str(&text).map_err(Error::from)
        }
        ValueKind::Number if !value.is_integer() => {
            let mut text = String::new();
            pyfmt::repr(value, 0, &mut text, MAX_RENDER_BYTES)?;
            out.write_str(&text).map_err(Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-07-26 17:05:09.5 UTC.
    const JULY_26: i64 = 1_722_013_509_500;

    fn render(source: &str, messages: &[Message]) -> Result<String, TextError> {
        ChatTemplate::new(source, "<s>", "</s>")?.render(messages, true, &|| JULY_26)
    }

    /// The error of a template that must fail.
    fn limit_of(source: &str) -> TextError {
        render(source, &[Message::new("user", "hi")]).unwrap_err()
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() {
        let source = "{% for m in messages %}\n  {{ m.role }}: {{ m.content }}\n{% endfor %}\n";
        let text = render(
            source,
            &[Message::new("user", "hi"), Message::new("assistant", "yo")],
        )
        .unwrap();
        assert_eq!(text, "  user: hi\n  assistant: yo\n");
    }

    #[test]
    fn python_methods_and_values() {
        let source =
            "{{ messages[0].content.strip().upper() }}|{{ none }}|{{ true }}|{{ ['a', 1] }}";
        let text = render(source, &[Message::new("user", "  hi  ")]).unwrap();
        assert_eq!(text, "HI|None|True|['a', 1]");
    }

    #[test]
    fn raise_exception_reports_the_message() {
        let source = "{% if messages[0].role != 'system' %}{{ raise_exception('system first!') }}{% endif %}";
        let err = render(source, &[Message::new("user", "x")]).unwrap_err();
        assert!(err.to_string().contains("system first!"), "{err}");
    }

    #[test]
    fn syntax_errors_are_errors() {
        let err = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(matches!(err, TextError::TemplateSyntax { .. }), "{err}");
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let source = "{{ {'a': [1, 2.5, none, true], 'b': 'é\"\\n'} | tojson }}|{{ [1] | tojson(indent=2) }}";
        let text = render(source, &[]).unwrap();
        assert_eq!(
            text,
            "{\"a\": [1, 2.5, null, true], \"b\": \"é\\\"\\n\"}|[\n  1\n]"
        );
    }

    #[test]
    fn endless_loops_run_out_of_fuel() {
        for source in [
            // Loops as long as `range()` allows, nested.
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            // A recursive macro that never writes anything.
            "{% macro f(n) %}{% for i in range(100000) %}{{ f(n + 1) if n < 3 else '' }}{% endfor %}{% endmacro %}{{ f(0) }}",
        ] {
            let err = limit_of(source);
            assert!(
                matches!(err, TextError::TemplateLimit { what, limit } if what.contains("fuel") && limit == RENDER_FUEL),
                "{source}: {err}"
            );
        }
    }

    #[test]
    fn deep_recursion_is_a_limit() {
        let source = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
        let err = limit_of(source);
        assert!(
            matches!(err, TextError::TemplateLimit { what, .. } if what.contains("recursion")),
            "{err}"
        );
    }

    #[test]
    fn huge_output_is_a_limit() {
        for source in [
            // Cheap to write: each iteration prints a 1 MiB string.
            "{% set s = 'x' * 1048576 %}{% for i in range(100) %}{{ s }}{% endfor %}",
            // Small values with huge text: a list of the same list, nested, printed.
            "{% set ns = namespace(a=['xxxxxxxx']) %}{% for i in range(8) %}{% set ns.a = [ns.a] * 64 %}{% endfor %}{{ ns.a }}",
            "{% set ns = namespace(a=['xxxxxxxx']) %}{% for i in range(8) %}{% set ns.a = [ns.a] * 64 %}{% endfor %}{{ ns.a | tojson(indent=64) }}",
        ] {
            let err = limit_of(source);
            assert!(
                matches!(&err, TextError::TemplateLimit { what, .. } if what.contains("bytes")),
                "{source}: {err}"
            );
        }
        // Exactly at the limit is fine.
        let source = format!("{{{{ 'x' * {} }}}}", MAX_RENDER_BYTES);
        assert_eq!(render(&source, &[]).unwrap().len(), MAX_RENDER_BYTES);
    }

    #[test]
    fn deeply_nested_values_are_a_limit() {
        let source = "{% set ns = namespace(a=[]) %}{% for i in range(5000) %}{% set ns.a = [ns.a] %}{% endfor %}{{ ns.a }}";
        let err = limit_of(source);
        assert!(
            matches!(&err, TextError::TemplateLimit { what, .. } if what.contains("nesting")),
            "{err}"
        );
    }

    #[test]
    fn renders_on_a_stack_of_its_own() {
        // A caller with little stack left: recursion to the limit, and dropping a value nested
        // 100,000 levels deep, would overflow it.
        let nest = format!("{}ns.a{}", "[".repeat(40), "]".repeat(40));
        let deep = format!(
            "{{% set ns = namespace(a=[]) %}}{{% for i in range(2500) %}}{{% set ns.a = {nest} %}}{{% endfor %}}{{{{ ns.a | length }}}}"
        );
        let worker = std::thread::Builder::new()
            .stack_size(128 << 10)
            .spawn(move || {
                let recursion = limit_of("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
                (recursion, render(&deep, &[]))
            })
            .unwrap();
        let (recursion, deep) = worker.join().unwrap();
        assert!(
            matches!(recursion, TextError::TemplateLimit { what, .. } if what.contains("recursion")),
            "{recursion}"
        );
        assert_eq!(deep.unwrap(), "1");
    }

    #[test]
    fn huge_ranges_are_refused() {
        let err = render("{% for i in range(1000000000) %}x{% endfor %}", &[]).unwrap_err();
        assert!(
            matches!(&err, TextError::TemplateRender { message } if message.contains("range")),
            "{err}"
        );
    }

    #[test]
    fn strftime_now_reads_the_callers_clock() {
        let template = ChatTemplate::new(
            "{{ strftime_now('%Y-%m-%d %H:%M:%S') }}|{{ strftime_now('%d %b %Y') }}",
            "",
            "",
        )
        .unwrap();
        let calls = std::cell::Cell::new(0);
        let clock = || {
            calls.set(calls.get() + 1);
            JULY_26
        };
        assert_eq!(
            template.render(&[], false, &clock).unwrap(),
            "2024-07-26 17:05:09|26 Jul 2024"
        );
        assert_eq!(calls.get(), 1, "one reading per render");
        assert_eq!(
            template.render(&[], false, &|| 0).unwrap(),
            "1970-01-01 00:00:00|01 Jan 1970"
        );
        // Before the epoch, the second is rounded down as Python's gmtime does.
        assert_eq!(
            template.render(&[], false, &|| -1).unwrap(),
            "1969-12-31 23:59:59|31 Dec 1969"
        );
    }

    #[test]
    fn the_clock_is_read_only_when_the_template_asks() {
        let never = || -> i64 { panic!("the template does not use strftime_now") };
        let text = render("{{ messages[0].content }}", &[Message::new("user", "hi")]);
        assert_eq!(text.unwrap(), "hi");
        let template = ChatTemplate::new(
            "{% if false %}{{ strftime_now('%Y') }}{% endif %}{{ bos_token }}",
            "<s>",
            "",
        )
        .unwrap();
        assert_eq!(template.render(&[], false, &never).unwrap(), "<s>");
        // Inside a macro, too.
        let template = ChatTemplate::new(
            "{% macro today() %}{{ strftime_now('%Y') }}{% endmacro %}{{ today() }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(template.render(&[], false, &|| JULY_26).unwrap(), "2024");
    }
}
