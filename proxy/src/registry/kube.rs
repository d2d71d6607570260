//! The Kubernetes API as a registry source (`--registry kube`): one kube-runtime watcher per
//! kind, converting each object once when it changes, and a rebuild task that turns the objects
//! in force into a snapshot.
//!
//! - **Kinds**: Namespace, Node, Pod, Service, EndpointSlice, and the Istio and Gateway API kinds
//!   weft honours ([`KINDS`]), each in the first version the API server serves (v1 first, then
//!   the older ones Istio and Gateway API still serve). A custom resource whose CRD is not
//!   installed counts as an empty list: logged once, retried every [`ABSENT_RETRY`].
//! - **Faults**: the watcher lists, then watches from the list's resourceVersion; a watch that
//!   ends resumes from the last resourceVersion it saw, a `410 Gone` re-lists. A re-list is
//!   buffered and replaces the kind's objects at once (nothing is lost or seen half-listed).
//!   Errors back off exponentially with jitter, up to [`MAX_BACKOFF`]. While the API server is
//!   unreachable the snapshot in force stays: traffic does not depend on it.
//! - **Readiness**: [`KubeSource::start`] returns once every kind was fully listed.
//! - **Rebuilds**: changes are coalesced: at most one snapshot per [`DEBOUNCE`].
//! - **Memory**: a list, a re-list or a rebuild frees far more than it keeps (the decoded
//!   pages, the snapshot replaced). The allocator hands freed memory back to the system only
//!   lazily, as later allocations pass by, and a node proxy at rest allocates little: once
//!   changes have been quiet for [`RELEASE_AFTER`], it is handed back at once.
//! - **Validation**: objects are checked one by one ([`convert`]): an invalid one is reported
//!   (`Kind ns/name` and the field path, in `weft status`, and as a Kubernetes Event on the
//!   object) while the rest applies; an invalid new version of an object keeps the previous
//!   one in force, except for security kinds, which fail closed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::build::{
    convert, Conversion, Converted, FieldError, Inserted, Object, ObjectKey, SnapshotBuilder,
};
use super::kinds;
use super::model::{Change, Problem, RawObject, Snapshot};
use super::Registry;

/// At most one snapshot rebuild per this much time under churn.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Longest wait between attempts after an error.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a kind whose CRD is not installed is looked for again.
pub const ABSENT_RETRY: Duration = Duration::from_secs(30);
/// A retry after an error that runs this long without a new error has its watch back.
const RECOVERED_AFTER: Duration = Duration::from_secs(2);
/// Quiet time after a list or rebuild before freed memory is handed back to the system (by
/// then the snapshot replaced has been dropped by the connections that held it).
pub const RELEASE_AFTER: Duration = Duration::from_secs(2);
/// Where reports name the source.
const ORIGIN: &str = "kubernetes";

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// A kubeconfig file; `None`: in-cluster (the pod's service account), else the default
    /// kubeconfig.
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context; `None`: its current context.
    pub context: Option<String>,
    /// This node's name: reports as a Kubernetes Event are shared out among nodes by it.
    pub node_name: String,
}

/// One kind weft watches.
#[derive(Debug, Clone, Copy)]
pub struct KindSpec {
    pub kind: &'static str,
    /// `""` for the core group.
    pub group: &'static str,
    /// Versions tried in order; the first served is watched.
    pub versions: &'static [&'static str],
    pub plural: &'static str,
    /// A custom resource: its CRD may not be installed.
    pub custom: bool,
}

/// Every kind weft reads from the API.
pub const KINDS: &[KindSpec] = &[
    core_kind("Namespace", "", &["v1"], "namespaces"),
    core_kind("Node", "", &["v1"], "nodes"),
    core_kind("Pod", "", &["v1"], "pods"),
    core_kind("Service", "", &["v1"], "services"),
    core_kind(
        "EndpointSlice",
        "discovery.k8s.io",
        &["v1"],
        "endpointslices",
    ),
    custom_kind(
        "AuthorizationPolicy",
        kinds::SECURITY_GROUP,
        &["v1", "v1beta1"],
        "authorizationpolicies",
    ),
    custom_kind(
        "PeerAuthentication",
        kinds::SECURITY_GROUP,
        &["v1", "v1beta1"],
        "peerauthentications",
    ),
    custom_kind(
        "VirtualService",
        kinds::NETWORKING_GROUP,
        &["v1", "v1beta1", "v1alpha3"],
        "virtualservices",
    ),
    custom_kind(
        "DestinationRule",
        kinds::NETWORKING_GROUP,
        &["v1", "v1beta1", "v1alpha3"],
        "destinationrules",
    ),
    custom_kind(
        "ServiceEntry",
        kinds::NETWORKING_GROUP,
        &["v1", "v1beta1", "v1alpha3"],
        "serviceentries",
    ),
    custom_kind(
        "HTTPRoute",
        kinds::GATEWAY_GROUP,
        &["v1", "v1beta1"],
        "httproutes",
    ),
    custom_kind(
        "GRPCRoute",
        kinds::GATEWAY_GROUP,
        &["v1", "v1alpha2"],
        "grpcroutes",
    ),
];

