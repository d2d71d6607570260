//! The clusters the benchmark measures in: the single-node and cross-node layouts
//! ([`Topology`]), building one with the weft-tests harness ([`Bench::new`]), haproxy and nginx
//! on the node, where each path's client connects, and checking that a path answers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde_json::Value;
use weft_tests::{
    labels, netns, testpod_bin, wait_for_tcp, Cluster, InNetns, Node, Pod, PodSpec, Proc,
    ServiceSpec, Weft,
};

use super::machine::online_cpus;
use super::{http, Args, PathKind};

const ECHO_PORT: u16 = 8080;
const DISCARD_PORT: u16 = 8081;
const SVC_ECHO_PORT: u16 = 80;
const SVC_DISCARD_PORT: u16 = 81;
const HAPROXY_PORTS: (u16, u16) = (18080, 18081);
const NGINX_PORTS: (u16, u16) = (18180, 18181);
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// Every port a server or proxy of the bench listens on: the TCP servers and the HTTP backend
/// (8080–8091), haproxy and nginx, TCP and HTTP (18080–18191). Kept out of the wide ephemeral
/// port range below: a proxy started after tens of thousands of connections would find its
/// port taken by one of them.
const LISTEN_PORTS: &str = "8080-8091,18080-18191";
/// Server threads per listener (no thread creation per connection on the server side).
const SERVER_WORKERS: &str = "64";

/// A cluster layout measured in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub(super) enum Topology {
    /// One node: every client, the server and the proxies on it.
    SingleNode,
    /// Two nodes: clients on node-1, the server on node-2, weft on both (HBONE between them).
    CrossNode,
}

impl Topology {
    pub(super) fn name(self) -> &'static str {
        match self {
            Topology::SingleNode => "single-node",
            Topology::CrossNode => "cross-node",
        }
    }
}

/// One topology's cluster and what runs in it.
pub(super) struct Bench {
    pub(super) topo: Topology,
    pub(super) cluster: Cluster,
    /// The client node first; the server's node last (the same node in single-node).
    pub(super) nodes: Vec<Node>,
    pub(super) server: Pod,
    /// The client pod of the direct and proxy paths (not enrolled).
    pub(super) plain: Pod,
    /// The client pod of the weft path (enrolled).
    pub(super) mesh: Pod,
    pub(super) svc_ip: std::net::Ipv4Addr,
    /// The clusterIP of the weft-resilient path's Service.
    pub(super) resilient_ip: std::net::Ipv4Addr,
    /// Servers and proxies started for the run, killed with the bench.
    pub(super) procs: Vec<Proc>,
    /// The HTTP backend's nginx master, once started.
    pub(super) backend_pid: Option<u32>,
    pub(super) args: Args,
}

/// The weft-resilient path's routing: a route timeout, retries with a per-try timeout,
/// outlier detection and circuit breakers far above what the cases reach.
const RESILIENCE: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bench-resilient
  namespace: bench-srv
spec:
  hosts:
  - bench-resilient
  http:
  - timeout: 30s
    retries:
      attempts: 3
      perTryTimeout: 10s
      retryOn: 5xx,connect-failure,reset,refused-stream
    route:
    - destination:
        host: bench-resilient
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: bench-resilient
  namespace: bench-srv
spec:
  host: bench-resilient
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 100000}
      http: {http1MaxPendingRequests: 100000, http2MaxRequests: 100000, maxRetries: 1000}
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 10s
      baseEjectionTime: 30s
"#;

