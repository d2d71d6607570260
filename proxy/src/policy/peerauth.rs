//! PeerAuthentication: which mTLS mode applies to a pod and port.
//!
//! Levels, most specific wins: workload (a selector, in the pod's namespace) > namespace (no
//! selector, in the pod's namespace) > mesh (no selector, in the root namespace) > PERMISSIVE.
//! `UNSET` (or no `mtls`) inherits from the next level out; a `portLevelMtls` entry overrides the
//! workload's mode for that container port, `UNSET` there inheriting the workload's effective
//! mode. Where several policies compete at one level the oldest (`metadata.creationTimestamp`,
//! then name; objects without a timestamp last) wins, as in Istio. A root-namespace policy with
//! a selector is a workload policy of the root namespace's pods only: it does not reach other
//! namespaces (Istio's composition does not apply such a policy at all).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::Serialize;
use time::OffsetDateTime;

use super::{selector_pairs, selects, ByNamespace, PodMtls};
use crate::registry::kinds::security::{parse_port, ModeSetting, PeerAuthenticationSpec};
use crate::registry::Pod;

/// Effective mTLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Only mTLS (HBONE) connections are accepted.
    Strict,
    /// mTLS and plaintext are accepted.
    Permissive,
    /// Plaintext only (weft still accepts HBONE: there is no sidecar to bypass).
    Disable,
}

impl MtlsMode {
    /// Istio's spelling: `STRICT`, `PERMISSIVE`, `DISABLE`.
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The mode a setting stands for; `UNSET` inherits from the enclosing level.
fn mode_of(setting: ModeSetting) -> Option<MtlsMode> {
    match setting {
        ModeSetting::Unset => None,
        ModeSetting::Disable => Some(MtlsMode::Disable),
        ModeSetting::Permissive => Some(MtlsMode::Permissive),
        ModeSetting::Strict => Some(MtlsMode::Strict),
    }
}

/// Sort key: oldest first, undated last, then by name.
type Age = (bool, Option<OffsetDateTime>, String);

#[derive(Debug, Clone)]
struct Workload {
    age: Age,
    selector: Vec<(String, String)>,
    mode: ModeSetting,
    /// By port.
    ports: Vec<(u16, ModeSetting)>,
}

/// PeerAuthentications by level.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// Mode of the mesh-wide policy (`None`: none, or UNSET).
    mesh: Option<MtlsMode>,
    /// Namespace → mode of its namespace-wide policy (`None`: UNSET).
    namespaces: ByNamespace<Option<MtlsMode>>,
    /// Namespace → workload policies, oldest first.
    workloads: ByNamespace<Vec<Workload>>,
    count: usize,
}

pub(crate) struct Builder {
    root_namespace: String,
    mesh: Option<(Age, ModeSetting)>,
    namespaces: HashMap<String, Option<(Age, ModeSetting)>>,
    workloads: HashMap<String, Vec<Workload>>,
    count: usize,
}

impl Builder {
    pub(crate) fn new(root_namespace: &str) -> Builder {
        Builder {
            root_namespace: root_namespace.to_string(),
            mesh: None,
            namespaces: HashMap::new(),
            workloads: HashMap::new(),
            count: 0,
        }
    }

    /// Adds a policy the registry checked.
    pub(crate) fn add(
        &mut self,
        namespace: &str,
        name: &str,
        created: Option<OffsetDateTime>,
        spec: &PeerAuthenticationSpec,
    ) {
        self.count += 1;
        let age: Age = (created.is_none(), created, name.to_string());
        let mode = spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default();
        let selector = selector_pairs(&spec.selector);
        if selector.is_empty() {
            let slot = if namespace == self.root_namespace {
                &mut self.mesh
            } else {
                self.namespaces.entry(namespace.to_string()).or_insert(None)
            };
            if slot.as_ref().is_none_or(|(a, _)| age < *a) {
                *slot = Some((age, mode));
            }
            return;
        }
        let mut ports: Vec<(u16, ModeSetting)> = spec
            .port_level_mtls
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((parse_port(k)?, v.mode)))
            .collect();
        ports.sort_by_key(|(p, _)| *p);
        self.workloads
            .entry(namespace.to_string())
            .or_default()
            .push(Workload {
                age,
                selector,
                mode,
                ports,
            });
    }

    pub(crate) fn finish(self) -> Index {
        let mut workloads = self.workloads;
        for list in workloads.values_mut() {
            list.sort_by(|a, b| a.age.cmp(&b.age));
        }
        Index {
            mesh: self.mesh.and_then(|(_, m)| mode_of(m)),
            namespaces: self
                .namespaces
                .into_iter()
                .map(|(ns, slot)| (ns, slot.and_then(|(_, m)| mode_of(m))))
                .collect(),
            workloads,
            count: self.count,
        }
    }
}

impl Index {
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// The pod's mode before port overrides, and its workload policy.
    fn workload(&self, pod: &Pod) -> (MtlsMode, Option<&Workload>) {
        let ns = pod.namespace.as_str();
        let inherited = self
            .namespaces
            .get(ns)
            .copied()
            .flatten()
            .or(self.mesh)
            .unwrap_or(MtlsMode::Permissive);
        let workload = self
            .workloads
            .get(ns)
            .and_then(|list| list.iter().find(|w| selects(&w.selector, pod)));
        match workload {
            Some(w) => (mode_of(w.mode).unwrap_or(inherited), Some(w)),
            None => (inherited, None),
        }
    }

    pub(crate) fn mode(&self, pod: &Pod, port: u16) -> MtlsMode {
        let (mode, workload) = self.workload(pod);
        workload
            .and_then(|w| {
                let i = w.ports.binary_search_by_key(&port, |(p, _)| *p).ok()?;
                mode_of(w.ports[i].1)
            })
            .unwrap_or(mode)
    }

    pub(crate) fn pod(&self, pod: &Pod) -> PodMtls {
        let (mode, workload) = self.workload(pod);
        let ports: BTreeMap<u16, MtlsMode> = workload
            .map(|w| {
                w.ports
                    .iter()
                    .map(|(p, m)| (*p, mode_of(*m).unwrap_or(mode)))
                    .collect()
            })
            .unwrap_or_default();
        PodMtls {
            default: mode,
            ports,
        }
    }
}
