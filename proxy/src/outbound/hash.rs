//! Consistent-hash balancing (DestinationRule `loadBalancer.consistentHash`), as Envoy does it:
//! a request's key (a header, a cookie, the client's address or a query parameter) is hashed
//! with xxHash64 and looked up in a ring (`ringHash`, Envoy's default) or a Maglev table, built
//! from the endpoints' addresses, so that a key keeps its endpoint while the endpoints stay.
//! Pure: the tables are built and read here, the request's key is found by the caller.

use std::net::SocketAddr;
use std::time::Duration;

use xxhash_rust::xxh64::xxh64;

use crate::registry::kinds::networking::ConsistentHashLb;

/// What a request is hashed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// The value of this header (lower case).
    Header(String),
    /// This cookie's value; when the request has none and `ttl` is set, one is made and set on
    /// the response (`Max-Age` the ttl, `Path` the path when one is given).
    Cookie {
        name: String,
        path: String,
        ttl: Option<Duration>,
    },
    /// The client's IP address.
    SourceIp,
    /// The value of this query parameter.
    Query(String),
}

/// How the hash is mapped to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Envoy's ring hash with at least this many entries (default 1024).
    Ring(u64),
    /// Envoy's Maglev with a table of this (prime) size (default 65537).
    Maglev(u64),
}

/// A destination's consistent hashing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub key: Key,
    pub kind: Kind,
}

/// Envoy's default ring size, and its cap.
const RING_MIN: u64 = 1024;
const RING_MAX: u64 = 8 * 1024 * 1024;
/// Envoy's default Maglev table size.
const MAGLEV_SIZE: u64 = 65537;

impl Policy {
    /// The policy `consistentHash` asks for; `None` when it names no key.
    pub fn of(c: &ConsistentHashLb) -> Option<Policy> {
        let key = if let Some(h) = c.http_header_name.as_deref().filter(|h| !h.is_empty()) {
            Key::Header(h.to_ascii_lowercase())
        } else if let Some(cookie) = c.http_cookie.as_ref().filter(|c| !c.name.is_empty()) {
            Key::Cookie {
                name: cookie.name.clone(),
                path: cookie.path.clone(),
                ttl: cookie.ttl.as_ref().map(|d| d.0),
            }
        } else if c.use_source_ip == Some(true) {
            Key::SourceIp
        } else if let Some(q) = c
            .http_query_parameter_name
            .as_deref()
            .filter(|q| !q.is_empty())
        {
            Key::Query(q.to_string())
        } else {
            return None;
        };
        let kind = match &c.maglev {
            Some(m) => Kind::Maglev(if m.table_size > 0 {
                m.table_size
            } else {
                MAGLEV_SIZE
            }),
            None => {
                let min = c
                    .ring_hash
                    .as_ref()
                    .map(|r| r.minimum_ring_size)
                    .filter(|n| *n > 0)
                    .unwrap_or(c.minimum_ring_size);
                Kind::Ring(if min > 0 { min.min(RING_MAX) } else { RING_MIN })
            }
        };
        Some(Policy { key, kind })
    }
}

/// A request key's hash (xxHash64, seed 0, as Envoy).
pub fn hash(key: &[u8]) -> u64 {
    xxh64(key, 0)
}

/// Endpoints by hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Table {
    /// (hash, endpoint index), sorted by hash.
    Ring(Vec<(u64, usize)>),
    /// Endpoint index by `hash % len`.
    Maglev(Vec<usize>),
}

impl Table {
    /// The table of `kind` for `endpoints` (indexes into it).
    pub fn build(kind: Kind, endpoints: &[SocketAddr]) -> Table {
        let names: Vec<String> = endpoints.iter().map(SocketAddr::to_string).collect();
        match kind {
            Kind::Ring(min) => {
                let n = names.len().max(1) as u64;
                let per_host = min.div_ceil(n).max(1);
                let mut ring = Vec::with_capacity((per_host * n) as usize);
                for (i, name) in names.iter().enumerate() {
                    for k in 0..per_host {
                        ring.push((hash(format!("{name}_{k}").as_bytes()), i));
                    }
                }
                ring.sort_unstable();
                Table::Ring(ring)
            }
            Kind::Maglev(size) => Table::Maglev(maglev(&names, size as usize)),
        }
    }

    /// The endpoint for a request hashed to `h` among those `usable` accepts: the first
    /// usable one from its place on, along the ring or the table.
    pub fn lookup_among(&self, h: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        match self {
            Table::Ring(ring) => {
                let n = ring.len();
                let start = ring.partition_point(|(x, _)| *x < h);
                (0..n).map(|k| ring[(start + k) % n].1).find(|i| usable(*i))
            }
            Table::Maglev(table) => {
                let n = table.len();
                let start = (h % n.max(1) as u64) as usize;
                (0..n).map(|k| table[(start + k) % n]).find(|i| usable(*i))
            }
        }
    }

    /// The endpoint for a request hashed to `h`.
    pub fn lookup(&self, h: u64) -> Option<usize> {
        match self {
            Table::Ring(ring) => {
                if ring.is_empty() {
                    return None;
                }
                let at = ring.partition_point(|(x, _)| *x < h);
                Some(ring[at % ring.len()].1)
            }
            Table::Maglev(table) => table.get((h % table.len().max(1) as u64) as usize).copied(),
        }
    }
}

