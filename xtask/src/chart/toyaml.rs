//! Helm's `toYaml`, byte for byte.
//!
//! Helm marshals a value to JSON and the JSON to YAML with go-yaml v2 (sigs.k8s.io/yaml), then
//! drops the final newline. What that emitter writes is reproduced here: keys sorted in its
//! order (runs of digits compared as numbers, non-letters before letters), block style with
//! two-space indentation and sequences not indented under their key, `{}` and `[]` for empty
//! collections, and each string in the style go-yaml picks — plain when it reads back as the
//! same string, single-quoted when plain cannot carry it, double-quoted when it would read back
//! as something else (`"true"`, `"15020"`, `""`) or holds characters only escapes can carry,
//! literal (`|`, `|-`, `|2-`) when it spans lines — with plain and quoted strings folded at a
//! space past column 80, as libyaml does. Numbers go through JSON first: a whole float is an
//! integer, other floats are Go's shortest `%g` (`0.5`, `1e-05`, `1.2345675e+06`).

use std::cmp::Ordering;
use std::collections::HashMap;

use gtmpl_ng::{NumberKind, Value};

/// libyaml's preferred line width: a scalar is folded at a space once past it.
const BEST_WIDTH: usize = 80;
/// go-yaml's indentation step.
const INDENT: usize = 2;

pub fn to_yaml(value: &Value) -> Result<String, String> {
    let mut e = Emitter { out: String::new() };
    match value {
        Value::Map(m) | Value::Object(m) if !m.is_empty() => e.map(m, 0)?,
        Value::Array(a) if !a.is_empty() => e.seq(a, 0)?,
        Value::String(s) if s.contains('\n') => {
            return Err(
                "toYaml: a multi-line string is only supported inside a map or a list".into(),
            )
        }
        other => e.scalar(other, INDENT)?,
    }
    // A literal block ends with its line break; Helm trims the document's last newline.
    if e.out.ends_with('\n') {
        e.out.pop();
    }
    Ok(e.out)
}

struct Emitter {
    out: String,
}

enum Style {
    Plain,
    Single,
    Double,
    Literal,
}

impl Emitter {
    fn column(&self) -> usize {
        let line = self
            .out
            .rfind('\n')
            .map_or(&self.out[..], |i| &self.out[i + 1..]);
        line.chars().count()
    }

    /// libyaml's write_indent: a new line (unless one was just ended) padded to `indent`.
    fn line(&mut self, indent: usize) {
        if !self.out.is_empty() && !self.out.ends_with('\n') {
            self.out.push('\n');
        }
        self.out.extend(std::iter::repeat_n(' ', indent));
    }

    /// A block mapping whose first key goes where the output is now (at column `indent`).
    fn map(&mut self, map: &HashMap<String, Value>, indent: usize) -> Result<(), String> {
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort_by(|a, b| key_order(a, b));
        for (i, key) in keys.into_iter().enumerate() {
            if i > 0 {
                self.line(indent);
            }
            if key.chars().count() > 128 {
                return Err(format!("toYaml: key longer than 128 characters: {key}"));
            }
            self.string(key, indent, true);
            self.out.push(':');
            match &map[key] {
                Value::Map(m) | Value::Object(m) if !m.is_empty() => {
                    self.line(indent + INDENT);
                    self.map(m, indent + INDENT)?;
                }
                // Sequences are not indented under their key.
                Value::Array(a) if !a.is_empty() => {
                    self.line(indent);
                    self.seq(a, indent)?;
                }
                value => {
                    self.out.push(' ');
                    self.scalar(value, indent + INDENT)?;
                }
            }
        }
        Ok(())
    }

