//! The registry: what weft knows about the cluster.
//!
//! One immutable [`Snapshot`] of Namespaces (labels), Nodes (addresses), Pods, Services and, kept
//! raw for later stages, every other kind (Istio, Gateway API, …). A change builds a whole new
//! snapshot and swaps it in atomically; readers take an `Arc` and never see a half-applied change.
//!
//! - [`model`]: the compact types and the queries the data path asks ([`Snapshot::resolve`],
//!   [`Snapshot::endpoints`], [`Snapshot::pod_by_ip`], …).
//! - [`build`]: Kubernetes objects (k8s-openapi types) → model, with semantic checks. Every source
//!   feeds this same builder.
//! - [`load`]: Kubernetes-shaped YAML, a file or a directory of `*.yaml`/`*.yml` files. A bad
//!   document fails the whole load with `file:line: document N (Kind ns/name): field.path: reason`.
//! - [`cgroup`]: pod → cgroup directory and id under the kubelet layouts; [`WorkloadIndex`] maps
//!   the cgroup ids the eBPF programs report back to pods.
//!
//! [`Registry`] holds the current snapshot, re-reads the files when they change (inotify on the
//! parent directory, so rename-on-save and ConfigMap symlink swaps are seen, plus a slow mtime
//! poll), keeps the last good snapshot when a reload fails and tells subscribers about new ones.

pub mod build;
pub mod cgroup;
pub mod load;
pub mod model;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use build::{FieldError, Object, ObjectKey, SnapshotBuilder};
pub use cgroup::{cgroup_id, pod_cgroup_paths, WorkloadEntry, WorkloadIndex};
pub use load::{LoadError, LoadErrors};
pub use model::{
    ContainerPort, Destination, Endpoint, Labels, Node, Pod, QosClass, RawObject, Service,
    ServicePort, Snapshot, SnapshotSummary, TargetPort, ENROLL_LABEL, ENROLL_VALUE,
};

/// The current snapshot, its source and its subscribers.
pub struct Registry {
    source: Option<PathBuf>,
    current: ArcSwap<Snapshot>,
    tx: watch::Sender<Arc<Snapshot>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    generation: u64,
    /// Fingerprint of the sources of the current snapshot.
    fingerprint: Option<u64>,
    /// The most recent failed reload (fingerprint of what was read, if it could be read).
    failed: Option<(Option<u64>, LoadErrors)>,
}

/// Timing of [`Registry::spawn_watcher_with`].
#[derive(Debug, Clone, Copy)]
pub struct WatchConfig {
    /// Quiet time after a file event before reloading (editors write in several steps).
    pub debounce: Duration,
    /// How often mtimes are compared, in case an event was missed.
    pub poll_interval: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            debounce: Duration::from_millis(200),
            poll_interval: Duration::from_secs(5),
        }
    }
}

impl Registry {
    /// Loads `path` (a file or a directory). The first load must succeed.
    pub fn load(path: impl Into<PathBuf>) -> Result<Registry, LoadErrors> {
        let source = path.into();
        let files = load::read_sources(&source)?;
        let fingerprint = load::fingerprint(&files);
        let builder = load::parse_sources(&files)?;
        let snapshot = builder.build(1, files.into_iter().map(|f| f.path).collect());
        let registry = Registry::new(Some(source), snapshot);
        registry.lock().fingerprint = Some(fingerprint);
        Ok(registry)
    }

    /// A registry without source, serving `snapshot` (its reload does nothing).
    pub fn from_snapshot(snapshot: Snapshot) -> Registry {
        Registry::new(None, snapshot)
    }

