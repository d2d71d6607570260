//! Label and field selectors with kube-apiserver's syntax and semantics.

use serde_json::Value;

use super::resources::RESOURCES;
use super::ResId;

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Eq,
    NotEq,
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
}

#[derive(Debug, Clone)]
struct Requirement {
    key: String,
    op: Op,
    values: Vec<String>,
}

/// A parsed `labelSelector`: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`,
/// `k>1`, `k<1`, joined by commas (all must hold). `!=` and `notin` match objects without the
/// label, as in Kubernetes.
#[derive(Debug, Clone, Default)]
pub(crate) struct LabelSelector {
    reqs: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Eq,
    DoubleEq,
    NotEq,
    Not,
    Gt,
    Lt,
    Open,
    Close,
    Comma,
}

fn lex(s: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            c if c.is_whitespace() => i += 1,
            '=' if next == Some('=') => {
                out.push(Token::DoubleEq);
                i += 2
            }
            '=' => {
                out.push(Token::Eq);
                i += 1
            }
            '!' if next == Some('=') => {
                out.push(Token::NotEq);
                i += 2
            }
            '!' => {
                out.push(Token::Not);
                i += 1
            }
            '>' => {
                out.push(Token::Gt);
                i += 1
            }
            '<' => {
                out.push(Token::Lt);
                i += 1
            }
            '(' => {
                out.push(Token::Open);
                i += 1
            }
            ')' => {
                out.push(Token::Close);
                i += 1
            }
            ',' => {
                out.push(Token::Comma);
                i += 1
            }
            _ => {
                let start = i;
                while i < chars.len() && !chars[i].is_whitespace() && !"=!<>(),".contains(chars[i])
                {
                    i += 1;
                }
                out.push(Token::Ident(chars[start..i].iter().collect()));
            }
        }
    }
    out
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let toks = lex(s);
        let mut reqs = Vec::new();
        let mut i = 0;
        let err = |msg: &str| Err(format!("unable to parse requirement: {msg}"));
        while i < toks.len() {
            let negated = toks[i] == Token::Not;
            if negated {
                i += 1;
            }
            let key = match toks.get(i) {
                Some(Token::Ident(k)) => k.clone(),
                _ => return err("found unexpected token, expected: identifier"),
            };
            i += 1;
            let at_end = |i: usize| i >= toks.len() || toks[i] == Token::Comma;
            if negated {
                if !at_end(i) {
                    return err("found unexpected token after '!key', expected: ',' or end");
                }
                reqs.push(Requirement {
                    key,
                    op: Op::DoesNotExist,
                    values: vec![],
                });
            } else if at_end(i) {
                reqs.push(Requirement {
                    key,
                    op: Op::Exists,
                    values: vec![],
                });
            } else {
                let op = match &toks[i] {
                    Token::Eq | Token::DoubleEq => Op::Eq,
                    Token::NotEq => Op::NotEq,
                    Token::Gt => Op::Gt,
                    Token::Lt => Op::Lt,
                    Token::Ident(w) if w == "in" => Op::In,
                    Token::Ident(w) if w == "notin" => Op::NotIn,
                    _ => {
                        return err(
                            "found unexpected token, expected: '=', '!=', '==', 'in', notin'",
                        )
                    }
                };
                i += 1;
                let mut values = Vec::new();
                match op {
                    Op::In | Op::NotIn => {
                        if toks.get(i) != Some(&Token::Open) {
                            return err("found unexpected token, expected: '('");
                        }
                        i += 1;
                        loop {
                            match toks.get(i) {
                                Some(Token::Ident(v)) => {
                                    values.push(v.clone());
                                    i += 1;
                                }
                                Some(Token::Comma) | Some(Token::Close) => {
                                    values.push(String::new())
                                }
                                _ => return err("found unexpected token in set, expected: ')'"),
                            }
                            match toks.get(i) {
                                Some(Token::Comma) => i += 1,
                                Some(Token::Close) => {
                                    i += 1;
                                    break;
                                }
                                _ => {
                                    return err(
                                        "found unexpected token in set, expected: ',' or ')'",
                                    )
                                }
                            }
                        }
                        // `k in ()` is an empty set in Kubernetes: drop the placeholder.
                        if values.len() == 1 && values[0].is_empty() {
                            values.clear();
                        }
                    }
                    Op::Gt | Op::Lt => match toks.get(i) {
                        Some(Token::Ident(v)) if v.parse::<i64>().is_ok() => {
                            values.push(v.clone());
                            i += 1;
                        }
                        _ => return err("for 'Gt', 'Lt' operators, the value must be an integer"),
                    },
                    _ => {
                        if let Some(Token::Ident(v)) = toks.get(i) {
                            values.push(v.clone());
                            i += 1;
                        } else {
                            values.push(String::new());
                        }
                    }
                }
                reqs.push(Requirement { key, op, values });
            }
            match toks.get(i) {
                None => break,
                Some(Token::Comma) => {
                    i += 1;
                    if i >= toks.len() {
                        return err("found '', expected: identifier after ','");
                    }
                }
                Some(_) => return err("found unexpected token, expected: ','"),
            }
        }
        Ok(LabelSelector { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Whether an object (its `metadata.labels`) matches.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.reqs.iter().all(|r| {
            let v = get(&r.key);
            match r.op {
                Op::Eq | Op::In => v.is_some_and(|v| r.values.iter().any(|x| x == v)),
                Op::NotEq | Op::NotIn => v.is_none_or(|v| !r.values.iter().any(|x| x == v)),
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
                Op::Gt | Op::Lt => {
                    let (Some(v), Ok(bound)) = (
                        v.and_then(|v| v.parse::<i64>().ok()),
                        r.values[0].parse::<i64>(),
                    ) else {
                        return false;
                    };
                    if r.op == Op::Gt {
                        v > bound
                    } else {
                        v < bound
                    }
                }
            }
        })
    }
}

