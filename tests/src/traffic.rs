//! Traffic for the end-to-end tests: `weft-testpod` servers and calls in pods, and reading
//! their answers: TCP echo, HTTP (`weft-testpod http`, `http-load`, `ws`), HTTPS backends and gRPC
//! (`tests/grpc/echo.py`). Test helpers: they panic with the process output on failure.

use crate::pod::Pod;
use crate::process::Proc;
use crate::{testpod_bin, wait_for_tcp};
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

const READY: Duration = Duration::from_secs(20);

/// `weft-testpod` as a command.
pub fn testpod() -> Command {
    Command::new(testpod_bin())
}

/// A `weft-testpod serve` in `pod` on `0.0.0.0:port` (`mode`: echo, whoami, http, discard),
/// answering `name=<pod>` first; returns once it accepts connections.
pub fn serve(pod: &Pod, port: u16, mode: &str) -> Proc {
    let p = pod
        .spawn(testpod().args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--mode",
            mode,
            "--name",
            pod.name(),
        ]))
        .unwrap();
    wait_for_tcp(pod, pod.addr(port), READY).unwrap();
    p
}

/// One `weft-testpod call` from `from` to `to`: connect, send `text`, half-close, read.
pub fn call(from: &Pod, to: SocketAddr, text: &str, timeout: Duration) -> Output {
    from.output(testpod().args([
        "call",
        &to.to_string(),
        "--send",
        text,
        "--timeout-ms",
        &timeout.as_millis().to_string(),
    ]))
    .unwrap()
}

/// The response of a call that must succeed (5 s limit).
pub fn call_ok(from: &Pod, to: SocketAddr, text: &str) -> String {
    let out = call(from, to, text, Duration::from_secs(5));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "call {to} from {} failed ({}): {stdout}{}",
        from.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The string at a JSON pointer, or "".
/// The address a `whoami` backend saw the connection from: the IP of its `peer=<ip>:<port>`
/// line.
pub fn peer_ip(response: &str) -> String {
    let peer = response
        .lines()
        .find_map(|l| l.strip_prefix("peer="))
        .unwrap_or_else(|| panic!("no peer= line in {response:?}"));
    peer.rsplit_once(':').unwrap().0.to_string()
}

pub fn json_str<'a>(v: &'a serde_json::Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
}

/// A `weft-testpod serve --mode https` in `pod` on `0.0.0.0:port` with these certificates.
pub fn serve_https(pod: &Pod, port: u16, tls: &crate::TlsFiles) -> Proc {
    let p = pod
        .spawn(
            testpod()
                .args(["serve", "--listen", &format!("0.0.0.0:{port}")])
                .args(["--mode", "https", "--name", pod.name()])
                .arg("--cert")
                .arg(&tls.cert)
                .arg("--key")
                .arg(&tls.key),
        )
        .unwrap();
    wait_for_tcp(pod, pod.addr(port), READY).unwrap();
    p
}

/// An HTTP answer as `weft-testpod http --include` printed it.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// 0 when no response came (see `exit`).
    pub status: u16,
    /// Response headers, names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The client's exit code: 0 answered, 2 connect failure, 3 reset/timeout/malformed.
    pub exit: i32,
    pub stderr: String,
}

impl HttpReply {
    /// Parse `status=<code>`, `< name: value` lines, then the body.
    pub fn parse(stdout: &str, exit: i32, stderr: &str) -> HttpReply {
        let mut r = HttpReply {
            status: 0,
            headers: Vec::new(),
            body: String::new(),
            exit,
            stderr: stderr.to_string(),
        };
        let mut rest = stdout;
        if let Some((first, after)) = rest.split_once('\n') {
            if let Some(code) = first.strip_prefix("status=") {
                r.status = code.parse().unwrap_or(0);
                rest = after;
            }
        }
        while let Some(h) = rest.strip_prefix("< ") {
            let (line, after) = h.split_once('\n').unwrap_or((h, ""));
            if let Some((k, v)) = line.split_once(": ") {
                r.headers.push((k.to_string(), v.to_string()));
            }
            rest = after;
        }
        r.body = rest.to_string();
        r
    }

    /// The first response header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A `key=value` fact the testpod backend wrote in the body (`path`, `host`, `name`, `sni`,
    /// `proto`, …).
    pub fn seen(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
    }

    /// Every value of a request header as the backend received it (`header <name>: <value>`).
    pub fn seen_header(&self, name: &str) -> Vec<&str> {
        let prefix = format!("header {name}: ");
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .collect()
    }
}

