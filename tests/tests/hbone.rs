//! End-to-end: the HBONE tunnel under abuse and failure, on two simulated nodes with real netns,
//! cgroups, eBPF, TLS and sockets — HTTP/2 rapid reset against a node's `:15008`, and a peer
//! node whose link goes dead under a pooled connection.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::traffic::{self, call_ok, serve};
use weft_tests::*;

const ENROLL: (&str, &str) = ("weft.dev/mesh", "enabled");
const CLIENT_ID: &str = "spiffe://cluster.local/ns/front/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/back/sa/web";

/// node-a: `front/client` (sa client); node-b: `back/web-0` (sa web, echo on 8080); both
/// namespaces enrolled, weft on both nodes with `weft_args`.
struct Pair {
    cluster: Cluster,
    a: Node,
    b: Node,
    client: Pod,
    web: Pod,
    weft_a: Weft,
    weft_b: Weft,
    _servers: Vec<Proc>,
}

fn pair(name: &str, weft_args: &[&str]) -> Pair {
    let cluster = Cluster::new(name).unwrap();
    let a = cluster.add_node("node-a").unwrap();
    let b = cluster.add_node("node-b").unwrap();
    let client = cluster
        .add_pod(
            &a,
            PodSpec::new("front", "client").service_account("client"),
        )
        .unwrap();
    let web = cluster
        .add_pod(
            &b,
            PodSpec::new("back", "web-0")
                .label("app", "web")
                .service_account("web")
                .port("http", 8080),
        )
        .unwrap();
    for ns in ["front", "back"] {
        cluster.set_namespace_labels(ns, labels(&[ENROLL])).unwrap();
    }
    let servers = vec![serve(&web, 8080, "echo")];
    let weft_a = Weft::start_with(&cluster, &a, weft_args).unwrap();
    let weft_b = Weft::start_with(&cluster, &b, weft_args).unwrap();
    Pair {
        cluster,
        a,
        b,
        client,
        web,
        weft_a,
        weft_b,
        _servers: servers,
    }
}

/// `weft status -o json`'s `tunnel.<side>.<field>`.
fn tunnel_stat(weft: &Weft, side: &str, field: &str) -> u64 {
    let status: Value = weft.status().unwrap();
    status["tunnel"][side][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no tunnel.{side}.{field} in {status}"))
}

/// A node's identity manager holding `id`'s certificates from the mesh CA: what a node presents
/// on HBONE for that workload.
fn hbone_credentials(cluster: &Cluster, id: &str) -> Arc<weft::identity::IdentityManager> {
    use weft::identity::{AuthorityConfig, IdentityConfig, IdentityManager};
    let ca = mesh_ca(cluster).unwrap();
    let mgr = IdentityManager::new(IdentityConfig {
        ca_cert: ca.join("ca.crt"),
        authority: AuthorityConfig::Key(ca.join("ca.key")),
        trust_bundle: vec![],
        trust_domain: "cluster.local".into(),
        svid_ttl: Duration::from_secs(3600),
    })
    .unwrap();
    mgr.set_local_identities(std::collections::HashSet::from([id.parse().unwrap()]));
    Arc::new(mgr)
}

/// An HTTP/2 frame: 9-byte header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `HEADERS` (END_HEADERS, not END_STREAM) for `CONNECT target`, HPACK-encoded as literals
/// without indexing (`:method` is static entry 2, `:authority` entry 1).
fn connect_headers(stream: u32, target: SocketAddr) -> Vec<u8> {
    let mut block = Vec::new();
    for (index, value) in [(2u8, "CONNECT".to_string()), (1, target.to_string())] {
        block.push(index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    frame(0x1, 0x4, stream, &block)
}

/// What the attacking connection saw.
#[derive(Debug)]
struct Flood {
    /// HEADERS + RST_STREAM pairs written before the node stopped it.
    pairs: u32,
    /// The `GOAWAY` error code, if one was read before the connection closed.
    goaway: Option<u32>,
    /// How the connection ended for the writer.
    ended: String,
}

/// One authenticated HBONE connection to `node` (as the client workload, asking for the web
/// workload), writing `HEADERS` then `RST_STREAM(CANCEL)` for `pairs` streams to `target`:
/// eight pairs per write, or with `reset_after`, each reset that long after its HEADERS (so
/// the node is working on the stream when it comes). Runs in the calling thread's network
/// namespace.
fn rapid_reset(
    credentials: Arc<weft::identity::IdentityManager>,
    node: SocketAddr,
    target: SocketAddr,
    pairs: u32,
    reset_after: Option<Duration>,
) -> Flood {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client: weft::identity::SpiffeId = CLIENT_ID.parse().unwrap();
        let server: weft::identity::SpiffeId = WEB_ID.parse().unwrap();
        credentials.ready(&client).await.unwrap();
        let config = credentials.client_config(&client, &server).unwrap();
        let tcp = tokio::net::TcpStream::connect(node).await.unwrap();
        let name =
            rustls::pki_types::ServerName::try_from(weft::identity::sni_for(&server)).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .expect("an authenticated peer gets through TLS");
        let (mut rd, mut wr) = tokio::io::split(tls);
        // Reads what the node sends, for its GOAWAY.
        let goaway = tokio::spawn(async move {
            loop {
                let mut head = [0u8; 9];
                if rd.read_exact(&mut head).await.is_err() {
                    return None;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                if rd.read_exact(&mut payload).await.is_err() {
                    return None;
                }
                if head[3] == 0x7 && len >= 8 {
                    return Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]));
                }
            }
        });
        let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        start.extend(frame(0x4, 0, 0, &[]));
        wr.write_all(&start).await.unwrap();
        let mut sent = 0;
        let mut ended = "every pair written".to_string();
        let per_write = if reset_after.is_some() { 1 } else { 8 };
        'flood: for batch in 0..pairs.div_ceil(per_write) {
            let mut bytes = Vec::new();
            for i in 0..per_write {
                let n = batch * per_write + i;
                if n >= pairs {
                    break;
                }
                let stream = 2 * n + 1;
                bytes.extend(connect_headers(stream, target));
                if let Some(after) = reset_after {
                    let headers = std::mem::take(&mut bytes);
                    if wr.write_all(&headers).await.is_err() || wr.flush().await.is_err() {
                        ended = "the node closed the connection".into();
                        break 'flood;
                    }
                    tokio::time::sleep(after).await;
                }
                bytes.extend(frame(0x3, 0, stream, &8u32.to_be_bytes()));
            }
            let write = async {
                wr.write_all(&bytes).await?;
                wr.flush().await
            };
            match tokio::time::timeout(Duration::from_secs(5), write).await {
                Ok(Ok(())) => sent = (batch * per_write + per_write).min(pairs),
                Ok(Err(e)) => {
                    ended = format!("write failed: {e}");
                    break 'flood;
                }
                Err(_) => {
                    ended = "the node stopped reading".into();
                    break 'flood;
                }
            }
            if goaway.is_finished() {
                ended = "the node closed the connection".into();
                break;
            }
            // Paced a little, like a client on a real link: resets that outpace weft's accept
            // loop are h2's to count (it closes the connection past 20 unaccepted), the others
            // weft's premature-reset rule's.
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let goaway = tokio::time::timeout(Duration::from_secs(5), goaway)
            .await
            .ok()
            .and_then(|r| r.ok())
            .flatten();
        Flood {
            pairs: sent,
            goaway,
            ended,
        }
    })
}

