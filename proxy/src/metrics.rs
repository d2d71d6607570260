//! Prometheus metrics on their own listener (default `0.0.0.0:15020`, path `/metrics`), so
//! scrapes never share a port or a queue with traffic or the admin API.
//!
//! Values are read from the node's live state at scrape time (flow totals, eBPF counters,
//! workloads, registry), so nothing on the data path pays for metrics it does not already keep.

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

use crate::flows::Verdict;

/// What the node reports, read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct MetricsSnapshot {
    pub flows_by_verdict: BTreeMap<Verdict, u64>,
    /// Bytes of finished flows, source → destination.
    pub bytes_sent: u64,
    /// Bytes of finished flows, destination → source.
    pub bytes_received: u64,
    pub active_connections: u64,
    /// eBPF counters by name (`redirected`, `not_enrolled`, …).
    pub ebpf: BTreeMap<String, u64>,
    pub workloads: u64,
    pub enrolled_workloads: u64,
    pub registry_generation: u64,
    pub registry_reload_failed: bool,
}

pub trait MetricsSource: Send + Sync + std::fmt::Debug + 'static {
    fn metrics(&self) -> MetricsSnapshot;
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug)]
struct NodeCollector(Arc<dyn MetricsSource>);

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let m = self.0.metrics();
        {
            let help = "Connections handled by the node proxy, by verdict";
            let proto = ConstCounter::new(0u64);
            let mut family =
                enc.encode_descriptor("weft_flows", help, None, proto.metric_type())?;
            for (verdict, n) in &m.flows_by_verdict {
                let labels = [("verdict", verdict.as_str())];
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let help = "Bytes relayed by finished connections";
            let proto = ConstCounter::new(0u64);
            let mut family =
                enc.encode_descriptor("weft_flow_bytes", help, None, proto.metric_type())?;
            for (direction, n) in [("sent", m.bytes_sent), ("received", m.bytes_received)] {
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
        gauge(
            &mut enc,
            "weft_active_connections",
            "Connections being relayed now",
            g(m.active_connections),
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
        Ok(())
    }
}

/// The `/metrics` router over `source`.
pub fn router(source: Arc<dyn MetricsSource>) -> Router {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector(source)));
    let registry = Arc::new(registry);
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], body),
                    Err(_) => (
                        [(header::CONTENT_TYPE, "text/plain")],
                        "encoding failed\n".into(),
                    ),
                }
            }
        }),
    )
}

pub async fn serve(addr: SocketAddr, source: Arc<dyn MetricsSource>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    axum::serve(listener, router(source))
        .await
        .context("metrics server")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(MetricsSnapshot);
    impl MetricsSource for Fixed {
        fn metrics(&self) -> MetricsSnapshot {
            self.0.clone()
        }
    }

    #[test]
    fn renders_openmetrics() {
        let mut snap = MetricsSnapshot {
            bytes_sent: 10,
            bytes_received: 20,
            active_connections: 2,
            workloads: 3,
            enrolled_workloads: 1,
            registry_generation: 4,
            registry_reload_failed: true,
            ..Default::default()
        };
        snap.flows_by_verdict.insert(Verdict::Forwarded, 7);
        snap.flows_by_verdict.insert(Verdict::Denied, 1);
        snap.ebpf.insert("redirected".into(), 8);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(NodeCollector(Arc::new(Fixed(snap)))));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        for line in [
            "weft_flows_total{verdict=\"forwarded\"} 7",
            "weft_flows_total{verdict=\"denied\"} 1",
            "weft_flow_bytes_total{direction=\"sent\"} 10",
            "weft_flow_bytes_total{direction=\"received\"} 20",
            "weft_ebpf_events_total{event=\"redirected\"} 8",
            "weft_active_connections 2",
            "weft_enrolled_workloads 1",
            "weft_registry_reload_failed 1",
            "# EOF",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }
}
