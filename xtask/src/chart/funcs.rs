//! The Helm template functions the chart uses, with Helm's (and Sprig's) semantics. The chart
//! may use no other: the template parser refuses an unknown function by name.

use std::cell::RefCell;
use std::rc::Rc;

use gtmpl_ng::{Context, Func, FuncError, NumberKind, Template, Value};

use super::toyaml;

/// Every function added to Go's builtins (which bring `and`, `or`, `not`, `eq`, `ne`, `lt`,
/// `le`, `gt`, `ge`, `len`, `index`, `print`, `printf`, `println`).
pub const FUNCS: &[(&str, Func)] = &[
    ("include", include),
    ("required", required),
    ("toYaml", to_yaml),
    ("indent", indent),
    ("nindent", nindent),
    ("default", default),
    ("quote", quote),
    ("b64enc", b64enc),
    ("trunc", trunc),
    ("trimSuffix", trim_suffix),
    ("replace", replace),
    ("list", list),
];

/// A chart's template files: (name, text).
pub type Sources = Rc<Vec<(String, String)>>;

thread_local! {
    /// The templates of the chart being rendered: what `include` looks names up in.
    static SOURCES: RefCell<Option<Sources>> = const { RefCell::new(None) };
}

/// Makes `sources` what `include` sees until the guard is dropped.
pub fn with_sources(sources: Sources) -> SourcesGuard {
    SOURCES.with(|s| *s.borrow_mut() = Some(sources));
    SourcesGuard
}

pub struct SourcesGuard;

impl Drop for SourcesGuard {
    fn drop(&mut self) {
        SOURCES.with(|s| *s.borrow_mut() = None);
    }
}

/// A template set as Helm builds it: every file parsed into one set (so a `define` anywhere is
/// visible everywhere), `name` the one executed.
pub fn template_set(
    name: &str,
    text: &str,
    sources: &[(String, String)],
) -> Result<Template, String> {
    let mut t = Template::with_limits(gtmpl_ng::Limits::unlimited());
    t.name = name.to_string();
    t.add_funcs(FUNCS);
    t.parse(text).map_err(|e| format!("{name}: {e}"))?;
    for (other, source) in sources {
        if other != name {
            t.add_template(other.as_str(), source.as_str())
                .map_err(|e| format!("{other}: {e}"))?;
        }
    }
    Ok(t)
}

fn err(msg: impl Into<String>) -> FuncError {
    FuncError::Generic(msg.into())
}

fn arity(name: &str, args: &[Value], n: usize) -> Result<(), FuncError> {
    if args.len() != n {
        return Err(FuncError::ExactlyXArgs(name.into(), n));
    }
    Ok(())
}

/// Sprig's strval: a string as it is, anything else as Go's `%v` prints it.
fn strval(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::NoValue | Value::Nil => "<nil>".into(),
        other => other.to_string(),
    }
}

fn int(name: &str, v: &Value) -> Result<i64, FuncError> {
    match v {
        Value::Number(n) => match n.kind() {
            NumberKind::Signed(i) => Ok(i),
            NumberKind::Unsigned(u) => {
                i64::try_from(u).map_err(|_| err(format!("{name}: {u} is too large")))
            }
            NumberKind::Float(f) => Ok(f as i64),
        },
        Value::String(s) => s
            .parse()
            .map_err(|_| err(format!("{name}: {s:?} is not a number"))),
        other => Err(err(format!("{name}: {other} is not a number"))),
    }
}

/// Sprig's `empty`: nil, false, 0, "" and empty collections.
fn empty(v: &Value) -> bool {
    match v {
        Value::NoValue | Value::Nil => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Number(n) => match n.kind() {
            NumberKind::Signed(i) => i == 0,
            NumberKind::Unsigned(u) => u == 0,
            NumberKind::Float(f) => f == 0.0,
        },
        Value::Array(a) => a.is_empty(),
        Value::Map(m) | Value::Object(m) => m.is_empty(),
        Value::Function(_) => false,
    }
}

/// `include NAME DATA`: the named template's output, as a string for a pipeline.
fn include(args: &[Value]) -> Result<Value, FuncError> {
    arity("include", args, 2)?;
    let Value::String(name) = &args[0] else {
        return Err(err("include: the template name must be a string"));
    };
    let sources = SOURCES
        .with(|s| s.borrow().clone())
        .ok_or_else(|| err("include: no chart is being rendered"))?;
    // Go quotes a string literal as Rust's Debug does for the characters a name holds.
    let call = format!("{{{{template {name:?} .}}}}");
    let t = template_set("include", &call, &sources).map_err(err)?;
    let out = t
        .render(&Context::from(args[1].clone()))
        .map_err(|e| err(format!("include {name:?}: {e}")))?;
    Ok(Value::String(out))
}

