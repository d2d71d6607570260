//! `weft node` configuration: command-line flags, optionally layered over a YAML file
//! (`--config`). A flag given on the command line wins over the same key in the file; keys in
//! the file are the flag names without the leading dashes. Every default of weft lives here.
//!
//! May import: nothing else of weft.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};

/// Default outbound capture port.
pub const DEFAULT_PROXY_PORT: u16 = 15001;
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/weft/admin.sock";
pub const DEFAULT_HANDOVER_SOCKET: &str = "/run/weft/handover.sock";
/// Envoy's `--drain-time-s` and Kubernetes' default grace period are 30 s too.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:15020";
/// How long an enrolled pod may stay uncaptured (cgroup not found) before it is reported.
pub const DEFAULT_ENROLL_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_HBONE_PORT: u16 = 15008;
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Default pin directory (a bpffs is mounted on its parent if needed).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/weft";
/// Default number of workload flows kept in memory per node: Hubble's ring size. A kept flow of
/// an HTTP request takes about 0.4 KB (the record, 320 bytes, and one block of its request's
/// authority, path, id, user agent and forwarded-for), so the ring holds about 1.6 MB once
/// full, which a node at 1 000 requests/s fills in four seconds; `weft flows --follow` and the access log see every flow whatever the size.
pub const DEFAULT_FLOW_CAPACITY: usize = 4096;
/// Default upstream connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5000;
/// Default limit of a request's head (request line and headers), as Envoy's.
pub const DEFAULT_MAX_REQUEST_HEADERS_KB: usize = 60;
pub const DEFAULT_RETRY_BODY_KB: usize = 64;
/// Default wait for a client's first bytes on a port that declares no protocol, before the
/// connection is taken as TCP (server-first protocols send nothing first).
pub const DEFAULT_PROTOCOL_DETECTION_TIMEOUT_MS: u64 = 100;
/// Istio's cluster id when none is given (`source_cluster`, `destination_cluster`).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// Percent of new traces sampled, as Istio's default.
pub const DEFAULT_TRACE_SAMPLING: f64 = 1.0;
/// Descriptors a relayed connection holds at most: its two sockets (all an idle one holds),
/// and a splice pipe of two ends for each direction while bytes are in flight (2 + 2 × 2).
/// The default limit is sized for every relay moving bytes both ways at once, so it never
/// runs the process out of descriptors; mostly idle relays leave room for a higher
/// `--max-connections`.
pub const FDS_PER_CONNECTION: u64 = 6;
/// Default idle timeout of a relayed connection: Envoy's `tcp_proxy` default, and Istio's
/// DestinationRule `connectionPool.tcp.idleTimeout` default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default ceiling of connections open at once on the admin API (TCP and Unix socket).
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// Default ceiling of connections open at once on the metrics listener.
pub const DEFAULT_METRICS_MAX_CONNECTIONS: usize = 256;
/// Default ceiling of connections open at once on the metrics listener from one address.
pub const DEFAULT_METRICS_MAX_CONNECTIONS_PER_IP: usize = 8;
/// Default time a client of the admin or metrics listener has to send a request's head.
pub const DEFAULT_ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time an admin or metrics connection may stay open without a request.
pub const DEFAULT_ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// HBONE client pool: a `PING` on every connection this often (ztunnel's value).
pub const DEFAULT_HBONE_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// HBONE client pool: a connection whose `PING` is unanswered this long is closed (ztunnel's).
pub const DEFAULT_HBONE_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// HBONE server: TLS handshakes in progress on the node.
pub const DEFAULT_HBONE_MAX_HANDSHAKES: usize = 4096;
/// HBONE server: TLS handshakes in progress from one source address.
pub const DEFAULT_HBONE_MAX_HANDSHAKES_PER_PEER: usize = 512;
/// HBONE server: connections open from one source address.
pub const DEFAULT_HBONE_MAX_CONNECTIONS_PER_PEER: usize = 4096;
/// `--registry kube`: the Kubernetes API.
pub const REGISTRY_KUBE: &str = "kube";
/// The cluster's DNS domain: Services are `name.namespace.svc.<domain>`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Flags of `weft node`. Every one is optional on the command line so that a config file can
/// supply it; [`NodeArgs::resolve`] applies defaults and checks what is required.
#[derive(Args, Debug, Clone, Default)]
pub struct NodeArgs {
    /// YAML file with any of the settings below (keys are the flag names, e.g. `node-name:`);
    /// flags win over the file. Default: none.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's name (pods are hosted here when `spec.nodeName` matches). Required.
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node_name: Option<String>,
    /// Where the cluster is read from: `kube` (the Kubernetes API: in-cluster, or
    /// --kubeconfig), or Kubernetes-shaped YAML: a file or a directory of *.yaml files,
    /// re-read on change. Required.
    #[arg(long, value_name = "kube|PATH")]
    pub registry: Option<PathBuf>,
    /// With `--registry kube`: a kubeconfig file (default: the pod's service account, else
    /// the default kubeconfig).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// With `--registry kube`: the kubeconfig context (default: its current context).
    #[arg(long, value_name = "NAME")]
    pub kube_context: Option<String>,
    /// Outbound capture listener and redirect target, `IP[:PORT]` or `:PORT`. Default: the
    /// node's InternalIP from the registry, port 15001.
    #[arg(long, value_name = "IP:PORT")]
    pub proxy_address: Option<String>,
    /// cgroup v2 directory the eBPF programs attach to; kubelet pod cgroups live below it
    /// (default /sys/fs/cgroup).
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory where programs, links and maps are pinned (default /sys/fs/bpf/weft).
    #[arg(long, value_name = "PATH")]
    pub bpffs: Option<PathBuf>,
    /// Admin API Unix socket (default /run/weft/admin.sock).
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Admin API TCP address (default 127.0.0.1:15000).
    #[arg(long, value_name = "IP:PORT")]
    pub admin_address: Option<SocketAddr>,
    /// Unix socket through which a `weft node` starting on this node takes the listening
    /// sockets over from the one running, for a restart or upgrade without a refused
    /// connection (default /run/weft/handover.sock).
    #[arg(long, value_name = "PATH")]
    pub handover_socket: Option<PathBuf>,
    /// How long a stopping node (SIGTERM, or listeners handed over) lets open connections and
    /// requests finish before it closes them (default 30s).
    #[arg(long, value_name = "DURATION")]
    pub drain_timeout: Option<String>,
    /// Prometheus `/metrics` address (default 0.0.0.0:15020).
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_address: Option<SocketAddr>,
    /// Destination ports never redirected (comma separated). Default: none.
    #[arg(long, value_delimiter = ',', value_name = "PORT,...")]
    pub exclude_ports: Option<Vec<u16>>,
    /// Destination IPv4 CIDRs never redirected (comma separated). Default: none.
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
    pub exclude_cidrs: Option<Vec<ipnet::Ipv4Net>>,
    /// Number of workload flows kept in memory (default 4096; about 0.7 KB each).
    #[arg(long, value_name = "N")]
    pub flow_capacity: Option<usize>,
    /// Upstream connect timeout in milliseconds (default 5000).
    #[arg(long, value_name = "MS")]
    pub connect_timeout_ms: Option<u64>,
    /// Largest HTTP request head accepted, in KiB; larger gets 431 (default 60).
    #[arg(long, value_name = "KB")]
    pub max_request_headers_kb: Option<usize>,
    /// Largest request body kept to send again when a retry policy may retry it, in KiB; a
    /// larger one, or one of unknown length, is not retried (default 64; 0: none).
    #[arg(long, value_name = "KB")]
    pub retry_body_kb: Option<usize>,
    /// How long to wait for a client's first bytes on a port that declares no protocol
    /// before treating it as TCP, in milliseconds; 0 turns detection off (default 100).
    #[arg(long, value_name = "MS")]
    pub protocol_detection_timeout_ms: Option<u64>,
    /// DNS server for ServiceEntry hosts, `IP[:PORT]` (default: the node's resolv.conf).
    #[arg(long, value_name = "IP[:PORT]")]
    pub dns_server: Option<String>,
    /// Data-path worker threads (default: the CPUs this process may run on). Each serves the
    /// connections it accepts from start to end, with upstream connections of its own.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Where connections weft opens for a pod (passthrough, same-node delivery, HBONE to other
    /// nodes) leave from: `pod`, the pod's own network namespace and address, as a sidecar's
    /// would (NetworkPolicy and firewalls see the pod); `node`, the node's address
    /// (default pod).
    #[arg(long, value_name = "pod|node")]
    pub source_address: Option<SourceAddress>,
    /// SPIFFE trust domain of the mesh (default cluster.local).
    #[arg(long, value_name = "DOMAIN")]
    pub trust_domain: Option<String>,
    /// PEM certificate of the mesh root CA: what peers' certificates must chain to (with
    /// --ca-key: the CA, root or intermediate, that signs). Required.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// The certificate service that signs this node's workload certificates,
    /// `https://HOST:PORT`: `weft ca serve`, istiod (`https://istiod.istio-system.svc:15012`) or
    /// istio-csr. It signs only identities of pods scheduled on this node. One of --ca-address
    /// and --ca-key is required.
    #[arg(long, value_name = "URL")]
    pub ca_address: Option<String>,
    /// File holding the bearer token this node authenticates to the CA service with (read at
    /// every request): a bootstrap token, or in Kubernetes a projected ServiceAccount token with
    /// audience `weft-ca`. Default: none (no credential sent).
    #[arg(long, value_name = "FILE")]
    pub ca_token: Option<PathBuf>,
    /// PEM private key of the CA in --ca-cert: the node signs its own workload certificates.
    /// Single-node and development mode only: root on a node holding the key can mint any
    /// identity of the mesh. Use --ca-address in a cluster. Default: none.
    #[arg(long, value_name = "FILE")]
    pub ca_key: Option<PathBuf>,
    /// Extra trusted root certificates (PEM), e.g. the next root during a root rotation.
    /// Default: none.
    #[arg(long, value_name = "FILE")]
    pub trust_bundle: Option<Vec<PathBuf>>,
    /// Lifetime of workload certificates (default 24h; rotated at half-life), e.g. 10s, 1h.
    #[arg(long, value_name = "DURATION")]
    pub svid_ttl: Option<String>,
    /// How long an enrolled pod of this node may go without its cgroup found (so without its
    /// connections captured) before it is reported: warning, `weft status`, metric (default 5s).
    #[arg(long, value_name = "DURATION")]
    pub enroll_timeout: Option<String>,
    /// HBONE (mTLS HTTP/2 CONNECT) port, the same on every node: peers dial it (default
    /// 15008).
    #[arg(long, value_name = "PORT")]
    pub hbone_port: Option<u16>,
    /// Address the HBONE listener binds (default: the node's InternalIP from the registry,
    /// where other nodes dial it; `0.0.0.0` for every address of the node).
    #[arg(long, value_name = "IP")]
    pub hbone_address: Option<IpAddr>,
    /// Namespace whose policies without a selector apply mesh-wide (default istio-system).
    #[arg(long, value_name = "NAMESPACE")]
    pub root_namespace: Option<String>,
    /// The cluster's id, as Istio's metrics label peers of this cluster (`source_cluster`,
    /// `destination_cluster`; default Kubernetes, Istio's).
    #[arg(long, value_name = "ID")]
    pub cluster_id: Option<String>,
    /// Access log: `off`, `stdout`, or a file path (appended to). One line per HTTP request and
    /// per TCP connection, written off the data path (default off).
    #[arg(long, value_name = "off|stdout|PATH")]
    pub access_log: Option<String>,
    /// Access log format: `text` (Envoy's default format, plus the workloads and identities of
    /// both sides) or `json` (default text).
    #[arg(long, value_name = "text|json")]
    pub access_log_format: Option<LogFormat>,
    /// OpenTelemetry collector spans are exported to: `http://HOST:4317` (OTLP/gRPC) or
    /// `http://HOST:4318/v1/traces` (OTLP/HTTP, with --otlp-protocol http-protobuf). Default:
    /// none (tracing off; trace headers still pass through untouched).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport: `grpc` or `http-protobuf` (default grpc).
    #[arg(long, value_name = "grpc|http-protobuf")]
    pub otlp_protocol: Option<OtlpTransport>,
    /// Percent of new traces (requests that come without a sampling decision) sampled, 0 to
    /// 100 (default 1).
    #[arg(long, value_name = "PERCENT")]
    pub trace_sampling: Option<f64>,
    /// Connections the capture listener holds open at once, node-wide; more are reset at
    /// accept and recorded `over_limit`. Default: RLIMIT_NOFILE (raised to its hard limit at
    /// start) / 8. A relayed connection holds 2 descriptors (its sockets) while idle, plus a
    /// splice pipe of 2 for each direction while bytes are in flight: 6 at most, so at the
    /// limit, even with every relay busy both ways, three quarters of the descriptors are in
    /// relays and a quarter is left for HBONE, the admin API and metrics: the limit refuses
    /// before the process runs out. Mostly idle relays hold a third of that, so a higher limit
    /// is safe for them.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Connections one pod may hold open at once through the capture listener (counted by the
    /// pod's cgroup); more are reset and recorded `over_limit`. Default: a quarter of
    /// --max-connections, so no one pod can take the node's whole allowance, and no normal pod
    /// comes near it (a pod's captured connections all go to one proxy address and port, so
    /// the kernel's ephemeral ports, 28 232 by default, bound them at about that anyway).
    #[arg(long, value_name = "N")]
    pub max_connections_per_pod: Option<usize>,
    /// A relayed TCP connection that moves no byte either way for this long is closed cleanly
    /// (FIN both ways; its flow says `closed: idle for …`); a DestinationRule's
    /// `connectionPool.tcp.idleTimeout` wins for its destination. 0 turns it off (default 1h,
    /// Envoy's and Istio's).
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Connections the admin API (TCP and Unix socket together) holds open at once; more are
    /// closed at accept (default 64).
    #[arg(long, value_name = "N")]
    pub admin_max_connections: Option<usize>,
    /// Connections the metrics listener holds open at once; more are closed at accept
    /// (default 256).
    #[arg(long, value_name = "N")]
    pub metrics_max_connections: Option<usize>,
    /// Connections the metrics listener holds open at once from one address (it is reachable
    /// from pods: one cannot lock Prometheus or kubelet probes out); default 8.
    #[arg(long, value_name = "N")]
    pub metrics_max_connections_per_ip: Option<usize>,
    /// Time a client of the admin API or the metrics listener has to send a whole request
    /// head, from its first byte; slower ones are closed (default 10s).
    #[arg(long, value_name = "DURATION")]
    pub admin_header_timeout: Option<String>,
    /// An admin API or metrics connection with no request in flight and no byte moved for
    /// this long is closed (default 60s).
    #[arg(long, value_name = "DURATION")]
    pub admin_idle_timeout: Option<String>,
    /// HBONE connections to other nodes are pinged (HTTP/2 PING) this often; 0 turns it off
    /// (default 10s).
    #[arg(long, value_name = "DURATION")]
    pub hbone_keepalive_interval: Option<String>,
    /// An HBONE connection whose PING is not answered within this is closed, and the next
    /// tunnel to that node dials anew (default 20s).
    #[arg(long, value_name = "DURATION")]
    pub hbone_keepalive_timeout: Option<String>,
    /// TLS handshakes in progress on the HBONE listener; past it new connections are reset at
    /// once. 0: no limit (default 4096).
    #[arg(long, value_name = "N")]
    pub hbone_max_handshakes: Option<usize>,
    /// TLS handshakes in progress on the HBONE listener from one address (a pod or a node);
    /// 0: no limit (default 512).
    #[arg(long, value_name = "N")]
    pub hbone_max_handshakes_per_peer: Option<usize>,
    /// HBONE connections open from one address; 0: no limit (default 4096).
    #[arg(long, value_name = "N")]
    pub hbone_max_connections_per_peer: Option<usize>,
}

