//! A Kubernetes API server stand-in that speaks the real protocol, for tests of weft's
//! Kubernetes registry source (kube-rs watchers and reflectors) and for `kubectl`.
//!
//! [`ApiServer::start`] serves HTTP/1.1 (and HTTP/2 with prior knowledge) on a listener the
//! caller bound, from a tokio runtime of its own, so sync test code can drive it. The control
//! API ([`ApiServer::apply`], [`ApiServer::sync`], [`ApiServer::compact`], [`ApiServer::stop`],
//! …) changes what clients see, as a cluster and its etcd would.
//!
//! # Served
//!
//! core `v1` namespaces, nodes (cluster-scoped), pods, services, events; `events.k8s.io/v1`
//! events; `discovery.k8s.io/v1` endpointslices; `apiextensions.k8s.io/v1`
//! customresourcedefinitions; and as custom resources: `security.istio.io` (`v1`, `v1beta1`)
//! authorizationpolicies, peerauthentications; `networking.istio.io` (`v1`, `v1beta1`,
//! `v1alpha3`) virtualservices, destinationrules, serviceentries; `gateway.networking.k8s.io`
//! httproutes (`v1`, `v1beta1`) and grpcroutes (`v1`, `v1alpha2`); and `authentication.k8s.io/v1`
//! tokenreviews (create only) for the ServiceAccount tokens a test registers
//! ([`ApiServer::add_service_account_token`], see `tokenreview.rs` for what is answered).
//!
//! # Faithful to kube-apiserver
//!
//! - Paths (`/api/v1/...`, `/apis/<g>/<v>/...`, `namespaces/<ns>/...`, `/status`, legacy
//!   `/watch/`), verbs (get, list, watch, create, update, patch, delete, deletecollection) and
//!   discovery (`/version`, `/api`, `/api/v1`, `/apis`, `/apis/<g>`, `/apis/<g>/<v>`: legacy
//!   discovery documents; clients asking for aggregated discovery fall back to them).
//! - One global resourceVersion counter (etcd's revision) over all types; every version of a
//!   type reads and writes one storage, objects come back with the `apiVersion` of the URL.
//! - Lists: `{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"N"},"items":[…]}`,
//!   items of built-in types without `kind`/`apiVersion`, custom resources with them; `limit`
//!   and `continue` (etcd3's token: base64url of `{"v":"meta.k8s.io/v1","rv":N,"start":…}`,
//!   pages of one snapshot, `remainingItemCount` without selectors); a token older than the
//!   history: 410 `Expired` with the inconsistent-continue message and a fresh token;
//!   `resourceVersion` ""/"0"/N with `resourceVersionMatch` (Exact, NotOlderThan, legacy exact
//!   when paginating), 410 for an exact version older than the history, 504 "Too large
//!   resource version"; `ValidateListOptions`' 422 answers.
//! - Label selectors (`=`, `==`, `!=`, `in`, `notin`, existence, `!key`, `>`, `<`) and field
//!   selectors (`metadata.name`, `metadata.namespace`, and per type e.g. `spec.nodeName`,
//!   `status.phase`, `status.podIP` for pods; 400 "field label not supported" otherwise) on
//!   lists and watches; a watch sees an object leaving its selector as `DELETED` and entering
//!   it as `ADDED`, as the watch cache reports them.
//! - Watches: chunked newline-delimited `{"type","object"}` events whose objects carry `kind`
//!   and `apiVersion`; `DELETED` carries the last state with the deletion's resourceVersion;
//!   `BOOKMARK` `{"kind","apiVersion","metadata":{"resourceVersion"}}` every bookmark interval
//!   with `allowWatchBookmarks` (1 s by default here, see [`ApiServer::set_bookmark_interval`];
//!   about a minute in the real server); `resourceVersion` ""/"0" starts with the state as
//!   `ADDED`; older than the history: a 200 whose only event is `ERROR` 410 `Expired` "too old
//!   resource version: X (Y)"; `timeoutSeconds` ends the stream cleanly; streaming lists
//!   (`sendInitialEvents=true` + `resourceVersionMatch=NotOlderThan`, the WatchList feature) send
//!   the state, then a bookmark annotated `k8s.io/initial-events-end: "true"`.
//! - Writes: create assigns uid, resourceVersion, creationTimestamp, `generation` for custom
//!   resources (counting spec changes), the namespace from the URL, `generateName`; 409
//!   AlreadyExists, 409 Conflict on a stale `metadata.resourceVersion` or delete precondition,
//!   404 for a missing namespace (NamespaceLifecycle), 422 for invalid names; an update that
//!   changes nothing writes nothing (no new resourceVersion, no event); main resources keep the
//!   stored `status`, `/status` writes only it; namespaces get the `kubernetes.io/metadata.name`
//!   label; the system namespaces cannot be deleted (403); DELETE answers the object for pods,
//!   services, namespaces and CRDs, a `Status` `Success` with details otherwise.
//! - PATCH: `application/merge-patch+json`, `application/json-patch+json`,
//!   `application/strategic-merge-patch+json` and `application/apply-patch+yaml` (see below);
//!   others 415.
//! - `Accept: application/json;as=Table;g=meta.k8s.io;v=v1` answers a `Table` (what `kubectl
//!   get` prints; the Istio and Gateway API types with their CRDs' printer columns) and
//!   `as=PartialObjectMetadata[List]` metadata only (kube-rs `metadata_watcher`).
//! - Errors are `Status` objects (`{"kind":"Status","apiVersion":"v1","metadata":{},"status":
//!   "Failure","message","reason","details","code"}`); a path nothing serves, including a custom
//!   type whose CRD is not installed, answers the `notfoundhandler`'s 404 `Status`, and
//!   discovery leaves that type (and a group left empty) out.
//! - CRD installation is CRD objects: [`ApiServer::set_installed`] creates or deletes the CRDs of
//!   a group, and a client may do the same through `/apis/apiextensions.k8s.io/v1`.
//!
//! # Simplified
//!
//! - Only JSON (and YAML request bodies): no protobuf, no CBOR. Request bodies in another format
//!   get 415, so kubectl's generator commands that send protobuf (`kubectl create namespace
//!   NAME`, `kubectl run`) fail: use `kubectl apply -f`. No OpenAPI: `/openapi/v2` and
//!   `/openapi/v3` answer 404, so `kubectl apply` needs `--validate=false` (kubectl's schema
//!   validation downloads them).
//! - No authentication or authorization: any `Authorization` header is accepted and ignored.
//!   TokenReview knows only the tokens registered with [`ApiServer::add_service_account_token`]
//!   (no JWTs, no expiry, no ServiceAccount objects).
//! - No admission or validation beyond the above; no defaulting of pods or services; no
//!   `managedFields`.
//! - Strategic merge patch is a JSON merge patch (lists are replaced, not merged by key:
//!   enough for labels and annotations); server-side apply merges the applied configuration
//!   the same way (no field ownership, no conflicts).
//! - Deletion is immediate: no graceful pod deletion (no kubelet), no finalizers; deleting a
//!   namespace deletes its objects at once. Custom resources are kept (hidden) while their CRD
//!   is not installed, and come back with it.
//! - `events.k8s.io/v1` events have a storage of their own (the real server converts them to
//!   core events).
//! - The history is kept until [`ApiServer::compact`] (or past 100 000 changes); a list at an
//!   older version is rebuilt from it. Compaction also ends every open watch with `ERROR` 410,
//!   which the real server does not do for watches that are up to date: it is the stand-in's
//!   way to make clients re-list.
//! - A watch from a resourceVersion newer than the server's answers 504 at once (the real one
//!   first waits up to 3 s).
//! - The `kubernetes` Service and its endpoints are not created.

