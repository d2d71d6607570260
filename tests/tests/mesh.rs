//! End-to-end: workload identity and mutual TLS between nodes (HBONE), AuthorizationPolicy at
//! L4, PeerAuthentication STRICT in the kernel, certificate rotation and tunnel pooling — on two
//! simulated nodes with real netns, cgroups, eBPF, TLS and sockets.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::traffic::{self, call_ok, peer_ip, serve, testpod};
use weft_tests::*;

const ENROLL: (&str, &str) = ("weft.dev/mesh", "enabled");
const WAIT: Duration = Duration::from_secs(20);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/front/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/back/sa/web";

fn call(from: &Pod, to: SocketAddr, text: &str, timeout_ms: u64) -> Output {
    traffic::call(from, to, text, Duration::from_millis(timeout_ms))
}

fn succeeds(from: &Pod, to: SocketAddr) -> bool {
    call(from, to, "ping", 3000).status.success()
}

use traffic::json_str as s;

/// Two nodes. node-a: `front/client` (sa client) and `front/other` (sa other), both enrolled;
/// node-b: `back/web-0` (sa web, echo on 8080 and 9090, a readiness probe on 9090) behind the
/// Service `back/web` (80 → 8080), enrolled. weft on both nodes.
struct Mesh {
    cluster: Cluster,
    a: Node,
    b: Node,
    client: Pod,
    other: Pod,
    web: Pod,
    svc: Service,
    weft_a: Weft,
    weft_b: Weft,
    _servers: Vec<Proc>,
}

fn mesh(name: &str, weft_args: &[&str]) -> Mesh {
    let cluster = Cluster::new(name).unwrap();
    let a = cluster.add_node("node-a").unwrap();
    let b = cluster.add_node("node-b").unwrap();
    let client = cluster
        .add_pod(
            &a,
            PodSpec::new("front", "client").service_account("client"),
        )
        .unwrap();
    let other = cluster
        .add_pod(&a, PodSpec::new("front", "other").service_account("other"))
        .unwrap();
    let web = cluster
        .add_pod(
            &b,
            PodSpec::new("back", "web-0")
                .label("app", "web")
                .service_account("web")
                .port("http", 8080)
                .port("admin", 9090)
                .readiness_probe("admin"),
        )
        .unwrap();
    let svc = cluster
        .add_service(
            ServiceSpec::new("back", "web")
                .selector("app", "web")
                .port("tcp-echo", 80, "http", None),
        )
        .unwrap();
    cluster
        .set_namespace_labels("front", labels(&[ENROLL]))
        .unwrap();
    cluster
        .set_namespace_labels("back", labels(&[ENROLL]))
        .unwrap();
    let servers = vec![serve(&web, 8080, "echo"), serve(&web, 9090, "echo")];
    let weft_a = Weft::start_with(&cluster, &a, weft_args).unwrap();
    let weft_b = Weft::start_with(&cluster, &b, weft_args).unwrap();
    Mesh {
        cluster,
        a,
        b,
        client,
        other,
        web,
        svc,
        weft_a,
        weft_b,
        _servers: servers,
    }
}

/// Every frame seen on the fabric (the node-to-node link) while it runs.
struct LinkCapture {
    bytes: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LinkCapture {
    fn start(cluster: &Cluster) -> LinkCapture {
        // An AF_PACKET socket created inside the fabric namespace sees every frame on its bridge.
        let fd = weft_tests::netns::in_netns(cluster.fabric_netns(), || {
            // SAFETY: plain socket(2); the descriptor is owned right away.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                )
            };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .unwrap();
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setting a receive timeout on our own socket.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, st) = (bytes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                // SAFETY: reading into our buffer from our socket.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    let mut all = b.lock().unwrap();
                    if all.len() < (256 << 20) {
                        all.extend_from_slice(&buf[..n as usize]);
                    }
                } else if st.load(Ordering::Relaxed) {
                    // Stopped, and nothing left queued (the receive timed out): every frame
                    // that crossed the link before `finish` has been read, even on a busy
                    // machine where this thread lagged behind.
                    break;
                }
            }
        });
        LinkCapture {
            bytes,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.bytes.lock().unwrap())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn cross_node_traffic_is_mutual_tls_and_identified() {
    let m = mesh("mtls_on_the_wire", &[]);
    let secret = format!("weft-secret-{}", std::process::id());

    // Control: a non-mesh pod's plaintext crosses the same link in clear, so the capture works.
    let plain = m
        .cluster
        .add_pod(&m.a, PodSpec::new("plain", "legacy"))
        .unwrap();
    let plain_srv = m
        .cluster
        .add_pod(&m.b, PodSpec::new("plain", "srv"))
        .unwrap();
    let _p = serve(&plain_srv, 7000, "echo");
    let cap = LinkCapture::start(&m.cluster);
    let clear = format!("clear-{secret}");
    call_ok(&plain, plain_srv.addr(7000), &clear);
    let wire = cap.finish();
    assert!(
        contains(&wire, clear.as_bytes()),
        "control payload not seen on the link ({} bytes)",
        wire.len()
    );

    // Mesh: client (node-a) → Service → web-0 (node-b) crosses the link as TLS records only.
    let cap = LinkCapture::start(&m.cluster);
    let resp = call_ok(&m.client, m.svc.addr(80), &secret);
    assert!(resp.contains(&secret), "{resp}");
    let wire = cap.finish();
    assert!(wire.len() > secret.len(), "nothing captured");
    assert!(
        !contains(&wire, secret.as_bytes()),
        "payload seen in clear on the node-to-node link"
    );
    assert!(
        contains(&wire, &[0x17, 0x03, 0x03]),
        "no TLS application-data records on the link"
    );

    // Source node: the flow went out in mTLS, with both identities.
    let f = &m
        .weft_a
        .wait_flows(1, WAIT, |f| {
            s(f, "/source/pod") == "client" && s(f, "/verdict") == "forwarded"
        })
        .unwrap()[0];
    assert_eq!(f["mtls"], Value::Bool(true), "{f}");
    assert_eq!(s(f, "/source/identity"), CLIENT_ID);
    assert_eq!(s(f, "/destination/identity"), WEB_ID);
    assert_eq!(s(f, "/destination/service"), "back/web");
    // Destination node: the source identity comes from the peer certificate.
    let f = &m
        .weft_b
        .wait_flows(1, WAIT, |f| s(f, "/verdict") == "forwarded")
        .unwrap()[0];
    assert_eq!(s(f, "/source/identity"), CLIENT_ID, "{f}");
    assert_eq!(s(f, "/source/pod"), "client");
    assert_eq!(s(f, "/source/ip"), m.client.ip().to_string());
    assert_eq!(s(f, "/destination/pod"), "web-0");
    assert_eq!(s(f, "/destination/identity"), WEB_ID);
    assert_eq!(f["mtls"], Value::Bool(true));
    assert_eq!(f["bytes_sent"].as_u64(), Some(secret.len() as u64));

    // weft certs: each node holds only the identities of its own mesh pods.
    let certs_a = m.weft_a.cli(&["certs", "-o", "json"]).unwrap();
    let certs_b = m.weft_b.cli(&["certs", "-o", "json"]).unwrap();
    assert!(
        certs_a.contains(CLIENT_ID) && !certs_a.contains(WEB_ID),
        "{certs_a}"
    );
    assert!(
        certs_b.contains(WEB_ID) && !certs_b.contains(CLIENT_ID),
        "{certs_b}"
    );
    let table = m.weft_a.cli(&["certs"]).unwrap();
    assert!(
        table.starts_with("IDENTITY") && table.contains("EXPIRES IN"),
        "{table}"
    );
    let wl = m.weft_a.cli(&["workloads"]).unwrap();
    assert!(wl.contains(CLIENT_ID), "{wl}");
}

