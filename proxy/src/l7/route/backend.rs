//! Destinations → what to connect to, and the DestinationRule in force.
//!
//! A routing host is a Service (`name.ns.svc.cluster.local`) or a ServiceEntry host (exact or
//! wildcard, visible to the client's namespace per `exportTo`). The DestinationRule for a host
//! is looked up as Istio does: in the client's namespace, then in the destination's namespace
//! (if exported to the client), then in the root namespace (`istio-system`, exported); within a
//! namespace the exact host before the longest wildcard; several for one host in one namespace
//! are merged (the oldest first: its traffic policy, then every subset whose name is new).
//! DestinationRules with a `workloadSelector` are not applied (they select client workloads;
//! the node proxy answers per destination).
//!
//! Settings merge as Istio's `MergeTrafficPolicy`: top level; a top-level `portLevelSettings`
//! entry for the port replaces load balancer, connection pool, outlier detection and TLS
//! together; the subset's policy overrides field by field; a subset's port-level entry replaces
//! the four again.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use super::{parse_service_fqdn, Hosts};
use crate::config::DEFAULT_ROOT_NAMESPACE;
use crate::l7::protocol::{declared, declared_by_name, AppProtocol};
use crate::registry::kinds::networking::{
    exported_to, host_matches, ClientTlsSettings, ConnectionPoolSettings, DestinationRule,
    LoadBalancerSettings, Location, OutlierDetection, ProxyProtocol, Resolution, ServiceEntry,
    Subset, TrafficPolicy as IstioPolicy, TunnelSettings,
};
use crate::registry::{Labels, Service, ServicePort, Snapshot};

/// Where a destination sends, and how.
#[derive(Debug, Clone)]
pub struct Backend {
    pub target: Target,
    /// The subset's labels: only endpoints carrying them.
    pub subset_labels: Option<Labels>,
    pub policy: TrafficPolicy,
    /// The port's declared protocol (`None`: sniff).
    pub protocol: Option<AppProtocol>,
}

/// A Service port or a ServiceEntry port.
#[derive(Debug, Clone)]
pub enum Target {
    Service {
        service: Arc<Service>,
        port: ServicePort,
    },
    External {
        external: External,
        port: ExternalPort,
    },
}

/// One host of a ServiceEntry. The data path resolves DNS names itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct External {
    pub namespace: String,
    pub name: String,
    pub host: String,
    pub addresses: Vec<IpNet>,
    pub ports: Vec<ExternalPort>,
    pub resolution: Resolution,
    pub location: Location,
    pub endpoints: Vec<ExternalEndpoint>,
    pub subject_alt_names: Vec<String>,
    pub export_to: Vec<String>,
}

/// A ServiceEntry port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExternalPort {
    pub number: u16,
    pub name: String,
    /// `protocol` as written (`HTTP`, `TLS`, …; empty: sniff).
    pub protocol: String,
    /// Where endpoints listen when no endpoint says otherwise (`None`: `number`).
    pub target_port: Option<u16>,
}

/// A ServiceEntry endpoint: an IP address, or a DNS name with DNS resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExternalEndpoint {
    pub address: String,
    /// Port name → port.
    pub ports: BTreeMap<String, u16>,
    pub labels: Labels,
    pub network: String,
    pub locality: String,
    pub weight: u32,
    pub service_account: String,
}

/// The merged DestinationRule settings for one destination (typed as the API writes them).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    /// TLS origination towards the destination.
    pub tls: Option<ClientTlsSettings>,
    pub tunnel: Option<TunnelSettings>,
    pub proxy_protocol: Option<ProxyProtocol>,
    /// `namespace/name` of the DestinationRule(s) applied.
    pub destination_rule: Option<String>,
}

/// DestinationRules of one namespace for one host, merged.
#[derive(Debug, Clone)]
struct MergedRule {
    name: String,
    policy: Option<IstioPolicy>,
    subsets: Vec<Subset>,
    export_to: Vec<String>,
    namespace: String,
}

/// Services, ServiceEntries and DestinationRules, indexed.
#[derive(Debug, Default)]
pub(crate) struct Backends {
    services: FastMap<String, Arc<Service>>,
    externals: Vec<External>,
    external_hosts: FastMap<String, Vec<usize>>,
    /// Wildcard hosts, longest first.
    external_wildcards: Vec<(String, usize)>,
    external_ips: FastMap<(IpAddr, u16), usize>,
    external_cidrs: Vec<(IpNet, u16, usize)>,
    /// namespace → qualified host → merged rules (looked up per request without allocating).
    rules: FastMap<String, FastMap<String, MergedRule>>,
    /// namespace → wildcard hosts with rules there, longest first.
    wildcard_rules: FastMap<String, Vec<String>>,
}

