//! HTTP inside an inbound tunnel, when the destination's policies need to see each request
//! (L7 AuthorizationPolicy): the tunnel is served with hyper, every request is authorized with
//! the same step as same-node delivery ([`super::authorize::authorize_request`]), denied ones
//! get `403 RBAC: access denied`, allowed ones go to the pod over a reused connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};

use super::authorize::{authorize_request, service_for_authority, Caller};
use crate::admin::api::{HttpFlow, Text, Verdict, NO_FLAGS};
use crate::exchange::body::Counter;
use crate::exchange::{
    self, authority_of, denied, is_upgrade, own, upstream_request, ClientHeaders, ClientVersion,
    ResponseBody,
};
use crate::identity::SpiffeId;
use crate::inputs::ProxyInputs;
use crate::l7::hygiene;
use crate::l7::respond::Flag;
use crate::policy::{Decision, HttpRequest};
use crate::registry::{Pod, Service};
use crate::telemetry::trace::SpanKind;
use crate::telemetry::{shared, ConnectionRecord, Names, RequestTemplate};
use crate::upstream::http::{HttpPool, PoolKey, Reuse, Sender};
use crate::upstream::OnBehalfOf;
use crate::workload::identity_of;

/// One tunnel's HTTP: who calls, and the pod it reaches.
pub struct Tunnelled {
    pub peer: SpiffeId,
    pub forwarded_for: Option<std::net::IpAddr>,
    pub pod: Arc<Pod>,
    /// The Services selecting the pod on this port (see [`service_for_authority`]).
    pub services: Vec<Arc<Service>>,
    pub target: SocketAddr,
    pub version: ClientVersion,
}

/// A tunnel and what its requests' records and upstream connections are named by, made once.
struct Tunnel {
    t: Tunnelled,
    names: Names,
    /// Each of `t.services`, named for records.
    services: Vec<Names>,
    /// The destination pod's SPIFFE id.
    identity: Option<Text>,
    via: Arc<str>,
}

/// Serves the HTTP carried by one tunnel until it closes.
pub async fn serve<S>(
    inputs: Arc<ProxyInputs>,
    clients: Arc<HttpPool>,
    io: S,
    t: Tunnelled,
    connected: Option<tokio::net::TcpStream>,
    max_head: usize,
    mut record: ConnectionRecord,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let template = record.requests();
    let t = Arc::new(Tunnel {
        names: Names::endpoint(t.target, Some(&t.pod)),
        services: t.services.iter().map(|s| Names::service(s)).collect(),
        identity: identity_of(&inputs.trust_domain, &t.pod).map(|id| Text::from(id.to_string())),
        // Delivered from the caller's address where it is known: never shared between callers.
        via: match t.forwarded_for {
            Some(ip) => format!("inbound {} from {ip}", t.peer),
            None => format!("inbound {}", t.peer),
        }
        .into(),
        t,
    });
    if let Some(tcp) = connected {
        // The connection opened before the tunnel was accepted: the first requests' upstream.
        let version = t.t.version.as_version();
        match Sender::handshake(tcp, version, Reuse::default(), ()).await {
            Ok(sender) => {
                clients.checkin(&pool_key(&inputs, &t, version), sender, Instant::now());
            }
            Err(e) => {
                tracing::debug!(error = %e, pod = %t.t.target, "handshake with the pod failed")
            }
        }
    }
    let tmpl = template.clone();
    let draining = inputs.draining.clone();
    let (requests, error) = exchange::serve(
        io,
        t.t.version,
        max_head,
        &template,
        &mut record,
        &draining,
        {
            move |req| {
                let inputs = inputs.clone();
                let clients = clients.clone();
                let t = t.clone();
                let template = tmpl.clone();
                async move { request(&inputs, &clients, &t, &template, req).await }
            }
        },
    )
    .await;
    record.finish_http(requests, error);
}

