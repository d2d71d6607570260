//! End-to-end: weft reading the cluster from a Kubernetes API server (`--registry kube`) — the
//! stand-in of `weft_tests::apiserver`, which speaks the real list/watch protocol — with real
//! pods, eBPF and sockets: enrolling a namespace through the API, pods, Services and policies
//! changing, the API server killed and back, a watch expired with `410 Gone`, and an invalid
//! object next to a valid one; and `weft ca serve` authenticating nodes by TokenReview.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::registry::{ServicePort, TargetPort};
use weft_tests::traffic::{self, serve};
use weft_tests::*;

const ENROLL: (&str, &str) = ("weft.dev/mesh", "enabled");
const WAIT: Duration = Duration::from_secs(20);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/front/sa/client";

use traffic::json_str as s;

fn succeeds(from: &Pod, to: SocketAddr) -> bool {
    traffic::call(from, to, "ping", Duration::from_millis(3000))
        .status
        .success()
}

/// `kubectl` against the cluster's API server, from the fabric (where it listens).
fn kubectl(cluster: &Cluster, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!(
            "--net={}",
            netns::netns_path(cluster.fabric_netns()).display()
        ))
        .arg("kubectl")
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig_path())
        .args(args)
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The watch of `kind` as `weft status` shows it.
/// A new connection to `addr` fails and weft recorded one refused by `policy`. A failed call
/// alone proves nothing: a connection open when a DENY lands is closed too ("now denied").
fn refused(weft: &Weft, client: &Pod, addr: SocketAddr, policy: &str) -> bool {
    !succeeds(client, addr)
        && weft.flows(&[]).is_ok_and(|flows| {
            flows
                .iter()
                .any(|f| s(f, "/verdict") == "denied" && s(f, "/policy") == policy)
        })
}

fn watch_of(weft: &Weft, kind: &str) -> Value {
    let st = weft.status().unwrap();
    st["registry"]["watches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["kind"] == kind)
        .cloned()
        .unwrap_or_else(|| panic!("no watch of {kind}: {st}"))
}

fn enrolled(weft: &Weft, pod: &str) -> Option<bool> {
    weft.workloads()
        .ok()?
        .iter()
        .find(|w| w["pod"] == pod)
        .and_then(|w| w["enrolled"].as_bool())
}

fn deny_from_front(name: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: back
spec:
  selector:
    matchLabels:
      app: web
  action: DENY
  rules:
  - from:
    - source:
        namespaces: [front]
"
    )
}

