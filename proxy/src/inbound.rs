//! The inbound path, on the destination node: what an HBONE `CONNECT` that passed mutual TLS
//! may reach (only pods hosted on this node: no open relay), whether the authenticated source
//! may reach it (AuthorizationPolicy), and the flow it leaves behind.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tracing::debug;

use crate::flows::{Destination, Flow, FlowStore, Source, Verdict};
use crate::outbound::workload_identity;
use crate::policy::{ConnRequest, Decision, PolicySet};
use crate::registry::{Pod, Registry, Snapshot};
use crate::tunnel::inbound::{
    InboundDecision, InboundHandler, InboundOutcome, InboundRequest, InboundVerdict,
};

pub struct InboundPolicy {
    node_name: String,
    trust_domain: String,
    registry: Arc<Registry>,
    policies: Arc<ArcSwap<PolicySet>>,
    flows: Arc<FlowStore>,
}

impl InboundPolicy {
    pub fn new(
        node_name: String,
        trust_domain: String,
        registry: Arc<Registry>,
        policies: Arc<ArcSwap<PolicySet>>,
        flows: Arc<FlowStore>,
    ) -> Self {
        Self {
            node_name,
            trust_domain,
            registry,
            policies,
            flows,
        }
    }

    /// The pod at `target` if this node hosts it.
    fn local_pod(&self, snapshot: &Snapshot, target: SocketAddr) -> Option<Arc<Pod>> {
        snapshot
            .pod_by_ip(target.ip())
            .filter(|p| p.node_name.as_deref() == Some(self.node_name.as_str()))
            .cloned()
    }

    fn authorize(&self, pod: &Pod, req: &InboundRequest) -> Decision {
        let principal = req.peer.principal();
        self.policies.load().authorize(&ConnRequest {
            destination: pod,
            destination_port: req.target.port(),
            destination_ip: Some(req.target.ip()),
            source_principal: Some(&principal),
            source_namespace: None,
            source_ip: req.forwarded_for,
        })
    }
}

impl InboundHandler for InboundPolicy {
    fn decide(&self, req: &InboundRequest) -> InboundDecision {
        let snapshot = self.registry.snapshot();
        let Some(pod) = self.local_pod(&snapshot, req.target) else {
            debug!(target = %req.target, peer = %req.peer, "CONNECT to an address that is not a pod on this node");
            return InboundDecision::NotFound;
        };
        match self.authorize(&pod, req) {
            Decision::Allow => InboundDecision::Deliver,
            Decision::Deny { policy, .. } => InboundDecision::Deny { policy },
        }
    }

    fn finished(&self, req: &InboundRequest, outcome: InboundOutcome) {
        let snapshot = self.registry.snapshot();
        let pod = self.local_pod(&snapshot, req.target);
        // The source pod, as far as the registry agrees with the authenticated identity.
        let source_pod = req
            .forwarded_for
            .and_then(|ip| snapshot.pod_by_ip(ip))
            .filter(|p| {
                p.namespace == req.peer.namespace()
                    && p.service_account == req.peer.service_account()
            });
        let (verdict, policy, error) = match outcome.verdict {
            InboundVerdict::Delivered => (Verdict::Forwarded, None, outcome.error),
            InboundVerdict::ConnectFailed => (Verdict::ConnectFailed, None, outcome.error),
            InboundVerdict::NotFound => (
                Verdict::ConnectFailed,
                None,
                Some("not a pod hosted on this node".into()),
            ),
            InboundVerdict::Denied => {
                let policy = pod.as_ref().and_then(|p| match self.authorize(p, req) {
                    Decision::Deny { policy, .. } => Some(policy),
                    Decision::Allow => None,
                });
                (
                    Verdict::Denied,
                    policy,
                    Some("denied by AuthorizationPolicy".into()),
                )
            }
        };
        let started = OffsetDateTime::now_utc() - outcome.duration;
        self.flows.record(Flow {
            seq: 0,
            time: started,
            node: self.node_name.clone(),
            source: Source {
                namespace: Some(req.peer.namespace().to_string()),
                pod: source_pod.map(|p| p.name.clone()),
                ip: req.forwarded_for,
                identity: Some(req.peer.to_string()),
            },
            original_destination: req.target.to_string(),
            destination: Destination {
                namespace: pod.as_ref().map(|p| p.namespace.clone()),
                pod: pod.as_ref().map(|p| p.name.clone()),
                service: None,
                address: Some(req.target.to_string()),
                identity: pod
                    .as_deref()
                    .and_then(|p| workload_identity(&self.trust_domain, p))
                    .map(|id| id.to_string()),
            },
            protocol: "tcp".into(),
            verdict,
            bytes_sent: outcome.bytes_to_target,
            bytes_received: outcome.bytes_from_target,
            duration_ms: outcome.duration.as_secs_f64() * 1000.0,
            error,
            cgroup_id: None,
            mtls: true,
            policy,
        });
    }
}
