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
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tracing::debug;

use super::balance::{Lb, Warmup};
use super::cluster::{self, Cluster, Clusters, EndpointState, InFlight, Limits, Open, Up};
use super::hash;
use super::locality::{self, Locality, Spread};
use super::outlier::{self, Detection, Observed};
use super::plan::{self, Action, Destination, Refusal, Source};
use crate::admin::api::{HttpFlow, RequestTexts, Text, Texts, Verdict, NO_FLAGS};
use crate::exchange::body::{self, Counter, Mirrored, Teed};
use crate::exchange::{
    self, authority_of, denied, empty, is_upgrade, own, upstream_request, ClientHeaders,
    ClientVersion, ResponseBody,
};
use crate::inputs::ProxyInputs;
use crate::l7::hygiene;
use crate::l7::protocol::AppProtocol;
use crate::l7::respond::{self, Flag};
use crate::l7::route::{
    shadow_host, AbortError, Action as RouteAction, Backend, HeaderOps, Injected, Mirror, Outcome,
    RetryPolicy, RouteDecision, RouteRequest, RouteTable, Target as BackendTarget,
};
use crate::policy::HttpRequest;
use crate::registry::kinds::networking::{H2UpgradePolicy, Resolution, SimpleLb, TlsMode};
use crate::registry::{Pod, Service, ServicePort, Snapshot};
use crate::telemetry::trace::SpanKind;
use crate::telemetry::{shared, ConnectionRecord, Names, RequestRecord, RequestTemplate};
use crate::tunnel::client::Pool;
use crate::upstream::dns::Dns;
use crate::upstream::http::{self as upstream, HttpPool, PoolKey, Received, Sender, Version};
use crate::upstream::tls::{Origination, Originator};
use crate::upstream::{ConnectError, OnBehalfOf};

/// Limits and timings of the HTTP path.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request head (request line and headers) accepted; larger gets 431.
    pub max_request_headers: usize,
    /// Largest request body kept to send again on a retry.
    pub retry_body: usize,
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
    /// The routing host of the Service called (its FQDN).
    host: Option<String>,
    /// The client's address as `x-forwarded-for` gets it.
    forwarded_for: HeaderValue,
    memo: Mutex<Memo>,
}

impl Conn {
    /// The address the client called, and its pod when it is one (`None`: a headless
    /// Service, which has no address of its own).
    fn original(&self) -> Option<(SocketAddr, Option<Arc<Pod>>)> {
        match &self.called {
            Called::Service { service, port } => service
                .cluster_ip
                .map(|ip| (SocketAddr::new(ip, port.port), None)),
            Called::Pod { pod, addr } => Some((*addr, Some(pod.clone()))),
            Called::Other { addr } => Some((*addr, None)),
        }
    }
}

/// The targets a connection's requests resolved, kept while the route table and the registry
/// snapshot they were resolved under are in force: most requests of a connection go where the
/// one before went, and resolving a target (backend, traffic policy, endpoints, how each is
/// reached) is the same work every time.
#[derive(Default)]
struct Memo {
    /// The route table they were resolved under (not kept alive for them: only compared).
    routes: Weak<RouteTable>,
    generation: u64,
    targets: Vec<(Wanted, Arc<Target>)>,
}

/// Targets one connection keeps (its requests' distinct routes, in practice a few).
const MEMO_TARGETS: usize = 8;

/// What a request asks to be sent to: a routed host, port and subset, or (`host: None`) what
/// the client called.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    host: Option<String>,
    port: Option<u16>,
    subset: Option<String>,
    /// A route named it (so a host that is not known is no healthy upstream).
    routed: bool,
}

/// [`Wanted`] as a request asks, borrowing from its route.
#[derive(Debug, Clone, Copy)]
struct Want<'a> {
    host: Option<&'a str>,
    port: Option<u16>,
    subset: Option<&'a str>,
    routed: bool,
}

impl Want<'_> {
    fn to_owned(self) -> Wanted {
        Wanted {
            host: self.host.map(str::to_string),
            port: self.port,
            subset: self.subset.map(str::to_string),
            routed: self.routed,
        }
    }
}

impl Wanted {
    fn is(&self, want: &Want<'_>) -> bool {
        self.host.as_deref() == want.host
            && self.port == want.port
            && self.subset.as_deref() == want.subset
            && self.routed == want.routed
    }
}

impl Memo {
    /// The target kept for `want` under these tables.
    fn get(&self, routes: &RouteTable, generation: u64, want: &Want<'_>) -> Option<Arc<Target>> {
        if !std::ptr::eq(self.routes.as_ptr(), routes) || self.generation != generation {
            return None;
        }
        self.targets
            .iter()
            .find(|(w, _)| w.is(want))
            .map(|(_, t)| t.clone())
    }

    fn keep(
        &mut self,
        routes: &Arc<RouteTable>,
        generation: u64,
        want: Wanted,
        target: Arc<Target>,
    ) {
        if !std::ptr::eq(self.routes.as_ptr(), Arc::as_ptr(routes)) || self.generation != generation
        {
            self.routes = Arc::downgrade(routes);
            self.generation = generation;
            self.targets.clear();
        }
        if self.targets.len() == MEMO_TARGETS {
            self.targets.remove(0);
        }
        self.targets.push((want, target));
    }
}

/// Serves HTTP connections of the capture listener.
pub struct HttpPath {
    inputs: Arc<ProxyInputs>,
    tunnels: Pool,
    clients: HttpPool,
    tls: Originator,
    clusters: Arc<Clusters>,
    config: HttpConfig,
}

