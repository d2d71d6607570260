//! SPIFFE ids of workloads and their encoding as a TLS server name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest trust domain the SPIFFE spec allows.
const MAX_TRUST_DOMAIN: usize = 255;
/// Longest SPIFFE id (URI) the SPIFFE spec allows.
const MAX_ID: usize = 2048;

/// A workload identity, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Constructed only through [`SpiffeId::new`] or [`FromStr`], both of which validate every part,
/// so a `SpiffeId` is always well formed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a valid SPIFFE id (or part of one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("not a spiffe:// URI")]
    Scheme,
    #[error("invalid trust domain {0:?}: lowercase letters, digits, '.', '-' and '_' only, 1-255 characters")]
    TrustDomain(String),
    #[error("path must be /ns/<namespace>/sa/<service-account>")]
    Path,
    #[error("invalid {what} {value:?}: letters, digits, '.', '-' and '_' only, not '.' or '..'")]
    Segment { what: &'static str, value: String },
    #[error("SPIFFE id longer than 2048 bytes")]
    TooLong,
}

impl SpiffeId {
    /// Validates and builds an id.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, SpiffeIdError> {
        let id = SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        validate_trust_domain(&id.trust_domain)?;
        validate_segment("namespace", &id.namespace)?;
        validate_segment("service account", &id.service_account)?;
        if id.to_string().len() > MAX_ID {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// Istio's principal form, `<td>/ns/<ns>/sa/<sa>` (the id without `spiffe://`), as used in
    /// `AuthorizationPolicy` `principals`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl SpiffeId {
    /// The URI's parts, in order.
    fn parts(&self) -> [&str; 6] {
        [
            "spiffe://",
            &self.trust_domain,
            "/ns/",
            &self.namespace,
            "/sa/",
            &self.service_account,
        ]
    }

    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`, written directly (what
    /// `to_string` gives, without the formatting machinery: a flow writes one or two per
    /// connection).
    pub fn uri(&self) -> String {
        self.parts().concat()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.parts().into_iter().try_for_each(|p| f.write_str(p))
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    /// Strict: exactly `spiffe://<td>/ns/<ns>/sa/<sa>`; no port, user info, query, fragment,
    /// percent-encoding, empty or dot segments, trailing slash, or upper case in the trust
    /// domain or scheme.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_ID {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let (td, path) = rest.split_once('/').ok_or(SpiffeIdError::Path)?;
        validate_trust_domain(td)?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => SpiffeId::new(td, ns, sa),
            _ => Err(SpiffeIdError::Path),
        }
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// SPIFFE trust domain: `[a-z0-9._-]+`, at most 255 characters.
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    let ok = !td.is_empty()
        && td.len() <= MAX_TRUST_DOMAIN
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::TrustDomain(td.to_string()))
    }
}

/// SPIFFE path segment: `[A-Za-z0-9._-]+`, not `.` or `..`.
fn validate_segment(what: &'static str, seg: &str) -> Result<(), SpiffeIdError> {
    let ok = !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::Segment {
            what,
            value: seg.to_string(),
        })
    }
}

/// Suffix of every name produced by [`sni_for`].
pub const SNI_SUFFIX: &str = "weft-identity";
/// Label that marks the hashed form of [`sni_for`].
const SNI_HASH_LABEL: &str = "h";
/// Longest DNS name (rustls refuses longer server names).
const MAX_DNS_NAME: usize = 253;
/// Longest DNS label.
const MAX_LABEL: usize = 63;

/// The TLS server name (SNI) a client puts in its ClientHello to ask a node for the SVID of
/// `id`. The destination node serves the certificate of that identity if it hosts it.
///
/// Encoding: the principal `<td>/ns/<ns>/sa/<sa>` as RFC 4648 base32 (lowercase alphabet
/// `a-z2-7`, no padding), cut into DNS labels of at most 63 characters, followed by
/// `.weft-identity`. Example: `cluster.local/ns/default/sa/sleep` →
/// `mnwhk43umvzc43dpmnqwyl3oomxwizlgmf2wy5bponqs643mmvsxa.weft-identity`. Base32 is reversible
/// ([`identity_from_sni`]), case-insensitive like DNS, and unambiguous although trust domains and
/// service accounts may contain dots.
///
/// A principal too long for a 253-character DNS name (over 147 bytes) is sent hashed instead:
/// `<base32(sha256(principal))>.h.weft-identity`. That form is not reversible; the server
/// matches it against the identities it hosts.
pub fn sni_for(id: &SpiffeId) -> String {
    let principal = id.principal();
    let encoded = base32_encode(principal.as_bytes());
    let dns = labels(&encoded) + "." + SNI_SUFFIX;
    if dns.len() <= MAX_DNS_NAME {
        return dns;
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, principal.as_bytes());
    format!(
        "{}.{SNI_HASH_LABEL}.{SNI_SUFFIX}",
        base32_encode(digest.as_ref())
    )
}

