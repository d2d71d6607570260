//! The YAML files as a live source: [`FileSource`] loads them into the [`Registry`], re-reads
//! them when they change (inotify on the parent directory, so rename-on-save and ConfigMap
//! symlink swaps are seen, plus a slow mtime poll), and keeps the last good snapshot in force
//! when a reload fails.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{fingerprint, parse_sources, read_sources, source_files, LoadErrors};
use crate::registry::kube::RELEASE_AFTER;
use crate::registry::{Conversion, ObjectKey, Registry};

/// Timing of [`FileSource::spawn_watcher_with`].
#[derive(Debug, Clone, Copy)]
pub struct WatchConfig {
    /// Quiet time after a file event before reloading (editors write in several steps).
    pub debounce: Duration,
    /// How often mtimes are compared, in case an event was missed.
    pub poll_interval: Duration,
    /// Quiet time after a reload before what it freed, and the code only it ran, are handed
    /// back ([`crate::memory::release`]).
    pub release_after: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            debounce: Duration::from_millis(200),
            poll_interval: Duration::from_secs(5),
            release_after: RELEASE_AFTER,
        }
    }
}

/// A file or directory of YAML feeding a [`Registry`].
pub struct FileSource {
    path: PathBuf,
    registry: Arc<Registry>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Fingerprint of the files of the snapshot in force.
    fingerprint: Option<u64>,
    /// Fingerprint of what the most recent failed reload read (if it could be read).
    failed: Option<Option<u64>>,
    /// The objects in force, for the next load's invalid objects to fall back to.
    good: Arc<HashMap<ObjectKey, Conversion>>,
}

impl FileSource {
    /// Loads `path` (a file or a directory) into a new registry. The first load must succeed.
    pub fn load(path: impl Into<PathBuf>) -> Result<FileSource, LoadErrors> {
        let path = path.into();
        let files = read_sources(&path)?;
        let fingerprint = fingerprint(&files);
        let parsed = parse_sources(&files, &HashMap::new());
        let good = Arc::new(parsed.good);
        let snapshot = parsed
            .builder
            .build(1, files.into_iter().map(|f| f.path).collect());
        log_problems(&snapshot);
        Ok(FileSource {
            path,
            registry: Arc::new(Registry::new(snapshot)),
            state: Mutex::new(State {
                fingerprint: Some(fingerprint),
                failed: None,
                good,
            }),
        })
    }

    /// The registry this source feeds.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Re-reads the files. `Ok(true)`: a new snapshot is published; `Ok(false)`: nothing
    /// changed. On error the snapshot in force stays and the registry reports the error.
    pub fn reload(&self) -> Result<bool, LoadErrors> {
        // Reading and parsing happen without the lock, so `last_error()` (admin API, metrics)
        // never waits for a large registry to parse.
        let files = match read_sources(&self.path) {
            Ok(files) => files,
            Err(e) => {
                self.state.lock().failed = Some(None);
                self.registry.set_error(Some(e.clone()));
                return Err(e);
            }
        };
        let fingerprint = fingerprint(&files);
        let previous = {
            let state = self.state.lock();
            if state.fingerprint == Some(fingerprint) {
                drop(state);
                self.state.lock().failed = None;
                self.registry.set_error(None);
                return Ok(false);
            }
            if state.failed == Some(Some(fingerprint)) {
                if let Some(errors) = self.registry.error() {
                    return Err(errors);
                }
            }
            state.good.clone()
        };
        let parsed = parse_sources(&files, &previous);
        let mut state = self.state.lock();
        state.good = Arc::new(parsed.good);
        let sources = files.into_iter().map(|f| f.path).collect();
        let snapshot = self.registry.publish(parsed.builder, sources);
        log_problems(&snapshot);
        state.fingerprint = Some(fingerprint);
        state.failed = None;
        Ok(true)
    }

    /// The registry of `path`, loaded and then watched (default [`WatchConfig`]): what `weft
    /// node` and `weft ca serve` read without Kubernetes. Needs a Tokio runtime.
    pub fn watched(path: &Path) -> anyhow::Result<Arc<Registry>> {
        let source = Arc::new(
            FileSource::load(path)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .map_err(|e| e.context(format!("loading the registry {}", path.display())))?,
        );
        let registry = source.registry().clone();
        source.spawn_watcher();
        Ok(registry)
    }

    /// Watches the files with the default [`WatchConfig`]; see [`FileSource::spawn_watcher_with`].
    pub fn spawn_watcher(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        self.spawn_watcher_with(WatchConfig::default())
    }

    /// Reloads when the files change, until the task is aborted. Failures are logged (once per
    /// distinct content) and the last good snapshot stays. Needs a Tokio runtime.
    pub fn spawn_watcher_with(self: Arc<Self>, config: WatchConfig) -> tokio::task::JoinHandle<()> {
        tokio::spawn(watch_loop(self, config))
    }
}

/// Each object left out, and each warning, one line.
fn log_problems(snapshot: &crate::registry::Snapshot) {
    for item in &snapshot.not_applied {
        warn!("registry: not applied: {item}");
    }
    for item in &snapshot.warnings {
        warn!("registry: {item}");
    }
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .field("registry", &self.registry)
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
        for file in source_files(source).unwrap_or_default() {
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

async fn watch_loop(source: Arc<FileSource>, config: WatchConfig) {
    let path = source.path.clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut fs_watch = FsWatch::new(&path, tx);
    let mut last_stamp = stamp(&path);
    let mut logged: Option<String> = None;
    // Changes between the first load and now had no watch to see them.
    reload_and_log(&source, &mut logged).await;
    let mut poll = tokio::time::interval(config.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await;
    let mut deadline: Option<Instant> = None;
    // When to hand back what the reloads freed, and the code only they ran ([`crate::memory`]).
    let mut release_at: Option<Instant> = None;
    loop {
        let sleep = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now));
        let release = tokio::time::sleep_until(release_at.unwrap_or_else(Instant::now));
        tokio::select! {
            Some(()) = rx.recv() => {
                deadline = Some(Instant::now() + config.debounce);
            }
            () = sleep, if deadline.is_some() => {
                deadline = None;
                last_stamp = stamp(&path);
                if reload_and_log(&source, &mut logged).await {
                    release_at = Some(Instant::now() + config.release_after);
                }
            }
            () = release, if release_at.is_some() => {
                release_at = None;
                crate::memory::release();
            }
            _ = poll.tick() => {
                fs_watch.arm();
                let now = stamp(&path);
                if now != last_stamp {
                    last_stamp = now;
                    if reload_and_log(&source, &mut logged).await {
                        release_at = Some(Instant::now() + config.release_after);
                    }
                }
            }
        }
    }
}

/// Reloads the files and logs the outcome; whether they had changed (a new snapshot, or errors
/// to report), so the reload built and dropped things.
async fn reload_and_log(source: &Arc<FileSource>, logged: &mut Option<String>) -> bool {
    let r = source.clone();
    let registry = &source.registry;
    let result = match tokio::task::spawn_blocking(move || r.reload()).await {
        Ok(result) => result,
        Err(e) => {
            warn!("registry: reload task failed: {e}");
            return false;
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
                routes = s.virtual_services.len() + s.http_routes.len() + s.grpc_routes.len(),
                destination_rules = s.destination_rules.len(),
                service_entries = s.service_entries.len(),
                others = s.others.len(),
                "registry: reloaded"
            );
            true
        }
        Ok(false) => {
            *logged = None;
            false
        }
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
            true
        }
    }
}