impl HttpPath {
    pub fn new(
        inputs: Arc<ProxyInputs>,
        tunnels: Pool,
        clusters: Arc<Clusters>,
        config: HttpConfig,
    ) -> HttpPath {
        HttpPath {
            inputs,
            tunnels,
            clients: HttpPool::default(),
            tls: Originator::default(),
            clusters,
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
        let host = match &called {
            Called::Service { service, .. } => Some(routes_host(service)),
            _ => None,
        };
        let conn = Arc::new(Conn {
            template: record.requests(),
            forwarded_for: hygiene::client_address(source.ip),
            source,
            called,
            declared,
            client: version,
            host,
            memo: Mutex::default(),
        });
        let this = self.clone();
        let c = conn.clone();
        let (requests, error) = exchange::serve(
            client,
            version,
            self.config.max_request_headers,
            &conn.template,
            &mut record,
            &self.inputs.draining,
            // The request's own future, not one around it: it is boxed once, as it is.
            move |req| this.clone().request(req, c.clone()),
        )
        .await;
        record.finish_http(requests, error);
    }

    async fn request(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        conn: Arc<Conn>,
    ) -> Response<ResponseBody> {
        let arrived = tokio::time::Instant::now();
        let client_authority = authority_of(&req);
        // Shares the request's bytes (no copy) until the flow's texts are packed.
        let path = req.uri().path_and_query().cloned();
        let client = ClientHeaders::of(req.headers());
        let upgrade = conn.client == ClientVersion::Http1 && is_upgrade(&req);
        let id = hygiene::prepare(req.headers_mut(), &conn.forwarded_for, upgrade);
        let texts = match &path {
            Some(p) => client.texts(&client_authority, p.as_str(), Some(&id)),
            None => client.texts(&client_authority, &req.uri().to_string(), Some(&id)),
        };
        let mut record = conn.template.start(HttpFlow {
            protocol: shared(conn.client.as_version().as_str()),
            method: shared(req.method().as_str()),
            texts,
            ..HttpFlow::default()
        });
        if exchange::is_grpc(req.headers()) {
            record.grpc();
        }
        record.trace(req.headers_mut(), SpanKind::Client);

        let snapshot = self.inputs.registry.snapshot();
        let routes = self.inputs.routes.load();
        // The routing host of what was called: a Service, or a ServiceEntry host found by
        // address, else (plain HTTP to somewhere outside) by the Host header.
        let (host, port) = match &conn.called {
            Called::Service { port, .. } => (conn.host.as_deref(), port.port),
            Called::Pod { addr, .. } => (None, addr.port()),
            Called::Other { addr } => {
                let external = routes
                    .external_by_address(addr.ip(), addr.port())
                    .or_else(|| routes.external_by_authority(&client_authority, addr.port()));
                (external.map(|e| e.host.as_str()), addr.port())
            }
        };
        let decision = match host {
            Some(host) => {
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                routes.route(&RouteRequest {
                    host,
                    port,
                    source_namespace: conn.source.pod.as_ref().map(|p| p.namespace.as_str()),
                    source_labels: conn.source.pod.as_ref().map(|p| &p.labels),
                    method: req.method(),
                    authority: &client_authority,
                    path_and_query: path,
                    headers: req.headers(),
                })
            }
            None => RouteDecision::Default,
        };
        let source_ns = conn.source.pod.as_ref().map(|p| p.namespace.as_str());
        // The authority the upstream sees, when a route rewrote it.
        let mut rewritten = None;
        // Until when the upstream may take to answer (the route's timeouts).
        let mut deadline = None;
        // How failed attempts are retried: Istio's default policy on a Service's default route.
        let mut retry = host.is_some().then(|| ISTIO_DEFAULT_RETRIES.clone());
        // What the rule's fault does to this request.
        let mut injected = Injected::default();
        // Where copies of it go (VirtualService `mirrors`, HTTPRoute `RequestMirror`).
        let mut mirrors = Vec::new();
        let (want, response_ops) = match &decision {
            RouteDecision::NotFound => {
                return own(record, Verdict::Responded, Flag::NoRoute, None);
            }
            RouteDecision::Default => (
                Want {
                    host,
                    port: Some(port),
                    subset: None,
                    routed: false,
                },
                Vec::new(),
            ),
            RouteDecision::Matched(m) => {
                record.route(&m.rule.label);
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
                            host: host.unwrap_or(""),
                            port,
                            source_namespace: source_ns,
                            source_labels: None,
                            method: req.method(),
                            authority: &client_authority,
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
                        if let Some(fault) = &f.fault {
                            injected =
                                fault.inject(fastrand::f64() * 100.0, fastrand::f64() * 100.0);
                            if let (None, Some(error)) = (injected.delay, injected.abort) {
                                return fault_aborted(record, error);
                            }
                        }
                        deadline = f.timeout().map(|t| arrived + t);
                        retry = f.retry_policy().cloned();
                        mirrors.extend(
                            f.mirrors
                                .iter()
                                .filter(|m| m.takes(fastrand::f64() * 100.0))
                                .cloned(),
                        );
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
                                rewritten = Some(a.clone());
                            }
                        }
                        // Envoy applies the destination's response headers, then the route's.
                        let ops = vec![dest.response_headers.clone(), f.response_headers.clone()];
                        let want = Want {
                            host: Some(dest.host.as_str()),
                            port: dest.port.or(Some(port)),
                            subset: dest.subset.as_deref(),
                            routed: true,
                        };
                        (want, ops)
                    }
                }
            }
        };
        let kept = conn.memo.lock().get(&routes, snapshot.generation, &want);
        let target = match kept {
            Some(target) => {
                drop(routes);
                target
            }
            None => {
                let backend = want
                    .host
                    .and_then(|h| routes.backend(h, want.port, want.subset, source_ns));
                if backend.is_none() && want.routed {
                    let mut resp = own(record, Verdict::NoEndpoint, Flag::NoHealthyUpstream, None);
                    apply_all(&response_ops, resp.headers_mut());
                    return resp;
                }
                let want = want.to_owned();
                let table = arc_swap::Guard::into_inner(routes);
                // Boxed: resolving is rare (a connection keeps what it resolved) and its future is large;
                // the request's own future stays small, and cheap to move.
                let (target, lasting) =
                    Box::pin(self.target(backend, want.subset.as_deref(), &conn, &snapshot)).await;
                let target = Arc::new(target);
                if lasting {
                    conn.memo
                        .lock()
                        .keep(&table, snapshot.generation, want, target.clone());
                }
                target
            }
        };
        if let Some(delay) = injected.delay {
            record.delay_injected();
            tokio::time::sleep(delay).await;
            if let Some(error) = injected.abort {
                return fault_aborted(record, error);
            }
        }
        if let Some(service) = &target.service {
            record.service(service);
        }
        let authority = rewritten.as_deref().unwrap_or(&client_authority);
        let req = self.mirror(req, &conn, mirrors, authority, port);
        let mut resp = self
            .forward(
                req,
                &conn,
                record,
                &target,
                snapshot,
                &client_authority,
                authority,
                upgrade,
                deadline,
                retry.as_deref(),
            )
            .await;
        apply_all(&response_ops, resp.headers_mut());
        resp
    }

    /// Sends a copy of `req` to each of `mirrors` (often none), as Envoy's shadowing does: `-shadow` on the
    /// host, the response ignored, fire and forget. The request goes on as it was; a copy that
    /// falls behind it is given up (the original never waits for a mirror).
    fn mirror(
        self: &Arc<Self>,
        req: Request<Incoming>,
        conn: &Arc<Conn>,
        mirrors: Vec<Mirror>,
        authority: &str,
        port: u16,
    ) -> Request<Teed<Incoming>> {
        let (parts, body) = req.into_parts();
        let (teed, copies) = body::tee(body, mirrors.len());
        if mirrors.is_empty() {
            return Request::from_parts(parts, teed);
        }
        let host: Arc<str> = shadow_host(authority).into();
        for (m, (copy, cut)) in mirrors.into_iter().zip(copies) {
            let shadow = copy_head(&parts, copy);
            let (this, conn, host) = (self.clone(), conn.clone(), host.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = this.shadow(shadow, &conn, &m, &host, port) => {}
                    () = cut.notified() => debug!(mirror = %m.host, "a mirror fell behind: its copy is given up"),
                }
            });
        }
        Request::from_parts(parts, teed)
    }

    /// One mirrored request, a flow of its own (its `authority` ends in `-shadow`).
    async fn shadow(&self, req: Request<Mirrored>, conn: &Conn, m: &Mirror, host: &str, port: u16) {
        let record = conn.template.start(HttpFlow {
            protocol: shared(conn.client.as_version().as_str()),
            method: shared(req.method().as_str()),
            texts: RequestTexts::new(Texts {
                authority: host,
                path: req.uri().path_and_query().map_or("/", |p| p.as_str()),
                ..Texts::default()
            }),
            ..HttpFlow::default()
        });
        let snapshot = self.inputs.registry.snapshot();
        let source_ns = conn.source.pod.as_ref().map(|p| p.namespace.as_str());
        let backend = self.inputs.routes.load().backend(
            &m.host,
            m.port.or(Some(port)),
            m.subset.as_deref(),
            source_ns,
        );
        if backend.is_none() {
            own(record, Verdict::NoEndpoint, Flag::NoHealthyUpstream, None);
            return;
        }
        let (target, _) =
            Box::pin(self.target(backend, m.subset.as_deref(), conn, &snapshot)).await;
        let resp = self
            .forward(
                req, conn, record, &target, snapshot, host, host, false, None, None,
            )
            .await;
        // Read through, so that the flow ends and the connection can be reused.
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    }

    /// An endpoint of `cluster` as targets hold it.
    fn upstream(&self, cluster: &Cluster, addr: SocketAddr, pod: Option<Arc<Pod>>) -> Upstream {
        Upstream::new(addr, pod, cluster.endpoint(addr))
    }

    /// The endpoints a request may go to and how to reach them: those of the routed backend,
    /// or, without one, of what the client called. `true` with it when it holds for as long as
    /// the route table and the snapshot (not when DNS answered).
    async fn target(
        &self,
        backend: Option<Backend>,
        subset: Option<&str>,
        conn: &Conn,
        snapshot: &Snapshot,
    ) -> (Target, bool) {
        let client = conn.client;
        let Some(backend) = backend else {
            let (endpoints, cluster) = match &conn.called {
                Called::Service { service, port } => {
                    let cluster =
                        self.clusters
                            .get(&cluster::name(port.port, None, &routes_host(service)));
                    let eps = snapshot
                        .endpoints(service, port)
                        .into_iter()
                        .map(|e| self.upstream(&cluster, e.addr, Some(e.pod)))
                        .collect();
                    (eps, cluster)
                }
                Called::Pod { pod, addr } => {
                    let cluster = self.clusters.get(cluster::PASSTHROUGH);
                    (
                        vec![self.upstream(&cluster, *addr, Some(pod.clone()))],
                        cluster,
                    )
                }
                Called::Other { addr } => {
                    let cluster = self.clusters.get(cluster::PASSTHROUGH);
                    (vec![self.upstream(&cluster, *addr, None)], cluster)
                }
            };
            let target = Target {
                endpoints,
                cluster,
                lb: Lb::default(),
                limits: Limits::default(),
                detection: None,
                hashing: None,
                warmup: None,
                locality: None,
                version: upstream_version(conn.declared, client),
                tls: None,
                service: None,
            };
            target.cluster.settle();
            return (target, true);
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
        let mut lasting = true;
        let mut service_names = None;
        // Where this node's clients and each endpoint run (locality-aware balancing).
        let mut localities = Vec::new();
        let (endpoints, cluster, host) = match &backend.target {
            BackendTarget::Service { service, port } => {
                service_names = Some(Names::service(service));
                let host = routes_host(service);
                let cluster = self.clusters.get(&cluster::name(port.port, subset, &host));
                let passthrough = backend.policy.load_balancer.as_ref().and_then(|l| l.simple)
                    == Some(SimpleLb::Passthrough);
                let eps = if passthrough {
                    // `PASSTHROUGH` (Envoy's original destination): the address the client
                    // called, no balancing.
                    conn.original()
                        .map(|(addr, pod)| self.upstream(&cluster, addr, pod))
                        .into_iter()
                        .collect()
                } else {
                    snapshot
                        .endpoints(service, port)
                        .into_iter()
                        .filter(|e| {
                            backend
                                .subset_labels
                                .as_ref()
                                .is_none_or(|l| e.pod.matches(l))
                        })
                        .map(|e| {
                            let node = e.pod.node_name.as_deref().and_then(|n| snapshot.node(n));
                            localities.push(Locality::of(&e.pod.labels, node.map(|n| &n.labels)));
                            self.upstream(&cluster, e.addr, Some(e.pod))
                        })
                        .collect()
                };
                (eps, cluster, host)
            }
            BackendTarget::External { external, port } => {
                let cluster =
                    self.clusters
                        .get(&cluster::name(port.number, subset, &external.host));
                let target_port = port.target_port.unwrap_or(port.number);
                let mut eps = Vec::new();
                match external.resolution {
                    Resolution::None => {
                        if let Called::Other { addr } = &conn.called {
                            eps.push(self.upstream(&cluster, *addr, None));
                        }
                    }
                    Resolution::Static => {
                        for e in &external.endpoints {
                            let p = e.ports.get(&port.name).copied().unwrap_or(target_port);
                            if let Ok(ip) = e.address.parse::<std::net::IpAddr>() {
                                eps.push(self.upstream(&cluster, SocketAddr::new(ip, p), None));
                            }
                        }
                    }
                    Resolution::Dns | Resolution::DnsRoundRobin => {
                        // Answers change with their TTL: resolved for each request.
                        lasting = false;
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
                                    eps.extend(ips.into_iter().take(take).map(|ip| {
                                        self.upstream(&cluster, SocketAddr::new(ip, p), None)
                                    }));
                                }
                                Err(e) => debug!(error = %e, "ServiceEntry endpoint not resolved"),
                            }
                        }
                    }
                }
                (eps, cluster, external.host.clone())
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
            alpn: Vec::new(),
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
        let hashing = backend
            .policy
            .load_balancer
            .as_ref()
            .and_then(|l| l.consistent_hash.as_ref())
            .and_then(hash::Policy::of)
            .map(|p| {
                let addrs: Vec<SocketAddr> = endpoints.iter().map(|e: &Upstream| e.addr).collect();
                let table = cluster.table(p.kind, &addrs);
                (p, table)
            });
        let lb_settings = backend.policy.load_balancer.as_ref();
        let locality = (!localities.is_empty())
            .then(|| {
                let here = snapshot.node(&self.inputs.node).map(|n| &n.labels);
                locality::spread(
                    lb_settings.and_then(|l| l.locality_lb_setting.as_ref()),
                    backend.policy.outlier_detection.is_some(),
                    &Locality::of(&crate::registry::Labels::new(), here),
                    &localities,
                )
            })
            .flatten();
        let target = Target {
            endpoints,
            cluster,
            lb: Lb::of(backend.policy.load_balancer.as_ref()),
            limits: Limits::of(backend.policy.connection_pool.as_ref()),
            detection: Detection::of(backend.policy.outlier_detection.as_ref()),
            hashing,
            warmup: Warmup::of(backend.policy.load_balancer.as_ref()),
            locality,
            version,
            tls,
            service: service_names,
        };
        target.cluster.settle();
        (target, lasting)
    }

    /// Sends `req` to an endpoint of `target` and returns its response (or weft's own).
    #[allow(clippy::too_many_arguments)]
    async fn forward<B>(
        &self,
        mut req: Request<B>,
        conn: &Conn,
        mut record: RequestRecord,
        target: &Target,
        snapshot: Arc<Snapshot>,
        client_authority: &str,
        authority: &str,
        upgrade: bool,
        deadline: Option<tokio::time::Instant>,
        retry: Option<&RetryPolicy>,
    ) -> Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes, Error = hyper::Error> + Send + Sync + Unpin + 'static,
    {
        // A request that may be retried is kept to send again, with its body when that is
        // known to be small (read whole first, as Envoy buffers it); an upgrade never is.
        let policy = retry.filter(|p| p.attempts > 0);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        // The request's key, when the destination hashes (and the cookie made for it).
        let (key_hash, made_cookie) = match &target.hashing {
            Some((policy, _)) => request_hash(policy, &req, conn),
            None => (None, None),
        };
        let sent = Counter::for_request(record.is_grpc());
        let small = |b: &B| {
            b.is_end_stream()
                || b.size_hint()
                    .exact()
                    .is_some_and(|n| n <= self.config.retry_body as u64)
        };
        let (first, replay) = if policy.is_some() && !upgrade && small(req.body()) {
            let (parts, body) = req.into_parts();
            let body = match within(deadline, http_body_util::BodyExt::collect(body)).await {
                None => return timed_out(record),
                Some(Err(e)) => {
                    return own(
                        record,
                        Verdict::Malformed,
                        Flag::DownstreamProtocolError,
                        Some(format!("reading the request body: {e}")),
                    )
                }
                Some(Ok(collected)) => collected.to_bytes(),
            };
            let req = Request::from_parts(parts, full(body.clone()));
            let first = upstream_request(req, target.version, authority, &sent);
            let (first, replay) = Replay::of(first, body);
            (first, Some(replay))
        } else {
            (
                upstream_request(req, target.version, authority, &sent),
                None,
            )
        };
        let per_try = retry.and_then(|p| p.per_try_timeout);
        let ignore_tried = retry.is_none_or(|p| p.retry_ignore_previous_hosts);
        let remote = retry.is_some_and(|p| p.retry_remote_localities);
        target.cluster.budget.request();
        let mut next = Some(first);
        let mut snapshot = Some(snapshot);
        // Endpoints tried, as bits (index mod 64): no allocation per request.
        let mut tried = 0u64;
        let mut retries = 0;
        // Held while a retry is out (`upstream_rq_retry_active`, which `maxRetries` limits).
        let mut retrying = None;
        loop {
            let Some(mut req) = next.take().or_else(|| replay.as_ref().map(Replay::request)) else {
                unreachable!("a request is sent again only when it has a replay");
            };
            let Some(i) = pick(target, tried, ignore_tried, key_hash, remote) else {
                return own(record, Verdict::NoEndpoint, Flag::NoHealthyUpstream, None);
            };
            tried |= 1 << (i % 64);
            let up = &target.endpoints[i];
            let decided;
            let reach = match up.reach.get() {
                Some(reach) => reach,
                None => {
                    let Some(snap) = snapshot.as_deref() else {
                        unreachable!("the snapshot is kept while attempts may follow");
                    };
                    match self.reach(up, &req, conn, target, snap, client_authority) {
                        Ok((reach, true)) => {
                            decided = reach;
                            &decided
                        }
                        Ok((reach, false)) => up.reach.get_or_init(|| reach),
                        Err(refused) => {
                            record.upstream(&up.names, refused.identity, refused.mtls);
                            return match refused.refusal {
                                Refusal::Denied { policy, .. } => {
                                    record.policy(policy);
                                    denied(record)
                                }
                                Refusal::NoEndpoint => {
                                    own(record, Verdict::NoEndpoint, Flag::NoHealthyUpstream, None)
                                }
                                r => own(
                                    record,
                                    Verdict::ConnectFailed,
                                    Flag::UpstreamConnectionFailure,
                                    Some(r.to_string()),
                                ),
                            };
                        }
                    }
                }
            };
            if replay.is_none() {
                // Not held while the request is out: a long one would keep old snapshots alive.
                snapshot = None;
            }
            record
                .upstream(&up.names, reach.identity.clone(), reach.mtls)
                .delivered_here(reach.local);
            if reach.local && record.wants_server_span() {
                // Delivered by this node: it is the server's proxy too.
                record.trace(req.headers_mut(), SpanKind::Server);
            }
            let try_deadline = match (deadline, per_try.map(|t| tokio::time::Instant::now() + t)) {
                (Some(d), Some(t)) => Some(d.min(t)),
                (d, t) => d.or(t),
            };
            let stats = &target.cluster.stats;
            if !target.cluster.admits_request(&target.limits) {
                cluster::inc(&stats.rq_pending_overflow);
                return overflow(record);
            }
            cluster::inc(&stats.rq_total);
            let sent_at = std::time::Instant::now();
            let attempt = self
                .attempt(req, reach, conn, target, &up.state, try_deadline, sent_at)
                .await;
            // One reading for both: how long the answer took, and since when the connection
            // that carried it is idle.
            let answered = std::time::Instant::now();
            if attempt.is_ok() {
                record.upstream_service_time(answered - sent_at);
            }
            let per_try = try_deadline != deadline;
            if let Some(d) = &target.detection {
                let seen = match &attempt {
                    Ok((resp, ..)) => Some(Observed::Answer(resp.status().as_u16())),
                    // Only what reached the endpoint, or failed to: not a wait for a connection.
                    Err(Failure::Denied(_) | Failure::Overflow | Failure::WaitedOut) => None,
                    Err(_) => Some(Observed::LocalFailure),
                };
                if let Some(seen) = seen {
                    target
                        .cluster
                        .observe(d, &up.state, seen, target.endpoints.len(), || {
                            target.endpoints.iter().filter(|e| e.state.is_out()).count()
                        });
                }
            }
            match &attempt {
                Ok((resp, ..)) => stats.response(resp.status().as_u16()),
                Err(Failure::TimedOut | Failure::WaitedOut) if per_try => {
                    cluster::inc(&stats.rq_per_try_timeout)
                }
                Err(Failure::TimedOut | Failure::WaitedOut) => cluster::inc(&stats.rq_timeout),
                Err(_) => {}
            }
            let outcome = match &attempt {
                Ok((resp, ..)) => Some(Outcome::Response {
                    status: resp.status().as_u16(),
                    grpc: exchange::grpc_status(resp.headers()).map(u32::from),
                }),
                Err(f) => f.outcome(per_try),
            };
            let retriable = match (policy, outcome) {
                (Some(p), Some(o)) => replay.is_some() && p.retries_on(o),
                _ => false,
            };
            if let (true, Some(p)) = (retriable, policy) {
                // This request's own retry, out before, is over (Envoy releases it first).
                drop(retrying.take());
                if retries == p.attempts {
                    cluster::inc(&stats.rq_retry_limit_exceeded);
                    record.retries_exhausted();
                } else if !target.cluster.admits_retry(&target.limits) {
                    // As many retries are out as the destination allows (`maxRetries`).
                    cluster::inc(&stats.rq_retry_overflow);
                    record.note("retry overflow");
                } else if target.cluster.budget.retry() {
                    retries += 1;
                    retrying = Some(Up::new(&target.cluster, |s| &s.rq_retry_active));
                    cluster::inc(&stats.rq_retry);
                    let pause = p.backoff(retries, fastrand::f64());
                    if within(deadline, tokio::time::sleep(pause)).await.is_none() {
                        cluster::inc(&stats.rq_timeout);
                        return timed_out(record);
                    }
                    continue;
                } else {
                    // The destination's retry budget is spent: this answer stands.
                    cluster::inc(&stats.rq_retry_overflow);
                    record.note("retry budget exhausted");
                }
            } else if retries > 0 && attempt.is_ok() {
                cluster::inc(&stats.rq_retry_success);
            }
            let (mut resp, sender, in_flight) = match attempt {
                Ok(r) => r,
                Err(f) => return f.answer(record),
            };
            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                || (upgrade && resp.status().is_success() && record.method() == "CONNECT");
            if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
                // Both sides agreed to leave HTTP: from now on, bytes. The request stays in
                // flight, and its connection open, until they are done (hyper hands the
                // connection over: it is counted here from now on).
                let upstream_upgrade = upstream::upgrade(&mut resp);
                let open = Up::new(&target.cluster, |s| &s.cx_active);
                let draining = self.inputs.draining.clone();
                tokio::spawn(async move {
                    let _held = (in_flight, open);
                    exchange::splice_upgraded(client_upgrade, upstream_upgrade, draining).await;
                });
                let status = resp.status().as_u16();
                let (parts, _) = resp.into_parts();
                record.finish(Verdict::Forwarded, status, NO_FLAGS, None::<&str>);
                return Response::from_parts(parts, empty());
            }
            if !self.clients.checkin(&reach.key, sender, answered) {
                cluster::inc(&stats.cx_max_requests);
            }
            target.cluster.free();
            drop(retrying);
            if let Some(cookie) = made_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
                resp.headers_mut().append(header::SET_COOKIE, cookie);
            }
            return exchange::client_response(
                resp,
                conn.client,
                record,
                sent,
                try_deadline,
                Some(in_flight),
            );
        }
    }

    /// How `up` is reached, decided by the plan for this request (`true` with it when it
    /// holds for this request only), or why it may not be.
    fn reach(
        &self,
        up: &Upstream,
        req: &Request<upstream::Body>,
        conn: &Conn,
        target: &Target,
        snapshot: &Snapshot,
        client_authority: &str,
    ) -> Result<(Reach, bool), Refused> {
        let policies = self.inputs.policies.load();
        let routes = self.inputs.routes.load();
        let mut dest = Destination::default();
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let request = HttpRequest {
            method: req.method().as_str(),
            authority: client_authority,
            path,
            headers: req.headers(),
        };
        let action = plan::to_endpoint(
            &conn.source,
            up.addr,
            up.pod.clone(),
            &mut dest,
            &super::context(
                &self.inputs,
                &self.clusters,
                snapshot,
                &policies,
                &routes,
                0,
            ),
            Some(&request),
        );
        drop((policies, routes));
        let identity = dest.identity.as_ref().map(|i| Text::from(i.to_string()));
        // Only a destination on this node in the mesh is decided per request (this node
        // authorizes it); how any other endpoint is reached holds for the snapshot.
        let per_request = matches!(
            action,
            Action::DeliverLocal { .. } | Action::Refuse(Refusal::Denied { .. })
        );
        let mtls = matches!(action, Action::Tunnel(_));
        let local = matches!(action, Action::DeliverLocal { .. });
        let (via, connect): (String, Connect) = match action {
            Action::Refuse(refusal) => {
                return Err(Refused {
                    refusal,
                    identity,
                    mtls,
                })
            }
            // Connections leave from the calling pod's namespace (its address): never shared
            // between pods.
            Action::Tunnel(hbone) => (
                format!("hbone {} from {}", hbone.source, conn.source.ip),
                Connect::Tunnel(hbone),
            ),
            Action::DeliverLocal { target: t } | Action::Passthrough { target: t } => {
                match &target.tls {
                    Some(o) => (
                        format!("tls {} from {}", o.sni, conn.source.ip),
                        Connect::Tls(t, o.clone()),
                    ),
                    None => (
                        format!("direct from {}", conn.source.ip),
                        Connect::Direct(t),
                    ),
                }
            }
        };
        let reach = Reach {
            key: PoolKey {
                endpoint: up.addr,
                via: via.into(),
                version: target.version,
                cluster: target.cluster.id,
                generation: snapshot.generation,
            },
            connect,
            mtls,
            local,
            identity,
        };
        Ok((reach, per_request))
    }

    /// One attempt: a kept or new connection to `reach`, the request sent on it, its response
    /// head read, all by `deadline`. Past it the request is dropped: hyper cancels it upstream
    /// (an HTTP/1.1 connection is closed, an HTTP/2 stream reset). `now`: the clock as it
    /// starts.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        req: Request<upstream::Body>,
        reach: &Reach,
        conn: &Conn,
        target: &Target,
        endpoint: &Arc<EndpointState>,
        deadline: Option<tokio::time::Instant>,
        mut now: std::time::Instant,
    ) -> Result<(Response<Received>, Sender, InFlight), Failure> {
        let (cluster, limits) = (&target.cluster, &target.limits);
        // Counted waiting for a connection while the cluster may open no more.
        let mut pending = None;
        let mut sender = loop {
            if let Some(s) = self.clients.checkout(&reach.key, now) {
                break s;
            }
            if pending.is_some() {
                if let Some(s) = self.clients.checkout_any(&reach.key, now) {
                    break s;
                }
            }
            let pool = (reach.key.via.clone(), reach.key.version);
            if cluster.admits_connection(limits, endpoint, &pool) {
                let open = Open::start_in(cluster, endpoint, pool);
                // Boxed, for the same reason: opening is rare, its future (TLS, HBONE) large.
                let opening = Box::pin(self.open(
                    &reach.connect,
                    conn.source.pod.as_deref(),
                    reach.key.version,
                    limits,
                    open,
                ));
                match within(deadline, opening).await {
                    None => return Err(Failure::WaitedOut),
                    Some(Ok(s)) => break s,
                    Some(Err(Opened::Denied(policy))) => return Err(Failure::Denied(policy)),
                    Some(Err(Opened::Failed { error, timed_out })) => {
                        cluster::inc(&cluster.stats.cx_connect_fail);
                        if timed_out {
                            cluster::inc(&cluster.stats.cx_connect_timeout);
                        }
                        return Err(Failure::Connect(error));
                    }
                }
            }
            if pending.is_none() {
                cluster::inc(&cluster.stats.cx_overflow);
                if !cluster.admits_pending(limits) {
                    cluster::inc(&cluster.stats.rq_pending_overflow);
                    return Err(Failure::Overflow);
                }
                pending = Some(Up::new(cluster, |s| &s.rq_pending_active));
            }
            // Woken when a response ends or a connection is kept or closed; looked at again
            // every few milliseconds all the same (a wake-up may come between look and wait).
            let freed = tokio::time::timeout(PENDING_RECHECK, cluster.freed());
            if within(deadline, freed).await.is_none() {
                return Err(Failure::WaitedOut);
            }
            now = std::time::Instant::now();
        };
        drop(pending);
        // Counted in flight once on a connection (waiting for one, it was pending), as Envoy.
        let in_flight = InFlight::start(cluster, endpoint);
        match within(deadline, sender.send(req)).await {
            None => Err(Failure::TimedOut),
            Some(Ok(resp)) => Ok((resp, sender, in_flight)),
            Some(Err(e)) if e.is_closed() => Err(Failure::Closed(e.to_string())),
            Some(Err(e)) => Err(Failure::Reset {
                refused: e.is_refused(),
                error: e.to_string(),
            }),
        }
    }

    /// Opens a new upstream connection for the calling `pod` as `limits` say, speaks
    /// `version` on it, and keeps it counted (`open`) until it closes.
    async fn open(
        &self,
        connect: &Connect,
        pod: Option<&Pod>,
        version: Version,
        limits: &Limits,
        open: Open,
    ) -> Result<Sender, Opened> {
        let failed = |e: &dyn std::fmt::Display| Opened::Failed {
            error: e.to_string(),
            timed_out: false,
        };
        let connect_failed = |e: ConnectError| Opened::Failed {
            timed_out: matches!(e, ConnectError::TimedOut(_)),
            error: e.to_string(),
        };
        let on_behalf = match pod {
            Some(p) => OnBehalfOf::Pod(p),
            None => OnBehalfOf::Unidentified,
        };
        let reuse = limits.reuse;
        let tcp = |addr: SocketAddr| {
            self.inputs.connector.connect_with(
                on_behalf,
                addr,
                limits.connect_timeout,
                limits.keepalive,
            )
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
                Sender::handshake(tunnel, version, reuse, open)
                    .await
                    .map_err(|e| failed(&e))
            }
            Connect::Direct(addr) => {
                let tcp = tcp(*addr).await.map_err(connect_failed)?;
                Sender::handshake(tcp, version, reuse, open)
                    .await
                    .map_err(|e| failed(&e))
            }
            Connect::Tls(addr, o) => {
                let tcp = tcp(*addr).await.map_err(connect_failed)?;
                let tls = self.tls.connect(tcp, o).await.map_err(|e| failed(&e))?;
                Sender::handshake(tls, version, reuse, open)
                    .await
                    .map_err(|e| failed(&e))
            }
        }
    }
}

