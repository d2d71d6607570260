//! The outbound HTTP path: a captured connection whose destination speaks HTTP is served here
//! instead of being relayed as bytes. Each request is routed on its own (the route table in
//! force when its head arrived), sent to an endpoint chosen for it over a reused upstream
//! connection — an HBONE tunnel to the endpoint's node, a plain connection on this node, or
//! egress with TLS origination — and recorded as one flow with its `http` part.
//!
//! - HTTP/1.1 clients are read through the [`H1Guard`]; HTTP/2 (h2c prior knowledge) clients
//!   are served as such. WebSocket upgrades and `CONNECT` are passed through as bytes once the
//!   upstream agrees.
//! - What weft answers itself carries Envoy's response flags (see [`crate::l7::respond`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use super::balance::RoundRobin;
use super::plan::{self, Action, Context, Destination, Refusal, Source};
use crate::admin::api::{HttpFlow, Verdict, NO_FLAGS};
use crate::exchange::body::Counter;
use crate::exchange::{
    self, authority_of, denied, empty, is_upgrade, own, upstream_request, ClientVersion,
    ResponseBody,
};
use crate::inputs::ProxyInputs;
use crate::l7::hygiene;
use crate::l7::protocol::AppProtocol;
use crate::l7::respond::Flag;
use crate::l7::route::{
    Action as RouteAction, Backend, HeaderOps, RouteDecision, RouteRequest, Target as BackendTarget,
};
use crate::policy::HttpRequest;
use crate::registry::kinds::networking::{H2UpgradePolicy, Resolution, TlsMode};
use crate::registry::{Pod, Service, ServicePort};
use crate::telemetry::{ConnectionRecord, RequestRecord, RequestTemplate};
use crate::tunnel::client::Pool;
use crate::upstream::dns::Dns;
use crate::upstream::http::{HttpPool, PoolKey, Sender, Version};
use crate::upstream::tls::{Origination, Originator};
use crate::upstream::OnBehalfOf;

/// Limits and timings of the HTTP path.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request head (request line and headers) accepted; larger gets 431.
    pub max_request_headers: usize,
    /// Resolves ServiceEntry hosts.
    pub dns: Arc<Dns>,
}

/// What the client called, as its connection's plan resolved it.
#[derive(Debug, Clone)]
pub enum Called {
    /// A Service VIP and port.
    Service {
        service: Arc<Service>,
        port: ServicePort,
    },
    /// A pod's address.
    Pod { pod: Arc<Pod>, addr: SocketAddr },
    /// Anything else.
    Other { addr: SocketAddr },
}

/// The HTTP protocol a destination port declares (Service `appProtocol` or port name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    Http1,
    Http2,
}

/// One HTTP connection's shared state.
struct Conn {
    source: Source,
    called: Called,
    declared: Option<Declared>,
    client: ClientVersion,
    template: RequestTemplate,
}

/// Serves HTTP connections of the capture listener.
pub struct HttpPath {
    inputs: Arc<ProxyInputs>,
    tunnels: Pool,
    clients: HttpPool,
    tls: Originator,
    balancer: RoundRobin,
    config: HttpConfig,
}

impl HttpPath {
    pub fn new(inputs: Arc<ProxyInputs>, tunnels: Pool, config: HttpConfig) -> HttpPath {
        HttpPath {
            inputs,
            tunnels,
            clients: HttpPool::default(),
            tls: Originator::default(),
            balancer: RoundRobin::default(),
            config,
        }
    }

    /// Serves `client` until it closes; every request is a flow of its own.
    pub async fn serve(
        self: &Arc<Self>,
        client: TcpStream,
        version: ClientVersion,
        source: Source,
        called: Called,
        declared: Option<Declared>,
        mut record: ConnectionRecord,
    ) {
        let _ = client.set_nodelay(true);
        let conn = Arc::new(Conn {
            template: record.requests(),
            source,
            called,
            declared,
            client: version,
        });
        let this = self.clone();
        let c = conn.clone();
        let (requests, error) = exchange::serve(
            client,
            version,
            self.config.max_request_headers,
            &conn.template,
            &mut record,
            move |req| {
                let this = this.clone();
                let conn = c.clone();
                async move { this.request(req, &conn).await }
            },
        )
        .await;
        record.finish_http(requests, error);
    }

    async fn request(&self, mut req: Request<Incoming>, conn: &Conn) -> Response<ResponseBody> {
        let mut authority = authority_of(&req);
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| req.uri().to_string());
        let mut record = conn.template.start(HttpFlow {
            protocol: conn.client.as_version().as_str().into(),
            method: req.method().to_string(),
            authority: authority.clone(),
            path,
            ..HttpFlow::default()
        });
        let upgrade = conn.client == ClientVersion::Http1 && is_upgrade(&req);
        let id = hygiene::prepare(req.headers_mut(), conn.source.ip, upgrade);
        record.request_id(&id);

