//! `weft status`: what the node runs and how it is doing.

use std::io::Write;

use super::table::yes_no;
use super::{Output, StatusArgs};
use crate::admin::api::Status;

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let status: Status = args.target.client().get_json("/status").await?;
    let mut out = std::io::stdout().lock();
    if args.output == Output::Json {
        serde_json::to_writer(&mut out, &status)?;
        writeln!(out)?;
        return Ok(());
    }
    render(&mut out, &status)?;
    Ok(())
}

fn render(out: &mut impl Write, s: &Status) -> std::io::Result<()> {
    let r = &s.registry;
    writeln!(out, "Node:        {}", s.node)?;
    writeln!(out, "Ready:       {}", yes_no(s.ready))?;
    writeln!(out, "Proxy:       {}", s.proxy_address)?;
    writeln!(
        out,
        "Registry:    generation {} loaded {} ({} pods, {} services)",
        r.generation, r.loaded_at, r.pods, r.services
    )?;
    if let Some(e) = &r.last_error {
        writeln!(
            out,
            "             last reload FAILED, previous snapshot kept: {e}"
        )?;
    }
    if !r.not_applied.is_empty() {
        writeln!(out, "             not applied ({}):", r.not_applied.len())?;
        for line in &r.not_applied {
            writeln!(out, "               {line}")?;
        }
    }
    if !r.watches.is_empty() {
        writeln!(out, "             from the Kubernetes API:")?;
        for w in &r.watches {
            let detail = match (&w.error, &w.last_sync) {
                (Some(e), _) => format!("error: {e}"),
                (None, Some(at)) => format!("synced {at}"),
                (None, None) => String::new(),
            };
            writeln!(
                out,
                "               {:<20} {:<32} {:<13} {:>6} {detail}",
                w.kind, w.api_version, w.state, w.objects
            )?;
        }
    }
    if !r.warnings.is_empty() {
        writeln!(out, "             warnings ({}):", r.warnings.len())?;
        for line in &r.warnings {
            writeln!(out, "               {line}")?;
        }
    }
    writeln!(
        out,
        "Workloads:   {} on this node, {} enrolled",
        s.workloads.total, s.workloads.enrolled
    )?;
    if !s.workloads.uncaptured.is_empty() {
        writeln!(
            out,
            "             NOT CAPTURED ({}):",
            s.workloads.uncaptured.len()
        )?;
        for line in &s.workloads.uncaptured {
            writeln!(out, "               {line}")?;
        }
    }
    if !s.workloads.capture_gaps.is_empty() {
        writeln!(
            out,
            "             CONNECTED BEFORE CAPTURE (last {}):",
            s.workloads.capture_gaps.len()
        )?;
        for line in &s.workloads.capture_gaps {
            writeln!(out, "               {line}")?;
        }
    }
    let c = &s.capture;
    writeln!(
        out,
        "Attach:      {} (pins in {})",
        c.attach_point.display(),
        c.pin_path.display()
    )?;
    writeln!(out, "Programs:")?;
    for p in &c.programs {
        writeln!(out, "  {:<16} attached={} id={}", p.name, p.attached, p.id)?;
    }
    writeln!(out, "Maps:")?;
    for m in &c.maps {
        writeln!(out, "  {:<16} {} / {}", m.name, m.entries, m.max_entries)?;
    }
    writeln!(out, "Counters:")?;
    for (k, v) in &c.counters {
        writeln!(out, "  {:<30} {v}", format!("ebpf.{k}"))?;
    }
    for (k, v) in &s.flows.totals {
        writeln!(out, "  {:<30} {v}", format!("flows.{k}"))?;
    }
    writeln!(out, "Flows kept:  {} of {}", s.flows.kept, s.flows.capacity)?;
    let junk = &s.flows.unattributed;
    writeln!(
        out,
        "Unattributed flows (no workload, or over a limit): {} kept of {}, {} seen, {} dropped",
        junk.kept, junk.capacity, junk.seen, junk.dropped
    )?;
    let m = &s.mesh;
    writeln!(
        out,
        "Mesh:        trust domain {}, {} SVIDs, {} AuthorizationPolicies, {} PeerAuthentications",
        m.trust_domain, m.svids, m.authorization_policies, m.peer_authentications
    )?;
    if !m.ca.is_empty() {
        let ca = match m.ca.strip_prefix("service ") {
            Some(address) => format!(
                "CA service {address}: {} certificates issued, {} requests failed",
                m.ca_issued, m.ca_failed
            ),
            None => "signs with the CA key itself (development mode)".to_string(),
        };
        writeln!(out, "Certs:       {ca}")?;
        if let Some(e) = &m.ca_last_error {
            writeln!(out, "             last failure: {e}")?;
        }
    }
    if !m.fail_closed.is_empty() {
        writeln!(
            out,
            "             FAILING CLOSED (every connection denied, STRICT) because of:"
        )?;
        for line in &m.fail_closed {
            writeln!(out, "               {line}")?;
        }
    }
    let l = &s.limits;
    if l.max_connections > 0 {
        let refused: Vec<String> = l
            .refused
            .iter()
            .filter(|r| r.count > 0)
            .map(|r| format!("{} {} {}", r.listener, r.reason, r.count))
            .collect();
        writeln!(
            out,
            "Limits:      capture {} of {} connections open ({} per pod); refused: {}",
            l.capture_open,
            l.max_connections,
            l.max_connections_per_pod,
            if refused.is_empty() {
                "none".to_string()
            } else {
                refused.join(", ")
            }
        )?;
    }
    let t = &s.tunnel;
    writeln!(
        out,
        "HBONE:       outbound {} TLS connections ({} streams active); inbound {} TLS accepted, {} refused",
        t.outbound.connections, t.outbound.streams_active, t.inbound.tls_accepted, t.inbound.tls_failed
    )?;
    let i = &t.inbound;
    writeln!(
        out,
        "             refused at accept: {} (node handshakes), {} (handshakes per address), {} (connections per address); {} premature resets, {} connections closed for reset floods; {} outbound keepalive timeouts",
        i.refused_handshakes,
        i.refused_peer_handshakes,
        i.refused_peer_connections,
        i.premature_resets,
        i.reset_floods,
        t.outbound.keepalive_timeouts_total
    )?;
    Ok(())
}