/// How often a request waiting for a connection looks for one, besides being woken.
const PENDING_RECHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// Where a request may go: endpoints to choose from and how to speak to them.
struct Target {
    endpoints: Vec<Upstream>,
    /// Their cluster: the round-robin position, retry budget and counters, shared by every
    /// connection sending there.
    cluster: Arc<Cluster>,
    /// How one of them is chosen.
    lb: Lb,
    /// The cluster's circuit breakers and connection settings.
    limits: Limits,
    /// Its outlier detection, when its DestinationRule has one.
    detection: Option<Detection>,
    /// Its consistent hashing, when its DestinationRule asks for it: what a request is
    /// hashed by, and the table of its endpoints.
    hashing: Option<(hash::Policy, Arc<hash::Table>)>,
    /// Its slow start, when its DestinationRule asks for one.
    warmup: Option<Warmup>,
    /// How its endpoints are chosen by locality, when that applies.
    locality: Option<Spread>,
    version: Version,
    tls: Option<Origination>,
    /// The Service routed to, as records name it.
    service: Option<Names>,
}

/// One endpoint of a target.
struct Upstream {
    addr: SocketAddr,
    pod: Option<Arc<Pod>>,
    /// Its state in the cluster: requests in flight on it from every connection.
    state: Arc<EndpointState>,
    names: Names,
    /// How it is reached, decided at its first request when that holds for the snapshot.
    reach: OnceLock<Reach>,
}