const fn core_kind(
    kind: &'static str,
    group: &'static str,
    versions: &'static [&'static str],
    plural: &'static str,
) -> KindSpec {
    KindSpec {
        kind,
        group,
        versions,
        plural,
        custom: false,
    }
}

const fn custom_kind(
    kind: &'static str,
    group: &'static str,
    versions: &'static [&'static str],
    plural: &'static str,
) -> KindSpec {
    KindSpec {
        custom: true,
        ..core_kind(kind, group, versions, plural)
    }
}

/// What the watch of one kind is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchState {
    /// Listing, before the first full list.
    Listing,
    /// Listed; watching for changes.
    Watching,
    /// The last attempt failed; retrying after a backoff (the objects listed before stay).
    Retrying,
    /// The kind's CRD is not installed: no objects; looked for again later.
    NotInstalled,
}

impl WatchState {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchState::Listing => "listing",
            WatchState::Watching => "watching",
            WatchState::Retrying => "retrying",
            WatchState::NotInstalled => "not_installed",
        }
    }
}

/// The watch of one kind, as `weft status` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KindStatus {
    pub kind: &'static str,
    /// `group/version` watched (the first one served).
    pub api_version: String,
    pub state: WatchState,
    /// Objects of the kind in force.
    pub objects: usize,
    /// When the kind was last fully listed or a change of it arrived.
    #[serde(skip)]
    pub last_sync: Option<SystemTime>,
    /// The last error, while retrying.
    pub error: Option<String>,
}

/// One object in force and the report about its latest version.
#[derive(Debug, Clone)]
struct Stored {
    /// What applies: the latest version, or the previous one when the latest is invalid.
    applied: Conversion,
    /// The problems of the latest version, when it is invalid.
    problems: Option<Vec<FieldError>>,
    /// For Events: the object's identity and version.
    reference: Reference,
}

/// What a Kubernetes Event names as its object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Reference {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    name: String,
    uid: Option<String>,
    resource_version: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    /// The objects in force, per kind (indexed as [`KINDS`]).
    objects: Mutex<Vec<BTreeMap<ObjectKey, Stored>>>,
    kinds: Mutex<Vec<KindStatus>>,
    changed: Notify,
    /// What changed since the last rebuild.
    dirty: Mutex<Dirty>,
    synced: Notify,
    /// Duration of the last rebuild.
    last_rebuild: Mutex<Option<Duration>>,
}

/// What changed since the last rebuild: pods and EndpointSlices alone (their churn) are
/// applied to the snapshot in force ([`Snapshot::with_changes`]); anything else rebuilds it.
#[derive(Debug, Default)]
struct Dirty {
    full: bool,
    pods: BTreeSet<ObjectKey>,
    slices: BTreeSet<ObjectKey>,
}

/// Indexes of the kinds changes to which do not need a rebuild.
const POD: usize = 2;
const ENDPOINT_SLICE: usize = 4;

/// Records a change of `key` of kind `index`; `plain`: the object and its previous version
/// have no problems to report (else the reports change: a rebuild).
fn mark(shared: &Shared, index: usize, key: &ObjectKey, plain: bool) {
    let mut dirty = shared.dirty.lock();
    match index {
        POD if plain => {
            dirty.pods.insert(key.clone());
        }
        ENDPOINT_SLICE if plain => {
            dirty.slices.insert(key.clone());
        }
        _ => dirty.full = true,
    }
}

/// The Kubernetes API feeding a [`Registry`].
#[derive(Debug)]
pub struct KubeSource {
    registry: Arc<Registry>,
    shared: Arc<Shared>,
}

impl KubeSource {
    /// Connects, lists every kind and returns with the first snapshot published; then keeps
    /// watching. Kinds whose CRD is not installed do not hold it up.
    pub async fn start(options: KubeOptions) -> anyhow::Result<KubeSource> {
        let client = client(&options).await?;
        KubeSource::start_with(client, options.node_name).await
    }

