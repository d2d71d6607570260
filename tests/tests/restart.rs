//! End-to-end: `weft node` restarts without a refused connection or a reset one. A successor
//! takes the listening sockets over from the running node (`--handover-socket`), the
//! predecessor drains (`--drain-timeout`) and exits — under a steady load of new connections,
//! streaming connections and HTTP requests, same-node and across nodes; and after SIGTERM.

use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::traffic::{serve, testpod};
use weft_tests::*;

const ENROLL: (&str, &str) = ("weft.dev/mesh", "enabled");
/// Short, so a test waits little for a predecessor that holds a connection to the end.
const DRAIN: &str = "6s";
const DRAIN_TIMEOUT: Duration = Duration::from_secs(6);

/// Two nodes. node-a: `front/client` (enrolled) and `back/near` (echo 7070, HTTP 8080);
/// node-b: `back/far` (the same). Services `back/near` and `back/far` (7070 tcp-echo, 80 → 8080
/// http). weft on both nodes with a short drain timeout.
struct Restarts {
    cluster: Cluster,
    client: Pod,
    near: Service,
    far: Service,
    weft_a: Weft,
    weft_b: Weft,
    _servers: Vec<Proc>,
}

fn restarts(name: &str) -> Restarts {
    let cluster = Cluster::new(name).unwrap();
    let a = cluster.add_node("node-a").unwrap();
    let b = cluster.add_node("node-b").unwrap();
    let client = cluster
        .add_pod(
            &a,
            PodSpec::new("front", "client").service_account("client"),
        )
        .unwrap();
    let mut servers = Vec::new();
    let mut service = |node: &Node, name: &str| {
        let pod = cluster
            .add_pod(
                node,
                PodSpec::new("back", &format!("{name}-0"))
                    .label("app", name)
                    .service_account(name)
                    .port("echo", 7070)
                    .port("http", 8080),
            )
            .unwrap();
        servers.push(
            pod.spawn(testpod().args([
                "serve",
                "--listen",
                "0.0.0.0:7070",
                "--mode",
                "echo",
                "--tasks",
            ]))
            .unwrap(),
        );
        servers.push(serve(&pod, 8080, "http"));
        wait_for_tcp(&pod, pod.addr(7070), Duration::from_secs(10)).unwrap();
        cluster
            .add_service(
                ServiceSpec::new("back", name)
                    .selector("app", name)
                    .port("tcp-echo", 7070, "echo", None)
                    .port("http", 80, "http", None),
            )
            .unwrap()
    };
    let near = service(&a, "near");
    let far = service(&b, "far");
    for ns in ["front", "back"] {
        cluster.set_namespace_labels(ns, labels(&[ENROLL])).unwrap();
    }
    let args = ["--drain-timeout", DRAIN];
    let weft_a = Weft::start_with(&cluster, &a, &args).unwrap();
    let weft_b = Weft::start_with(&cluster, &b, &args).unwrap();
    Restarts {
        cluster,
        client,
        near,
        far,
        weft_a,
        weft_b,
        _servers: servers,
    }
}

