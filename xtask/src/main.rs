//! Project tasks: `cargo xtask setup | test | demo | bench | pgo | order | chart`.

mod bench;
mod chart;
mod demo;
mod order;
mod pgo;
mod setup;

use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "weft project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing weft needs (idempotent): nightly rust-src,
    /// bpf-linker built against the nightly's LLVM, Debian packages used by the tests.
    Setup,
    /// A two-node cluster on this machine with weft on each node: traffic across nodes, an
    /// Istio canary split and an L7 AuthorizationPolicy, then `weft flows` (`--http`),
    /// `weft workloads`, `weft certs` and `weft status` (needs root).
    ///
    /// Builds target/release first (`cargo build --release --bins`), unless `weft` and
    /// `weft-testpod` there are newer than every file they are built from: an up-to-date build,
    /// e.g. that of an earlier run, is reused.
    Demo(demo::Args),
    /// Formatting, lints, unit tests and the privileged end-to-end tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter [default: none:
        /// every test].
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Data-path benchmark: on one node, direct vs. weft vs. haproxy vs. nginx; across two
    /// nodes, direct vs. weft over HBONE (needs root). See docs/benchmarks.md.
    Bench(bench::Args),
    /// Build weft with profile-guided optimization: an instrumented build runs the benchmark's
    /// cases (needs root), llvm-profdata merges its counts, and weft is built again with them:
    /// target/pgo/weft (`cargo xtask bench --pgo` measures it).
    Pgo(pgo::Args),
    /// Write proxy/link-order.txt, the functions a serving node runs, which release builds lay
    /// out first and together (less of the executable mapped): the benchmark's cases run with
    /// each node under callgrind, counted from ready (needs root and valgrind).
    Order(order::Args),
    /// Render the Helm chart deploy/helm/weft as `helm template` does (without Helm):
    /// `cargo xtask chart --out deploy/weft.yaml` regenerates the plain manifest.
    Chart(chart::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Demo(args) => demo::run(args),
        Cmd::Test { args } => test(&args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Pgo(args) => pgo::run(args),
        Cmd::Order(args) => order::run(args),
        Cmd::Chart(args) => chart::run(args),
    }
}

fn test(args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    require_root("the end-to-end tests create network namespaces, cgroups and load eBPF programs")?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    // Default members only: the eBPF crate builds for its own target, via proxy/build.rs.
    // Build every binary the end-to-end tests start (weft, weft-testpod) before running them.
    cargo(&["build", "--bins"])?;
    let mut test_args = vec!["test", "--no-fail-fast", "--"];
    test_args.extend(args.iter().map(String::as_str));
    cargo_test_summary(&test_args)
}

/// Runs `cargo test`, passing its output through, and ends with one line adding up every test
/// binary's `test result:` (the last binaries, doc tests, hold none and would read as "0 passed").
fn cargo_test_summary(args: &[&str]) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped());
    eprintln!("+ {}", describe(&cmd));
    let mut child = cmd.spawn().context("running cargo test")?;
    let out = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let mut stdout = std::io::stdout();
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        writeln!(stdout, "{line}")?;
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("weft: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

pub fn require_root(why: &str) -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("must run as root: {why}");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Runs `cargo <args>` from the workspace root, failing on a non-zero exit.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    exec(Command::new(cargo).args(args).current_dir(workspace_root()))
}

pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("running {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", describe(cmd));
    }
    Ok(())
}

pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where `cargo build --release` puts the binaries: `target/release`, or
/// `$CARGO_TARGET_DIR/release`.
pub fn release_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                workspace_root().join(p)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("release")
}