fn apply(m: &Mesh, yaml: &str) {
    m.cluster.apply_yaml(yaml).unwrap();
}

fn delete(m: &Mesh, kind: &str, ns: &str, name: &str) {
    m.cluster.delete_object(kind, ns, name).unwrap();
}

/// Waits until `from` → `to` is refused, and returns the denied flow from the source node.
fn wait_denied(m: &Mesh, from: &Pod, to: SocketAddr, policy: &str) -> Value {
    wait_until(WAIT, || !succeeds(from, to))
        .unwrap_or_else(|e| panic!("{} → {to} never denied: {e}", from.name()));
    // A denied connection is closed promptly for the client.
    let started = Instant::now();
    let out = call(from, to, "denied?", 5000);
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "not prompt: {:?}",
        started.elapsed()
    );
    let flows = m
        .weft_a
        .wait_flows(1, WAIT, |f| {
            s(f, "/verdict") == "denied"
                && s(f, "/source/pod") == from.name()
                && s(f, "/policy") == policy
        })
        .unwrap();
    flows[0].clone()
}

#[test]
fn authorization_policies_allow_and_deny_at_l4() {
    let m = mesh("authz", &[]);
    let http = m.web.addr(8080);
    let admin = m.web.addr(9090);
    assert!(
        succeeds(&m.client, http) && succeeds(&m.other, http),
        "no policy: everything allowed"
    );

    // ALLOW by principal: only front/client may reach web.
    apply(
        &m,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-client\n  namespace: back\nspec:\n  selector:\n    matchLabels:\n      app: web\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/front/sa/client\"]\n",
    );
    let f = wait_denied(&m, &m.other, http, "back/allow-client");
    assert_eq!(
        s(&f, "/source/identity"),
        "spiffe://cluster.local/ns/front/sa/other"
    );
    assert!(succeeds(&m.client, http));
    // The destination node decided, and recorded it with the policy name.
    m.weft_b
        .wait_flows(1, WAIT, |f| {
            s(f, "/verdict") == "denied" && s(f, "/policy") == "back/allow-client"
        })
        .unwrap();

    // Port rules: the same ALLOW limited to port 8080 refuses 9090.
    apply(
        &m,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-client\n  namespace: back\nspec:\n  selector:\n    matchLabels:\n      app: web\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/front/sa/client\"]\n    to:\n    - operation:\n        ports: [\"8080\"]\n",
    );
    wait_denied(&m, &m.client, admin, "back/allow-client");
    assert!(succeeds(&m.client, http));

    // DENY beats ALLOW: deny the whole front namespace.
    apply(
        &m,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-front\n  namespace: back\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"front\"]\n",
    );
    wait_denied(&m, &m.client, http, "back/deny-front");
    delete(&m, "AuthorizationPolicy", "back", "deny-front");
    delete(&m, "AuthorizationPolicy", "back", "allow-client");
    wait_until(WAIT, || succeeds(&m.client, http)).unwrap();

    // allow-nothing: an empty spec in the namespace refuses everyone.
    apply(
        &m,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-nothing\n  namespace: back\nspec: {}\n",
    );
    wait_denied(&m, &m.client, http, "back/allow-nothing");
    wait_denied(&m, &m.other, http, "back/allow-nothing");
}

#[test]
fn strict_peer_authentication_drops_plaintext_in_the_kernel() {
    let mut m = mesh("strict", &[]);
    // A pod outside the mesh, on the other node.
    let legacy = m
        .cluster
        .add_pod(&m.a, PodSpec::new("plain", "legacy"))
        .unwrap();
    let http = m.web.addr(8080);
    wait_until(WAIT, || succeeds(&legacy, http)).expect("PERMISSIVE (default): plaintext works");

    apply(
        &m,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: back\nspec:\n  mtls:\n    mode: STRICT\n",
    );
    wait_until(WAIT, || !succeeds(&legacy, http))
        .expect("STRICT: plaintext from a non-mesh pod is dropped");
    let st = m.weft_b.status().unwrap();
    assert!(
        st.pointer("/capture/counters/strict_dropped")
            .and_then(Value::as_u64)
            .unwrap()
            >= 1,
        "{st}"
    );
    // Mesh traffic still arrives: weft announces its deliveries to the kernel.
    call_ok(&m.client, m.svc.addr(80), "through the mesh");
    call_ok(&m.client, m.web.addr(9090), "through the mesh");
    // From the node itself (a hostNetwork pod, a node process): only the probe port.
    let from_node_b = |to: SocketAddr| {
        m.b.output(testpod().args([
            "call",
            &to.to_string(),
            "--send",
            "probe",
            "--timeout-ms",
            "2000",
        ]))
        .unwrap()
        .status
        .success()
    };
    assert!(from_node_b(m.web.addr(9090)), "the readiness probe port");
    assert!(
        !from_node_b(http),
        "a node process reached a STRICT pod's service port in plaintext"
    );

    // A node whose route to its pods uses another of its addresses (a pod bridge's own, as
    // with bridge CNIs): weft's deliveries and the probe still get in, from that address.
    m.b.ip_cmd(&["addr", "add", "10.200.0.9/32", "dev", "lo"])
        .unwrap();
    let route = format!("{}/32", m.web.ip());
    m.b.ip_cmd(&[
        "route",
        "replace",
        &route,
        "dev",
        m.web.host_veth(),
        "src",
        "10.200.0.9",
    ])
    .unwrap();
    m.weft_b.restart().unwrap(); // reads the node's addresses at start (then every 10 s)
    call_ok(&m.client, m.svc.addr(80), "from the bridge address");
    assert!(
        from_node_b(m.web.addr(9090)),
        "probe from the bridge address"
    );
    assert!(!from_node_b(http));

    // portLevelMtls: port 9090 PERMISSIVE while the pod stays STRICT.
    apply(
        &m,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: web-admin\n  namespace: back\nspec:\n  selector:\n    matchLabels:\n      app: web\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    9090:\n      mode: PERMISSIVE\n",
    );
    wait_until(WAIT, || succeeds(&legacy, m.web.addr(9090))).expect("port-level PERMISSIVE");
    assert!(!succeeds(&legacy, http));

    // Back to PERMISSIVE.
    delete(&m, "PeerAuthentication", "back", "web-admin");
    delete(&m, "PeerAuthentication", "back", "strict");
    wait_until(WAIT, || succeeds(&legacy, http)).expect("PERMISSIVE again");
}