    /// A block sequence whose first `-` goes where the output is now (at column `indent`).
    fn seq(&mut self, items: &[Value], indent: usize) -> Result<(), String> {
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.line(indent);
            }
            self.out.push_str("- ");
            match item {
                Value::Map(m) | Value::Object(m) if !m.is_empty() => {
                    self.map(m, indent + INDENT)?
                }
                Value::Array(a) if !a.is_empty() => self.seq(a, indent + INDENT)?,
                value => self.scalar(value, indent + INDENT)?,
            }
        }
        Ok(())
    }

    /// A scalar (or an empty collection); `indent` is where its continuation lines go.
    fn scalar(&mut self, value: &Value, indent: usize) -> Result<(), String> {
        match value {
            Value::Nil | Value::NoValue => self.out.push_str("null"),
            Value::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => self.out.push_str(&number(n.kind())?),
            Value::String(s) => self.string(s, indent, false),
            Value::Map(_) | Value::Object(_) => self.out.push_str("{}"),
            Value::Array(_) => self.out.push_str("[]"),
            Value::Function(_) => return Err("toYaml: cannot marshal a function".into()),
        }
        Ok(())
    }

    fn string(&mut self, s: &str, indent: usize, key: bool) {
        let a = analyze(s);
        // go-yaml asks for literal when the string spans lines, plain when it reads back as
        // this string, double-quoted otherwise; libyaml then falls back as the text requires.
        let style = if s.contains('\n') {
            if key || !a.block_allowed {
                Style::Double
            } else {
                Style::Literal
            }
        } else if resolves_to_str(s) && !is_base60_float(s) {
            if a.block_plain_allowed {
                Style::Plain
            } else if a.single_quoted_allowed {
                Style::Single
            } else {
                Style::Double
            }
        } else {
            Style::Double
        };
        let folds = !key;
        match style {
            Style::Plain => self.plain(s, indent, folds),
            Style::Single => self.single_quoted(s, indent, folds),
            Style::Double => self.double_quoted(s, indent, folds),
            Style::Literal => self.literal(s, indent),
        }
    }

    fn plain(&mut self, s: &str, indent: usize, folds: bool) {
        let chars: Vec<char> = s.chars().collect();
        let mut column = self.column();
        let mut spaces = false;
        for (i, &c) in chars.iter().enumerate() {
            if c == ' ' {
                if folds && !spaces && column > BEST_WIDTH && chars.get(i + 1) != Some(&' ') {
                    self.line(indent);
                    column = indent;
                } else {
                    self.out.push(' ');
                    column += 1;
                }
                spaces = true;
            } else {
                self.out.push(c);
                column += 1;
                spaces = false;
            }
        }
    }

    fn single_quoted(&mut self, s: &str, indent: usize, folds: bool) {
        let chars: Vec<char> = s.chars().collect();
        self.out.push('\'');
        let mut column = self.column();
        let mut spaces = false;
        for (i, &c) in chars.iter().enumerate() {
            if c == ' ' {
                if folds
                    && !spaces
                    && column > BEST_WIDTH
                    && i != 0
                    && i != chars.len() - 1
                    && chars.get(i + 1) != Some(&' ')
                {
                    self.line(indent);
                    column = indent;
                } else {
                    self.out.push(' ');
                    column += 1;
                }
                spaces = true;
            } else {
                if c == '\'' {
                    self.out.push('\'');
                    column += 1;
                }
                self.out.push(c);
                column += 1;
                spaces = false;
            }
        }
        self.out.push('\'');
    }

    fn double_quoted(&mut self, s: &str, indent: usize, folds: bool) {
        let chars: Vec<char> = s.chars().collect();
        self.out.push('"');
        let mut column = self.column();
        let mut spaces = false;
        for (i, &c) in chars.iter().enumerate() {
            if !printable(c) || c == '\u{FEFF}' || is_break(c) || c == '"' || c == '\\' {
                let escaped = match c {
                    '\0' => "\\0".to_string(),
                    '\u{07}' => "\\a".into(),
                    '\u{08}' => "\\b".into(),
                    '\t' => "\\t".into(),
                    '\n' => "\\n".into(),
                    '\u{0B}' => "\\v".into(),
                    '\u{0C}' => "\\f".into(),
                    '\r' => "\\r".into(),
                    '\u{1B}' => "\\e".into(),
                    '"' => "\\\"".into(),
                    '\\' => "\\\\".into(),
                    '\u{85}' => "\\N".into(),
                    '\u{A0}' => "\\_".into(),
                    '\u{2028}' => "\\L".into(),
                    '\u{2029}' => "\\P".into(),
                    c if (c as u32) <= 0xFF => format!("\\x{:02X}", c as u32),
                    c if (c as u32) <= 0xFFFF => format!("\\u{:04X}", c as u32),
                    c => format!("\\U{:08X}", c as u32),
                };
                column += escaped.len();
                self.out.push_str(&escaped);
                spaces = false;
            } else if c == ' ' {
                if folds && !spaces && column > BEST_WIDTH && i != 0 && i != chars.len() - 1 {
                    self.line(indent);
                    column = indent;
                    if chars.get(i + 1) == Some(&' ') {
                        self.out.push('\\');
                        column += 1;
                    }
                } else {
                    self.out.push(' ');
                    column += 1;
                }
                spaces = true;
            } else {
                self.out.push(c);
                column += 1;
                spaces = false;
            }
        }
        self.out.push('"');
    }

    fn literal(&mut self, s: &str, indent: usize) {
        self.out.push('|');
        if s.starts_with(' ') || s.starts_with(is_break) {
            self.out.push(char::from(b'0' + INDENT as u8));
        }
        let mut rev = s.chars().rev();
        match (rev.next(), rev.next()) {
            (Some(last), _) if !is_break(last) => self.out.push('-'),
            (Some(_), None) => self.out.push('+'),
            (Some(_), Some(before)) if is_break(before) => self.out.push('+'),
            _ => {}
        }
        self.out.push('\n');
        let mut line_start = true;
        for c in s.chars() {
            if is_break(c) {
                self.out.push('\n');
                line_start = true;
            } else {
                if line_start {
                    self.out.extend(std::iter::repeat_n(' ', indent));
                    line_start = false;
                }
                self.out.push(c);
            }
        }
    }
}