/// `weft-testpod steady` from the client for `secs`: new connections, streaming connections
/// (each shorter than the drain timeout) and HTTP, to both Services.
fn steady(r: &Restarts, secs: u64, extra: &[&str]) -> Proc {
    let tcp = |s: &Service| s.addr(7070).to_string();
    let mut args: Vec<String> = [
        "steady",
        "--tcp",
        &tcp(&r.near),
        "--tcp",
        &tcp(&r.far),
        "--streams",
        "20",
        "--stream-life-ms",
        "2000",
        "--stream-rate",
        "65536",
        "--churn-rate",
        "40",
        "--http",
        &r.far.addr(80).to_string(),
        "--http-rate",
        "40",
        "--http-conns",
        "4",
        "--http-new-rate",
        "10",
        "--duration-s",
        &secs.to_string(),
        "--report-every-s",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    r.client.spawn(testpod().args(&args)).unwrap()
}

/// The summary `steady` printed once it ended.
fn summary(load: &mut Proc, within: Duration) -> Value {
    load.wait_timeout(within)
        .unwrap()
        .expect("the load ended in time");
    serde_json::from_str(load.stdout().trim()).unwrap_or_else(|e| {
        panic!(
            "steady printed no summary ({e}):\n{}\n{}",
            load.stdout(),
            load.stderr()
        )
    })
}

fn failed(summary: &Value) -> u64 {
    summary["failed"].as_u64().unwrap_or(u64::MAX)
}

/// Restarts on both nodes, one after the other, while the load runs: no new connection is
/// refused or fails, no streaming connection is reset or loses a byte, no request fails.
#[test]
fn restarts_under_load_refuse_and_reset_nothing() {
    let mut r = restarts("restart_load");
    let mut load = steady(&r, 40, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let mut handovers = Vec::new();
    for i in 0..4 {
        let weft = if i % 2 == 0 {
            &mut r.weft_a
        } else {
            &mut r.weft_b
        };
        let h = weft
            .hand_over(DRAIN_TIMEOUT + Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("restart {i}: {e:#}"));
        assert!(
            h.old_status.success(),
            "the predecessor exits cleanly: {:?}",
            h.old_status
        );
        let old_log = std::fs::read_to_string(&h.old_log).unwrap_or_default();
        assert!(
            old_log.contains("the successor serves"),
            "the predecessor handed over:\n{old_log}"
        );
        handovers.push(h);
        std::thread::sleep(Duration::from_secs(2));
    }
    let s = summary(&mut load, Duration::from_secs(90));
    assert_eq!(failed(&s), 0, "nothing failed across 4 restarts: {s:#}");
    for load in ["stream", "churn", "http", "http_new"] {
        assert!(
            s["loads"][load]["ok"].as_u64().unwrap_or(0) > 20,
            "{load} ran throughout: {s:#}"
        );
    }
    // The successors serve: the last one on each node has recorded flows of its own.
    for weft in [&r.weft_a, &r.weft_b] {
        let flows = weft.flows(&[]).unwrap();
        assert!(!flows.is_empty(), "{}", weft.log());
    }
    eprintln!(
        "hand-overs (taken over, predecessor exited): {:?}",
        handovers
            .iter()
            .map(|h| (h.took_over, h.old_exited))
            .collect::<Vec<_>>()
    );
}

/// SIGTERM while connections are open: the node keeps accepting until a successor takes the
/// sockets over, its relays finish within the drain timeout with their bytes intact, and then
/// it exits on its own, well before the drain timeout, having cut nothing.
#[test]
fn sigterm_drains_and_a_successor_takes_new_connections() {
    let mut r = restarts("restart_sigterm");
    let mut load = steady(&r, 20, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let old = r.weft_a.pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // Draining on its own, the node still accepts: nothing is refused meanwhile.
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let h = r
        .weft_a
        .hand_over(DRAIN_TIMEOUT + Duration::from_secs(10))
        .unwrap();
    assert_eq!(h.old_pid, old);
    assert!(h.old_status.success(), "{:?}", h.old_status);
    let old_log = std::fs::read_to_string(&h.old_log).unwrap_or_default();
    assert!(
        old_log.contains("drained: every connection ended"),
        "the relays open at SIGTERM finished on their own, nothing was cut:\n{old_log}"
    );
    assert!(
        !old_log.contains("drain timeout reached"),
        "nothing waited for the drain timeout:\n{old_log}"
    );
    eprintln!(
        "successor took over after {:?}; predecessor exited after {:?}",
        h.took_over,
        started.elapsed()
    );
    let s = summary(&mut load, Duration::from_secs(60));
    assert_eq!(failed(&s), 0, "{s:#}");
    // New connections after the hand-over are the successor's.
    let flows = r.weft_a.flows(&[]).unwrap();
    assert!(
        flows.iter().any(|f| f["source"]["pod"] == "client"),
        "the successor serves the client's new connections: {flows:?}"
    );
    let _ = &r.cluster;
}

/// A connection still open at the drain timeout is closed cleanly (FIN, never RST), and the
/// predecessor exits right after.
#[test]
fn the_drain_timeout_closes_what_is_left_cleanly() {
    let mut r = restarts("restart_cut");
    // Two connections held open to the end (a message every 200–400 ms), nothing else.
    let tcp = r.near.addr(7070).to_string();
    let mut held = r
        .client
        .spawn(testpod().args([
            "steady",
            "--tcp",
            &tcp,
            "--hold",
            "2",
            "--hold-min-ms",
            "200",
            "--hold-max-ms",
            "400",
            "--duration-s",
            "20",
        ]))
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let h = r
        .weft_a
        .hand_over(DRAIN_TIMEOUT + Duration::from_secs(10))
        .unwrap();
    assert!(
        h.old_exited >= DRAIN_TIMEOUT,
        "the held connections kept the predecessor to its drain timeout: {h:?}"
    );
    let old_log = std::fs::read_to_string(&h.old_log).unwrap_or_default();
    assert!(old_log.contains("drain timeout reached"), "{old_log}");
    let s = summary(&mut held, Duration::from_secs(60));
    let hold = &s["loads"]["hold"];
    assert_eq!(hold["failed"].as_u64(), Some(2), "both were cut: {s:#}");
    assert_eq!(
        hold["failures"]["closed"].as_u64(),
        Some(2),
        "closed with a FIN, not reset: {s:#}"
    );
}
