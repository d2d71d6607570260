//! Prometheus metrics on their own listener (default `0.0.0.0:15020`, path `/metrics`), so
//! scrapes never share a port or a queue with traffic or the admin API.
//!
//! Values are read at scrape time, from [`Telemetry`] (flow totals, bytes, active connections)
//! and from the node ([`NodeGauges`]: eBPF counters, workloads, registry), so nothing on the
//! data path pays for metrics it does not already keep.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::http::header;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::Telemetry;
use crate::admin::server::{serve_bounded, Bounds, Gate};

/// What the node reports besides its traffic, read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct NodeGauges {
    /// eBPF counters by name (`redirected`, `not_enrolled`, …).
    pub ebpf: BTreeMap<String, u64>,
    pub workloads: u64,
    pub enrolled_workloads: u64,
    /// Enrolled pods whose cgroup has not been found for longer than `--enroll-timeout`.
    pub uncaptured_workloads: u64,
    /// New pods that connected before their cgroup was enrolled, since start.
    pub capture_gaps: u64,
    /// Requests to the CA service answered with a certificate, and failed.
    pub ca_requests_issued: u64,
    pub ca_requests_failed: u64,
    /// Seconds until the first SVID held expires (`None`: none held).
    pub svid_earliest_expiry_seconds: Option<u64>,
    pub registry_generation: u64,
    pub registry_reload_failed: bool,
    /// Objects of the sources left out of the snapshot in force.
    pub registry_not_applied: u64,
    /// The Kubernetes API watch of each kind (`--registry kube`).
    pub registry_watches: Vec<WatchSample>,
    /// Every destination's counters and gauges.
    pub clusters: Vec<ClusterSample>,
}

/// One stat of one destination (cluster), named as Envoy names it.
#[derive(Debug, Clone)]
pub struct ClusterSample {
    pub cluster: String,
    /// `upstream_rq_retry`, …
    pub stat: std::borrow::Cow<'static, str>,
    pub gauge: bool,
    pub value: u64,
}

/// The watch of one kind of the Kubernetes API.
#[derive(Debug, Clone)]
pub struct WatchSample {
    pub kind: &'static str,
    /// `listing`, `watching`, `retrying`, `not_installed`.
    pub state: &'static str,
    pub objects: u64,
    /// Seconds since the kind was last listed or a change of it arrived.
    pub last_sync_age: Option<f64>,
}

/// Every state a [`WatchSample`] can be in.
const WATCH_STATES: [&str; 4] = ["listing", "watching", "retrying", "not_installed"];

/// Where [`NodeGauges`] come from (the node).
pub trait GaugeSource: Send + Sync + std::fmt::Debug + 'static {
    fn gauges(&self) -> NodeGauges;
    /// Whether the node serves traffic (`/healthz/ready` here too, for probes of a
    /// hostNetwork pod, which cannot reach the admin address on 127.0.0.1): why not if not.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition: a counter's `HELP` and
