//! Trace context propagation: reading the context a request arrives with (W3C Trace Context,
//! Zipkin B3 multi-header and single-header) and rewriting it so that the next hop sees this
//! hop's span as its parent.
//!
//! Pure functions over header bytes and an [`http::HeaderMap`]: no clock, no randomness (the
//! caller brings the new ids and the sampling decision), no I/O. Parsing never allocates;
//! rewriting allocates only the header values it writes.
//!
//! # What is read
//!
//! - W3C `traceparent` (<https://www.w3.org/TR/trace-context/>): `VV-<32 hex>-<16 hex>-FF`, lower
//!   case only; version `ff` is invalid; version `00` is exactly 55 characters; a higher version
//!   may be longer if character 55 is `-` (read as `00`). All-zero ids are invalid, and so are
//!   two `traceparent` headers. The sampled flag is always a decision.
//! - B3 multi-header (<https://github.com/openzipkin/b3-propagation>): `x-b3-traceid` (16 or 32
//!   hex; a 64-bit id is left-padded with zeros), `x-b3-spanid` (16 hex), `x-b3-sampled` (`1`/
//!   `true` accept, `0`/`false` deny, anything else or absent: no decision), `x-b3-flags: 1`
//!   (debug: accept, whatever `x-b3-sampled` says). Hex of either case, as Envoy reads it.
//! - B3 single-header `b3`: `<traceid>-<spanid>[-<sampling>[-<parentspanid>]]` or a lone
//!   `<sampling>`, sampling `0` (deny), `1` (accept) or `d` (debug).
//!
//! A valid `traceparent` wins; else B3 multi-header ids; else single-header ids. Without ids
//! anywhere, a B3 sampling decision alone still counts (multi-header first).
//!
//! # What is written
//!
//! Every format the request came with (its header present, valid or not) is rewritten with the
//! same trace id, this hop's span id and the decision: `traceparent` (version `00`, the sampled
//! flag, and the random flag kept from a W3C parent; `tracestate` is kept unchanged, or removed
//! when it came with an invalid `traceparent`), `x-b3-traceid`/`x-b3-spanid`/
//! `x-b3-parentspanid` (the incoming span id)/`x-b3-sampled` (left alone when debug), and `b3`
//! (`<traceid>-<spanid>-<1|0|d>[-<parentspanid>]`). B3 trace ids are written as 16 hex when
//! their upper half is zero, as Envoy does. A request that came with no format gets a
//! `traceparent`.
//!
//! May import: `http`. Nothing of the crate.

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
pub const B3_TRACE_ID: &str = "x-b3-traceid";
pub const B3_SPAN_ID: &str = "x-b3-spanid";
pub const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
pub const B3_SAMPLED: &str = "x-b3-sampled";
pub const B3_FLAGS: &str = "x-b3-flags";
pub const B3: &str = "b3";

/// The W3C `sampled` trace flag.
const FLAG_SAMPLED: u8 = 0x01;
/// The W3C (level 2) `random` trace flag: kept when the trace id comes from a W3C parent.
const FLAG_RANDOM: u8 = 0x02;
/// `traceparent` length for version `00`.
const TRACEPARENT_LEN: usize = 55;

/// The sampling decision a request carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    /// No decision: this hop decides (a new trace, or B3 without a sampled flag).
    Unset,
    Deny,
    Accept,
    /// B3 debug (`x-b3-flags: 1`, `b3: …-d`): sampled, and propagated as debug.
    Debug,
}

impl Sampling {
    /// The decision, if there is one.
    pub fn decision(self) -> Option<bool> {
        match self {
            Sampling::Unset => None,
            Sampling::Deny => Some(false),
            Sampling::Accept | Sampling::Debug => Some(true),
        }
    }
}

/// The ids of the incoming span: the trace, and the span that becomes this hop's parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    pub trace_id: u128,
    pub span_id: u64,
}

/// A valid `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub ids: Ids,
    pub flags: u8,
}

impl TraceParent {
    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }
}

/// What a B3 header (or header set) says: ids if they are valid, and a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct B3Context {
    pub ids: Option<Ids>,
    pub sampling: Sampling,
}

/// Which formats a request came with (the header is present, valid or not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Formats {
    pub w3c: bool,
    pub b3_multi: bool,
    pub b3_single: bool,
}

