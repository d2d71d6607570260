//! Storage: every resource type's objects under one global resourceVersion counter (etcd's
//! revision), a history of changes for watches, exact-version lists and continue tokens, and
//! the watchers to notify.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::resources::{self, ResId, RESOURCES, SYSTEM_NAMESPACES};
use super::status::ApiError;

/// A stored object (always in the preferred version, with `kind` and `apiVersion`).
pub(crate) type Obj = Arc<Value>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, as a watcher sees it.
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub res: ResId,
    pub key: String,
    pub typ: ChangeType,
    /// The new state; for a deletion the last state with the deletion's resourceVersion.
    pub object: Obj,
    /// The state before (none for an addition).
    pub prev: Option<Obj>,
}

/// What a watch stream receives.
#[derive(Debug)]
pub(crate) enum WatchMsg {
    Change(Arc<Change>),
    Bookmark(u64),
    /// Send `ERROR` 410 with this message, then end.
    Expired(String),
    /// End the stream cleanly.
    Close,
}

struct Watcher {
    id: u64,
    res: ResId,
    tx: UnboundedSender<WatchMsg>,
}

/// A registered watch: its receiving end and a sender for its own bookmarks (sent under the
/// store lock, so they never overtake a change).
pub(crate) struct WatchReg {
    pub id: u64,
    pub rx: UnboundedReceiver<WatchMsg>,
    pub tx: UnboundedSender<WatchMsg>,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum WatchFrom {
    /// Synthetic `ADDED` events for the current state, then changes.
    State,
    /// Changes after now.
    Now,
    /// Changes after this resourceVersion (from the history).
    Rv(u64),
}

/// Which part of an object an update writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpdateScope {
    /// The whole object (control API, types without a status subresource).
    All,
    /// Everything but `status` (the main resource of a type with a status subresource).
    Main,
    /// Only `status` (the `/status` subresource).
    Status,
}

/// Default number of changes kept before the oldest are forgotten (as etcd's auto-compaction).
pub(crate) const DEFAULT_HISTORY_LIMIT: usize = 100_000;

pub(crate) struct Store {
    rv: u64,
    /// Changes after `floor` are all in `history`; older resourceVersions are compacted.
    floor: u64,
    objects: Vec<BTreeMap<String, Obj>>,
    history: VecDeque<Arc<Change>>,
    pub history_limit: usize,
    watchers: Vec<Watcher>,
    next_watcher: u64,
}

/// The storage key of an object: `namespace/name`, or `name` for cluster-scoped types.
pub(crate) fn key(res: ResId, namespace: Option<&str>, name: &str) -> String {
    if RESOURCES[res].namespaced {
        format!("{}/{name}", namespace.unwrap_or_default())
    } else {
        name.to_string()
    }
}

/// The key prefix of a namespace's objects (empty: all).
pub(crate) fn prefix(res: ResId, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if RESOURCES[res].namespaced => format!("{ns}/"),
        _ => String::new(),
    }
}

pub(crate) fn crd_res() -> ResId {
    resources::find("apiextensions.k8s.io", "v1", "customresourcedefinitions").expect("CRD type")
}