/// The same settings as they appear in a `--config` file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    node_name: Option<String>,
    registry: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    kube_context: Option<String>,
    proxy_address: Option<String>,
    cgroup_root: Option<PathBuf>,
    bpffs: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
    admin_address: Option<SocketAddr>,
    handover_socket: Option<PathBuf>,
    drain_timeout: Option<String>,
    metrics_address: Option<SocketAddr>,
    exclude_ports: Option<Vec<u16>>,
    exclude_cidrs: Option<Vec<ipnet::Ipv4Net>>,
    flow_capacity: Option<usize>,
    connect_timeout_ms: Option<u64>,
    max_request_headers_kb: Option<usize>,
    retry_body_kb: Option<usize>,
    protocol_detection_timeout_ms: Option<u64>,
    dns_server: Option<String>,
    workers: Option<usize>,
    source_address: Option<SourceAddress>,
    trust_domain: Option<String>,
    ca_cert: Option<PathBuf>,
    ca_address: Option<String>,
    ca_token: Option<PathBuf>,
    ca_key: Option<PathBuf>,
    trust_bundle: Option<Vec<PathBuf>>,
    svid_ttl: Option<String>,
    enroll_timeout: Option<String>,
    hbone_port: Option<u16>,
    hbone_address: Option<IpAddr>,
    root_namespace: Option<String>,
    cluster_id: Option<String>,
    access_log: Option<String>,
    access_log_format: Option<LogFormat>,
    otlp_endpoint: Option<String>,
    otlp_protocol: Option<OtlpTransport>,
    trace_sampling: Option<f64>,
    max_connections: Option<usize>,
    max_connections_per_pod: Option<usize>,
    idle_timeout: Option<String>,
    admin_max_connections: Option<usize>,
    metrics_max_connections: Option<usize>,
    metrics_max_connections_per_ip: Option<usize>,
    admin_header_timeout: Option<String>,
    admin_idle_timeout: Option<String>,
    hbone_keepalive_interval: Option<String>,
    hbone_keepalive_timeout: Option<String>,
    hbone_max_handshakes: Option<usize>,
    hbone_max_handshakes_per_peer: Option<usize>,
    hbone_max_connections_per_peer: Option<usize>,
}