/// The context read from a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extracted {
    /// The incoming trace and span, from the first valid format.
    pub ids: Option<Ids>,
    pub sampling: Sampling,
    /// The formats to rewrite.
    pub formats: Formats,
    /// The valid `traceparent` (the context then came from it, and `tracestate` belongs to it).
    pub w3c: Option<TraceParent>,
}

/// This hop's context, to write for the next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub trace_id: u128,
    /// This hop's span: the next hop's parent.
    pub span_id: u64,
    /// The incoming span (this hop's parent), if any.
    pub parent_span_id: Option<u64>,
    pub sampled: bool,
    /// B3 debug: propagated as `d` in `b3`.
    pub debug: bool,
}

/// The value of a hex digit (`upper`: also `A`–`F`).
#[inline]
fn hex_digit(c: u8, upper: bool) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' if upper => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A hex number of up to 32 digits (no sign, no prefix).
fn parse_hex(s: &[u8], upper: bool) -> Option<u128> {
    if s.is_empty() || s.len() > 32 {
        return None;
    }
    s.iter().try_fold(0u128, |acc, &c| {
        Some((acc << 4) | u128::from(hex_digit(c, upper)?))
    })
}

/// A non-zero id of exactly `len` hex digits.
fn parse_id(s: &[u8], len: usize, upper: bool) -> Option<u128> {
    (s.len() == len)
        .then(|| parse_hex(s, upper))
        .flatten()
        .filter(|&v| v != 0)
}

/// A B3 trace id: 32 hex, or 16 hex left-padded with zeros.
fn parse_b3_trace_id(s: &[u8]) -> Option<u128> {
    match s.len() {
        16 | 32 => parse_id(s, s.len(), true),
        _ => None,
    }
}

fn parse_b3_span_id(s: &[u8]) -> Option<u64> {
    parse_id(s, 16, true).map(|v| v as u64)
}

