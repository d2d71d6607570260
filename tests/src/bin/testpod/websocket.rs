//! The WebSocket opening handshake (RFC 6455 §4), both ends: the server side of `serve --mode
//! http` and the `ws` client. After the handshake both only move raw bytes (no framing): what
//! the tests check is that a proxy passes an upgraded connection through untouched.
//!
//! Imports: http, aws-lc-rs (SHA-1), base64.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use http::HeaderMap;

/// The GUID every server appends to the client's key (RFC 6455 §1.3).
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{GUID}").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// `None`: not an upgrade to WebSocket. `Some(Ok(key))`: one, with its key. `Some(Err(()))`: an
/// upgrade to WebSocket without a key.
pub fn upgrade_request(headers: &HeaderMap) -> Option<Result<String, ()>> {
    let wants = headers
        .get_all(http::header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("websocket"));
    if !wants {
        return None;
    }
    Some(
        headers
            .get(http::header::SEC_WEBSOCKET_KEY)
            .and_then(|v| v.to_str().ok())
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .ok_or(()),
    )
}

/// `ws ADDR`: upgrade, check the 101 and its accept key, send `text`, read it back. Prints
/// `status=<code>`, the response headers as `< name: value`, then `echo=<what came back>`.
/// Exit 0 when the echo matches; 2 connect failure; 3 anything else.
pub fn client(
    addr: SocketAddr,
    path: &str,
    host: Option<&str>,
    text: &str,
    timeout: Duration,
) -> ExitCode {
    let key = base64::engine::general_purpose::STANDARD.encode(
        [
            crate::random_u64().to_le_bytes(),
            crate::random_u64().to_le_bytes(),
        ]
        .concat(),
    );
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: connect {addr}: {e}");
            return ExitCode::from(2);
        }
    };
    let r = (|| -> std::io::Result<Result<String, String>> {
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let host = host.map(str::to_string).unwrap_or_else(|| addr.to_string());
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: {host}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
             sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n\r\n"
        )?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut out = String::new();
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status = line.split_whitespace().nth(1).unwrap_or("").to_string();
        out.push_str(&format!("status={status}\n"));
        let mut accept = None;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(Err(format!("{out}connection closed in the headers")));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "sec-websocket-accept" {
                    accept = Some(v.to_string());
                }
                out.push_str(&format!("< {k}: {v}\n"));
            }
        }
        if status != "101" {
            return Ok(Err(out));
        }
        if accept.as_deref() != Some(accept_key(&key).as_str()) {
            return Ok(Err(format!("{out}wrong sec-websocket-accept")));
        }
        s.write_all(text.as_bytes())?;
        // What the server echoes may already sit in the reader's buffer.
        let mut back = vec![0u8; text.len()];
        r.read_exact(&mut back)?;
        let back = String::from_utf8_lossy(&back).into_owned();
        out.push_str(&format!("echo={back}\n"));
        Ok(if back == text { Ok(out) } else { Err(out) })
    })();
    match r {
        Ok(Ok(out)) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Ok(Err(out)) => {
            print!("{out}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("error: {addr}: {e}");
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn accept_key_is_the_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn only_websocket_upgrades_count() {
        let mut h = HeaderMap::new();
        assert_eq!(upgrade_request(&h), None);
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        assert_eq!(upgrade_request(&h), None);
        h.insert("upgrade", HeaderValue::from_static("foo, WebSocket"));
        assert_eq!(upgrade_request(&h), Some(Err(())));
        h.insert("sec-websocket-key", HeaderValue::from_static(" abc== "));
        assert_eq!(upgrade_request(&h), Some(Ok("abc==".into())));
    }
}