/// What libyaml's yaml_emitter_analyze_scalar decides, for the styles used in block context.
struct Analysis {
    block_plain_allowed: bool,
    single_quoted_allowed: bool,
    block_allowed: bool,
}

fn analyze(s: &str) -> Analysis {
    if s.is_empty() {
        return Analysis {
            block_plain_allowed: true,
            single_quoted_allowed: true,
            block_allowed: false,
        };
    }
    let chars: Vec<char> = s.chars().collect();
    let mut block_indicators = s.starts_with("---") || s.starts_with("...");
    let (mut leading_space, mut leading_break, mut trailing_space, mut trailing_break) =
        (false, false, false, false);
    let (mut break_space, mut space_break, mut special, mut line_breaks) =
        (false, false, false, false);
    let (mut previous_space, mut previous_break) = (false, false);
    let mut preceded_by_whitespace = true;
    for (i, &c) in chars.iter().enumerate() {
        let followed_by_whitespace = chars.get(i + 1).is_none_or(|&n| is_blank(n) || is_break(n));
        if i == 0 {
            match c {
                '#' | ',' | '[' | ']' | '{' | '}' | '&' | '*' | '!' | '|' | '>' | '\'' | '"'
                | '%' | '@' | '`' => block_indicators = true,
                '?' | ':' | '-' if followed_by_whitespace => block_indicators = true,
                _ => {}
            }
        } else {
            match c {
                ':' if followed_by_whitespace => block_indicators = true,
                '#' if preceded_by_whitespace => block_indicators = true,
                _ => {}
            }
        }
        if !printable(c) {
            special = true;
        }
        let last = i + 1 == chars.len();
        if c == ' ' {
            leading_space |= i == 0;
            trailing_space |= last;
            break_space |= previous_break;
            previous_space = true;
            previous_break = false;
        } else if is_break(c) {
            line_breaks = true;
            leading_break |= i == 0;
            trailing_break |= last;
            space_break |= previous_space;
            previous_space = false;
            previous_break = true;
        } else {
            previous_space = false;
            previous_break = false;
        }
        preceded_by_whitespace = is_blank(c) || is_break(c);
    }
    let mut a = Analysis {
        block_plain_allowed: true,
        single_quoted_allowed: true,
        block_allowed: true,
    };
    if leading_space || leading_break || trailing_space || trailing_break {
        a.block_plain_allowed = false;
    }
    if trailing_space {
        a.block_allowed = false;
    }
    if break_space {
        a.block_plain_allowed = false;
        a.single_quoted_allowed = false;
    }
    if space_break || special {
        a.block_plain_allowed = false;
        a.single_quoted_allowed = false;
        a.block_allowed = false;
    }
    if line_breaks || block_indicators {
        a.block_plain_allowed = false;
    }
    a
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn is_break(c: char) -> bool {
    matches!(c, '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// libyaml's is_printable (which leaves out every character past the Basic Multilingual Plane).
fn printable(c: char) -> bool {
    matches!(c as u32, 0x0A | 0x20..=0x7E | 0xA0..=0xD7FF | 0xE000..=0xFFFD) && c != '\u{FEFF}'
}

/// Whether go-yaml v2 reads `s`, written plain, back as a string (its `resolve`): not a bool,
/// null, number or timestamp of YAML 1.1.
fn resolves_to_str(s: &str) -> bool {
    const SPECIAL: &[&str] = &[
        "y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON", "n", "N", "no",
        "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF", "", "~", "null", "Null",
        "NULL", ".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf",
        "-.Inf", "-.INF", "<<",
    ];
    let Some(first) = s.chars().next() else {
        return false;
    };
    match first {
        'y' | 'Y' | 'n' | 'N' | 't' | 'T' | 'f' | 'F' | 'o' | 'O' | '~' => !SPECIAL.contains(&s),
        '.' => !SPECIAL.contains(&s) && s.parse::<f64>().is_err(),
        '+' | '-' | '0'..='9' => {
            if SPECIAL.contains(&s) || is_timestamp(s) {
                return false;
            }
            let plain = s.replace('_', "");
            !(is_go_int(&plain) || is_yaml_float(&plain))
        }
        _ => true,
    }
}

fn digits(s: &str, radix: u32) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_digit(radix))
}

/// strconv.ParseInt(s, 0, 64) syntax (or ParseUint's, for what overflows).
fn is_go_int(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let lower = s.to_ascii_lowercase();
    if let Some(hex) = lower.strip_prefix("0x") {
        digits(hex, 16)
    } else if let Some(bin) = lower.strip_prefix("0b") {
        digits(bin, 2)
    } else if let Some(oct) = lower.strip_prefix("0o") {
        digits(oct, 8)
    } else if let Some(oct) = s.strip_prefix('0').filter(|r| !r.is_empty()) {
        digits(oct, 8)
    } else {
        digits(s, 10)
    }
}

/// `^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`
fn is_yaml_float(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some(("", frac)) => digits(frac, 10),
        Some((int, frac)) => digits(int, 10) && (frac.is_empty() || digits(frac, 10)),
        None => digits(mantissa, 10),
    };
    mantissa_ok && exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e), 10))
}