/// Maglev's lookup table (Eisenbud et al.): each endpoint takes its preferred free slots in
/// turn, so that each gets an equal share and a change moves few keys.
fn maglev(names: &[String], size: usize) -> Vec<usize> {
    if names.is_empty() || size == 0 {
        return Vec::new();
    }
    let m = size as u64;
    let prefs: Vec<(u64, u64)> = names
        .iter()
        .map(|n| {
            let offset = xxh64(n.as_bytes(), 0) % m;
            let skip = xxh64(n.as_bytes(), 1) % (m - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; names.len()];
    let mut table = vec![usize::MAX; size];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in prefs.iter().enumerate() {
            let mut slot = ((offset + next[i] * skip) % m) as usize;
            while table[slot] != usize::MAX {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % m) as usize;
            }
            table[slot] = i;
            next[i] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

/// The value of cookie `name` in a `Cookie` header's value.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The value of query parameter `name` in a path and query.
pub fn query<'a>(path_and_query: &'a str, name: &str) -> Option<&'a str> {
    let (_, q) = path_and_query.split_once('?')?;
    q.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The `Set-Cookie` value for a cookie made for a request (Envoy's form).
pub fn set_cookie(name: &str, value: &str, path: &str, ttl: Duration) -> String {
    let mut out = format!("{name}=\"{value}\"");
    if !ttl.is_zero() {
        out.push_str(&format!("; Max-Age={}", ttl.as_secs()));
    }
    if !path.is_empty() {
        out.push_str(&format!("; Path={path}"));
    }
    out.push_str("; HttpOnly");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| format!("10.0.0.{i}:80").parse().unwrap())
            .collect()
    }

    #[test]
    fn policies_follow_the_rule() {
        let of = |y: &str| Policy::of(&serde_yaml_ng::from_str(y).unwrap());
        assert_eq!(
            of("{httpHeaderName: X-User}"),
            Some(Policy {
                key: Key::Header("x-user".into()),
                kind: Kind::Ring(1024)
            })
        );
        assert_eq!(
            of("{useSourceIp: true, maglev: {}}").unwrap().kind,
            Kind::Maglev(65537)
        );
        assert_eq!(
            of("{httpQueryParameterName: u, ringHash: {minimumRingSize: 64}}")
                .unwrap()
                .kind,
            Kind::Ring(64)
        );
        assert_eq!(
            of("{httpQueryParameterName: u, minimumRingSize: 32}")
                .unwrap()
                .kind,
            Kind::Ring(32),
            "the deprecated field"
        );
        assert!(matches!(
            of("{httpCookie: {name: s, ttl: 10s}}").unwrap().key,
            Key::Cookie { ttl: Some(_), .. }
        ));
        assert_eq!(of("{}"), None);
    }

    #[test]
    fn a_key_keeps_its_endpoint_and_keys_spread() {
        for kind in [Kind::Ring(1024), Kind::Maglev(65537)] {
            let t = Table::build(kind, &endpoints(3));
            let mut seen = [0usize; 3];
            for k in 0..3000 {
                let h = hash(format!("user-{k}").as_bytes());
                let i = t.lookup(h).unwrap();
                assert_eq!(t.lookup(h), Some(i), "{kind:?}: stable");
                seen[i] += 1;
            }
            assert!(
                seen.iter().all(|n| (700..1300).contains(n)),
                "{kind:?}: spread {seen:?}"
            );
        }
        assert_eq!(Table::build(Kind::Ring(8), &[]).lookup(1), None);
    }

    #[test]
    fn an_unusable_endpoints_keys_spread_over_the_others() {
        for kind in [Kind::Ring(1024), Kind::Maglev(65537)] {
            let t = Table::build(kind, &endpoints(4));
            let mut moved_to = [0usize; 4];
            for k in 0..4000 {
                let h = hash(format!("k{k}").as_bytes());
                let i = t.lookup_among(h, |i| i != 0).unwrap();
                assert_ne!(i, 0);
                if t.lookup(h) == Some(0) {
                    moved_to[i] += 1;
                } else {
                    assert_eq!(Some(i), t.lookup(h), "{kind:?}: the others' keys stay");
                }
            }
            assert!(
                moved_to[1..].iter().all(|n| *n > 100),
                "{kind:?}: spread {moved_to:?}"
            );
        }
        assert_eq!(
            Table::build(Kind::Ring(8), &endpoints(2)).lookup_among(1, |_| false),
            None
        );
    }

    #[test]
    fn removing_an_endpoint_moves_few_keys() {
        for kind in [Kind::Ring(1024), Kind::Maglev(65537)] {
            let all = endpoints(4);
            let before = Table::build(kind, &all);
            let after = Table::build(kind, &all[..3]);
            let moved = (0..4000)
                .filter(|k| {
                    let h = hash(format!("k{k}").as_bytes());
                    let b = before.lookup(h).unwrap();
                    b != 3 && after.lookup(h).unwrap() != b
                })
                .count();
            // Modulo hashing would move about three in four; Envoy's ring re-spreads each
            // endpoint's points over the new count, so some move.
            assert!(
                moved < 800,
                "{kind:?}: {moved} of the kept endpoints' keys moved"
            );
        }
    }

    #[test]
    fn cookies_and_queries_are_read_and_cookies_made() {
        assert_eq!(cookie("a=1; user=bob; b=2", "user"), Some("bob"));
        assert_eq!(cookie("a=1", "user"), None);
        assert_eq!(query("/p?x=1&user=ann", "user"), Some("ann"));
        assert_eq!(query("/p", "user"), None);
        assert_eq!(
            set_cookie("s", "abc", "/", Duration::from_secs(60)),
            "s=\"abc\"; Max-Age=60; Path=/; HttpOnly"
        );
    }
}
