//! End-to-end: bounded resources on one node. A greedy pod holding idle connections runs into
//! its own limits (captured connections per pod, metrics connections per address) while
//! another pod's traffic keeps flowing; the refusals show in flows, `weft status` and
//! `/metrics`; closed connections give their places back. Idle relays are closed cleanly.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::traffic::{call_ok, serve};
use weft_tests::*;

const ENROLL: (&str, &str) = ("weft.dev/mesh", "enabled");

/// Holds connections open from a pod: `hold ADDR N SECS OUT` opens N connections to ADDR,
/// waits a moment, writes `{"open": …, "reset": …}` to OUT (a connection the far end closed or
/// reset is `reset`), then keeps the open ones idle for SECS and exits (closing them).
/// `idle ADDR OUT` sends one line, reads its echo, then waits for the end and writes
/// `{"eof": true|false, "after": seconds}` (`false`: reset). `busy ADDR N OUT` sends one byte
/// every 0.5 s N times and writes how many echoes came back.
const HOLDER: &str = r#"
import json, socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2].rsplit(':', 1)[0], int(sys.argv[2].rsplit(':', 1)[1])
def write(out, v):
    with open(out + '.tmp', 'w') as f: json.dump(v, f)
    import os; os.rename(out + '.tmp', out)
if mode == 'hold':
    n, secs, out = int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    conns, reset = [], 0
    for _ in range(n):
        s = socket.socket(); s.settimeout(5)
        # A reset right after the handshake can surface from connect() itself.
        try: s.connect((host, port)); conns.append(s)
        except OSError: reset += 1
    time.sleep(1.5)
    open_ = []
    for s in conns:
        s.setblocking(False)
        try:
            # A greeting is fine; end of stream or a reset means the far end let go.
            if s.recv(4096): open_.append(s)
            else: reset += 1
        except BlockingIOError: open_.append(s)
        except OSError: reset += 1
    write(out, {"open": len(open_), "reset": reset})
    time.sleep(secs)
elif mode == 'idle':
    out = sys.argv[3]
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b'hi\n')
    seen = b''
    while b'hi\n' not in seen: seen += s.recv(64)  # after the server's greeting
    t = time.time()
    try: eof = s.recv(64) == b''
    except OSError: eof = False
    write(out, {"eof": eof, "after": time.time() - t})
elif mode == 'busy':
    n, out = int(sys.argv[3]), sys.argv[4]
    s = socket.create_connection((host, port), timeout=5)
    got = 0
    for _ in range(n):
        s.sendall(b'x'); got += len(s.recv(1)); time.sleep(0.5)
    write(out, {"echoed": got})
"#;

fn holder(pod: &Pod, args: &[&str]) -> Proc {
    pod.spawn(Command::new("python3").arg("-c").arg(HOLDER).args(args))
        .unwrap()
}