/// The tables' maps: looked up on every connection and request, by keys from the registry.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

fn merge(into: &mut MergedRule, dr: &DestinationRule) {
    if into.policy.is_none() {
        into.policy = dr.spec.traffic_policy.clone();
    }
    for s in &dr.spec.subsets {
        if !into.subsets.iter().any(|x| x.name == s.name) {
            into.subsets.push(s.clone());
        }
    }
    into.name = format!("{}, {}", into.name, dr.meta.name);
}

impl Backends {
    pub(crate) fn build(snapshot: &Snapshot, hosts: &Hosts<'_>) -> Backends {
        let mut b = Backends::default();
        for svc in &snapshot.services {
            b.services
                .insert(super::service_fqdn(&svc.namespace, &svc.name), svc.clone());
        }
        let mut entries: Vec<&Arc<ServiceEntry>> = snapshot.service_entries.iter().collect();
        entries.sort_by(|a, b| a.meta.precedence().cmp(&b.meta.precedence()));
        for se in entries {
            b.add_service_entry(se);
        }
        b.external_wildcards
            .sort_by(|a, c| c.0.len().cmp(&a.0.len()).then(a.0.cmp(&c.0)));
        b.external_cidrs
            .sort_by_key(|c| std::cmp::Reverse(c.0.prefix_len()));
        let mut rules: Vec<&Arc<DestinationRule>> = snapshot
            .destination_rules
            .iter()
            .filter(|d| d.spec.workload_selector.is_none())
            .collect();
        rules.sort_by(|a, c| a.meta.precedence().cmp(&c.meta.precedence()));
        for dr in rules {
            let host = hosts.qualify(&dr.spec.host, &dr.meta.namespace);
            let in_ns = b.rules.entry(dr.meta.namespace.clone()).or_default();
            match in_ns.get_mut(&host) {
                Some(m) => merge(m, dr),
                None => {
                    if host.starts_with('*') {
                        b.wildcard_rules
                            .entry(dr.meta.namespace.clone())
                            .or_default()
                            .push(host.clone());
                    }
                    in_ns.insert(
                        host.clone(),
                        MergedRule {
                            name: dr.meta.name.clone(),
                            policy: dr.spec.traffic_policy.clone(),
                            subsets: dr.spec.subsets.clone(),
                            export_to: dr.spec.export_to.clone(),
                            namespace: dr.meta.namespace.clone(),
                        },
                    );
                }
            }
        }
        for list in b.wildcard_rules.values_mut() {
            list.sort_by(|a, c| c.len().cmp(&a.len()).then(a.cmp(c)));
        }
        b
    }

    fn add_service_entry(&mut self, se: &ServiceEntry) {
        let spec = &se.spec;
        let ports: Vec<ExternalPort> = spec
            .ports
            .iter()
            .map(|p| ExternalPort {
                number: p.number as u16,
                name: p.name.clone(),
                protocol: p.protocol.clone(),
                target_port: (p.target_port != 0).then_some(p.target_port as u16),
            })
            .collect();
        let addresses: Vec<IpNet> = spec
            .addresses
            .iter()
            .filter_map(|a| crate::registry::kinds::security::parse_net(a))
            .collect();
        let endpoints: Vec<ExternalEndpoint> = spec
            .endpoints
            .iter()
            .flatten()
            .map(|e| ExternalEndpoint {
                address: e.address.clone(),
                ports: e
                    .ports
                    .iter()
                    .map(|(k, v)| (k.clone(), *v as u16))
                    .collect(),
                labels: e.labels.clone(),
                network: e.network.clone(),
                locality: e.locality.clone(),
                weight: e.weight,
                service_account: e.service_account.clone(),
            })
            .collect();
        for host in &spec.hosts {
            let i = self.externals.len();
            self.externals.push(External {
                namespace: se.meta.namespace.clone(),
                name: se.meta.name.clone(),
                host: host.clone(),
                addresses: addresses.clone(),
                ports: ports.clone(),
                resolution: spec.resolution,
                location: spec.location,
                endpoints: endpoints.clone(),
                subject_alt_names: spec.subject_alt_names.clone(),
                export_to: spec.export_to.clone(),
            });
            if host.starts_with('*') {
                self.external_wildcards.push((host.clone(), i));
            } else {
                self.external_hosts.entry(host.clone()).or_default().push(i);
            }
            // Addresses and STATIC endpoint IPs identify the entry's first host.
            if host != &spec.hosts[0] {
                continue;
            }
            for net in &addresses {
                for p in &ports {
                    if net.prefix_len() == net.max_prefix_len() {
                        self.external_ips.entry((net.addr(), p.number)).or_insert(i);
                    } else {
                        self.external_cidrs.push((*net, p.number, i));
                    }
                }
            }
            if spec.resolution == Resolution::Static {
                for e in &endpoints {
                    let Ok(ip) = e.address.parse::<IpAddr>() else {
                        continue;
                    };
                    for p in &ports {
                        let port = e
                            .ports
                            .get(&p.name)
                            .copied()
                            .or(p.target_port)
                            .unwrap_or(p.number);
                        self.external_ips
                            .entry((ip.to_canonical(), port))
                            .or_insert(i);
                    }
                }
            }
        }
    }

