//! The Istio and Gateway API kinds weft reads, by API group and version, and what happens to an
//! object of a kind it does not know.
//!
//! In the groups weft reads (`security.istio.io`, `networking.istio.io`,
//! `gateway.networking.k8s.io`) every object is classified: a kind and version weft honours is
//! parsed and checked into typed objects (security kinds in [`security`], Istio routing kinds in
//! [`networking`], Gateway API routes in [`gateway`]); anything else is not applied and reported
//! with the kinds weft knows. A security object weft cannot apply is a policy
//! weft cannot enforce: the workloads it could select fail closed (see
//! [`super::FailClosed`]). Objects of other groups (apps/v1, …) are kept as they are.

pub mod gateway;
pub mod networking;
#[cfg(test)]
mod routing_tests;
pub mod security;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use time::OffsetDateTime;

use crate::registry::{FieldError, RawObject};

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
    VirtualService,
    DestinationRule,
    ServiceEntry,
    HttpRoute,
    GrpcRoute,
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
        what: Kind::VirtualService,
    },
    Known {
        group: NETWORKING_GROUP,
        kind: "DestinationRule",
        versions: &["v1", "v1beta1", "v1alpha3"],
        what: Kind::DestinationRule,
    },
    Known {
        group: NETWORKING_GROUP,
        kind: "ServiceEntry",
        versions: &["v1", "v1beta1", "v1alpha3"],
        what: Kind::ServiceEntry,
    },
    Known {
        group: GATEWAY_GROUP,
        kind: "HTTPRoute",
        versions: &["v1", "v1beta1"],
        what: Kind::HttpRoute,
    },
    Known {
        group: GATEWAY_GROUP,
        kind: "GRPCRoute",
        versions: &["v1", "v1alpha2"],
        what: Kind::GrpcRoute,
    },
];

/// How weft treats an object, from its `apiVersion` and `kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// A kind and version weft honours.
    Known(Kind),
    /// Meant for a group weft reads, but a kind, version or group spelling weft does not know:
    /// not applied. `security`: meant for `security.istio.io`, so the workloads it could select
    /// fail closed.
    Unknown { reason: String, security: bool },
    /// A group weft does not read (core kinds are handled before this).
    Foreign,
}

/// The groups weft reads.
const GROUPS: [&str; 3] = [SECURITY_GROUP, NETWORKING_GROUP, GATEWAY_GROUP];

/// Classifies `api_version`/`kind` (`security.istio.io/v1`, `AuthorizationPolicy`).
///
/// Mistakes count as meant for a group weft reads, so they are reported (and a security object
/// fails closed) rather than passed over as some other group's object: a misspelt group
/// (`secruity.istio.io/v1`), a group without version (`security.istio.io`), or a kind of
/// weft's under the core group or none (`apiVersion: v1, kind: AuthorizationPolicy`).
pub fn classify(api_version: &str, kind: &str) -> Class {
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        // `v1` is the core group; `security.istio.io` is a group without its version.
        None if api_version.contains('.') => (api_version, ""),
        None => ("", api_version),
    };
    if GROUPS.contains(&group) {
        return in_group(group, version, kind);
    }
    if let Some(meant) = GROUPS.iter().find(|g| strsim::levenshtein(g, group) <= 3) {
        let reason = format!(
            "unknown API group {group:?} (did you mean {meant}?): weft reads {}",
            GROUPS.join(", ")
        );
        return Class::Unknown {
            reason,
            security: *meant == SECURITY_GROUP,
        };
    }
    if group.is_empty() {
        if let Some(known) = KNOWN.iter().find(|k| near(k.kind, kind)) {
            let reason = format!(
                "{kind} is not a core kind: weft reads {} in {}/{}",
                known.kind, known.group, known.versions[0]
            );
            return Class::Unknown {
                reason,
                security: known.group == SECURITY_GROUP,
            };
        }
    }
    Class::Foreign
}

/// `kind`/`version` in `group`, one of the groups weft reads.
fn in_group(group: &str, version: &str, kind: &str) -> Class {
    let in_group: Vec<&Known> = KNOWN.iter().filter(|k| k.group == group).collect();
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
            .find(|k| near(k.kind, kind))
            .map(|k| format!(" (did you mean {}?)", k.kind))
            .unwrap_or_default();
        let reason = format!(
            "unknown kind {kind:?} in {group}{hint}: weft knows {}",
            known_list()
        );
        return Class::Unknown { reason, security };
    };
    if !known.versions.contains(&version) {
        let served = known
            .versions
            .iter()
            .map(|v| format!("{group}/{v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let reason = if version.is_empty() {
            format!("apiVersion {group:?} has no version: weft reads {kind} in {served}")
        } else {
            format!(
                "{} is not served in version {version:?} of {group}: weft reads {kind} in {served}",
                known.kind
            )
        };
        return Class::Unknown { reason, security };
    }
    Class::Known(known.what)
}

/// A kind name close enough to be a misspelling of `known`.
fn near(known: &str, kind: &str) -> bool {
    known.eq_ignore_ascii_case(kind) || strsim::levenshtein(known, kind) <= 3
}

