//! What the CA signs, decided without I/O: the identity a request asks for, whether the asking
//! node may have it, and for how long.

use std::time::Duration;

use rcgen::{CertificateSigningRequestParams, SanType};

use crate::identity::ca_client::IMPERSONATED_IDENTITY;
use crate::identity::SpiffeId;
use crate::registry::Snapshot;

/// Why a request is refused: shown to the node (gRPC status message) and logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("bad request: {0}")]
    Invalid(String),
    #[error("{identity} is not in this CA's trust domain {trust_domain}")]
    TrustDomain {
        identity: String,
        trust_domain: String,
    },
    #[error(
        "no pod with service account {namespace}/{service_account} is scheduled on node {node}"
    )]
    NotOnNode {
        node: String,
        namespace: String,
        service_account: String,
    },
    #[error("requested lifetime {requested:?} is longer than this CA's maximum {max:?}")]
    Ttl { requested: Duration, max: Duration },
}

/// The identity asked for: `ImpersonatedIdentity` in the metadata (what a node sends on behalf
/// of a workload), else the CSR's only URI SAN. Where both are present they must agree.
pub fn requested_identity(
    csr: &CertificateSigningRequestParams,
    impersonated: Option<&str>,
) -> Result<SpiffeId, Refusal> {
    let uris: Vec<&str> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(u) => Some(u.as_str()),
            _ => None,
        })
        .collect();
    let asked = match (impersonated, uris.as_slice()) {
        (Some(i), []) => i,
        (Some(i), [u]) if *u == i => i,
        (Some(i), _) => {
            return Err(Refusal::Invalid(format!(
                "the CSR names {uris:?}, the request {IMPERSONATED_IDENTITY} {i}"
            )))
        }
        (None, [u]) => u,
        (None, []) => {
            return Err(Refusal::Invalid(format!(
                "no identity: neither {IMPERSONATED_IDENTITY} nor a URI SAN in the CSR"
            )))
        }
        (None, _) => {
            return Err(Refusal::Invalid(format!(
                "the CSR names {} URIs",
                uris.len()
            )))
        }
    };
    asked
        .parse()
        .map_err(|e| Refusal::Invalid(format!("{asked:?}: {e}")))
}

/// Whether `node` may have `id`: `id` is in `trust_domain` and a pod with its namespace and
/// service account is scheduled on `node`, not finished, and not on the host network (whose
/// connections weft never carries). The one rule that keeps a
/// compromised node from minting identities of pods it does not run.
pub fn may_sign(
    snapshot: &Snapshot,
    trust_domain: &str,
    node: &str,
    id: &SpiffeId,
) -> Result<(), Refusal> {
    if id.trust_domain() != trust_domain {
        return Err(Refusal::TrustDomain {
            identity: id.to_string(),
            trust_domain: trust_domain.to_string(),
        });
    }
    let hosted = snapshot.pods.iter().any(|p| {
        p.node_name.as_deref() == Some(node)
            && p.namespace == id.namespace()
            && p.service_account == id.service_account()
            && !p.is_terminated()
            && !p.host_network
    });
    if hosted {
        Ok(())
    } else {
        Err(Refusal::NotOnNode {
            node: node.to_string(),
            namespace: id.namespace().to_string(),
            service_account: id.service_account().to_string(),
        })
    }
}

/// The certificate's lifetime: what was asked (a non-positive request means `max`), refused
/// above `max` as Istio's CA does.
pub fn lifetime(requested_secs: i64, max: Duration) -> Result<Duration, Refusal> {
    if requested_secs <= 0 {
        return Ok(max);
    }
    let requested = Duration::from_secs(requested_secs as u64);
    if requested > max {
        return Err(Refusal::Ttl { requested, max });
    }
    Ok(requested)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::fixtures::CLUSTER;
    use rcgen::{CertificateParams, KeyPair};

    fn csr(uris: &[&str]) -> CertificateSigningRequestParams {
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI(u.to_string().try_into().unwrap()))
            .collect();
        let key = KeyPair::generate().unwrap();
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        CertificateSigningRequestParams::from_pem(&pem).unwrap()
    }

    const ID: &str = "spiffe://cluster.local/ns/front/sa/client";

    #[test]
    fn the_identity_is_the_impersonated_one_or_the_csrs_and_both_must_agree() {
        assert_eq!(
            requested_identity(&csr(&[]), Some(ID)).unwrap().to_string(),
            ID
        );
        assert_eq!(
            requested_identity(&csr(&[ID]), None).unwrap().to_string(),
            ID
        );
        assert_eq!(
            requested_identity(&csr(&[ID]), Some(ID))
                .unwrap()
                .to_string(),
            ID
        );
        let other = "spiffe://cluster.local/ns/front/sa/admin";
        assert!(matches!(
            requested_identity(&csr(&[other]), Some(ID)),
            Err(Refusal::Invalid(_))
        ));
        assert!(matches!(
            requested_identity(&csr(&[]), None),
            Err(Refusal::Invalid(_))
        ));
        assert!(matches!(
            requested_identity(&csr(&[ID, other]), None),
            Err(Refusal::Invalid(_))
        ));
        assert!(matches!(
            requested_identity(&csr(&[]), Some("spiffe://cluster.local/ns/front")),
            Err(Refusal::Invalid(_))
        ));
    }

    #[test]
    fn a_node_gets_only_identities_of_pods_scheduled_on_it() {
        // front/client (sa client) runs on node-a; of back's sa default, job has finished and
        // agent is on the host network.
        let s = Snapshot::from_yaml(CLUSTER).unwrap();
        let client: SpiffeId = "spiffe://cluster.local/ns/front/sa/client".parse().unwrap();
        assert_eq!(may_sign(&s, "cluster.local", "node-a", &client), Ok(()));
        assert!(matches!(
            may_sign(&s, "cluster.local", "node-b", &client),
            Err(Refusal::NotOnNode { .. })
        ));
        let web: SpiffeId = "spiffe://cluster.local/ns/back/sa/web".parse().unwrap();
        assert_eq!(may_sign(&s, "cluster.local", "node-b", &web), Ok(()));
        let other: SpiffeId = "spiffe://cluster.local/ns/front/sa/admin".parse().unwrap();
        assert!(may_sign(&s, "cluster.local", "node-a", &other).is_err());
        let finished: SpiffeId = "spiffe://cluster.local/ns/back/sa/default".parse().unwrap();
        assert!(may_sign(&s, "cluster.local", "node-a", &finished).is_err());
        let foreign: SpiffeId = "spiffe://other.org/ns/front/sa/client".parse().unwrap();
        assert!(matches!(
            may_sign(&s, "cluster.local", "node-a", &foreign),
            Err(Refusal::TrustDomain { .. })
        ));
    }

    #[test]
    fn a_lifetime_above_the_maximum_is_refused() {
        let max = Duration::from_secs(86400);
        assert_eq!(lifetime(0, max), Ok(max));
        assert_eq!(lifetime(-5, max), Ok(max));
        assert_eq!(lifetime(3600, max), Ok(Duration::from_secs(3600)));
        assert!(matches!(lifetime(86401, max), Err(Refusal::Ttl { .. })));
    }
}
