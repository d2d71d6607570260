//! The `weft` binary: runs the node, the CA and uninstall commands itself, and hands the
//! commands that ask a running node to the CLI.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use weft::cli::{CaCommand, Cli, Command};

/// The data path allocates and frees small buffers and headers per request; mimalloc's
/// thread-local free lists serve that far cheaper than glibc's arenas (see
/// `weft::memory::Allocator` for how it is asked).
#[global_allocator]
static ALLOC: weft::memory::Allocator = weft::memory::Allocator;

fn main() {
    // Before the allocator has much to put in them (see `weft::memory`).
    let huge_pages = weft::memory::no_huge_pages();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Node(_)) {
        // Until it serves, what starting frees goes back at once (see `weft::memory`).
        weft::memory::starting();
    }
    let default_level = match cli.command {
        Command::Node(_) | Command::Ca(CaCommand::Serve(_)) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = huge_pages {
        tracing::debug!(error = %e, "transparent huge pages stay on");
    }
    // The control plane (registry, reconcile, admin) runs here; the data path on its own
    // worker threads. Idle control-plane threads return memory the registry freed.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(weft::memory::on_park)
        .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        // `weft flows | head`: the reader left; that is how it ends, not an error.
        if is_broken_pipe(&e) {
            std::process::exit(0);
        }
        eprintln!("weft: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node(args) => weft::node::run(args.resolve()?).await,
        Command::Ca(CaCommand::Init {
            out,
            trust_domain,
            validity,
        }) => {
            let validity = humantime::parse_duration(&validity)
                .with_context(|| format!("--validity {validity:?}: expected e.g. 10y or 365d"))?;
            ca_init(&out, &trust_domain, validity)
        }
        Command::Ca(CaCommand::Serve(args)) => {
            let args = *args;
            let max_ttl = humantime::parse_duration(&args.max_ttl)
                .with_context(|| format!("--max-ttl {:?}: expected e.g. 24h", args.max_ttl))?;
            weft::ca::serve(weft::ca::CaServeConfig {
                listen: args.listen,
                ca_cert: args.ca_cert,
                ca_key: args.ca_key,
                trust_domain: args.trust_domain,
                registry: args.registry,
                kubeconfig: args.kubeconfig,
                kube_context: args.kube_context,
                node_tokens: args.node_tokens,
                token_audience: args.token_audience,
                node_service_account: args.node_service_account,
                server_names: args.server_names,
                max_ttl,
            })
            .await
        }
        Command::Uninstall(args) => {
            let removed = weft::capture::Capture::remove_pins(&args.bpffs)?;
            let dir = args.bpffs.display();
            let mut stdout = std::io::stdout().lock();
            if removed.pins == 0 {
                writeln!(
                    stdout,
                    "nothing to uninstall: no weft capture is pinned in {dir}"
                )?;
                return Ok(());
            }
            writeln!(
                stdout,
                "weft capture removed: {} of {} programs detached, {} pins deleted from {dir}",
                removed.detached, removed.links, removed.pins
            )?;
            if removed.detached < removed.links {
                anyhow::bail!(
                    "{} programs could not be detached and may still redirect connections (see the warnings above)",
                    removed.links - removed.detached
                );
            }
            Ok(())
        }
        Command::Query(query) => weft::cli::run(query).await,
    }
}

fn ca_init(out: &std::path::Path, trust_domain: &str, validity: Duration) -> anyhow::Result<()> {
    weft::identity::init_ca(out, trust_domain, validity)?;
    writeln!(
        std::io::stdout().lock(),
        "mesh CA for trust domain {trust_domain}: {0}/ca.crt, {0}/ca.key",
        out.display()
    )?;
    Ok(())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::BrokenPipe;
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(BrokenPipe))
    })
}
