//! Request hygiene (pure): what weft checks and adds before a request goes anywhere.
//!
//! - [`H1Guard`] reads an HTTP/1 client's bytes before the HTTP parser does and holds each
//!   request head until it is whole, so a head that frames its body two ways (`Content-Length`
//!   with `Transfer-Encoding`, the request smuggling vector) is refused before anything is
//!   forwarded, as Envoy refuses it. The parser itself refuses the rest (obs-fold, invalid header
//!   names, bad lengths, oversized heads).
//! - [`prepare`]: `x-request-id` when missing, `x-forwarded-for` appended, hop-by-hop headers
//!   dropped (the upstream connection frames the message again, possibly in another HTTP
//!   version); `traceparent`/`tracestate` are left exactly as they came.

use http::header::{Entry, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

/// Why a client's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("both Content-Length and Transfer-Encoding are set")]
    BothLengths,
    #[error("invalid chunk size line")]
    BadChunk,
    #[error("request headers larger than {0} bytes")]
    HeadTooLarge(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// This many body bytes left.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Chunk data left, then its CRLF.
    ChunkData(u64),
    /// Trailer lines after the last chunk.
    Trailers,
    /// After `CONNECT`, an upgrade, or a refusal: bytes are not HTTP/1 requests any more.
    Opaque,
}

/// An HTTP/1 request-stream checker, fed what the client sends.
#[derive(Debug)]
pub struct H1Guard {
    state: State,
    /// Bytes of the current head (or chunk-size or trailer line) not yet released.
    held: Vec<u8>,
    /// Heads longer than this are refused (431).
    max_head: usize,
    /// A head was refused or released unchecked: the server will answer and close while the
    /// client may still be sending.
    gave_up: bool,
}

/// What to hand the HTTP parser after feeding bytes to the guard.
#[derive(Debug, PartialEq, Eq)]
pub enum Feed {
    /// Pass these bytes on (possibly none yet: a head is still incomplete).
    Release(Vec<u8>),
    /// Refused: hand the parser a request line it rejects with 400, and stop.
    Refuse(Violation),
}

/// A request line HTTP parsers reject (an invalid method token): handing it over makes the
/// parser answer `400 Bad Request` and close, as for any malformed request.
pub const POISON: &[u8] = b"BAD\x00REQUEST / HTTP/1.1\r\n\r\n";

/// What to hand a parser whose head limit is `parser_limit` for `violation`: a head it
/// rejects with the status the violation deserves (400, or 431 for a head too large).
pub fn poison(violation: &Violation, parser_limit: usize) -> Vec<u8> {
    match violation {
        Violation::HeadTooLarge(_) => {
            // An unterminated head beyond the parser's own limit.
            let mut head = b"GET / HTTP/1.1\r\nx-oversized: ".to_vec();
            head.resize(head.len() + parser_limit + 1, b'a');
            head
        }
        _ => POISON.to_vec(),
    }
}

impl H1Guard {
    pub fn new(max_head: usize) -> H1Guard {
        H1Guard {
            state: State::Head,
            held: Vec::new(),
            max_head,
            gave_up: false,
        }
    }

    /// Whether `input`, read next, passes exactly as it is: nothing was held before it, it ends
    /// with no head left incomplete, and nothing in it is refused. Then the guard moves past it
    /// and the bytes can stay where they were read, uncopied; otherwise the guard is unchanged
    /// and `input` must be given to [`H1Guard::feed`]. The same decisions as `feed`'s: a head
    /// is checked whole before any of it passes.
    pub fn pass(&mut self, mut input: &[u8]) -> bool {
        if !self.held.is_empty() {
            return false;
        }
        let mut state = self.state;
        while !input.is_empty() {
            match state {
                State::Opaque => break,
                State::Body(n) => {
                    let take;
                    (take, state) = counted(n, input.len(), State::Head, State::Body);
                    input = &input[take..];
                }
                State::ChunkData(n) => {
                    let take;
                    (take, state) = counted(n, input.len(), State::ChunkSize, State::ChunkData);
                    input = &input[take..];
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let (end, done) = scan(state, &[], input);
                    if !done || end > self.max_head {
                        return false;
                    }
                    match complete(state, &input[..end]) {
                        Ok(next) => state = next,
                        Err(_) => return false,
                    }
                    input = &input[end..];
                }
            }
        }
        self.state = state;
        true
    }

    /// Feeds bytes read from the client.
    pub fn feed(&mut self, mut input: &[u8]) -> Feed {
        let mut out = Vec::with_capacity(input.len());
        while !input.is_empty() {
            match self.state {
                State::Opaque => {
                    out.extend_from_slice(input);
                    break;
                }
                State::Body(n) => {
                    let take;
                    (take, self.state) = counted(n, input.len(), State::Head, State::Body);
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                }
                State::ChunkData(n) => {
                    // `n` counts the chunk's trailing CRLF too.
                    let take;
                    (take, self.state) =
                        counted(n, input.len(), State::ChunkSize, State::ChunkData);
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let (end, done) = scan(self.state, &self.held, input);
                    self.held.extend_from_slice(&input[..end]);
                    input = &input[end..];
                    if self.held.len() > self.max_head {
                        self.held.clear();
                        self.state = State::Opaque;
                        self.gave_up = true;
                        return Feed::Refuse(Violation::HeadTooLarge(self.max_head));
                    }
                    if !done {
                        continue;
                    }
                    match complete(self.state, &self.held) {
                        Ok(next) => {
                            self.state = next;
                            out.append(&mut self.held);
                        }
                        Err(v) => {
                            self.held.clear();
                            self.state = State::Opaque;
                            self.gave_up = true;
                            return Feed::Refuse(v);
                        }
                    }
                }
            }
        }
        Feed::Release(out)
    }

    /// Whether a head was refused or was too long to check: the connection is going to end with
    /// an error answer, and the client's remaining bytes should be drained, not reset.
    pub fn gave_up(&self) -> bool {
        self.gave_up
    }

    /// Whether part of a request head has arrived and the rest has not.
    pub fn holding_head(&self) -> bool {
        self.state == State::Head && !self.held.is_empty()
    }
}

/// Of `available` bytes, how many belong to the `n` a counted state (a body, a chunk's data)
/// still expects, and the state after them: `then` once all `n` are in, else `rest` of what is
/// left.
fn counted(n: u64, available: usize, then: State, rest: fn(u64) -> State) -> (usize, State) {
    let take = n.min(available as u64);
    let next = if take == n { then } else { rest(n - take) };
    (take as usize, next)
}

/// The searchers for the end of a head (or trailer section) and of a chunk-size line, made
/// once: `memmem::find` makes its searcher again on every call, which cost a request's head
/// more than the search.
static HEAD_END: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
static LINE_END: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n"));

/// How much of `input` belongs to the current head/line of `state` (after `held`, what is
/// already held of it), and whether it ends there.
fn scan(state: State, held: &[u8], input: &[u8]) -> (usize, bool) {
    let finder = match state {
        State::ChunkSize => &*LINE_END,
        _ => &*HEAD_END,
    };
    let terminator = finder.needle();
    // A trailer section that is just CRLF ends with it, even with its CR and LF in two reads.
    if state == State::Trailers {
        match (held, input) {
            ([], [b'\r', b'\n', ..]) => return (2, true),
            ([b'\r'], [b'\n', ..]) => return (1, true),
            _ => {}
        }
    }
    // A terminator that began in what is held: its first bytes are the held tail's last
    // (fewer than the terminator's length), the rest the input's first.
    let tail = held.len().min(terminator.len() - 1);
    if tail > 0 {
        let take = input.len().min(terminator.len() - 1);
        let mut edge = [0u8; 6];
        edge[..tail].copy_from_slice(&held[held.len() - tail..]);
        edge[tail..tail + take].copy_from_slice(&input[..take]);
        // Too few input bytes for a whole terminator: any match here began in the tail.
        if let Some(p) = memchr::memmem::find(&edge[..tail + take], terminator) {
            return (p + terminator.len() - tail, true);
        }
    }
    match finder.find(input) {
        Some(p) => (p + terminator.len(), true),
        None => (input.len(), false),
    }
}

/// A whole head, chunk-size line or trailer section (`line`) of `state` was read: check it,
/// pick the next state.
fn complete(state: State, line: &[u8]) -> Result<State, Violation> {
    match state {
        State::ChunkSize => {
            let line = &line[..line.len() - 2];
            let hex = line.split(|&b| b == b';').next().unwrap_or_default();
            let hex = std::str::from_utf8(hex).map_err(|_| Violation::BadChunk)?;
            let size = u64::from_str_radix(hex.trim(), 16).map_err(|_| Violation::BadChunk)?;
            Ok(if size == 0 {
                State::Trailers
            } else {
                State::ChunkData(size.checked_add(2).ok_or(Violation::BadChunk)?)
            })
        }
        State::Trailers => Ok(State::Head),
        _ => head(line),
    }
}

/// What follows the request head `head`.
fn head(head: &[u8]) -> Result<State, Violation> {
    // Leading empty lines before a request line are allowed (RFC 9112 §2.2).
    // Left uninitialized: the parser writes the headers it finds (128 empty ones to start from
    // were 4 KiB of stores a request).
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        // Malformed or too many headers: the parser will say so.
        _ => return Ok(State::Opaque),
    }
    let mut length = None;
    let mut chunked = false;
    let mut te = false;
    let mut upgrade = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .or(Some(0));
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if te && length.is_some() {
        return Err(Violation::BothLengths);
    }
    Ok(if req.method == Some("CONNECT") || upgrade {
        State::Opaque
    } else if te && chunked {
        State::ChunkSize
    } else if te {
        // Not chunked last: the parser refuses it.
        State::Opaque
    } else {
        match length {
            Some(n) if n > 0 => State::Body(n),
            _ => State::Head,
        }
    })
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus what hyper
/// frames itself. The first [`CONNECTION_OWN`] are the connection's own in a response too
/// (`te` and `trailer` are a request's, or announce a response's trailers).
pub const HOP_BY_HOP: [HeaderName; 7] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::TE,
    http::header::TRAILER,
];
/// How many of [`HOP_BY_HOP`] a response's connection owns.
pub const CONNECTION_OWN: usize = 5;
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Prepares a request's headers for the upstream: removes hop-by-hop headers (and those the
/// `Connection` header names), keeps `Upgrade` when the request is an upgrade, generates
/// `x-request-id` when missing, appends the client (its address, see [`client_address`]) to
/// `x-forwarded-for`. Returns the request id.
pub fn prepare(headers: &mut HeaderMap, client: &HeaderValue, upgrade: bool) -> String {
    // Most requests carry none: one pass over their few names instead of a lookup for each
    // hop-by-hop name (`Connection` and `TE` are among them).
    let hop_by_hop = present(headers, &HOP_BY_HOP);
    if hop_by_hop != 0 {
        remove_hop_by_hop(headers, hop_by_hop, upgrade);
    }
    if upgrade {
        headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    }
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Occupied(mut e) => {
            let prev = e.get().to_str().ok().filter(|p| !p.trim().is_empty());
            let joined = match prev {
                Some(prev) => {
                    HeaderValue::from_bytes(&[prev.as_bytes(), b", ", client.as_bytes()].concat())
                        .ok()
                }
                None => Some(client.clone()),
            };
            if let Some(v) = joined {
                e.insert(v);
            }
        }
        Entry::Vacant(e) => {
            e.insert(client.clone());
        }
    }
    match headers.entry(X_REQUEST_ID) {
        Entry::Occupied(mut e) => match e.get().to_str() {
            Ok(id) if !id.is_empty() => {
                let id = id.to_string();
                once_per_request(e.get_mut());
                id
            }
            _ => {
                let id = request_id();
                e.insert(new_request_id(&id));
                id
            }
        },
        Entry::Vacant(e) => {
            let id = request_id();
            e.insert(new_request_id(&id));
            id
        }
    }
}