    /// [`KubeSource::start`] with a client.
    pub async fn start_with(client: Client, node_name: String) -> anyhow::Result<KubeSource> {
        let shared = Arc::new(Shared {
            objects: Mutex::new(vec![BTreeMap::new(); KINDS.len()]),
            ..Shared::default()
        });
        *shared.kinds.lock() = KINDS
            .iter()
            .map(|k| KindStatus {
                kind: k.kind,
                api_version: api_version(k.group, k.versions[0]),
                state: WatchState::Listing,
                objects: 0,
                last_sync: None,
                error: None,
            })
            .collect();
        for (i, spec) in KINDS.iter().enumerate() {
            tokio::spawn(watch_kind(client.clone(), shared.clone(), i, *spec));
        }
        let started = Instant::now();
        loop {
            let waiting: Vec<&'static str> = shared
                .kinds
                .lock()
                .iter()
                .filter(|k| {
                    k.state == WatchState::Listing
                        || (k.state == WatchState::Retrying && k.last_sync.is_none())
                })
                .map(|k| k.kind)
                .collect();
            if waiting.is_empty() {
                break;
            }
            let before = started.elapsed().as_secs() / 10;
            let _ =
                tokio::time::timeout(Duration::from_millis(200), shared.synced.notified()).await;
            if started.elapsed().as_secs() / 10 > before {
                let errors: Vec<String> = shared
                    .kinds
                    .lock()
                    .iter()
                    .filter_map(|k| k.error.as_ref().map(|e| format!("{}: {e}", k.kind)))
                    .collect();
                warn!(
                    waiting = %waiting.join(", "),
                    errors = %errors.join("; "),
                    after = ?started.elapsed(),
                    "registry: still waiting for the first list from the Kubernetes API"
                );
            }
        }
        // Changes from here on are the next rebuild's.
        *shared.dirty.lock() = Dirty::default();
        let (builder, problems) = build(&shared);
        let snapshot = builder.build(1, Vec::new());
        log_problems(&snapshot);
        info!(
            pods = snapshot.pods.len(),
            services = snapshot.services.len(),
            after = ?started.elapsed(),
            "registry: listed every kind from the Kubernetes API"
        );
        let registry = Arc::new(Registry::new(snapshot));
        let reporter = Reporter::new(client, node_name);
        reporter.report(&problems, &registry.snapshot());
        tokio::spawn(rebuild_loop(shared.clone(), registry.clone(), reporter));
        Ok(KubeSource { registry, shared })
    }

    /// The registry this source feeds.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The watch of every kind.
    pub fn status(&self) -> Vec<KindStatus> {
        self.shared.kinds.lock().clone()
    }

    /// How long the last snapshot rebuild took.
    pub fn last_rebuild(&self) -> Option<Duration> {
        *self.shared.last_rebuild.lock()
    }
}

/// A client for `options`: the kubeconfig given (and context), else in-cluster, else the
/// default kubeconfig.
pub async fn client(options: &KubeOptions) -> anyhow::Result<Client> {
    use anyhow::Context;
    use kube::config::{Config, KubeConfigOptions, Kubeconfig};
    let kube_options = KubeConfigOptions {
        context: options.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &kube_options)
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None if options.context.is_some() => Config::from_kubeconfig(&kube_options)
            .await
            .context("using the default kubeconfig")?,
        None => match Config::incluster() {
            Ok(config) => config,
            Err(incluster) => Config::infer().await.with_context(|| {
                format!("no in-cluster service account ({incluster}) and no kubeconfig")
            })?,
        },
    };
    Client::try_from(config).context("creating the Kubernetes client")
}

fn api_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

/// Backoff after the `n`th consecutive error: 200 ms doubling up to [`MAX_BACKOFF`], with
/// ±50 % jitter so nodes do not retry in step.
pub fn backoff(n: u32) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1u32 << n.min(10));
    let base = base.min(MAX_BACKOFF);
    base.mul_f64(0.5 + fastrand::f64())
}

/// Whether an error says the resource type does not exist (CRD not installed).
fn not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

async fn watch_kind(client: Client, shared: Arc<Shared>, index: usize, spec: KindSpec) {
    let mut absent_logged = false;
    loop {
        let mut absent = true;
        for version in spec.versions {
            let gvk = GroupVersionKind::gvk(spec.group, version, spec.kind);
            let resource = ApiResource::from_gvk_with_plural(&gvk, spec.plural);
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
            set_state(&shared, index, |k| {
                k.api_version = api_version(spec.group, version);
            });
            if run_watch(api, &shared, index, spec, &resource).await == Ended::Stopped {
                absent = false;
                break;
            }
        }
        if !absent {
            continue;
        }
        // No version is served: the CRD is not installed (or was removed).
        if !absent_logged {
            info!(
                kind = spec.kind,
                group = spec.group,
                "registry: this kind is not served by the API server (CRD not installed); taken as no objects, looked for again every {ABSENT_RETRY:?}"
            );
            absent_logged = true;
        }
        shared.objects.lock()[index].clear();
        shared.dirty.lock().full = true;
        set_state(&shared, index, |k| {
            k.state = WatchState::NotInstalled;
            k.objects = 0;
            k.last_sync = Some(SystemTime::now());
            k.error = None;
        });
        shared.synced.notify_waiters();
        shared.changed.notify_one();
        tokio::time::sleep(ABSENT_RETRY).await;
    }
}