fn namespace_res() -> ResId {
    resources::find("", "v1", "namespaces").expect("namespace type")
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// `metadata.resourceVersion` as a number.
pub(crate) fn object_rv(obj: &Value) -> u64 {
    meta_str(obj, "resourceVersion")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn metadata_mut(obj: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

/// The object without the `metadata` the server keeps up by itself: two objects equal by this
/// are the same content (no write, no event). uid and creationTimestamp count (a write that
/// leaves them unset keeps the stored ones).
fn content(obj: &Value) -> Value {
    let mut c = obj.clone();
    if let Some(m) = c.get_mut("metadata").and_then(Value::as_object_mut) {
        for f in ["resourceVersion", "generation", "managedFields", "selfLink"] {
            m.remove(f);
        }
    }
    c
}

/// The object without `metadata` and `status`: what `metadata.generation` counts changes of.
fn spec_part(obj: &Value) -> Value {
    let mut c = obj.clone();
    if let Some(m) = c.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    c
}

fn set_status(obj: &mut Value, status: Option<Value>) {
    if let Some(m) = obj.as_object_mut() {
        match status {
            Some(s) => m.insert("status".into(), s),
            None => m.remove("status"),
        };
    }
}

/// Defaults the server applies to every write of a type.
fn apply_defaults(res: ResId, obj: &mut Value) {
    if res == namespace_res() {
        let name = meta_str(obj, "name").unwrap_or_default().to_string();
        let meta = metadata_mut(obj);
        if !meta.get("labels").is_some_and(Value::is_object) {
            meta.insert("labels".into(), json!({}));
        }
        meta["labels"]["kubernetes.io/metadata.name"] = json!(name);
        if obj.pointer("/spec/finalizers").is_none() {
            if !obj.get("spec").is_some_and(Value::is_object) {
                obj["spec"] = json!({});
            }
            obj["spec"]["finalizers"] = json!(["kubernetes"]);
        }
        if obj.pointer("/status/phase").is_none() {
            if !obj.get("status").is_some_and(Value::is_object) {
                obj["status"] = json!({});
            }
            obj["status"]["phase"] = json!("Active");
        }
    }
}

impl Store {
    pub fn new() -> Self {
        let mut s = Store {
            rv: 0,
            floor: 0,
            objects: vec![BTreeMap::new(); RESOURCES.len()],
            history: VecDeque::new(),
            history_limit: DEFAULT_HISTORY_LIMIT,
            watchers: Vec::new(),
            next_watcher: 1,
        };
        for ns in SYSTEM_NAMESPACES {
            s.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
                .expect("system namespace");
        }
        for (id, r) in RESOURCES.iter().enumerate() {
            if r.custom {
                s.install(id, true);
            }
        }
        s
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion still served (watches and continues from older ones: 410).
    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn get(&self, res: ResId, key: &str) -> Option<&Obj> {
        self.objects[res].get(key)
    }

    /// Current objects of a type, in key order.
    pub fn objects(&self, res: ResId) -> impl Iterator<Item = &Obj> {
        self.objects[res].values()
    }

    /// Whether a type is served: built-in, or a custom type whose CRD exists.
    pub fn installed(&self, res: ResId) -> bool {
        let r = &RESOURCES[res];
        !r.custom || self.objects[crd_res()].contains_key(&r.crd_name())
    }

    /// Creates or deletes the CRD of a custom type.
    pub fn install(&mut self, res: ResId, on: bool) {
        let name = RESOURCES[res].crd_name();
        match (on, self.installed(res)) {
            (true, false) => {
                self.put(resources::crd_object(res)).expect("CRD");
            }
            (false, true) => {
                self.remove(crd_res(), &name);
            }
            _ => {}
        }
    }

    /// Objects of a type as they were at resourceVersion `at` (≤ now), rebuilt from the history.
    pub fn snapshot(&self, res: ResId, at: u64) -> Option<Cow<'_, BTreeMap<String, Obj>>> {
        if at >= self.rv {
            return Some(Cow::Borrowed(&self.objects[res]));
        }
        if at < self.floor {
            return None;
        }
        let mut m = self.objects[res].clone();
        for ch in self.history.iter().rev() {
            if ch.rv <= at {
                break;
            }
            if ch.res != res {
                continue;
            }
            match (ch.typ, &ch.prev) {
                (ChangeType::Added, _) => {
                    m.remove(&ch.key);
                }
                (_, Some(prev)) => {
                    m.insert(ch.key.clone(), prev.clone());
                }
                (_, None) => {}
            }
        }
        Some(Cow::Owned(m))
    }

    /// Records a write: assigns the next resourceVersion, stores it, keeps it in the history and
    /// tells the watchers of the type.
    fn commit(&mut self, res: ResId, key: String, typ: ChangeType, mut obj: Value) -> Obj {
        self.rv += 1;
        metadata_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let obj = Arc::new(obj);
        let prev = if typ == ChangeType::Deleted {
            self.objects[res].remove(&key)
        } else {
            self.objects[res].insert(key.clone(), obj.clone())
        };
        let change = Arc::new(Change {
            rv: self.rv,
            res,
            key,
            typ,
            object: obj.clone(),
            prev,
        });
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
        self.watchers
            .retain(|w| w.res != res || w.tx.send(WatchMsg::Change(change.clone())).is_ok());
        if res == crd_res() && typ == ChangeType::Deleted {
            if let Some(custom) = resources::custom_type_of_crd(&change.key) {
                self.close_watchers(custom);
            }
        }
        obj
    }

    /// Creates an object that does not exist yet (`obj` is complete but for the metadata the
    /// server assigns: uid and creationTimestamp are kept when set).
    pub fn create(&mut self, res: ResId, mut obj: Value) -> Result<Obj, ApiError> {
        let r = &RESOURCES[res];
        apply_defaults(res, &mut obj);
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        let key = key(res, meta_str(&obj, "namespace"), &name);
        if self.objects[res].contains_key(&key) {
            return Err(ApiError::already_exists(r, &name));
        }
        let meta = metadata_mut(&mut obj);
        let has_uid = meta
            .get("uid")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty());
        if !has_uid {
            meta.insert("uid".into(), json!(new_uid()));
        }
        if !meta.contains_key("creationTimestamp") || meta["creationTimestamp"].is_null() {
            meta.insert(
                "creationTimestamp".into(),
                json!(rfc3339(SystemTime::now())),
            );
        }
        if r.custom || res == crd_res() {
            meta.insert("generation".into(), json!(1));
        } else {
            meta.remove("generation");
        }
        meta.remove("deletionTimestamp");
        Ok(self.commit(res, key, ChangeType::Added, obj))
    }

    /// Replaces an existing object. `precondition`: the resourceVersion the writer read (409 if
    /// stale). Keeps uid and creationTimestamp unless `obj` sets them; counts generation for
    /// custom types. Writes nothing (same resourceVersion, no event) when the content is unchanged,
    /// as etcd3's GuaranteedUpdate. Returns the object and whether it changed.
    pub fn update(
        &mut self,
        res: ResId,
        mut obj: Value,
        precondition: Option<&str>,
        scope: UpdateScope,
    ) -> Result<(Obj, bool), ApiError> {
        let r = &RESOURCES[res];
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        let key = key(res, meta_str(&obj, "namespace"), &name);
        let Some(old) = self.objects[res].get(&key).cloned() else {
            return Err(ApiError::not_found(r, &name));
        };
        if let Some(p) = precondition.filter(|p| !p.is_empty()) {
            if meta_str(&old, "resourceVersion") != Some(p) {
                return Err(ApiError::modified(r, &name));
            }
        }
        match scope {
            UpdateScope::All => {}
            UpdateScope::Main => set_status(&mut obj, old.get("status").cloned()),
            UpdateScope::Status => {
                let status = obj.get("status").cloned();
                obj = (*old).clone();
                set_status(&mut obj, status);
            }
        }
        apply_defaults(res, &mut obj);
        let meta = metadata_mut(&mut obj);
        for f in ["uid", "creationTimestamp"] {
            let unset = meta
                .get(f)
                .is_none_or(|v| v.is_null() || v.as_str() == Some(""));
            if unset {
                if let Some(v) = old["metadata"].get(f) {
                    meta.insert(f.into(), v.clone());
                }
            }
        }
        match old["metadata"].get("generation") {
            Some(g) => {
                meta.insert("generation".into(), g.clone());
            }
            None => {
                meta.remove("generation");
            }
        }
        if content(&obj) == content(&old) {
            return Ok((old, false));
        }
        if (r.custom || res == crd_res()) && spec_part(&obj) != spec_part(&old) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            metadata_mut(&mut obj).insert("generation".into(), json!(g));
        }
        Ok((self.commit(res, key, ChangeType::Modified, obj), true))
    }

    /// Creates or replaces by key (the control API's write; no preconditions).
    pub fn put(&mut self, obj: Value) -> Result<Obj, ApiError> {
        let (res, obj) = canonical(obj)?;
        let name = meta_str(&obj, "name").unwrap_or_default();
        let key = key(res, meta_str(&obj, "namespace"), name);
        if self.objects[res].contains_key(&key) {
            Ok(self.update(res, obj, None, UpdateScope::All)?.0)
        } else {
            self.create(res, obj)
        }
    }

    /// Deletes an object; a namespace takes its objects with it. Returns the deleted state
    /// (with the deletion's resourceVersion).
    pub fn remove(&mut self, res: ResId, key: &str) -> Option<Obj> {
        let old = self.objects[res].get(key)?.clone();
        if res == namespace_res() {
            let pre = format!("{key}/");
            for (id, r) in RESOURCES.iter().enumerate() {
                if !r.namespaced {
                    continue;
                }
                let keys: Vec<String> = self.objects[id]
                    .range(pre.clone()..)
                    .take_while(|(k, _)| k.starts_with(&pre))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in keys {
                    self.remove(id, &k);
                }
            }
        }
        Some(self.commit(res, key.to_string(), ChangeType::Deleted, (*old).clone()))
    }

    /// Registers a watch of a type. `Err(floor)` when `from` is older than the history.
    pub fn watch(
        &mut self,
        res: ResId,
        from: WatchFrom,
    ) -> Result<(WatchReg, Vec<Arc<Change>>), u64> {
        let initial: Vec<Arc<Change>> = match from {
            WatchFrom::Now => vec![],
            WatchFrom::State => self.objects[res]
                .iter()
                .map(|(k, o)| {
                    Arc::new(Change {
                        rv: object_rv(o),
                        res,
                        key: k.clone(),
                        typ: ChangeType::Added,
                        object: o.clone(),
                        prev: None,
                    })
                })
                .collect(),
            WatchFrom::Rv(rv) => {
                if rv < self.floor {
                    return Err(self.floor);
                }
                self.history
                    .iter()
                    .filter(|c| c.rv > rv && c.res == res)
                    .cloned()
                    .collect()
            }
        };
        let (tx, rx) = unbounded_channel();
        let id = self.next_watcher;
        self.next_watcher += 1;
        self.watchers.push(Watcher {
            id,
            res,
            tx: tx.clone(),
        });
        Ok((WatchReg { id, rx, tx }, initial))
    }

    pub fn unwatch(&mut self, id: u64) {
        self.watchers.retain(|w| w.id != id);
    }

    /// Ends every watch of a type cleanly (its CRD went away).
    pub fn close_watchers(&mut self, res: ResId) {
        self.watchers.retain(|w| {
            if w.res == res {
                let _ = w.tx.send(WatchMsg::Close);
                false
            } else {
                true
            }
        });
    }

    /// Number of open watches (for tests of the stand-in).
    pub fn watch_count(&self) -> usize {
        self.watchers.iter().filter(|w| !w.tx.is_closed()).count()
    }

    /// Forgets the history up to now, as etcd's compaction: older resourceVersions answer 410
    /// and every open watch gets `ERROR` 410 and ends.
    pub fn compact(&mut self) {
        self.floor = self.rv;
        self.history.clear();
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(WatchMsg::Expired(
                "The resourceVersion for the provided watch is too old.".into(),
            ));
        }
    }
}

