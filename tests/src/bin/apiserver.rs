//! `weft-apiserver`: the Kubernetes API server stand-in (`weft_tests::apiserver`) as a
//! program, for manual use with kubectl and for benchmarks.
//!
//! ```text
//! weft-apiserver --listen 127.0.0.1:6443 [--load FILE.yaml]... [--kubeconfig PATH]
//! kubectl --kubeconfig PATH get pods -A
//! ```

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use weft_tests::apiserver::{load_yaml, ApiServer};

/// A Kubernetes API server stand-in: list/watch/CRUD over HTTP for core, discovery, Istio and
/// Gateway API kinds, state in memory.
#[derive(Parser)]
#[command(name = "weft-apiserver")]
struct Args {
    /// Address to serve plain HTTP on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Multi-document YAML with objects to serve (repeatable).
    #[arg(long)]
    load: Vec<PathBuf>,
    /// Write a kubeconfig for this server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    let server = ApiServer::start(listener)?;
    let mut objects = Vec::new();
    for path in &args.load {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        objects.extend(load_yaml(&text).with_context(|| format!("parse {}", path.display()))?);
    }
    let count = objects.len();
    server.sync(objects)?;
    if let Some(path) = &args.kubeconfig {
        server.write_kubeconfig(path)?;
    }
    println!(
        "weft-apiserver: serving {} ({count} objects loaded)",
        server.url()
    );
    loop {
        std::thread::park();
    }
}