mod http;
mod patch;
mod resources;
mod selectors;
mod status;
mod store;
mod table;
mod tokenreview;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use resources::{ResId, RESOURCES, SYNCED_KINDS, SYSTEM_NAMESPACES};
use store::Store;
use tokenreview::Tokens;
pub use tokenreview::{TokenInfo, API_AUDIENCES};

/// How many requests the log keeps (the oldest half is dropped past it).
pub(crate) const MAX_LOGGED: usize = 100_000;

/// The bookmark interval watches start with.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// A mutex guard, also from a mutex a panicking thread left poisoned.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the HTTP side and the control API share.
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    /// The ServiceAccount tokens TokenReview knows.
    pub tokens: Mutex<Tokens>,
    /// (verb, path and query) of the requests, in arrival order (the last `MAX_LOGGED`).
    pub requests: Mutex<Vec<(String, String)>>,
    pub address: Mutex<SocketAddr>,
    bookmark_ms: AtomicU64,
    /// Open connections' sockets, shut down by `stop`.
    conns: Mutex<HashMap<u64, RawFd>>,
    next_conn: AtomicU64,
    /// Bumped by `stop`: every connection task ends.
    kill: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    pub fn bookmark_interval(&self) -> Duration {
        Duration::from_millis(self.bookmark_ms.load(Ordering::Relaxed).max(1))
    }
}

