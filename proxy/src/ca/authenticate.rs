//! Which node is asking: the bearer token of a request, checked against the bootstrap tokens
//! (`--node-tokens`) or, in Kubernetes, by the API server (TokenReview of the node's
//! ServiceAccount token, bound to its pod and so to its node).

use std::path::PathBuf;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use kube::Client;

use crate::registry::Snapshot;

/// Extra field of a bound ServiceAccount token's user: the node its pod runs on.
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// Extra field of a bound ServiceAccount token's user: its pod (older API servers give only this).
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// Extra field of a bound ServiceAccount token's user: the uid of its pod.
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// How nodes prove who they are.
pub enum Authenticator {
    /// A file of `NODE TOKEN` lines (`#` starts a comment), read at every request so tokens can
    /// be added and revoked without a restart.
    Tokens(PathBuf),
    /// The Kubernetes API's TokenReview: the token must be a ServiceAccount token of
    /// `service_account` (`NAMESPACE/NAME`, weft's DaemonSet) for `audience`, bound to a pod.
    TokenReview {
        client: Client,
        audience: String,
        service_account: String,
    },
}

impl Authenticator {
    /// The node `token` belongs to, or why it is refused.
    pub async fn node(&self, token: &str, snapshot: &Snapshot) -> Result<String, String> {
        match self {
            Authenticator::Tokens(path) => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
                node_of_token(&text, token).ok_or_else(|| "unknown token".to_string())
            }
            Authenticator::TokenReview {
                client,
                audience,
                service_account,
            } => review(client, audience, service_account, token, snapshot).await,
        }
    }
}

/// The node of `token` in a tokens file. Compares SHA-256 digests, so the time taken does not
/// tell how much of a guess was right.
pub fn node_of_token(text: &str, token: &str) -> Option<String> {
    use aws_lc_rs::digest::{digest, SHA256};
    let want = digest(&SHA256, token.as_bytes());
    let mut found = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        let (Some(node), Some(t), None) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if digest(&SHA256, t.as_bytes()).as_ref() == want.as_ref() && found.is_none() {
            found = Some(node.to_string());
        }
    }
    found
}

async fn review(
    client: &Client,
    audience: &str,
    service_account: &str,
    token: &str,
    snapshot: &Snapshot,
) -> Result<String, String> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![audience.to_string()]),
        },
        ..TokenReview::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &request)
        .await
        .map_err(|e| format!("TokenReview: {e}"))?;
    node_of_review(
        answer.status.unwrap_or_default(),
        audience,
        service_account,
        snapshot,
    )
}