/// Resolves an object's type from `apiVersion`/`kind` and puts it in the stored form: preferred
/// version, namespace `default` if a namespaced object has none, no namespace for cluster-scoped.
pub(crate) fn canonical(mut obj: Value) -> Result<(ResId, Value), ApiError> {
    let api_version = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    let Some(res) = resources::find_kind(api_version, kind) else {
        return Err(ApiError::bad_request(format!(
            "no kind \"{kind}\" is registered for version \"{api_version}\""
        )));
    };
    let r = &RESOURCES[res];
    obj["apiVersion"] = json!(r.api_version(r.preferred()));
    let meta = metadata_mut(&mut obj);
    if meta
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err(ApiError::invalid(
            r,
            "",
            "metadata.name",
            "FieldValueRequired",
            "Required value: name or generateName is required",
        ));
    }
    if r.namespaced {
        if meta
            .get("namespace")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            meta.insert("namespace".into(), json!("default"));
        }
    } else {
        meta.remove("namespace");
    }
    Ok((res, obj))
}

/// A random RFC 4122 version 4 UUID.
pub(crate) fn new_uid() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b)
        .expect("random");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The 5-character suffix `generateName` gets (Kubernetes' alphabet without vowels).
pub(crate) fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut b = [0u8; 5];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b)
        .expect("random");
    b.iter()
        .map(|x| ALPHABET[*x as usize % ALPHABET.len()] as char)
        .collect()
}

