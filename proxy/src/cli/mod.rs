//! The `weft` command line. Its definition (every subcommand and flag) lives here; the
//! subcommands that ask a running node — `flows`, `workloads`, `status`, `certs`, `stats`, `stat`, `graph` — are run here
//! too, and only render [`crate::admin::api`] types they get from the admin API. `weft node`,
//! `weft ca` and `weft uninstall` are run by the binary's entry (`main.rs`).
//!
//! May import: `admin` (api, client), `config` (the `weft node` flags and defaults).

mod certs;
mod flows;
mod stat;
mod stats;
mod status;
mod table;
mod workloads;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::admin::client::{AdminClient, Target};
use crate::config::{NodeArgs, DEFAULT_ADMIN_SOCKET, DEFAULT_BPFFS, DEFAULT_TRUST_DOMAIN};

#[derive(Parser, Debug)]
#[command(
    name = "weft",
    version,
    about = "weft: a sidecar-less service mesh data plane"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node proxy (one per node).
    Node(Box<NodeArgs>),
    /// Manage the mesh certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Remove weft's capture from this node: detach the eBPF programs and delete the pins.
    /// Stop `weft node` first; enrolled pods then connect directly again.
    Uninstall(UninstallArgs),
    #[command(flatten)]
    Query(Query),
}

/// The subcommands that read a running node's admin API.
#[derive(Subcommand, Debug)]
pub enum Query {
    /// Show redirected flows: who called whom, verdict, bytes, duration.
    Flows(FlowsArgs),
    /// List the pods this node knows, whether they are enrolled, and their cgroups.
    Workloads(WorkloadsArgs),
    /// Show the node's eBPF programs, maps, counters and readiness.
    Status(StatusArgs),
    /// List the workload certificates (SVIDs) this node holds, with their expiry.
    Certs(CertsArgs),
    /// Show every destination's counters (retries, timeouts, overflows, responses by class)
    /// in Envoy's names: `cluster.<cluster>.<stat>: <value>`.
    Stats(StatsArgs),
    /// Show the golden signals of the calls into each deployment (or statefulset, pod,
    /// service, …) this node saw: success rate, requests per second, latency percentiles, TCP
    /// connections and bytes, as `linkerd viz stat` does.
    Stat(StatArgs),
    /// Show who called whom, as this node saw it: an edge per calling and called workload,
    /// with requests per second, errors and mTLS, as a table, Graphviz DOT or Mermaid.
    Graph(GraphArgs),
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a mesh root CA: DIR/ca.crt and DIR/ca.key (ECDSA P-256). Refuses to overwrite.
    Init {
        /// Directory to write ca.crt and ca.key into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// SPIFFE trust domain of the mesh.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// How long the root is valid, e.g. 10y, 365d.
        #[arg(long, default_value = "10y")]
        validity: String,
    },
    /// Run the mesh CA as a service: the only holder of the CA key. Nodes (`weft node
    /// --ca-address`) ask it for their workloads' certificates over Istio's certificate service
    /// protocol; it signs an identity only for a node that runs a pod of it.
    Serve(Box<CaServeArgs>),
}

/// `weft ca serve` flags.
#[derive(clap::Args, Debug)]
pub struct CaServeArgs {
    /// Address to serve on (gRPC over TLS).
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: std::net::SocketAddr,
    /// PEM certificate of the CA (root or intermediate, followed by the rest of its chain).
    #[arg(long, value_name = "FILE")]
    pub ca_cert: PathBuf,
    /// PEM private key of that CA.
    #[arg(long, value_name = "FILE")]
    pub ca_key: PathBuf,
    /// SPIFFE trust domain of the mesh: the only one this CA signs identities in.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Where pods run: `kube` (the Kubernetes API), or the registry file or directory the
    /// nodes read.
    #[arg(long, value_name = "kube|PATH")]
    pub registry: PathBuf,
    /// With --registry kube: a kubeconfig file (default: in-cluster).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// With --registry kube: the kubeconfig context (default: its current context).
    #[arg(long, value_name = "NAME")]
    pub kube_context: Option<String>,
    /// Bootstrap tokens nodes authenticate with: one `NODE TOKEN` per line, read at every
    /// request. Default: none, and then (Kubernetes) a node's ServiceAccount token is checked
    /// with a TokenReview and its node read from the token's pod binding.
    #[arg(long, value_name = "FILE")]
    pub node_tokens: Option<PathBuf>,
    /// Audience nodes' ServiceAccount tokens must be issued for.
    #[arg(long, default_value = "weft-ca")]
    pub token_audience: String,
    /// `NAMESPACE/NAME` of the ServiceAccount weft's nodes run as.
    #[arg(long, default_value = "weft-system/weft")]
    pub node_service_account: String,
    /// A DNS name or IP address nodes dial the CA by, put in its TLS certificate (repeat for
    /// several).
    #[arg(long = "server-name", value_name = "NAME", default_values_t = [
        "weft-ca".to_string(),
        "weft-ca.weft-system".to_string(),
        "weft-ca.weft-system.svc".to_string(),
    ])]
    pub server_names: Vec<String>,
    /// Longest certificate lifetime a node may ask for.
    #[arg(long, default_value = "24h")]
    pub max_ttl: String,
}