        let routes = self.inputs.routes.load();
        // The routing host of what was called: a Service, or a ServiceEntry host found by
        // address, else (plain HTTP to somewhere outside) by the Host header.
        let (host, port) = match &conn.called {
            Called::Service { service, port } => {
                record.service(service);
                (Some(routes.host_of_service(service)), port.port)
            }
            Called::Pod { addr, .. } => (None, addr.port()),
            Called::Other { addr } => {
                let external = routes
                    .external_by_address(addr.ip(), addr.port())
                    .or_else(|| routes.external_by_authority(&authority, addr.port()));
                (external.map(|e| e.host.clone()), addr.port())
            }
        };
        let decision = match &host {
            Some(host) => {
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                routes.route(&RouteRequest {
                    host,
                    port,
                    source_namespace: conn.source.pod.as_ref().map(|p| p.namespace.as_str()),
                    source_labels: conn.source.pod.as_ref().map(|p| &p.labels),
                    method: req.method(),
                    authority: &authority,
                    path_and_query: path,
                    headers: req.headers(),
                })
            }
            None => RouteDecision::Default,
        };
        let source_ns = conn.source.pod.as_ref().map(|p| p.namespace.clone());
        let (backend, response_ops) = match decision {
            RouteDecision::NotFound => {
                return own(record, Verdict::Responded, Flag::NoRoute, None);
            }
            RouteDecision::Default => {
                let backend = host
                    .as_deref()
                    .and_then(|h| routes.backend(h, Some(port), None, source_ns.as_deref()));
                (backend, Vec::new())
            }
            RouteDecision::Matched(m) => {
                record.route(&m.rule.id);
                match &m.rule.action {
                    RouteAction::DirectResponse(d) => {
                        let mut resp = Response::new(Bytes::clone(&d.body));
                        *resp.status_mut() = d.status;
                        d.response_headers.apply(resp.headers_mut());
                        record.finish(
                            Verdict::Responded,
                            d.status.as_u16(),
                            NO_FLAGS,
                            None::<&str>,
                        );
                        return exchange::body_of(resp);
                    }
                    RouteAction::Redirect(r) => {
                        let path = record_path(&req);
                        let view = RouteRequest {
                            host: host.as_deref().unwrap_or(""),
                            port,
                            source_namespace: source_ns.as_deref(),
                            source_labels: None,
                            method: req.method(),
                            authority: &authority,
                            path_and_query: &path,
                            headers: req.headers(),
                        };
                        let (status, location) = r.location(&view, m.matched);
                        let mut resp = Response::new(Bytes::new());
                        *resp.status_mut() = status;
                        if let Ok(v) = HeaderValue::from_str(&location) {
                            resp.headers_mut().insert(header::LOCATION, v);
                        }
                        record.finish(Verdict::Responded, status.as_u16(), NO_FLAGS, None::<&str>);
                        return exchange::body_of(resp);
                    }
                    RouteAction::Forward(f) => {
                        let dest = f.pick(fastrand::u32(..));
                        f.request_headers.apply(req.headers_mut());
                        dest.request_headers.apply(req.headers_mut());
                        if let Some(rw) = &f.rewrite {
                            if rw.path.is_some() {
                                let new = rw.apply(&record_path(&req), m.matched);
                                if let Ok(uri) = new.parse::<http::Uri>() {
                                    *req.uri_mut() = uri;
                                }
                            }
                            if let Some(a) = &rw.authority {
                                authority = a.clone();
                            }
                        }
                        let backend = routes.backend(
                            &dest.host,
                            dest.port.or(Some(port)),
                            dest.subset.as_deref(),
                            source_ns.as_deref(),
                        );
                        // Envoy applies the destination's response headers, then the route's.
                        let ops = vec![dest.response_headers.clone(), f.response_headers.clone()];
                        if backend.is_none() {
                            let mut resp =
                                own(record, Verdict::NoEndpoint, Flag::NoHealthyUpstream, None);
                            apply_all(&ops, resp.headers_mut());
                            return resp;
                        }
                        (backend, ops)
                    }
                }
            }
        };
        drop(routes);
        let target = match self.target(backend, conn, &authority, &mut record).await {
            Ok(t) => t,
            Err(resp) => return resp,
        };
        let mut resp = self.forward(req, conn, record, target, upgrade).await;
        apply_all(&response_ops, resp.headers_mut());
        resp
    }

    /// The endpoints a request may go to and how to reach them: those of the routed backend,
    /// or, without one, of what the client called.
    async fn target(
        &self,
        backend: Option<Backend>,
        conn: &Conn,
        authority: &str,
        record: &mut RequestRecord,
    ) -> Result<Target, Response<ResponseBody>> {
        let client = conn.client;
        let Some(backend) = backend else {
            let (endpoints, balance_key) = match &conn.called {
                Called::Service { service, port } => {
                    let snapshot = self.inputs.registry.snapshot();
                    let eps = snapshot
                        .endpoints(service, port)
                        .into_iter()
                        .map(|e| (e.addr, Some(e.pod)))
                        .collect();
                    (
                        eps,
                        format!("{}/{}:{}", service.namespace, service.name, port.port),
                    )
                }
                Called::Pod { pod, addr } => (vec![(*addr, Some(pod.clone()))], addr.to_string()),
                Called::Other { addr } => (vec![(*addr, None)], addr.to_string()),
            };
            return Ok(Target {
                endpoints,
                balance_key,
                version: upstream_version(conn.declared, client),
                client_authority: authority.to_string(),
                authority: authority.to_string(),
                tls: None,
            });
        };
        let http = backend
            .policy
            .connection_pool
            .as_ref()
            .and_then(|p| p.http.as_ref());
        let declared = backend.protocol.and_then(declared_http);
        let mut version = upstream_version(declared, client);
        if http.and_then(|h| h.use_client_protocol) == Some(true) {
            version = client.as_version();
        } else if version == Version::Http1
            && http.and_then(|h| h.h2_upgrade_policy) == Some(H2UpgradePolicy::Upgrade)
        {
            version = Version::Http2;
        }
        let tls = backend
            .policy
            .tls
            .as_ref()
            .filter(|t| t.mode == TlsMode::Simple);
        let (endpoints, balance_key, host) = match &backend.target {
            BackendTarget::Service { service, port } => {
                record.service(service);
                let snapshot = self.inputs.registry.snapshot();
                let eps = snapshot
                    .endpoints(service, port)
                    .into_iter()
                    .filter(|e| {
                        backend
                            .subset_labels
                            .as_ref()
                            .is_none_or(|l| e.pod.matches(l))
                    })
                    .map(|e| (e.addr, Some(e.pod)))
                    .collect();
                let key = format!(
                    "{}/{}:{} {:?}",
                    service.namespace, service.name, port.port, backend.subset_labels
                );
                (eps, key, routes_host(service))
            }
            BackendTarget::External { external, port } => {
                let target_port = port.target_port.unwrap_or(port.number);
                let mut eps = Vec::new();
                match external.resolution {
                    Resolution::None => {
                        if let Called::Other { addr } = &conn.called {
                            eps.push((*addr, None));
                        }
                    }
                    Resolution::Static => {
                        for e in &external.endpoints {
                            let p = e.ports.get(&port.name).copied().unwrap_or(target_port);
                            if let Ok(ip) = e.address.parse::<std::net::IpAddr>() {
                                eps.push((SocketAddr::new(ip, p), None));
                            }
                        }
                    }
                    Resolution::Dns | Resolution::DnsRoundRobin => {
                        let names: Vec<(String, u16)> = if external.endpoints.is_empty() {
                            vec![(external.host.clone(), target_port)]
                        } else {
                            external
                                .endpoints
                                .iter()
                                .map(|e| {
                                    (
                                        e.address.clone(),
                                        e.ports.get(&port.name).copied().unwrap_or(target_port),
                                    )
                                })
                                .collect()
                        };
                        for (name, p) in names {
                            match self.config.dns.lookup(&name).await {
                                Ok(ips) => {
                                    // LOGICAL_DNS (DNS_ROUND_ROBIN) uses the first answer.
                                    let take = match external.resolution {
                                        Resolution::DnsRoundRobin => 1,
                                        _ => ips.len(),
                                    };
                                    eps.extend(
                                        ips.into_iter()
                                            .take(take)
                                            .map(|ip| (SocketAddr::new(ip, p), None)),
                                    );
                                }
                                Err(e) => debug!(error = %e, "ServiceEntry endpoint not resolved"),
                            }
                        }
                    }
                }
                (
                    eps,
                    format!("{}:{}", external.host, port.number),
                    external.host.clone(),
                )
            }
        };
        let tls = tls.map(|t| Origination {
            sni: if t.sni.is_empty() {
                host.clone()
            } else {
                t.sni.clone()
            },
            ca_certificates: (!t.ca_certificates.is_empty())
                .then(|| std::path::PathBuf::from(&t.ca_certificates)),
            insecure_skip_verify: t.insecure_skip_verify == Some(true),
            alpn: match version {
                Version::Http1 => vec![b"http/1.1".to_vec()],
                Version::Http2 => vec![b"h2".to_vec()],
            },
        });
        // TLS origination speaks what ALPN can promise: HTTP/1.1 unless HTTP/2 was declared.
        let version = if tls.is_some() && declared.is_none() {
            Version::Http1
        } else {
            version
        };
        let tls = tls.map(|mut o| {
            o.alpn = match version {
                Version::Http1 => vec![b"http/1.1".to_vec()],
                Version::Http2 => vec![b"h2".to_vec()],
            };
            o
        });
        Ok(Target {
            endpoints,
            balance_key,
            version,
            client_authority: authority.to_string(),
            authority: authority.to_string(),
            tls,
        })
    }

    /// Sends `req` to an endpoint of `target` and returns its response (or weft's own).
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: &Conn,
        mut record: RequestRecord,
        target: Target,
        upgrade: bool,
    ) -> Response<ResponseBody> {
        let Some(i) = self
            .balancer
            .pick(&target.balance_key, target.endpoints.len())
        else {
            return own(record, Verdict::NoEndpoint, Flag::NoHealthyUpstream, None);
        };
        let (addr, pod) = target.endpoints[i].clone();
        let snapshot = self.inputs.registry.snapshot();
        let policies = self.inputs.policies.load();
        let routes = self.inputs.routes.load();
        let mut dest = Destination::default();
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let request = HttpRequest {
            method: req.method().as_str(),
            authority: &target.client_authority,
            path,
            headers: req.headers(),
        };
        let action = plan::to_endpoint(
            &conn.source,
            addr,
            pod.clone(),
            &mut dest,
            &Context {
                node: &self.inputs.node,
                trust_domain: &self.inputs.trust_domain,
                hbone_port: self.inputs.hbone_port,
                snapshot: &snapshot,
                policies: &policies,
                balancer: &self.balancer,
                routes: &routes,
                roll: 0,
            },
            Some(&request),
        );
        let generation = snapshot.generation;
        drop((snapshot, policies, routes));
        let mtls = matches!(action, Action::Tunnel(_));
        record.upstream(addr, pod.as_deref(), dest.identity.as_ref(), mtls);
        let (via, connect): (String, Connect) = match action {
            Action::Refuse(Refusal::Denied { policy, .. }) => {
                record.policy(policy);
                return denied(record);
            }
            Action::Refuse(Refusal::NoEndpoint) => {
                return own(record, Verdict::NoEndpoint, Flag::NoHealthyUpstream, None);
            }
            Action::Refuse(r) => {
                return own(
                    record,
                    Verdict::ConnectFailed,
                    Flag::UpstreamConnectionFailure,
                    Some(r.to_string()),
                );
            }
            Action::Tunnel(hbone) => (format!("hbone {}", hbone.source), Connect::Tunnel(hbone)),
            Action::DeliverLocal { target: t } | Action::Passthrough { target: t } => {
                match &target.tls {
                    Some(o) => (format!("tls {}", o.sni), Connect::Tls(t, o.clone())),
                    None => ("direct".to_string(), Connect::Direct(t)),
                }
            }
        };
        let key = PoolKey {
            endpoint: addr,
            via,
            version: target.version,
            generation,
        };
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let sent = Counter::default();
        let req = upstream_request(req, target.version, &target.authority, &sent);
        let mut sender = match self.clients.checkout(&key) {
            Some(s) => s,
            None => match self
                .open(&connect, conn.source.pod.as_deref(), target.version)
                .await
            {
                Ok(s) => s,
                Err(Opened::Denied(policy)) => {
                    if let Some(p) = policy {
                        record.policy(p);
                    }
                    return denied(record);
                }
                Err(Opened::Failed(e)) => {
                    return own(
                        record,
                        Verdict::ConnectFailed,
                        Flag::UpstreamConnectionFailure,
                        Some(e),
                    );
                }
            },
        };
        let resp = match sender.send(req).await {
            Ok(r) => r,
            Err(e) => {
                let flag = if e.is_closed() || e.is_incomplete_message() || e.is_canceled() {
                    Flag::UpstreamConnectionTermination
                } else {
                    Flag::UpstreamRemoteReset
                };
                return own(record, Verdict::ConnectFailed, flag, Some(e.to_string()));
            }
        };
        let mut resp = resp;
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS
            || (upgrade && resp.status().is_success() && record.method() == "CONNECT");
        if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
            // Both sides agreed to leave HTTP: from now on, bytes.
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => {
                        let mut c = TokioIo::new(c);
                        let mut u = TokioIo::new(u);
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    }
                    Err(e) => debug!(error = %e, "upgrade did not complete"),
                }
            });
            let status = resp.status().as_u16();
            let (parts, _) = resp.into_parts();
            record.finish(Verdict::Forwarded, status, NO_FLAGS, None::<&str>);
            return Response::from_parts(parts, empty());
        }
        self.clients.checkin(key, sender);
        exchange::client_response(resp, conn.client, record, sent)
    }

    /// Opens a new upstream connection for the calling `pod` and speaks `version` on it.
    async fn open(
        &self,
        connect: &Connect,
        pod: Option<&Pod>,
        version: Version,
    ) -> Result<Sender, Opened> {
        let failed = |e: &dyn std::fmt::Display| Opened::Failed(e.to_string());
        let on_behalf = match pod {
            Some(p) => OnBehalfOf::Pod(p),
            None => OnBehalfOf::Unidentified,
        };
        match connect {
            Connect::Tunnel(hbone) => {
                let tunnel = self.tunnels.connect(hbone.clone()).await.map_err(|e| {
                    if e.is_denied() {
                        Opened::Denied(e.policy().map(str::to_string))
                    } else {
                        failed(&e)
                    }
                })?;
                Sender::handshake(tunnel, version)
                    .await
                    .map_err(|e| failed(&e))
            }
            Connect::Direct(addr) => {
                let tcp = self
                    .inputs
                    .connector
                    .connect(on_behalf, *addr)
                    .await
                    .map_err(|e| failed(&e))?;
                Sender::handshake(tcp, version)
                    .await
                    .map_err(|e| failed(&e))
            }
            Connect::Tls(addr, o) => {
                let tcp = self
                    .inputs
                    .connector
                    .connect(on_behalf, *addr)
                    .await
                    .map_err(|e| failed(&e))?;
                let tls = self.tls.connect(tcp, o).await.map_err(|e| failed(&e))?;
                Sender::handshake(tls, version)
                    .await
                    .map_err(|e| failed(&e))
            }
        }
    }
}

