//! Finding the few entries of a long, ordered rule list whose path condition can match a
//! request, without trying them all: exact paths and prefixes in hash maps (prefixes probed at
//! each prefix length present), the rest (regexes, no path) always candidates. Candidates come
//! out in list order, so "first match wins" is kept; the full conditions are checked after.

use std::collections::HashMap;

use super::path::PathMatch;

/// Candidate entries by path.
#[derive(Debug, Default)]
pub struct PathIndex {
    exact: HashMap<String, Vec<u32>>,
    exact_lower: HashMap<String, Vec<u32>>,
    prefix: HashMap<String, Vec<u32>>,
    prefix_lower: HashMap<String, Vec<u32>>,
    /// Distinct prefix lengths present in `prefix`/`prefix_lower`, ascending.
    lengths: Vec<usize>,
    lower_lengths: Vec<usize>,
    /// Entries every path may match (regex, no path condition, `/` prefixes).
    always: Vec<u32>,
}

impl PathIndex {
    /// Indexes `paths[i]`, the path condition of entry `i`.
    pub fn new<'a>(paths: impl Iterator<Item = Option<&'a PathMatch>>) -> PathIndex {
        let mut ix = PathIndex::default();
        for (i, p) in paths.enumerate() {
            let i = i as u32;
            match p {
                Some(PathMatch::Exact {
                    value,
                    ignore_case: false,
                }) => ix.exact.entry(value.clone()).or_default().push(i),
                Some(PathMatch::Exact {
                    value,
                    ignore_case: true,
                }) => ix.exact_lower.entry(value.clone()).or_default().push(i),
                Some(PathMatch::Prefix { value, ignore_case }) if !value.is_empty() => {
                    let (map, lens) = if *ignore_case {
                        (&mut ix.prefix_lower, &mut ix.lower_lengths)
                    } else {
                        (&mut ix.prefix, &mut ix.lengths)
                    };
                    map.entry(value.clone()).or_default().push(i);
                    lens.push(value.len());
                }
                Some(PathMatch::Segments(value)) if !value.is_empty() => {
                    ix.prefix.entry(value.clone()).or_default().push(i);
                    ix.lengths.push(value.len());
                }
                _ => ix.always.push(i),
            }
        }
        for lens in [&mut ix.lengths, &mut ix.lower_lengths] {
            lens.sort_unstable();
            lens.dedup();
        }
        ix
    }

    /// Entries whose path condition may match `path`, in ascending order, into `out`.
    pub fn candidates(&self, path: &str, out: &mut Vec<u32>) {
        out.clear();
        out.extend_from_slice(&self.always);
        if let Some(v) = self.exact.get(path) {
            out.extend_from_slice(v);
        }
        for &len in &self.lengths {
            let Some(head) = path.get(..len) else { break };
            if let Some(v) = self.prefix.get(head) {
                out.extend_from_slice(v);
            }
        }
        if !self.exact_lower.is_empty() || !self.prefix_lower.is_empty() {
            let lower = path.to_ascii_lowercase();
            if let Some(v) = self.exact_lower.get(&lower) {
                out.extend_from_slice(v);
            }
            for &len in &self.lower_lengths {
                let Some(head) = lower.get(..len) else { break };
                if let Some(v) = self.prefix_lower.get(head) {
                    out.extend_from_slice(v);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
    }
}
