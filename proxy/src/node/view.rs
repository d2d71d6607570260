//! What the admin API and `/metrics` read from the running node, as [`crate::admin::api`]
//! types.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::broadcast;

use super::NodeProxy;
use crate::admin::api::{
    CertInfo, ConfigDump, Flow, FlowCounts, FlowFilter, GraphEdge, LimitsStatus, MeshStatus,
    RefusedCount, RegistryDump, RegistryStatus, StatQuery, StatRow, StatValue, Stats, Status,
    TunnelStatus, UnattributedFlows, WatchStatus, WorkloadCounts, WorkloadInfo,
};
use crate::admin::server::NodeView;
use crate::outbound::cluster::StatKind;
use crate::telemetry::metrics::{ClusterSample, GaugeSource, NodeGauges, WatchSample};
use crate::workload::identity_of;

impl NodeView for NodeProxy {
    fn workloads(&self) -> Vec<WorkloadInfo> {
        let index = self.inputs.workloads.load();
        index
            .entries()
            .iter()
            .map(|e| WorkloadInfo {
                namespace: e.pod.namespace.clone(),
                pod: e.pod.name.clone(),
                ip: e.pod.ip,
                node: e.pod.node_name.clone(),
                service_account: e.pod.service_account.clone(),
                identity: e
                    .enrolled
                    .then(|| identity_of(&self.cfg.trust_domain, &e.pod))
                    .flatten()
                    .map(|id| id.to_string()),
                ready: e.pod.ready,
                enrolled: e.enrolled,
                cgroup_id: e.cgroup_id,
                cgroup_path: e.cgroup_path.clone(),
            })
            .collect()
    }

    fn config_dump(&self) -> ConfigDump {
        let registry = &self.inputs.registry;
        let snap = registry.snapshot();
        ConfigDump {
            config: serde_json::to_value(&self.cfg).unwrap_or_default(),
            proxy_address: self.proxy_addr.into(),
            registry: RegistryDump {
                generation: snap.generation,
                sources: snap.sources.clone(),
                last_error: registry.last_error(),
                not_applied: snap.not_applied.iter().map(|n| n.to_string()).collect(),
                warnings: snap.warnings.iter().map(|n| n.to_string()).collect(),
                snapshot: serde_json::to_value(&*snap).unwrap_or_default(),
            },
        }
    }

    fn status(&self) -> Status {
        let inputs = &self.inputs;
        let snap = inputs.registry.snapshot();
        let index = inputs.workloads.load();
        let policies = inputs.policies.load();
        let flows = inputs.telemetry.flows.counts();
        let ca = self.identity.ca_requests();
        Status {
            node: self.cfg.node_name.clone(),
            ready: NodeView::ready(self).is_ok(),
            proxy_address: self.proxy_addr.into(),
            registry: RegistryStatus {
                generation: snap.generation,
                loaded_at: time::OffsetDateTime::from(snap.loaded_at)
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                pods: snap.pods.len(),
                services: snap.services.len(),
                last_error: inputs.registry.last_error(),
                not_applied: snap.not_applied.iter().map(|n| n.to_string()).collect(),
                warnings: snap.warnings.iter().map(|n| n.to_string()).collect(),
                source: if self.kube.is_some() {
                    "kubernetes"
                } else {
                    "files"
                }
                .to_string(),
                watches: self
                    .kube
                    .iter()
                    .flat_map(|k| k.status())
                    .map(|k| WatchStatus {
                        kind: k.kind.to_string(),
                        api_version: k.api_version,
                        state: k.state.as_str().to_string(),
                        objects: k.objects,
                        last_sync: k.last_sync.map(crate::registry::model::rfc3339),
                        error: k.error,
                    })
                    .collect(),
            },
            workloads: WorkloadCounts {
                total: index.entries().len(),
                enrolled: index.entries().iter().filter(|e| e.enrolled).count(),
                uncaptured: self.uncaptured.lock().clone(),
                capture_gaps: self.capture_gaps.lock().clone(),
            },
            capture: self.capture.status(),
            mesh: MeshStatus {
                trust_domain: self.cfg.trust_domain.clone(),
                svids: self.identity.certs().len(),
                authorization_policies: policies.len(),
                peer_authentications: policies.peer_authentications(),
                fail_closed: policies.fail_closed_report(),
                ca: self.identity.authority(),
                ca_issued: ca.0,
                ca_failed: ca.1,
                ca_last_error: ca.2,
            },
            tunnel: TunnelStatus {
                outbound: self.pool.stats(),
                inbound: self.hbone.stats(),
            },
            limits: {
                // Atomics only: `/status` never takes a lock the capture listener's admission takes.
                let admission = &inputs.telemetry.admission;
                LimitsStatus {
                    capture_open: admission.capture.open() as u64,
                    max_connections: admission.capture.max() as u64,
                    max_connections_per_pod: admission.capture.max_per_key() as u64,
                    refused: admission
                        .refused
                        .totals()
                        .into_iter()
                        .map(|(listener, reason, count)| RefusedCount {
                            listener: listener.as_str().to_string(),
                            reason: reason.as_str().to_string(),
                            count,
                        })
                        .collect(),
                }
            },
            flows: FlowCounts {
                kept: flows.kept,
                capacity: flows.capacity,
                totals: inputs.telemetry.flows.totals(),
                unattributed: UnattributedFlows {
                    kept: flows.unattributed_kept,
                    capacity: flows.unattributed_capacity,
                    seen: flows.unattributed_seen,
                    dropped: flows.unattributed_dropped,
                },
            },
        }
    }