/// Where a request may go: endpoints to choose from and how to speak to them.
struct Target {
    endpoints: Vec<(SocketAddr, Option<Arc<Pod>>)>,
    balance_key: String,
    version: Version,
    /// The authority the upstream sees.
    authority: String,
    /// The authority the client sent (what same-node authorization sees).
    client_authority: String,
    tls: Option<Origination>,
}

enum Connect {
    Tunnel(crate::tunnel::client::Hbone),
    Direct(SocketAddr),
    Tls(SocketAddr, Origination),
}

enum Opened {
    /// The destination node's policy refused the tunnel (the deciding policy, if named).
    Denied(Option<String>),
    Failed(String),
}

/// The path and query of a request as sent.
fn record_path<B>(req: &Request<B>) -> String {
    req.uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string())
}

fn apply_all(ops: &[HeaderOps], headers: &mut http::HeaderMap) {
    for op in ops {
        op.apply(headers);
    }
}

fn routes_host(service: &Service) -> String {
    crate::l7::route::service_fqdn(&service.namespace, &service.name)
}

/// The HTTP version a declared protocol asks for (`None`: not HTTP or not declared).
pub fn declared_http(p: AppProtocol) -> Option<Declared> {
    match p {
        AppProtocol::Http1 => Some(Declared::Http1),
        AppProtocol::Http2 | AppProtocol::Grpc => Some(Declared::Http2),
        AppProtocol::Opaque => None,
    }
}

/// Istio's choice of upstream HTTP version: HTTP/2 to ports that declare it (`http2`, `grpc`,
/// `h2c`), HTTP/1.1 to `http` ports, the client's own version where nothing is declared.
pub fn upstream_version(declared: Option<Declared>, client: ClientVersion) -> Version {
    match declared {
        Some(Declared::Http2) => Version::Http2,
        Some(Declared::Http1) => Version::Http1,
        None => client.as_version(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_version_follows_what_the_port_declares() {
        use ClientVersion as C;
        assert_eq!(
            upstream_version(Some(Declared::Http2), C::Http1),
            Version::Http2
        );
        assert_eq!(
            upstream_version(Some(Declared::Http1), C::Http2),
            Version::Http1
        );
        assert_eq!(upstream_version(None, C::Http2), Version::Http2);
        assert_eq!(upstream_version(None, C::Http1), Version::Http1);
    }
}
