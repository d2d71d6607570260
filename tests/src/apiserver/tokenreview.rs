//! `authentication.k8s.io/v1` TokenReview: what kube-apiserver's ServiceAccount token
//! authenticator answers, for the tokens a test registered ([`super::ApiServer::
//! add_service_account_token`]) in place of signed JWTs.
//!
//! As `pkg/registry/authentication/tokenreview` and `pkg/serviceaccount` do:
//!
//! - `spec.audiences` empty asks for the API server's own audiences ([`API_AUDIENCES`]); a token
//!   issued without audiences (a legacy Secret token) is for those.
//! - A token for none of the asked audiences: not authenticated, `token audiences ["x"] is
//!   invalid for the target audiences ["y"]`; an unknown token: `invalid bearer token`; a token
//!   bound to a pod that is gone or has another uid: `service account token has been
//!   invalidated`. `status.authenticated` is then left out (`omitempty`), `status.user` is `{}`.
//! - Authenticated: `status.audiences` is the asked audiences the token is for; the user is
//!   `system:serviceaccount:NS:SA` with the ServiceAccount's uid, the groups
//!   `system:serviceaccounts`, `system:serviceaccounts:NS` and `system:authenticated`, and the
//!   extra of a bound token: `authentication.kubernetes.io/credential-id` (`JTI=…`), `pod-name`,
//!   `pod-uid`, `node-name` and `node-uid` (the Node's, when it exists) as far as they are set
//!   (Kubernetes ≥ 1.32 puts the node of the pod in its tokens).
//!
//! Not modelled: expiry, signatures, the ServiceAccount object (not served here) and
//! authenticators other than ServiceAccount tokens.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::resources;
use super::status::ApiError;
use super::store::{self, Store};

/// The API server's own audiences (`--api-audiences`, by default its service account issuer).
pub const API_AUDIENCES: &[&str] = &["https://kubernetes.default.svc.cluster.local"];

/// What a ServiceAccount token stands for, as the API server issued it (`TokenRequest` or a
/// projected volume).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenInfo {
    pub namespace: String,
    pub service_account: String,
    /// The pod (in `namespace`) the token is bound to: (name, uid). Reviews fail once no pod of
    /// that name and uid exists.
    pub pod: Option<(String, String)>,
    /// The node of the token: the node its pod was scheduled on when it was issued.
    pub node: Option<String>,
    /// Audiences it was issued for; empty: the API server's own ([`API_AUDIENCES`]).
    pub audiences: Vec<String>,
}

/// A registered token.
#[derive(Debug, Clone)]
struct Issued {
    info: TokenInfo,
    /// `jti` of the token, shown as its credential id.
    jti: String,
}

/// The tokens the server knows, and the uids of their ServiceAccounts.
#[derive(Debug, Default)]
pub(crate) struct Tokens {
    issued: HashMap<String, Issued>,
    /// (namespace, name) → uid of each ServiceAccount a token was issued for.
    service_accounts: HashMap<(String, String), String>,
}

impl Tokens {
    pub fn add(&mut self, token: &str, info: TokenInfo) {
        self.service_accounts
            .entry((info.namespace.clone(), info.service_account.clone()))
            .or_insert_with(store::new_uid);
        let jti = store::new_uid();
        self.issued.insert(token.to_string(), Issued { info, jti });
    }

    pub fn remove(&mut self, token: &str) -> bool {
        self.issued.remove(token).is_some()
    }
}

/// Go's `%q` of a `[]string`: `["a" "b"]`.
fn go_quoted(list: &[String]) -> String {
    let items: Vec<String> = list
        .iter()
        .map(|s| serde_json::to_string(s).expect("JSON"))
        .collect();
    format!("[{}]", items.join(" "))
}