/// Whether an object of `api_version`/`kind` lives in a namespace: every kind weft reads does
/// (an object without `metadata.namespace` is in `default`, as `kubectl apply` puts it), and so
/// does anything else in those groups but the cluster-scoped `GatewayClass`.
pub fn namespaced(api_version: &str, kind: &str) -> bool {
    if api_version == "discovery.k8s.io/v1" && kind == "EndpointSlice" {
        return true;
    }
    let group = api_version.split_once('/').map_or(api_version, |(g, _)| g);
    GROUPS.contains(&group) && kind != "GatewayClass"
}

/// A typed object's namespace, name, creation time and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Meta {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp`, when given: competing routes are ordered oldest first.
    #[serde(with = "time::serde::rfc3339::option")]
    pub creation_timestamp: Option<OffsetDateTime>,
    /// Where the object was read (`file:line`), when the source knows.
    pub origin: Option<String>,
}

impl Meta {
    pub(crate) fn of(raw: &RawObject, origin: Option<String>) -> Meta {
        Meta {
            namespace: raw.namespace_or_default().to_string(),
            name: raw.name.clone(),
            creation_timestamp: creation_timestamp(raw),
            origin,
        }
    }

    /// Orders competing objects: oldest first (those without a timestamp last), then by
    /// `namespace/name`, as Istio and the Gateway API do.
    pub fn precedence(&self) -> (bool, Option<OffsetDateTime>, &str, &str) {
        (
            self.creation_timestamp.is_none(),
            self.creation_timestamp,
            &self.namespace,
            &self.name,
        )
    }
}

pub(crate) fn field_error(path: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError {
        path: path.into(),
        reason: reason.into(),
    }
}

pub(crate) fn done(errors: Vec<FieldError>) -> Result<(), Vec<FieldError>> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// `metadata.creationTimestamp` (RFC 3339).
pub(crate) fn creation_timestamp(raw: &RawObject) -> Option<OffsetDateTime> {
    let s = raw
        .value
        .get("metadata")?
        .get("creationTimestamp")?
        .as_str()?;
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// Deserializes `spec` of `raw` (absent or `null` = `{}`), with the field path of a type error.
pub(crate) fn parse_spec<T: DeserializeOwned + Default>(
    raw: &RawObject,
) -> Result<T, Vec<FieldError>> {
    match raw.value.get("spec") {
        None | Some(Value::Null) => Ok(T::default()),
        // The path-tracking deserializer is slower: only for the error message.
        Some(spec) => T::deserialize(spec)
            .or_else(|_| serde_path_to_error::deserialize(spec))
            .map_err(|e| {
                let path = e.path().to_string();
                let path = if path.is_empty() || path == "." {
                    "spec".to_string()
                } else {
                    format!("spec.{path}")
                };
                vec![field_error(path, e.into_inner().to_string())]
            }),
    }
}

/// `null` (a key with nothing after it in YAML) as the default value.
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
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
                assert!(matches!(
                    classify(&format!("networking.istio.io/{v}"), k),
                    Class::Known(Kind::VirtualService | Kind::DestinationRule | Kind::ServiceEntry)
                ));
            }
        }
        assert_eq!(
            classify("networking.istio.io/v1alpha3", "DestinationRule"),
            Class::Known(Kind::DestinationRule)
        );
        for v in ["v1", "v1beta1"] {
            assert_eq!(
                classify(&format!("gateway.networking.k8s.io/{v}"), "HTTPRoute"),
                Class::Known(Kind::HttpRoute)
            );
        }
        for v in ["v1", "v1alpha2"] {
            assert_eq!(
                classify(&format!("gateway.networking.k8s.io/{v}"), "GRPCRoute"),
                Class::Known(Kind::GrpcRoute)
            );
        }
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
        assert_eq!(
            classify("policy.linkerd.io/v1alpha1", "AuthorizationPolicy"),
            Class::Foreign
        );
        assert_eq!(classify("v1", "ConfigMap"), Class::Foreign);
        assert!(namespaced("security.istio.io/v2", "AuthorizationPolicy"));
        assert!(namespaced("gateway.networking.k8s.io/v1", "HTTPRoute"));
        assert!(!namespaced("gateway.networking.k8s.io/v1", "GatewayClass"));
        assert!(!namespaced("apps/v1", "Deployment"));
    }

    #[test]
    fn mistakes_in_the_group_are_meant_for_weft() {
        for (api_version, kind) in [
            ("secruity.istio.io/v1", "AuthorizationPolicy"),
            ("security.istio.io", "AuthorizationPolicy"),
            ("v1", "AuthorizationPolicy"),
            ("", "PeerAuthentication"),
            ("security.istio.io.", "PeerAuthentication"),
        ] {
            match classify(api_version, kind) {
                Class::Unknown { security, reason } => {
                    assert!(security, "{api_version} {kind}: {reason}")
                }
                other => panic!("{api_version} {kind}: {other:?}"),
            }
        }
        let Class::Unknown { reason, .. } = classify("secruity.istio.io/v1", "AuthorizationPolicy")
        else {
            unreachable!()
        };
        assert!(
            reason.contains("did you mean security.istio.io?"),
            "{reason}"
        );
        let Class::Unknown { reason, .. } = classify("security.istio.io", "AuthorizationPolicy")
        else {
            unreachable!()
        };
        assert!(reason.contains("has no version"), "{reason}");
        assert!(matches!(
            classify("networking.istoi.io/v1", "VirtualService"),
            Class::Unknown {
                security: false,
                ..
            }
        ));
        // A core kind weft does not model stays foreign.
        assert_eq!(classify("v1", "ConfigMap"), Class::Foreign);
    }
}