#[derive(clap::Args, Debug)]
pub struct UninstallArgs {
    /// The pin directory `weft node` used (`--bpffs`).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// Which node to ask.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminTarget {
    /// Admin API Unix socket of the node (default /run/weft/admin.sock).
    #[arg(long, value_name = "PATH", global = true, env = "WEFT_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Admin API TCP address of the node, instead of the socket (e.g. 127.0.0.1:15000).
    /// Default: none.
    #[arg(
        long,
        value_name = "IP:PORT",
        global = true,
        env = "WEFT_ADMIN_ADDRESS"
    )]
    pub admin_address: Option<SocketAddr>,
}

impl AdminTarget {
    fn client(&self) -> AdminClient {
        AdminClient::new(match (&self.admin_address, &self.admin_socket) {
            (Some(addr), _) => Target::Tcp(*addr),
            (None, Some(path)) => Target::Socket {
                path: path.clone(),
                given: true,
            },
            (None, None) => Target::Socket {
                path: DEFAULT_ADMIN_SOCKET.into(),
                given: false,
            },
        })
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// One JSON object per line.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct FlowsArgs {
    /// Keep streaming new flows (default: print what is kept and exit).
    #[arg(short, long)]
    pub follow: bool,
    /// Only flows from or to this namespace (default: all).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Only flows from or to this pod, `name` or `namespace/name` (default: all).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only flows with this verdict (default: all).
    #[arg(long, value_enum, ignore_case = true)]
    pub verdict: Option<crate::admin::api::Verdict>,
    /// Only flows since this long ago (30s, 5m, 2h, 1d, 1500ms) or this RFC 3339 time
    /// (default: all that are kept).
    #[arg(long, value_parser = since)]
    pub since: Option<String>,
    /// Only the last N flows from history (default: all that are kept).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// HTTP requests only, shown as a request table (method, authority, path, status, response
    /// flags, route, upstream) (default: every flow).
    #[arg(long)]
    pub http: bool,
    /// Only HTTP requests answered with this status: a code (404) or a class (5xx)
    /// (default: all).
    #[arg(long, value_parser = clap::value_parser!(crate::admin::api::StatusFilter))]
    pub status: Option<crate::admin::api::StatusFilter>,
    /// Only HTTP requests whose path starts with PREFIX (default: all).
    #[arg(long, value_name = "PREFIX")]
    pub path: Option<String>,
    /// Only HTTP requests with this method (default: all).
    #[arg(long)]
    pub method: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub target: AdminTarget,
}

/// Checks `--since` here, so a typo never reaches the node.
fn since(s: &str) -> Result<String, String> {
    crate::admin::api::parse_since(s, time::OffsetDateTime::now_utc())
        .map(|_| s.to_string())
        .map_err(|e| {
            e.trim_start_matches(&format!("--since {s:?}: "))
                .to_string()
        })
}

#[derive(clap::Args, Debug)]
pub struct WorkloadsArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub target: AdminTarget,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub target: AdminTarget,
}

#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub target: AdminTarget,
}

#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// Only the stats whose name matches this regular expression, e.g. `retry` (default: all).
    #[arg(long, value_name = "RE")]
    pub filter: Option<String>,
    /// Only the stats that are not zero.
    #[arg(long)]
    pub used_only: bool,
    /// Output format (`table`: Envoy's `name: value` lines).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub target: AdminTarget,
}