    pub(crate) fn external_by_address(&self, ip: IpAddr, port: u16) -> Option<&External> {
        let ip = ip.to_canonical();
        if let Some(&i) = self.external_ips.get(&(ip, port)) {
            return Some(&self.externals[i]);
        }
        self.external_cidrs
            .iter()
            .find(|(net, p, _)| *p == port && net.contains(&ip))
            .map(|(_, _, i)| &self.externals[*i])
    }

    pub(crate) fn external_by_authority(&self, authority: &str, port: u16) -> Option<&External> {
        let host = authority_host(authority).to_ascii_lowercase();
        let serves = |i: &usize| self.externals[*i].ports.iter().any(|p| p.number == port);
        if let Some(i) = self
            .external_hosts
            .get(&host)
            .and_then(|list| list.iter().find(|i| serves(i)))
        {
            return Some(&self.externals[*i]);
        }
        self.external_wildcards
            .iter()
            .find(|(pattern, i)| host_matches(pattern, &host) && serves(i))
            .map(|(_, i)| &self.externals[*i])
    }

    /// A ServiceEntry host for `host` visible from `from`.
    fn external(&self, host: &str, from: Option<&str>) -> Option<&External> {
        let visible = |e: &External| match from {
            Some(ns) => exported_to(&e.namespace, &e.export_to, ns),
            None => e.export_to.is_empty() || e.export_to.iter().any(|x| x == "*"),
        };
        let exact = self
            .external_hosts
            .get(host)
            .into_iter()
            .flatten()
            .map(|i| &self.externals[*i])
            .find(|e| visible(e));
        exact.or_else(|| {
            self.external_wildcards
                .iter()
                .map(|(p, i)| (p, &self.externals[*i]))
                .find(|(p, e)| host_matches(p, host) && visible(e))
                .map(|(_, e)| e)
        })
    }

    /// The DestinationRule of `namespace` for `host` (exact, then the longest wildcard).
    fn rule_in(&self, namespace: &str, host: &str) -> Option<&MergedRule> {
        let in_ns = self.rules.get(namespace)?;
        if let Some(r) = in_ns.get(host) {
            return Some(r);
        }
        self.wildcard_rules
            .get(namespace)?
            .iter()
            .find(|p| host_matches(p, host))
            .and_then(|p| in_ns.get(p))
    }

    /// Istio's lookup order: the client's namespace, the destination's, the root namespace.
    fn rule_for(&self, host: &str, target_ns: &str, from: Option<&str>) -> Option<&MergedRule> {
        let exported = |r: &&MergedRule| match from {
            Some(ns) => exported_to(&r.namespace, &r.export_to, ns),
            None => r.export_to.is_empty() || r.export_to.iter().any(|x| x == "*"),
        };
        from.and_then(|ns| self.rule_in(ns, host))
            .or_else(|| self.rule_in(target_ns, host).filter(exported))
            .or_else(|| self.rule_in(DEFAULT_ROOT_NAMESPACE, host).filter(exported))
    }