fn new_request_id(id: &str) -> HeaderValue {
    let mut v = HeaderValue::from_str(id).expect("a UUID is a valid header value");
    once_per_request(&mut v);
    v
}

/// Removes the hop-by-hop headers and those `Connection` names (keeping `Upgrade` and
/// `Connection` on an upgrade, and `TE: trailers`).
fn remove_hop_by_hop(headers: &mut HeaderMap, present: u32, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let keep_te_trailers = headers
        .get(http::header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in named {
        if !(upgrade && name == http::header::UPGRADE) {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) == 0
            || upgrade && (name == http::header::UPGRADE || name == http::header::CONNECTION)
        {
            continue;
        }
        headers.remove(name);
    }
    if keep_te_trailers {
        // gRPC needs it end to end; it is the one TE value HTTP/2 allows.
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Which of `names` (at most 32) `headers` holds, as bits by their place in `names`: a pass
/// over the map's names (a message has a handful), which costs less than hashing each of
/// `names` to look it up, and only those present are looked up again to go.
pub fn present(headers: &HeaderMap, names: &[HeaderName]) -> u32 {
    debug_assert!(names.len() <= 32);
    let mut bits = 0;
    for k in headers.keys() {
        if let Some(i) = names.iter().position(|n| n == k) {
            bits |= 1 << i;
        }
    }
    bits
}

/// Marks a value that differs on every request (a request or trace id) never to be indexed
/// by HPACK: an HTTP/2 hop encodes it as a plain literal instead of adding it to the
/// connection's header table, where each new id evicted the lasting entries (authority,
/// user agent, forwarded-for) and made every later request's encoder walk the ids before it.
pub fn once_per_request(v: &mut HeaderValue) {
    v.set_sensitive(true);
}

/// A client's address as [`prepare`] appends it to `x-forwarded-for`: made once per connection.
pub fn client_address(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid header value")
}

/// A random (version 4) UUID, as Envoy generates for `x-request-id`: one allocation, no
/// formatting machinery (it runs for most requests).
pub fn request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    let mut at = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        out[at] = HEX[usize::from(byte >> 4)];
        out[at + 1] = HEX[usize::from(byte & 0x0f)];
        at += 2;
    }
    String::from_utf8(out.to_vec()).expect("hex digits and dashes are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released(g: &mut H1Guard, input: &[u8]) -> Vec<u8> {
        match g.feed(input) {
            Feed::Release(b) => b,
            Feed::Refuse(v) => panic!("refused: {v}"),
        }
    }

    #[test]
    fn heads_are_held_until_whole() {
        let mut g = H1Guard::new(60 * 1024);
        assert_eq!(released(&mut g, b"GET / HTTP/1.1\r\nHost: a\r\n"), b"");
        assert_eq!(released(&mut g, b"\r"), b"");
        assert_eq!(
            released(&mut g, b"\nGET /2 HTTP/1.1\r\n\r\n"),
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"
        );
    }

    /// Every way a stream of heads, a chunked body and its empty trailer section can be cut in
    /// three reads (an empty trailer section's CR and LF in two reads once left the guard
    /// waiting for a trailer line that never came).
    #[test]
    fn heads_split_anywhere_are_released_and_refused_as_whole_ones() {
        let ok = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let bad = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n";
        for cut in 0..=ok.len() {
            for second in cut..=ok.len() {
                let mut g = H1Guard::new(60 * 1024);
                let mut out = released(&mut g, &ok[..cut]);
                out.extend(released(&mut g, &ok[cut..second]));
                out.extend(released(&mut g, &ok[second..]));
                assert_eq!(out, ok, "split at {cut} and {second}");
                assert_eq!(g.state, State::Head, "split at {cut} and {second}");
            }
        }
        let first = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".len();
        for cut in 0..bad.len() {
            let mut g = H1Guard::new(60 * 1024);
            let mut out = Vec::new();
            let mut refused = None;
            for part in [&bad[..cut], &bad[cut..]] {
                match g.feed(part) {
                    Feed::Release(b) => out.extend(b),
                    Feed::Refuse(v) => refused = Some(v),
                }
            }
            assert_eq!(refused, Some(Violation::BothLengths), "split at {cut}");
            // The first head goes when it came in a read of its own; never the smuggling one.
            let want: &[u8] = if cut >= first { &bad[..first] } else { b"" };
            assert_eq!(out, want, "split at {cut}");
        }
    }

    /// What a reader does: each read passes in place when [`H1Guard::pass`] says so, and is fed
    /// otherwise. Returns what reached the parser and the refusal.
    fn read_through(g: &mut H1Guard, parts: &[&[u8]]) -> (Vec<u8>, Option<Violation>, usize) {
        let (mut out, mut refused, mut in_place) = (Vec::new(), None, 0);
        for part in parts {
            if g.pass(part) {
                out.extend_from_slice(part);
                in_place += 1;
                continue;
            }
            match g.feed(part) {
                Feed::Release(b) => out.extend(b),
                Feed::Refuse(v) => refused = Some(v),
            }
        }
        (out, refused, in_place)
    }

    /// Passing reads in place decides exactly as feeding them: the same bytes reach the parser,
    /// the same refusals, the same state after, however the stream is cut in three reads.
    #[test]
    fn reads_passed_in_place_are_what_feeding_them_releases() {
        let streams: [&[u8]; 6] = [
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /c HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\nx",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2;e=1\r\nab\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: 1\r\n\r\nGET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
        ];
        for (i, stream) in streams.iter().enumerate() {
            for max_head in [64, 60 * 1024] {
                for cut in 0..=stream.len() {
                    for second in cut..=stream.len() {
                        let parts = [&stream[..cut], &stream[cut..second], &stream[second..]];
                        let mut fed = H1Guard::new(max_head);
                        let mut want = (Vec::new(), None);
                        for part in parts {
                            match fed.feed(part) {
                                Feed::Release(b) => want.0.extend(b),
                                Feed::Refuse(v) => want.1 = Some(v),
                            }
                        }
                        let mut g = H1Guard::new(max_head);
                        let (out, refused, _) = read_through(&mut g, &parts);
                        let at = format!("stream {i}, head limit {max_head}, cut {cut}/{second}");
                        assert_eq!((out, refused), want, "{at}");
                        assert_eq!((g.state, g.gave_up), (fed.state, fed.gave_up), "{at}");
                        assert_eq!(g.held, fed.held, "{at}");
                    }
                }
            }
        }
    }

    /// Whole heads, bodies and chunks stay where they were read; only a head cut short, a
    /// refusal and what follows a held head are copied.
    #[test]
    fn whole_heads_and_bodies_pass_in_place() {
        let mut g = H1Guard::new(60 * 1024);
        let reads: [&[u8]; 4] = [
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nhello",
            b"world",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ];
        assert_eq!(read_through(&mut g, &reads).2, 4);
        let mut g = H1Guard::new(60 * 1024);
        let cut: [&[u8]; 3] = [
            b"GET / HTTP/1.1\r\nHo",
            b"st: a\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ];
        assert_eq!(
            read_through(&mut g, &cut).2,
            1,
            "only the read after the held head"
        );
        let mut g = H1Guard::new(60 * 1024);
        let smuggled: [&[u8]; 1] =
            [b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"];
        assert_eq!(
            read_through(&mut g, &smuggled),
            (Vec::new(), Some(Violation::BothLengths), 0)
        );
    }

    #[test]
    fn bodies_pass_and_the_next_head_is_checked() {
        let mut g = H1Guard::new(60 * 1024);
        let first = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(released(&mut g, first), first);
        let smuggled =
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(g.feed(smuggled), Feed::Refuse(Violation::BothLengths));
        assert_eq!(
            released(&mut g, b"anything"),
            b"anything",
            "opaque after a refusal"
        );
    }

    #[test]
    fn both_orders_of_the_two_lengths_are_refused() {
        for head in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
        ] {
            let mut g = H1Guard::new(60 * 1024);
            assert_eq!(g.feed(head), Feed::Refuse(Violation::BothLengths));
        }
    }

    #[test]
    fn chunked_bodies_are_followed_to_the_next_request() {
        let mut g = H1Guard::new(60 * 1024);
        let req = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n";
        // Byte by byte, to cross every boundary.
        let mut out = Vec::new();
        for b in req.iter() {
            out.extend(released(&mut g, std::slice::from_ref(b)));
        }
        assert_eq!(out, req);
        let smuggled = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(g.feed(smuggled), Feed::Refuse(Violation::BothLengths));
        let mut g = H1Guard::new(60 * 1024);
        let no_trailers =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(released(&mut g, no_trailers), no_trailers);
        assert_eq!(g.state, State::Head);
    }

    #[test]
    fn bad_chunk_sizes_are_refused() {
        let mut g = H1Guard::new(60 * 1024);
        let req = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(g.feed(req), Feed::Refuse(Violation::BadChunk));
    }

    #[test]
    fn connect_and_upgrades_become_opaque() {
        let mut g = H1Guard::new(60 * 1024);
        let req = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        assert_eq!(released(&mut g, req), req);
        assert_eq!(released(&mut g, b"\x81\x05hello"), b"\x81\x05hello");
        let mut g = H1Guard::new(60 * 1024);
        assert_eq!(
            released(&mut g, b"CONNECT a:443 HTTP/1.1\r\n\r\nxx"),
            b"CONNECT a:443 HTTP/1.1\r\n\r\nxx"
        );
    }

    #[test]
    fn oversized_heads_are_refused_whole_or_not() {
        let mut g = H1Guard::new(16);
        assert!(!g.gave_up());
        assert_eq!(
            g.feed(b"GET / HTTP/1.1\r\nX-Long: aaaaaaaa"),
            Feed::Refuse(Violation::HeadTooLarge(16))
        );
        assert!(g.gave_up());
        let mut g = H1Guard::new(16);
        assert_eq!(
            g.feed(b"GET / HTTP/1.1\r\nX: 1\r\n\r\n"),
            Feed::Refuse(Violation::HeadTooLarge(16)),
            "complete, but too large"
        );
        assert!(poison(&Violation::HeadTooLarge(16), 8192).len() > 8192);
        assert_eq!(poison(&Violation::BothLengths, 8192), POISON);
    }

    #[test]
    fn preparing_adds_ids_and_forwarded_for_and_drops_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("traceparent", HeaderValue::from_static("00-abc-def-01"));
        let id = prepare(&mut h, &client_address("10.0.0.1".parse().unwrap()), false);
        assert_eq!(h["x-request-id"], id.as_str());
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4", "version 4");
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.1");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["traceparent"], "00-abc-def-01");
        for gone in ["connection", "x-secret", "keep-alive"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("given"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        assert_eq!(
            prepare(&mut h, &client_address("10.0.0.1".parse().unwrap()), true),
            "given"
        );
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
    }

    #[test]
    fn a_lone_hop_by_hop_header_goes_and_empty_ids_are_replaced() {
        let client = client_address("10.0.0.1".parse().unwrap());
        for name in HOP_BY_HOP.iter().filter(|n| **n != http::header::TE) {
            let mut h = HeaderMap::new();
            h.insert("accept", HeaderValue::from_static("*/*"));
            h.insert(name, HeaderValue::from_static("x"));
            h.insert(X_FORWARDED_FOR, HeaderValue::from_static(" "));
            h.insert(X_REQUEST_ID, HeaderValue::from_static(""));
            let id = prepare(&mut h, &client, false);
            assert!(!h.contains_key(name), "{name}");
            assert_eq!(h["accept"], "*/*");
            assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1", "an empty one is replaced");
            assert_eq!(id.len(), 36, "an empty id is replaced");
            assert_eq!(h[&X_REQUEST_ID], id.as_str());
            assert!(h[&X_REQUEST_ID].is_sensitive());
        }
        let mut h = HeaderMap::new();
        h.insert(http::header::TE, HeaderValue::from_static("gzip"));
        prepare(&mut h, &client, false);
        assert!(!h.contains_key(http::header::TE), "TE other than trailers");
    }

    #[test]
    fn request_ids_are_never_indexed_by_hpack() {
        let client = client_address("10.0.0.1".parse().unwrap());
        let mut made = HeaderMap::new();
        prepare(&mut made, &client, false);
        assert!(made[&X_REQUEST_ID].is_sensitive(), "one weft made");
        let mut given = HeaderMap::new();
        given.insert(X_REQUEST_ID, HeaderValue::from_static("abc"));
        assert_eq!(prepare(&mut given, &client, false), "abc");
        assert!(given[&X_REQUEST_ID].is_sensitive(), "the client's");
        assert!(
            !given[&X_FORWARDED_FOR].is_sensitive(),
            "lasting values are indexed"
        );
    }

    #[test]
    fn request_ids_are_version_4_uuids_and_differ() {
        let id = request_id();
        assert_eq!(id.len(), 36);
        let groups: Vec<&str> = id.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(id
            .bytes()
            .all(|c| c == b'-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert!(groups[2].starts_with('4'), "{id}");
        assert!(matches!(&groups[3][..1], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(request_id(), request_id());
    }
}