#[test]
fn the_kubernetes_api_is_the_registry() {
    let cluster = Cluster::new("kube_registry").unwrap();
    let node = cluster.add_node("node-a").unwrap();
    let client = cluster
        .add_pod(
            &node,
            PodSpec::new("front", "client").service_account("client"),
        )
        .unwrap();
    let web = cluster
        .add_pod(
            &node,
            PodSpec::new("back", "web-0")
                .label("app", "web")
                .service_account("web")
                .port("http", 8080)
                .port("admin", 9090),
        )
        .unwrap();
    let svc = cluster
        .add_service(
            ServiceSpec::new("back", "web")
                .selector("app", "web")
                .port("tcp-echo", 80, "http", None),
        )
        .unwrap();
    cluster
        .set_namespace_labels("back", labels(&[ENROLL]))
        .unwrap();
    let _servers = [serve(&web, 8080, "echo"), serve(&web, 9090, "echo")];
    let api = cluster.api_server().unwrap();
    // Gateway API is not installed in this cluster: weft starts without it.
    api.set_installed("gateway.networking.k8s.io", false);
    let weft = Weft::start_kube(&cluster, &node, &[]).unwrap();

    let st = weft.status().unwrap();
    assert_eq!(st["registry"]["source"], "kubernetes", "{st}");
    assert_eq!(watch_of(&weft, "HTTPRoute")["state"], "not_installed");
    assert_eq!(watch_of(&weft, "Pod")["state"], "watching");
    assert_eq!(watch_of(&weft, "Pod")["objects"], 2);
    let metrics = weft.metrics().unwrap();
    for line in [
        "weft_registry_watch_state{kind=\"Pod\",state=\"watching\"} 1",
        "weft_registry_watch_state{kind=\"GRPCRoute\",state=\"not_installed\"} 1",
        "weft_registry_objects{kind=\"Pod\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert_eq!(enrolled(&weft, "client"), Some(false));
    assert!(succeeds(&client, web.addr(8080)), "not enrolled: plain");

    // 1. Labelling the namespace through the API enrolls its running pods.
    let labelled = Instant::now();
    kubectl(
        &cluster,
        &["label", "namespace", "front", "weft.dev/mesh=enabled"],
    );
    wait_until(Duration::from_secs(1), || {
        enrolled(&weft, "client") == Some(true)
    })
    .unwrap_or_else(|_| {
        panic!(
            "front/client not enrolled within a second of the label: {:?}",
            weft.workloads()
        )
    });
    eprintln!("enrolled {:?} after the label", labelled.elapsed());
    // The harness keeps the cluster as the API has it from here on.
    cluster
        .set_namespace_labels("front", labels(&[ENROLL]))
        .unwrap();
    assert!(succeeds(&client, svc.addr(80)));
    let f = weft
        .wait_flows(1, WAIT, |f| {
            s(f, "/source/pod") == "client" && s(f, "/verdict") == "forwarded"
        })
        .unwrap();
    assert_eq!(s(&f[0], "/source/identity"), CLIENT_ID, "{}", f[0]);

    // 2. A new pod, a deleted pod, a changed Service, a new AuthorizationPolicy.
    let web1 = cluster
        .add_pod(
            &node,
            PodSpec::new("back", "web-1")
                .label("app", "web")
                .service_account("web")
                .port("http", 8080),
        )
        .unwrap();
    wait_until(WAIT, || enrolled(&weft, "web-1") == Some(true)).expect("new pod seen");
    cluster.remove_pod(&web1).unwrap();
    wait_until(WAIT, || enrolled(&weft, "web-1").is_none()).expect("deleted pod gone");
    cluster
        .set_service_ports(
            "back",
            "web",
            vec![ServicePort {
                name: "tcp-admin".into(),
                port: 81,
                target_port: TargetPort::Name("admin".into()),
                app_protocol: None,
            }],
        )
        .unwrap();
    wait_until(WAIT, || succeeds(&client, svc.addr(81))).expect("changed Service: port 81");
    cluster.apply_yaml(&deny_from_front("deny-front")).unwrap();
    wait_until(WAIT, || {
        refused(&weft, &client, svc.addr(81), "back/deny-front")
    })
    .expect("new DENY applies");
    cluster
        .delete_object("AuthorizationPolicy", "back", "deny-front")
        .unwrap();
    wait_until(WAIT, || succeeds(&client, svc.addr(81))).expect("DENY deleted");

    // 3. An invalid object is left out and reported (status and an Event on it) while a valid
    //    DENY of the same update applies.
    cluster
        .apply_yaml(&format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: broken
  namespace: back
spec:
  hosts: [web]
  http:
  - match:
    - uri:
        regex: \"/([\"
    route:
    - destination:
        host: web
---
{}",
            deny_from_front("deny-again")
        ))
        .unwrap();
    wait_until(WAIT, || {
        refused(&weft, &client, svc.addr(81), "back/deny-again")
    })
    .expect("the valid DENY applies");
    let report = wait_for(WAIT, || {
        let st = weft.status().ok()?;
        let text = st["registry"]["not_applied"].to_string();
        text.contains("(VirtualService back/broken)")
            .then_some(text)
    })
    .unwrap();
    assert!(
        report.contains("kubernetes (VirtualService back/broken): spec.http[0].match[0].uri.regex"),
        "{report}"
    );
    let event = wait_for(WAIT, || {
        api.events()
            .into_iter()
            .find(|e| e["involvedObject"]["name"] == "broken")
    })
    .unwrap();
    assert_eq!(event["type"], "Warning", "{event}");
    assert_eq!(event["reason"], "WeftInvalidObject", "{event}");
    assert_eq!(event["involvedObject"]["kind"], "VirtualService", "{event}");
    assert!(s(&event, "/message").contains("uri.regex"), "{event}");
    cluster
        .delete_object("AuthorizationPolicy", "back", "deny-again")
        .unwrap();
    cluster
        .delete_object("VirtualService", "back", "broken")
        .unwrap();
    wait_until(WAIT, || succeeds(&client, svc.addr(81))).expect("deleted");

    // 4. The API server down for 10 s: traffic is unaffected; a change made meanwhile applies
    //    once it is back.
    api.stop();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(10) {
        assert!(
            succeeds(&client, svc.addr(81)),
            "traffic failed {:?} into the outage",
            down.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(weft.ready(), "still ready on the snapshot in force");
    assert_eq!(watch_of(&weft, "Pod")["state"], "retrying");
    cluster.apply_yaml(&deny_from_front("deny-late")).unwrap();
    api.restart().unwrap();
    wait_until(WAIT, || {
        refused(&weft, &client, svc.addr(81), "back/deny-late")
    })
    .expect("caught up after the outage");
    wait_until(WAIT, || watch_of(&weft, "Pod")["state"] == "watching").unwrap();

    // 5. Watches expired (410 Gone): weft lists again, and the change made right after the
    //    compaction is not lost.
    api.clear_requests();
    api.compact();
    cluster
        .delete_object("AuthorizationPolicy", "back", "deny-late")
        .unwrap();
    wait_until(WAIT, || succeeds(&client, svc.addr(81))).expect("update after 410 seen");
    let relisted = api
        .requests()
        .iter()
        .any(|(verb, path)| verb == "list" && path.contains("/authorizationpolicies"));
    assert!(relisted, "no list after the 410: {:?}", api.requests());
}

/// weft's DaemonSet pod on `node`: host network, in `weft-system` (not enrolled), as the
/// ServiceAccount `weft`.
fn weft_node_pod(node: &Node, uid: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: weft-{name}
  namespace: weft-system
  uid: {uid}
  labels: {{app: weft}}
spec:
  nodeName: {name}
  hostNetwork: true
  serviceAccountName: weft
  containers: [{{name: weft, image: weft}}]
status:
  phase: Running
  hostIP: {ip}
  podIP: {ip}
",
        name = node.name(),
        ip = node.ip()
    )
}

fn pem_certs(path: &std::path::Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap())
        .collect()
}

