//! The inbound path, on the destination node: an HBONE `CONNECT` that passed mutual TLS is
//! admitted ([`authorize::admit`]: only pods hosted here, then AuthorizationPolicy), delivered
//! to the pod through the upstream connector, relayed, and recorded.
//!
//! May import: `inputs`, `registry`, `policy`, `identity`, `workload`, `tunnel` (server),
//! `upstream`, `relay`, `telemetry`, `admin::api`.

pub mod authorize;
pub mod http;

use std::sync::Arc;

use tracing::debug;

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use self::authorize::{
    admit, authorize, calling_pod, declared_http, services_of, verified_source_ip, Admission,
    Caller,
};
use crate::admin::api::Verdict;
use crate::exchange::guard::Rewind;
use crate::exchange::ClientVersion;
use crate::inputs::ProxyInputs;
use crate::l7::sniff::{sniff, Sniffed};
use crate::policy::deny_message;
use crate::policy::Decision;
use crate::registry::{Pod, Service};
use crate::relay::Relayed;
use crate::telemetry::istio::Reporter;
use crate::telemetry::ConnectionRecord;
use crate::tunnel::server::{Handler, Pending, Rejection};
use crate::tunnel::Stream;
use crate::upstream::http::HttpPool;
use crate::upstream::OnBehalfOf;
use crate::workload::identity_of;

/// Answers the `CONNECT`s of the HBONE server.
pub struct Inbound {
    inputs: Arc<ProxyInputs>,
    config: InboundConfig,
    /// Connections to this node's pods for HTTP the tunnels carry.
    clients: Arc<HttpPool>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("config", &self.config)
            .finish()
    }
}

/// Limits of the inbound side.
#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// Largest HTTP request head accepted in a tunnel.
    pub max_request_headers: usize,
    /// How long a tunnel's first bytes may take to tell HTTP from TCP, when policies need to
    /// know.
    pub detection_timeout: Duration,
    /// A tunnelled TCP connection that moves nothing for this long is closed cleanly
    /// (`--idle-timeout`; `None`: never).
    pub idle_timeout: Option<Duration>,
}

impl Inbound {
    pub fn new(inputs: Arc<ProxyInputs>, config: InboundConfig) -> Inbound {
        Inbound {
            inputs,
            config,
            clients: Arc::default(),
        }
    }
}