/// Decodes a name made by [`sni_for`]. `None` for anything else, and for the hashed form.
pub fn identity_from_sni(name: &str) -> Option<SpiffeId> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let body = name.strip_suffix(SNI_SUFFIX)?.strip_suffix('.')?;
    if body.ends_with(&format!(".{SNI_HASH_LABEL}")) {
        return None;
    }
    if body.split('.').any(|l| l.is_empty() || l.len() > MAX_LABEL) {
        return None;
    }
    let bytes = base32_decode(&body.replace('.', ""))?;
    let principal = String::from_utf8(bytes).ok()?;
    format!("spiffe://{principal}").parse().ok()
}

fn labels(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / MAX_LABEL + 1);
    for (i, chunk) in s.as_bytes().chunks(MAX_LABEL).enumerate() {
        if i > 0 {
            out.push('.');
        }
        // base32 output is ASCII.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
    }
    out
}

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

fn base32_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let mut buf: u32 = 0;
    let mut bits = 0;
    for &b in data {
        buf = (buf << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(BASE32[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn base32_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 5 / 8);
    let mut buf: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = BASE32.iter().position(|&x| x == c)? as u32;
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    // Leftover bits must be zero padding of the last character, fewer than 5.
    if bits >= 5 || buf & ((1 << bits) - 1) != 0 {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let id = SpiffeId::new("cluster.local", "default", "sleep").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
        let back: SpiffeId = id.to_string().parse().unwrap();
        assert_eq!(back, id);
        assert_eq!(back.trust_domain(), "cluster.local");
        assert_eq!(back.namespace(), "default");
        assert_eq!(back.service_account(), "sleep");
        let id: SpiffeId = "spiffe://example.org/ns/a-b/sa/c.d_e-F".parse().unwrap();
        assert_eq!(id.service_account(), "c.d_e-F");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://example.org/ns/a-b/sa/c.d_e-F\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    }

    #[test]
    fn parse_rejects() {
        for bad in [
            "",
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "SPIFFE://cluster.local/ns/a/sa/b",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local:8080/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/./sa/b",
            "spiffe://cluster.local/ns/a/sa/..",
            "spiffe://cluster.local/ns/a%20/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/b#f",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns/a/serviceaccount/b",
            "spiffe://cluster.local//ns/a/sa/b",
            " spiffe://cluster.local/ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "accepted {bad:?}");
        }
        let long = format!("spiffe://{}/ns/a/sa/b", "a".repeat(256));
        assert!(long.parse::<SpiffeId>().is_err());
        assert!(SpiffeId::new("td", "a/b", "c").is_err());
        assert!(SpiffeId::new("td", "a", "").is_err());
    }

    #[test]
    fn base32_round_trip() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let enc = base32_encode(&data);
            assert_eq!(base32_decode(&enc).unwrap(), data, "len {len}");
        }
        assert_eq!(base32_encode(b"foobar"), "mzxw6ytboi");
        assert!(base32_decode("mzxw6ytbo1").is_none());
        // A last character with non-zero padding bits is not canonical.
        assert!(base32_decode("mzxw6ytboj").is_none());
    }

    #[test]
    fn sni_round_trip_and_dns_safe() {
        let ids = [
            SpiffeId::new("cluster.local", "default", "sleep").unwrap(),
            SpiffeId::new("a.b.c", "ns-1", "svc.account.with.dots").unwrap(),
            SpiffeId::new("td_x", "N", "S_A").unwrap(),
            SpiffeId::new("cluster.local", "n".repeat(63), "s".repeat(60)).unwrap(),
        ];
        for id in &ids {
            let sni = sni_for(id);
            assert!(sni.len() <= MAX_DNS_NAME);
            assert!(sni.ends_with(".weft-identity"), "{sni}");
            assert!(
                rustls::pki_types::ServerName::try_from(sni.clone()).is_ok(),
                "{sni}"
            );
            assert_eq!(identity_from_sni(&sni).as_ref(), Some(id), "{sni}");
            assert_eq!(
                identity_from_sni(&sni.to_ascii_uppercase()).as_ref(),
                Some(id)
            );
        }
        assert_eq!(
            sni_for(&ids[0]),
            "mnwhk43umvzc43dpmnqwyl3oomxwizlgmf2wy5bponqs643mmvsxa.weft-identity"
        );
        assert!(identity_from_sni("example.com").is_none());
        assert!(identity_from_sni("zzzz.weft-identity").is_none());
    }

    #[test]
    fn long_identity_is_hashed() {
        let id = SpiffeId::new("cluster.local", "n".repeat(63), "s".repeat(200)).unwrap();
        let sni = sni_for(&id);
        assert!(sni.ends_with(".h.weft-identity"), "{sni}");
        assert!(rustls::pki_types::ServerName::try_from(sni.clone()).is_ok());
        assert_eq!(identity_from_sni(&sni), None);
        assert_eq!(sni, sni_for(&id));
    }
}
