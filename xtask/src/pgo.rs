//! `cargo xtask pgo`: weft built with profile-guided optimization.
//!
//! 1. weft is built instrumented (`-Cprofile-generate`), in `target/pgo/generate`;
//! 2. that build runs the benchmark's cases, single node and across nodes, TCP and HTTP, for a
//!    short time each (`cargo xtask bench`'s own clusters; every weft is stopped with SIGTERM
//!    at the end, and writes its counts as it exits);
//! 3. `llvm-profdata` (the one of the LLVM that rustc is built on) merges the counts into
//!    `target/pgo/weft.profdata`;
//! 4. weft is built again with them (`-Cprofile-use`), in `target/pgo/use`, and copied to
//!    `target/pgo/weft`.
//!
//! LLVM lays the hot code out together and the cold code apart, and inlines and predicts
//! branches by the counts: a request runs over fewer code pages, which matters most when
//! requests come at a moderate rate and each one finds the caches cold. `cargo xtask bench
//! --pgo` builds and measures this binary; docs/benchmarks.md has the comparison.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::{exec, release_dir, require_root, setup, workspace_root};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Reuse `target/pgo/weft.profdata` from an earlier run: only step 4 [default: off: train
    /// again].
    #[arg(long)]
    pub reuse_profile: bool,
    /// Measured time of each training case, in milliseconds (each also warms up for 300).
    #[arg(long, default_value_t = TRAIN_MS, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub train_ms: u64,
}

/// The training's measured time per case when `cargo xtask bench --pgo` builds.
pub const TRAIN_MS: u64 = 1500;

pub fn run(args: Args) -> anyhow::Result<()> {
    setup::run()?;
    let weft = build(&args)?;
    eprintln!("pgo: {}", weft.display());
    Ok(())
}

/// Steps 1 to 4 (after `cargo xtask setup`); returns the optimized binary.
pub fn build(args: &Args) -> anyhow::Result<PathBuf> {
    let dir = pgo_dir();
    let profile = dir.join("weft.profdata");
    let triple = host_triple()?;
    if args.reuse_profile {
        if !profile.exists() {
            bail!("--reuse-profile: {} is missing", profile.display());
        }
    } else {
        require_root("training runs the benchmark's clusters of network namespaces")?;
        let raw = dir.join("raw");
        let _ = std::fs::remove_dir_all(&raw);
        std::fs::create_dir_all(&raw)?;
        let instrumented = cargo_weft(
            &dir.join("generate"),
            &triple,
            &format!("-Cprofile-generate={}", raw.display()),
        )?;
        train(&instrumented, args.train_ms)?;
        let counts: Vec<PathBuf> = std::fs::read_dir(&raw)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "profraw"))
            .collect();
        if counts.is_empty() {
            bail!("training left no profile in {}", raw.display());
        }
        // Not `--sparse`: a function the training never ran stays in the profile with no
        // counts, so LLVM knows it cold and builds it for size, apart from the hot code
        // (dropped from the profile, it would be built as if nothing were known of it).
        exec(
            Command::new(setup::llvm_profdata()?)
                .args(["merge", "-o"])
                .arg(&profile)
                .args(&counts),
        )?;
    }
    let optimized = cargo_weft(
        &dir.join("use"),
        &triple,
        &format!("-Cprofile-use={}", profile.display()),
    )?;
    let out = dir.join("weft");
    // Replaced, not written over: a running weft keeps its (old) file.
    let _ = std::fs::remove_file(&out);
    std::fs::copy(&optimized, &out)
        .with_context(|| format!("copying {} to {}", optimized.display(), out.display()))?;
    Ok(out)
}

/// `target/pgo` (or `$CARGO_TARGET_DIR/pgo`).
pub fn pgo_dir() -> PathBuf {
    release_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("pgo")
}

/// `cargo build --release --bin weft` with `flag` for weft and its dependencies only: with
/// `--target`, rustc flags reach neither build scripts nor proc macros (nor the eBPF crate's
/// own cargo run, which builds for its own target).
fn cargo_weft(target_dir: &Path, triple: &str, flag: &str) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let var = rustflags_var(triple);
    exec(
        Command::new(cargo)
            .args(["build", "--release", "-p", "weft-proxy", "--bin", "weft"])
            .args(["--target", triple])
            .current_dir(workspace_root())
            .env("CARGO_TARGET_DIR", target_dir)
            // These would take the place of the target's flags.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env(var, flag),
    )?;
    Ok(target_dir.join(triple).join("release/weft"))
}

/// The benchmark's cases on the instrumented build: both topologies, TCP and HTTP, weft and
/// the direct path (which the report needs), one short repetition each.
fn train(weft: &Path, train_ms: u64) -> anyhow::Result<()> {
    crate::cargo(&["build", "--release", "--bin", "weft-testpod"])?;
    crate::bench::run_short(weft, "direct,weft", train_ms, &[])
}

/// The host's target triple, as rustc reports it.
fn host_triple() -> anyhow::Result<String> {
    let out = Command::new("rustc").arg("-vV").output()?;
    field(&String::from_utf8_lossy(&out.stdout), "host")
        .map(str::to_string)
        .context("rustc -vV names no host")
}

/// A `name: value` line of `rustc -vV`.
pub fn field<'a>(version: &'a str, name: &str) -> Option<&'a str> {
    version
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
}

/// `CARGO_TARGET_<TRIPLE>_RUSTFLAGS`: rustc flags for that target only.
fn rustflags_var(triple: &str) -> String {
    format!(
        "CARGO_TARGET_{}_RUSTFLAGS",
        triple.to_uppercase().replace(['-', '.'], "_")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUSTC_VV: &str = "rustc 1.95.0 (59807616e 2026-04-14)\nbinary: rustc\n\
        commit-hash: 59807616e1fa2540724bfbac14d7976d7e4a3860\nhost: x86_64-unknown-linux-gnu\n\
        release: 1.95.0\nLLVM version: 22.1.2\n";

    #[test]
    fn the_host_and_llvm_come_from_rustc() {
        assert_eq!(field(RUSTC_VV, "host"), Some("x86_64-unknown-linux-gnu"));
        assert_eq!(field(RUSTC_VV, "LLVM version"), Some("22.1.2"));
        assert_eq!(field(RUSTC_VV, "LLVM"), None);
        assert_eq!(field("rustc 1.95.0\n", "host"), None);
    }

    #[test]
    fn flags_are_for_the_target_only() {
        assert_eq!(
            rustflags_var("x86_64-unknown-linux-gnu"),
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS"
        );
        assert_eq!(
            rustflags_var("thumbv7em-none-eabihf"),
            "CARGO_TARGET_THUMBV7EM_NONE_EABIHF_RUSTFLAGS"
        );
    }
}