impl Upstream {
    fn new(addr: SocketAddr, pod: Option<Arc<Pod>>, state: Arc<EndpointState>) -> Upstream {
        Upstream {
            names: Names::endpoint(addr, pod.as_ref()),
            addr,
            pod,
            state,
            reach: OnceLock::new(),
        }
    }
}

/// How an endpoint is reached: the connections to use, and what its records say of it.
struct Reach {
    key: PoolKey,
    connect: Connect,
    mtls: bool,
    /// A pod of this node, in the mesh: this node reports as the destination too.
    local: bool,
    /// The destination's SPIFFE identity, when it is in the mesh.
    identity: Option<Text>,
}

enum Connect {
    Tunnel(crate::tunnel::client::Hbone),
    Direct(SocketAddr),
    Tls(SocketAddr, Origination),
}

enum Opened {
    /// The destination node's policy refused the tunnel (the deciding policy, if named).
    Denied(Option<String>),
    Failed {
        error: String,
        /// Not connected within the connect timeout.
        timed_out: bool,
    },
}

/// What Istio applies to a route that says nothing about retries.
static ISTIO_DEFAULT_RETRIES: std::sync::LazyLock<Arc<RetryPolicy>> =
    std::sync::LazyLock::new(|| Arc::new(RetryPolicy::istio_default()));

