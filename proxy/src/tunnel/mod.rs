//! HBONE: TCP tunnelled between nodes as HTTP/2 `CONNECT` streams over mutual TLS 1.3.
//!
//! The source node's [`client::Pool`] opens (and shares) one TLS + HTTP/2 connection per
//! (source identity, destination identity, destination node) to the destination node's
//! `:15008`, and one `CONNECT <pod ip:port>` stream per proxied connection. The destination
//! node's [`server::Server`] checks the client certificate and the request, and hands each
//! `CONNECT` to its [`server::Handler`] (the node's inbound path), which answers it and, once
//! it has accepted it, relays the [`Stream`] to the pod.
//!
//! May import: `drain`, `identity`, `netns`, `relay`, `telemetry` (counters), `upstream`
//! (TCP keepalive), `worker`, `admin::api` (stats types).
//!
//! Wire contract (both directions of weft speak it):
//! - TLS 1.3 only, ALPN `h2`, client certificate required; both certificates are SVIDs
//!   ([`crate::identity`]). The client sends the destination identity as SNI
//!   ([`crate::identity::sni_for`]) and accepts only that identity from the server.
//! - `CONNECT` with `:authority` = destination pod `ip:port`, header `Forwarded: for=<source pod
//!   ip>` (RFC 7239; IPv6 as `for="[v6]"`).
//! - Response `200`: bytes flow both ways; `END_STREAM` is a half-close (`shutdown(SHUT_WR)`)
//!   and `RST_STREAM` a reset, each way. `400` malformed request; `403` denied, with the policy
//!   in `x-weft-policy` and the reason in `x-weft-deny-reason`; `404` the target is not a pod on
//!   that node; `503` the node could not connect to the target.

pub mod client;
pub mod server;
mod stream;

pub use stream::Stream;

use std::net::{IpAddr, SocketAddr};

/// Response header naming the policy that denied a tunnel (with status 403).
pub const POLICY_HEADER: &str = "x-weft-policy";
/// Response header with why the policy denied it (`not_allowed`, `deny_policy`, …).
pub const DENY_REASON_HEADER: &str = "x-weft-deny-reason";

/// HTTP/2 receive window of one stream: enough to keep a fast link busy across a node hop.
pub(crate) const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 receive window of a connection (shared by its streams).
pub(crate) const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest DATA frame we accept.
pub(crate) const MAX_FRAME: u32 = 256 << 10;
/// Per-stream send buffer before the sender waits for the connection to drain.
pub(crate) const SEND_BUFFER: usize = 1 << 20;
/// Largest header block accepted (a CONNECT needs a few hundred bytes).
pub(crate) const MAX_HEADER_LIST: u32 = 16 << 10;
/// HPACK dynamic table the peer may make us keep (RFC 9113's default; a CONNECT has few
/// headers to compress).
pub(crate) const HEADER_TABLE: u32 = 4096;

/// Reads of an HBONE connection's socket go through a buffer this large. rustls asks its
/// transport for at most 4 KiB at a time: unbuffered, that is a `recvfrom(2)` per 4 KiB, four
/// or five per full TLS record; buffered, one call takes in up to this much (several records)
/// and rustls copies its 4 KiB out of memory. One per connection, allocated with it (HBONE
/// connections are few: pooled per identity pair and node).
pub(crate) const TLS_READ_BUFFER: usize = 64 << 10;

/// An HBONE connection's socket as TLS runs on it: reads buffered ([`TLS_READ_BUFFER`]),
/// writes straight through (rustls writes whole records, vectored).
pub(crate) type TlsTransport = tokio::io::BufReader<tokio::net::TcpStream>;

/// The socket `tcp`, read through [`TLS_READ_BUFFER`].
pub(crate) fn tls_transport(tcp: tokio::net::TcpStream) -> TlsTransport {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp)
}

/// Records an HBONE connection's TLS session takes in before it writes them to the socket.
/// rustls's default, 64 KiB, made a bulk stream's sender write its socket four records at a
/// time; with this, a `writev` carries up to sixteen (a third of the calls). It is what a
/// connection may hold while its socket is full; the HTTP/2 send buffers above it hold more.
pub(crate) const TLS_SEND_BUFFER: usize = 256 << 10;

/// Lets an HBONE connection's TLS session (either side) take in [`TLS_SEND_BUFFER`] of records.
pub(crate) fn set_send_buffer<D>(session: &mut rustls::ConnectionCommon<D>) {
    session.set_buffer_limit(Some(TLS_SEND_BUFFER));
}

/// TCP keepalive of HBONE sockets, both ends: a peer that vanished without a FIN or RST (node
/// powered off, link cut) is dropped by the kernel even where nothing else would notice (the
/// server never pings its clients). The values are the node's for every socket
/// ([`crate::upstream::KEEPALIVE`], ztunnel's); the pool's HTTP/2 PINGs notice much sooner on
/// the client side.
pub(crate) fn set_tcp_keepalive(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    crate::upstream::set_keepalive(tcp, crate::upstream::KEEPALIVE)
}

/// `Forwarded` header value for `ip` (RFC 7239: IPv6 quoted in brackets).
pub fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The first `for=` address of a `Forwarded` header value (a port, if present, is dropped).
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let pair = value.split([',', ';']).map(str::trim).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let v = pair.trim_matches('"');
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    if let Ok(ip) = v.parse() {
        return Some(ip);
    }
    v.parse::<SocketAddr>().ok().map(|s| s.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trip() {
        for ip in ["10.1.2.3", "2001:db8::1", "::ffff:1.2.3.4"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(parse_forwarded_for(&forwarded_for(ip)), Some(ip));
        }
        assert_eq!(forwarded_for("10.0.0.1".parse().unwrap()), "for=10.0.0.1");
        assert_eq!(
            forwarded_for("2001:db8::1".parse().unwrap()),
            "for=\"[2001:db8::1]\""
        );
        assert_eq!(
            parse_forwarded_for("proto=https; For=\"[::1]:4711\", for=1.1.1.1"),
            Some("::1".parse().unwrap())
        );
        assert_eq!(
            parse_forwarded_for("for=\"192.0.2.43:47011\""),
            Some("192.0.2.43".parse().unwrap())
        );
        assert_eq!(parse_forwarded_for("for=_hidden"), None);
        assert_eq!(parse_forwarded_for("by=1.2.3.4"), None);
        assert_eq!(parse_forwarded_for(""), None);
    }
}