/// Why a watch stream ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The version is not served (404).
    NotFound,
    /// The stream ended (it does not, in practice: the watcher restarts itself).
    Stopped,
}

async fn run_watch(
    api: Api<DynamicObject>,
    shared: &Arc<Shared>,
    index: usize,
    spec: KindSpec,
    resource: &ApiResource,
) -> Ended {
    let stream = watcher::watcher(api, watcher::Config::default().page_size(500));
    futures::pin_mut!(stream);
    // A (re-)list in progress: replaces the kind's objects once complete.
    let mut listing: Option<BTreeMap<ObjectKey, Stored>> = None;
    let mut errors = 0u32;
    loop {
        // After an error, a retry that stays quiet (no new error) for a while has its watch
        // running again: the kind is back to `watching` though no change of it arrived.
        let item = if errors > 0 {
            match tokio::time::timeout(RECOVERED_AFTER, stream.next()).await {
                Ok(item) => item,
                Err(_) => {
                    errors = 0;
                    set_state(shared, index, |k| {
                        if k.state == WatchState::Retrying {
                            k.state = WatchState::Watching;
                            k.error = None;
                        }
                    });
                    continue;
                }
            }
        } else {
            stream.next().await
        };
        let Some(item) = item else { break };
        let event = match item {
            Ok(event) => event,
            Err(e) => {
                if not_found(&e) {
                    return Ended::NotFound;
                }
                listing = None;
                let message = format!("{e}");
                let was = shared.kinds.lock()[index].state;
                if was != WatchState::Retrying {
                    warn!(kind = spec.kind, error = %message, "registry: watch failed; retrying with backoff (the snapshot in force stays)");
                }
                set_state(shared, index, |k| {
                    k.state = WatchState::Retrying;
                    k.error = Some(message);
                });
                shared.synced.notify_waiters();
                tokio::time::sleep(backoff(errors)).await;
                errors = errors.saturating_add(1);
                continue;
            }
        };
        errors = 0;
        match event {
            Event::Init => listing = Some(BTreeMap::new()),
            Event::InitApply(obj) => {
                if let Some((key, stored)) = stored_of(obj, spec, resource) {
                    let previous = shared.objects.lock()[index].get(&key).cloned();
                    let stored = keep_previous(stored, previous.as_ref(), spec);
                    listing
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key, stored);
                }
            }
            Event::InitDone => {
                let fresh = listing.take().unwrap_or_default();
                let count = fresh.len();
                shared.objects.lock()[index] = fresh;
                shared.dirty.lock().full = true;
                debug!(kind = spec.kind, objects = count, "registry: listed");
                touched(shared, index, count);
                shared.synced.notify_waiters();
            }
            Event::Apply(obj) => {
                if let Some((key, stored)) = stored_of(obj, spec, resource) {
                    let mut objects = shared.objects.lock();
                    let of_kind = &mut objects[index];
                    let previous = of_kind.get(&key);
                    let stored = keep_previous(stored, previous, spec);
                    let plain =
                        stored.problems.is_none() && previous.is_none_or(|p| p.problems.is_none());
                    mark(shared, index, &key, plain);
                    of_kind.insert(key, stored);
                    let count = of_kind.len();
                    drop(objects);
                    touched(shared, index, count);
                }
            }
            Event::Delete(obj) => {
                if let Some((key, _)) = stored_of(obj, spec, resource) {
                    let mut objects = shared.objects.lock();
                    let plain = objects[index]
                        .remove(&key)
                        .is_none_or(|p| p.problems.is_none());
                    mark(shared, index, &key, plain);
                    let count = objects[index].len();
                    drop(objects);
                    touched(shared, index, count);
                }
            }
        }
    }
    Ended::Stopped
}

fn touched(shared: &Shared, index: usize, count: usize) {
    set_state(shared, index, |k| {
        k.state = WatchState::Watching;
        k.objects = count;
        k.last_sync = Some(SystemTime::now());
        k.error = None;
    });
    shared.changed.notify_one();
}

fn set_state(shared: &Shared, index: usize, f: impl FnOnce(&mut KindStatus)) {
    if let Some(k) = shared.kinds.lock().get_mut(index) {
        f(k);
    }
}