/// A security object weft cannot apply — a misspelt kind, a version Istio does not serve — is a
/// policy weft cannot enforce: what it could select is denied (and its plaintext dropped as
/// STRICT) until it is fixed, while the node starts with it in the registry, everything else
/// keeps flowing and `weft status` names it with its file and line.
#[test]
fn security_objects_weft_cannot_apply_fail_closed() {
    let mut m = mesh("fail_closed", &[]);
    let http = m.web.addr(8080);
    // Another workload of `back`, which the broken object does not select.
    let api = m
        .cluster
        .add_pod(
            &m.b,
            PodSpec::new("back", "api-0")
                .label("app", "api")
                .service_account("api")
                .port("http", 8080),
        )
        .unwrap();
    let _api_server = serve(&api, 8080, "echo");
    let legacy = m
        .cluster
        .add_pod(&m.a, PodSpec::new("plain", "legacy"))
        .unwrap();
    wait_until(WAIT, || succeeds(&m.other, http) && succeeds(&legacy, http))
        .expect("no policy: mesh and plaintext calls work");

    // As a user wrote it: a DENY for front/other, with the kind misspelt.
    let typo = "apiVersion: security.istio.io/v1\nkind: AuthorisationPolicy\nmetadata:\n  name: deny-other\n  namespace: back\nspec:\n  selector:\n    matchLabels:\n      app: web\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/front/sa/other\"]\n";
    apply(&m, typo);
    // Not just the caller it meant to deny: nothing reaches what it selects.
    let f = wait_denied(&m, &m.other, http, "back/deny-other");
    assert!(
        s(&f, "/error").contains("fail_closed"),
        "the flow says why: {f}"
    );
    wait_denied(&m, &m.client, http, "back/deny-other");
    let at_b = m
        .weft_b
        .wait_flows(1, WAIT, |f| {
            s(f, "/verdict") == "denied" && s(f, "/policy") == "back/deny-other"
        })
        .unwrap();
    // One wording on both nodes.
    assert_eq!(s(&at_b[0], "/error"), s(&f, "/error"), "{f} {}", at_b[0]);
    assert_eq!(
        s(&f, "/error"),
        "denied by policy back/deny-other (fail_closed)"
    );
    wait_until(WAIT, || !succeeds(&legacy, http))
        .expect("plaintext to a workload that fails closed is dropped as STRICT");
    // What it cannot select is untouched.
    assert!(succeeds(&m.client, api.addr(8080)));
    assert!(succeeds(&legacy, api.addr(8080)));

    // The node reports it, with where it is and what weft knows.
    let st = m.weft_b.status().unwrap();
    let not_applied = st["registry"]["not_applied"].to_string();
    assert!(
        not_applied.contains("registry.yaml:")
            && not_applied.contains("(AuthorisationPolicy back/deny-other)")
            && not_applied.contains("did you mean AuthorizationPolicy?")
            && not_applied.contains("weft knows AuthorizationPolicy (v1, v1beta1)"),
        "{st}"
    );
    assert!(
        st["mesh"]["fail_closed"].to_string().contains(
            "AuthorisationPolicy back/deny-other (the pods labelled app=web in namespace back)"
        ),
        "{st}"
    );
    assert!(m
        .weft_b
        .cli(&["status"])
        .unwrap()
        .contains("FAILING CLOSED"));

    // A node that starts with it in the registry starts, and fails closed from the first call.
    m.weft_b.restart().unwrap();
    wait_denied(&m, &m.client, http, "back/deny-other");
    assert!(succeeds(&m.client, api.addr(8080)));

    // Fixed: the policy applies as written, and only to whom it names.
    delete(&m, "AuthorisationPolicy", "back", "deny-other");
    apply(
        &m,
        &typo.replace("AuthorisationPolicy", "AuthorizationPolicy"),
    );
    wait_until(WAIT, || succeeds(&m.client, http)).expect("fixed: client allowed again");
    wait_denied(&m, &m.other, http, "back/deny-other");
    wait_until(WAIT, || succeeds(&legacy, http)).expect("fixed: PERMISSIVE again");
    assert_eq!(
        m.weft_b.status().unwrap()["registry"]["not_applied"],
        Value::Array(vec![])
    );

    // A version Istio does not serve, namespace-wide: the same.
    delete(&m, "AuthorizationPolicy", "back", "deny-other");
    apply(
        &m,
        "apiVersion: security.istio.io/v2\nkind: PeerAuthentication\nmetadata:\n  name: future\n  namespace: back\nspec:\n  mtls:\n    mode: PERMISSIVE\n",
    );
    wait_denied(&m, &m.client, api.addr(8080), "back/future");
    delete(&m, "PeerAuthentication", "back", "future");
    wait_until(WAIT, || succeeds(&m.client, api.addr(8080))).expect("removed: allowed again");
}

#[test]
fn hbone_listener_refuses_bad_peers_and_bad_input() {
    let m = mesh("hbone_refusals", &[]);
    let hbone: SocketAddr = (m.b.ip(), 15008).into();
    let before = m.weft_b.status().unwrap();
    let failed = |st: &Value| {
        st.pointer("/tunnel/inbound/tls_failed")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };

    // Garbage bytes, a plaintext HTTP/1 request, a TLS hello without a client certificate:
    // each connection is closed, and the listener keeps serving.
    use std::io::{Read, Write};
    for input in [
        &b"\x00\x01garbage\xff\xfe\r\n\r\n"[..],
        &b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"[..],
        &b"CONNECT 10.244.2.2:8080 HTTP/1.1\r\n\r\n"[..],
    ] {
        let mut c = tcp_connect(&m.a, hbone, Duration::from_secs(5)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = c.write_all(input);
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf);
        assert!(
            !String::from_utf8_lossy(&buf).contains("200"),
            "answered {buf:?}"
        );
    }
    wait_until(WAIT, || {
        failed(&m.weft_b.status().unwrap()) >= failed(&before) + 3
    })
    .unwrap();
    // Still serving mesh traffic.
    call_ok(&m.client, m.svc.addr(80), "still here");
}

#[test]
fn tunnels_are_pooled_per_identity_pair() {
    let m = mesh("pooling", &[]);
    let load = m
        .client
        .output(testpod().args([
            "load",
            &m.svc.addr(80).to_string(),
            "--conns",
            "100",
            "--parallel",
            "100",
            "--tag",
            "pool",
        ]))
        .unwrap();
    let summary: Value = serde_json::from_slice(&load.stdout).unwrap_or(Value::Null);
    assert_eq!(
        summary["ok"].as_u64(),
        Some(100),
        "{summary} {}",
        String::from_utf8_lossy(&load.stderr)
    );
    let st = m.weft_a.status().unwrap();
    let opened = st
        .pointer("/tunnel/outbound/connections_opened_total")
        .and_then(Value::as_u64)
        .unwrap();
    assert!(
        (1..=3).contains(&opened),
        "100 tunnels over {opened} TLS connections: {st}"
    );
    let inbound = m.weft_b.status().unwrap();
    let accepted = inbound
        .pointer("/tunnel/inbound/tls_accepted")
        .and_then(Value::as_u64)
        .unwrap();
    assert!(accepted <= 3, "{inbound}");
    let flows = m
        .weft_b
        .wait_flows(100, WAIT, |f| s(f, "/verdict") == "forwarded")
        .unwrap();
    assert!(flows.iter().all(|f| s(f, "/source/identity") == CLIENT_ID));
}