/// `--dns-server`: `IP` (port 53) or `IP:PORT`.
fn parse_dns_server(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match s.parse::<IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, 53)),
        Err(_) => bail!("--dns-server {s:?}: expected IP or IP:PORT"),
    }
}

/// Where the connections weft opens for a pod leave from (`--source-address`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SourceAddress {
    /// The pod's own network namespace and address.
    Pod,
    /// The node's.
    Node,
}

/// `--access-log-format`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Envoy's default access log format.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `--otlp-protocol`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum OtlpTransport {
    #[default]
    Grpc,
    HttpProtobuf,
}

/// Where the proxy listens for redirected connections: given explicitly, or the node's
/// address from the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyAddress {
    Given(SocketAddr),
    /// Only a port: the IP comes from the Node object.
    FromNode(u16),
}

/// Effective `weft node` configuration (shown by `/config_dump`).
#[derive(Debug, Clone, Serialize)]
pub struct NodeConfig {
    pub node_name: String,
    /// `kube`, or a YAML file or directory.
    pub registry: PathBuf,
    pub kubeconfig: Option<PathBuf>,
    pub kube_context: Option<String>,
    pub proxy_address: ProxyAddress,
    pub cgroup_root: PathBuf,
    pub bpffs: PathBuf,
    pub admin_socket: PathBuf,
    pub admin_address: SocketAddr,
    pub handover_socket: PathBuf,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    pub metrics_address: SocketAddr,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<ipnet::Ipv4Net>,
    pub flow_capacity: usize,
    pub connect_timeout_ms: u64,
    pub max_request_headers_kb: usize,
    pub retry_body_kb: usize,
    pub protocol_detection_timeout_ms: u64,
    pub dns_server: Option<SocketAddr>,
    pub workers: usize,
    pub source_address: SourceAddress,
    pub trust_domain: String,
    pub ca_cert: PathBuf,
    /// `https://…` of the CA service, or `None` with `ca_key`.
    pub ca_address: Option<String>,
    pub ca_token: Option<PathBuf>,
    /// Development mode: the node signs with the CA key itself.
    pub ca_key: Option<PathBuf>,
    pub trust_bundle: Vec<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub svid_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub enroll_timeout: Duration,
    pub hbone_port: u16,
    /// `None`: the node's address from the registry.
    pub hbone_address: Option<IpAddr>,
    pub root_namespace: String,
    pub cluster_id: String,
    /// `off`, `stdout` or a path.
    pub access_log: String,
    pub access_log_format: LogFormat,
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpTransport,
    /// Percent of new traces sampled.
    pub trace_sampling: f64,
    /// `None`: derived from RLIMIT_NOFILE at start ([`NodeConfig::connection_limits`]).
    pub max_connections: Option<usize>,
    /// `None`: a quarter of the node's.
    pub max_connections_per_pod: Option<usize>,
    /// `None`: relays are never closed for idleness.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    pub admin_max_connections: usize,
    pub metrics_max_connections: usize,
    pub metrics_max_connections_per_ip: usize,
    #[serde(with = "humantime_serde")]
    pub admin_header_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub admin_idle_timeout: Duration,
    /// Zero: HBONE connections are not pinged.
    #[serde(with = "humantime_serde")]
    pub hbone_keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub hbone_keepalive_timeout: Duration,
    /// 0: no limit.
    pub hbone_max_handshakes: usize,
    pub hbone_max_handshakes_per_peer: usize,
    pub hbone_max_connections_per_peer: usize,
}

