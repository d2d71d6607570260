//! Builds the eBPF object (`ebpf/`, crate `weft-ebpf`, binary `weft`) with aya-build and leaves
//! it at `$OUT_DIR/weft`, where `capture/attach.rs` embeds it with
//! `aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft"))`.
//!
//! aya-build runs `rustup run nightly cargo build -p weft-ebpf --target bpfel-unknown-none
//! -Z build-std=core --release` with its own target dir under `$OUT_DIR`, so a plain `cargo build`
//! of the workspace (stable toolchain) is enough. Needs the nightly toolchain with `rust-src` and
//! `bpf-linker` on `PATH` (`cargo xtask setup` installs both).
//!
//! It also generates the gRPC code of `proto/ca.proto` (Istio's certificate service) with
//! tonic-prost-build and a vendored `protoc`.
//!
//! Set `AYA_BUILD_SKIP=1` to skip the eBPF build (an empty object is written so the proxy still
//! compiles; loading it then fails at run time).
use std::{env, fs, path::PathBuf};

use anyhow::{bail, Context as _};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("proxy crate has no parent directory")?;
    let ebpf_dir = workspace.join("ebpf");
    let common_dir = workspace.join("common");
    let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);

    // Everything the eBPF object is built from. (aya-build itself adds the ebpf crate root.)
    for path in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("build.rs"),
        common_dir.join("src"),
        common_dir.join("Cargo.toml"),
        workspace.join("Cargo.toml"),
        workspace.join("Cargo.lock"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    // Istio's certificate service (gRPC), client and server, with a vendored protoc.
    let proto = manifest_dir.join("proto/ca.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    env::set_var(
        "PROTOC",
        protoc_bin_vendored::protoc_bin_path().context("no vendored protoc for this host")?,
    );
    let include = protoc_bin_vendored::include_path().context("vendored protobuf includes")?;
    tonic_prost_build::configure()
        .compile_protos(
            std::slice::from_ref(&proto),
            &[manifest_dir.join("proto"), include],
        )
        .with_context(|| format!("compiling {}", proto.display()))?;

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let obj = out_dir.join("weft");
        if !obj.exists() {
            fs::write(&obj, []).with_context(|| format!("writing {}", obj.display()))?;
        }
    } else if which_bpf_linker().is_none() {
        bail!(
            "bpf-linker not found on PATH, it is needed to build the eBPF programs (ebpf/). \
             Run `cargo xtask setup` (installs bpf-linker and the nightly toolchain with rust-src), \
             or set AYA_BUILD_SKIP=1 to build without them."
        );
    }

    // aya-build forwards everything the nested cargo prints to stderr as `cargo:warning`, which
    // cargo then replays on every build; keep the nested cargo's progress lines out of it.
    // Compiler diagnostics still come through (they are read from its JSON output).
    // (The build script is single-threaded here, so changing the environment is fine.)
    env::set_var("CARGO_TERM_QUIET", "true");

    let ebpf_root = ebpf_dir
        .to_str()
        .with_context(|| format!("non UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "weft-ebpf",
            root_dir: ebpf_root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context(
        "building the eBPF programs (ebpf/, crate weft-ebpf) with the nightly toolchain \
         (needs rust-src and bpf-linker: `cargo xtask setup` installs them)",
    )?;

    let obj = out_dir.join("weft");
    if !skip && !obj.is_file() {
        bail!("aya-build did not produce {}", obj.display());
    }
    link_order(&manifest_dir);
    Ok(())
}

/// Lays out the functions a serving node runs first and together in the executable's code
/// (`link-order.txt`, one symbol per line, written by `cargo xtask order`): a page of code is
/// mapped with the 64 KiB around it, so what runs, spread over the whole text, maps most of it.
/// Release builds on x86_64 Linux only, where rustc links with its own LLD; symbols the file
/// names that a build no longer has are skipped. `WEFT_LINK_ORDER=off` leaves it out (a linker
/// of one's own that knows no `--symbol-ordering-file`: GNU ld).
fn link_order(manifest_dir: &std::path::Path) {
    let order = manifest_dir.join("link-order.txt");
    println!("cargo:rerun-if-changed={}", order.display());
    println!("cargo:rerun-if-env-changed=WEFT_LINK_ORDER");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let lld = env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    let off = env::var("WEFT_LINK_ORDER")
        .is_ok_and(|v| ["off", "0", "false", "no"].contains(&v.to_ascii_lowercase().as_str()));
    if release && lld && !off && order.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=weft=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=weft=-Wl,--no-warn-symbol-ordering");
    }
}

fn which_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}
