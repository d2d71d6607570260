//! Finding the few entries of a long, ordered rule list that can match a request, without
//! trying them all. Each entry is filed under one key: its exact path, its path prefix (probed
//! at each prefix length present), or, when its path tells nothing (none, or `/`), one of its
//! exact header conditions; a regex path counts by its literal start (`/api/v[0-9]+` by
//! `/api/v`). Regex paths without a literal start are run together, as one lazy DFA over the
//! path that reports each pattern matching (so the cost follows the path and the matches, not
//! the number of patterns), and only those that match are candidates. Entries with none of these (presence checks)
//! are always candidates. Candidates come out in list order, so "first match wins" is kept; the
//! full conditions are checked after, so the index only has to never miss one.

use std::collections::HashMap;

use http::header::HeaderName;
use http::HeaderMap;
use regex_automata::hybrid::dfa::{Cache, OverlappingState, DFA};
use regex_automata::nfa::thompson;
use regex_automata::util::pool::Pool;
use regex_automata::{Anchored, Input, MatchKind};

use super::header::StringMatcher;
use super::path::PathMatch;
use super::Conditions;

/// Candidate entries by path or header.
#[derive(Debug, Default)]
pub struct RuleIndex {
    exact: HashMap<String, Vec<u32>>,
    exact_lower: HashMap<String, Vec<u32>>,
    prefix: HashMap<String, Vec<u32>>,
    prefix_lower: HashMap<String, Vec<u32>>,
    /// Distinct prefix lengths present in `prefix`/`prefix_lower`, ascending.
    lengths: Vec<usize>,
    lower_lengths: Vec<usize>,
    /// Header name → exact value → entries.
    headers: Vec<(HeaderName, HashMap<String, Vec<u32>>)>,
    /// Entries whose path regex has no literal start, and their regexes run at once
    /// (`regex_set` pattern `i` is entry `regex_entries[i]`).
    regex_entries: Vec<u32>,
    regex_set: Option<RegexSet>,
    /// Entries every request may match.
    always: Vec<u32>,
}

/// The compiled size allowed for the regexes run together; past it (tens of thousands of
/// complex patterns) they are tried one by one instead.
const REGEX_SET_SIZE_LIMIT: usize = 256 << 20;
/// The lazy DFA's cache for those regexes, per thread that matches (grown as paths are seen):
/// with thousands of patterns a smaller one is cleared over and over.
const REGEX_SET_CACHE_LIMIT: usize = 32 << 20;

type NewCache =
    Box<dyn Fn() -> Cache + Send + Sync + std::panic::UnwindSafe + std::panic::RefUnwindSafe>;

/// Path regexes run together: a lazy DFA matching all of them at once, with a cache per thread
/// that searches.
struct RegexSet {
    dfa: DFA,
    caches: Pool<Cache, NewCache>,
}

impl std::fmt::Debug for RegexSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegexSet")
            .field("patterns", &self.dfa.pattern_len())
            .finish()
    }
}

impl RegexSet {
    fn new(patterns: &[String]) -> Option<RegexSet> {
        let dfa = DFA::builder()
            .configure(
                DFA::config()
                    // Every pattern that matches, not the first: an overlapping search.
                    .match_kind(MatchKind::All)
                    // `\b` is matched on ASCII paths; a search meeting any other byte gives
                    // up (and every one of these entries is checked instead).
                    .unicode_word_boundary(true)
                    .cache_capacity(REGEX_SET_CACHE_LIMIT),
            )
            .thompson(thompson::Config::new().nfa_size_limit(Some(REGEX_SET_SIZE_LIMIT)))
            .build_many(patterns)
            .ok()?;
        let for_caches = dfa.clone();
        let caches = Pool::new(Box::new(move || for_caches.create_cache()) as NewCache);
        Some(RegexSet { dfa, caches })
    }

    /// Calls `each` with every pattern matching the whole of `path` (a pattern may come more
    /// than once). `false` when the search could not be made (then nothing is known).
    fn each_match(&self, path: &str, mut each: impl FnMut(usize)) -> bool {
        let mut cache = self.caches.get();
        // The patterns are anchored at both ends: a search from the start finds them all.
        let input = Input::new(path).anchored(Anchored::Yes);
        let mut state = OverlappingState::start();
        loop {
            if self
                .dfa
                .try_search_overlapping_fwd(&mut cache, &input, &mut state)
                .is_err()
            {
                return false;
            }
            match state.get_match() {
                Some(m) => each(m.pattern().as_usize()),
                None => return true,
            }
        }
    }
}