    fn certs(&self) -> Vec<CertInfo> {
        self.identity.certs()
    }

    fn ready(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::Acquire) {
            return Err("starting".into());
        }
        if let Some(p) = self.capture.programs().iter().find(|p| !p.attached) {
            return Err(format!("eBPF program {} is not attached", p.name));
        }
        Ok(())
    }

    fn flows(&self, filter: &FlowFilter) -> Vec<Arc<Flow>> {
        self.inputs.telemetry.flows.recent(filter)
    }

    fn stats(&self) -> Stats {
        let mut stats = Vec::new();
        for (cluster, values) in self.clusters.stats() {
            stats.extend(values.into_iter().map(|s| StatValue {
                name: format!("cluster.{cluster}.{}", s.name),
                value: s.value,
            }));
        }
        Stats { stats }
    }

    fn follow_flows(
        &self,
        filter: &FlowFilter,
    ) -> (Vec<Arc<Flow>>, broadcast::Receiver<Arc<Flow>>) {
        self.inputs.telemetry.flows.follow(filter)
    }

    fn stat(&self, query: &StatQuery) -> Vec<StatRow> {
        self.inputs.telemetry.golden.stat(query)
    }

    fn graph(&self, window: std::time::Duration) -> Vec<GraphEdge> {
        self.inputs.telemetry.golden.graph(window)
    }
}

impl GaugeSource for NodeProxy {
    fn ready(&self) -> Result<(), String> {
        NodeView::ready(self)
    }

    fn gauges(&self) -> NodeGauges {
        let index = self.inputs.workloads.load();
        let registry = &self.inputs.registry;
        NodeGauges {
            ebpf: self.capture.counters(),
            workloads: index.entries().len() as u64,
            enrolled_workloads: index.entries().iter().filter(|e| e.enrolled).count() as u64,
            uncaptured_workloads: self.uncaptured.lock().len() as u64,
            ca_requests_issued: self.identity.ca_requests().0,
            ca_requests_failed: self.identity.ca_requests().1,
            svid_earliest_expiry_seconds: self.identity.earliest_expiry().map(|d| d.as_secs()),
            capture_gaps: self
                .capture_gaps_total
                .load(std::sync::atomic::Ordering::Relaxed),
            registry_generation: registry.snapshot().generation,
            registry_reload_failed: registry.last_error().is_some(),
            registry_not_applied: registry.snapshot().not_applied.len() as u64,
            registry_watches: self
                .kube
                .iter()
                .flat_map(|k| k.status())
                .map(|k| WatchSample {
                    kind: k.kind,
                    state: k.state.as_str(),
                    objects: k.objects as u64,
                    last_sync_age: k
                        .last_sync
                        .and_then(|t| t.elapsed().ok())
                        .map(|d| d.as_secs_f64()),
                })
                .collect(),
            clusters: self
                .clusters
                .stats()
                .into_iter()
                .flat_map(|(cluster, values)| {
                    values.into_iter().map(move |s| ClusterSample {
                        cluster: cluster.clone(),
                        stat: s.name,
                        gauge: s.kind == StatKind::Gauge,
                        value: s.value,
                    })
                })
                .collect(),
        }
    }
}