/// An invalid new version keeps the previous valid one in force, except for security kinds
/// (they fail closed: see [`convert`]).
fn keep_previous(mut stored: Stored, previous: Option<&Stored>, spec: KindSpec) -> Stored {
    if stored.applied.result.is_ok() || spec.group == kinds::SECURITY_GROUP {
        return stored;
    }
    if let Some(prev) = previous.filter(|p| p.applied.result.is_ok()) {
        stored.problems = match stored.applied.result {
            Err(ref errors) => Some(errors.clone()),
            Ok(_) => None,
        };
        stored.applied = prev.applied.clone();
    }
    stored
}

/// Converts an object from the API.
fn stored_of(
    obj: DynamicObject,
    spec: KindSpec,
    resource: &ApiResource,
) -> Option<(ObjectKey, Stored)> {
    let reference = Reference {
        api_version: resource.api_version.clone(),
        kind: spec.kind.to_string(),
        namespace: obj.metadata.namespace.clone(),
        name: obj.metadata.name.clone().unwrap_or_default(),
        uid: obj.metadata.uid.clone(),
        resource_version: obj.metadata.resource_version.clone(),
    };
    let mut value = match serde_json::to_value(&obj) {
        Ok(v) => v,
        Err(e) => {
            warn!(kind = spec.kind, name = %reference.name, error = %e, "registry: cannot read an object from the API");
            return None;
        }
    };
    if let Some(map) = value.as_object_mut() {
        map.insert(
            "apiVersion".into(),
            Value::String(resource.api_version.clone()),
        );
        map.insert("kind".into(), Value::String(spec.kind.to_string()));
    }
    let object = object_of(value, spec, &reference);
    let applied = match object {
        Ok(object) => convert(&object, None),
        Err(errors) => Conversion {
            key: ObjectKey {
                api_version: reference.api_version.clone(),
                kind: spec.kind.to_string(),
                namespace: reference.namespace.clone(),
                name: reference.name.clone(),
            },
            result: Err(errors),
            fail_closed: None,
        },
    };
    let problems = applied.result.as_ref().err().cloned();
    Some((
        applied.key.clone(),
        Stored {
            applied,
            problems,
            reference,
        },
    ))
}

/// The typed object of a JSON value from the API.
fn object_of(
    value: Value,
    spec: KindSpec,
    reference: &Reference,
) -> Result<Object, Vec<FieldError>> {
    fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<Box<T>, Vec<FieldError>> {
        serde_path_to_error::deserialize(value)
            .map(Box::new)
            .map_err(|e| {
                vec![FieldError::new(
                    e.path().to_string(),
                    e.into_inner().to_string(),
                )]
            })
    }
    Ok(match (spec.group, spec.kind) {
        ("", "Namespace") => Object::Namespace(typed::<core::Namespace>(value)?),
        ("", "Node") => Object::Node(typed::<core::Node>(value)?),
        ("", "Pod") => Object::Pod(typed::<core::Pod>(value)?),
        ("", "Service") => Object::Service(typed::<core::Service>(value)?),
        ("discovery.k8s.io", "EndpointSlice") => {
            Object::EndpointSlice(typed::<discovery::EndpointSlice>(value)?)
        }
        _ => Object::Other(RawObject {
            api_version: reference.api_version.clone(),
            kind: spec.kind.to_string(),
            namespace: reference.namespace.clone(),
            name: reference.name.clone(),
            value,
        }),
    })
}

/// A problem found while building, with the object it is about.
#[derive(Debug, Clone)]
struct Found {
    problem: Problem,
    reference: Option<Reference>,
}

