//! Protocol detection (pure): whether the first bytes a client sent are HTTP/1.x, the HTTP/2
//! connection preface, or something else, for ports that do not declare their protocol.

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods an HTTP/1.x request line may start with (RFC 9110 and WebDAV's, as Envoy's HTTP
/// inspector knows them).
const METHODS: &[&str] = &[
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "SEARCH",
    "REPORT",
    "MKACTIVITY",
    "CHECKOUT",
    "MERGE",
    "MSEARCH",
    "M-SEARCH",
    "NOTIFY",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "PURGE",
    "MKCALENDAR",
    "LINK",
    "UNLINK",
    "BIND",
    "REBIND",
    "UNBIND",
    "ACL",
];

/// The longest request line inspected before deciding it is not HTTP.
const MAX_LINE: usize = 8192;

/// What the first bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1.0 or HTTP/1.1 request line.
    Http1,
    /// The HTTP/2 preface (h2c with prior knowledge).
    Http2,
    /// Not HTTP: the connection stays on the TCP path.
    Other,
    /// Could still be either: read more.
    NeedMore,
}

/// Classifies the first bytes of a client's stream.
pub fn sniff(buf: &[u8]) -> Sniffed {
    if buf.is_empty() {
        return Sniffed::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() {
            Sniffed::Http2
        } else {
            Sniffed::NeedMore
        };
    }
    let Some(space) = buf.iter().position(|&b| b == b' ') else {
        // Still reading the method: a prefix of a known one may become one.
        let partial = std::str::from_utf8(buf).unwrap_or("");
        return if buf.len() <= 12 && METHODS.iter().any(|m| m.starts_with(partial)) {
            Sniffed::NeedMore
        } else {
            Sniffed::Other
        };
    };
    let method = std::str::from_utf8(&buf[..space]).unwrap_or("");
    if !METHODS.contains(&method) {
        return Sniffed::Other;
    }
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() < MAX_LINE {
            Sniffed::NeedMore
        } else {
            Sniffed::Other
        };
    };
    let line = &buf[..eol];
    match line.rsplit(|&b| b == b' ').next() {
        Some(b"HTTP/1.1" | b"HTTP/1.0") if line.len() > space + 1 + 9 => Sniffed::Http1,
        _ => Sniffed::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_http1() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Sniffed::Http1);
        assert_eq!(sniff(b"POST /x?y=1 HTTP/1.0\r\n"), Sniffed::Http1);
        assert_eq!(sniff(b"M-SEARCH * HTTP/1.1\r\n"), Sniffed::Http1);
    }

    #[test]
    fn the_preface_is_http2() {
        assert_eq!(sniff(H2_PREFACE), Sniffed::Http2);
        assert_eq!(sniff(&H2_PREFACE[..10]), Sniffed::NeedMore);
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(b"\x00\x00\x12\x04");
        assert_eq!(sniff(&more), Sniffed::Http2);
    }

    #[test]
    fn partial_input_waits() {
        assert_eq!(sniff(b""), Sniffed::NeedMore);
        assert_eq!(sniff(b"GE"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET /long/path"), Sniffed::NeedMore);
        assert_eq!(sniff(b"P"), Sniffed::NeedMore, "POST, PUT, PATCH or PRI");
    }

    #[test]
    fn everything_else_is_other() {
        assert_eq!(sniff(b"\x16\x03\x01\x02\x00"), Sniffed::Other, "TLS");
        assert_eq!(sniff(b"ping"), Sniffed::Other);
        assert_eq!(sniff(b"GET / SSH-2.0\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"HELLO world\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"GET\r\n"), Sniffed::Other);
        assert_eq!(sniff(&[b'a'; 100]), Sniffed::Other);
        let mut long = b"GET /".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_LINE));
        assert_eq!(sniff(&long), Sniffed::Other, "no end of line in sight");
    }
}