impl NodeConfig {
    /// Whether the registry is the Kubernetes API (`--registry kube`).
    pub fn kube(&self) -> bool {
        self.registry == Path::new(REGISTRY_KUBE)
    }

    /// The capture listener's limits (node-wide, per pod) with `nofile` descriptors allowed:
    /// the flags, else their defaults (see `--max-connections`).
    pub fn connection_limits(&self, nofile: u64) -> (usize, usize) {
        let node = self.max_connections.unwrap_or_else(|| {
            // Three quarters of the descriptors for relays; the rest for everything else.
            usize::try_from(nofile / 4 * 3 / FDS_PER_CONNECTION)
                .unwrap_or(usize::MAX)
                .max(1)
        });
        let pod = self.max_connections_per_pod.unwrap_or((node / 4).max(1));
        (node, pod)
    }
}

/// A duration flag: `DURATION` as humantime reads it (`1h`, `90s`, `500ms`).
fn parse_duration_flag(
    flag: &str,
    value: Option<String>,
    default: Duration,
) -> anyhow::Result<Duration> {
    match value {
        Some(s) => humantime::parse_duration(&s)
            .with_context(|| format!("--{flag} {s:?}: expected a duration like 1h, 30s or 500ms")),
        None => Ok(default),
    }
}

impl NodeArgs {
    /// Merges the config file (if any) under the flags and applies defaults.
    pub fn resolve(self) -> anyhow::Result<NodeConfig> {
        let file = match &self.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let node_name = self.node_name.or(file.node_name).context(
            "--node-name is required (flag, WEFT_NODE_NAME or `node-name:` in --config)",
        )?;
        let registry = self
            .registry
            .or(file.registry)
            .context("--registry is required (flag or `registry:` in --config)")?;
        let proxy_address = match self.proxy_address.or(file.proxy_address) {
            Some(s) => parse_proxy_address(&s)?,
            None => ProxyAddress::FromNode(DEFAULT_PROXY_PORT),
        };
        let flow_capacity = self
            .flow_capacity
            .or(file.flow_capacity)
            .unwrap_or(DEFAULT_FLOW_CAPACITY);
        if flow_capacity == 0 {
            bail!("--flow-capacity must be at least 1");
        }
        let ca_help = "create a mesh CA with `weft ca init --out DIR`, serve it with `weft ca serve`, then pass --ca-cert DIR/ca.crt --ca-address https://HOST:15012 (or --ca-key DIR/ca.key on a single node)";
        let ca_cert = self
            .ca_cert
            .or(file.ca_cert)
            .with_context(|| format!("--ca-cert is required: {ca_help}"))?;
        let ca_address = self.ca_address.or(file.ca_address);
        let ca_token = self.ca_token.or(file.ca_token);
        let ca_key = self.ca_key.or(file.ca_key);
        match (&ca_address, &ca_key) {
            (None, None) => bail!("one of --ca-address and --ca-key is required: {ca_help}"),
            (Some(_), Some(_)) => {
                bail!("--ca-address and --ca-key exclude each other: a node either asks the CA service or signs itself")
            }
            (None, Some(_)) if ca_token.is_some() => {
                bail!("--ca-token is for --ca-address")
            }
            _ => {}
        }
        let svid_ttl = match self.svid_ttl.or(file.svid_ttl) {
            Some(s) => humantime::parse_duration(&s).with_context(|| {
                format!("--svid-ttl {s:?}: expected a duration like 24h, 30m or 10s")
            })?,
            None => DEFAULT_SVID_TTL,
        };
        if svid_ttl < Duration::from_secs(2) {
            bail!("--svid-ttl must be at least 2s");
        }
        let drain_timeout = parse_duration_flag(
            "drain-timeout",
            self.drain_timeout.or(file.drain_timeout),
            DEFAULT_DRAIN_TIMEOUT,
        )?;
        let enroll_timeout = match self.enroll_timeout.or(file.enroll_timeout) {
            Some(s) => humantime::parse_duration(&s).with_context(|| {
                format!("--enroll-timeout {s:?}: expected a duration like 5s or 500ms")
            })?,
            None => DEFAULT_ENROLL_TIMEOUT,
        };
        let max_request_headers_kb = self
            .max_request_headers_kb
            .or(file.max_request_headers_kb)
            .unwrap_or(DEFAULT_MAX_REQUEST_HEADERS_KB);
        if !(1..=8192).contains(&max_request_headers_kb) {
            bail!("--max-request-headers-kb must be between 1 and 8192");
        }
        let retry_body_kb = self
            .retry_body_kb
            .or(file.retry_body_kb)
            .unwrap_or(DEFAULT_RETRY_BODY_KB);
        if retry_body_kb > 16384 {
            bail!("--retry-body-kb must be at most 16384");
        }
        let workers = self.workers.or(file.workers).unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        if !(1..=256).contains(&workers) {
            bail!("--workers must be between 1 and 256");
        }
        let dns_server = match self.dns_server.or(file.dns_server) {
            Some(s) => Some(parse_dns_server(&s)?),
            None => None,
        };
        let trace_sampling = self
            .trace_sampling
            .or(file.trace_sampling)
            .unwrap_or(DEFAULT_TRACE_SAMPLING);
        if !(0.0..=100.0).contains(&trace_sampling) {
            bail!("--trace-sampling must be a percent between 0 and 100");
        }
        let access_log = self
            .access_log
            .or(file.access_log)
            .unwrap_or_else(|| "off".into());
        if access_log.is_empty() {
            bail!("--access-log must be off, stdout or a file path");
        }
        let idle_timeout = Some(parse_duration_flag(
            "idle-timeout",
            self.idle_timeout.or(file.idle_timeout),
            DEFAULT_IDLE_TIMEOUT,
        )?)
        .filter(|d| !d.is_zero());
        let admin_header_timeout = parse_duration_flag(
            "admin-header-timeout",
            self.admin_header_timeout.or(file.admin_header_timeout),
            DEFAULT_ADMIN_HEADER_TIMEOUT,
        )?;
        let admin_idle_timeout = parse_duration_flag(
            "admin-idle-timeout",
            self.admin_idle_timeout.or(file.admin_idle_timeout),
            DEFAULT_ADMIN_IDLE_TIMEOUT,
        )?;
        if admin_header_timeout.is_zero() || admin_idle_timeout.is_zero() {
            bail!("--admin-header-timeout and --admin-idle-timeout must be above 0");
        }
        let at_least_one = |flag: &str, v: Option<usize>| match v {
            Some(0) => Err(anyhow::anyhow!("--{flag} must be at least 1")),
            v => Ok(v),
        };
        let max_connections = at_least_one(
            "max-connections",
            self.max_connections.or(file.max_connections),
        )?;
        let max_connections_per_pod = at_least_one(
            "max-connections-per-pod",
            self.max_connections_per_pod
                .or(file.max_connections_per_pod),
        )?;
        let admin_max_connections = at_least_one(
            "admin-max-connections",
            self.admin_max_connections.or(file.admin_max_connections),
        )?
        .unwrap_or(DEFAULT_ADMIN_MAX_CONNECTIONS);
        let metrics_max_connections = at_least_one(
            "metrics-max-connections",
            self.metrics_max_connections
                .or(file.metrics_max_connections),
        )?
        .unwrap_or(DEFAULT_METRICS_MAX_CONNECTIONS);
        let metrics_max_connections_per_ip = at_least_one(
            "metrics-max-connections-per-ip",
            self.metrics_max_connections_per_ip
                .or(file.metrics_max_connections_per_ip),
        )?
        .unwrap_or(DEFAULT_METRICS_MAX_CONNECTIONS_PER_IP);
        let hbone_keepalive_interval = parse_duration_flag(
            "hbone-keepalive-interval",
            self.hbone_keepalive_interval
                .or(file.hbone_keepalive_interval),
            DEFAULT_HBONE_KEEPALIVE_INTERVAL,
        )?;
        let hbone_keepalive_timeout = parse_duration_flag(
            "hbone-keepalive-timeout",
            self.hbone_keepalive_timeout
                .or(file.hbone_keepalive_timeout),
            DEFAULT_HBONE_KEEPALIVE_TIMEOUT,
        )?;
        if hbone_keepalive_timeout.is_zero() {
            bail!("--hbone-keepalive-timeout must be above 0");
        }
        let kubeconfig = self.kubeconfig.or(file.kubeconfig);
        let kube_context = self.kube_context.or(file.kube_context);
        if registry != Path::new(REGISTRY_KUBE) && (kubeconfig.is_some() || kube_context.is_some())
        {
            bail!("--kubeconfig and --kube-context go with --registry kube");
        }
        Ok(NodeConfig {
            node_name,
            registry,
            kubeconfig,
            kube_context,
            proxy_address,
            cgroup_root: self
                .cgroup_root
                .or(file.cgroup_root)
                .unwrap_or_else(|| DEFAULT_CGROUP_ROOT.into()),
            bpffs: self
                .bpffs
                .or(file.bpffs)
                .unwrap_or_else(|| DEFAULT_BPFFS.into()),
            admin_socket: self
                .admin_socket
                .or(file.admin_socket)
                .unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into()),
            admin_address: self
                .admin_address
                .or(file.admin_address)
                .unwrap_or_else(|| DEFAULT_ADMIN_ADDRESS.parse().expect("valid default")),
            handover_socket: self
                .handover_socket
                .or(file.handover_socket)
                .unwrap_or_else(|| DEFAULT_HANDOVER_SOCKET.into()),
            drain_timeout,
            metrics_address: self
                .metrics_address
                .or(file.metrics_address)
                .unwrap_or_else(|| DEFAULT_METRICS_ADDRESS.parse().expect("valid default")),
            exclude_ports: self
                .exclude_ports
                .or(file.exclude_ports)
                .unwrap_or_default(),
            exclude_cidrs: self
                .exclude_cidrs
                .or(file.exclude_cidrs)
                .unwrap_or_default(),
            flow_capacity,
            connect_timeout_ms: self
                .connect_timeout_ms
                .or(file.connect_timeout_ms)
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS),
            max_request_headers_kb,
            retry_body_kb,
            protocol_detection_timeout_ms: self
                .protocol_detection_timeout_ms
                .or(file.protocol_detection_timeout_ms)
                .unwrap_or(DEFAULT_PROTOCOL_DETECTION_TIMEOUT_MS),
            dns_server,
            workers,
            source_address: self
                .source_address
                .or(file.source_address)
                .unwrap_or(SourceAddress::Pod),
            trust_domain: self
                .trust_domain
                .or(file.trust_domain)
                .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.into()),
            ca_cert,
            ca_address,
            ca_token,
            ca_key,
            trust_bundle: self.trust_bundle.or(file.trust_bundle).unwrap_or_default(),
            svid_ttl,
            enroll_timeout,
            hbone_port: self
                .hbone_port
                .or(file.hbone_port)
                .unwrap_or(DEFAULT_HBONE_PORT),
            hbone_address: self.hbone_address.or(file.hbone_address),
            root_namespace: self
                .root_namespace
                .or(file.root_namespace)
                .unwrap_or_else(|| DEFAULT_ROOT_NAMESPACE.into()),
            cluster_id: self
                .cluster_id
                .or(file.cluster_id)
                .unwrap_or_else(|| DEFAULT_CLUSTER_ID.into()),
            access_log,
            access_log_format: self
                .access_log_format
                .or(file.access_log_format)
                .unwrap_or_default(),
            otlp_endpoint: self.otlp_endpoint.or(file.otlp_endpoint),
            otlp_protocol: self
                .otlp_protocol
                .or(file.otlp_protocol)
                .unwrap_or_default(),
            trace_sampling,
            max_connections,
            max_connections_per_pod,
            idle_timeout,
            admin_max_connections,
            metrics_max_connections,
            metrics_max_connections_per_ip,
            admin_header_timeout,
            admin_idle_timeout,
            hbone_keepalive_interval,
            hbone_keepalive_timeout,
            hbone_max_handshakes: self
                .hbone_max_handshakes
                .or(file.hbone_max_handshakes)
                .unwrap_or(DEFAULT_HBONE_MAX_HANDSHAKES),
            hbone_max_handshakes_per_peer: self
                .hbone_max_handshakes_per_peer
                .or(file.hbone_max_handshakes_per_peer)
                .unwrap_or(DEFAULT_HBONE_MAX_HANDSHAKES_PER_PEER),
            hbone_max_connections_per_peer: self
                .hbone_max_connections_per_peer
                .or(file.hbone_max_connections_per_peer)
                .unwrap_or(DEFAULT_HBONE_MAX_CONNECTIONS_PER_PEER),
        })
    }
}