/// Days since 1970-01-01 to (year, month, day) (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2006-01-02T15:04:05Z` (metav1.Time's JSON form: UTC, whole seconds).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// Parses RFC 3339 (`Z` or `±hh:mm`, optional fraction).
pub(crate) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        rest = r.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let offset = match rest {
        "Z" | "z" => 0,
        r if r.len() == 6 && (r.starts_with('+') || r.starts_with('-')) => {
            let v = r[1..3].parse::<i64>().ok()? * 3600 + r[4..6].parse::<i64>().ok()? * 60;
            if r.starts_with('-') {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo as u32, d as u32) * 86_400 + h * 3600 + mi * 60 + se - offset;
    u64::try_from(secs)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20Z"), Some(t));
        assert_eq!(parse_rfc3339("2023-11-14T23:13:20.5+01:00"), Some(t));
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn snapshots_undo_later_changes() {
        let mut s = Store::new();
        let pods = resources::find("", "v1", "pods").unwrap();
        let pod = |name: &str, v: &str| json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"v": v}}});
        s.put(pod("a", "1")).unwrap();
        let at = s.rv();
        s.put(pod("a", "2")).unwrap();
        s.put(pod("b", "1")).unwrap();
        s.remove(pods, "default/a");
        let snap = s.snapshot(pods, at).unwrap();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap["default/a"]["metadata"]["labels"]["v"], "1");
        assert_eq!(s.snapshot(pods, s.rv()).unwrap().len(), 1);
        s.compact();
        assert!(s.snapshot(pods, at).is_none());
        // Unchanged content: no new resourceVersion.
        let rv = s.rv();
        s.put(pod("b", "1")).unwrap();
        assert_eq!(s.rv(), rv);
    }
}
