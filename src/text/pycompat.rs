//! Python compatibility for chat templates: the parts of transformers' Jinja
//! environment that are Python library calls rather than Jinja, written out
//! so that templates print what they print under HF.
//!
//! - `tojson`: HF overrides Jinja's filter with Python's `json.dumps` (no
//!   HTML escaping; `ensure_ascii`, `indent`, `separators`, `sort_keys`), with
//!   Python's `repr(float)` for numbers;
//! - `strftime_now(fmt)`: `datetime.now().strftime(fmt)`, in UTC rather than
//!   the host's local time.

use minijinja::value::{from_args, Kwargs, Rest, ValueOrKwargs};
use minijinja::{ErrorKind, Value};

// ---------------------------------------------------------------------------
// tojson: Python's json.dumps, as HF's override of Jinja's filter.

/// `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
pub(crate) fn tojson_filter(value: &Value, args: Rest<ValueOrKwargs>) -> std::result::Result<Value, minijinja::Error> {
    let args: Vec<Value> = args.0.into_iter().map(Value::from).collect();
    let (pos, kwargs): (&[Value], Kwargs) = from_args(&args)?;
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if pos.len() > names.len() {
        return Err(minijinja::Error::new(ErrorKind::TooManyArguments, "tojson takes at most 4 arguments"));
    }
    let mut opts: [Option<Value>; 4] = Default::default();
    for (slot, v) in opts.iter_mut().zip(pos) {
        *slot = Some(v.clone());
    }
    for (slot, name) in opts.iter_mut().zip(names) {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            if slot.is_some() {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson got multiple values for argument {name:?}"),
                ));
            }
            *slot = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = opts;
    let some = |v: Option<Value>| v.filter(|v| !v.is_none() && !v.is_undefined());

    let indent = match some(indent) {
        None => None,
        Some(v) if v.as_str().is_some() => Some(v.as_str().unwrap_or_default().to_owned()),
        Some(v) => match i64::try_from(v.clone()) {
            // Python has no limit; a template asking for more is broken.
            Ok(n) if n <= 1024 => Some(" ".repeat(n.max(0) as usize)),
            Ok(n) => return Err(bad_arg(format!("tojson: indent {n} is larger than 1024"))),
            Err(_) => return Err(bad_arg(format!("tojson: indent must be an int or a string, got {v}"))),
        },
    };
    let (item_sep, key_sep) = match some(separators) {
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    (a.as_str().unwrap_or_default().to_owned(), b.as_str().unwrap_or_default().to_owned())
                }
                _ => return Err(bad_arg("tojson: separators must be a pair of strings".into())),
            }
        }
    };
    let opts = JsonOpts {
        ensure_ascii: some(ensure_ascii).is_some_and(|v| v.is_true()),
        indent,
        item_sep,
        key_sep,
        sort_keys: some(sort_keys).is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    py_json(value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

fn bad_arg(msg: String) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg)
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn not_serializable(v: &Value) -> minijinja::Error {
    bad_arg(format!("tojson: Object of type {} is not JSON serializable", v.kind()))
}

fn py_json(v: &Value, o: &JsonOpts, depth: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind as K;
    if depth > 512 {
        return Err(bad_arg("tojson: nesting too deep".into()));
    }
    match v.kind() {
        K::None => out.push_str("null"),
        K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        K::Number if v.is_integer() => out.push_str(&v.to_string()),
        K::Number => out.push_str(&py_float_repr(f64::try_from(v.clone())?, true)),
        K::String => py_json_str(v.as_str().unwrap_or_default(), o.ensure_ascii, out),
        K::Seq | K::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            json_container(out, o, depth, '[', ']', items.len(), |i, out| py_json(&items[i], o, depth + 1, out))?;
        }
        K::Map => {
            let mut items: Vec<(String, Value)> = Vec::new();
            for k in v.try_iter()? {
                let key = match k.kind() {
                    K::String => k.as_str().unwrap_or_default().to_owned(),
                    K::None => "null".to_owned(),
                    K::Bool => (if k.is_true() { "true" } else { "false" }).to_owned(),
                    K::Number if k.is_integer() => k.to_string(),
                    K::Number => py_float_repr(f64::try_from(k.clone())?, true),
                    _ => {
                        return Err(bad_arg(format!(
                            "tojson: keys must be str, int, float, bool or None, not {}",
                            k.kind()
                        )))
                    }
                };
                let val = v.get_item(&k)?;
                items.push((key, val));
            }
            if o.sort_keys {
                items.sort_by(|a, b| a.0.cmp(&b.0));
            }
            json_container(out, o, depth, '{', '}', items.len(), |i, out| {
                py_json_str(&items[i].0, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                py_json(&items[i].1, o, depth + 1, out)
            })?;
        }
        _ => return Err(not_serializable(v)),
    }
    Ok(())
}

/// json.dumps' layout of `[...]` / `{...}`: inline with the item separator,
/// or one item per line when `indent` is set; empty containers stay `[]`/`{}`.
fn json_container(
    out: &mut String,
    o: &JsonOpts,
    depth: usize,
    open: char,
    close: char,
    n: usize,
    mut item: impl FnMut(usize, &mut String) -> std::result::Result<(), minijinja::Error>,
) -> std::result::Result<(), minijinja::Error> {
    out.push(open);
    if n == 0 {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    for i in 0..n {
        if i > 0 {
            out.push_str(&o.item_sep);
        }
        newline(out, depth + 1);
        item(i, out)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// Python's JSON string encoder (`encode_basestring` / `_ascii`).
fn py_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)` (shortest round-trip digits; scientific notation
/// below 1e-4 and from 1e16). `json` spells the non-finite values
/// `NaN`/`Infinity`, `repr` spells them `nan`/`inf`.
fn py_float_repr(f: f64, json: bool) -> String {
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.to_owned();
    }
    if f.is_infinite() {
        let s = if json { "Infinity" } else { "inf" };
        return if f < 0.0 { format!("-{s}") } else { s.to_owned() };
    }
    let sci = format!("{:e}", f.abs()); // shortest digits: "1.5e-5", "1e20", "0e0"
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let body = if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                format!("{digits}{}.0", "0".repeat(int_len - digits.len()))
            } else {
                format!("{}.{}", &digits[..int_len], &digits[int_len..])
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{body}")
    } else {
        let mant = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

// ---------------------------------------------------------------------------
// strftime_now: Python's datetime.now().strftime(fmt), in UTC.

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tm {
    year: i64,
    month: u32, // 1..=12
    day: u32,   // 1..=31
    hour: u32,
    minute: u32,
    second: u32,
    weekday: u32, // 0 = Monday, as Python's weekday()
    yearday: u32, // 1..=366
}

/// `strftime_now(fmt)`: the current UTC time formatted by [`strftime`].
pub(crate) fn strftime_now(fmt: &str) -> String {
    strftime(fmt, now_utc())
}

fn now_utc() -> Tm {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    tm_from_unix(secs)
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn tm_from_unix(secs: i64) -> Tm {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yearday = CUM[month as usize - 1] + day + u32::from(leap && month > 2);
    Tm {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: (rem % 3600 / 60) as u32,
        second: (rem % 60) as u32,
        weekday: (days + 3).rem_euclid(7) as u32, // 1970-01-01 was a Thursday
        yearday,
    }
}

/// The C/glibc `strftime` directives chat templates use (`%d %b %Y`,
/// `%-d`, `%Y-%m-%d`, ...), English names. Unknown directives are copied
/// through, as glibc does.
fn strftime(fmt: &str, t: Tm) -> String {
    const MONTHS: &str = "January February March April May June July August September October November December";
    const DAYS: &str = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday";
    let month = MONTHS.split(' ').nth(t.month as usize - 1).unwrap_or("");
    let day = DAYS.split(' ').nth(t.weekday as usize).unwrap_or("");
    let mut out = String::new();
    let mut it = fmt.chars().peekable();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = it.peek() == Some(&'-');
        if no_pad {
            it.next();
        }
        let num = |out: &mut String, v: i64, width: usize| {
            if no_pad {
                out.push_str(&v.to_string());
            } else {
                out.push_str(&format!("{v:0width$}"));
            }
        };
        let hour12 = if t.hour.is_multiple_of(12) { 12 } else { t.hour % 12 };
        match it.next() {
            Some('Y') => out.push_str(&t.year.to_string()),
            Some('y') => num(&mut out, t.year.rem_euclid(100), 2),
            Some('m') => num(&mut out, t.month.into(), 2),
            Some('d') => num(&mut out, t.day.into(), 2),
            Some('e') => out.push_str(&format!("{:>2}", t.day)),
            Some('H') => num(&mut out, t.hour.into(), 2),
            Some('I') => num(&mut out, hour12.into(), 2),
            Some('M') => num(&mut out, t.minute.into(), 2),
            Some('S') => num(&mut out, t.second.into(), 2),
            Some('j') => num(&mut out, t.yearday.into(), 3),
            Some('p') => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month),
            Some('b') | Some('h') => out.push_str(month.get(..3).unwrap_or(month)),
            Some('A') => out.push_str(day),
            Some('a') => out.push_str(day.get(..3).unwrap_or(day)),
            Some('u') => out.push_str(&(t.weekday + 1).to_string()),
            Some('w') => out.push_str(&((t.weekday + 1) % 7).to_string()),
            Some('F') => out.push_str(&format!("{}-{:02}-{:02}", t.year, t.month, t.day)),
            Some('T') => out.push_str(&format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second)),
            Some('D') => out.push_str(&format!("{:02}/{:02}/{:02}", t.month, t.day, t.year.rem_euclid(100))),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::chat_template::ChatTemplate;
    use crate::text::tokenizer::SpecialTokens;
    use serde_json::json;

    #[test]
    fn float_repr_matches_python() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (1e-4, "0.0001"),
            (1.5e-5, "1.5e-05"),
            (-0.0, "-0.0"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e300, "1e+300"),
        ] {
            assert_eq!(py_float_repr(f, false), want, "{f}");
        }
        assert_eq!(py_float_repr(f64::NAN, true), "NaN");
        assert_eq!(py_float_repr(f64::NEG_INFINITY, true), "-Infinity");
    }

    #[test]
    fn strftime_directives() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = tm_from_unix(1_709_211_909);
        assert_eq!(t, Tm { year: 2024, month: 2, day: 29, hour: 13, minute: 5, second: 9, weekday: 3, yearday: 60 });
        assert_eq!(
            strftime("%d %b %Y|%-d %B|%A %a|%H:%M:%S %I%p|%j|%F %T|%%|%Q", t),
            "29 Feb 2024|29 February|Thursday Thu|13:05:09 01PM|060|2024-02-29 13:05:09|%|%Q"
        );
        assert_eq!(tm_from_unix(0).weekday, 3);
        assert_eq!(tm_from_unix(-1).year, 1969);
        let tmpl = ChatTemplate::new("{{ strftime_now('%Y')|length }}", "t", SpecialTokens::default()).unwrap();
        assert_eq!(tmpl.render(&json!([{"role": "user", "content": ""}]), false).unwrap(), "4");
    }
}
