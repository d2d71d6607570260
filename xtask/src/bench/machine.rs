//! The host under the benchmark: the facts recorded with the results ([`Machine`]), its CPUs
//! and pinning threads to them, the CPU time of a cgroup, a process's memory (and resetting its
//! peak), and the kernel's eBPF program run-time statistics.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::workspace_root;

/// Facts about the machine, recorded with the results.
pub(super) struct Machine {
    pub(super) date: String,
    pub(super) cores: usize,
    pub(super) cpu: String,
    pub(super) kernel: String,
    pub(super) mem: String,
    pub(super) load_before: String,
    pub(super) haproxy: String,
    pub(super) nginx: String,
    pub(super) commit: String,
}

impl Machine {
    pub(super) fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_else(|| "?".into());
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
            .unwrap_or_else(|| "?".into());
        let root = workspace_root();
        let mut commit = first_line(
            Command::new("git")
                .args(["rev-parse", "--short", "HEAD"])
                .current_dir(&root),
        );
        let dirty = Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .current_dir(&root)
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if dirty {
            commit.push_str(" (with uncommitted changes)");
        }
        Machine {
            date: first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            mem,
            load_before: load_average(),
            haproxy: first_line(Command::new("haproxy").arg("-v")),
            nginx: first_line(Command::new("nginx").arg("-v")),
            commit,
        }
    }
}

/// `/proc/loadavg` as it reads now ("?" if it cannot be read).
pub(super) fn load_average() -> String {
    read_trim("/proc/loadavg")
}

/// The first line a command prints (stdout, then stderr), or "?" if it cannot run.
fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|| "?".into())
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

pub(super) fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sets the CPU affinity of every thread in a cgroup (`cgroup.threads`: that cgroup only).
pub(super) fn pin_cgroup_threads(dir: &Path, cpus: &[usize]) -> Result<()> {
    let threads = std::fs::read_to_string(dir.join("cgroup.threads"))
        .with_context(|| format!("reading {}/cgroup.threads", dir.display()))?;
    // SAFETY: cpu_set_t is a plain bit set; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: c < online CPUs < CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    for tid in threads
        .lines()
        .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
    {
        // SAFETY: plain sched_setaffinity(2) with a valid set; a thread that has exited since
        // the read fails with ESRCH, which is fine.
        unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    }
    Ok(())
}

/// `usage_usec` of a cgroup v2 directory.
pub(super) fn cgroup_cpu_us(dir: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub(super) fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    status_kib(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        key,
    )
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Sets a process's peak RSS (`VmHWM`) back to its current RSS (`clear_refs` 5, Linux ≥ 4.0).
pub(super) fn reset_peak_rss(pid: u32) -> Result<()> {
    let p = format!("/proc/{pid}/clear_refs");
    std::fs::write(&p, "5").with_context(|| format!("writing {p}"))
}

/// `pid` and its direct children (an nginx master and its workers).
pub(super) fn with_children(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if parent_of(&stat) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// User and system CPU time of a process, all its threads (µs; `/proc/<pid>/stat` counts clock
/// ticks).
pub(super) fn proc_cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&hz| hz > 0)?;
    Some(cpu_ticks(&stat)? * 1_000_000 / hz)
}

/// utime + stime of a `/proc/<pid>/stat` line (fields 14 and 15, counted from the pid).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state).
    let (utime, stime) = (fields.get(11)?, fields.get(12)?);
    Some(utime.parse::<u64>().ok()? + stime.parse::<u64>().ok()?)
}

/// The parent pid in a `/proc/<pid>/stat` line (the field after the state, which follows the
/// command name in parentheses; the name may contain spaces and parentheses).
fn parent_of(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Keeps the kernel's eBPF run-time statistics on while held (`BPF_ENABLE_STATS`; off again
/// when the descriptor is closed, so nothing outlives the benchmark).
pub(super) struct BpfStats {
    _fd: Option<std::os::fd::OwnedFd>,
}

impl BpfStats {
    pub(super) fn enable() -> BpfStats {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        // union bpf_attr { struct { __u32 type; } enable_stats; … }, zero-padded.
        let attr: [u32; 4] = [BPF_STATS_RUN_TIME, 0, 0, 0];
        // SAFETY: bpf(2) reads `size` bytes of `attr`, which we own.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if fd < 0 {
            return BpfStats { _fd: None };
        }
        // SAFETY: a new descriptor that nothing else owns.
        BpfStats {
            _fd: Some(unsafe {
                <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32)
            }),
        }
    }
}

/// Program name → (run count, total run time ns) of the programs behind the links pinned in
/// `dir` (counts only move while [`BpfStats`] is held). Empty without bpftool or pins.
pub(super) fn bpf_prog_stats(dir: &Path) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let json = |args: &[&str]| -> Option<Value> {
        let o = Command::new("bpftool").arg("-j").args(args).output().ok()?;
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).ok())
            .flatten()
    };
    for e in entries.flatten() {
        let path = e.path().to_string_lossy().into_owned();
        let Some(prog_id) =
            json(&["link", "show", "pinned", &path]).and_then(|l| l.get("prog_id")?.as_u64())
        else {
            continue;
        };
        let Some(p) = json(&["prog", "show", "id", &prog_id.to_string()]) else {
            continue;
        };
        let name = p["name"].as_str().unwrap_or("?").to_string();
        let cnt = p.get("run_cnt").and_then(Value::as_u64).unwrap_or(0);
        let ns = p.get("run_time_ns").and_then(Value::as_u64).unwrap_or(0);
        out.insert(name, (cnt, ns));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_kib() {
        let status = "Name:\tweft\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(51200));
        assert_eq!(status_kib(status, "VmRSS"), Some(40960));
        assert_eq!(status_kib(status, "VmSwap"), None);
        assert_eq!(status_kib("VmRSSx:\t1 kB\n", "VmRSS"), None);
    }

    #[test]
    fn cpu_time_is_user_plus_system_ticks() {
        let stat = "2518 (nginx: worker) S 2517 2517 2517 0 -1 4194624 900 0 0 0 173 27 0 0 20 0";
        assert_eq!(cpu_ticks(stat), Some(200));
        assert_eq!(cpu_ticks("2518 (nginx) S 2517"), None);
    }

    #[test]
    fn the_parent_follows_the_state_even_with_parentheses_in_the_name() {
        assert_eq!(parent_of("4242 (nginx) S 4200 4242 4242 0 -1"), Some(4200));
        assert_eq!(parent_of("77 (a b) c)) R 1 77"), Some(1));
        assert_eq!(parent_of("garbage"), None);
    }
}