/// The builder of the objects in force, and every problem found (also in the builder's
/// reports).
fn build(shared: &Shared) -> (SnapshotBuilder, Vec<Found>) {
    let mut builder = SnapshotBuilder::new();
    let mut found = Vec::new();
    let objects = shared.objects.lock();
    for (key, stored) in objects.iter().flatten() {
        let mut report = |reasons: Vec<String>, kept: bool| {
            for reason in reasons {
                let reason = if kept {
                    format!("{reason} (its previous version stays in force)")
                } else {
                    reason
                };
                found.push(Found {
                    problem: Problem {
                        origin: ORIGIN.into(),
                        object: key.to_string(),
                        reason,
                    },
                    reference: Some(stored.reference.clone()),
                });
            }
        };
        if let Some(problems) = &stored.problems {
            let kept = stored.applied.result.is_ok();
            report(problems.iter().map(ToString::to_string).collect(), kept);
        }
        match builder.add(stored.applied.clone()) {
            Ok(Inserted::Applied(_)) => {}
            Ok(Inserted::NotApplied { reason, .. }) => report(vec![reason], false),
            // Duplicates and cluster IPs used twice; an invalid object's own problems are
            // reported above.
            Err(errors) if stored.problems.is_none() => {
                report(errors.iter().map(ToString::to_string).collect(), false)
            }
            Err(_) => {}
        }
    }
    for f in &found {
        builder.not_applied(f.problem.clone());
    }
    // Checks across objects name an object by group, kind, namespace and name.
    let reference_of = |key: &ObjectKey| {
        objects
            .iter()
            .flatten()
            .find(|(k, _)| k.kind == key.kind && k.namespace == key.namespace && k.name == key.name)
            .map(|(_, s)| s.reference.clone())
    };
    let cross = builder.validate();
    let warnings = builder.warnings();
    for (list, warning) in [(cross, false), (warnings, true)] {
        for (key, error) in list {
            let problem = Problem {
                origin: ORIGIN.into(),
                object: key.to_string(),
                reason: error.to_string(),
            };
            if warning {
                builder.warning(problem.clone());
            } else {
                builder.not_applied(problem.clone());
            }
            found.push(Found {
                problem,
                reference: reference_of(&key),
            });
        }
    }
    (builder, found)
}

fn log_problems(snapshot: &Snapshot) {
    for item in &snapshot.not_applied {
        warn!("registry: not applied: {item}");
    }
    for item in &snapshot.warnings {
        warn!("registry: {item}");
    }
}

async fn rebuild_loop(shared: Arc<Shared>, registry: Arc<Registry>, reporter: Reporter) {
    let mut last = Instant::now();
    let mut logged: HashSet<String> = HashSet::new();
    // The first list's garbage, then each rebuild's.
    let mut release_at = Some(Instant::now() + RELEASE_AFTER);
    loop {
        match release_at {
            None => shared.changed.notified().await,
            Some(at) => tokio::select! {
                () = shared.changed.notified() => {}
                () = tokio::time::sleep_until(at.into()) => {
                    release_freed_memory();
                    release_at = None;
                    continue;
                }
            },
        }
        let since = last.elapsed();
        if since < DEBOUNCE {
            tokio::time::sleep(DEBOUNCE - since).await;
        }
        let started = Instant::now();
        let dirty = std::mem::take(&mut *shared.dirty.lock());
        if !dirty.full && dirty.pods.is_empty() && dirty.slices.is_empty() {
            continue; // a wake-up for what an earlier rebuild already took
        }
        let (snapshot, found) = if dirty.full {
            let (builder, found) = build(&shared);
            (registry.publish(builder, Vec::new()), found)
        } else {
            apply_changes(&shared, &registry, &dirty)
        };
        *shared.last_rebuild.lock() = Some(started.elapsed());
        last = Instant::now();
        let now: HashSet<String> = snapshot
            .not_applied
            .iter()
            .chain(&snapshot.warnings)
            .map(ToString::to_string)
            .collect();
        for line in now.difference(&logged) {
            warn!("registry: {line}");
        }
        logged = now;
        reporter.report(&found, &snapshot);
        debug!(generation = snapshot.generation, took = ?started.elapsed(), "registry: snapshot rebuilt");
        release_at = Some(Instant::now() + RELEASE_AFTER);
    }
}

/// Hands the memory freed so far back to the system ([`crate::memory`]): this thread's now,
/// the other control-plane threads' when they next go idle.
fn release_freed_memory() {
    let started = Instant::now();
    crate::memory::release();
    debug!(took = ?started.elapsed(), "registry: freed memory handed back");
}

/// Applies changes of pods and EndpointSlices only to the snapshot in force; the warnings about
/// the Services of the namespaces touched are what is found.
fn apply_changes(
    shared: &Shared,
    registry: &Registry,
    dirty: &Dirty,
) -> (Arc<Snapshot>, Vec<Found>) {
    let objects = shared.objects.lock();
    fn changes<T>(
        keys: &BTreeSet<ObjectKey>,
        of_kind: &BTreeMap<ObjectKey, Stored>,
        pick: impl Fn(&Converted) -> Option<&Arc<T>>,
    ) -> Vec<Change<T>> {
        keys.iter()
            .map(|key| {
                let now = of_kind
                    .get(key)
                    .and_then(|s| s.applied.result.as_ref().ok())
                    .and_then(&pick)
                    .cloned();
                let ns = key.namespace.clone().unwrap_or_default();
                ((ns, key.name.clone()), now)
            })
            .collect()
    }
    let pods = changes(&dirty.pods, &objects[POD], |c| match c {
        Converted::Pod(p) => Some(p),
        _ => None,
    });
    let slices = changes(&dirty.slices, &objects[ENDPOINT_SLICE], |c| match c {
        Converted::EndpointSlice(s) => Some(s),
        _ => None,
    });
    let services = &objects[3];
    let snapshot = registry.publish_with(|current, generation| {
        current.with_changes(generation, &pods, &slices, ORIGIN)
    });
    let found = snapshot
        .warnings
        .iter()
        .map(|w| Found {
            problem: w.clone(),
            reference: services
                .iter()
                .find(|(k, _)| k.to_string() == w.object)
                .map(|(_, s)| s.reference.clone()),
        })
        .collect();
    (snapshot, found)
}