#[test]
fn certificates_rotate_without_breaking_connections() {
    let m = mesh("rotation", &["--svid-ttl", "10s"]);
    let serials = |w: &Weft| -> BTreeSet<String> {
        w.cli(&["certs", "-o", "json"])
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|c| s(c, "/identity") == CLIENT_ID)
            .map(|c| s(&c, "/serial").to_string())
            .collect()
    };
    // A 30 s stream of request/response on one connection, while new connections keep coming.
    let (_echo, mut stream) = echo_stream(&m, 30_000);
    let mut seen = serials(&m.weft_a);
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(30) {
        call_ok(&m.client, m.svc.addr(80), &format!("new-{calls}"));
        calls += 1;
        seen.extend(serials(&m.weft_a));
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = stream
        .wait_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("stream finished");
    let out: Value = serde_json::from_str(stream.stdout().trim()).unwrap_or(Value::Null);
    assert!(status.success(), "{}", stream.stdout());
    assert_eq!(out["errors"].as_u64(), Some(0), "{out}");
    assert!(out["ops"].as_u64().unwrap_or(0) > 100, "{out}");
    assert!(
        seen.len() >= 3,
        "expected rotations every ~5s, saw serials {seen:?}"
    );
    assert!(calls > 20);
}

/// An echo server on web-0:7070 and, from the client across nodes, one connection carrying
/// 64-byte request/response exchanges at 20/s for `ms` (`weft-testpod bench rr`).
fn echo_stream(m: &Mesh, ms: u64) -> (Proc, Proc) {
    echo_stream_to(m, &m.web, ms)
}

/// [`echo_stream`] to `pod`.
fn echo_stream_to(m: &Mesh, pod: &Pod, ms: u64) -> (Proc, Proc) {
    let echo = pod
        .spawn(testpod().args(["serve", "--listen", "0.0.0.0:7070", "--mode", "echo"]))
        .unwrap();
    wait_for_tcp(pod, pod.addr(7070), WAIT).unwrap();
    let stream = m
        .client
        .spawn(testpod().args([
            "bench",
            "rr",
            &pod.addr(7070).to_string(),
            "--duration-ms",
            &ms.to_string(),
            "--warmup-ms",
            "0",
            "--size",
            "64",
            "--rate",
            "20",
        ]))
        .unwrap();
    (echo, stream)
}

/// An AuthorizationPolicy denying the client everything in `back`.
const DENY_CLIENT: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  namespace: back\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/front/sa/client\"]\n";

/// `stream` (an [`echo_stream`]) ends, closed by `weft` because `DENY_CLIENT` now denies it:
/// its flow to `pod` says so and keeps what it relayed until then. Returns that flow.
fn assert_closed_by_policy(stream: &mut Proc, weft: &Weft, pod: &str) -> Value {
    let status = stream
        .wait_timeout(WAIT)
        .unwrap()
        .expect("the open connection was not closed after the policy denied it");
    assert!(!status.success(), "{}", stream.stdout());
    let flows = weft
        .wait_flows(1, WAIT, |f| {
            s(f, "/destination/pod") == pod
                && f["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("closed: now denied by back/deny-client"))
        })
        .unwrap();
    assert_eq!(s(&flows[0], "/verdict"), "forwarded", "{}", flows[0]);
    let moved = |k: &str| flows[0][k].as_u64().unwrap_or(0);
    assert!(
        moved("bytes_sent") > 0 && moved("bytes_received") > 0,
        "what it relayed before it was closed is in its flow: {}",
        flows[0]
    );
    flows[0].clone()
}

/// Milliseconds since the Unix epoch of a UTC RFC 3339 time (`2026-01-02T03:04:05.678Z`), as
/// flows and weft's log lines write it.
fn unix_ms(rfc3339: &str) -> f64 {
    let parsed = || -> Option<f64> {
        let (date, clock) = rfc3339.split_once('T')?;
        let mut date = date.split('-').map(|p| p.parse::<i64>().ok());
        let (y, m, d) = (date.next()??, date.next()??, date.next()??);
        let mut clock = clock.strip_suffix('Z')?.split(':');
        let h: i64 = clock.next()?.parse().ok()?;
        let min: i64 = clock.next()?.parse().ok()?;
        let sec: f64 = clock.next()?.parse().ok()?;
        // Days from the civil date (proleptic Gregorian), counted from 1970-01-01.
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
        let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
        Some(((days * 86_400 + h * 3600 + min * 60) as f64 + sec) * 1000.0)
    };
    parsed().unwrap_or_else(|| panic!("not a UTC RFC 3339 time: {rfc3339:?}"))
}

/// When (Unix milliseconds) weft logged the first line containing `message` after its first
/// `skip` such lines.
fn logged_at(weft: &Weft, message: &str, skip: usize) -> Option<f64> {
    let log = weft.log();
    let line = log.lines().filter(|l| l.contains(message)).nth(skip)?;
    // Colours, when the log has them, wrap the time.
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            plain.push(c);
        }
    }
    Some(unix_ms(plain.split_whitespace().next()?))
}

/// How many lines of weft's log contain `message`.
fn logged(weft: &Weft, message: &str) -> usize {
    weft.log().lines().filter(|l| l.contains(message)).count()
}

/// When (Unix milliseconds) `flow` ended: accepted at `time`, open for `duration_ms`.
fn ended_ms(flow: &Value) -> f64 {
    unix_ms(s(flow, "/time")) + flow["duration_ms"].as_f64().unwrap()
}

