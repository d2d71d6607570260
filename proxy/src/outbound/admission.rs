//! Admission on the capture listener: the node-wide connection limit, taken at accept, and the
//! calling pod's, once its cgroup has identified it; and how long a relay may stay idle.

use std::time::Duration;

use super::plan::Plan;
use super::Outbound;
use crate::limits::{Listener, Reason, Slot};
use crate::registry::Pod;

/// Why a connection was refused by a limit, as its flow's error says it.
pub(super) fn refusal(reason: Reason, max: usize, pod: Option<&Pod>) -> String {
    match (reason, pod) {
        (Reason::PerPod, Some(pod)) => format!(
            "refused: pod {}/{} holds {max} connections through this node, its limit (--max-connections-per-pod)",
            pod.namespace, pod.name
        ),
        (Reason::PerPod, None) => format!(
            "refused: the calling cgroup holds {max} connections through this node, its limit (--max-connections-per-pod)"
        ),
        _ => format!(
            "refused: this node holds {max} connections, its limit (--max-connections)"
        ),
    }
}

impl Outbound {
    /// The connection's place under the node's limit (`slot`, taken at accept: `None` when
    /// there was none) and its pod's (by cgroup `cgroup`): kept while it lives, or why not.
    pub(super) fn admit(
        &self,
        slot: Option<Slot<u64>>,
        cgroup: u64,
        pod: Option<&Pod>,
    ) -> Result<Slot<u64>, String> {
        let admission = &self.inputs.telemetry.admission;
        let limit = &admission.capture;
        let (reason, max) = match slot {
            None => (Reason::Total, limit.max()),
            Some(mut slot) => {
                if slot.join(cgroup) {
                    return Ok(slot);
                }
                (Reason::PerPod, limit.max_per_key())
            }
        };
        admission.refused.count(Listener::Capture, reason);
        Err(refusal(reason, max, pod))
    }

    /// How long a relay planned so may move nothing before it is closed: its destination's
    /// DestinationRule `connectionPool.tcp.idleTimeout` (0: never), else the node's.
    pub(super) fn idle_timeout(&self, plan: &Plan) -> Option<Duration> {
        let from_rule = plan.destination.cluster.as_deref().and_then(|name| {
            // Istio's cluster name: outbound|<port>|<subset>|<host>.
            let mut parts = name.splitn(4, '|');
            let (_, port, subset, host) =
                (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
            let port = port.parse().ok()?;
            let subset = Some(subset).filter(|s| !s.is_empty());
            let namespace = plan.source.pod.as_ref().map(|p| p.namespace.as_str());
            let backend = self
                .inputs
                .routes
                .load()
                .backend(host, Some(port), subset, namespace)?;
            let tcp = backend.policy.connection_pool?.tcp?;
            tcp.idle_timeout.map(|d| d.0)
        });
        match from_rule {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => self.idle_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_limit() {
        assert_eq!(
            refusal(Reason::PerPod, 40, None),
            "refused: the calling cgroup holds 40 connections through this node, its limit (--max-connections-per-pod)"
        );
        assert_eq!(
            refusal(Reason::Total, 9, None),
            "refused: this node holds 9 connections, its limit (--max-connections)"
        );
    }
}