/// Why an attempt got no response.
enum Failure {
    /// The destination node's policy refused the tunnel (the deciding policy, if named).
    Denied(Option<String>),
    /// No connection to the endpoint.
    Connect(String),
    /// The connection ended before a response head.
    Closed(String),
    /// The upstream reset the request (`refused`: an HTTP/2 stream it never took).
    Reset {
        refused: bool,
        error: String,
    },
    TimedOut,
    /// The deadline passed before the request was sent: waiting for a connection, or
    /// opening one.
    WaitedOut,
    /// A circuit breaker of the destination was at its limit.
    Overflow,
}

impl Failure {
    /// How retry conditions see it; `per_try`: a timeout was the attempt's own, not the
    /// route's (which ends the request).
    fn outcome(&self, per_try: bool) -> Option<Outcome> {
        match self {
            Failure::Connect(_) => Some(Outcome::ConnectFailure),
            Failure::Closed(_) | Failure::Reset { refused: false, .. } => Some(Outcome::Reset),
            Failure::Reset { refused: true, .. } => Some(Outcome::RefusedStream),
            Failure::TimedOut | Failure::WaitedOut if per_try => Some(Outcome::PerTryTimeout),
            Failure::TimedOut | Failure::WaitedOut | Failure::Denied(_) | Failure::Overflow => None,
        }
    }