/// A DENY policy added while a tunnel and a same-node relay are open closes both within a
/// second: connections admitted under the policies of then are decided again when the policies
/// change (the tunnel by the destination node, the same-node relay by the node that delivered
/// it), not only new ones. The second is counted from when each node applied the change (its
/// `policies updated` log line) to the end of its flow.
#[test]
fn a_policy_change_closes_open_tunnels_and_same_node_relays_within_a_second() {
    let m = mesh("revoke", &[]);
    // A second web pod on node-a, next to the client.
    let local = m
        .cluster
        .add_pod(
            &m.a,
            PodSpec::new("back", "web-local")
                .service_account("web")
                .port("http", 8080),
        )
        .unwrap();
    wait_until(WAIT, || {
        m.weft_a
            .workloads()
            .unwrap()
            .iter()
            .any(|w| s(w, "/pod") == "web-local")
    })
    .unwrap();
    let (_echo_b, mut tunnel) = echo_stream(&m, 60_000);
    let (_echo_a, mut relay) = echo_stream_to(&m, &local, 60_000);
    std::thread::sleep(Duration::from_secs(2));
    assert!(tunnel.is_running(), "{}", tunnel.stderr());
    assert!(relay.is_running(), "{}", relay.stderr());
    let applied = "policies updated";
    let before = (logged(&m.weft_a, applied), logged(&m.weft_b, applied));
    let reloaded = "registry: reloaded";
    let reloads = (logged(&m.weft_a, reloaded), logged(&m.weft_b, reloaded));
    let written = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0;
    apply(&m, DENY_CLIENT);

    let tunnelled = assert_closed_by_policy(&mut tunnel, &m.weft_b, "web-0");
    assert_eq!(tunnelled["mtls"], Value::Bool(true), "{tunnelled}");
    let same_node = assert_closed_by_policy(&mut relay, &m.weft_a, "web-local");
    assert_eq!(same_node["mtls"], Value::Bool(false), "{same_node}");
    for (weft, flow, skip, reloads) in [
        (&m.weft_b, &tunnelled, before.1, reloads.1),
        (&m.weft_a, &same_node, before.0, reloads.0),
    ] {
        let node = weft.node().name();
        let applied_at = logged_at(weft, applied, skip)
            .unwrap_or_else(|| panic!("{node} never logged {applied:?}:\n{}", weft.log()));
        let reloaded_at = logged_at(weft, reloaded, reloads).unwrap();
        let ended = ended_ms(flow);
        eprintln!(
            "{node}, from the registry file's change: reloaded at {:.0} ms, policies applied \
             at {:.0} ms, flow closed at {:.0} ms ({:.0} ms after the apply)",
            reloaded_at - written,
            applied_at - written,
            ended - written,
            ended - applied_at,
        );
        assert!(
            ended >= applied_at && ended - applied_at < 1000.0,
            "{node}: the flow ended {:.0} ms after the node applied the policy: {flow}",
            ended - applied_at
        );
        assert!(
            ended - written < 1000.0,
            "{node}: the flow ended {:.0} ms after the registry file changed: {flow}",
            ended - written
        );
    }
    // New connections are refused.
    wait_denied(&m, &m.client, m.web.addr(7070), "back/deny-client");
    wait_denied(&m, &m.client, local.addr(7070), "back/deny-client");
}

/// A same-node HTTP connection is served request by request, each authorized under the
/// policies in force when it comes: once a DENY is applied, the next request on the same
/// keep-alive connection is refused (403) and the connection stays open for the answer.
#[test]
fn a_policy_change_reaches_the_next_request_of_an_open_http_connection() {
    let m = mesh("revoke_http", &[]);
    let local = m
        .cluster
        .add_pod(
            &m.a,
            PodSpec::new("back", "web-local")
                .service_account("web")
                .port("http", 8080),
        )
        .unwrap();
    let _srv = serve(&local, 8080, "http");
    wait_until(WAIT, || {
        m.weft_a
            .workloads()
            .unwrap()
            .iter()
            .any(|w| s(w, "/pod") == "web-local")
    })
    .unwrap();
    let mut load = m
        .client
        .spawn(testpod().args([
            "http-load",
            &local.addr(8080).to_string(),
            "--count",
            "60",
            "--interval-ms",
            "50",
            "--max-secs",
            "20",
        ]))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(load.is_running(), "{}", load.stderr());
    apply(&m, DENY_CLIENT);
    load.wait_timeout(WAIT)
        .unwrap()
        .expect("http-load did not end");
    let out: Value = serde_json::from_str(load.stdout().trim()).unwrap();
    let status = |code: &str| out["statuses"][code].as_u64().unwrap_or(0);
    assert!(status("200") > 0 && status("403") > 0, "{out}");
    assert_eq!(status("200") + status("403"), 60, "{out}");
    assert_eq!(
        out["connections"],
        Value::from(1),
        "one connection throughout: {out}"
    );
    m.weft_a
        .wait_flows(1, WAIT, |f| {
            s(f, "/verdict") == "denied"
                && s(f, "/destination/pod") == "web-local"
                && s(f, "/policy") == "back/deny-client"
                && f["http"].is_object()
        })
        .unwrap();
}

/// Connections that name no workload (here: a pod dialling the node proxy's capture port
/// itself, which no redirect record describes) are kept in a ring of their own, a tenth of
/// `--flow-capacity`: a flood of them leaves every workload flow in `weft flows`, and `weft
/// status` counts what they were.
#[test]
fn junk_connections_never_push_workload_flows_out_of_the_flow_log() {
    let m = mesh("junk_flows", &["--flow-capacity", "20"]);
    for i in 0..5 {
        call_ok(&m.client, m.web.addr(8080), &format!("real-{i}"));
    }
    let forwarded = |f: &Value| s(f, "/verdict") == "forwarded";
    let real: Vec<u64> = m
        .weft_a
        .wait_flows(5, WAIT, forwarded)
        .unwrap()
        .iter()
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    let proxy: SocketAddr = (m.a.ip(), 15001).into();
    let out = m
        .client
        .output(testpod().args([
            "load",
            &proxy.to_string(),
            "--conns",
            "200",
            "--parallel",
            "8",
            "--tag",
            "junk",
        ]))
        .unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let unattributed = |st: &Value| st["flows"]["unattributed"].clone();
    wait_until(WAIT, || {
        unattributed(&m.weft_a.status().unwrap())["seen"].as_u64() >= Some(200)
    })
    .unwrap();
    let st = unattributed(&m.weft_a.status().unwrap());
    let seen = st["seen"].as_u64().unwrap();
    assert_eq!(
        (&st["kept"], &st["capacity"], st["dropped"].as_u64()),
        (&Value::from(2), &Value::from(2), Some(seen - 2)),
        "{st}"
    );

    let flows = m.weft_a.flows(&[]).unwrap();
    let kept: Vec<u64> = flows
        .iter()
        .filter(|f| forwarded(f))
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(kept, real, "every workload flow survived the flood");
    let junk: Vec<&Value> = flows
        .iter()
        .filter(|f| s(f, "/verdict") == "unidentified")
        .collect();
    assert_eq!(junk.len(), 2, "the latest junk only");
    // One list, in the order the flows were recorded.
    let seqs: Vec<u64> = flows.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let text = m.weft_a.cli(&["status"]).unwrap();
    assert!(
        text.contains(&format!(
            "Unattributed flows (no workload, or over a limit): 2 kept of 2, {seen} seen, {} dropped",
            seen - 2
        )),
        "{text}"
    );
}

#[test]
fn same_node_mesh_traffic_is_authorized_without_tls() {
    let m = mesh("same_node", &[]);
    // A second web pod on node-a, next to the client.
    let local = m
        .cluster
        .add_pod(
            &m.a,
            PodSpec::new("back", "web-local")
                .service_account("web")
                .port("http", 8080),
        )
        .unwrap();
    let _srv = serve(&local, 8080, "echo");
    // weft picks the new pod up from the registry file.
    wait_until(WAIT, || {
        m.weft_a
            .workloads()
            .unwrap()
            .iter()
            .any(|w| s(w, "/pod") == "web-local")
    })
    .unwrap();
    call_ok(&m.client, local.addr(8080), "same node");
    let f = &m
        .weft_a
        .wait_flows(1, WAIT, |f| {
            s(f, "/destination/pod") == "web-local" && s(f, "/verdict") == "forwarded"
        })
        .unwrap()[0];
    assert_eq!(f["mtls"], Value::Bool(false), "{f}");
    assert_eq!(s(f, "/source/identity"), CLIENT_ID);
    // A connection open when the policy arrives is decided again, here, and closed.
    let (_echo, mut stream) = echo_stream_to(&m, &local, 60_000);
    std::thread::sleep(Duration::from_secs(2));
    assert!(stream.is_running(), "{}", stream.stderr());
    apply(&m, DENY_CLIENT);
    assert_closed_by_policy(&mut stream, &m.weft_a, "web-local");
    wait_denied(&m, &m.client, local.addr(8080), "back/deny-client");
}