/// The `uid` of a stored object.
fn stored_uid(store: &Store, plural: &str, namespace: Option<&str>, name: &str) -> Option<String> {
    let res = resources::find("", "v1", plural)?;
    let obj = store.get(res, &store::key(res, namespace, name))?;
    obj.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The status of a review of `token` for `asked` audiences.
fn status(tokens: &Tokens, store: &Store, token: &str, asked: &[String]) -> Value {
    let failed = |error: String| json!({"user": {}, "error": error});
    let Some(issued) = tokens.issued.get(token) else {
        return failed("invalid bearer token".into());
    };
    let info = &issued.info;
    let legacy = info.audiences.is_empty();
    let token_audiences: Vec<String> = if legacy {
        API_AUDIENCES.iter().map(|a| a.to_string()).collect()
    } else {
        info.audiences.clone()
    };
    let audiences: Vec<String> = asked
        .iter()
        .filter(|a| token_audiences.contains(a))
        .cloned()
        .collect();
    if audiences.is_empty() {
        return failed(format!(
            "token audiences {} is invalid for the target audiences {}",
            go_quoted(&token_audiences),
            go_quoted(asked)
        ));
    }
    let ns = info.namespace.as_str();
    let mut extra = Map::new();
    let mut put = |k: &str, v: &str| {
        extra.insert(format!("authentication.kubernetes.io/{k}"), json!([v]));
    };
    if let Some((pod, uid)) = &info.pod {
        if stored_uid(store, "pods", Some(ns), pod).as_deref() != Some(uid.as_str()) {
            return failed("service account token has been invalidated".into());
        }
        put("pod-name", pod);
        put("pod-uid", uid);
    }
    if let Some(node) = &info.node {
        put("node-name", node);
        if let Some(uid) = stored_uid(store, "nodes", None, node) {
            put("node-uid", &uid);
        }
    }
    if !legacy {
        put("credential-id", &format!("JTI={}", issued.jti));
    }
    let sa_uid = tokens
        .service_accounts
        .get(&(info.namespace.clone(), info.service_account.clone()))
        .cloned()
        .unwrap_or_default();
    let mut user = json!({
        "username": format!("system:serviceaccount:{ns}:{}", info.service_account),
        "uid": sa_uid,
        "groups": [
            "system:serviceaccounts",
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated",
        ],
    });
    if !extra.is_empty() {
        user["extra"] = Value::Object(extra);
    }
    json!({"authenticated": true, "user": user, "audiences": audiences})
}

/// Answers a TokenReview (`obj`, its type already checked): the object with `status` set.
pub(crate) fn review(tokens: &Tokens, store: &Store, mut obj: Value) -> Result<Value, ApiError> {
    let token = obj
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if token.is_empty() {
        return Err(ApiError::bad_request(
            "token is required for TokenReview in authentication",
        ));
    }
    let mut asked: Vec<String> = obj
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    if asked.is_empty() {
        asked = API_AUDIENCES.iter().map(|a| a.to_string()).collect();
    }
    obj["status"] = status(tokens, store, &token, &asked);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_review(token: &str, audiences: &[&str]) -> Value {
        json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {},
            "spec": {"token": token, "audiences": audiences},
        })
    }

    fn store_with_pod(uid: &str) -> Store {
        let mut store = Store::new();
        store
            .put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "weft-system"}}))
            .unwrap();
        store
            .put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "uid": "node-a-uid"}}))
            .unwrap();
        store
            .put(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "weft-x", "namespace": "weft-system", "uid": uid},
                "spec": {"nodeName": "node-a"},
            }))
            .unwrap();
        store
    }

    fn bound(audiences: &[&str]) -> TokenInfo {
        TokenInfo {
            namespace: "weft-system".into(),
            service_account: "weft".into(),
            pod: Some(("weft-x".into(), "pod-uid-1".into())),
            node: Some("node-a".into()),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn a_bound_token_names_its_service_account_pod_and_node() {
        let store = store_with_pod("pod-uid-1");
        let mut tokens = Tokens::default();
        tokens.add("t", bound(&["weft-ca", "other"]));
        let r = review(&tokens, &store, token_review("t", &["weft-ca"])).unwrap();
        let st = &r["status"];
        assert_eq!(st["authenticated"], true, "{r}");
        assert_eq!(st["audiences"], json!(["weft-ca"]));
        let user = &st["user"];
        assert_eq!(user["username"], "system:serviceaccount:weft-system:weft");
        assert_eq!(
            user["groups"],
            json!([
                "system:serviceaccounts",
                "system:serviceaccounts:weft-system",
                "system:authenticated"
            ])
        );
        let extra = &user["extra"];
        let one = |k: &str| extra[format!("authentication.kubernetes.io/{k}")][0].clone();
        assert_eq!(one("pod-name"), "weft-x");
        assert_eq!(one("pod-uid"), "pod-uid-1");
        assert_eq!(one("node-name"), "node-a");
        assert_eq!(one("node-uid"), "node-a-uid");
        assert!(one("credential-id").as_str().unwrap().starts_with("JTI="));
        // The same ServiceAccount keeps its uid across tokens.
        tokens.add("t2", bound(&["weft-ca"]));
        let r2 = review(&tokens, &store, token_review("t2", &["weft-ca"])).unwrap();
        assert_eq!(r2["status"]["user"]["uid"], user["uid"]);
        assert_eq!(r2["spec"]["token"], "t2", "the request comes back");
    }

    #[test]
    fn refusals_carry_the_reason() {
        let store = store_with_pod("pod-uid-1");
        let mut tokens = Tokens::default();
        tokens.add("t", bound(&["weft-ca"]));
        tokens.add(
            "legacy",
            TokenInfo {
                namespace: "default".into(),
                service_account: "default".into(),
                ..Default::default()
            },
        );
        let refused = |store: &Store, token: &str, audiences: &[&str]| {
            let r = review(&tokens, store, token_review(token, audiences)).unwrap();
            assert_eq!(r["status"].get("authenticated"), None, "{r}");
            assert_eq!(r["status"]["user"], json!({}), "{r}");
            r["status"]["error"].as_str().unwrap().to_string()
        };
        assert_eq!(
            refused(&store, "nope", &["weft-ca"]),
            "invalid bearer token"
        );
        assert_eq!(
            refused(&store, "t", &["other", "more"]),
            r#"token audiences ["weft-ca"] is invalid for the target audiences ["other" "more"]"#
        );
        // No audiences asked: the API server's own, which only the legacy token is for.
        assert!(refused(&store, "t", &[]).contains("kubernetes.default.svc"));
        let r = review(&tokens, &store, token_review("legacy", &[])).unwrap();
        assert_eq!(r["status"]["authenticated"], true, "{r}");
        assert_eq!(r["status"]["audiences"], json!(API_AUDIENCES));
        assert_eq!(r["status"]["user"].get("extra"), None, "{r}");
        // The bound pod replaced by another of the same name: the token is no longer valid.
        assert_eq!(
            refused(&store_with_pod("pod-uid-2"), "t", &["weft-ca"]),
            "service account token has been invalidated"
        );
        assert_eq!(
            refused(&Store::new(), "t", &["weft-ca"]),
            "service account token has been invalidated"
        );
        assert!(tokens.remove("t"));
        assert!(!tokens.remove("t"));
        let empty = review(&tokens, &Store::new(), token_review("", &[]));
        assert_eq!(empty.unwrap_err().code, 400);
    }
}