/// `^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$`: YAML 1.1 sexagesimal, which go-yaml
/// quotes.
fn is_base60_float(s: &str) -> bool {
    if !s.contains(':') {
        return false;
    }
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (body, frac) = match s.split_once('.') {
        Some((b, f)) => (b, Some(f)),
        None => (s, None),
    };
    let mut parts = body.split(':');
    let head = parts.next().unwrap_or("");
    let head_ok = head.starts_with(|c: char| c.is_ascii_digit())
        && head.chars().all(|c| c.is_ascii_digit() || c == '_');
    let rest_ok = parts.all(|p| {
        let b = p.as_bytes();
        match b.len() {
            1 => b[0].is_ascii_digit(),
            2 => (b'0'..=b'5').contains(&b[0]) && b[1].is_ascii_digit(),
            _ => false,
        }
    });
    head_ok && rest_ok && frac.is_none_or(|f| f.chars().all(|c| c.is_ascii_digit() || c == '_'))
}

/// go-yaml's timestamp forms: `2006-1-2`, and with a time `T15:4:5[.9]Z07:00` or
/// ` 15:4:5[.9]`.
fn is_timestamp(s: &str) -> bool {
    fn number(s: &str, min: usize, max: usize) -> Option<(u32, &str)> {
        let n = s.chars().take_while(char::is_ascii_digit).count();
        if n < min || n > max {
            return None;
        }
        Some((s[..n].parse().ok()?, &s[n..]))
    }
    let Some((_, rest)) = number(s, 4, 4) else {
        return false;
    };
    let date = (|| {
        let (month, rest) = number(rest.strip_prefix('-')?, 1, 2)?;
        let (day, rest) = number(rest.strip_prefix('-')?, 1, 2)?;
        ((1..=12).contains(&month) && (1..=31).contains(&day)).then_some(rest)
    })();
    let Some(rest) = date else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    let (zoned, rest) = match rest.chars().next() {
        Some('T' | 't') => (true, &rest[1..]),
        Some(' ') => (false, &rest[1..]),
        _ => return false,
    };
    let time = (|| {
        let (h, rest) = number(rest, 1, 2)?;
        let (m, rest) = number(rest.strip_prefix(':')?, 1, 2)?;
        let (sec, mut rest) = number(rest.strip_prefix(':')?, 1, 2)?;
        if let Some(frac) = rest.strip_prefix('.') {
            let n = frac.chars().take_while(char::is_ascii_digit).count();
            rest = &frac[n..];
        }
        (h < 24 && m < 60 && sec < 60).then_some(rest)
    })();
    match (time, zoned) {
        (Some(""), false) => true,
        (Some(zone), true) => {
            zone == "Z"
                || zone.len() == 6
                    && zone.starts_with(['+', '-'])
                    && number(&zone[1..3], 2, 2).is_some()
                    && &zone[3..4] == ":"
                    && number(&zone[4..], 2, 2).is_some()
        }
        _ => false,
    }
}