/// A peer that is not a proper mesh node, driven with weft's own HBONE client against a real
/// `weft node`: a certificate from another CA is refused at the TLS layer, and a valid peer
/// asking for an address that is not a pod of that node is refused (no open relay).
/// A node's identity manager holding `id`'s certificates, signed by the CA in `ca` (a
/// `weft ca init` directory): what a node presents on HBONE for that workload.
fn client_credentials(
    ca: &std::path::Path,
    id: &weft::identity::SpiffeId,
) -> Arc<weft::identity::IdentityManager> {
    use weft::identity::{AuthorityConfig, IdentityConfig, IdentityManager};
    let mgr = IdentityManager::new(IdentityConfig {
        ca_cert: ca.join("ca.crt"),
        authority: AuthorityConfig::Key(ca.join("ca.key")),
        trust_bundle: vec![],
        trust_domain: "cluster.local".into(),
        svid_ttl: Duration::from_secs(3600),
    })
    .unwrap();
    mgr.set_local_identities(std::collections::HashSet::from([id.clone()]));
    Arc::new(mgr)
}

#[test]
fn hbone_refuses_foreign_certificates_and_non_local_targets() {
    use weft::identity::{init_ca, IdentityManager, SpiffeId};
    use weft::telemetry::Telemetry;
    use weft::tunnel::client::{Hbone, Pool, PoolConfig};

    let m = mesh("hbone_peers", &[]);
    let client_id: SpiffeId = CLIENT_ID.parse().unwrap();
    let web_id: SpiffeId = WEB_ID.parse().unwrap();
    let manager = |ca: &std::path::Path| client_credentials(ca, &client_id);
    let rogue_dir = tempfile::tempdir().unwrap();
    init_ca(rogue_dir.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
    let rogue = manager(rogue_dir.path());
    let genuine = manager(&weft_tests::mesh_ca(&m.cluster).unwrap());
    let hbone = |target: SocketAddr| Hbone {
        source: client_id.clone(),
        destination: web_id.clone(),
        node: (m.b.ip(), 15008).into(),
        target,
        forwarded_for: m.client.ip().into(),
    };
    let failed_before = m.weft_b.status().unwrap()["tunnel"]["inbound"]["tls_failed"]
        .as_u64()
        .unwrap();

    // From node-a's network, as a node would.
    let results = weft_tests::netns::in_netns(m.a.netns_name(), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let connect = |mgr: Arc<IdentityManager>, req: Hbone| async move {
                Pool::new(
                    mgr,
                    PoolConfig::default(),
                    Arc::new(Telemetry::new("node-a", 10)),
                )
                .connect(req)
                .await
                .map(drop)
            };
            (
                connect(rogue.clone(), hbone(m.web.addr(8080))).await,
                connect(genuine.clone(), hbone(m.client.addr(8080))).await,
                connect(genuine.clone(), hbone(m.web.addr(8080))).await,
            )
        })
    })
    .unwrap();
    let (rogue_res, not_local, good) = results;
    let e = rogue_res.expect_err("a certificate from another CA must be refused");
    assert!(
        e.status().is_none(),
        "refused at the TLS layer, not by HTTP: {e}"
    );
    assert_eq!(
        not_local.expect_err("not a pod of node-b").status(),
        Some(404)
    );
    good.expect("a genuine peer asking for a local pod is served");
    let failed_after = m.weft_b.status().unwrap()["tunnel"]["inbound"]["tls_failed"]
        .as_u64()
        .unwrap();
    assert!(failed_after > failed_before);
    // Nothing was delivered for the refused ones.
    let flows = m.weft_b.flows(&[]).unwrap();
    assert!(
        flows.iter().all(|f| s(f, "/destination/pod") != "client"),
        "{flows:?}"
    );
}

/// A node whose proxy listens on an address of its own (`--proxy-address`) still receives HBONE
/// where other nodes dial it, its InternalIP; and `--hbone-address` moves the listener.
#[test]
fn hbone_listens_where_peers_dial() {
    let mut m = mesh("hbone_address", &[]);
    m.b.ip_cmd(&["addr", "add", "10.200.0.2/32", "dev", "lo"])
        .unwrap();
    m.weft_b.stop().unwrap();
    let weft_b = Weft::start_with(&m.cluster, &m.b, &["--proxy-address", "10.200.0.2"]).unwrap();
    let resp = call_ok(&m.client, m.svc.addr(80), "via-internal-ip");
    assert!(resp.contains("via-internal-ip"), "{resp}");
    let f = &weft_b
        .wait_flows(1, WAIT, |f| s(f, "/verdict") == "forwarded")
        .unwrap()[0];
    assert_eq!(f["mtls"], Value::Bool(true), "{f}");
    assert_eq!(s(f, "/source/identity"), CLIENT_ID, "{f}");
    drop(weft_b);

    // Told to listen where no peer dials: the node says so, and cross-node calls fail.
    let weft_b = Weft::start_with(
        &m.cluster,
        &m.b,
        &[
            "--proxy-address",
            "10.200.0.2",
            "--hbone-address",
            "10.200.0.2",
        ],
    )
    .unwrap();
    assert!(
        weft_b
            .log()
            .contains("--hbone-address is not the node's address"),
        "{}",
        weft_b.log()
    );
    assert!(!succeeds(&m.client, m.svc.addr(80)));
    let f = &m
        .weft_a
        .wait_flows(1, WAIT, |f| s(f, "/verdict") == "connect_failed")
        .unwrap()[0];
    assert_eq!(
        s(f, "/destination/pod"),
        "web-0",
        "the tunnel to node-b's InternalIP is refused: {f}"
    );
}