    fn new(source: Option<PathBuf>, snapshot: Snapshot) -> Registry {
        let generation = snapshot.generation;
        let snapshot = Arc::new(snapshot);
        Registry {
            source,
            current: ArcSwap::new(snapshot.clone()),
            tx: watch::Sender::new(snapshot),
            state: Mutex::new(State {
                generation,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file or directory the registry reads, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The errors of the most recent reload if it failed (one per line); cleared by a good one.
    pub fn last_error(&self) -> Option<String> {
        self.lock().failed.as_ref().map(|(_, e)| e.to_string())
    }

    /// Re-reads the source. `Ok(true)`: a new snapshot is published; `Ok(false)`: nothing changed.
    /// On error the current snapshot stays.
    pub fn reload(&self) -> Result<bool, LoadErrors> {
        let Some(source) = &self.source else {
            return Ok(false);
        };
        // Reading and parsing happen without the lock, so `last_error()` (admin API, metrics)
        // never waits for a large registry to parse.
        let files = match load::read_sources(source) {
            Ok(files) => files,
            Err(e) => {
                self.lock().failed = Some((None, e.clone()));
                return Err(e);
            }
        };
        let fingerprint = load::fingerprint(&files);
        {
            let mut state = self.lock();
            if state.fingerprint == Some(fingerprint) {
                state.failed = None;
                return Ok(false);
            }
            if let Some((Some(failed), errors)) = &state.failed {
                if *failed == fingerprint {
                    return Err(errors.clone());
                }
            }
        }
        let parsed = load::parse_sources(&files);
        let mut state = self.lock();
        match parsed {
            Ok(builder) => {
                state.generation += 1;
                let sources = files.into_iter().map(|f| f.path).collect();
                self.swap(builder.build(state.generation, sources));
                state.fingerprint = Some(fingerprint);
                state.failed = None;
                Ok(true)
            }
            Err(e) => {
                state.failed = Some((Some(fingerprint), e.clone()));
                Err(e)
            }
        }
    }

    /// Publishes a snapshot built elsewhere (another source), with the next generation.
    pub fn publish(&self, builder: SnapshotBuilder, sources: Vec<PathBuf>) -> Arc<Snapshot> {
        let mut state = self.lock();
        state.generation += 1;
        state.fingerprint = None;
        state.failed = None;
        self.swap(builder.build(state.generation, sources))
    }

    fn swap(&self, snapshot: Snapshot) -> Arc<Snapshot> {
        let snapshot = Arc::new(snapshot);
        self.current.store(snapshot.clone());
        self.tx.send_replace(snapshot.clone());
        snapshot
    }

    /// Watches the source with the default [`WatchConfig`]; see [`Registry::spawn_watcher_with`].
    pub fn spawn_watcher(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        self.spawn_watcher_with(WatchConfig::default())
    }

    /// Reloads when the source changes, until the task is aborted. Failures are logged (once per
    /// distinct content) and the last good snapshot stays. Needs a Tokio runtime.
    pub fn spawn_watcher_with(self: Arc<Self>, config: WatchConfig) -> tokio::task::JoinHandle<()> {
        tokio::spawn(watch_loop(self, config))
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("source", &self.source)
            .field("generation", &self.current.load().generation)
            .finish_non_exhaustive()
    }
}

/// Modification stamps of the source files (and of the directory itself), for polling.
type Stamp = Vec<(PathBuf, Option<(SystemTime, u64, u64)>)>;

fn stamp(source: &Path) -> Stamp {
    let meta = |p: &Path| {
        std::fs::metadata(p).ok().map(|m| {
            (
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
                m.ino(),
            )
        })
    };
    let mut out = vec![(source.to_path_buf(), meta(source))];
    if source.is_dir() {
        for file in load::source_files(source).unwrap_or_default() {
            let m = meta(&file);
            out.push((file, m));
        }
    }
    out
}

/// The inotify side: a non-recursive watch on the directory holding the source (the source
/// itself when it is a directory), re-armed when that directory is replaced.
struct FsWatch {
    dir: PathBuf,
    /// For a file source, its name: events about other files of the directory are ignored.
    file_name: Option<std::ffi::OsString>,
    tx: mpsc::UnboundedSender<()>,
    watcher: Option<notify::RecommendedWatcher>,
    /// (device, inode) of `dir` when the watch was set.
    armed_on: Option<(u64, u64)>,
}

impl FsWatch {
    fn new(source: &Path, tx: mpsc::UnboundedSender<()>) -> FsWatch {
        let (dir, file_name) = if source.is_dir() {
            (source.to_path_buf(), None)
        } else {
            let dir = match source.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            (dir, source.file_name().map(|n| n.to_os_string()))
        };
        let mut w = FsWatch {
            dir,
            file_name,
            tx,
            watcher: None,
            armed_on: None,
        };
        w.arm();
        w
    }

    fn identity(&self) -> Option<(u64, u64)> {
        std::fs::metadata(&self.dir)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    }

    /// (Re)creates the watch if there is none or the directory was replaced.
    fn arm(&mut self) {
        let identity = self.identity();
        if self.watcher.is_some() && identity == self.armed_on {
            return;
        }
        self.watcher = None;
        self.armed_on = None;
        let Some(identity) = identity else { return };
        let tx = self.tx.clone();
        let file_name = self.file_name.clone();
        let handler = move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if relevant(&event, file_name.as_deref()) {
                let _ = tx.send(());
            }
        };
        use notify::Watcher as _;
        let watcher = notify::recommended_watcher(handler).and_then(|mut w| {
            w.watch(&self.dir, notify::RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        match watcher {
            Ok(w) => {
                debug!(dir = %self.dir.display(), "registry: watching");
                self.watcher = Some(w);
                self.armed_on = Some(identity);
            }
            Err(e) => warn!(
                dir = %self.dir.display(),
                "registry: cannot watch ({e}), polling only"
            ),
        }
    }
}

/// Whether a file event may change the source: not a mere open/read; for a file source, about
/// that file or a `..`-prefixed entry (a ConfigMap volume swapping its `..data` link).
fn relevant(event: &notify::Event, file_name: Option<&std::ffi::OsStr>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    let Some(name) = file_name else { return true };
    event.paths.is_empty()
        || event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| n == name || n.as_encoded_bytes().starts_with(b".."))
        })
}

async fn watch_loop(registry: Arc<Registry>, config: WatchConfig) {
    let Some(source) = registry.source.clone() else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut fs_watch = FsWatch::new(&source, tx);
    let mut last_stamp = stamp(&source);
    let mut logged: Option<String> = None;
    // Changes between the first load and now had no watch to see them.
    reload_and_log(&registry, &mut logged).await;
    let mut poll = tokio::time::interval(config.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await;
    let mut deadline: Option<Instant> = None;
    loop {
        let sleep = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now));
        tokio::select! {
            Some(()) = rx.recv() => {
                deadline = Some(Instant::now() + config.debounce);
            }
            () = sleep, if deadline.is_some() => {
                deadline = None;
                last_stamp = stamp(&source);
                reload_and_log(&registry, &mut logged).await;
            }
            _ = poll.tick() => {
                fs_watch.arm();
                let now = stamp(&source);
                if now != last_stamp {
                    last_stamp = now;
                    reload_and_log(&registry, &mut logged).await;
                }
            }
        }
    }
}

async fn reload_and_log(registry: &Arc<Registry>, logged: &mut Option<String>) {
    let r = registry.clone();
    let result = match tokio::task::spawn_blocking(move || r.reload()).await {
        Ok(result) => result,
        Err(e) => {
            warn!("registry: reload task failed: {e}");
            return;
        }
    };
    match result {
        Ok(true) => {
            *logged = None;
            let s = registry.snapshot();
            info!(
                generation = s.generation,
                pods = s.pods.len(),
                services = s.services.len(),
                others = s.others.len(),
                "registry: reloaded"
            );
        }
        Ok(false) => *logged = None,
        Err(errors) => {
            let text = errors.to_string();
            if logged.as_deref() != Some(text.as_str()) {
                let generation = registry.snapshot().generation;
                for e in errors.iter() {
                    warn!("registry: {e}");
                }
                warn!(
                    errors = errors.len(),
                    "registry: reload failed, keeping generation {generation}"
                );
                *logged = Some(text);
            }
        }
    }
}

#[cfg(test)]
mod tests;