    /// What the client gets for it, with Envoy's flag.
    fn answer(self, mut record: RequestRecord) -> Response<ResponseBody> {
        let (flag, error) = match self {
            Failure::TimedOut | Failure::WaitedOut => return timed_out(record),
            Failure::Denied(policy) => {
                if let Some(p) = policy {
                    record.policy(p);
                }
                return denied(record);
            }
            Failure::Overflow => return overflow(record),
            Failure::Connect(e) => (Flag::UpstreamConnectionFailure, e),
            Failure::Closed(e) => (Flag::UpstreamConnectionTermination, e),
            Failure::Reset { error, .. } => (Flag::UpstreamRemoteReset, error),
        };
        own(record, Verdict::ConnectFailed, flag, Some(error))
    }
}

/// Why an endpoint may not be reached, with what its record says of it.
struct Refused {
    refusal: Refusal,
    identity: Option<Text>,
    mtls: bool,
}

/// A request as first sent upstream, with its body, kept to send again.
struct Replay {
    head: http::request::Parts,
    body: Bytes,
}

impl Replay {
    /// `first` as it goes out, and what sends it again.
    fn of(first: Request<upstream::Body>, body: Bytes) -> (Request<upstream::Body>, Replay) {
        let (parts, sent) = first.into_parts();
        let head = copy_head(&parts, ()).into_parts().0;
        (Request::from_parts(parts, sent), Replay { head, body })
    }

