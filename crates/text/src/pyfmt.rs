//! Python's spellings of values, for chat templates written against Jinja2: `json.dumps`,
//! `repr()`/`str()` of containers, float repr, and `time.strftime`.
//!
//! [`json`] and [`repr`] are bounded: they refuse values nested deeper than [`MAX_DEPTH`] and
//! stop once their text passes the caller's byte limit, since a template can build a small
//! value whose text is huge (a list holding the same list a thousand times, nested).

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// How deep [`json`] and [`repr`] follow nested lists and maps (Python's own recursion limit
/// is 1,000; tool schemas nest a few levels).
pub(crate) const MAX_DEPTH: usize = 256;

/// A bound a template ran into, carried as the source of a minijinja [`Error`].
#[derive(Debug, thiserror::Error)]
#[error("more than {limit} {what}")]
pub(crate) struct LimitExceeded {
    pub(crate) what: &'static str,
    pub(crate) limit: u64,
}

impl LimitExceeded {
    /// The error a filter returns for this bound.
    fn error(what: &'static str, limit: u64) -> Error {
        let message = format!("more than {limit} {what}");
        Error::new(ErrorKind::InvalidOperation, message).with_source(LimitExceeded { what, limit })
    }
}

/// Fails once `out` is longer than `max_bytes` or `depth` is past [`MAX_DEPTH`].
fn check_bounds(out: &str, depth: usize, max_bytes: usize) -> Result<(), Error> {
    if out.len() > max_bytes {
        return Err(LimitExceeded::error("bytes of text", max_bytes as u64));
    }
    if depth > MAX_DEPTH {
        return Err(LimitExceeded::error(
            "levels of nesting in a value",
            MAX_DEPTH as u64,
        ));
    }
    Ok(())
}

/// The arguments of `json.dumps` that templates pass.
pub(crate) struct JsonOptions {
    /// `None`: one line. `Some(unit)`: one item per line, indented by `unit` per level.
    pub(crate) indent: Option<String>,
    pub(crate) item_sep: String,
    pub(crate) key_sep: String,
    pub(crate) sort_keys: bool,
    pub(crate) ensure_ascii: bool,
}

/// Appends `value` as `json.dumps` writes it, failing once `out` passes `max_bytes`.
pub(crate) fn json(
    value: &Value,
    options: &JsonOptions,
    depth: usize,
    out: &mut String,
    max_bytes: usize,
) -> Result<(), Error> {
    check_bounds(out, depth, max_bytes)?;
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => number(value, true, out),
        ValueKind::String | ValueKind::Bytes => json_string(
            value.as_str().unwrap_or_default(),
            options.ensure_ascii,
            out,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            json_container(('[', ']'), items.len(), options, depth, out, |i, out| {
                json(&items[i], options, depth + 1, out, max_bytes)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if options.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            json_container(('{', '}'), entries.len(), options, depth, out, |i, out| {
                json_string(&entries[i].0, options.ensure_ascii, out);
                out.push_str(&options.key_sep);
                json(&entries[i].1, options, depth + 1, out, max_bytes)
            })?;
        }
        _ => {
            let message = format!("Object of type {} is not JSON serializable", value.kind());
            return Err(Error::new(ErrorKind::InvalidOperation, message));
        }
    }
    Ok(())
}

/// Writes `n` items between `brackets`, laid out per `options`.
fn json_container(
    brackets: (char, char),
    n: usize,
    options: &JsonOptions,
    depth: usize,
    out: &mut String,
    mut item: impl FnMut(usize, &mut String) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(brackets.0);
    if n == 0 {
        out.push(brackets.1);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(unit) = &options.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(unit);
            }
        }
    };
    for i in 0..n {
        if i > 0 {
            out.push_str(&options.item_sep);
        }
        newline(out, depth + 1);
        item(i, out)?;
    }
    newline(out, depth);
    out.push(brackets.1);
    Ok(())
}

/// A map key as `json.dumps` converts it.
fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::Number => {
            let mut s = String::new();
            number(key, true, &mut s);
            s
        }
        _ => {
            let message = format!(
                "keys must be str, int, float, bool or None, not {}",
                key.kind()
            );
            return Err(Error::new(ErrorKind::InvalidOperation, message));
        }
    })
}