/// `weft ca serve --registry kube` without `--node-tokens`: a node is who the API server's
/// TokenReview says its ServiceAccount token belongs to (weft's own ServiceAccount, for the CA's
/// audience), and its node is the token's `node-name`, or else that of the pod the token is
/// bound to. The CA signs only identities of pods on that node.
#[test]
fn the_ca_authenticates_nodes_by_token_review() {
    use weft::identity::ca_client::CaClient;
    use weft::identity::SpiffeId;
    use weft_tests::apiserver::TokenInfo;

    const UID_A: &str = "0c0ffee0-0000-4000-8000-00000000000a";
    const UID_B: &str = "0c0ffee0-0000-4000-8000-00000000000b";
    let cluster = Cluster::new("kube_ca_token_review").unwrap();
    let node_a = cluster.add_node("node-a").unwrap();
    let node_b = cluster.add_node("node-b").unwrap();
    let web = cluster
        .add_pod(
            &node_a,
            PodSpec::new("back", "web-0").service_account("web"),
        )
        .unwrap();
    cluster
        .apply_yaml(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: weft-system}}\n---\n{}---\n{}",
            weft_node_pod(&node_a, UID_A),
            weft_node_pod(&node_b, UID_B)
        ))
        .unwrap();
    let api = cluster.api_server().unwrap();

    // A token the API server issued, in a file as a node holds it.
    let issue = |token: &str, info: TokenInfo| {
        api.add_service_account_token(token, info);
        let path = cluster.logs_dir().join(format!("{token}.token"));
        std::fs::write(&path, token).unwrap();
        path
    };
    // weft's ServiceAccount token bound to a pod and a node, for an audience.
    let weft_sa = |pod: Option<(&str, &str)>, node: Option<&str>, audience: &str| TokenInfo {
        namespace: "weft-system".into(),
        service_account: "weft".into(),
        pod: pod.map(|(p, uid)| (p.to_string(), uid.to_string())),
        node: node.map(str::to_string),
        audiences: vec![audience.to_string()],
    };
    let token_a = issue(
        "token-a",
        weft_sa(Some(("weft-node-a", UID_A)), Some("node-a"), "weft-ca"),
    );
    let token_b = issue(
        "token-b",
        weft_sa(Some(("weft-node-b", UID_B)), Some("node-b"), "weft-ca"),
    );
    let token_x = issue(
        "token-x",
        TokenInfo {
            namespace: "default".into(),
            service_account: "default".into(),
            ..weft_sa(None, Some("node-a"), "weft-ca")
        },
    );
    // From an API server that does not put the node in tokens: the bound pod tells it.
    let pod_only = issue(
        "token-pod-only",
        weft_sa(Some(("weft-node-a", UID_A)), None, "weft-ca"),
    );
    let other_audience = issue(
        "token-api",
        weft_sa(
            Some(("weft-node-a", UID_A)),
            Some("node-a"),
            "https://kubernetes.default.svc.cluster.local",
        ),
    );
    let unbound = issue("token-unbound", weft_sa(None, None, "weft-ca"));
    let unknown = cluster.logs_dir().join("unknown.token");
    std::fs::write(&unknown, "token-nobody-issued").unwrap();

    // The CA on node-b's network (as its Deployment's pod would run), reaching the API server
    // on the fabric.
    let ca = mesh_ca(&cluster).unwrap();
    let listen = std::net::SocketAddr::from((node_b.ip(), 15112));
    let mut cmd = Command::new(weft_bin());
    cmd.args(["ca", "serve", "--registry", "kube", "--kubeconfig"])
        .arg(cluster.kubeconfig_path())
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--ca-cert")
        .arg(ca.join("ca.crt"))
        .arg("--ca-key")
        .arg(ca.join("ca.key"))
        .args(["--server-name", &node_b.ip().to_string()])
        .env("WEFT_LOG", "info");
    let mut service = node_b.spawn(&cmd).unwrap();
    service
        .wait_for_output("CA service ready", Duration::from_secs(20))
        .unwrap();

    let roots = pem_certs(&ca.join("ca.crt"));
    let address = format!("https://{listen}");
    let web_id: SpiffeId = web.spiffe_id("cluster.local").parse().unwrap();
    let ask = |token: &std::path::Path| -> Result<(), String> {
        let key = rcgen::KeyPair::generate().unwrap();
        netns::in_netns(node_a.netns_name(), || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let client = CaClient::new(&address, &roots, Some(token.to_path_buf()))?;
                    client.sign(&web_id, &key, Duration::from_secs(3600)).await
                })
        })
        .unwrap()
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
    };

    api.clear_requests();
    assert_eq!(ask(&token_a), Ok(()), "node-a runs back/web-0");
    assert!(
        api.requests().iter().any(|(verb, path)| verb == "create"
            && path.starts_with("/apis/authentication.k8s.io/v1/tokenreviews")),
        "{:?}",
        api.requests()
    );
    assert_eq!(ask(&pod_only), Ok(()), "the node of the token's pod");

    let refused = ask(&token_b).unwrap_err();
    assert!(
        refused.contains("PermissionDenied") && refused.contains("scheduled on node node-b"),
        "{refused}"
    );
    let refused = ask(&token_x).unwrap_err();
    assert!(
        refused.contains("Unauthenticated")
            && refused.contains("system:serviceaccount:default:default"),
        "{refused}"
    );
    let refused = ask(&unknown).unwrap_err();
    assert!(
        refused.contains("Unauthenticated") && refused.contains("invalid bearer token"),
        "{refused}"
    );
    let refused = ask(&other_audience).unwrap_err();
    assert!(
        refused.contains("Unauthenticated") && refused.contains("weft-ca"),
        "{refused}"
    );
    let refused = ask(&unbound).unwrap_err();
    assert!(
        refused.contains("Unauthenticated") && refused.contains("not bound to a pod"),
        "{refused}"
    );

    // node-a's weft pod replaced (a new uid): its old tokens are no longer valid.
    cluster
        .apply_yaml(&weft_node_pod(
            &node_a,
            "0c0ffee0-0000-4000-8000-0000000000aa",
        ))
        .unwrap();
    let refused = ask(&token_a).unwrap_err();
    assert!(
        refused.contains("Unauthenticated") && refused.contains("invalidated"),
        "{refused}"
    );
    assert!(service.is_running());
    assert!(service.stderr().contains("refused"), "{}", service.stderr());
}