    /// The request again (its body is counted once, by the first attempt).
    fn request(&self) -> Request<upstream::Body> {
        copy_head(&self.head, full(self.body.clone()))
    }
}

/// A request with the method, URI, version and headers of `head` (extensions are not
/// copied), carrying `body`.
fn copy_head<B>(head: &http::request::Parts, body: B) -> Request<B> {
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers.clone();
    req
}

/// A whole body, as upstream requests carry one.
fn full(body: Bytes) -> upstream::Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(body)
        .map_err(|e| match e {})
        .boxed()
}

/// An endpoint of `target` for the next attempt: the balancer's choice, or with
/// `ignore_tried` (Istio's default) the first after it not tried yet, while there is one.
/// Endpoints outlier detection ejected are left out, unless so few are left that balancing
/// ignores ejections (`minHealthPercent`); `None` when none may be chosen.
fn pick(
    target: &Target,
    tried: u64,
    ignore_tried: bool,
    key: Option<u64>,
    remote: bool,
) -> Option<usize> {
    let n = target.endpoints.len();
    // The endpoints in, by index, when some are ejected.
    let healthy: Option<Vec<usize>> = target.detection.as_ref().and_then(|d| {
        if !target.endpoints.iter().any(|e| e.state.is_out()) {
            return None;
        }
        let now = std::time::Instant::now();
        let healthy: Vec<usize> = (0..n)
            .filter(|&i| {
                !target
                    .cluster
                    .is_ejected(d, &target.endpoints[i].state, now)
            })
            .collect();
        (healthy.len() < n && !outlier::panics(healthy.len(), n, d.min_health_percent))
            .then_some(healthy)
    });
    // By locality: the endpoints of the group (priority or locality) the request goes to.
    let healthy = match &target.locality {
        None => healthy,
        Some(spread) => {
            let mut healthy = healthy.unwrap_or_else(|| (0..n).collect());
            if remote && tried != 0 {
                // `retryRemoteLocalities`: a retry goes to a locality not tried yet while one
                // has a healthy endpoint (Envoy's previous-priorities retry).
                let tried_groups: Vec<usize> = (0..n)
                    .filter(|i| tried & (1 << (i % 64)) != 0)
                    .map(|i| spread.group[i])
                    .collect();
                let elsewhere: Vec<usize> = healthy
                    .iter()
                    .copied()
                    .filter(|i| !tried_groups.contains(&spread.group[*i]))
                    .collect();
                if !elsewhere.is_empty() {
                    healthy = elsewhere;
                }
            }
            let g = spread.choose(&healthy, fastrand::f64())?;
            Some(
                healthy
                    .into_iter()
                    .filter(|&i| spread.group[i] == g)
                    .collect(),
            )
        }
    };
    let index = |j: usize| healthy.as_ref().map_or(j, |h| h[j]);
    let m = healthy.as_ref().map_or(n, Vec::len);
    let active = |j: usize| {
        target.endpoints[index(j)]
            .state
            .active
            .load(Ordering::Relaxed)
    };
    // A hashed request goes to its key's endpoint, or while that one is out, to the next one
    // in along the table (so an ejected endpoint's keys spread over the others).
    let hashed = key
        .zip(target.hashing.as_ref())
        .and_then(|(h, (_, table))| match &healthy {
            None => table.lookup(h),
            Some(hs) => {
                let i = table.lookup_among(h, |i| hs.contains(&i))?;
                hs.iter().position(|x| *x == i)
            }
        });
    let choose = || {
        target.lb.choose(
            m,
            target.cluster.round(),
            active,
            (fastrand::u32(..), fastrand::u32(..)),
        )
    };
    let j = match (hashed, &target.warmup) {
        (Some(j), _) => j,
        (None, None) => choose()?,
        // An endpoint still warming is taken with the chance of its share, else another
        // choice is made (a few at most): each gets requests in proportion to its weight.
        (None, Some(w)) => {
            let now = std::time::Instant::now();
            let mut j = choose()?;
            for _ in 0..WARMUP_REDRAWS {
                let joined = target.endpoints[index(j)].state.joined;
                let share = joined.map_or(1.0, |t| w.factor(now.saturating_duration_since(t)));
                if share >= 1.0 || fastrand::f64() < share {
                    break;
                }
                j = choose()?;
            }
            j
        }
    };
    if !ignore_tried || tried == 0 {
        return Some(index(j));
    }
    (0..m)
        .map(|k| index((j + k) % m))
        .find(|i| tried & (1 << (i % 64)) == 0)
        .or(Some(index(j)))
}

/// Choices made again at most, for one request, while the endpoint chosen is warming.
const WARMUP_REDRAWS: usize = 4;

/// The hash of a request's key under `policy`, and the `Set-Cookie` value of a cookie made
/// for it when the key is a cookie it did not have (`None` without a key: no hashing).
fn request_hash<B>(
    policy: &hash::Policy,
    req: &Request<B>,
    conn: &Conn,
) -> (Option<u64>, Option<String>) {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    match &policy.key {
        hash::Key::Header(name) => (header(name).map(|v| hash::hash(v.as_bytes())), None),
        hash::Key::Query(name) => {
            let pq = req.uri().path_and_query().map_or("", |p| p.as_str());
            (
                hash::query(pq, name).map(|v| hash::hash(v.as_bytes())),
                None,
            )
        }
        hash::Key::SourceIp => (
            Some(hash::hash(conn.source.ip.to_string().as_bytes())),
            None,
        ),
        hash::Key::Cookie { name, path, ttl } => {
            let found = req
                .headers()
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|v| hash::cookie(v, name));
            match (found, ttl) {
                (Some(v), _) => (Some(hash::hash(v.trim_matches('"').as_bytes())), None),
                (None, Some(ttl)) => {
                    let value = format!("{:016x}", fastrand::u64(..));
                    (
                        Some(hash::hash(value.as_bytes())),
                        Some(hash::set_cookie(name, &value, path, *ttl)),
                    )
                }
                (None, None) => (None, None),
            }
        }
    }
}

/// `fut`'s output, or `None` once `deadline` has passed first. A future of its own (an
/// `async fn` would hold `fut` twice): a request's task holds it while the upstream answers.
fn within<F: std::future::Future>(
    deadline: Option<tokio::time::Instant>,
    fut: F,
) -> impl std::future::Future<Output = Option<F::Output>> {
    use futures::future::Either;
    use futures::FutureExt as _;
    match deadline {
        Some(d) => Either::Left(tokio::time::timeout_at(d, fut).map(Result::ok)),
        None => Either::Right(fut.map(Some)),
    }
}