/// Appends `s` as a JSON string with Python's escapes.
fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends a number as Python prints it; `json` spells non-finite floats as JSON does.
fn number(value: &Value, json: bool, out: &mut String) {
    if value.is_integer() {
        out.push_str(&value.to_string());
    } else {
        let float = f64::try_from(value.clone()).unwrap_or(f64::NAN);
        out.push_str(&float_repr(float, json));
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 and from 1e16.
pub(crate) fn float_repr(x: f64, json: bool) -> String {
    if x.is_nan() {
        return (if json { "NaN" } else { "nan" }).to_string();
    }
    if x.is_infinite() {
        let s = if json { "Infinity" } else { "inf" };
        return if x < 0.0 {
            format!("-{s}")
        } else {
            s.to_string()
        };
    }
    let sci = format!("{x:e}"); // "-1.2345e17"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let mut fixed = format!("{x}");
        if !fixed.contains('.') {
            fixed.push_str(".0");
        }
        fixed
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// Appends Python's `str()` of a value inside Jinja2 output: `None`, `True`, lists and dicts
/// as `repr` writes them; fails once `out` passes `max_bytes`.
pub(crate) fn repr(
    value: &Value,
    depth: usize,
    out: &mut String,
    max_bytes: usize,
) -> Result<(), Error> {
    check_bounds(out, depth, max_bytes)?;
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => number(value, false, out),
        ValueKind::String => string_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Map => {
            let is_map = value.kind() == ValueKind::Map;
            let (open, close) = match (is_map, value.is_tuple()) {
                (true, _) => ('{', '}'),
                (false, true) => ('(', ')'),
                (false, false) => ('[', ']'),
            };
            out.push(open);
            let mut n = 0;
            if let Ok(items) = value.try_iter() {
                for item in items {
                    if n > 0 {
                        out.push_str(", ");
                    }
                    repr(&item, depth + 1, out, max_bytes)?;
                    if is_map {
                        out.push_str(": ");
                        let entry = value.get_item(&item).unwrap_or_default();
                        repr(&entry, depth + 1, out, max_bytes)?;
                    }
                    n += 1;
                }
            }
            if n == 1 && open == '(' {
                out.push(','); // Python's one-tuple: (1,)
            }
            out.push(close);
        }
        _ => out.push_str(&value.to_string()),
    }
    Ok(())
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`.
fn string_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// The (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Python's `strftime` for the UTC time `secs` after the epoch. Covers the directives chat
/// templates use (`%Y %y %m %d %e %B %b %A %a %H %I %M %S %p %j %%`, and glibc's `%-d`
/// style no-padding flag); any other directive is copied as written.
pub(crate) fn strftime(format: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let in_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (in_day / 3600, in_day / 60 % 60, in_day % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let jan1 = days - day_of_year_offset(year, month, day);
    let yday = days - jan1 + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let pad = chars.next_if_eq(&'-').is_none();
        let field = |n: i64, width: usize| {
            if pad {
                format!("{n:0width$}")
            } else {
                n.to_string()
            }
        };
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&field(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&field(i64::from(month), 2)),
            Some('d') => out.push_str(&field(i64::from(day), 2)),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&field(hour, 2)),
            Some('I') => out.push_str(&field(hour12, 2)),
            Some('M') => out.push_str(&field(minute, 2)),
            Some('S') => out.push_str(&field(second, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&field(yday, 3)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if !pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days from January 1st of `year` to the given date.
fn day_of_year_offset(year: i64, month: u32, day: u32) -> i64 {
    const BEFORE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    BEFORE[(month - 1) as usize] + i64::from(leap && month > 2) + i64::from(day) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python() {
        assert_eq!(float_repr(1.0, true), "1.0");
        assert_eq!(float_repr(0.1, true), "0.1");
        assert_eq!(float_repr(1e-5, true), "1e-05");
        assert_eq!(float_repr(1e16, true), "1e+16");
        assert_eq!(float_repr(123456.789, true), "123456.789");
        assert_eq!(float_repr(-2.5e-7, true), "-2.5e-07");
        assert_eq!(float_repr(f64::NAN, true), "NaN");
    }

    #[test]
    fn strftime_matches_python() {
        // 2024-07-26 17:05:09 UTC, a Friday; expected strings from Python's time.strftime.
        let secs = 1_722_013_509;
        assert_eq!(strftime("%d %b %Y", secs), "26 Jul 2024");
        assert_eq!(
            strftime("%A, %B %-d %H:%M:%S %p %j %y %%", secs),
            "Friday, July 26 17:05:09 PM 208 24 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime("%Y-%m-%d %j", 951_782_400), "2000-02-29 060");
    }

    #[test]
    fn repr_quotes_like_python() {
        let mut out = String::new();
        repr(
            &Value::from(vec![
                Value::from("it's"),
                Value::from("a\nb"),
                Value::from(()),
            ]),
            0,
            &mut out,
            usize::MAX,
        )
        .unwrap();
        assert_eq!(out, "[\"it's\", 'a\\nb', None]");
    }
}
