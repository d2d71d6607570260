//! The inbound path, on the destination node: an HBONE `CONNECT` that passed mutual TLS is
//! admitted ([`authorize::admit`]: only pods hosted here, then AuthorizationPolicy), delivered
//! to the pod through the upstream connector, relayed, and recorded.
//!
//! May import: `inputs`, `registry`, `policy`, `identity`, `workload`, `tunnel` (server),
//! `upstream`, `relay`, `telemetry`, `admin::api`.

pub mod authorize;

use std::sync::Arc;

use tracing::debug;

use self::authorize::{admit, calling_pod, Admission, Caller};
use crate::admin::api::Verdict;
use crate::inputs::ProxyInputs;
use crate::policy::deny_message;
use crate::relay::Relayed;
use crate::telemetry::ConnectionRecord;
use crate::tunnel::server::{Handler, Pending, Rejection};
use crate::upstream::OnBehalfOf;
use crate::workload::identity_of;

/// Answers the `CONNECT`s of the HBONE server.
#[derive(Debug)]
pub struct Inbound {
    inputs: Arc<ProxyInputs>,
}

impl Inbound {
    pub fn new(inputs: Arc<ProxyInputs>) -> Inbound {
        Inbound { inputs }
    }
}

impl Handler for Inbound {
    async fn serve(self: Arc<Self>, pending: Pending) {
        let inputs = &self.inputs;
        let req = pending.request().clone();
        let caller = Caller {
            identity: &req.peer,
            ip: req.forwarded_for,
        };
        let mut record = ConnectionRecord::accepted(&inputs.telemetry);
        record
            .source_identity(&req.peer)
            .original_destination(req.target)
            .destination_address(req.target)
            .mtls();
        if let Some(ip) = req.forwarded_for {
            record.source_ip(ip);
        }
        // Decided on the snapshot and policies in force now; neither is held while relaying.
        let admission = {
            let snapshot = inputs.registry.snapshot();
            if let Some(pod) = calling_pod(&snapshot, &caller) {
                record.source_pod(&pod);
            }
            admit(
                &snapshot,
                &inputs.policies.load(),
                &inputs.node,
                req.target,
                &caller,
            )
        };
        let pod = match admission {
            Admission::NotHere => {
                debug!(target = %req.target, peer = %req.peer,
                    "CONNECT to an address that is not a pod on this node");
                pending.refuse(Rejection::NotFound);
                record.finish(
                    Verdict::ConnectFailed,
                    Some("not a pod hosted on this node"),
                );
                return;
            }
            Admission::Denied {
                pod,
                policy,
                reason,
            } => {
                record_destination(&mut record, inputs, &pod);
                pending.refuse(Rejection::Denied {
                    policy: policy.clone(),
                    reason: reason.as_str().to_string(),
                });
                let message = deny_message(&policy, Some(reason.as_str()));
                record.policy(policy);
                record.finish(Verdict::Denied, Some(message));
                return;
            }
            Admission::Deliver { pod } => pod,
        };
        record_destination(&mut record, inputs, &pod);
        let upstream = match inputs
            .connector
            .connect(OnBehalfOf::Peer(&req.peer), req.target)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                pending.refuse(Rejection::Unavailable);
                record.finish(Verdict::ConnectFailed, Some(e));
                return;
            }
        };
        let stream = match pending.accept() {
            Ok(s) => s,
            Err(e) => {
                // The client went away meanwhile.
                record.finish(Verdict::Forwarded, Some(e));
                return;
            }
        };
        // Seen from the source: what it sent went stream → pod.
        record
            .relay(async move {
                let r = stream.relay(upstream).await;
                Relayed {
                    sent: r.received,
                    received: r.sent,
                    error: r.error,
                }
            })
            .await;
        record.finish(Verdict::Forwarded, None::<&str>);
    }
}

fn record_destination(
    record: &mut ConnectionRecord,
    inputs: &ProxyInputs,
    pod: &crate::registry::Pod,
) {
    record.destination_pod(pod);
    if let Some(id) = identity_of(&inputs.trust_domain, pod) {
        record.destination_identity(&id);
    }
}
