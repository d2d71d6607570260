//! The Istio and Gateway API kinds weft reads, by API group and version, and what happens to an
//! object of a kind it does not know.
//!
//! In the groups weft reads (`security.istio.io`, `networking.istio.io`,
//! `gateway.networking.k8s.io`) every object is classified: a kind and version weft honours is
//! kept (security kinds parsed and checked here, in [`security`]); anything else is not applied
//! and reported with the kinds weft knows. A security object weft cannot apply is a policy
//! weft cannot enforce: the workloads it could select fail closed (see
//! [`super::FailClosed`]). Objects of other groups (apps/v1, …) are kept as they are.

pub mod security;

/// API group of AuthorizationPolicy and PeerAuthentication.
pub const SECURITY_GROUP: &str = "security.istio.io";
/// API group of VirtualService, DestinationRule, ServiceEntry.
pub const NETWORKING_GROUP: &str = "networking.istio.io";
/// API group of HTTPRoute and GRPCRoute.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// A kind weft honours and the versions it reads it in.
struct Known {
    group: &'static str,
    kind: &'static str,
    versions: &'static [&'static str],
    what: Kind,
}

/// What weft does with a known kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    AuthorizationPolicy,
    PeerAuthentication,
    /// Kept as it is for the L7 engine (VirtualService, DestinationRule, ServiceEntry,
    /// HTTPRoute, GRPCRoute).
    Route,
}

const KNOWN: &[Known] = &[
    Known {
        group: SECURITY_GROUP,
        kind: "AuthorizationPolicy",
        versions: &["v1", "v1beta1"],
        what: Kind::AuthorizationPolicy,
    },
    Known {
        group: SECURITY_GROUP,
        kind: "PeerAuthentication",
        versions: &["v1", "v1beta1"],
        what: Kind::PeerAuthentication,
    },
    Known {
        group: NETWORKING_GROUP,
        kind: "VirtualService",
        versions: &["v1", "v1beta1", "v1alpha3"],
        what: Kind::Route,
    },
    Known {
        group: NETWORKING_GROUP,
        kind: "DestinationRule",
        versions: &["v1", "v1beta1", "v1alpha3"],
        what: Kind::Route,
    },
    Known {
        group: NETWORKING_GROUP,
        kind: "ServiceEntry",
        versions: &["v1", "v1beta1", "v1alpha3"],
        what: Kind::Route,
    },
    Known {
        group: GATEWAY_GROUP,
        kind: "HTTPRoute",
        versions: &["v1", "v1beta1"],
        what: Kind::Route,
    },
    Known {
        group: GATEWAY_GROUP,
        kind: "GRPCRoute",
        versions: &["v1", "v1alpha2"],
        what: Kind::Route,
    },
];

/// How weft treats an object, from its `apiVersion` and `kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// A kind and version weft honours.
    Known(Kind),
    /// A group weft reads, but a kind or version it does not know: not applied. `security`:
    /// in `security.istio.io`, so the workloads it could select fail closed.
    Unknown { reason: String, security: bool },
    /// A group weft does not read (core kinds are handled before this).
    Foreign,
}