fn read_file_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let de = serde_yaml_ng::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let line = e.inner().location().map(|l| l.line()).unwrap_or(0);
        let field = e.path().to_string();
        anyhow::anyhow!("{}:{line}: {field}: {}", path.display(), e.inner())
    })
}

/// `IP`, `IP:PORT` or `:PORT`.
pub fn parse_proxy_address(s: &str) -> anyhow::Result<ProxyAddress> {
    if let Some(port) = s.strip_prefix(':') {
        let port = port
            .parse()
            .with_context(|| format!("--proxy-address {s:?}: bad port"))?;
        return Ok(ProxyAddress::FromNode(port));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(ProxyAddress::Given(sa));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ProxyAddress::Given(SocketAddr::new(ip, DEFAULT_PROXY_PORT)));
    }
    bail!("--proxy-address {s:?}: expected IP, IP:PORT or :PORT")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fewest flags a node resolves with (development-mode CA).
    fn signing_node() -> NodeArgs {
        NodeArgs {
            node_name: Some("n".into()),
            registry: Some("/r".into()),
            ca_cert: Some("/ca.crt".into()),
            ca_key: Some("/ca.key".into()),
            ..Default::default()
        }
    }
    use std::io::Write;

    #[test]
    fn proxy_address_forms() {
        assert_eq!(
            parse_proxy_address("10.0.0.1").unwrap(),
            ProxyAddress::Given("10.0.0.1:15001".parse().unwrap())
        );
        assert_eq!(
            parse_proxy_address("10.0.0.1:9999").unwrap(),
            ProxyAddress::Given("10.0.0.1:9999".parse().unwrap())
        );
        assert_eq!(
            parse_proxy_address(":16001").unwrap(),
            ProxyAddress::FromNode(16001)
        );
        assert!(parse_proxy_address("nope").is_err());
    }

    #[test]
    fn a_node_either_asks_the_ca_service_or_signs_with_the_key() {
        let base = || NodeArgs {
            node_name: Some("n".into()),
            registry: Some("/r".into()),
            ca_cert: Some("/ca.crt".into()),
            ..Default::default()
        };
        let err = |a: NodeArgs| format!("{:#}", a.resolve().unwrap_err());
        assert!(err(base()).contains("one of --ca-address and --ca-key is required"));
        let both = NodeArgs {
            ca_address: Some("https://ca:15012".into()),
            ca_key: Some("/ca.key".into()),
            ..base()
        };
        assert!(err(both).contains("exclude each other"));
        let token_without_service = NodeArgs {
            ca_key: Some("/ca.key".into()),
            ca_token: Some("/token".into()),
            ..base()
        };
        assert!(err(token_without_service).contains("--ca-token is for --ca-address"));
        let service = NodeArgs {
            ca_address: Some("https://ca:15012".into()),
            ca_token: Some("/token".into()),
            ..base()
        }
        .resolve()
        .unwrap();
        assert_eq!(service.ca_address.as_deref(), Some("https://ca:15012"));
        assert_eq!(service.ca_key, None);
    }

    #[test]
    fn file_is_layered_under_flags() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "node-name: from-file\nregistry: /etc/weft/registry\nexclude-ports: [22, 53]\nflow-capacity: 50\nca-cert: /etc/weft/ca.crt\nca-key: /etc/weft/ca.key\nsvid-ttl: 1h"
        )
        .unwrap();
        let args = NodeArgs {
            config: Some(f.path().into()),
            node_name: Some("from-flag".into()),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.node_name, "from-flag");
        assert_eq!(c.registry, PathBuf::from("/etc/weft/registry"));
        assert_eq!(c.exclude_ports, vec![22, 53]);
        assert_eq!(c.flow_capacity, 50);
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert_eq!(c.proxy_address, ProxyAddress::FromNode(15001));
        assert_eq!(c.ca_cert, PathBuf::from("/etc/weft/ca.crt"));
        assert_eq!(c.svid_ttl, Duration::from_secs(3600));
        assert_eq!(c.enroll_timeout, Duration::from_secs(5));
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.hbone_port, 15008);
        assert_eq!(c.hbone_address, None);
        assert_eq!(c.root_namespace, "istio-system");
    }

    #[test]
    fn bad_file_names_file_line_and_field() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "node-name: a\nflow-capacity: lots").unwrap();
        let err = NodeArgs {
            config: Some(f.path().into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains(&format!("{}:2", f.path().display())), "{err}");
        assert!(err.contains("flow-capacity"), "{err}");

        let mut g = tempfile::NamedTempFile::new().unwrap();
        writeln!(g, "node-name: a\nregistyr: /x").unwrap();
        let err = NodeArgs {
            config: Some(g.path().into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `registyr`"), "{err}");
    }

    #[test]
    fn ca_is_required_with_a_hint() {
        let args = NodeArgs {
            node_name: Some("n".into()),
            registry: Some("/r".into()),
            ..Default::default()
        };
        let err = args.resolve().unwrap_err().to_string();
        assert!(
            err.contains("--ca-cert") && err.contains("weft ca init"),
            "{err}"
        );
    }

    #[test]
    fn limits_default_from_the_descriptor_limit_and_timeouts_parse() {
        let base = signing_node;
        let c = base().resolve().unwrap();
        // 1 048 576 descriptors: 131 072 relays of 6 at most, a quarter of them per pod.
        assert_eq!(c.connection_limits(1 << 20), (131_072, 32_768));
        assert_eq!(c.connection_limits(1024), (128, 32));
        assert_eq!(c.connection_limits(0), (1, 1));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.admin_header_timeout, Duration::from_secs(10));
        assert_eq!(c.metrics_max_connections_per_ip, 8);
        let set = NodeArgs {
            max_connections: Some(100),
            max_connections_per_pod: Some(40),
            idle_timeout: Some("0s".into()),
            ..base()
        }
        .resolve()
        .unwrap();
        assert_eq!(set.connection_limits(1 << 20), (100, 40));
        assert_eq!(set.idle_timeout, None, "0 turns it off");
        let only_node = NodeArgs {
            max_connections: Some(100),
            ..base()
        }
        .resolve()
        .unwrap();
        assert_eq!(only_node.connection_limits(1 << 20), (100, 25));
        for bad in [
            NodeArgs {
                max_connections_per_pod: Some(0),
                ..base()
            },
            NodeArgs {
                idle_timeout: Some("soon".into()),
                ..base()
            },
            NodeArgs {
                admin_header_timeout: Some("0s".into()),
                ..base()
            },
        ] {
            assert!(bad.resolve().is_err());
        }
    }

    #[test]
    fn hbone_keepalive_and_admission_flags() {
        let base = signing_node;
        let c = base().resolve().unwrap();
        assert_eq!(c.hbone_keepalive_interval, Duration::from_secs(10));
        assert_eq!(c.hbone_keepalive_timeout, Duration::from_secs(20));
        assert_eq!(
            (
                c.hbone_max_handshakes,
                c.hbone_max_handshakes_per_peer,
                c.hbone_max_connections_per_peer
            ),
            (4096, 512, 4096)
        );
        let set = NodeArgs {
            hbone_keepalive_interval: Some("500ms".into()),
            hbone_keepalive_timeout: Some("1s".into()),
            hbone_max_handshakes_per_peer: Some(0),
            ..base()
        }
        .resolve()
        .unwrap();
        assert_eq!(set.hbone_keepalive_interval, Duration::from_millis(500));
        assert_eq!(set.hbone_keepalive_timeout, Duration::from_secs(1));
        assert_eq!(set.hbone_max_handshakes_per_peer, 0, "0: no limit");
        let zero_timeout = NodeArgs {
            hbone_keepalive_timeout: Some("0s".into()),
            ..base()
        };
        assert!(zero_timeout.resolve().is_err());
    }

    #[test]
    fn required_settings_are_named() {
        let err = NodeArgs::default().resolve().unwrap_err().to_string();
        assert!(err.contains("--node-name"), "{err}");
    }
}