/// A parsed `fieldSelector`: `field=value`, `field==value`, `field!=value`, joined by commas;
/// `\`, `,` and `=` in values are escaped with `\`. Only the fields the resource type supports
/// are accepted (`field label not supported: …` otherwise, as the real server says).
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

/// Splits `s` at unescaped `sep`.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            parts.last_mut().unwrap().push('\\');
            parts.last_mut().unwrap().push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(String::new());
        } else {
            parts.last_mut().unwrap().push(c);
        }
    }
    parts
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                Some(e) => {
                    return Err(format!(
                        "invalid field selector: invalid escape sequence: \\{e}"
                    ))
                }
                None => return Err("invalid field selector: unterminated escape".into()),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

impl FieldSelector {
    pub fn parse(s: &str, res: ResId) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector { reqs });
        }
        for term in split_unescaped(s, ',') {
            if term.is_empty() {
                continue;
            }
            let (key, eq, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                ));
            };
            let key = key.trim().to_string();
            let supported = key == "metadata.name"
                || key == "metadata.namespace"
                || RESOURCES[res].fields.contains(&key.as_str());
            if !supported {
                return Err(format!("field label not supported: {key}"));
            }
            reqs.push((key, eq, unescape(value)?));
        }
        Ok(FieldSelector { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// The value of `metadata.name=` if the selector pins one name (lets a watch of a single
    /// object be expressed as a field selector).
    pub fn with_name(name: &str) -> Self {
        FieldSelector {
            reqs: vec![("metadata.name".into(), true, name.into())],
        }
    }

    pub fn and(mut self, other: FieldSelector) -> Self {
        self.reqs.extend(other.reqs);
        self
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs
            .iter()
            .all(|(k, eq, v)| (field_value(obj, k) == *v) == *eq)
    }
}

/// A selectable field's value as the real server's `GetAttrs` gives it (missing: `""`).
fn field_value(obj: &Value, field: &str) -> String {
    let path = match field {
        "source" => "/source/component".to_string(),
        f => format!("/{}", f.replace('.', "/")),
    };
    match obj.pointer(&path) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}, "spec": {"nodeName": "n1"}})
    }

    #[test]
    fn label_selectors() {
        let o = obj(json!({"app": "web", "tier": "1"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("other!=x"));
        assert!(m("app in (web, api)"));
        assert!(!m("app notin (web)"));
        assert!(m("!other"));
        assert!(!m("!app"));
        assert!(m("tier>0,tier<2"));
        assert!(m(""));
        assert!(LabelSelector::parse("app=")
            .unwrap()
            .matches(&obj(json!({"app": ""}))));
        assert!(LabelSelector::parse("app in (a").is_err());
        assert!(LabelSelector::parse("app=web,").is_err());
    }

    #[test]
    fn field_selectors() {
        let pods = super::super::resources::find("", "v1", "pods").unwrap();
        let o = obj(json!({}));
        let m = |s: &str| FieldSelector::parse(s, pods).unwrap().matches(&o);
        assert!(m("metadata.name=a"));
        assert!(m("metadata.namespace==ns,spec.nodeName=n1"));
        assert!(!m("spec.nodeName!=n1"));
        assert!(m("status.phase="));
        assert_eq!(
            FieldSelector::parse("spec.foo=x", pods).unwrap_err(),
            "field label not supported: spec.foo"
        );
    }
}