/// A `traceparent` value, if valid.
pub fn parse_traceparent(v: &[u8]) -> Option<TraceParent> {
    if v.len() < TRACEPARENT_LEN {
        return None;
    }
    match parse_hex(&v[0..2], false)? {
        0xff => return None,
        0 if v.len() != TRACEPARENT_LEN => return None,
        _ if v.len() > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != b'-' => return None,
        _ => {}
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = parse_id(&v[3..35], 32, false)?;
    let span_id = parse_id(&v[36..52], 16, false)? as u64;
    let flags = parse_hex(&v[53..55], false)? as u8;
    Some(TraceParent {
        ids: Ids { trace_id, span_id },
        flags,
    })
}

/// A B3 single-header sampling field.
fn parse_b3_sampling(s: &[u8]) -> Option<Sampling> {
    match s {
        b"0" => Some(Sampling::Deny),
        b"1" => Some(Sampling::Accept),
        b"d" => Some(Sampling::Debug),
        _ => None,
    }
}

/// A `b3` single-header value, if valid.
pub fn parse_b3_single(v: &[u8]) -> Option<B3Context> {
    let mut parts = v.split(|&c| c == b'-');
    let first = parts.next()?;
    let Some(span) = parts.next() else {
        // A lone sampling decision.
        return Some(B3Context {
            ids: None,
            sampling: parse_b3_sampling(first)?,
        });
    };
    let trace_id = parse_b3_trace_id(first)?;
    let span_id = parse_b3_span_id(span)?;
    let sampling = match parts.next() {
        Some(s) => parse_b3_sampling(s)?,
        None => Sampling::Unset,
    };
    if let Some(parent) = parts.next() {
        parse_b3_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(B3Context {
        ids: Some(Ids { trace_id, span_id }),
        sampling,
    })
}

/// B3 multi-header values. Never fails: ids are there only when both are valid, a sampled
/// value other than `1`, `0`, `true`, `false` is no decision.
pub fn parse_b3_multi(
    trace_id: Option<&[u8]>,
    span_id: Option<&[u8]>,
    sampled: Option<&[u8]>,
    flags: Option<&[u8]>,
) -> B3Context {
    let ids = match (
        trace_id.and_then(parse_b3_trace_id),
        span_id.and_then(parse_b3_span_id),
    ) {
        (Some(trace_id), Some(span_id)) => Some(Ids { trace_id, span_id }),
        _ => None,
    };
    let sampling = if flags == Some(b"1") {
        Sampling::Debug
    } else {
        match sampled {
            Some(b"1" | b"true") => Sampling::Accept,
            Some(b"0" | b"false") => Sampling::Deny,
            _ => Sampling::Unset,
        }
    };
    B3Context { ids, sampling }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get(name).map(HeaderValue::as_bytes)
}

/// The context `headers` carry (see the module doc for the precedence).
pub fn extract(headers: &HeaderMap) -> Extracted {
    let mut formats = Formats::default();
    let w3c = {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let first = values.next();
        formats.w3c = first.is_some();
        match (first, values.next()) {
            (Some(v), None) => parse_traceparent(v.as_bytes()),
            _ => None,
        }
    };
    let multi = {
        let trace_id = header(headers, B3_TRACE_ID);
        let span_id = header(headers, B3_SPAN_ID);
        let sampled = header(headers, B3_SAMPLED);
        let flags = header(headers, B3_FLAGS);
        formats.b3_multi =
            trace_id.is_some() || span_id.is_some() || sampled.is_some() || flags.is_some();
        formats
            .b3_multi
            .then(|| parse_b3_multi(trace_id, span_id, sampled, flags))
    };
    let single = header(headers, B3).and_then(|v| {
        formats.b3_single = true;
        parse_b3_single(v)
    });
    if let Some(tp) = w3c {
        let sampling = if tp.sampled() {
            Sampling::Accept
        } else {
            Sampling::Deny
        };
        return Extracted {
            ids: Some(tp.ids),
            sampling,
            formats,
            w3c,
        };
    }
    let b3 = [multi, single].into_iter().flatten();
    let (ids, sampling) = match b3.clone().find(|c| c.ids.is_some()) {
        Some(c) => (c.ids, c.sampling),
        None => (
            None,
            b3.map(|c| c.sampling)
                .find(|s| *s != Sampling::Unset)
                .unwrap_or(Sampling::Unset),
        ),
    };
    Extracted {
        ids,
        sampling,
        formats,
        w3c: None,
    }
}

/// Writes `v` as `out.len()` lower-case hex digits.
fn put_hex(out: &mut [u8], mut v: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for c in out.iter_mut().rev() {
        *c = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// A header value from ASCII hex and dashes (always valid).
/// A trace or span id's header value: new on every request, so never indexed by HPACK (see
/// `hygiene::once_per_request`).
fn value(bytes: &[u8]) -> HeaderValue {
    let mut v = HeaderValue::from_bytes(bytes).expect("hex and dashes are a valid header value");
    v.set_sensitive(true);
    v
}

/// A B3 trace id: 16 hex when the upper half is zero, else 32. Returns the length written.
fn put_b3_trace_id(out: &mut [u8; 32], trace_id: u128) -> usize {
    let len = if trace_id >> 64 == 0 { 16 } else { 32 };
    put_hex(&mut out[..len], trace_id);
    len
}

/// The `traceparent` for `out` (W3C flags of the incoming `traceparent`, if any, give the
/// random flag).
pub fn traceparent(out: &Outgoing, incoming_flags: Option<u8>) -> HeaderValue {
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
    put_hex(&mut buf[3..35], out.trace_id);
    put_hex(&mut buf[36..52], u128::from(out.span_id));
    let sampled = if out.sampled { FLAG_SAMPLED } else { 0 };
    let flags = (incoming_flags.unwrap_or(0) & FLAG_RANDOM) | sampled;
    put_hex(&mut buf[53..55], u128::from(flags));
    value(&buf)
}

/// The `b3` single-header value for `out`.
pub fn b3_single(out: &Outgoing) -> HeaderValue {
    // <32>-<16>-<1>-<16>
    let mut buf = [0u8; 32 + 1 + 16 + 1 + 1 + 1 + 16];
    let mut trace = [0u8; 32];
    let n = put_b3_trace_id(&mut trace, out.trace_id);
    buf[..n].copy_from_slice(&trace[..n]);
    let mut len = n;
    buf[len] = b'-';
    put_hex(&mut buf[len + 1..len + 17], u128::from(out.span_id));
    len += 17;
    buf[len] = b'-';
    buf[len + 1] = match (out.debug, out.sampled) {
        (true, _) => b'd',
        (false, true) => b'1',
        (false, false) => b'0',
    };
    len += 2;
    if let Some(parent) = out.parent_span_id {
        buf[len] = b'-';
        put_hex(&mut buf[len + 1..len + 17], u128::from(parent));
        len += 17;
    }
    value(&buf[..len])
}

fn span_id_value(id: u64) -> HeaderValue {
    let mut buf = [0u8; 16];
    put_hex(&mut buf, u128::from(id));
    value(&buf)
}

/// Rewrites `headers` for the next hop: every format in `from.formats` (a `traceparent`
/// when there is none) carries `out`. See the module doc.
pub fn inject(headers: &mut HeaderMap, out: &Outgoing, from: &Extracted) {
    let formats = from.formats;
    let none = !(formats.w3c || formats.b3_multi || formats.b3_single);
    if formats.w3c || none {
        headers.insert(
            HeaderName::from_static(TRACEPARENT),
            traceparent(out, from.w3c.map(|tp| tp.flags)),
        );
        if formats.w3c && from.w3c.is_none() {
            // It came with a traceparent this hop could not read: its tracestate is not ours
            // to forward (W3C: a vendor that fails to parse traceparent does not parse it).
            headers.remove(TRACESTATE);
        }
    }
    if formats.b3_multi {
        let mut trace = [0u8; 32];
        let n = put_b3_trace_id(&mut trace, out.trace_id);
        headers.insert(HeaderName::from_static(B3_TRACE_ID), value(&trace[..n]));
        headers.insert(
            HeaderName::from_static(B3_SPAN_ID),
            span_id_value(out.span_id),
        );
        match out.parent_span_id {
            Some(parent) => {
                headers.insert(
                    HeaderName::from_static(B3_PARENT_SPAN_ID),
                    span_id_value(parent),
                );
            }
            None => {
                headers.remove(B3_PARENT_SPAN_ID);
            }
        }
        if !out.debug {
            let sampled = if out.sampled { "1" } else { "0" };
            headers.insert(
                HeaderName::from_static(B3_SAMPLED),
                HeaderValue::from_static(sampled),
            );
        }
    }
    if formats.b3_single {
        headers.insert(HeaderName::from_static(B3), b3_single(out));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";
    const TRACE_ID: u128 = 0x4bf92f3577b34da6a3ce929d0e0e4736;
    const SPAN_ID: u64 = 0x00f067aa0ba902b7;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).map(|v| v.to_str().unwrap())
    }

    fn ids() -> Option<Ids> {
        Some(Ids {
            trace_id: TRACE_ID,
            span_id: SPAN_ID,
        })
    }

    #[test]
    fn traceparent_valid() {
        let tp = parse_traceparent(format!("00-{TRACE}-{SPAN}-01").as_bytes()).unwrap();
        assert_eq!(tp.ids, ids().unwrap());
        assert!(tp.sampled());
        let tp = parse_traceparent(format!("00-{TRACE}-{SPAN}-00").as_bytes()).unwrap();
        assert!(!tp.sampled());
        // Unknown flags are read; the sampled bit is what counts.
        let tp = parse_traceparent(format!("00-{TRACE}-{SPAN}-09").as_bytes()).unwrap();
        assert!(tp.sampled());
    }

    #[test]
    fn traceparent_versions() {
        // A future version is read as 00, with or without more fields.
        assert!(parse_traceparent(format!("01-{TRACE}-{SPAN}-01").as_bytes()).is_some());
        assert!(parse_traceparent(format!("cc-{TRACE}-{SPAN}-01-what-ever").as_bytes()).is_some());
        // ... but not with something glued to the flags.
        assert!(parse_traceparent(format!("cc-{TRACE}-{SPAN}-01x").as_bytes()).is_none());
        // Version ff is invalid, version 00 has exactly four fields.
        assert!(parse_traceparent(format!("ff-{TRACE}-{SPAN}-01").as_bytes()).is_none());
        assert!(parse_traceparent(format!("00-{TRACE}-{SPAN}-01-").as_bytes()).is_none());
        assert!(parse_traceparent(format!("00-{TRACE}-{SPAN}-01-00").as_bytes()).is_none());
        // Not hex.
        assert!(parse_traceparent(format!("0g-{TRACE}-{SPAN}-01").as_bytes()).is_none());
        assert!(parse_traceparent(format!("+0-{TRACE}-{SPAN}-01").as_bytes()).is_none());
    }

    #[test]
    fn traceparent_invalid() {
        let zero_trace = "0".repeat(32);
        let zero_span = "0".repeat(16);
        for bad in [
            String::new(),
            format!("00-{zero_trace}-{SPAN}-01"),
            format!("00-{TRACE}-{zero_span}-01"),
            // Upper case.
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{}-01", "00F067AA0BA902B7"),
            format!("00-{TRACE}-{SPAN}-0A"),
            // Wrong lengths and separators.
            format!("00-{}-{SPAN}-01", &TRACE[1..]),
            format!("00-{TRACE}0-{SPAN}-01"),
            format!("00-{TRACE}-{SPAN}0-1"),
            format!("00_{TRACE}-{SPAN}-01"),
            format!("00-{TRACE}_{SPAN}-01"),
            format!("00-{TRACE}-{SPAN}_01"),
            format!("0-{TRACE}-{SPAN}-01"),
            format!("00-{TRACE}-{SPAN}-0x"),
            format!("00-{}-{SPAN}-01", "+bf92f3577b34da6a3ce929d0e0e4736"),
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn b3_single_forms() {
        let c = parse_b3_single(format!("{TRACE}-{SPAN}-1-05e3ac9a4f6e3b90").as_bytes()).unwrap();
        assert_eq!((c.ids, c.sampling), (ids(), Sampling::Accept));
        let c = parse_b3_single(format!("{TRACE}-{SPAN}").as_bytes()).unwrap();
        assert_eq!((c.ids, c.sampling), (ids(), Sampling::Unset));
        let c = parse_b3_single(format!("{TRACE}-{SPAN}-d").as_bytes()).unwrap();
        assert_eq!(c.sampling, Sampling::Debug);
        let c = parse_b3_single(format!("{TRACE}-{SPAN}-0").as_bytes()).unwrap();
        assert_eq!(c.sampling, Sampling::Deny);
        // A lone decision.
        assert_eq!(
            parse_b3_single(b"0"),
            Some(B3Context {
                ids: None,
                sampling: Sampling::Deny
            })
        );
        assert_eq!(parse_b3_single(b"d").unwrap().sampling, Sampling::Debug);
        assert_eq!(parse_b3_single(b"1").unwrap().sampling, Sampling::Accept);
        // A 64-bit trace id is left-padded.
        let c = parse_b3_single(format!("a3ce929d0e0e4736-{SPAN}-1").as_bytes()).unwrap();
        assert_eq!(c.ids.unwrap().trace_id, 0xa3ce929d0e0e4736);
        // B3 hex is read in either case, as Envoy does.
        let c = parse_b3_single(format!("{}-{SPAN}", TRACE.to_uppercase()).as_bytes()).unwrap();
        assert_eq!(c.ids, ids());
    }

    #[test]
    fn b3_single_invalid() {
        for bad in [
            String::new(),
            "2".to_string(),
            "true".to_string(),
            TRACE.to_string(),
            format!("{TRACE}-"),
            format!("{TRACE}-{SPAN}-"),
            format!("{TRACE}-{SPAN}-2"),
            format!("{TRACE}-{SPAN}-1-"),
            format!("{TRACE}-{SPAN}-1-{SPAN}-x"),
            format!("{TRACE}-{SPAN}-1-0000000000000000"),
            format!("{TRACE}-0000000000000000-1"),
            format!("{}-{SPAN}-1", "0".repeat(32)),
            format!("{}-{SPAN}-1", &TRACE[..20]),
            format!("{TRACE}-{}-1", &SPAN[..15]),
        ] {
            assert_eq!(parse_b3_single(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn b3_multi_fields() {
        let c = parse_b3_multi(
            Some(TRACE.as_bytes()),
            Some(SPAN.as_bytes()),
            Some(b"1"),
            None,
        );
        assert_eq!((c.ids, c.sampling), (ids(), Sampling::Accept));
        let c = parse_b3_multi(Some(b"a3ce929d0e0e4736"), Some(SPAN.as_bytes()), None, None);
        assert_eq!(c.ids.unwrap().trace_id, 0xa3ce929d0e0e4736);
        assert_eq!(c.sampling, Sampling::Unset);
        // Legacy true/false; anything else is no decision.
        for (sampled, want) in [
            (&b"true"[..], Sampling::Accept),
            (b"false", Sampling::Deny),
            (b"0", Sampling::Deny),
            (b"yes", Sampling::Unset),
        ] {
            assert_eq!(
                parse_b3_multi(None, None, Some(sampled), None).sampling,
                want
            );
        }
        // Debug wins over a sampled flag.
        let c = parse_b3_multi(None, None, Some(b"0"), Some(b"1"));
        assert_eq!(c.sampling, Sampling::Debug);
        // Ids need both, valid and non-zero.
        assert_eq!(
            parse_b3_multi(Some(TRACE.as_bytes()), None, None, None).ids,
            None
        );
        let zero = parse_b3_multi(
            Some(TRACE.as_bytes()),
            Some(b"0000000000000000"),
            None,
            None,
        );
        assert_eq!(zero.ids, None);
        let short = parse_b3_multi(Some(b"abc"), Some(SPAN.as_bytes()), None, None);
        assert_eq!(short.ids, None);
    }

    #[test]
    fn precedence() {
        let other_trace = "11111111111111111111111111111111";
        // A valid traceparent wins over B3, whatever B3 says.
        let h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-00")),
            ("x-b3-traceid", other_trace),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
            ("b3", "d"),
        ]);
        let ex = extract(&h);
        assert_eq!((ex.ids, ex.sampling), (ids(), Sampling::Deny));
        assert_eq!(
            ex.formats,
            Formats {
                w3c: true,
                b3_multi: true,
                b3_single: true
            }
        );
        // An invalid one falls back to B3 multi, then single.
        let h = headers(&[
            ("traceparent", "00-garbage"),
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("b3", &format!("{other_trace}-{SPAN}-0")),
        ]);
        let ex = extract(&h);
        assert_eq!((ex.ids, ex.sampling), (ids(), Sampling::Unset));
        assert!(ex.w3c.is_none());
        let h = headers(&[("x-b3-sampled", "1"), ("b3", &format!("{TRACE}-{SPAN}-0"))]);
        let ex = extract(&h);
        assert_eq!((ex.ids, ex.sampling), (ids(), Sampling::Deny));
        // Without ids, the first decision.
        let ex = extract(&headers(&[("x-b3-sampled", "0"), ("b3", "1")]));
        assert_eq!((ex.ids, ex.sampling), (None, Sampling::Deny));
        let ex = extract(&headers(&[("x-b3-sampled", "junk"), ("b3", "d")]));
        assert_eq!((ex.ids, ex.sampling), (None, Sampling::Debug));
        // Two traceparent headers are invalid.
        let tp = format!("00-{TRACE}-{SPAN}-01");
        let ex = extract(&headers(&[("traceparent", &tp), ("traceparent", &tp)]));
        assert_eq!((ex.ids, ex.formats.w3c), (None, true));
        // Nothing.
        let ex = extract(&HeaderMap::new());
        assert_eq!((ex.ids, ex.sampling), (None, Sampling::Unset));
        assert_eq!(ex.formats, Formats::default());
    }

    fn out(sampled: bool) -> Outgoing {
        Outgoing {
            trace_id: TRACE_ID,
            span_id: 0x1111222233334444,
            parent_span_id: Some(SPAN_ID),
            sampled,
            debug: false,
        }
    }

    #[test]
    fn rewrite_w3c_keeps_tracestate() {
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-03")),
            ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        ]);
        let ex = extract(&h);
        inject(&mut h, &out(true), &ex);
        assert_eq!(
            get(&h, "traceparent"),
            Some(format!("00-{TRACE}-1111222233334444-03").as_str())
        );
        assert_eq!(
            get(&h, "tracestate"),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
        assert_eq!(h.len(), 2, "no B3 headers added: {h:?}");
        assert!(
            h["traceparent"].is_sensitive(),
            "new per request: never indexed"
        );
        assert!(!h["tracestate"].is_sensitive(), "passed on as it came");
        // Unknown flags are not propagated; version is ours.
        let mut h = headers(&[("traceparent", &format!("42-{TRACE}-{SPAN}-fc-extra"))]);
        let ex = extract(&h);
        inject(&mut h, &out(false), &ex);
        assert_eq!(
            get(&h, "traceparent"),
            Some(format!("00-{TRACE}-1111222233334444-00").as_str())
        );
    }

    #[test]
    fn rewrite_invalid_traceparent_drops_tracestate() {
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01-")),
            ("tracestate", "rojo=1"),
        ]);
        let ex = extract(&h);
        assert_eq!(ex.ids, None);
        let new = Outgoing {
            parent_span_id: None,
            ..out(true)
        };
        inject(&mut h, &new, &ex);
        assert_eq!(
            get(&h, "traceparent"),
            Some(format!("00-{TRACE}-1111222233334444-01").as_str())
        );
        assert_eq!(get(&h, "tracestate"), None);
    }

    #[test]
    fn rewrite_b3_multi() {
        let mut h = headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", SPAN),
            ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
        ]);
        let ex = extract(&h);
        let o = Outgoing {
            trace_id: ex.ids.unwrap().trace_id,
            ..out(true)
        };
        inject(&mut h, &o, &ex);
        // The 64-bit trace id stays 64-bit; the incoming span becomes the parent; the
        // decision is written so the next hop makes the same.
        assert_eq!(get(&h, "x-b3-traceid"), Some("a3ce929d0e0e4736"));
        assert_eq!(get(&h, "x-b3-spanid"), Some("1111222233334444"));
        assert_eq!(get(&h, "x-b3-parentspanid"), Some(SPAN));
        assert_eq!(get(&h, "x-b3-sampled"), Some("1"));
        assert_eq!(get(&h, "traceparent"), None);
        assert_eq!(get(&h, "b3"), None);
        // Debug keeps x-b3-flags, and does not add x-b3-sampled.
        let mut h = headers(&[("x-b3-flags", "1")]);
        let ex = extract(&h);
        let o = Outgoing {
            parent_span_id: None,
            debug: true,
            ..out(true)
        };
        inject(&mut h, &o, &ex);
        assert_eq!(get(&h, "x-b3-traceid"), Some(TRACE));
        assert_eq!(get(&h, "x-b3-flags"), Some("1"));
        assert_eq!(get(&h, "x-b3-sampled"), None);
        assert_eq!(get(&h, "x-b3-parentspanid"), None);
    }

    #[test]
    fn rewrite_b3_single() {
        let mut h = headers(&[("b3", &format!("{TRACE}-{SPAN}-d-05e3ac9a4f6e3b90"))]);
        let ex = extract(&h);
        let o = Outgoing {
            debug: ex.sampling == Sampling::Debug,
            ..out(true)
        };
        inject(&mut h, &o, &ex);
        assert_eq!(
            get(&h, "b3"),
            Some(format!("{TRACE}-1111222233334444-d-{SPAN}").as_str())
        );
        assert_eq!(h.len(), 1);
        let o = Outgoing {
            trace_id: 0xa3ce929d0e0e4736,
            parent_span_id: None,
            ..out(false)
        };
        assert_eq!(b3_single(&o), "a3ce929d0e0e4736-1111222233334444-0");
    }

    #[test]
    fn rewrite_every_format_it_came_with() {
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "a=b"),
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
            ("b3", &format!("{TRACE}-{SPAN}-1")),
        ]);
        let ex = extract(&h);
        inject(&mut h, &out(true), &ex);
        assert_eq!(
            get(&h, "traceparent"),
            Some(format!("00-{TRACE}-1111222233334444-01").as_str())
        );
        assert_eq!(get(&h, "tracestate"), Some("a=b"));
        assert_eq!(get(&h, "x-b3-spanid"), Some("1111222233334444"));
        assert_eq!(get(&h, "x-b3-parentspanid"), Some(SPAN));
        assert_eq!(
            get(&h, "b3"),
            Some(format!("{TRACE}-1111222233334444-1-{SPAN}").as_str())
        );
        // Written values read back as this hop's context.
        let next = extract(&h);
        assert_eq!(next.ids.unwrap().span_id, 0x1111222233334444);
        let b3 = parse_b3_single(h["b3"].as_bytes()).unwrap();
        assert_eq!(b3.ids, next.ids);
    }

    #[test]
    fn rewrite_nothing_gets_traceparent() {
        let mut h = HeaderMap::new();
        let ex = extract(&h);
        let o = Outgoing {
            parent_span_id: None,
            ..out(false)
        };
        inject(&mut h, &o, &ex);
        assert_eq!(
            get(&h, "traceparent"),
            Some(format!("00-{TRACE}-1111222233334444-00").as_str())
        );
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn hex_roundtrip() {
        for v in [1u128, 0xf, 0xdead_beef, u128::MAX, u128::from(u64::MAX)] {
            let mut buf = [0u8; 32];
            put_hex(&mut buf, v);
            assert_eq!(parse_hex(&buf, false), Some(v));
        }
        assert_eq!(parse_hex(b"", false), None);
        assert_eq!(parse_hex(&[b'1'; 33], false), None);
        assert_eq!(parse_hex(b"AB", false), None);
        assert_eq!(parse_hex(b"AB", true), Some(0xab));
    }
}