/// HTTP/2 rapid reset (CVE-2023-44487) on one authenticated HBONE connection: 10 000 CONNECTs,
/// each reset right after its HEADERS. weft closes the connection (GOAWAY ENHANCE_YOUR_CALM)
/// long before the end, the pod sees a bounded number of connections, and another node's
/// tunnels are served throughout. Then the same with each reset sent once weft is connecting
/// to a pod that does not answer (its accept queue full): every such connect is dropped at the
/// reset, and Envoy's rule closes the connection at the 250th premature reset.
#[test]
fn rapid_reset_is_cut_short_and_other_tunnels_are_served() {
    let p = pair("hbone_rapid_reset", &[]);
    // A port of the pod whose accept queue holds one connection and is never served: connects
    // past the first hang (their SYNs are dropped), as to a black-holed address.
    let black_hole = weft_tests::netns::in_netns(p.web.netns_name(), || {
        let l = TcpListener::bind((p.web.ip(), 7001)).unwrap();
        // SAFETY: `listen` again on a listening socket only changes its backlog.
        assert_eq!(
            unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 0) },
            0
        );
        l
    })
    .unwrap();
    // The CONNECT target: a port of the pod that counts the connections weft opens to it.
    let listener = weft_tests::netns::in_netns(p.web.netns_name(), || {
        TcpListener::bind((p.web.ip(), 7000)).unwrap()
    })
    .unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in listener.incoming().flatten() {
                accepted.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
    }
    // Another node's traffic, over its own HBONE connection, all along.
    call_ok(&p.client, p.web.addr(8080), "before");
    let flooding = Arc::new(AtomicBool::new(true));
    let background = {
        let (client, to, flooding) = (p.client.clone(), p.web.addr(8080), flooding.clone());
        std::thread::spawn(move || {
            let mut calls = 0;
            while flooding.load(Ordering::SeqCst) {
                call_ok(&client, to, "during");
                calls += 1;
            }
            calls
        })
    };

    let credentials = hbone_credentials(&p.cluster, CLIENT_ID);
    let node: SocketAddr = (p.b.ip(), 15008).into();
    let target = SocketAddr::from((p.web.ip(), 7000));
    let started = Instant::now();
    let flood = weft_tests::netns::in_netns(p.a.netns_name(), || {
        rapid_reset(credentials.clone(), node, target, 10_000, None)
    })
    .unwrap();
    let took = started.elapsed();
    flooding.store(false, Ordering::SeqCst);
    let calls = background
        .join()
        .expect("every call during the flood succeeded");
    eprintln!("{flood:?} in {took:?}; {calls} calls served meanwhile");

    assert!(
        flood.pairs < 2_000,
        "weft let {} resets through on one connection ({})",
        flood.pairs,
        flood.ended
    );
    if let Some(code) = flood.goaway {
        assert_eq!(code, 0xb, "GOAWAY ENHANCE_YOUR_CALM");
    }
    let reset_floods = tunnel_stat(&p.weft_b, "inbound", "reset_floods");
    let premature = tunnel_stat(&p.weft_b, "inbound", "premature_resets");
    let cancelled = tunnel_stat(&p.weft_b, "inbound", "streams_cancelled");
    eprintln!(
        "node-b: {reset_floods} connections closed, {premature} premature resets, {cancelled} streams cancelled; the pod accepted {} connections",
        accepted.load(Ordering::SeqCst)
    );
    assert_eq!(reset_floods, 1, "{}", p.weft_b.log());
    // Without cancellation every reset stream would have become a connection to the pod.
    assert!(
        accepted.load(Ordering::SeqCst) < 1_000,
        "{} connections reached the pod",
        accepted.load(Ordering::SeqCst)
    );
    wait_until(Duration::from_secs(5), || {
        tunnel_stat(&p.weft_b, "inbound", "streams_active") == 0
    })
    .expect("no stream of the flood left running");
    // `weft status` shows it.
    let status = p.weft_b.cli(&["status"]).unwrap();
    assert!(
        status.contains("1 connections closed for reset floods"),
        "{status}"
    );
    assert!(call_ok(&p.client, p.web.addr(8080), "after").contains("after"));

    // Resets that come while weft is connecting: each connect is dropped at once.
    let hanging = SocketAddr::from((p.web.ip(), 7001));
    let flood = weft_tests::netns::in_netns(p.a.netns_name(), || {
        rapid_reset(
            credentials,
            node,
            hanging,
            10_000,
            Some(Duration::from_millis(3)),
        )
    })
    .unwrap();
    eprintln!("{flood:?}");
    let premature = tunnel_stat(&p.weft_b, "inbound", "premature_resets");
    let cancelled = tunnel_stat(&p.weft_b, "inbound", "streams_cancelled");
    eprintln!("node-b: {premature} premature resets, {cancelled} streams cancelled");
    assert!(
        (250..300).contains(&flood.pairs),
        "closed after {} streams (Envoy's rule: the 250th premature reset)",
        flood.pairs
    );
    assert_eq!(tunnel_stat(&p.weft_b, "inbound", "reset_floods"), 2);
    assert!(premature >= 250, "{premature}");
    assert!(cancelled >= premature, "{cancelled}");
    // Not one of those connects outlives its stream.
    assert_eq!(tunnel_stat(&p.weft_b, "inbound", "streams_active"), 0);
    drop(black_hole);
    assert!(call_ok(&p.client, p.web.addr(8080), "still").contains("still"));
}