/// `TYPE` name its samples (`…_total`), as that format wants; no `# EOF`, no `# UNIT`.
pub fn classic_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[derive(Debug)]
struct NodeCollector {
    telemetry: Arc<Telemetry>,
    node: Arc<dyn GaugeSource>,
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let t = &self.telemetry;
        let m = self.node.gauges();
        let (bytes_sent, bytes_received) = t.flows.bytes_totals();
        {
            let help = "Connections handled by the node proxy, by verdict";
            let proto = ConstCounter::new(0u64);
            let mut family =
                enc.encode_descriptor("weft_flows", help, None, proto.metric_type())?;
            for (verdict, n) in &t.flows.totals() {
                let labels = [("verdict", verdict.as_str())];
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let help = "Bytes relayed by finished connections";
            let proto = ConstCounter::new(0u64);
            let mut family =
                enc.encode_descriptor("weft_flow_bytes", help, None, proto.metric_type())?;
            for (direction, n) in [("sent", bytes_sent), ("received", bytes_received)] {
                ConstCounter::new(n).encode(family.encode_family(&[("direction", direction)])?)?;
            }
        }
        {
            let help =
                "eBPF capture events (connect_seen, redirected, not_enrolled, excluded, ...)";
            let proto = ConstCounter::new(0u64);
            let mut family =
                enc.encode_descriptor("weft_ebpf_events", help, None, proto.metric_type())?;
            for (event, n) in &m.ebpf {
                ConstCounter::new(*n)
                    .encode(family.encode_family(&[("event", event.as_str())])?)?;
            }
        }
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        // Per destination, named as Istio's proxies export Envoy's cluster stats, so
        // dashboards built for them read these unchanged.
        let mut by_stat: BTreeMap<(&str, bool), Vec<&ClusterSample>> = BTreeMap::new();
        // `upstream_rq_<code>` with the code as a label, as Istio's proxies export it; its own
        // family (OpenMetrics gives `upstream_rq_total` the name Istio gives these).
        let mut by_code: Vec<(&ClusterSample, &str)> = Vec::new();
        for c in &m.clusters {
            match c.stat.strip_prefix("upstream_rq_") {
                Some(code) if code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()) => {
                    by_code.push((c, code))
                }
                _ => by_stat.entry((&c.stat, c.gauge)).or_default().push(c),
            }
        }
        if !by_code.is_empty() {
            let proto = ConstCounter::new(0u64);
            let mut family = enc.encode_descriptor(
                "envoy_cluster_upstream_rq_code",
                "Envoy's cluster.<cluster_name>.upstream_rq_<response_code>, per destination",
                None,
                proto.metric_type(),
            )?;
            for (c, code) in by_code {
                let labels = [
                    ("cluster_name", c.cluster.as_str()),
                    ("response_code", code),
                ];
                ConstCounter::new(c.value).encode(family.encode_family(&labels)?)?;
            }
        }
        for ((stat, is_gauge), samples) in by_stat {
            // OpenMetrics ends every counter in `_total`: `upstream_rq_total` gets one only.
            let name = format!(
                "envoy_cluster_{}",
                stat.strip_suffix("_total")
                    .unwrap_or(stat)
                    .replace('.', "_")
            );
            let help = format!("Envoy's cluster.<cluster_name>.{stat}, per destination");
            if is_gauge {
                let proto = ConstGauge::new(0i64);
                let mut family = enc.encode_descriptor(&name, &help, None, proto.metric_type())?;
                for c in samples {
                    ConstGauge::new(g(c.value))
                        .encode(family.encode_family(&[("cluster_name", c.cluster.as_str())])?)?;
                }
            } else {
                let proto = ConstCounter::new(0u64);
                let mut family = enc.encode_descriptor(&name, &help, None, proto.metric_type())?;
                for c in samples {
                    ConstCounter::new(c.value)
                        .encode(family.encode_family(&[("cluster_name", c.cluster.as_str())])?)?;
                }
            }
        }
        t.istio.encode(&mut enc)?;
        {
            let help =
                "Access log lines, by result: written, or dropped because the writer fell behind";
            let proto = ConstCounter::new(0u64);
            let mut family =
                enc.encode_descriptor("weft_access_log_lines", help, None, proto.metric_type())?;
            for (result, n) in [
                ("written", t.access_log.written()),
                ("dropped", t.access_log.dropped()),
            ] {
                ConstCounter::new(n).encode(family.encode_family(&[("result", result)])?)?;
            }
        }
        {
            let c = t.tracing.counts();
            let help = "Trace spans, by result: exported, dropped (export queue full), failed (the collector refused or was unreachable)";
            let proto = ConstCounter::new(0u64);
            let mut family =
                enc.encode_descriptor("weft_trace_spans", help, None, proto.metric_type())?;
            for (result, n) in [
                ("exported", c.exported),
                ("dropped", c.dropped),
                ("failed", c.failed),
            ] {
                ConstCounter::new(n).encode(family.encode_family(&[("result", result)])?)?;
            }
        }
        gauge(
            &mut enc,
            "weft_active_connections",
            "Connections being relayed now",
            g(t.active_connections()),
        )?;
        {
            let help = "Connections refused at accept by a connection limit of weft's, by listener (capture, metrics, admin) and reason (total: the listener's limit; per_pod: the calling pod's; per_source: the client address's)";
            let proto = ConstCounter::new(0u64);
            let mut family =
                enc.encode_descriptor("weft_connections_refused", help, None, proto.metric_type())?;
            for (listener, reason, n) in t.admission.refused.totals() {
                let labels = [("listener", listener.as_str()), ("reason", reason.as_str())];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut enc,
            "weft_capture_connections",
            "Connections held open on the capture listener now (counted against --max-connections)",
            g(t.admission.capture.open() as u64),
        )?;
        gauge(
            &mut enc,
            "weft_workloads",
            "Pods scheduled on this node",
            g(m.workloads),
        )?;
        gauge(
            &mut enc,
            "weft_enrolled_workloads",
            "Pods on this node whose connections are captured",
            g(m.enrolled_workloads),
        )?;
        gauge(
            &mut enc,
            "weft_uncaptured_workloads",
            "Enrolled pods on this node whose cgroup was not found within --enroll-timeout: their connections are not captured",
            g(m.uncaptured_workloads),
        )?;
        {
            let c = &t.hbone_server;
            let help = "HBONE connections the node refused or closed for abuse, by reason: handshakes (TLS handshakes in progress on the node), peer_handshakes and peer_connections (from one address), reset_flood (GOAWAY ENHANCE_YOUR_CALM for HTTP/2 rapid reset)";
            let proto = ConstCounter::new(0u64);
            let mut family = enc.encode_descriptor(
                "weft_hbone_inbound_refused",
                help,
                None,
                proto.metric_type(),
            )?;
            for (reason, n) in [
                ("handshakes", &c.refused_handshakes),
                ("peer_handshakes", &c.refused_peer_handshakes),
                ("peer_connections", &c.refused_peer_connections),
                ("reset_flood", &c.reset_floods),
            ] {
                ConstCounter::new(crate::telemetry::counters::read(n))
                    .encode(family.encode_family(&[("reason", reason)])?)?;
            }
        }
        for (name, help, n) in [
            (
                "weft_hbone_premature_resets",
                "HBONE streams the client reset before they were answered, within the minimum stream lifetime (their connect was dropped)",
                &t.hbone_server.premature_resets,
            ),
            (
                "weft_hbone_keepalive_timeouts",
                "Pooled HBONE connections closed because a keepalive PING went unanswered",
                &t.hbone_client.keepalive_timeouts,
            ),
        ] {
            let c = ConstCounter::new(crate::telemetry::counters::read(n));
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        {
            let help = "Requests to the CA service for workload certificates, by result";
            let proto = ConstCounter::new(0u64);
            let mut family =
                enc.encode_descriptor("weft_ca_requests", help, None, proto.metric_type())?;
            for (result, n) in [
                ("issued", m.ca_requests_issued),
                ("failed", m.ca_requests_failed),
            ] {
                let labels = [("result", result)];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        if let Some(secs) = m.svid_earliest_expiry_seconds {
            gauge(
                &mut enc,
                "weft_svid_earliest_expiry_seconds",
                "Seconds until the first workload certificate this node holds expires (renewed at half-life: alert when it nears zero)",
                i64::try_from(secs).unwrap_or(i64::MAX),
            )?;
        }
        {
            let c = ConstCounter::new(m.capture_gaps);
            c.encode(enc.encode_descriptor(
                "weft_capture_gaps",
                "New pods that connected before their cgroup was enrolled: those connections went around the mesh",
                None,
                c.metric_type(),
            )?)?;
        }
        gauge(
            &mut enc,
            "weft_registry_generation",
            "Generation of the registry snapshot in force",
            g(m.registry_generation),
        )?;
        gauge(
            &mut enc,
            "weft_registry_reload_failed",
            "1 when the last registry reload failed and an older snapshot is in force",
            i64::from(m.registry_reload_failed),
        )?;
        gauge(
            &mut enc,
            "weft_registry_objects_not_applied",
            "Objects of the registry sources left out of the snapshot in force (invalid or of an unknown kind; see weft status)",
            g(m.registry_not_applied),
        )?;
        if !m.registry_watches.is_empty() {
            let proto = ConstGauge::new(0i64);
            let mut family = enc.encode_descriptor(
                "weft_registry_objects",
                "Objects of each kind read from the Kubernetes API",
                None,
                proto.metric_type(),
            )?;
            for w in &m.registry_watches {
                ConstGauge::new(g(w.objects)).encode(family.encode_family(&[("kind", w.kind)])?)?;
            }
            let mut family = enc.encode_descriptor(
                "weft_registry_watch_state",
                "State of the Kubernetes API watch of each kind: 1 for the state it is in",
                None,
                proto.metric_type(),
            )?;
            for w in &m.registry_watches {
                for state in WATCH_STATES {
                    ConstGauge::new(i64::from(w.state == state))
                        .encode(family.encode_family(&[("kind", w.kind), ("state", state)])?)?;
                }
            }
            let proto = ConstGauge::new(0f64);
            let mut family = enc.encode_descriptor(
                "weft_registry_last_sync_age_seconds",
                "Seconds since each kind was last listed from the Kubernetes API or a change of it arrived",
                None,
                proto.metric_type(),
            )?;
            for w in &m.registry_watches {
                if let Some(age) = w.last_sync_age {
                    ConstGauge::new(age).encode(family.encode_family(&[("kind", w.kind)])?)?;
                }
            }
        }
        Ok(())
    }
}

/// The `/metrics` router.
pub fn router(telemetry: Arc<Telemetry>, node: Arc<dyn GaugeSource>) -> Router {
    let probe = node.clone();
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector { telemetry, node }));
    let registry = Arc::new(registry);
    Router::new()
        .route(
            "/healthz/ready",
            get(move || {
                let node = probe.clone();
                async move {
                    match node.ready() {
                        Ok(()) => (axum::http::StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        )
        .route("/healthz/live", get(|| async { "live\n" }))
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    if prometheus_client::encoding::text::encode(&mut body, &registry).is_err() {
                        return (
                            [(header::CONTENT_TYPE, "text/plain")],
                            "encoding failed\n".into(),
                        );
                    }
                    // OpenMetrics to scrapers that ask for it (Prometheus does), else the
                    // classic text format, as Envoy's and Istio's proxies serve.
                    let openmetrics = headers
                        .get_all(header::ACCEPT)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .any(|v| v.contains("application/openmetrics-text"));
                    if openmetrics {
                        ([(header::CONTENT_TYPE, OPENMETRICS)], body)
                    } else {
                        (
                            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                            classic_text(&body),
                        )
                    }
                }
            }),
        )
}

/// Binds the metrics address (a node that takes over from its predecessor is handed the
/// predecessor's socket instead).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))
}

/// Serves `/metrics` on `listener`. It is reachable from pods: `gate` bounds how many
/// connections it holds (in total and per address), `bounds` how long a client may take.
pub async fn serve(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
    node: Arc<dyn GaugeSource>,
    gate: Gate,
    bounds: Bounds,
) -> anyhow::Result<()> {
    serve_bounded(listener, router(telemetry, node), gate, bounds)
        .await
        .context("metrics server")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::api::{Flow, Verdict};

    #[derive(Debug)]
    struct Fixed(NodeGauges);
    impl GaugeSource for Fixed {
        fn gauges(&self) -> NodeGauges {
            self.0.clone()
        }
    }

    #[test]
    fn renders_openmetrics() {
        let mut gauges = NodeGauges {
            workloads: 3,
            enrolled_workloads: 1,
            uncaptured_workloads: 1,
            registry_generation: 4,
            registry_reload_failed: true,
            registry_not_applied: 2,
            registry_watches: vec![WatchSample {
                kind: "Pod",
                state: "retrying",
                objects: 7,
                last_sync_age: Some(1.5),
            }],
            ..Default::default()
        };
        gauges.ebpf.insert("redirected".into(), 8);
        let cluster = "outbound|9080|v2|reviews.back.svc.cluster.local";
        for (stat, gauge, value) in [
            ("upstream_rq_retry", false, 9),
            ("upstream_rq_total", false, 12),
            ("upstream_rq_active", true, 2),
            ("outlier_detection.ejections_active", true, 1),
            ("upstream_rq_503", false, 4),
        ] {
            gauges.clusters.push(ClusterSample {
                cluster: cluster.into(),
                stat: stat.into(),
                gauge,
                value,
            });
        }
        let telemetry = Arc::new(Telemetry::new("n1", 100));
        telemetry.admission.refused.count(
            crate::limits::Listener::Capture,
            crate::limits::Reason::PerPod,
        );
        for (verdict, sent, received) in [(Verdict::Forwarded, 10, 20), (Verdict::Denied, 0, 0)] {
            telemetry.flows.record(Flow {
                verdict,
                bytes_sent: sent,
                bytes_received: received,
                ..Flow::default()
            });
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(NodeCollector {
            telemetry,
            node: Arc::new(Fixed(gauges)),
        }));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        let classic = classic_text(&out);
        for line in [
            "# HELP weft_flows_total Connections handled by the node proxy, by verdict",
            "# TYPE weft_flows_total counter",
            "# TYPE weft_active_connections gauge",
        ] {
            assert!(
                classic.lines().any(|l| l == line),
                "missing {line:?} in\n{classic}"
            );
        }
        assert!(!classic.contains("# EOF"));
        for line in [
            "weft_flows_total{verdict=\"forwarded\"} 1",
            "weft_flows_total{verdict=\"denied\"} 1",
            "weft_flow_bytes_total{direction=\"sent\"} 10",
            "weft_flow_bytes_total{direction=\"received\"} 20",
            "weft_ebpf_events_total{event=\"redirected\"} 8",
            "weft_active_connections 0",
            "weft_enrolled_workloads 1",
            "weft_uncaptured_workloads 1",
            "weft_registry_reload_failed 1",
            "weft_registry_objects_not_applied 2",
            "weft_registry_objects{kind=\"Pod\"} 7",
            "weft_registry_watch_state{kind=\"Pod\",state=\"retrying\"} 1",
            "weft_registry_watch_state{kind=\"Pod\",state=\"watching\"} 0",
            "weft_registry_last_sync_age_seconds{kind=\"Pod\"} 1.5",
            "weft_connections_refused_total{listener=\"capture\",reason=\"per_pod\"} 1",
            "weft_connections_refused_total{listener=\"metrics\",reason=\"per_source\"} 0",
            "weft_capture_connections 0",
            "envoy_cluster_upstream_rq_retry_total{cluster_name=\"outbound|9080|v2|reviews.back.svc.cluster.local\"} 9",
            "envoy_cluster_upstream_rq_total{cluster_name=\"outbound|9080|v2|reviews.back.svc.cluster.local\"} 12",
            "envoy_cluster_upstream_rq_active{cluster_name=\"outbound|9080|v2|reviews.back.svc.cluster.local\"} 2",
            "envoy_cluster_outlier_detection_ejections_active{cluster_name=\"outbound|9080|v2|reviews.back.svc.cluster.local\"} 1",
            "envoy_cluster_upstream_rq_code_total{cluster_name=\"outbound|9080|v2|reviews.back.svc.cluster.local\",response_code=\"503\"} 4",
            "# EOF",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }
}
