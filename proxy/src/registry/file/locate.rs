//! Where a field is in a YAML document: the line of `spec.ports[0].port`, for error messages
//! about fields whose problem is found after parsing (semantic checks).

use super::{is_content, is_marker};

#[derive(Debug, PartialEq, Eq)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn parse_path(path: &str) -> Option<Vec<Seg<'_>>> {
    let mut segs = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            segs.push(Seg::Key(key));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            segs.push(Seg::Index(r[..end].parse().ok()?));
            rest = &r[end + 1..];
        }
        if !rest.is_empty() {
            return None;
        }
    }
    Some(segs)
}

/// A content line: 1-based number, indentation, text without the indentation.
struct Line<'a> {
    no: usize,
    indent: usize,
    text: &'a str,
}

/// The (1-based) line of the field at `path` (`spec.ports[0].port`) in a block-style YAML
/// document, or of the deepest part of it that could be found. Best effort: flow style
/// (`{…}`, `[…]`) is not followed. `None` when not even the first key was found.
pub fn locate(text: &str, path: &str) -> Option<usize> {
    let segs = parse_path(path)?;
    let lines: Vec<Line<'_>> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| is_content(l) && !is_marker(l, "---") && !is_marker(l, "..."))
        .map(|(i, l)| {
            let text = l.trim_start_matches(' ');
            Line {
                no: i + 1,
                indent: l.len() - text.len(),
                text: text.trim_end(),
            }
        })
        .collect();

    // A block: lines[start..end], the first one starting at column `head` when it is the
    // inline content of a sequence item (`- name: x`).
    let (mut start, mut end, mut head) = (0, lines.len(), None::<usize>);
    let mut found = None;
    for seg in segs {
        if start >= end {
            break;
        }
        let base = head.unwrap_or(lines[start].indent);
        // Entries of the block: lines at its base indentation, with their content.
        let entries: Vec<(usize, &str)> = (start..end)
            .filter_map(|k| {
                let l = &lines[k];
                match head {
                    Some(col) if k == start => Some((k, &l.text[col - l.indent..])),
                    _ if l.indent == base => Some((k, l.text)),
                    _ => None,
                }
            })
            .collect();
        let is_item = |t: &str| t == "-" || t.starts_with("- ");
        match seg {
            Seg::Key(key) => {
                let Some(pos) = entries.iter().position(|(_, t)| key_matches(t, key)) else {
                    break;
                };
                let k = entries[pos].0;
                found = Some(lines[k].no);
                // A sequence may sit at the key's own indentation (`ports:\n- port: 80`).
                let next = entries[pos + 1..]
                    .iter()
                    .find(|(_, t)| !is_item(t))
                    .map_or(end, |(k, _)| *k);
                (start, end, head) = (k + 1, next, None);
            }
            Seg::Index(n) => {
                let items: Vec<usize> = entries
                    .iter()
                    .filter(|(_, t)| is_item(t))
                    .map(|(k, _)| *k)
                    .collect();
                let Some(&k) = items.get(n) else { break };
                found = Some(lines[k].no);
                let next = entries
                    .iter()
                    .map(|(k, _)| *k)
                    .find(|&e| e > k)
                    .unwrap_or(end);
                let l = &lines[k];
                let item_text = match head {
                    Some(col) if k == start => &l.text[col - l.indent..],
                    _ => l.text,
                };
                let rest = item_text[1..].trim_start();
                if rest.is_empty() {
                    (start, end, head) = (k + 1, next, None);
                } else {
                    let col = l.indent + (l.text.len() - rest.len());
                    (start, end, head) = (k, next, Some(col));
                }
            }
        }
    }
    found
}

fn key_matches(text: &str, key: &str) -> bool {
    let rest = [("", ""), ("\"", "\""), ("'", "'")]
        .iter()
        .find_map(|(open, close)| {
            text.strip_prefix(open)?
                .strip_prefix(key)?
                .strip_prefix(close)
        });
    rest.map(str::trim_start)
        .and_then(|r| r.strip_prefix(':'))
        .is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_walks_block_yaml() {
        let text = "\
apiVersion: v1
kind: Pod
metadata:
  name: p
  labels:
    name: not-this-one
spec:
  containers:
  - name: a
    ports:
    - containerPort: 80
  - name: b
    image: x
    ports:
      - name: http
        containerPort: 8080
      -
        containerPort: 9090
status:
  podIP: 1.2.3.4
";
        assert_eq!(locate(text, "metadata.name"), Some(4));
        assert_eq!(locate(text, "spec.containers[1]"), Some(12));
        assert_eq!(
            locate(text, "spec.containers[1].ports[0].containerPort"),
            Some(16)
        );
        assert_eq!(
            locate(text, "spec.containers[1].ports[1].containerPort"),
            Some(18)
        );
        assert_eq!(
            locate(text, "spec.containers[0].ports[0].containerPort"),
            Some(11)
        );
        assert_eq!(locate(text, "status.podIP"), Some(20));
        assert_eq!(locate(text, "status.missing"), Some(19));
        assert_eq!(locate(text, "nope"), None);
    }

    #[test]
    fn path_parsing() {
        assert_eq!(
            parse_path("items[2].spec.ports[0].port").unwrap(),
            vec![
                Seg::Key("items"),
                Seg::Index(2),
                Seg::Key("spec"),
                Seg::Key("ports"),
                Seg::Index(0),
                Seg::Key("port")
            ]
        );
        assert!(parse_path("a[x]").is_none());
    }
}