async fn request(
    inputs: &ProxyInputs,
    clients: &HttpPool,
    tunnel: &Tunnel,
    template: &RequestTemplate,
    mut req: Request<Incoming>,
) -> Response<ResponseBody> {
    let t = &tunnel.t;
    let authority = authority_of(&req);
    // A WebSocket (or other) upgrade: once the pod agrees, both sides are bytes.
    let upgrade = t.version == ClientVersion::Http1 && is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let request_id = parts
        .headers
        .get(hygiene::X_REQUEST_ID)
        .and_then(|v| v.to_str().ok());
    let texts = ClientHeaders::of(&parts.headers).texts(&authority, path, request_id);
    let mut record = template.start(HttpFlow {
        protocol: shared(t.version.as_version().as_str()),
        method: shared(parts.method.as_str()),
        texts,
        ..HttpFlow::default()
    });
    if exchange::is_grpc(&parts.headers) {
        record.grpc();
    }
    if let Some(service) = service_for_authority(&t.services, &authority) {
        if let Some(i) = t.services.iter().position(|s| Arc::ptr_eq(s, service)) {
            record.service(&tunnel.services[i]);
        }
    }
    record.trace(&mut parts.headers, SpanKind::Server);
    let decision = {
        let http = HttpRequest {
            method: parts.method.as_str(),
            authority: &authority,
            path,
            headers: &parts.headers,
        };
        let caller = Caller {
            identity: &t.peer,
            ip: t.forwarded_for,
        };
        authorize_request(&inputs.policies.load(), &t.pod, t.target, &caller, &http)
    };
    record.upstream(&tunnel.names, tunnel.identity.clone(), true);
    if let Decision::Deny { policy, .. } = decision {
        record.policy(policy);
        return denied(record);
    }
    let version = t.version.as_version();
    let key = pool_key(inputs, tunnel, version);
    let sent = Counter::for_request(record.is_grpc());
    let req = upstream_request(Request::from_parts(parts, body), version, &authority, &sent);
    let sent_at = Instant::now();
    let mut sender = match clients.checkout(&key, sent_at) {
        Some(s) => s,
        None => {
            // Boxed: opening is rare and its future large; the request's stays small.
            let opened = Box::pin(async {
                match inputs
                    .connector
                    .connect(
                        OnBehalfOf::Peer {
                            identity: &t.peer,
                            source: t.forwarded_for,
                        },
                        t.target,
                    )
                    .await
                {
                    Ok(tcp) => Sender::handshake(tcp, version, Reuse::default(), ())
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            })
            .await;
            match opened {
                Ok(s) => s,
                Err(e) => {
                    return own(
                        record,
                        Verdict::ConnectFailed,
                        Flag::UpstreamConnectionFailure,
                        Some(e),
                    )
                }
            }
        }
    };
    match sender.send(req).await {
        Ok(mut resp) => {
            // One reading for both: how long the answer took, and since when the connection
            // that carried it is idle.
            let answered = Instant::now();
            record.upstream_service_time(answered - sent_at);
            let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
                || (upgrade && resp.status().is_success() && record.method() == "CONNECT");
            if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
                // The connection to the pod is handed over to the upgrade: not kept.
                let upstream_upgrade = crate::upstream::http::upgrade(&mut resp);
                tokio::spawn(exchange::splice_upgraded(
                    client_upgrade,
                    upstream_upgrade,
                    inputs.draining.clone(),
                ));
                let status = resp.status().as_u16();
                let (parts, _) = resp.into_parts();
                record.finish(Verdict::Forwarded, status, NO_FLAGS, None::<&str>);
                return Response::from_parts(parts, exchange::empty());
            }
            clients.checkin(&key, sender, answered);
            exchange::client_response(resp, t.version, record, sent, None, None::<()>)
        }
        Err(e) => own(
            record,
            Verdict::ConnectFailed,
            Flag::UpstreamRemoteReset,
            Some(e.to_string()),
        ),
    }
}

/// Where the connections to a tunnel's pod are kept, by the caller they are made for.
fn pool_key(
    inputs: &ProxyInputs,
    tunnel: &Tunnel,
    version: crate::upstream::http::Version,
) -> PoolKey {
    PoolKey {
        endpoint: tunnel.t.target,
        via: tunnel.via.clone(),
        version,
        cluster: 0,
        generation: inputs.registry.snapshot().generation,
    }
}