/// A number as JSON and then go-yaml write it.
fn number(n: NumberKind) -> Result<String, String> {
    match n {
        NumberKind::Signed(i) => Ok(i.to_string()),
        NumberKind::Unsigned(u) => Ok(u.to_string()),
        NumberKind::Float(f) if !f.is_finite() => Err(format!(
            "toYaml: {f} cannot be marshaled (JSON has no such number)"
        )),
        // JSON writes it without a fraction, go-yaml reads it back as an integer.
        NumberKind::Float(f) if f.fract() == 0.0 && f.abs() < 1e21 => Ok(format!("{f:.0}")),
        NumberKind::Float(f) => {
            // Go's strconv.FormatFloat(f, 'g', -1, 64).
            let e = format!("{f:e}");
            let (mantissa, exp) = e.split_once('e').expect("exponent form");
            let exp: i32 = exp.parse().expect("exponent");
            if !(-4..6).contains(&exp) {
                let sign = if exp < 0 { '-' } else { '+' };
                Ok(format!("{mantissa}e{sign}{:02}", exp.abs()))
            } else {
                Ok(format!("{f}"))
            }
        }
    }
}

/// go-yaml v2's key order (its keyList.Less) for string keys.
pub fn key_order(a: &str, b: &str) -> Ordering {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut i = 0;
    while i < a.len() && i < b.len() {
        if a[i] == b[i] {
            i += 1;
            continue;
        }
        let (al, bl) = (a[i].is_alphabetic(), b[i].is_alphabetic());
        if al && bl {
            return a[i].cmp(&b[i]);
        }
        if al || bl {
            return if bl {
                Ordering::Less
            } else {
                Ordering::Greater
            };
        }
        let (mut an, mut bn): (i64, i64) = (0, 0);
        if a[i] == '0' || b[i] == '0' {
            let mut j = i;
            while j > 0 && a[j - 1].is_ascii_digit() {
                j -= 1;
                if a[j] != '0' {
                    an = 1;
                    bn = 1;
                    break;
                }
            }
        }
        let mut ai = i;
        while ai < a.len() && a[ai].is_ascii_digit() {
            an = an
                .saturating_mul(10)
                .saturating_add(i64::from(a[ai] as u8 - b'0'));
            ai += 1;
        }
        let mut bi = i;
        while bi < b.len() && b[bi].is_ascii_digit() {
            bn = bn
                .saturating_mul(10)
                .saturating_add(i64::from(b[bi] as u8 - b'0'));
            bi += 1;
        }
        if an != bn {
            return an.cmp(&bn);
        }
        if ai != bi {
            return ai.cmp(&bi);
        }
        return a[i].cmp(&b[i]);
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, Value)]) -> Value {
        Value::Map(
            entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    #[test]
    fn layout() {
        let v = map(&[
            (
                "requests",
                map(&[("memory", "128Mi".into()), ("cpu", "100m".into())]),
            ),
            (
                "list",
                Value::from(vec![
                    Value::from("a"),
                    map(&[("b", 1i64.into()), ("a", true.into())]),
                ]),
            ),
            ("empty", map(&[])),
            ("none", Value::Array(vec![])),
            (
                "nested",
                Value::from(vec![Value::from(vec![
                    Value::from(1i64),
                    Value::from(2i64),
                ])]),
            ),
        ]);
        assert_eq!(
            to_yaml(&v).unwrap(),
            "empty: {}\nlist:\n- a\n- a: true\n  b: 1\nnested:\n- - 1\n  - 2\nnone: []\nrequests:\n  cpu: 100m\n  memory: 128Mi"
        );
    }

    #[test]
    fn string_styles() {
        let cases = [
            ("true", "\"true\""),
            ("15020", "\"15020\""),
            ("0x1F", "\"0x1F\""),
            ("1e3", "\"1e3\""),
            ("2001-12-14", "\"2001-12-14\""),
            ("1:20", "\"1:20\""),
            ("", "\"\""),
            ("*x", "'*x'"),
            ("a: b", "'a: b'"),
            ("it's", "it's"),
            ("trail ", "'trail '"),
            ("a\tb", "\"a\\tb\""),
            ("-x", "-x"),
            ("- x", "'- x'"),
            ("a,b", "a,b"),
            ("héllo", "héllo"),
            ("/metrics", "/metrics"),
        ];
        for (s, want) in cases {
            assert_eq!(to_yaml(&Value::from(s)).unwrap(), want, "{s:?}");
        }
        let multi = map(&[
            ("a", "x\ny\n".into()),
            ("b", "x\ny".into()),
            ("c", " x\ny".into()),
        ]);
        assert_eq!(
            to_yaml(&multi).unwrap(),
            "a: |\n  x\n  y\nb: |-\n  x\n  y\nc: |2-\n   x\n  y"
        );
    }

    #[test]
    fn long_strings_fold_past_column_80() {
        let long = "this is a very long annotation value with many spaces that goes well beyond the eighty column limit";
        assert_eq!(
            to_yaml(&map(&[("long", long.into())])).unwrap(),
            "long: this is a very long annotation value with many spaces that goes well beyond\n  the eighty column limit"
        );
    }

    #[test]
    fn numbers() {
        for (f, want) in [
            (0.5, "0.5"),
            (1e-5, "1e-05"),
            (1234567.5, "1.2345675e+06"),
            (100000.5, "100000.5"),
        ] {
            assert_eq!(number(NumberKind::Float(f)).unwrap(), want);
        }
        assert_eq!(number(NumberKind::Float(1e6)).unwrap(), "1000000");
    }

    #[test]
    fn keys_sort_as_go_yaml() {
        let mut keys = vec![
            "a10", "a2", "A", "a_b", "a.b", "-", "1", "a-b", "a/b", "amp",
        ];
        keys.sort_by(|a, b| key_order(a, b));
        assert_eq!(
            keys,
            ["-", "1", "A", "a-b", "a.b", "a/b", "a_b", "a2", "a10", "amp"]
        );
    }
}