/// The node a TokenReview's answer names, or why it is refused.
fn node_of_review(
    status: TokenReviewStatus,
    audience: &str,
    service_account: &str,
    snapshot: &Snapshot,
) -> Result<String, String> {
    if status.authenticated != Some(true) {
        return Err(format!(
            "token not authenticated: {}",
            status.error.unwrap_or_else(|| "no reason given".into())
        ));
    }
    // An authenticated answer without audiences means the token is valid for the API server's
    // own audience only (the TokenReview API's contract for a reviewer that asked for some).
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience))
    {
        return Err(format!("token is not for audience {audience}"));
    }
    let user = status.user.unwrap_or_default();
    let (ns, name) = service_account
        .split_once('/')
        .ok_or_else(|| format!("bad --node-service-account {service_account:?}"))?;
    let expected = format!("system:serviceaccount:{ns}:{name}");
    if user.username.as_deref() != Some(expected.as_str()) {
        return Err(format!(
            "token of {}, not of weft's nodes ({expected})",
            user.username.unwrap_or_default()
        ));
    }
    let extra = user.extra.unwrap_or_default();
    let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    if let Some(node) = first(NODE_NAME) {
        return Ok(node);
    }
    let pod = first(POD_NAME).ok_or("the token is not bound to a pod")?;
    let known = snapshot
        .pods
        .iter()
        .find(|p| p.namespace == ns && p.name == pod);
    // A pod of the same name may have replaced the one the registry still holds: its node
    // would not be the token's.
    if let (Some(p), Some(uid)) = (known, first(POD_UID)) {
        if p.uid != uid {
            return Err(format!(
                "the token's pod {ns}/{pod} is {uid}, the registry has {}",
                p.uid
            ));
        }
    }
    known
        .and_then(|p| p.node_name.clone())
        .ok_or_else(|| format!("the token's pod {ns}/{pod} is not scheduled on a node"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_node_and_nothing_else_does() {
        let file = "# bootstrap tokens\nnode-a s3cret-a\nnode-b  s3cret-b # second\nbroken-line\nnode-c a b\n";
        assert_eq!(node_of_token(file, "s3cret-a").as_deref(), Some("node-a"));
        assert_eq!(node_of_token(file, "s3cret-b").as_deref(), Some("node-b"));
        assert_eq!(node_of_token(file, "s3cret"), None);
        assert_eq!(node_of_token(file, ""), None);
        assert_eq!(node_of_token(file, "broken-line"), None);
        assert_eq!(node_of_token(file, "a"), None);
    }

    const PODS: &str = "\
apiVersion: v1
kind: Pod
metadata: {namespace: weft-system, name: weft-a, uid: u-weft-a}
spec: {nodeName: node-a, hostNetwork: true, serviceAccountName: weft}
status: {podIP: 172.30.0.11, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {namespace: weft-system, name: weft-pending, uid: u-weft-pending}
spec: {serviceAccountName: weft}
";

    fn answer(
        audiences: Option<&[&str]>,
        username: &str,
        extra: &[(&str, &str)],
    ) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: audiences.map(|a| a.iter().map(|a| a.to_string()).collect()),
            user: Some(k8s_openapi::api::authentication::v1::UserInfo {
                username: Some(username.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect(),
                ),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn a_review_names_the_node_of_a_token_of_the_nodes_service_account_for_the_ca() {
        let snapshot = Snapshot::from_yaml(PODS).unwrap();
        let weft = "system:serviceaccount:weft-system:weft";
        let node = |status| node_of_review(status, "weft-ca", "weft-system/weft", &snapshot);
        let ca = Some(&["weft-ca"][..]);
        assert_eq!(
            node(answer(ca, weft, &[(NODE_NAME, "node-b")])),
            Ok("node-b".into())
        );
        // Without the node: that of the bound pod, if it is the pod the registry knows.
        assert_eq!(
            node(answer(ca, weft, &[(POD_NAME, "weft-a")])),
            Ok("node-a".into())
        );
        let bound = [(POD_NAME, "weft-a"), (POD_UID, "u-weft-a")];
        assert_eq!(node(answer(ca, weft, &bound)), Ok("node-a".into()));
        let replaced = [(POD_NAME, "weft-a"), (POD_UID, "u-new")];
        assert!(node(answer(ca, weft, &replaced))
            .unwrap_err()
            .contains("u-new"));
        for pod in ["weft-pending", "weft-gone"] {
            let e = node(answer(ca, weft, &[(POD_NAME, pod)])).unwrap_err();
            assert!(e.contains("not scheduled on a node"), "{e}");
        }
        assert!(node(answer(ca, weft, &[]))
            .unwrap_err()
            .contains("not bound to a pod"));
        // Someone else's token; a token for other audiences, or only the API server's (no
        // audiences in the answer); not authenticated.
        let other = "system:serviceaccount:default:default";
        assert!(node(answer(ca, other, &[(NODE_NAME, "node-a")]))
            .unwrap_err()
            .contains(other));
        for audiences in [Some(&["api"][..]), Some(&[][..]), None] {
            let e = node(answer(audiences, weft, &[(NODE_NAME, "node-a")])).unwrap_err();
            assert!(e.contains("not for audience weft-ca"), "{audiences:?}: {e}");
        }
        let refused = TokenReviewStatus {
            error: Some("invalid bearer token".into()),
            ..Default::default()
        };
        assert_eq!(
            node(refused),
            Err("token not authenticated: invalid bearer token".into())
        );
    }
}