/// `504 upstream request timeout`, flag `UT` (Envoy's answer when a route's timeout expires
/// before the upstream's response head).
fn timed_out(record: RequestRecord) -> Response<ResponseBody> {
    own(
        record,
        Verdict::ConnectFailed,
        Flag::UpstreamRequestTimeout,
        Some("upstream request timeout".to_string()),
    )
}

/// The answer to a request a circuit breaker of its destination turned away (flag `UO`).
fn overflow(record: RequestRecord) -> Response<ResponseBody> {
    own(
        record,
        Verdict::ConnectFailed,
        Flag::UpstreamOverflow,
        Some("upstream overflow".to_string()),
    )
}

/// The answer to a request the rule's fault aborted (flag `FI`): the upstream never sees it.
fn fault_aborted(record: RequestRecord, error: AbortError) -> Response<ResponseBody> {
    let resp = respond::aborted(error);
    record.finish(
        Verdict::Responded,
        resp.status().as_u16(),
        Flag::FaultInjected.as_str(),
        Some(respond::FAULT_ABORT),
    );
    exchange::body_of(resp)
}

/// The path and query of a request as sent.
fn record_path<B>(req: &Request<B>) -> Box<str> {
    req.uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .into()
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

    /// Endpoints 10.0.0.1:80 … 10.0.0.`n`:80.
    fn endpoints(n: u8) -> Vec<Upstream> {
        (1..=n)
            .map(|i| {
                let addr = SocketAddr::from(([10, 0, 0, i], 80));
                Upstream::new(addr, None, Arc::default())
            })
            .collect()
    }

    fn target() -> Arc<Target> {
        Arc::new(Target {
            endpoints: Vec::new(),
            cluster: Clusters::default().get("test"),
            lb: Lb::RoundRobin,
            limits: Limits::default(),
            detection: None,
            hashing: None,
            warmup: None,
            locality: None,
            version: Version::Http1,
            tls: None,
            service: None,
        })
    }

    #[test]
    fn a_retry_to_remote_localities_leaves_the_tried_one() {
        let t = Target {
            endpoints: endpoints(3),
            locality: Some(Spread {
                group: vec![0, 0, 1],
                choice: locality::Choice::Failover,
            }),
            ..Arc::into_inner(target()).unwrap()
        };
        for _ in 0..20 {
            assert_ne!(pick(&t, 0, true, None, true), Some(2), "the closest first");
            assert_eq!(
                pick(&t, 1, true, None, false),
                Some(1),
                "a retry stays in its locality"
            );
            assert_eq!(
                pick(&t, 1, true, None, true),
                Some(2),
                "retryRemoteLocalities: the next locality"
            );
        }
    }

    #[test]
    fn a_retry_goes_to_an_endpoint_not_tried_while_there_is_one() {
        let t = Target {
            endpoints: endpoints(3),
            ..Arc::into_inner(target()).unwrap()
        };
        let first = pick(&t, 0, true, None, false).unwrap();
        assert_eq!(first, 0, "the balancer's turn");
        let mut tried = 1 << first;
        let second = pick(&t, tried, true, None, false).unwrap();
        assert_ne!(second, first);
        tried |= 1 << second;
        let third = pick(&t, tried, true, None, false).unwrap();
        assert!(
            third != first && third != second,
            "{first} {second} {third}"
        );
        tried |= 1 << third;
        assert!(
            pick(&t, tried, true, None, false).is_some(),
            "all tried: the turn's again"
        );
        // Without retryIgnorePreviousHosts, the turn decides alone.
        let t2 = Target {
            endpoints: endpoints(2),
            ..Arc::into_inner(target()).unwrap()
        };
        assert_eq!(pick(&t2, 0, false, None, false), Some(0));
        assert_eq!(pick(&t2, 1, false, None, false), Some(1));
        assert_eq!(pick(&t2, 1, false, None, false), Some(0), "tried or not");
    }

    fn want<'a>(host: &'a str, port: u16, subset: Option<&'a str>) -> Want<'a> {
        Want {
            host: Some(host),
            port: Some(port),
            subset,
            routed: true,
        }
    }

    fn wanted(host: &str, subset: Option<&str>) -> Wanted {
        Wanted {
            host: Some(host.into()),
            port: Some(80),
            subset: subset.map(str::to_string),
            routed: true,
        }
    }

    #[test]
    fn a_kept_target_holds_for_its_route_table_and_snapshot_only() {
        let table = Arc::new(RouteTable::default());
        let mut memo = Memo::default();
        assert!(memo.get(&table, 1, &want("a", 80, None)).is_none());
        let (a, a_v1) = (target(), target());
        memo.keep(&table, 1, wanted("a", None), a.clone());
        memo.keep(&table, 1, wanted("a", Some("v1")), a_v1.clone());
        let got = memo.get(&table, 1, &want("a", 80, None)).unwrap();
        assert!(Arc::ptr_eq(&got, &a));
        let got = memo.get(&table, 1, &want("a", 80, Some("v1"))).unwrap();
        assert!(Arc::ptr_eq(&got, &a_v1));
        // Another host, port or subset is another target.
        assert!(memo.get(&table, 1, &want("b", 80, None)).is_none());
        assert!(memo.get(&table, 1, &want("a", 81, None)).is_none());
        assert!(memo.get(&table, 1, &want("a", 80, Some("v2"))).is_none());
        // The default route to the same host is another target (a route naming a host that is
        // not known answers 503; the default route goes where the client called).
        let default = Want {
            routed: false,
            ..want("a", 80, None)
        };
        assert!(memo.get(&table, 1, &default).is_none());
        // A new snapshot, or a new route table (even one equal to the old), resolves again.
        assert!(memo.get(&table, 2, &want("a", 80, None)).is_none());
        let newer = Arc::new(RouteTable::default());
        assert!(memo.get(&newer, 1, &want("a", 80, None)).is_none());
        // Keeping under new tables forgets what the old ones resolved.
        memo.keep(&newer, 1, wanted("b", None), target());
        assert!(memo.get(&newer, 1, &want("a", 80, None)).is_none());
        assert!(memo.get(&newer, 1, &want("b", 80, None)).is_some());
        assert!(memo.get(&table, 1, &want("a", 80, None)).is_none());
    }

    #[test]
    fn a_route_table_gone_is_never_mistaken_for_a_new_one() {
        let mut memo = Memo::default();
        let table = Arc::new(RouteTable::default());
        memo.keep(&table, 1, wanted("a", None), target());
        drop(table);
        // The memo does not keep the table alive, and its address is not reused while the
        // memo remembers it.
        let next = Arc::new(RouteTable::default());
        assert!(memo.get(&next, 1, &want("a", 80, None)).is_none());
    }

    #[test]
    fn a_connection_keeps_a_bounded_number_of_targets() {
        let table = Arc::new(RouteTable::default());
        let mut memo = Memo::default();
        for i in 0..MEMO_TARGETS + 3 {
            memo.keep(&table, 1, wanted(&format!("h{i}"), None), target());
        }
        assert_eq!(memo.targets.len(), MEMO_TARGETS);
        assert!(memo.get(&table, 1, &want("h0", 80, None)).is_none());
        let last = format!("h{}", MEMO_TARGETS + 2);
        assert!(memo.get(&table, 1, &want(&last, 80, None)).is_some());
    }

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