/// Posts a Kubernetes Event on each object with a problem, once per version of the object.
/// Each object is reported by one node only (chosen by a hash of its uid among the nodes), so
/// a DaemonSet does not post the same Event from every node.
struct Reporter {
    client: Client,
    node_name: String,
    posted: Mutex<HashSet<(Reference, String)>>,
}

impl Reporter {
    fn new(client: Client, node_name: String) -> Reporter {
        Reporter {
            client,
            node_name,
            posted: Mutex::new(HashSet::new()),
        }
    }

    fn report(&self, found: &[Found], snapshot: &Snapshot) {
        let nodes: Vec<&String> = snapshot.nodes.keys().collect();
        for f in found {
            let Some(reference) = &f.reference else {
                continue;
            };
            if !nodes.is_empty() {
                let mut h = std::hash::DefaultHasher::new();
                reference.uid.hash(&mut h);
                reference.name.hash(&mut h);
                let chosen = nodes[(h.finish() % nodes.len() as u64) as usize];
                if *chosen != self.node_name {
                    continue;
                }
            }
            let entry = (reference.clone(), f.problem.reason.clone());
            if !self.posted.lock().insert(entry) {
                continue;
            }
            let client = self.client.clone();
            let event = event_for(reference, &f.problem.reason, &self.node_name);
            let namespace = reference
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_string());
            tokio::spawn(async move {
                let api: Api<core::Event> = Api::namespaced(client, &namespace);
                if let Err(e) = api.create(&PostParams::default(), &event).await {
                    debug!(error = %e, "registry: cannot post an Event");
                }
            });
        }
    }
}