impl Handler for Inbound {
    async fn serve(self: Arc<Self>, pending: Pending) {
        let inputs = &self.inputs;
        let _hold = inputs.draining.hold();
        let mut req = pending.request().clone();
        // From here on the source address is the verified one (or unknown), never the claim.
        let claimed = req.forwarded_for.take();
        req.forwarded_for = verified_source_ip(
            &inputs.registry.snapshot(),
            &req.peer,
            req.peer_addr,
            claimed,
        );
        if claimed.is_some() && req.forwarded_for.is_none() {
            debug!(peer = %req.peer, node = %req.peer_addr, claimed = ?claimed,
                "HBONE source address not vouched for: unknown to policies");
        }
        let caller = Caller {
            identity: &req.peer,
            ip: req.forwarded_for,
        };
        let mut record = ConnectionRecord::accepted(&inputs.telemetry);
        record
            .reporter(Reporter::Destination)
            .source_identity(&req.peer)
            .original_destination(req.target)
            .destination_address(req.target)
            .mtls();
        if let Some(ip) = req.forwarded_for {
            record.source_ip(ip);
        }
        // Decided on the snapshot and policies in force now; neither is held while relaying,
        // but a change of policies from now on is heard.
        let policy_changes = inputs.policy_generation.subscribe();
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
            Admission::Deliver { pod, per_request } => (pod, per_request),
        };
        let (pod, per_request) = pod;
        record_destination(&mut record, inputs, &pod);
        // The Services the pod serves on this port: what the call's `destination_service` is.
        let services = {
            let snapshot = inputs.registry.snapshot();
            let mut all: Vec<Arc<Service>> = services_of(&snapshot, &pod, req.target.port())
                .map(|(s, _)| s.clone())
                .collect();
            all.dedup_by(|a, b| Arc::ptr_eq(a, b));
            all
        };
        if let Some(service) = services.first() {
            record.service(service);
        }
        // Boxed: serving HTTP takes far more state than relaying bytes, and every stream's
        // task would otherwise be allocated (and moved) at that size, TCP ones too.
        if per_request {
            Box::pin(self.per_request(pending, pod, services, req, None, record)).await;
            return;
        }
        // A port a Service declares HTTP is served request by request too, so that each
        // request is reported here, as the destination; connected to first, as any tunnel
        // that needs no request's decision is, so that a pod that refuses is a refused tunnel
        // (the caller's node sees a connect failure, as without HTTP).
        let declared = declared_http(&inputs.registry.snapshot(), &pod, req.target.port());
        let upstream = match inputs
            .connector
            .connect(
                OnBehalfOf::Peer {
                    identity: &req.peer,
                    source: req.forwarded_for,
                },
                req.target,
            )
            .await
        {
            Ok(s) => s,
            Err(e) => {
                pending.refuse(Rejection::Unavailable);
                record.finish(Verdict::ConnectFailed, Some(e));
                return;
            }
        };
        if declared {
            Box::pin(self.per_request(pending, pod, services, req, Some(upstream), record)).await;
            return;
        }
        let stream = match pending.accept() {
            Ok(s) => s,
            Err(e) => {
                // The client went away meanwhile.
                record.finish(Verdict::Forwarded, Some(e));
                return;
            }
        };
        // Seen from the source: what it sent went stream → pod. Admitted under the policies
        // of now: when they change so that this tunnel would no longer be relayed as it is
        // (denied, or its requests to be authorized one by one), it is closed, and the
        // client's next connection is decided anew.
        let revoked = self.revoked(&req, policy_changes);
        let cut = inputs.draining.cut();
        let idle_timeout = self.config.idle_timeout;
        record
            .relay(async move {
                let r = stream
                    .relay_bounded(upstream, revoked, cut, idle_timeout)
                    .await;
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

impl Inbound {
    /// Waits until the policies in force would no longer relay `req`'s tunnel as bytes;
    /// returns why.
    async fn revoked(
        &self,
        req: &crate::tunnel::server::ConnectRequest,
        mut changes: tokio::sync::watch::Receiver<u64>,
    ) -> String {
        let inputs = &self.inputs;
        let caller = Caller {
            identity: &req.peer,
            ip: req.forwarded_for,
        };
        loop {
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            let now = admit(
                &inputs.registry.snapshot(),
                &inputs.policies.load(),
                &inputs.node,
                req.target,
                &caller,
            );
            match now {
                Admission::Deliver {
                    per_request: false, ..
                } => continue,
                Admission::Deliver { .. } => {
                    return "closed: the policies now in force authorize each HTTP request".into()
                }
                Admission::Denied { policy, .. } => {
                    return format!("closed: now denied by {policy}");
                }
                Admission::NotHere => return "closed: the pod is no longer on this node".into(),
            }
        }
    }
}

impl Inbound {
    /// A tunnel served request by request (its policies decide each request, or its port is
    /// declared HTTP): HTTP is served, authorized and reported request by request; anything
    /// else is authorized as TCP and relayed. `connected`: the connection to the pod, when it
    /// was opened before the tunnel was accepted.
    async fn per_request(
        &self,
        pending: Pending,
        pod: Arc<Pod>,
        services: Vec<Arc<Service>>,
        req: crate::tunnel::server::ConnectRequest,
        connected: Option<tokio::net::TcpStream>,
        mut record: ConnectionRecord,
    ) {
        let inputs = &self.inputs;
        let mut stream = match pending.accept() {
            Ok(s) => s,
            Err(e) => {
                record.finish(Verdict::Forwarded, Some(e));
                return;
            }
        };
        let (first, sniffed) = first_bytes(&mut stream, self.config.detection_timeout).await;
        let version = match sniffed {
            Sniffed::Http1 => Some(ClientVersion::Http1),
            Sniffed::Http2 => Some(ClientVersion::Http2),
            _ => None,
        };
        if let Some(version) = version {
            record.protocol("http");
            let t = http::Tunnelled {
                peer: req.peer.clone(),
                forwarded_for: req.forwarded_for,
                pod,
                services,
                target: req.target,
                version,
            };
            http::serve(
                inputs.clone(),
                self.clients.clone(),
                Rewind::new(first, stream),
                t,
                connected,
                self.config.max_request_headers,
                record,
            )
            .await;
            return;
        }
        let caller = Caller {
            identity: &req.peer,
            ip: req.forwarded_for,
        };
        let decision = authorize(&inputs.policies.load(), &pod, req.target, &caller);
        if let Decision::Deny { policy, reason } = decision {
            let message = deny_message(&policy, Some(reason.as_str()));
            record.policy(policy);
            record.finish(Verdict::Denied, Some(message));
            return;
        }
        let connecting = async {
            match connected {
                Some(c) => Ok(c),
                None => {
                    let on_behalf = OnBehalfOf::Peer {
                        identity: &req.peer,
                        source: req.forwarded_for,
                    };
                    inputs.connector.connect(on_behalf, req.target).await
                }
            }
        };
        let mut upstream = match connecting.await {
            Ok(s) => s,
            Err(e) => {
                record.finish(Verdict::ConnectFailed, Some(e));
                return;
            }
        };
        use tokio::io::AsyncWriteExt;
        if let Err(e) = upstream.write_all(&first).await {
            record.finish(Verdict::ConnectFailed, Some(e));
            return;
        }
        let sent_first = first.len() as u64;
        record
            .relay(async move {
                let r = stream.relay(upstream).await;
                Relayed {
                    sent: r.received + sent_first,
                    received: r.sent,
                    error: r.error,
                }
            })
            .await;
        record.finish(Verdict::Forwarded, None::<&str>);
    }
}

/// Reads a tunnel's first bytes until they tell HTTP from anything else (or `wait` passes).
async fn first_bytes(stream: &mut Stream, wait: Duration) -> (Bytes, Sniffed) {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + wait;
    // Read into the buffer's own room (a chunk on the stack would be held in the task across
    // every wait).
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(4096);
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return (buf.freeze(), Sniffed::Other),
        }
        match sniff(&buf) {
            Sniffed::NeedMore if buf.len() < 8192 => continue,
            Sniffed::NeedMore => return (buf.freeze(), Sniffed::Other),
            decided => return (buf.freeze(), decided),
        }
    }
}

fn record_destination(
    record: &mut ConnectionRecord,
    inputs: &ProxyInputs,
    pod: &Arc<crate::registry::Pod>,
) {
    record.destination_pod(pod);
    if let Some(id) = identity_of(&inputs.trust_domain, pod) {
        record.destination_identity(&id);
    }
}