/// A connection's socket, registered while it is open. Dropping it leaves the registry first,
/// then closes the socket, so `stop` never shuts down a descriptor number reused by someone else.
struct Tracked {
    stream: tokio::net::TcpStream,
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.shared.conns).remove(&self.id);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The serving state: the accept task and its listening socket.
struct Running {
    accept: tokio::task::AbortHandle,
    listener_fd: RawFd,
}

/// The API server stand-in. Dropping it stops it.
pub struct ApiServer {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    /// The listener's network namespace, to listen there again after `stop`.
    netns: Option<File>,
    running: Mutex<Option<Running>>,
}

/// `SIOCGSKNS` (linux/sockios.h): a socket's network namespace as a file descriptor.
const SIOCGSKNS: libc::c_ulong = 0x894C;

fn socket_netns(fd: RawFd) -> Option<File> {
    // SAFETY: the ioctl takes no argument and returns a new descriptor (or -1).
    let ns = unsafe { libc::ioctl(fd, SIOCGSKNS as _) };
    // SAFETY: a fresh descriptor we own.
    (ns >= 0).then(|| unsafe { File::from_raw_fd(ns) })
}

fn same_file(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Binds `addr` in network namespace `netns` (from a thread that enters it when it is not the
/// caller's).
fn bind_in(addr: SocketAddr, netns: Option<&File>) -> Result<TcpListener> {
    let here = File::open("/proc/thread-self/ns/net").ok();
    match (netns, here) {
        (Some(ns), Some(here)) if !same_file(ns, &here) => std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this (scoped, short-lived) thread with a valid descriptor.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                TcpListener::bind(addr).with_context(|| format!("bind {addr}"))
            })
            .join()
            .map_err(|_| anyhow!("bind thread panicked"))?
        }),
        _ => TcpListener::bind(addr).with_context(|| format!("bind {addr}")),
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                // Out of descriptors and the like: wait, never close the listener by returning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        lock(&shared.conns).insert(id, stream.as_raw_fd());
        let io = hyper_util::rt::TokioIo::new(Tracked {
            stream,
            id,
            shared: shared.clone(),
        });
        let mut kill = shared.kill.subscribe();
        let svc_shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let s = svc_shared.clone();
                async move { Ok::<_, Infallible>(http::handle(s, req).await) }
            });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(io, svc);
            tokio::select! {
                _ = conn => {}
                _ = kill.changed() => {}
            }
        });
    }
}

/// An object's `apiVersion`, `kind`, namespace and name, for messages.
fn describe(obj: &Value) -> String {
    let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or_default();
    format!(
        "{} {} {}/{}",
        s("/apiVersion"),
        s("/kind"),
        s("/metadata/namespace"),
        s("/metadata/name")
    )
}