/// A peer node that vanishes (its link cut: no FIN, no RST) under a pooled HBONE connection:
/// the keepalive PING goes unanswered and the connection leaves the pool within interval +
/// timeout; once the link is back, the next connection dials anew and succeeds.
#[test]
fn dead_peer_connection_is_detected_by_ping_and_replaced() {
    let p = pair(
        "hbone_dead_peer",
        &[
            "--hbone-keepalive-interval",
            "500ms",
            "--hbone-keepalive-timeout",
            "1s",
        ],
    );
    assert!(call_ok(&p.client, p.web.addr(8080), "pooled").contains("pooled"));
    assert_eq!(tunnel_stat(&p.weft_a, "outbound", "connections"), 1);
    // Answered pings keep it.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(tunnel_stat(&p.weft_a, "outbound", "connections"), 1);
    assert_eq!(
        tunnel_stat(&p.weft_a, "outbound", "keepalive_timeouts_total"),
        0
    );

    p.cluster.set_node_link(&p.b, false).unwrap();
    let cut = Instant::now();
    wait_until(Duration::from_secs(10), || {
        tunnel_stat(&p.weft_a, "outbound", "connections") == 0
    })
    .unwrap_or_else(|_| panic!("the dead connection stayed pooled:\n{}", p.weft_a.log()));
    let noticed = cut.elapsed();
    eprintln!("dead peer noticed after {noticed:?} (interval 500 ms + timeout 1 s)");
    assert!(noticed < Duration::from_secs(4), "{noticed:?}");
    assert_eq!(
        tunnel_stat(&p.weft_a, "outbound", "keepalive_timeouts_total"),
        1
    );
    assert!(
        p.weft_a.log().contains("HBONE peer not answering"),
        "{}",
        p.weft_a.log()
    );

    p.cluster.set_node_link(&p.b, true).unwrap();
    let mut out = std::io::stderr();
    wait_until(Duration::from_secs(15), || {
        let ok = traffic::call(
            &p.client,
            p.web.addr(8080),
            "again",
            Duration::from_millis(3000),
        )
        .status
        .success();
        let _ = writeln!(out, "call after the link came back: {ok}");
        ok
    })
    .expect("the next connection dials anew and succeeds");
    assert_eq!(
        tunnel_stat(&p.weft_a, "outbound", "connections_opened_total"),
        2
    );
}