/// One HTTP/1.1 request from `from` with `weft-testpod http --include`; `args` are its flags
/// (`--path`, `--method`, `--host`, `-H`, `--data`).
pub fn http(from: &Pod, to: SocketAddr, args: &[&str]) -> HttpReply {
    let out = from
        .output(
            testpod()
                .args(["http", &to.to_string(), "--include"])
                .args(args),
        )
        .unwrap();
    HttpReply::parse(
        &String::from_utf8_lossy(&out.stdout),
        out.status.code().unwrap_or(-1),
        &String::from_utf8_lossy(&out.stderr),
    )
}

/// What `weft-testpod http-load` printed.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct LoadSummary {
    pub ok: u64,
    pub failed: u64,
    pub connections: u64,
    pub statuses: std::collections::BTreeMap<String, u64>,
    pub backends: std::collections::BTreeMap<String, u64>,
    pub errors: Vec<String>,
}

impl LoadSummary {
    /// Answers from backends whose name starts with `prefix`.
    pub fn from_backends(&self, prefix: &str) -> u64 {
        self.backends
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// Answers with this status.
    pub fn status(&self, code: u16) -> u64 {
        self.statuses.get(&code.to_string()).copied().unwrap_or(0)
    }
}

/// `weft-testpod http-load <to> --count <count> <args>` from `from` (args: `--path`, `-H`,
/// `--host`, `--http2`, `--method`).
pub fn http_load(from: &Pod, to: SocketAddr, count: u64, args: &[&str]) -> LoadSummary {
    let out = from
        .output(
            testpod()
                .args(["http-load", &to.to_string(), "--count", &count.to_string()])
                .args(args),
        )
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "http-load printed no summary ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `weft-testpod ws <to> --send <text>` from `from`: (exit code, stdout).
pub fn websocket(from: &Pod, to: SocketAddr, args: &[&str], text: &str) -> (i32, String) {
    let out = from
        .output(
            testpod()
                .args(["ws", &to.to_string(), "--send", text])
                .args(args),
        )
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The system Python, which has Debian's python3-grpcio (not a pyenv shim).
pub const PYTHON: &str = "/usr/bin/python3";

/// `tests/grpc/echo.py`: the gRPC echo server and client.
pub fn grpc_echo_py() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc/echo.py")
}

/// The gRPC echo server (`echo.py serve`) in `pod` on `port`, named after the pod; returns once
/// it serves.
pub fn serve_grpc(pod: &Pod, port: u16) -> Proc {
    let mut p = pod
        .spawn(Command::new(PYTHON).arg(grpc_echo_py()).args([
            "serve",
            "--port",
            &port.to_string(),
            "--name",
            pod.name(),
        ]))
        .unwrap();
    p.wait_for_output("listening on", READY).unwrap();
    wait_for_tcp(pod, pod.addr(port), READY).unwrap();
    p
}

/// One gRPC call with `echo.py call` from `from`: method `Say`, `Count` or `Fail`; the JSON
/// it prints (`code`, `details`, `messages`, `trailing_metadata`).
pub fn grpc_call(
    from: &Pod,
    to: SocketAddr,
    method: &str,
    data: &str,
    authority: Option<&str>,
) -> serde_json::Value {
    let mut cmd = Command::new(PYTHON);
    cmd.arg(grpc_echo_py())
        .args(["call", &to.to_string(), "--method", method, "--data", data]);
    if let Some(a) = authority {
        cmd.args(["--authority", a]);
    }
    let out = from.output(&cmd).unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "echo.py call printed no result ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_replies_parse_into_status_headers_and_facts() {
        let r = HttpReply::parse(
            "status=200\n< x-backend: reviews-v1\n< content-length: 9\nname=reviews-v1\n\
             path=/\nheader x-request-id: abc\nheader x-forwarded-for: 10.244.1.2\n",
            0,
            "",
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-backend"), Some("reviews-v1"));
        assert_eq!(r.header("x-missing"), None);
        assert_eq!(r.seen("name"), Some("reviews-v1"));
        assert_eq!(r.seen("path"), Some("/"));
        assert_eq!(r.seen_header("x-request-id"), vec!["abc"]);
        assert!(r.body.starts_with("name=reviews-v1\n"));
        let failed = HttpReply::parse("", 2, "error: connect");
        assert_eq!((failed.status, failed.exit), (0, 2));
    }

    #[test]
    fn load_summaries_add_up_backends_by_prefix() {
        let s: LoadSummary = serde_json::from_str(
            r#"{"ok":3,"failed":0,"connections":1,"statuses":{"200":3},
                "backends":{"reviews-v1":1,"reviews-v2":2},"errors":[]}"#,
        )
        .unwrap();
        assert_eq!(s.from_backends("reviews-v2"), 2);
        assert_eq!(s.from_backends("reviews-"), 3);
        assert_eq!((s.status(200), s.status(404)), (3, 0));
    }
}