impl Bench {
    pub(super) fn new(topo: Topology, args: Args) -> Result<Bench> {
        let (cluster, nodes) = match topo {
            Topology::SingleNode => {
                let c = Cluster::new("bench")?;
                let n = c.add_node("node-a")?;
                (c, vec![n])
            }
            Topology::CrossNode => {
                let c = Cluster::new("bench-cross")?;
                let nodes = vec![c.add_node("node-1")?, c.add_node("node-2")?];
                (c, nodes)
            }
        };
        let (client_node, server_node) = (&nodes[0], &nodes[nodes.len() - 1]);
        let server = cluster.add_pod(
            server_node,
            PodSpec::new("bench-srv", "server")
                .label("app", "bench-srv")
                .port("tcp-echo", ECHO_PORT)
                .port("tcp-discard", DISCARD_PORT)
                .port("http", http::BACKEND_PORTS.0)
                .port("http2", http::BACKEND_PORTS.1),
        )?;
        let svc = cluster.add_service(
            ServiceSpec::new("bench-srv", "bench")
                .selector("app", "bench-srv")
                .port("tcp-echo", SVC_ECHO_PORT, ECHO_PORT, None)
                .port("tcp-discard", SVC_DISCARD_PORT, DISCARD_PORT, None)
                // weft serves these per request (declared by name: `http` is HTTP/1.1 upstream,
                // `http2` HTTP/2); the backend starts with the HTTP cases.
                .port("http", http::BACKEND_PORTS.0, http::BACKEND_PORTS.0, None)
                .port("http2", http::BACKEND_PORTS.1, http::BACKEND_PORTS.1, None),
        )?;
        // The same pods behind a Service with every resilience feature configured, none of
        // them triggered by the cases: what it costs per request.
        let resilient = cluster.add_service(
            ServiceSpec::new("bench-srv", "bench-resilient")
                .selector("app", "bench-srv")
                .port("http", http::BACKEND_PORTS.0, http::BACKEND_PORTS.0, None)
                .port("http2", http::BACKEND_PORTS.1, http::BACKEND_PORTS.1, None),
        )?;
        cluster.apply_yaml(RESILIENCE)?;
        let mesh = cluster.add_pod(client_node, PodSpec::new("bench-mesh", "client"))?;
        let plain = cluster.add_pod(client_node, PodSpec::new("bench-plain", "client"))?;
        let enrolled = labels(&[("weft.dev/mesh", "enabled")]);
        cluster.set_namespace_labels("bench-mesh", enrolled.clone())?;
        if topo == Topology::CrossNode {
            // A mesh pod on another node: weft carries the connection over HBONE.
            cluster.set_namespace_labels("bench-srv", enrolled)?;
        }
        cluster.sync_registry_to(&cluster.default_registry_path())?;
        // Tens of thousands of short connections per case: let every side reuse TIME_WAIT ports
        // (these namespaces only; the same for every path).
        let namespaces = nodes.iter().map(|n| n.netns_name()).chain([
            mesh.netns_name(),
            plain.netns_name(),
            server.netns_name(),
        ]);
        for ns in namespaces {
            netns::sysctls(
                ns,
                &[
                    ("net.ipv4.ip_local_port_range", "1024 65535"),
                    ("net.ipv4.tcp_tw_reuse", "1"),
                    ("net.ipv4.ip_local_reserved_ports", LISTEN_PORTS),
                ],
            )?;
        }
        let mut procs = Vec::new();
        for (port, mode) in [(ECHO_PORT, "echo"), (DISCARD_PORT, "discard")] {
            let listen = format!("0.0.0.0:{port}");
            procs.push(server.spawn(Command::new(testpod_bin()).args([
                "serve",
                "--listen",
                &listen,
                "--mode",
                mode,
                "--workers",
                SERVER_WORKERS,
            ]))?);
            wait_for_tcp(&plain, server.addr(port), Duration::from_secs(10))?;
        }
        Ok(Bench {
            topo,
            svc_ip: svc.cluster_ip,
            resilient_ip: resilient.cluster_ip,
            cluster,
            nodes,
            server,
            plain,
            mesh,
            procs,
            backend_pid: None,
            args,
        })
    }

    /// The client pod and (echo, discard) addresses of a path.
    pub(super) fn target(&self, path: PathKind) -> (&Pod, SocketAddr, SocketAddr) {
        let ip = self.nodes[0].ip();
        let node = |(e, d): (u16, u16)| (SocketAddr::from((ip, e)), SocketAddr::from((ip, d)));
        let (pod, (echo, discard)) = match path {
            PathKind::Direct => (
                &self.plain,
                (self.server.addr(ECHO_PORT), self.server.addr(DISCARD_PORT)),
            ),
            PathKind::Weft | PathKind::WeftResilient => (
                &self.mesh,
                (
                    SocketAddr::from((self.svc_ip, SVC_ECHO_PORT)),
                    SocketAddr::from((self.svc_ip, SVC_DISCARD_PORT)),
                ),
            ),
            PathKind::Haproxy => (&self.plain, node(HAPROXY_PORTS)),
            PathKind::Nginx => (&self.plain, node(NGINX_PORTS)),
        };
        (pod, echo, discard)
    }