/// `required MSG VALUE`: fails the render with MSG when VALUE is nil or "".
fn required(args: &[Value]) -> Result<Value, FuncError> {
    arity("required", args, 2)?;
    match &args[1] {
        Value::NoValue | Value::Nil => Err(err(strval(&args[0]))),
        Value::String(s) if s.is_empty() => Err(err(strval(&args[0]))),
        v => Ok(v.clone()),
    }
}

fn to_yaml(args: &[Value]) -> Result<Value, FuncError> {
    arity("toYaml", args, 1)?;
    toyaml::to_yaml(&args[0]).map(Value::String).map_err(err)
}

fn pad(name: &str, args: &[Value]) -> Result<String, FuncError> {
    arity(name, args, 2)?;
    let n = int(name, &args[0])?.max(0) as usize;
    let pad = " ".repeat(n);
    Ok(format!(
        "{pad}{}",
        strval(&args[1]).replace('\n', &format!("\n{pad}"))
    ))
}

fn indent(args: &[Value]) -> Result<Value, FuncError> {
    pad("indent", args).map(Value::String)
}

fn nindent(args: &[Value]) -> Result<Value, FuncError> {
    pad("nindent", args).map(|s| Value::String(format!("\n{s}")))
}

/// `default DEFAULT [VALUE]`: VALUE unless it is empty.
fn default(args: &[Value]) -> Result<Value, FuncError> {
    match args {
        [d] => Ok(d.clone()),
        [d, given] => Ok(if empty(given) {
            d.clone()
        } else {
            given.clone()
        }),
        _ => Err(FuncError::AtLeastXArgs("default".into(), 1)),
    }
}

/// `quote A...`: each non-nil argument as Go's `%q` writes it, joined by spaces.
fn quote(args: &[Value]) -> Result<Value, FuncError> {
    let quoted: Vec<String> = args
        .iter()
        .filter(|v| !matches!(v, Value::Nil | Value::NoValue))
        .map(|v| go_quote(&strval(v)))
        .collect();
    Ok(Value::String(quoted.join(" ")))
}

/// Go's strconv.Quote.
pub fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{07}' => out.push_str("\\a"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{0B}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7F => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn b64enc(args: &[Value]) -> Result<Value, FuncError> {
    arity("b64enc", args, 1)?;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = strval(&args[0]).into_bytes();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    Ok(Value::String(out))
}

/// `trunc N S`: the first N bytes of S (the last -N when N is negative).
fn trunc(args: &[Value]) -> Result<Value, FuncError> {
    arity("trunc", args, 2)?;
    let n = int("trunc", &args[0])?;
    let s = strval(&args[1]);
    let len = s.len() as i64;
    let cut = if n < 0 && len + n > 0 {
        &s[(len + n) as usize..]
    } else if n >= 0 && len > n {
        &s[..n as usize]
    } else {
        &s[..]
    };
    Ok(Value::String(cut.to_string()))
}

fn trim_suffix(args: &[Value]) -> Result<Value, FuncError> {
    arity("trimSuffix", args, 2)?;
    let (suffix, s) = (strval(&args[0]), strval(&args[1]));
    Ok(Value::String(
        s.strip_suffix(suffix.as_str()).unwrap_or(&s).to_string(),
    ))
}

/// `replace OLD NEW S`.
fn replace(args: &[Value]) -> Result<Value, FuncError> {
    arity("replace", args, 3)?;
    let (old, new, s) = (strval(&args[0]), strval(&args[1]), strval(&args[2]));
    if old.is_empty() {
        return Err(err("replace: an empty string to replace is not supported"));
    }
    Ok(Value::String(s.replace(&old, &new)))
}

fn list(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::Array(args.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helm_string_functions() {
        let s = |v: &str| Value::from(v);
        assert_eq!(b64enc(&[s("weft")]).unwrap(), s("d2VmdA=="));
        assert_eq!(b64enc(&[s("ab")]).unwrap(), s("YWI="));
        assert_eq!(b64enc(&[s("abc")]).unwrap(), s("YWJj"));
        assert_eq!(trunc(&[Value::from(3i64), s("weft")]).unwrap(), s("wef"));
        assert_eq!(trunc(&[Value::from(-2i64), s("weft")]).unwrap(), s("ft"));
        assert_eq!(quote(&[s("a\"b\n")]).unwrap(), s("\"a\\\"b\\n\""));
        assert_eq!(quote(&[Value::from(15020i64)]).unwrap(), s("\"15020\""));
        assert_eq!(default(&[s("d"), s("")]).unwrap(), s("d"));
        assert_eq!(default(&[s("d"), s("x")]).unwrap(), s("x"));
        assert_eq!(default(&[s("d"), Value::from(false)]).unwrap(), s("d"));
        assert_eq!(
            nindent(&[Value::from(2i64), s("a\nb")]).unwrap(),
            s("\n  a\n  b")
        );
        assert!(required(&[s("need it"), s("")]).is_err());
        assert_eq!(trim_suffix(&[s("-"), s("weft-")]).unwrap(), s("weft"));
    }
}