impl RuleIndex {
    /// Indexes `entries[i]`, the conditions of entry `i`.
    pub fn new<'a>(entries: impl Iterator<Item = &'a Conditions>) -> RuleIndex {
        let mut ix = RuleIndex::default();
        let mut patterns = Vec::new();
        for (i, c) in entries.enumerate() {
            let i = i as u32;
            match &c.path {
                Some(PathMatch::Exact {
                    value,
                    ignore_case: false,
                }) => ix.exact.entry(value.clone()).or_default().push(i),
                Some(PathMatch::Exact {
                    value,
                    ignore_case: true,
                }) => ix.exact_lower.entry(value.clone()).or_default().push(i),
                // A `/` prefix says nothing: a header may say more.
                Some(PathMatch::Prefix { value, ignore_case }) if value.len() > 1 => {
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
                // A regex's literal start is a prefix every match has.
                Some(PathMatch::Regex { literal, .. }) if literal.len() > 1 => {
                    ix.prefix.entry(literal.clone()).or_default().push(i);
                    ix.lengths.push(literal.len());
                }
                _ => ix.file_by_header(c, i, &mut patterns),
            }
        }
        for lens in [&mut ix.lengths, &mut ix.lower_lengths] {
            lens.sort_unstable();
            lens.dedup();
        }
        if !patterns.is_empty() {
            match RegexSet::new(&patterns) {
                Some(set) => ix.regex_set = Some(set),
                // Each pattern compiled alone (they did, to be here): try each one.
                None => ix.always.append(&mut ix.regex_entries),
            }
        }
        ix.always.sort_unstable();
        ix
    }

    /// Runs `entry`'s regex with the others that have no literal start, if it is one of them.
    fn file_by_regex(&mut self, c: &Conditions, i: u32, patterns: &mut Vec<String>) -> bool {
        match &c.path {
            Some(PathMatch::Regex { regex, .. }) => {
                self.regex_entries.push(i);
                patterns.push(regex.as_str().to_string());
                true
            }
            _ => false,
        }
    }

    fn file_by_header(&mut self, c: &Conditions, i: u32, patterns: &mut Vec<String>) {
        let exact = c.headers.iter().find_map(|h| match (&h.matcher, h.invert) {
            (StringMatcher::Exact(v), false) => Some((&h.name, v)),
            _ => None,
        });
        let Some((name, value)) = exact else {
            if !self.file_by_regex(c, i, patterns) {
                self.always.push(i);
            }
            return;
        };
        let at = match self.headers.iter().position(|(n, _)| n == name) {
            Some(at) => at,
            None => {
                self.headers.push((name.clone(), HashMap::new()));
                self.headers.len() - 1
            }
        };
        self.headers[at].1.entry(value.clone()).or_default().push(i);
    }

    /// Entries that may match a request for `path` with `headers`, ascending, into `out`.
    pub fn candidates(&self, path: &str, headers: &HeaderMap, out: &mut Vec<u32>) {
        out.clear();
        out.extend_from_slice(&self.always);
        if let Some(set) = &self.regex_set {
            let searched = set.each_match(path, |m| out.push(self.regex_entries[m]));
            if !searched {
                // A search the lazy DFA gave up on: each of these entries is checked instead.
                out.extend_from_slice(&self.regex_entries);
            }
        }
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
        for (name, values) in &self.headers {
            let mut all = headers.get_all(name).iter();
            let value = match (all.next(), all.next()) {
                (None, _) => continue,
                (Some(one), None) => one.to_str().ok().map(std::borrow::Cow::Borrowed),
                // A repeated header is matched joined with `,` (see `HeaderMatch`).
                (Some(first), Some(second)) => [first, second]
                    .into_iter()
                    .chain(all)
                    .map(|v| v.to_str().ok())
                    .collect::<Option<Vec<_>>>()
                    .map(|v| std::borrow::Cow::Owned(v.join(","))),
            };
            if let Some(v) = value.and_then(|v| values.get(v.as_ref())) {
                out.extend_from_slice(v);
            }
        }
        out.sort_unstable();
        out.dedup();
    }
}
