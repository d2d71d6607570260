//! Processes started inside a pod or on a node: join the cgroup first, then enter the netns.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default time limit of `output()`.
pub const DEFAULT_OUTPUT_TIMEOUT: Duration = Duration::from_secs(60);

/// The per-test log directory and the log files written there.
#[derive(Debug)]
pub(crate) struct Logs {
    pub dir: PathBuf,
    files: Mutex<Vec<PathBuf>>,
    seq: AtomicU32,
}

impl Logs {
    pub fn new(dir: PathBuf) -> Result<Logs> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Logs {
            dir,
            files: Mutex::new(Vec::new()),
            seq: AtomicU32::new(0),
        })
    }

    fn register(&self, p: PathBuf) {
        self.files.lock().unwrap().push(p);
    }

    pub fn files(&self) -> Vec<PathBuf> {
        self.files.lock().unwrap().clone()
    }

    fn next(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn commands_log(&self) -> PathBuf {
        self.dir.join("commands.log")
    }

    fn append_command(&self, text: &str) {
        let p = self.commands_log();
        let first = !p.exists();
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&p) {
            let _ = f.write_all(text.as_bytes());
        }
        if first {
            self.register(p);
        }
    }

    /// The last `n` lines of every log file, for failure reports.
    pub fn tails(&self, n: usize) -> String {
        let mut out = String::new();
        for f in self.files() {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            if text.trim().is_empty() {
                continue;
            }
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            out.push_str(&format!(
                "----- {} (last {} lines) -----\n",
                f.display(),
                lines.len() - start
            ));
            for l in &lines[start..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// Where a process goes: a cgroup (leaf) and a network namespace.
pub(crate) struct Place<'a> {
    pub cgroup: &'a Path,
    pub netns: &'a str,
    /// Short label for log names (`node-a`, `default.client`).
    pub label: &'a str,
}

/// Arrange for the child to join `place.cgroup`, then enter `place.netns`, before exec.
fn prepare(place: &Place<'_>, cmd: &mut Command) -> Result<(File, File)> {
    let procs = place.cgroup.join("cgroup.procs");
    let cg = OpenOptions::new()
        .write(true)
        .open(&procs)
        .with_context(|| format!("opening {}", procs.display()))?;
    let ns_path = crate::netns::netns_path(place.netns);
    let ns = File::open(&ns_path).with_context(|| format!("opening {}", ns_path.display()))?;
    let (cg_fd, ns_fd) = (cg.as_raw_fd(), ns.as_raw_fd());
    // SAFETY: the closure only makes async-signal-safe syscalls (write, setns) on fds that stay
    // open in the parent until spawn() returns; both are O_CLOEXEC so the program does not inherit
    // them.
    unsafe {
        cmd.pre_exec(move || {
            // "0" = the writing process: the child moves itself into the cgroup …
            if libc::write(cg_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            // … and only then enters the network namespace.
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok((cg, ns))
}

/// A copy of the caller's command (program, args, env changes, cwd), so that the caller's
/// `Command` never carries our pre_exec hook (whose fds are closed after spawning) and can be
/// reused. `env_clear()`, stdio and hooks set by the caller are not carried over.
fn copy_command(cmd: &Command) -> Command {
    let mut c = Command::new(cmd.get_program());
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c
}

fn program_name(cmd: &Command) -> String {
    let p = Path::new(cmd.get_program());
    let name = p
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "proc".into());
    let first_arg = cmd
        .get_args()
        .next()
        .map(|a| a.to_string_lossy().into_owned())
        .filter(|a| !a.starts_with('-') && a.len() <= 16 && !a.contains('/'));
    match first_arg {
        Some(a) => format!("{name}-{a}"),
        None => name,
    }
}

pub(crate) fn spawn(logs: &Logs, place: &Place<'_>, cmd: &Command) -> Result<Proc> {
    spawn_as(logs, place, cmd, false)
}

/// Like [`spawn`], in a process group of its own that is killed as a whole: for servers that
/// fork (dnsmasq answers DNS over TCP in children).
pub(crate) fn spawn_group(logs: &Logs, place: &Place<'_>, cmd: &Command) -> Result<Proc> {
    spawn_as(logs, place, cmd, true)
}

fn spawn_as(logs: &Logs, place: &Place<'_>, cmd: &Command, group: bool) -> Result<Proc> {
    let mut cmd = copy_command(cmd);
    if group {
        cmd.process_group(0);
    }
    let n = logs.next();
    let base = format!("{n:03}-{}-{}", place.label, program_name(&cmd));
    let stdout_path = logs.dir.join(format!("{base}.stdout"));
    let stderr_path = logs.dir.join(format!("{base}.stderr"));
    let out = File::create(&stdout_path)?;
    let err = File::create(&stderr_path)?;
    let mut header = File::create(logs.dir.join(format!("{base}.cmd")))?;
    let _ = writeln!(
        header,
        "{cmd:?}\n# cgroup {}\n# netns {}",
        place.cgroup.display(),
        place.netns
    );
    logs.register(stdout_path.clone());
    logs.register(stderr_path.clone());
    let _guard = prepare(place, &mut cmd)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("spawning {cmd:?} in {}", place.label))?;
    Ok(Proc {
        child,
        label: base,
        stdout_path,
        stderr_path,
        group,
    })
}

pub(crate) fn output(
    logs: &Logs,
    place: &Place<'_>,
    cmd: &Command,
    timeout: Duration,
) -> Result<Output> {
    let mut cmd = copy_command(cmd);
    let started = Instant::now();
    let guard = prepare(place, &mut cmd)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?} in {}", place.label))?;
    drop(guard);
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = wait_deadline(&mut child, started + timeout)?;
    let timed_out = status.is_none();
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            child.wait()?
        }
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    logs.append_command(&format!(
        "[{}] {cmd:?} -> {status} in {:?}{}\n{}{}",
        place.label,
        started.elapsed(),
        if timed_out {
            " (TIMED OUT, killed)"
        } else {
            ""
        },
        indent("stdout", &stdout),
        indent("stderr", &stderr),
    ));
    if timed_out {
        bail!(
            "{cmd:?} in {} timed out after {timeout:?}; stdout: {} stderr: {}",
            place.label,
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn indent(what: &str, bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let text = String::from_utf8_lossy(bytes);
    let mut s = String::new();
    for l in text.lines().take(50) {
        s.push_str(&format!("  {what}| {l}\n"));
    }
    s
}

fn wait_deadline(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A process started by the harness in a pod or on a node. Killed (SIGKILL) and reaped on drop.
/// Its stdout and stderr go to files in the cluster's log directory.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    label: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    /// Leads a process group of its own, killed with it.
    group: bool,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Log base name (`003-node-a-weft-node`).
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Wait until stdout or stderr contains `needle`; fails early if the process exits.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return Ok(());
            }
            if let Some(s) = self.try_wait()? {
                bail!(
                    "{} exited ({s}) before printing {needle:?}; stderr: {}",
                    self.label,
                    self.stderr()
                );
            }
            if Instant::now() >= deadline {
                bail!("{} did not print {needle:?} within {timeout:?}", self.label);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait for the process to exit, at most `timeout`; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        wait_deadline(&mut self.child, Instant::now() + timeout)
    }

    /// Send a signal (e.g. `libc::SIGTERM`) without waiting.
    pub fn signal(&self, sig: i32) -> Result<()> {
        // SAFETY: plain kill(2) on our own unreaped child (its pid cannot have been reused).
        if unsafe { libc::kill(self.child.id() as i32, sig) } != 0 {
            bail!(
                "kill({}, {sig}): {}",
                self.pid(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGKILL (the whole process group, for one started in its own) and reap. Idempotent.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            if self.group {
                // SAFETY: kill(2) on the group our unreaped child leads (its id cannot have
                // been reused while the child is not reaped).
                unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
