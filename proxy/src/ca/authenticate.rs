//! Which node is asking: the bearer token of a request, checked against the bootstrap tokens
//! (`--node-tokens`) or, in Kubernetes, by the API server (TokenReview of the node's
//! ServiceAccount token, bound to its pod and so to its node).

use std::path::PathBuf;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use kube::Client;

use crate::registry::Snapshot;

/// Extra field of a bound ServiceAccount token's user: the node its pod runs on.
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// Extra field of a bound ServiceAccount token's user: its pod (older API servers give only this).
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";

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
    use ring::digest::{digest, SHA256};
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
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(format!(
            "token not authenticated: {}",
            status.error.unwrap_or_else(|| "no reason given".into())
        ));
    }
    if let Some(audiences) = &status.audiences {
        if !audiences.iter().any(|a| a == audience) {
            return Err(format!("token is not for audience {audience}"));
        }
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
    snapshot
        .pods
        .iter()
        .find(|p| p.namespace == ns && p.name == pod)
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
}
