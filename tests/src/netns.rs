//! Network namespaces: create/delete (named, under /run/netns), run `ip` inside them, and run code
//! on a thread that has entered one (sysctls, probes). Nothing here touches the root netns.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const NETNS_DIR: &str = "/run/netns";

/// Something that owns a network namespace: a [`crate::Node`], a [`crate::Pod`], or the fabric.
pub trait InNetns {
    /// Name of the namespace under /run/netns.
    fn netns_name(&self) -> &str;

    /// Path of the namespace file (`/run/netns/<name>`).
    fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(self.netns_name())
    }
}

impl InNetns for str {
    fn netns_name(&self) -> &str {
        self
    }
}

impl InNetns for String {
    fn netns_name(&self) -> &str {
        self
    }
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip netns add <name>`.
pub fn create(name: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "add", name]))?;
    Ok(())
}

/// Delete a named netns: kill what still runs in it, then unmount and remove its file.
/// Missing namespaces are not an error.
pub fn delete(name: &str) -> Result<()> {
    let path = netns_path(name);
    if !path.exists() {
        return Ok(());
    }
    kill_processes_in(&path);
    let out = Command::new("ip").args(["netns", "del", name]).output();
    if path.exists() {
        // `ip netns del` failed or is missing: do what it does.
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                bail!("deleting netns {name}: {e} (ip netns del: {out:?})");
            }
        }
    }
    Ok(())
}

/// SIGKILL every process whose network namespace is the one bound at `path`.
/// (Processes started through the harness die with their cgroup; this catches strays.)
pub fn kill_processes_in(path: &Path) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let (dev, ino) = (meta.dev(), meta.ino());
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    let me = std::process::id();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
            if m.dev() == dev && m.ino() == ino {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Run `ip -n <netns> <args…>`.
pub fn ip(netns: &str, args: &[&str]) -> Result<String> {
    run(Command::new("ip").arg("-n").arg(netns).args(args))
}

/// Run `f` on a fresh thread that has entered the network namespace (only that thread does).
/// Sockets created there stay in that namespace; /proc/sys/net there is the namespace's.
pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(netns: &str, f: F) -> Result<T> {
    let path = netns_path(netns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on the current thread with a valid fd.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if r != 0 {
                bail!(
                    "setns({}): {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns {netns} panicked"))?
    })
}

/// Write sysctls (`net.ipv4.ip_forward` style keys) inside a namespace.
pub fn sysctls(netns: &str, kv: &[(&str, &str)]) -> Result<()> {
    let kv: Vec<(String, String)> = kv
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    in_netns(netns, move || -> Result<()> {
        for (k, v) in &kv {
            let p = format!("/proc/sys/{}", k.replace('.', "/"));
            std::fs::write(&p, v).with_context(|| format!("sysctl {k}={v} in {netns}"))?;
        }
        Ok(())
    })?
}

/// Read one sysctl inside a namespace.
pub fn read_sysctl(netns: &str, key: &str) -> Result<String> {
    let p = format!("/proc/sys/{}", key.replace('.', "/"));
    in_netns(netns, move || std::fs::read_to_string(&p))?
        .map(|s| s.trim().to_string())
        .with_context(|| format!("reading sysctl {key} in {netns}"))
}

/// Names of all named network namespaces.
pub fn list() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}