/// A node cannot lend its callers another address: the `Forwarded: for=` of a tunnel counts
/// only for a pod of the peer's identity on the peer's node; any other claim leaves the source
/// unknown, and a DENY on `ipBlocks` then applies.
#[test]
fn a_forged_source_address_does_not_dodge_a_deny_on_ip_blocks() {
    use weft::identity::SpiffeId;
    use weft::telemetry::Telemetry;
    use weft::tunnel::client::{Hbone, Pool, PoolConfig};

    let m = mesh("hbone_forged_source", &[]);
    apply(
        &m,
        &format!(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-client-ip, namespace: back}}
spec:
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks: [\"{}/32\"]
",
            m.client.ip()
        ),
    );
    wait_denied(&m, &m.client, m.svc.addr(80), "back/deny-client-ip");
    // `other` (another identity, same node) is not in the block: it gets through.
    assert!(succeeds(&m.other, m.svc.addr(80)));

    // node-a's genuine credentials for front/client, claiming other addresses.
    let client_id: SpiffeId = CLIENT_ID.parse().unwrap();
    let mgr = client_credentials(&weft_tests::mesh_ca(&m.cluster).unwrap(), &client_id);
    let claims: Vec<std::net::IpAddr> = vec![
        m.client.ip().into(),           // the truth
        m.other.ip().into(),            // a pod of another identity
        "10.244.77.7".parse().unwrap(), // no pod at all
    ];
    let results = weft_tests::netns::in_netns(m.a.netns_name(), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut out = Vec::new();
            for claim in &claims {
                let req = Hbone {
                    source: client_id.clone(),
                    destination: WEB_ID.parse().unwrap(),
                    node: (m.b.ip(), 15008).into(),
                    target: m.web.addr(8080),
                    forwarded_for: *claim,
                };
                let pool = Pool::new(
                    mgr.clone(),
                    PoolConfig::default(),
                    Arc::new(Telemetry::new("node-a", 10)),
                );
                out.push(pool.connect(req).await.map(drop).map_err(|e| e.status()));
            }
            out
        })
    })
    .unwrap();
    for (claim, result) in claims.iter().zip(&results) {
        assert_eq!(*result, Err(Some(403)), "claiming {claim}: {result:?}");
    }
    // The destination recorded the verified address for the truth, none for the forgeries.
    let denied = m
        .weft_b
        .wait_flows(4, WAIT, |f| {
            s(f, "/verdict") == "denied" && s(f, "/policy") == "back/deny-client-ip"
        })
        .unwrap();
    assert!(
        denied.iter().all(|f| f["source"]["ip"].is_null()
            || s(f, "/source/ip") == m.client.ip().to_string()),
        "{denied:?}"
    );
    assert!(
        denied.iter().any(|f| f["source"]["ip"].is_null()),
        "{denied:?}"
    );
}

/// weft captures IPv4 only: an enrolled pod's native IPv6 connect is refused (EPERM) rather than
/// let around the mesh, and an IPv6 SYN to a STRICT pod is dropped.
#[test]
fn native_ipv6_never_goes_around_the_mesh() {
    let m = mesh("ipv6", &[]);
    let legacy = m
        .cluster
        .add_pod(&m.a, PodSpec::new("plain", "legacy"))
        .unwrap();
    // Link addresses on node-a's veths to client and legacy, and node-b's to web-0.
    let v6 = |node: &Node, pod: &Pod, net: &str| {
        node.ip_cmd(&[
            "-6",
            "addr",
            "add",
            &format!("{net}::1/64"),
            "dev",
            pod.host_veth(),
            "nodad",
        ])
        .unwrap();
        pod.ip_cmd(&[
            "-6",
            "addr",
            "add",
            &format!("{net}::2/64"),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
    };
    v6(&m.a, &m.client, "fd00:a");
    v6(&m.a, &legacy, "fd00:c");
    v6(&m.b, &m.web, "fd00:b");
    let node_srv =
        m.a.spawn(testpod().args(["serve", "--listen", "[::]:7070", "--mode", "echo"]))
            .unwrap();
    let _web6 = m
        .web
        .spawn(testpod().args(["serve", "--listen", "[::]:8086", "--mode", "echo"]))
        .unwrap();
    let node_a6: SocketAddr = "[fd00:c::1]:7070".parse().unwrap();
    // Outside the mesh, IPv6 works (and the servers are up).
    wait_until(WAIT, || succeeds(&legacy, node_a6)).expect("legacy pod over IPv6");
    // An enrolled pod: refused at connect().
    let out = call(&m.client, "[fd00:a::1]:7070".parse().unwrap(), "v6", 3000);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Operation not permitted"), "{err}");
    let st = m.weft_a.status().unwrap();
    assert!(
        st.pointer("/capture/counters/ipv6_refused")
            .and_then(Value::as_u64)
            .unwrap()
            >= 1,
        "{st}"
    );
    // Loopback inside the pod is its own business.
    let _own = m
        .client
        .spawn(testpod().args(["serve", "--listen", "[::1]:7071", "--mode", "echo"]))
        .unwrap();
    wait_until(WAIT, || succeeds(&m.client, "[::1]:7071".parse().unwrap()))
        .expect("IPv6 loopback inside an enrolled pod");

    // STRICT: node-b's own IPv6 connection to web-0 works before, is dropped after.
    let web6: SocketAddr = "[fd00:b::2]:8086".parse().unwrap();
    let from_node_b = || {
        m.b.output(testpod().args([
            "call",
            &web6.to_string(),
            "--send",
            "x",
            "--timeout-ms",
            "2000",
        ]))
        .unwrap()
        .status
        .success()
    };
    wait_until(WAIT, from_node_b).expect("PERMISSIVE: IPv6 plaintext works");
    apply(
        &m,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: back\nspec:\n  mtls:\n    mode: STRICT\n",
    );
    wait_until(WAIT, || !from_node_b()).expect("STRICT: an IPv6 SYN is dropped");
    drop(node_srv);
}

/// The CA service signs an identity only for the node that runs a pod of it, and only for a
/// node whose token it knows; nodes hold no CA key and still carry mutual TLS between them.
#[test]
fn the_ca_signs_only_identities_of_pods_on_the_asking_node() {
    use weft::identity::ca_client::CaClient;
    use weft::identity::SpiffeId;

    let m = mesh("ca_node_bound", &[]);
    // No node has the CA key; mutual TLS across nodes works with what the CA service signed.
    for w in [&m.weft_a, &m.weft_b] {
        let (_, dump) = w.admin_get("/config_dump").unwrap();
        let dump: Value = serde_json::from_str(&dump).unwrap();
        assert_eq!(dump.pointer("/config/ca_key"), Some(&Value::Null), "{dump}");
        assert!(
            dump.pointer("/config/ca_address")
                .is_some_and(|a| a.is_string()),
            "{dump}"
        );
    }
    call_ok(&m.client, m.svc.addr(80), "over mTLS");

    let ca_dir = weft_tests::mesh_ca(&m.cluster).unwrap();
    let roots = rustls_pki_types_certs(&ca_dir.join("ca.crt"));
    let address = m.cluster.ca_service().unwrap();
    let token_a = m.cluster.node_token("node-a").unwrap();
    let token_b = m.cluster.node_token("node-b").unwrap();
    let forged = m.cluster.logs_dir().join("forged.token");
    std::fs::write(&forged, "node-a.0000000000000000").unwrap();
    let client_id: SpiffeId = CLIENT_ID.parse().unwrap();
    let web_id: SpiffeId = WEB_ID.parse().unwrap();
    let ask = |token: Option<&std::path::Path>, id: &SpiffeId| -> Result<(), String> {
        let key = rcgen::KeyPair::generate().unwrap();
        // From node-a's network, as node-a would.
        weft_tests::netns::in_netns(m.a.netns_name(), || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let token = token.map(|t| t.to_path_buf());
                    let client = CaClient::new(&address, &roots, token).unwrap();
                    client.sign(id, &key, Duration::from_secs(3600)).await
                })
        })
        .unwrap()
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
    };
    assert_eq!(ask(Some(&token_a), &client_id), Ok(()));
    assert_eq!(ask(Some(&token_b), &web_id), Ok(()));
    // node-a runs no pod of back/web: the identity of a pod not scheduled on it is refused.
    let refused = ask(Some(&token_a), &web_id).unwrap_err();
    assert!(
        refused.contains("PermissionDenied") && refused.contains("not scheduled on node node-a")
            || refused.contains("no pod with service account back/web is scheduled on node node-a"),
        "{refused}"
    );
    let refused = ask(Some(&token_b), &client_id).unwrap_err();
    assert!(refused.contains("node-b"), "{refused}");
    // Without a token, or with one the CA does not know: not a node.
    assert!(ask(None, &client_id)
        .unwrap_err()
        .contains("Unauthenticated"));
    assert!(ask(Some(&forged), &client_id)
        .unwrap_err()
        .contains("Unauthenticated"));
    // The refusals are logged by the CA with the node and the reason.
    let log = std::fs::read_dir(m.cluster.logs_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with("-ca-weft-ca.stderr")
        })
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<String>();
    assert!(log.contains("refused"), "{log}");
}