/// Classifies `api_version`/`kind` (`security.istio.io/v1`, `AuthorizationPolicy`).
pub fn classify(api_version: &str, kind: &str) -> Class {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let in_group: Vec<&Known> = KNOWN.iter().filter(|k| k.group == group).collect();
    if in_group.is_empty() {
        return Class::Foreign;
    }
    let security = group == SECURITY_GROUP;
    let known_list = || {
        in_group
            .iter()
            .map(|k| format!("{} ({})", k.kind, k.versions.join(", ")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(known) = in_group.iter().find(|k| k.kind == kind) else {
        let hint = in_group
            .iter()
            .filter(|k| k.kind.eq_ignore_ascii_case(kind) || strsim::levenshtein(k.kind, kind) <= 3)
            .map(|k| format!(" (did you mean {}?)", k.kind))
            .next()
            .unwrap_or_default();
        let reason = format!(
            "unknown kind {kind:?} in {group}{hint}: weft knows {}",
            known_list()
        );
        return Class::Unknown { reason, security };
    };
    if !known.versions.contains(&version) {
        let reason = format!(
            "{} is not served in version {version:?} of {group}: weft reads {kind} in {}",
            known.kind,
            known
                .versions
                .iter()
                .map(|v| format!("{group}/{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Class::Unknown { reason, security };
    }
    Class::Known(known.what)
}

/// Whether objects of `api_version`/`kind` live in a namespace: every kind of the groups weft
/// reads does (an object without `metadata.namespace` is in `default`, as `kubectl apply`
/// puts it).
pub fn namespaced_group(api_version: &str) -> bool {
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    KNOWN.iter().any(|k| k.group == group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_kinds_in_every_served_version() {
        for v in ["v1", "v1beta1"] {
            assert_eq!(
                classify(&format!("security.istio.io/{v}"), "AuthorizationPolicy"),
                Class::Known(Kind::AuthorizationPolicy)
            );
            assert_eq!(
                classify(&format!("security.istio.io/{v}"), "PeerAuthentication"),
                Class::Known(Kind::PeerAuthentication)
            );
        }
        for v in ["v1", "v1beta1", "v1alpha3"] {
            for k in ["VirtualService", "DestinationRule", "ServiceEntry"] {
                assert_eq!(
                    classify(&format!("networking.istio.io/{v}"), k),
                    Class::Known(Kind::Route)
                );
            }
        }
        assert_eq!(
            classify("gateway.networking.k8s.io/v1", "HTTPRoute"),
            Class::Known(Kind::Route)
        );
        assert_eq!(
            classify("gateway.networking.k8s.io/v1alpha2", "GRPCRoute"),
            Class::Known(Kind::Route)
        );
    }

    #[test]
    fn a_misspelt_security_kind_fails_closed_with_a_hint() {
        let Class::Unknown { reason, security } =
            classify("security.istio.io/v1", "AuthorisationPolicy")
        else {
            panic!("not unknown")
        };
        assert!(security);
        assert!(
            reason.contains("(did you mean AuthorizationPolicy?)"),
            "{reason}"
        );
        assert!(
            reason.contains(
                "weft knows AuthorizationPolicy (v1, v1beta1), PeerAuthentication (v1, v1beta1)"
            ),
            "{reason}"
        );
    }

    #[test]
    fn an_unserved_version_names_the_served_ones() {
        let Class::Unknown { reason, security } =
            classify("security.istio.io/v2", "AuthorizationPolicy")
        else {
            panic!("not unknown")
        };
        assert!(security);
        assert_eq!(
            reason,
            "AuthorizationPolicy is not served in version \"v2\" of security.istio.io: weft reads AuthorizationPolicy in security.istio.io/v1, security.istio.io/v1beta1"
        );
        // Kinds weft does not implement yet are unknown too: a security one fails closed.
        assert!(matches!(
            classify("security.istio.io/v1", "RequestAuthentication"),
            Class::Unknown { security: true, .. }
        ));
    }

    #[test]
    fn unknown_routing_kinds_are_reported_but_do_not_fail_closed() {
        for (v, k) in [
            ("networking.istio.io/v1", "VirtualServices"),
            ("networking.istio.io/v2", "VirtualService"),
            ("networking.istio.io/v1", "Sidecar"),
            ("gateway.networking.k8s.io/v1", "TCPRoute"),
        ] {
            assert!(
                matches!(
                    classify(v, k),
                    Class::Unknown {
                        security: false,
                        ..
                    }
                ),
                "{v} {k}"
            );
        }
    }

    #[test]
    fn other_groups_are_foreign() {
        assert_eq!(classify("apps/v1", "Deployment"), Class::Foreign);
        assert_eq!(classify("istio.io/v1", "Anything"), Class::Foreign);
        assert_eq!(classify("v1", "ConfigMap"), Class::Foreign);
        assert!(namespaced_group("security.istio.io/v2"));
        assert!(!namespaced_group("apps/v1"));
    }
}