/// The Event reporting `reason` on `reference`.
fn event_for(reference: &Reference, reason: &str, node: &str) -> core::Event {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
    let now = k8s_openapi::jiff::Timestamp::now();
    core::Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", reference.name)),
            namespace: reference.namespace.clone(),
            ..ObjectMeta::default()
        },
        involved_object: core::ObjectReference {
            api_version: Some(reference.api_version.clone()),
            kind: Some(reference.kind.clone()),
            namespace: reference.namespace.clone(),
            name: Some(reference.name.clone()),
            uid: reference.uid.clone(),
            resource_version: reference.resource_version.clone(),
            ..core::ObjectReference::default()
        },
        reason: Some("WeftInvalidObject".into()),
        message: Some(format!("weft cannot apply this object: {reason}")),
        type_: Some("Warning".into()),
        source: Some(core::EventSource {
            component: Some("weft".into()),
            host: Some(node.to_string()),
        }),
        reporting_component: Some("weft".into()),
        reporting_instance: Some(node.to_string()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        action: Some("Validate".into()),
        count: Some(1),
        ..core::Event::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
    }

    fn spec(kind: &str) -> KindSpec {
        *KINDS.iter().find(|k| k.kind == kind).unwrap()
    }

    fn dynamic(value: Value) -> DynamicObject {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        for n in 0..20 {
            let d = backoff(n);
            let base = Duration::from_millis(200)
                .saturating_mul(1 << n.min(10))
                .min(MAX_BACKOFF);
            assert!(d >= base / 2 && d <= base * 3 / 2, "{n}: {d:?}");
        }
        assert!(backoff(30) <= MAX_BACKOFF * 3 / 2);
    }

    #[test]
    fn objects_from_the_api_are_converted_as_from_files() {
        // A Pod as a list item comes without kind and apiVersion: they come from the resource.
        let pod = dynamic(json!({
            "metadata": {"name": "web-0", "namespace": "back", "uid": "u-1", "resourceVersion": "7"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": "10.0.0.5", "phase": "Running"}
        }));
        let (key, stored) =
            stored_of(pod, spec("Pod"), &resource("", "v1", "Pod", "pods")).unwrap();
        assert_eq!(key.to_string(), "Pod back/web-0");
        let Ok(crate::registry::Converted::Pod(p)) = &stored.applied.result else {
            panic!("{:?}", stored.applied.result)
        };
        assert_eq!(p.named_port("http", "TCP"), Some(8080));
        assert_eq!(stored.reference.resource_version.as_deref(), Some("7"));
        assert!(stored.problems.is_none());

        // An invalid AuthorizationPolicy: reported with its field, failing closed.
        let policy = dynamic(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny", "namespace": "back", "uid": "u-2"},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principal": ["x"]}}]}]}
        }));
        let r = resource(
            "security.istio.io",
            "v1",
            "AuthorizationPolicy",
            "authorizationpolicies",
        );
        let (_, stored) = stored_of(policy, spec("AuthorizationPolicy"), &r).unwrap();
        let problems = stored.problems.as_ref().unwrap();
        assert!(problems[0].path.contains("principal"), "{problems:?}");
        assert_eq!(
            stored.applied.fail_closed.as_ref().map(|f| f.effect),
            Some(crate::registry::FailEffect::DenyAll)
        );
    }

    #[test]
    fn a_pods_owner_comes_from_the_api() {
        let pod = dynamic(json!({
            "metadata": {
                "name": "web-0", "namespace": "back", "uid": "u-1", "generateName": "web-",
                "labels": {"app": "web"},
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web",
                    "uid": "u-sts", "controller": true, "blockOwnerDeletion": true
                }]
            },
            "spec": {"containers": [{"name": "c"}]},
            "status": {"podIP": "10.0.0.5", "phase": "Running"}
        }));
        let (_, stored) = stored_of(pod, spec("Pod"), &resource("", "v1", "Pod", "pods")).unwrap();
        let Ok(crate::registry::Converted::Pod(p)) = &stored.applied.result else {
            panic!("{:?}", stored.applied.result)
        };
        assert_eq!(
            p.owner,
            Some(crate::registry::model::Owner {
                kind: "StatefulSet".into(),
                name: "web".into(),
                controller: true,
            })
        );
        assert_eq!(p.generate_name.as_deref(), Some("web-"));
        let w = crate::registry::workload::workload_of(p);
        assert_eq!((w.name.as_str(), w.kind), ("web", "StatefulSet"));
        assert_eq!(w.canonical_service, "web");
    }

    #[test]
    fn an_invalid_new_version_keeps_the_previous_one_but_not_for_security_kinds() {
        let r = resource(
            "networking.istio.io",
            "v1",
            "VirtualService",
            "virtualservices",
        );
        let vs = |regex: &str| {
            dynamic(json!({
                "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                "metadata": {"name": "vs", "namespace": "back"},
                "spec": {"hosts": ["web"], "http": [{"match": [{"uri": {"regex": regex}}], "route": [{"destination": {"host": "web"}}]}]}
            }))
        };
        let (_, good) = stored_of(vs("/a.*"), spec("VirtualService"), &r).unwrap();
        let (_, bad) = stored_of(vs("/(["), spec("VirtualService"), &r).unwrap();
        let kept = keep_previous(bad.clone(), Some(&good), spec("VirtualService"));
        assert!(kept.applied.result.is_ok());
        assert!(kept.problems.is_some());
        // Without a previous version: left out.
        assert!(keep_previous(bad, None, spec("VirtualService"))
            .applied
            .result
            .is_err());

        let r = resource(
            "security.istio.io",
            "v1",
            "AuthorizationPolicy",
            "authorizationpolicies",
        );
        let ap = |action: &str| {
            dynamic(json!({
                "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "ap", "namespace": "back"},
                "spec": {"action": action, "rules": [{}]}
            }))
        };
        let (_, good) = stored_of(ap("DENY"), spec("AuthorizationPolicy"), &r).unwrap();
        let (_, bad) = stored_of(ap("DENIE"), spec("AuthorizationPolicy"), &r).unwrap();
        let kept = keep_previous(bad, Some(&good), spec("AuthorizationPolicy"));
        assert!(
            kept.applied.result.is_err(),
            "security kinds fail closed instead"
        );
        assert!(kept.applied.fail_closed.is_some());
    }

    #[test]
    fn the_event_names_the_object_and_the_problem() {
        let reference = Reference {
            api_version: "networking.istio.io/v1".into(),
            kind: "VirtualService".into(),
            namespace: Some("back".into()),
            name: "broken".into(),
            uid: Some("u-3".into()),
            resource_version: Some("42".into()),
        };
        let e = event_for(&reference, "spec.http[0]: bad", "node-a");
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some("WeftInvalidObject"));
        assert_eq!(e.involved_object.uid.as_deref(), Some("u-3"));
        assert_eq!(e.involved_object.kind.as_deref(), Some("VirtualService"));
        assert_eq!(e.metadata.generate_name.as_deref(), Some("broken."));
        assert_eq!(e.metadata.namespace.as_deref(), Some("back"));
        assert!(e.message.unwrap().contains("spec.http[0]: bad"));
    }
}