#[derive(clap::Args, Debug)]
pub struct StatArgs {
    /// What a row is: the calls into each one of these.
    #[arg(value_enum, default_value_t = crate::admin::api::StatBy::Deploy)]
    pub resource: crate::admin::api::StatBy,
    /// Only the rows of this namespace (default: `default`; `ns` rows: every namespace).
    #[arg(short, long, conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,
    /// The rows of every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// How far back: 10s to 10m, rounded to 10 s.
    #[arg(long, default_value = "1m", value_parser = window)]
    pub window: std::time::Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub target: AdminTarget,
}

#[derive(clap::Args, Debug)]
pub struct GraphArgs {
    /// How far back: 10s to 10m, rounded to 10 s.
    #[arg(long, default_value = "1m", value_parser = window)]
    pub window: std::time::Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = GraphOutput::Table)]
    pub output: GraphOutput,
    #[command(flatten)]
    pub target: AdminTarget,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphOutput {
    /// Aligned columns for people.
    Table,
    /// One JSON object per line.
    Json,
    /// Graphviz DOT (`weft graph -o dot | dot -Tsvg > graph.svg`).
    Dot,
    /// A Mermaid flowchart.
    Mermaid,
}

/// Checks `--window` here, so a typo never reaches the node.
fn window(s: &str) -> Result<std::time::Duration, String> {
    crate::admin::api::parse_window(s)
        .map_err(|e| e.trim_start_matches(&format!("window {s:?}: ")).to_string())
}

/// Runs a subcommand that asks a running node.
pub async fn run(query: Query) -> anyhow::Result<()> {
    match query {
        Query::Flows(args) => flows::run(args).await,
        Query::Workloads(args) => workloads::run(args).await,
        Query::Status(args) => status::run(args).await,
        Query::Certs(args) => certs::run(args).await,
        Query::Stats(args) => stats::run(args).await,
        Query::Stat(args) => stat::run_stat(args).await,
        Query::Graph(args) => stat::run_graph(args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str) {
            for arg in cmd.get_arguments() {
                if arg.is_hide_set() || ["help", "version"].contains(&arg.get_id().as_str()) {
                    continue;
                }
                assert!(
                    arg.get_help().is_some(),
                    "{path} --{} has no help text",
                    arg.get_id()
                );
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        walk(&Cli::command(), "weft");
    }

    #[test]
    fn every_flag_shows_its_default() {
        // A flag with a value shows its default: clap's `[default: …]`, or the help text says
        // it (`default …`, `Default: …`) or that it is required.
        fn walk(cmd: &clap::Command, path: &str) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if ["help", "version"].contains(&id) || !arg.get_action().takes_values() {
                    continue;
                }
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                let lower = help.to_lowercase();
                let shown = !arg.get_default_values().is_empty()
                    || lower.contains("default")
                    || lower.contains("required")
                    || arg.is_required_set()
                    || arg.get_index().is_some();
                assert!(shown, "{path} --{id}: no default in {help:?}");
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        walk(&Cli::command(), "weft");
    }

    #[test]
    fn flows_help_lists_every_verdict() {
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("flows")
            .unwrap()
            .render_long_help()
            .to_string();
        for v in crate::admin::api::Verdict::ALL {
            assert!(help.contains(v.as_str()), "{v} missing from:\n{help}");
        }
    }

    #[test]
    fn since_is_checked_before_any_request() {
        let err = Cli::try_parse_from(["weft", "flows", "--since", "5x"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("unknown unit"), "{text}");
        assert!(!text.contains("http"), "{text}");
        assert!(Cli::try_parse_from(["weft", "flows", "--since", "10m"]).is_ok());
        assert!(Cli::try_parse_from(["weft", "flows", "--last", "-1"]).is_err());
        assert!(Cli::try_parse_from(["weft", "flows", "--verdict", "bogus"]).is_err());
    }

    #[test]
    fn http_filters_parse_and_bad_statuses_are_refused() {
        use crate::admin::api::StatusFilter;
        let cli = Cli::try_parse_from([
            "weft", "flows", "--http", "--status", "5xx", "--path", "/api", "--method", "POST",
        ])
        .unwrap();
        let Command::Query(Query::Flows(args)) = cli.command else {
            panic!("not flows");
        };
        assert!(args.http);
        assert_eq!(args.status, Some(StatusFilter::Class(5)));
        assert_eq!(args.path.as_deref(), Some("/api"));
        assert_eq!(args.method.as_deref(), Some("POST"));
        for bad in ["6xx", "99", "abc", "5x"] {
            assert!(
                Cli::try_parse_from(["weft", "flows", "--status", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