/// The JSON a holder wrote to `out`, once it is there.
fn result(out: &std::path::Path, within: Duration) -> Value {
    let until = Instant::now() + within;
    loop {
        if let Ok(text) = std::fs::read_to_string(out) {
            return serde_json::from_str(&text).unwrap();
        }
        assert!(Instant::now() < until, "{} never written", out.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One node: `front/greedy` and `front/calm` (enrolled) call `back/web` (echo, enrolled).
struct Setup {
    cluster: Cluster,
    node: Node,
    greedy: Pod,
    calm: Pod,
    svc: Service,
    weft: Weft,
    _servers: Vec<Proc>,
}

fn setup(name: &str, weft_args: &[&str]) -> Setup {
    let cluster = Cluster::new(name).unwrap();
    let node = cluster.add_node("node-a").unwrap();
    let greedy = cluster
        .add_pod(&node, PodSpec::new("front", "greedy"))
        .unwrap();
    let calm = cluster
        .add_pod(&node, PodSpec::new("front", "calm"))
        .unwrap();
    let web = cluster
        .add_pod(
            &node,
            PodSpec::new("back", "web-0")
                .label("app", "web")
                .port("tcp", 8080),
        )
        .unwrap();
    let svc = cluster
        .add_service(
            ServiceSpec::new("back", "web")
                .selector("app", "web")
                .port("tcp-echo", 80, "tcp", None),
        )
        .unwrap();
    for ns in ["front", "back"] {
        cluster.set_namespace_labels(ns, labels(&[ENROLL])).unwrap();
    }
    let servers = vec![serve(&web, 8080, "echo")];
    let weft = Weft::start_with(&cluster, &node, weft_args).unwrap();
    Setup {
        cluster,
        node,
        greedy,
        calm,
        svc,
        weft,
        _servers: servers,
    }
}

fn out_file(cluster: &Cluster, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-limits-{}", cluster.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

#[test]
fn a_greedy_pod_meets_its_limits_and_others_keep_flowing() {
    let s = setup(
        "limits_greedy",
        &[
            "--max-connections-per-pod",
            "40",
            "--metrics-max-connections-per-ip",
            "4",
        ],
    );
    let target = s.svc.addr(80).to_string();
    let metrics = format!("{}:15020", s.node.ip());

    // 60 idle connections to a captured Service: 40 held, 20 reset at once.
    let captured = out_file(&s.cluster, "captured.json");
    let mut greedy = holder(
        &s.greedy,
        &["hold", &target, "60", "8", captured.to_str().unwrap()],
    );
    let held = result(&captured, Duration::from_secs(30));
    assert_eq!(held["open"], 40, "{held}");
    assert_eq!(held["reset"], 20, "{held}");
    // Every connection the capture listener accepted has TCP keepalive on (the upstream ones
    // are opened in the pod's own network namespace; the connector's unit tests check them).
    let ss = s
        .node
        .output(Command::new("ss").args(["-tnoH", "state", "established", "( sport = :15001 )"]))
        .unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    let sockets: Vec<&str> = ss.lines().collect();
    assert_eq!(sockets.len(), 40, "{ss}");
    assert!(
        sockets.iter().all(|l| l.contains("timer:(keepalive")),
        "{ss}"
    );
    // 10 to the metrics listener (not captured: the node's own address): 4 held.
    let scrapes = out_file(&s.cluster, "metrics.json");
    let mut scraper = holder(
        &s.greedy,
        &["hold", &metrics, "10", "8", scrapes.to_str().unwrap()],
    );
    let held = result(&scrapes, Duration::from_secs(30));
    assert_eq!(held["open"], 4, "{held}");
    assert_eq!(held["reset"], 6, "{held}");

    // Meanwhile another pod's new connections go through, and the node's metrics answer.
    for i in 0..5 {
        let text = format!("calm-{i}");
        assert!(call_ok(&s.calm, s.svc.addr(80), &text).contains(&text));
    }
    let text = s.weft.metrics().unwrap();
    for line in [
        "weft_connections_refused_total{listener=\"capture\",reason=\"per_pod\"} 20",
        "weft_connections_refused_total{listener=\"metrics\",reason=\"per_source\"} 6",
        "# HELP weft_connections_refused_total",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "{line} missing:\n{text}"
        );
    }
    let status = s.weft.status().unwrap();
    let refused = &status["limits"]["refused"];
    let count = |listener: &str, reason: &str| {
        refused
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["listener"] == listener && r["reason"] == reason)
            .map(|r| r["count"].as_u64().unwrap())
    };
    assert_eq!(count("capture", "per_pod"), Some(20), "{status}");
    assert_eq!(count("metrics", "per_source"), Some(6), "{status}");
    assert_eq!(status["limits"]["max_connections_per_pod"], 40);
    let text = s.weft.cli(&["status"]).unwrap();
    assert!(
        text.contains("capture per_pod 20") && text.contains("metrics per_source 6"),
        "{text}"
    );
    let flows = s.weft.flows(&["--verdict", "over_limit"]).unwrap();
    assert_eq!(flows.len(), 20, "{flows:?}");
    for f in &flows {
        assert_eq!(f["source"]["pod"], "greedy");
        let error = f["error"].as_str().unwrap();
        assert!(
            error.contains("front/greedy holds 40 connections")
                && error.contains("--max-connections-per-pod"),
            "{error}"
        );
    }

    // Once the greedy pod lets go, its places are its own again.
    greedy.kill();
    scraper.kill();
    let until = Instant::now() + Duration::from_secs(10);
    while s.weft.status().unwrap()["limits"]["capture_open"] != 0 {
        assert!(Instant::now() < until, "connections never given back");
        std::thread::sleep(Duration::from_millis(100));
    }
    let again = out_file(&s.cluster, "again.json");
    let _again = holder(
        &s.greedy,
        &["hold", &target, "39", "10", again.to_str().unwrap()],
    );
    let held = result(&again, Duration::from_secs(30));
    assert_eq!(held["open"], 39, "{held}");
    // The 40th place is free, exactly.
    assert!(call_ok(&s.greedy, s.svc.addr(80), "back").contains("back"));
}

#[test]
fn an_idle_relay_is_closed_cleanly_and_a_busy_one_is_not() {
    let s = setup("limits_idle", &["--idle-timeout", "2s"]);
    let target = s.svc.addr(80).to_string();
    let idle = out_file(&s.cluster, "idle.json");
    let busy = out_file(&s.cluster, "busy.json");
    let _idle = holder(&s.greedy, &["idle", &target, idle.to_str().unwrap()]);
    let _busy = holder(&s.calm, &["busy", &target, "12", busy.to_str().unwrap()]);
    let closed = result(&idle, Duration::from_secs(30));
    assert_eq!(closed["eof"], true, "a FIN, not a reset: {closed}");
    let after = closed["after"].as_f64().unwrap();
    assert!((1.9..5.0).contains(&after), "{closed}");
    let echoed = result(&busy, Duration::from_secs(30));
    assert_eq!(echoed["echoed"], 12, "the busy one was never cut: {echoed}");
    let flows = s
        .weft
        .wait_flows(1, Duration::from_secs(10), |f| {
            f["source"]["pod"] == "greedy"
        })
        .unwrap();
    let f = &flows[0];
    assert_eq!(f["verdict"], "forwarded", "{f}");
    let error = f["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("closed: idle for 2s"), "{f}");
}