fn rustls_pki_types_certs(
    path: &std::path::Path,
) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap())
        .collect()
}

/// The CA service down for a while: nodes keep serving mutual TLS with the certificates they
/// hold (renewals fail and are retried), and once it is back renewals resume.
#[test]
fn a_ca_outage_delays_renewals_and_never_cuts_traffic() {
    let m = mesh("ca_outage", &["--svid-ttl", "16s"]);
    let serial = |w: &Weft, id: &str| -> Option<String> {
        w.cli(&["certs", "-o", "json"])
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|c| s(c, "/identity") == id)
            .map(|c| s(&c, "/serial").to_string())
    };
    call_ok(&m.client, m.svc.addr(80), "before");
    m.cluster.stop_ca_service().unwrap();
    let down = Instant::now();
    let held = serial(&m.weft_a, CLIENT_ID).expect("a certificate for the client");
    // Past the renewal point (half of 16 s) and short of expiry: every call still goes through.
    let mut calls = 0;
    while down.elapsed() < Duration::from_secs(10) {
        call_ok(&m.client, m.svc.addr(80), &format!("during-{calls}"));
        calls += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(calls >= 10);
    wait_until(Duration::from_secs(10), || {
        m.weft_a.log().contains("getting SVID failed")
    })
    .expect("node-a tried to renew while the CA was down");
    // Operators see it: failed requests counted, the last failure shown.
    let metrics = m.weft_a.metrics().unwrap();
    assert!(
        !metrics.contains("weft_ca_requests_total{result=\"failed\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_svid_earliest_expiry_seconds "),
        "{metrics}"
    );
    let status = m.weft_a.cli(&["status"]).unwrap();
    assert!(
        status.contains("Certs:       CA service https://"),
        "{status}"
    );
    assert!(status.contains("last failure: "), "{status}");
    m.cluster.start_ca_service().unwrap();
    wait_until(Duration::from_secs(15), || {
        serial(&m.weft_a, CLIENT_ID).is_some_and(|s| s != held)
    })
    .expect("renewed once the CA was back");
    call_ok(&m.client, m.svc.addr(80), "after");
}

/// Connections weft opens for a pod leave from the pod's own address, as the pod's own would:
/// passthrough to a server outside the mesh, delivery to a pod of the same node, and the HBONE
/// connection to another node; and the node on the other side delivers to the application with
/// the client pod's address (transparently, from inside the destination pod's namespace).
/// `--source-address node` opens them from the node instead.
#[test]
fn connections_weft_opens_for_a_pod_leave_from_the_pods_address() {
    let m = mesh("pod_address", &[]);
    // Outside the mesh, on node-b; and a mesh pod on node-a, next to the client.
    let plain = m
        .cluster
        .add_pod(&m.b, PodSpec::new("legacy", "plain"))
        .unwrap();
    let local = m
        .cluster
        .add_pod(
            &m.a,
            PodSpec::new("back", "web-local")
                .label("app", "web-local")
                .service_account("web"),
        )
        .unwrap();
    let _servers = [serve(&plain, 8080, "whoami"), serve(&local, 8080, "whoami")];
    let client_ip = m.client.ip().to_string();

    // Passthrough: weft carries it (a flow), the server sees the client pod.
    let resp = call_ok(&m.client, local_addr(&plain, 8080), "out");
    assert_eq!(peer_ip(&resp), client_ip, "{resp}");
    m.weft_a
        .wait_flows(1, WAIT, |f| {
            s(f, "/destination/address") == local_addr(&plain, 8080).to_string()
                && s(f, "/verdict") == "forwarded"
        })
        .expect("weft carried the passthrough connection");

    // Same-node delivery.
    let resp = call_ok(&m.client, local_addr(&local, 8080), "local");
    assert_eq!(peer_ip(&resp), client_ip, "{resp}");
    m.weft_a
        .wait_flows(1, WAIT, |f| {
            s(f, "/destination/address") == local_addr(&local, 8080).to_string()
                && s(f, "/verdict") == "forwarded"
        })
        .expect("weft delivered it");

    // HBONE to node-b: its TCP connection comes from the client pod's address.
    call_ok(&m.client, m.svc.addr(80), "tunnel");
    let hbone_peers = || -> String {
        let mut ss = std::process::Command::new("ss");
        ss.args(["-Htn", "state", "established", "( sport = :15008 )"]);
        String::from_utf8_lossy(&m.b.output(&ss).unwrap().stdout).into_owned()
    };
    let peers = hbone_peers();
    assert!(peers.contains(&format!("{client_ip}:")), "{peers}");
    assert!(!peers.contains(&format!("{}:", m.a.ip())), "{peers}");

    // Delivered on node-b to the application with the client pod's address, not node-b's.
    let _whoami = serve(&m.web, 7070, "whoami");
    let resp = call_ok(&m.client, local_addr(&m.web, 7070), "across");
    assert_eq!(peer_ip(&resp), client_ip, "{resp}");
    m.weft_b
        .wait_flows(1, WAIT, |f| {
            s(f, "/destination/address") == local_addr(&m.web, 7070).to_string()
                && s(f, "/verdict") == "forwarded"
                && s(f, "/source/ip") == client_ip
        })
        .expect("node-b delivered it");

    // From the node, when asked to.
    let mut m = m;
    m.weft_a.stop().unwrap();
    let weft_a = Weft::start_with(&m.cluster, &m.a, &["--source-address", "node"]).unwrap();
    let resp = call_ok(&m.client, local_addr(&plain, 8080), "out");
    assert_eq!(peer_ip(&resp), m.a.ip().to_string(), "{resp}");
    drop(weft_a);
}

fn local_addr(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ip().into(), port)
}