impl ApiServer {
    /// Serves on `listener` (bound by the caller, possibly inside another network namespace)
    /// from a runtime of its own.
    pub fn start(listener: TcpListener) -> Result<ApiServer> {
        let addr = listener.local_addr()?;
        let netns = socket_netns(listener.as_raw_fd());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("weft-apiserver")
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            tokens: Mutex::new(Tokens::default()),
            requests: Mutex::new(Vec::new()),
            address: Mutex::new(addr),
            bookmark_ms: AtomicU64::new(DEFAULT_BOOKMARK_INTERVAL.as_millis() as u64),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            kill: tokio::sync::watch::Sender::new(0),
        });
        let server = ApiServer {
            shared,
            runtime: Some(runtime),
            addr,
            netns,
            running: Mutex::new(None),
        };
        server.serve(listener)?;
        Ok(server)
    }

    fn serve(&self, listener: TcpListener) -> Result<()> {
        listener.set_nonblocking(true)?;
        let listener_fd = listener.as_raw_fd();
        let rt = self.runtime.as_ref().expect("runtime");
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let accept = rt
            .spawn(accept_loop(self.shared.clone(), listener))
            .abort_handle();
        *lock(&self.running) = Some(Running {
            accept,
            listener_fd,
        });
        Ok(())
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server: cluster `weft-test` at [`Self::url`], user
    /// `weft-test` with a token (sent by clients, ignored by the server), context `weft-test`
    /// (namespace `default`) current.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: weft-test\n  \
               cluster:\n    \
                 server: {}\n\
             users:\n\
             - name: weft-test\n  \
               user:\n    \
                 token: weft-test-token\n\
             contexts:\n\
             - name: weft-test\n  \
               context:\n    \
                 cluster: weft-test\n    \
                 user: weft-test\n    \
                 namespace: default\n\
             current-context: weft-test\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
    }

    /// Creates or replaces an object by (type, namespace, name); a namespaced object without a
    /// namespace goes to `default`. Writes (and tells watchers) only when the content changed;
    /// uid and creationTimestamp are kept unless `obj` sets them. Returns the stored object.
    pub fn apply(&self, obj: Value) -> Result<Value> {
        let what = describe(&obj);
        let stored = lock(&self.shared.store)
            .put(obj)
            .map_err(|e| anyhow!("apply {what}: {e}"))?;
        Ok((*stored).clone())
    }

    fn resource(api_version: &str, kind: &str) -> Result<ResId> {
        resources::find_kind(api_version, kind)
            .ok_or_else(|| anyhow!("no type {api_version} {kind} is served"))
    }

    /// Deletes an object; `namespace` is ignored for cluster-scoped kinds (`""` means `default`
    /// for namespaced ones). Returns whether it existed.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<bool> {
        let res = Self::resource(api_version, kind)?;
        let ns = if namespace.is_empty() {
            "default"
        } else {
            namespace
        };
        let key = store::key(res, Some(ns), name);
        Ok(lock(&self.shared.store).remove(res, &key).is_some())
    }

    /// Makes the stored objects of every kind in `objects`, and of the built-in kinds the
    /// cluster harness describes (Namespace, Node, Pod, Service, EndpointSlice), equal to
    /// `objects`: creates the new, updates the changed, deletes the missing (except the system
    /// namespaces). Kinds in neither (Events, CRDs unless listed) are left alone.
    pub fn sync(&self, objects: Vec<Value>) -> Result<()> {
        let mut canon = Vec::with_capacity(objects.len());
        for obj in objects {
            let what = describe(&obj);
            canon.push(store::canonical(obj).map_err(|e| anyhow!("sync {what}: {e}"))?);
        }
        let namespaces = resources::find_kind("v1", "Namespace").expect("namespaces");
        let crds = store::crd_res();
        let order = |res: ResId| match res {
            r if r == namespaces => 0,
            r if r == crds => 1,
            _ => 2,
        };
        canon.sort_by_key(|(res, _)| order(*res));
        let mut kinds: BTreeSet<ResId> = SYNCED_KINDS
            .iter()
            .filter_map(|(g, k)| RESOURCES.iter().position(|r| r.group == *g && r.kind == *k))
            .collect();
        let mut wanted: BTreeSet<(ResId, String)> = BTreeSet::new();
        let mut store = lock(&self.shared.store);
        for (res, obj) in canon {
            kinds.insert(res);
            let key = store::key(
                res,
                obj["metadata"]["namespace"].as_str(),
                obj["metadata"]["name"].as_str().unwrap_or_default(),
            );
            wanted.insert((res, key));
            let what = describe(&obj);
            store.put(obj).map_err(|e| anyhow!("sync {what}: {e}"))?;
        }
        let mut kinds: Vec<ResId> = kinds.into_iter().collect();
        kinds.sort_by_key(|&r| std::cmp::Reverse(order(r)));
        for res in kinds {
            let stale: Vec<String> = store
                .objects(res)
                .map(|o| {
                    store::key(
                        res,
                        o["metadata"]["namespace"].as_str(),
                        o["metadata"]["name"].as_str().unwrap_or_default(),
                    )
                })
                .filter(|k| !wanted.contains(&(res, k.clone())))
                .filter(|k| !(res == namespaces && SYSTEM_NAMESPACES.contains(&k.as_str())))
                .collect();
            for k in stale {
                store.remove(res, &k);
            }
        }
        Ok(())
    }

    /// One object (preferred version, with `kind` and `apiVersion`); `namespace` as in
    /// [`Self::delete`].
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = Self::resource(api_version, kind).ok()?;
        let ns = if namespace.is_empty() {
            "default"
        } else {
            namespace
        };
        let key = store::key(res, Some(ns), name);
        lock(&self.shared.store)
            .get(res, &key)
            .map(|o| (**o).clone())
    }

    /// Every object of a kind (`Pod`, `AuthorizationPolicy`, or `Event.events.k8s.io` for a kind
    /// several groups serve), in key order.
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let Some(res) = resources::find_kind_name(kind) else {
            return vec![];
        };
        lock(&self.shared.store)
            .objects(res)
            .map(|o| (**o).clone())
            .collect()
    }

    /// Makes `token` a ServiceAccount token that TokenReview (`POST
    /// /apis/authentication.k8s.io/v1/tokenreviews`) authenticates as `info` says (replacing
    /// what it stood for before), as if the server had issued it.
    pub fn add_service_account_token(&self, token: &str, info: TokenInfo) {
        lock(&self.shared.tokens).add(token, info);
    }

    /// Revokes a token added with [`Self::add_service_account_token`]: reviews of it fail from
    /// now on. Returns whether it was known.
    pub fn remove_service_account_token(&self, token: &str) -> bool {
        lock(&self.shared.tokens).remove(token)
    }

    /// Events clients created (core `v1` and `events.k8s.io/v1`).
    pub fn events(&self) -> Vec<Value> {
        let mut out = self.list("Event");
        out.extend(self.list("Event.events.k8s.io"));
        out
    }

    /// (verb, path and query) of the requests so far (at most the last 100 000): `list`,
    /// `watch`, `get`, `create`, `update`, `patch`, `delete`, `deletecollection` for resources,
    /// the lowercase HTTP method for other paths (as kube-apiserver's audit log names them).
    pub fn requests(&self) -> Vec<(String, String)> {
        lock(&self.shared.requests).clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv()
    }

    /// Number of open watches.
    pub fn watch_count(&self) -> usize {
        lock(&self.shared.store).watch_count()
    }

    /// How often watches with `allowWatchBookmarks` get a BOOKMARK (open ones from their next
    /// one on).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared
            .bookmark_ms
            .store(interval.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// How many changes the history keeps before forgetting the oldest (default 100 000).
    pub fn set_history_limit(&self, changes: usize) {
        lock(&self.shared.store).history_limit = changes.max(1);
    }

    /// Forgets the history up to now, as etcd's compaction: watches and continue tokens from
    /// older resourceVersions get 410, and every open watch receives `ERROR` 410 and ends.
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
    }

    /// Installs or removes the CRDs of a custom resource group (`security.istio.io`,
    /// `networking.istio.io`, `gateway.networking.k8s.io`). While removed, its paths answer 404,
    /// discovery leaves it out and its open watches end. Panics for another group.
    pub fn set_installed(&self, group: &str, installed: bool) {
        assert!(
            resources::is_crd_group(group),
            "{group} is not a custom resource group of the stand-in"
        );
        let mut store = lock(&self.shared.store);
        for res in resources::in_group(group).filter(|&r| RESOURCES[r].custom) {
            store.install(res, installed);
        }
    }

    /// Whether the CRDs of a group are installed.
    pub fn installed(&self, group: &str) -> bool {
        let store = lock(&self.shared.store);
        resources::in_group(group).any(|r| RESOURCES[r].custom && store.installed(r))
    }

    /// Whether it is serving (not stopped).
    pub fn is_running(&self) -> bool {
        lock(&self.running).is_some()
    }

    /// Kills the server: closes the listener (connections are refused) and every open
    /// connection, watches included, at once. The state is kept; [`Self::restart`] serves it
    /// again.
    pub fn stop(&self) {
        let Some(running) = lock(&self.running).take() else {
            return;
        };
        // The accept task never closes its listener by itself, so the descriptor is still
        // its own here: shutting it down refuses new connections right away.
        // SAFETY: shutdown on a descriptor that is open.
        unsafe { libc::shutdown(running.listener_fd, libc::SHUT_RDWR) };
        running.accept.abort();
        {
            let conns = lock(&self.shared.conns);
            for fd in conns.values() {
                // SAFETY: registered descriptors are open (see `Tracked`).
                unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
            }
        }
        self.shared.kill.send_modify(|g| *g += 1);
    }

    /// Listens again on the same address (and network namespace) after [`Self::stop`].
    pub fn restart(&self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match bind_in(self.addr, self.netns.as_ref()) {
                Ok(l) => break l,
                // The aborted accept task may not have closed the old socket yet.
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e),
            }
        };
        self.serve(listener)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(rt) = self.runtime.take() {
            // Does not block: fine from async code too.
            rt.shutdown_background();
        }
    }
}

/// Objects from multi-document YAML (`---` separated; `kind: List` documents contribute their
/// items; empty documents are skipped).
pub fn load_yaml(text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        match v {
            Value::Null => {}
            Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                out.extend(
                    m.get("items")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default(),
                );
            }
            Value::Object(_) => out.push(v),
            other => bail!("a YAML document is not an object: {other}"),
        }
    }
    Ok(out)
}
