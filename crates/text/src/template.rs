//! [`ChatTemplate`]: a model's Jinja chat template, rendered as `transformers`'
//! `apply_chat_template(messages, tokenize=False)` renders it.
//!
//! `transformers` renders with Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls) and adds
//! `raise_exception`, `strftime_now` and a `tojson` that is Python's `json.dumps`. Here the
//! engine is `minijinja` set up the same way, with Python's string and dict methods
//! (`.strip()`, `.startswith()`, `.items()`, ...) and Python's spelling of printed values
//! (`None`, `True`, `['a', 'b']`). The template sees `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`, and `tools` and `documents` as `none`.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Output, State, context};
use serde::{Deserialize, Serialize};

use crate::TextError;
use crate::pyfmt;

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
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TextError::TemplateSyntax {
                message: describe(&e),
            })?;
        let ctx = context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            tools => Value::from(()),
            documents => Value::from(()),
        };
        template.render(ctx).map_err(|e| TextError::TemplateRender {
            message: describe(&e),
        })
    }
}

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

/// `strftime_now(format)`: the current UTC time, formatted like Python's `strftime`.
fn strftime_now(format: String) -> Result<Value, Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    Ok(Value::from(pyfmt::strftime(&format, secs)))
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
    pyfmt::json(value, &options, 0, &mut out)?;
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
            pyfmt::repr(value, &mut text);
            out.write_str(&text).map_err(Error::from)
        }
        ValueKind::Number if !value.is_integer() => {
            let mut text = String::new();
            pyfmt::repr(value, &mut text);
            out.write_str(&text).map_err(Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[Message]) -> Result<String, TextError> {
        ChatTemplate::new(source, "<s>", "</s>")?.render(messages, true)
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
}