    /// A path works: one echo through it.
    pub(super) fn check(&self, path: PathKind) -> Result<()> {
        let (pod, echo, discard) = self.target(path);
        let deadline = Instant::now() + Duration::from_secs(15);
        for addr in [echo, discard] {
            loop {
                let out = pod.output_timeout(
                    Command::new(testpod_bin()).args([
                        "call",
                        &addr.to_string(),
                        "--send",
                        "bench-check",
                        "--timeout-ms",
                        "2000",
                    ]),
                    Duration::from_secs(10),
                )?;
                let got = String::from_utf8_lossy(&out.stdout);
                let ok = out.status.success()
                    && (got == "bench-check" || (addr == discard && got.trim() == "bytes=11"));
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{addr} from {}/{} does not answer: {} {}",
                        pod.namespace(),
                        pod.name(),
                        got.trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// The checks went through the tunnel: node-1 recorded a flow to the server with mTLS. The
    /// pooled TLS connection they opened stays for the measured runs (60 s idle timeout; every
    /// case warms up again first).
    pub(super) fn check_hbone(&self, client: &Weft) -> Result<()> {
        let server = self.server.ip().to_string();
        client
            .wait_flows(1, Duration::from_secs(10), |f| {
                f.pointer("/mtls").and_then(Value::as_bool) == Some(true)
                    && f.pointer("/destination/address")
                        .and_then(Value::as_str)
                        .is_some_and(|a| a.starts_with(&format!("{server}:")))
            })
            .context("no mTLS flow to the server on node-1: the weft path is not HBONE")?;
        Ok(())
    }

    /// Where the generated proxy configs and the proxies' own logs go.
    pub(super) fn proxy_dir(&self) -> Result<PathBuf> {
        let dir = self.cluster.logs_dir().join("proxies");
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Waits until a proxy on the client node accepts on its (echo, discard) ports.
    fn wait_for_proxy(&self, (echo, discard): (u16, u16)) -> Result<()> {
        let node = self.nodes[0].ip();
        for port in [echo, discard] {
            wait_for_tcp(&self.plain, (node, port), Duration::from_secs(10))?;
        }
        Ok(())
    }

    pub(super) fn start_haproxy(&mut self) -> Result<()> {
        let dir = self.proxy_dir()?;
        let cfg = dir.join("haproxy.cfg");
        let node = self.nodes[0].ip();
        let srv = self.server.ip();
        let text = format!(
            "# generated by cargo xtask bench: plain L4 proxy, defaults otherwise\n\
             global\n    maxconn 4000\n\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n\
             listen echo\n    bind {node}:{}\n    server pod {srv}:{ECHO_PORT}\n\n\
             listen discard\n    bind {node}:{}\n    server pod {srv}:{DISCARD_PORT}\n",
            HAPROXY_PORTS.0, HAPROXY_PORTS.1
        );
        std::fs::write(&cfg, text)?;
        let cfg = cfg.to_string_lossy().into_owned();
        let ok = self.nodes[0].output(Command::new("haproxy").args(["-c", "-f", &cfg]))?;
        if !ok.status.success() {
            bail!(
                "haproxy -c: {}{}",
                String::from_utf8_lossy(&ok.stdout),
                String::from_utf8_lossy(&ok.stderr)
            );
        }
        let p = self.nodes[0].spawn(Command::new("haproxy").args(["-db", "-f", &cfg]))?;
        self.procs.push(p);
        self.wait_for_proxy(HAPROXY_PORTS)
    }

    pub(super) fn start_nginx(&mut self) -> Result<()> {
        if !Path::new(NGINX_STREAM_MODULE).exists() {
            bail!("{NGINX_STREAM_MODULE} is missing (apt-get install libnginx-mod-stream)");
        }
        let dir = self.proxy_dir()?;
        let cfg = dir.join("nginx.conf");
        let d = dir.display();
        let node = self.nodes[0].ip();
        let srv = self.server.ip();
        let cores = online_cpus();
        let text = format!(
            "# generated by cargo xtask bench: plain L4 proxy, defaults otherwise\n\
             load_module {NGINX_STREAM_MODULE};\n\
             worker_processes {cores};\n\
             worker_rlimit_nofile 10000;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             stream {{\n    \
                 # pass a client's half-close on (off by default; the discard server needs it)\n    \
                 proxy_half_close on;\n    \
                 server {{ listen {node}:{}; proxy_pass {srv}:{ECHO_PORT}; }}\n    \
                 server {{ listen {node}:{}; proxy_pass {srv}:{DISCARD_PORT}; }}\n\
             }}\n",
            NGINX_PORTS.0, NGINX_PORTS.1
        );
        std::fs::write(&cfg, text)?;
        let (cfg, prefix, err) = (
            cfg.to_string_lossy().into_owned(),
            format!("{d}/"),
            format!("{d}/nginx-error.log"),
        );
        let args = ["-p", &prefix, "-e", &err, "-c", &cfg];
        let ok = self.nodes[0].output(Command::new("nginx").args(args).arg("-t"))?;
        if !ok.status.success() {
            bail!("nginx -t: {}", String::from_utf8_lossy(&ok.stderr));
        }
        let p =
            self.nodes[0].spawn(Command::new("nginx").args(args).args(["-g", "daemon off;"]))?;
        self.procs.push(p);
        self.wait_for_proxy(NGINX_PORTS)
    }
}
