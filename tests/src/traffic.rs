//! Traffic for the end-to-end tests: `weft-testpod` servers and calls in pods, and reading
//! their answers. Test helpers: they panic with the process output on failure.

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
pub fn json_str<'a>(v: &'a serde_json::Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
}