    pub(crate) fn backend(
        &self,
        host: &str,
        port: Option<u16>,
        subset: Option<&str>,
        from: Option<&str>,
    ) -> Option<Backend> {
        let service = parse_service_fqdn(host).and_then(|_| self.services.get(host));
        let (target, protocol, namespace, number) = match service {
            Some(svc) => {
                let tcp: Vec<&ServicePort> =
                    svc.ports.iter().filter(|p| p.protocol == "TCP").collect();
                let p = match port {
                    Some(n) => tcp.iter().find(|p| p.port == n).copied()?,
                    None if tcp.len() == 1 => tcp[0],
                    None => return None,
                };
                (
                    Target::Service {
                        service: svc.clone(),
                        port: p.clone(),
                    },
                    declared(p),
                    svc.namespace.clone(),
                    p.port,
                )
            }
            None => {
                let e = self.external(host, from)?;
                let p = match port {
                    Some(n) => e.ports.iter().find(|p| p.number == n)?,
                    None if e.ports.len() == 1 => &e.ports[0],
                    None => return None,
                };
                (
                    Target::External {
                        external: e.clone(),
                        port: p.clone(),
                    },
                    declared_by_name(&p.protocol),
                    e.namespace.clone(),
                    p.number,
                )
            }
        };
        let (subset, policy) = self.subset_policy(host, &namespace, number, subset, from)?;
        Some(Backend {
            target,
            subset_labels: subset.map(|s| s.labels.clone()),
            policy,
            protocol,
        })
    }

    /// What [`Backends::backend`] gives as its `policy`, without building the rest: a TCP
    /// connection's plan needs only the DestinationRule settings.
    pub(crate) fn policy(
        &self,
        host: &str,
        port: u16,
        subset: Option<&str>,
        from: Option<&str>,
    ) -> Option<TrafficPolicy> {
        let service = parse_service_fqdn(host).and_then(|_| self.services.get(host));
        let namespace = match service {
            Some(svc) => {
                let tcp = |p: &&ServicePort| p.protocol == "TCP" && p.port == port;
                svc.ports.iter().find(tcp)?;
                svc.namespace.as_str()
            }
            None => {
                let e = self.external(host, from)?;
                e.ports.iter().find(|p| p.number == port)?;
                e.namespace.as_str()
            }
        };
        self.subset_policy(host, namespace, port, subset, from)
            .map(|(_, policy)| policy)
    }

    /// The subset named (`None`: no such subset in the rule in force) and the settings in
    /// force for `host` of `namespace` on `port`, as the client in `from` sees them.
    fn subset_policy(
        &self,
        host: &str,
        namespace: &str,
        port: u16,
        subset: Option<&str>,
        from: Option<&str>,
    ) -> Option<(Option<&Subset>, TrafficPolicy)> {
        let rule = self.rule_for(host, namespace, from);
        let subset = match subset {
            None => None,
            Some(name) => Some(rule?.subsets.iter().find(|s| s.name == name)?),
        };
        Some((subset, merged_policy(rule, subset, port)))
    }
}

/// `host` of `host[:port]` (IPv6 brackets kept).
fn authority_host(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// Istio's `MergeTrafficPolicy` for `port`.
fn merged_policy(rule: Option<&MergedRule>, subset: Option<&Subset>, port: u16) -> TrafficPolicy {
    let mut out = TrafficPolicy {
        destination_rule: rule.map(|r| format!("{}/{}", r.namespace, r.name)),
        ..TrafficPolicy::default()
    };
    let apply_port_level = |out: &mut TrafficPolicy, policy: &IstioPolicy| {
        if let Some(p) = policy
            .port_level_settings
            .iter()
            .find(|p| p.port.is_some_and(|s| s.number == u32::from(port)))
        {
            // Port-level settings do not inherit: unset fields fall back to defaults.
            out.load_balancer = p.load_balancer.clone();
            out.connection_pool = p.connection_pool.clone();
            out.outlier_detection = p.outlier_detection.clone();
            out.tls = p.tls.clone();
        }
    };
    if let Some(top) = rule.and_then(|r| r.policy.as_ref()) {
        out.load_balancer = top.load_balancer.clone();
        out.connection_pool = top.connection_pool.clone();
        out.outlier_detection = top.outlier_detection.clone();
        out.tls = top.tls.clone();
        out.tunnel = top.tunnel.clone();
        out.proxy_protocol = top.proxy_protocol.clone();
        apply_port_level(&mut out, top);
    }
    if let Some(sp) = subset.and_then(|s| s.traffic_policy.as_ref()) {
        if sp.load_balancer.is_some() {
            out.load_balancer = sp.load_balancer.clone();
        }
        if sp.connection_pool.is_some() {
            out.connection_pool = sp.connection_pool.clone();
        }
        if sp.outlier_detection.is_some() {
            out.outlier_detection = sp.outlier_detection.clone();
        }
        if sp.tls.is_some() {
            out.tls = sp.tls.clone();
        }
        if sp.tunnel.is_some() {
            out.tunnel = sp.tunnel.clone();
        }
        if sp.proxy_protocol.is_some() {
            out.proxy_protocol = sp.proxy_protocol.clone();
        }
        apply_port_level(&mut out, sp);
    }
    out
}
