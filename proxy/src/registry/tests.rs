use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;

use super::file::load;
use super::*;

const CLUSTER: &str = r#"# A small cluster.
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    weft.dev/mesh: enabled
---
apiVersion: v1
kind: Namespace
metadata:
  name: other
---
apiVersion: v1
kind: Node
metadata:
  name: node-1
  labels:
    kubernetes.io/hostname: node-1
status:
  addresses:
  - type: Hostname
    address: node-1
  - type: ExternalIP
    address: 192.0.2.1
  - type: InternalIP
    address: 10.0.0.1
---
apiVersion: v1
kind: Pod
metadata:
  namespace: demo
  name: server-0
  uid: 6f1a9a5e-0c1b-4a0e-9a57-1b2c3d4e5f60
  labels:
    app: server
spec:
  nodeName: node-1
  serviceAccountName: server
  containers:
  - name: app
    image: server
    ports:
    - name: http
      containerPort: 8080
    - name: metrics
      containerPort: 9090
status:
  phase: Running
  qosClass: Burstable
  podIP: 10.244.1.10
  podIPs:
  - ip: 10.244.1.10
  - ip: fd00::10
  conditions:
  - type: Ready
    status: "True"
---
apiVersion: v1
kind: Pod
metadata:
  namespace: demo
  name: server-1
  uid: 7f1a9a5e-0c1b-4a0e-9a57-1b2c3d4e5f61
  labels:
    app: server
spec:
  nodeName: node-2
  containers:
  - name: app
    ports:
    - name: http
      containerPort: 8081
status:
  phase: Running
  qosClass: Guaranteed
  podIP: 10.244.2.11
  conditions:
  - type: Ready
    status: "True"
---
# Matches the selector but is not ready.
apiVersion: v1
kind: Pod
metadata:
  namespace: demo
  name: server-2
  uid: 8f1a9a5e-0c1b-4a0e-9a57-1b2c3d4e5f62
  labels:
    app: server
spec:
  nodeName: node-1
  containers:
  - name: app
    ports:
    - name: http
      containerPort: 8080
status:
  phase: Running
  podIP: 10.244.1.12
  conditions:
  - type: Ready
    status: "False"
---
# Ready, matching labels, but without the named port.
apiVersion: v1
kind: Pod
metadata:
  namespace: demo
  name: server-3
  uid: 9f1a9a5e-0c1b-4a0e-9a57-1b2c3d4e5f63
  labels:
    app: server
spec:
  nodeName: node-1
  containers:
  - name: app
status:
  phase: Running
  podIP: 10.244.1.13
---
# Same labels, other namespace.
apiVersion: v1
kind: Pod
metadata:
  namespace: other
  name: server-9
  uid: af1a9a5e-0c1b-4a0e-9a57-1b2c3d4e5f69
  labels:
    app: server
spec:
  nodeName: node-1
  containers:
  - name: app
    ports:
    - name: http
      containerPort: 8080
status:
  phase: Running
  podIP: 10.244.1.19
---
apiVersion: v1
kind: Pod
metadata:
  namespace: demo
  name: client
  uid: bf1a9a5e-0c1b-4a0e-9a57-1b2c3d4e5f6b
spec:
  nodeName: node-1
  containers:
  - name: client
status:
  phase: Running
  podIP: 10.244.1.20
---
# A finished job whose IP now belongs to someone else.
apiVersion: v1
kind: Pod
metadata:
  namespace: demo
  name: job-done
  uid: cf1a9a5e-0c1b-4a0e-9a57-1b2c3d4e5f6c
spec:
  nodeName: node-1
  containers:
  - name: job
status:
  phase: Succeeded
  podIP: 10.244.1.30
---
apiVersion: v1
kind: Service
metadata:
  namespace: demo
  name: server
spec:
  clusterIP: 10.96.0.10
  selector:
    app: server
  ports:
  - name: http
    port: 80
    targetPort: http
    appProtocol: http
  - name: metrics
    port: 9090
  - name: http-udp
    port: 8443
    protocol: UDP
    targetPort: http
---
apiVersion: v1
kind: Service
metadata:
  namespace: demo
  name: server-headless
spec:
  clusterIP: None
  selector:
    app: server
  ports:
  - port: 8080
    targetPort: 8080
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  namespace: demo
  name: server-routes
spec:
  hosts: [server]
  http:
  - route:
    - destination:
        host: server
"#;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn names(endpoints: &[Endpoint]) -> Vec<(String, SocketAddr)> {
    endpoints
        .iter()
        .map(|e| (e.pod.name.clone(), e.addr))
        .collect()
}

fn errors_of(yaml: &str) -> Vec<String> {
    match Snapshot::from_yaml(yaml) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn parses_a_realistic_file() {
    let s = Snapshot::from_yaml(CLUSTER).unwrap();
    assert!(s.namespace_enrolled("demo"));
    assert!(!s.namespace_enrolled("other"));
    assert!(!s.namespace_enrolled("missing"));

    let node = s.node("node-1").unwrap();
    assert_eq!(node.addresses, vec![ip("10.0.0.1"), ip("192.0.2.1")]);
    assert_eq!(node.labels["kubernetes.io/hostname"], "node-1");

    let p = s.pod("demo", "server-0").unwrap();
    assert_eq!(p.uid, "6f1a9a5e-0c1b-4a0e-9a57-1b2c3d4e5f60");
    assert_eq!(p.node_name.as_deref(), Some("node-1"));
    assert_eq!(p.ip, Some(ip("10.244.1.10")));
    assert_eq!(p.ips, vec![ip("10.244.1.10"), ip("fd00::10")]);
    assert_eq!(p.labels["app"], "server");
    assert_eq!(p.service_account, "server");
    assert!(p.ready);
    assert_eq!(p.qos, QosClass::Burstable);
    assert_eq!(
        p.ports,
        vec![
            ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: "TCP".into()
            },
            ContainerPort {
                name: Some("metrics".into()),
                port: 9090,
                protocol: "TCP".into()
            },
        ]
    );
    assert_eq!(s.pod("demo", "server-1").unwrap().qos, QosClass::Guaranteed);
    let client = s.pod("demo", "client").unwrap();
    assert_eq!(client.qos, QosClass::BestEffort, "default without qosClass");
    assert_eq!(client.service_account, "default");
    assert!(client.ready, "no conditions, Running");
    assert!(!s.pod("demo", "server-2").unwrap().ready);

    let svc = s.service("demo", "server").unwrap();
    assert_eq!(svc.cluster_ip, Some(ip("10.96.0.10")));
    assert_eq!(svc.ports[0].target_port, TargetPort::Name("http".into()));
    assert_eq!(svc.ports[0].app_protocol.as_deref(), Some("http"));
    assert_eq!(svc.ports[1].target_port, TargetPort::Number(9090));
    assert_eq!(svc.ports[2].protocol, "UDP");
    let headless = s.service("demo", "server-headless").unwrap();
    assert_eq!(headless.cluster_ip, None);

    assert!(s.others.is_empty());
    assert_eq!(s.virtual_services.len(), 1);
    let vs = &s.virtual_services[0];
    assert_eq!(
        (vs.meta.namespace.as_str(), vs.meta.name.as_str()),
        ("demo", "server-routes")
    );
    let line = CLUSTER
        .lines()
        .position(|l| l == "apiVersion: networking.istio.io/v1")
        .unwrap()
        + 1;
    assert_eq!(vs.meta.origin, Some(format!("<inline>:{line}")));
    assert_eq!(vs.spec.hosts, ["server"]);

    let on_node: Vec<&str> = s.pods_on_node("node-1").map(|p| p.name.as_str()).collect();
    assert_eq!(
        on_node,
        ["client", "job-done", "server-0", "server-2", "server-3", "server-9"]
    );
    assert_eq!(s.pods_on_node("node-9").count(), 0);

    // The admin API serializes the snapshot.
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["pods"][0]["name"], "client");
    assert_eq!(json["services"][0]["ports"][0]["target_port"], "http");
    assert_eq!(s.pods.len(), 7);
}

#[test]
fn resolves_destinations() {
    let s = Snapshot::from_yaml(CLUSTER).unwrap();
    match s.resolve(sa("10.96.0.10:80")) {
        Resolved::Service { service, port } => {
            assert_eq!(service.name, "server");
            assert_eq!(port.name.as_deref(), Some("http"));
        }
        other => panic!("{other:?}"),
    }
    // IPv4-mapped form, as a dual-stack listener reports it.
    assert!(matches!(
        s.resolve(sa("[::ffff:10.96.0.10]:9090")),
        Resolved::Service { .. }
    ));
    // Only TCP ports are reachable through the VIP.
    assert!(matches!(
        s.resolve(sa("10.96.0.10:8443")),
        Resolved::Passthrough
    ));
    assert!(matches!(
        s.resolve(sa("10.96.0.10:81")),
        Resolved::Passthrough
    ));
    match s.resolve(sa("10.244.1.10:8080")) {
        Resolved::Pod(p) => assert_eq!(p.name, "server-0"),
        other => panic!("{other:?}"),
    }
    match s.resolve(sa("[fd00::10]:8080")) {
        Resolved::Pod(p) => assert_eq!(p.name, "server-0"),
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(s.resolve(sa("10.244.1.30:80")), Resolved::Passthrough),
        "terminated"
    );
    assert!(matches!(
        s.resolve(sa("1.1.1.1:443")),
        Resolved::Passthrough
    ));
    assert!(s.pod_by_ip(ip("10.244.1.30")).is_none());
    assert_eq!(s.pod_by_ip(ip("10.244.1.20")).unwrap().name, "client");
}

#[test]
fn endpoints_follow_selector_readiness_and_named_ports() {
    let s = Snapshot::from_yaml(CLUSTER).unwrap();
    let svc = s.service("demo", "server").unwrap();
    // Named target port: server-2 is not ready, server-3 lacks the port, server-9 is elsewhere.
    assert_eq!(
        names(&s.endpoints(svc, &svc.ports[0])),
        vec![
            ("server-0".into(), sa("10.244.1.10:8080")),
            ("server-1".into(), sa("10.244.2.11:8081")),
        ]
    );
    // Numeric target port: every ready pod.
    assert_eq!(
        names(&s.endpoints(svc, &svc.ports[1])),
        vec![
            ("server-0".into(), sa("10.244.1.10:9090")),
            ("server-1".into(), sa("10.244.2.11:9090")),
            ("server-3".into(), sa("10.244.1.13:9090")),
        ]
    );
    // Named ports match on protocol too.
    assert!(s.endpoints(svc, &svc.ports[2]).is_empty());
    let headless = s.service("demo", "server-headless").unwrap();
    assert_eq!(s.endpoints(headless, &headless.ports[0]).len(), 3);
    // A Service as another snapshot had it (here: a selector matching nothing) is selected
    // afresh, not answered from this snapshot's index.
    let mut elsewhere = (**svc).clone();
    elsewhere.selector = Some([("app".to_string(), "nobody".to_string())].into());
    assert!(s.endpoints(&elsewhere, &elsewhere.ports[1]).is_empty());
}

#[test]
fn service_without_selector_has_no_endpoints() {
    let s = Snapshot::from_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec:\n  clusterIP: 10.96.0.99\n  selector: {}\n  ports: [{port: 443}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, uid: u1}\nstatus: {phase: Running, podIP: 10.1.1.1}\n",
    )
    .unwrap();
    let svc = s.service("default", "ext").unwrap();
    assert_eq!(svc.selector, None);
    assert!(s.endpoints(svc, &svc.ports[0]).is_empty());
}

#[test]
fn list_documents_are_flattened() {
    let s = Snapshot::from_yaml(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata:\n    name: a\n- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: p\n    namespace: a\n    uid: u-1\n",
    )
    .unwrap();
    assert!(s.namespaces.contains_key("a"));
    assert!(s.pod("a", "p").is_some());

    let errors = errors_of(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata:\n    name: a\n- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: p\n    uid: u-1\n  spec:\n    containers:\n    - name: c\n      ports:\n      - containerPort: http\n",
    );
    assert_eq!(
        errors,
        vec![
            "<inline>:17: document 1 (Pod default/p): items[1].spec.containers[0].ports[0].containerPort: invalid type: string \"http\", expected i32"
        ]
    );
}

#[test]
fn type_errors_name_file_line_document_and_field() {
    let yaml = "\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: v1
kind: Pod
metadata:
  namespace: demo
  name: client
  uid: 1234
spec:
  containers:
  - name: app
    ports:
    - containerPort: x
";
    assert_eq!(
        errors_of(yaml),
        vec![
            "<inline>:16: document 2 (Pod demo/client): spec.containers[0].ports[0].containerPort: invalid type: string \"x\", expected i32"
        ]
    );
    let errors = errors_of(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\nspec:\n  ports: {port: 80}\n",
    );
    assert_eq!(
        errors,
        vec!["<inline>:6: document 1 (Service default/s): spec.ports: invalid type: map, expected a sequence"]
    );
}

#[test]
fn semantic_errors_point_at_the_field() {
    let yaml = "\
apiVersion: v1
kind: Pod
metadata:
  name: no-uid
---
apiVersion: v1
kind: Pod
metadata:
  name: bad-ip
  uid: u-2
status:
  phase: Running
  podIP: 10.0.0.300
---
apiVersion: v1
kind: Service
metadata:
  namespace: demo
  name: svc
spec:
  clusterIP: not-an-ip
  ports:
  - name: ok
    port: 80
  - name: big
    port: 70000
    targetPort: 0
---
apiVersion: v1
kind: Namespace
metadata:
  labels: {a: b}
";
    assert_eq!(
        errors_of(yaml),
        vec![
            "<inline>:3: document 1 (Pod default/no-uid): metadata.uid: is required for a Pod (it locates the pod's cgroup)",
            "<inline>:13: document 2 (Pod default/bad-ip): status.podIP: invalid IP address \"10.0.0.300\"",
            "<inline>:21: document 3 (Service demo/svc): spec.clusterIP: invalid IP address \"not-an-ip\"",
            "<inline>:26: document 3 (Service demo/svc): spec.ports[1].port: port 70000 out of range 1-65535",
            "<inline>:27: document 3 (Service demo/svc): spec.ports[1].targetPort: port 0 out of range 1-65535",
            "<inline>:31: document 4 (Namespace): metadata.name: is required",
        ]
    );
}

#[test]
fn duplicates_and_structure_errors() {
    let yaml = "\
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
# again
apiVersion: v1
kind: Namespace
metadata:
  name: a
---
apiVersion: v1
kind: Service
metadata: {name: s1}
spec: {clusterIP: 10.96.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: s2}
spec: {clusterIP: 10.96.0.1}
---
- just
- a list
---
kind: Thing
metadata: {name: t}
";
    assert_eq!(
        errors_of(yaml),
        vec![
            "<inline>:9: document 2 (Namespace a): metadata.name: duplicate Namespace a, first defined at <inline>:1",
            "<inline>:19: document 4 (Service default/s2): spec.clusterIP: cluster IP 10.96.0.1 is already used by Service default/s1",
            "<inline>:21: document 5: expected a Kubernetes object (a mapping with apiVersion and kind), found a sequence",
            "<inline>:24: document 6: apiVersion: is required",
        ]
    );
}

#[test]
fn syntax_errors_carry_the_line() {
    let yaml = "\
apiVersion: v1
kind: Namespace
metadata:
  name: fine
---
apiVersion: v1
kind: Pod
metadata:
  name: broken
   uid: x
";
    let errors = errors_of(yaml);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .starts_with("<inline>:10: document 2: mapping values are not allowed in this context"),
        "{}",
        errors[0]
    );
    let errors = errors_of("a: [1, 2\n");
    assert!(
        errors[0].starts_with("<inline>:2: document 1: "),
        "{}",
        errors[0]
    );
}

#[test]
fn loads_a_directory_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("10-pods.yml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: n, uid: u1}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("00-namespaces.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: n, labels: {weft.dev/mesh: enabled}}\n",
    )
    .unwrap();
    std::fs::write(d.join("README.md"), "not yaml: [").unwrap();
    std::fs::write(d.join(".hidden.yaml"), "not yaml: [").unwrap();
    std::fs::create_dir(d.join("sub.yaml")).unwrap();
    let s = load(d, 7).unwrap();
    assert_eq!(s.generation, 7);
    assert_eq!(
        s.sources,
        vec![d.join("00-namespaces.yaml"), d.join("10-pods.yml")]
    );
    assert!(s.namespace_enrolled("n"));
    assert!(s.pod("n", "p").is_some());

    std::fs::write(
        d.join("20-bad.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n",
    )
    .unwrap();
    let s = load(d, 8).unwrap();
    assert!(s.namespace_enrolled("n"), "the first one applies");
    assert_eq!(
        s.not_applied
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec![format!(
            "{}:3: document 1 (Namespace n): metadata.name: duplicate Namespace n, first defined at {}:1",
            d.join("20-bad.yaml").display(),
            d.join("00-namespaces.yaml").display()
        )]
    );
    let missing = load(&d.join("nope"), 1).unwrap_err();
    assert!(missing.to_string().contains("cannot read"), "{missing}");
}

const GOOD_V1: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: one}\n";
const GOOD_V2: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: two}\n";
const BAD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: nouid}\n";
/// Not UTF-8: the file cannot be read at all.
const UNREADABLE: &[u8] = b"apiVersion: v1\n\xff\xfe\n";

#[test]
fn a_bad_object_is_left_out_and_the_others_apply() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.yaml");
    std::fs::write(&file, format!("{GOOD_V1}---\n{BAD}")).unwrap();
    let src = FileSource::load(&file).unwrap();
    let reg = src.registry();
    let snap = reg.snapshot();
    assert!(snap.namespaces.contains_key("one"));
    assert!(snap.pods.is_empty());
    assert_eq!(snap.not_applied.len(), 1);
    assert_eq!(
        snap.not_applied[0].to_string(),
        format!(
            "{}:7: document 2 (Pod default/nouid): metadata.uid: is required for a Pod (it locates the pod's cgroup)",
            file.display()
        )
    );
    assert_eq!(reg.last_error(), None, "the load itself succeeded");

    // The next good edit applies, and the report of the bad object goes with it.
    std::fs::write(&file, format!("{GOOD_V1}---\n{GOOD_V2}")).unwrap();
    assert_eq!(src.reload(), Ok(true));
    let snap = reg.snapshot();
    assert!(snap.namespaces.contains_key("two"));
    assert!(snap.not_applied.is_empty());
}

#[test]
fn reload_keeps_the_last_snapshot_when_files_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.yaml");
    std::fs::write(&file, UNREADABLE).unwrap();
    let first = FileSource::load(&file).unwrap_err();
    assert_eq!(first.len(), 1);

    std::fs::write(&file, GOOD_V1).unwrap();
    let src = FileSource::load(&file).unwrap();
    let reg = src.registry();
    let mut rx = reg.subscribe();
    assert_eq!(reg.snapshot().generation, 1);
    assert_eq!(src.reload(), Ok(false), "unchanged");

    std::fs::write(&file, UNREADABLE).unwrap();
    let err = src.reload().unwrap_err();
    assert!(err.to_string().contains("cluster.yaml: not UTF-8"), "{err}");
    assert_eq!(reg.last_error(), Some(err.to_string()));
    assert!(reg.snapshot().namespaces.contains_key("one"));
    assert!(!rx.has_changed().unwrap());

    std::fs::write(&file, GOOD_V2).unwrap();
    assert_eq!(src.reload(), Ok(true));
    assert_eq!(reg.last_error(), None);
    assert_eq!(reg.snapshot().generation, 2);
    assert!(rx.has_changed().unwrap());
    assert!(rx.borrow_and_update().namespaces.contains_key("two"));

    // Back to unreadable and back to the same good content: the error clears without a new
    // generation.
    std::fs::write(&file, UNREADABLE).unwrap();
    assert!(src.reload().is_err());
    std::fs::write(&file, GOOD_V2).unwrap();
    assert_eq!(src.reload(), Ok(false));
    assert_eq!(reg.last_error(), None);

    std::fs::remove_file(&file).unwrap();
    assert!(src.reload().is_err());
    assert_eq!(reg.snapshot().generation, 2);
}

async fn wait_for(rx: &mut watch::Receiver<Arc<Snapshot>>, what: impl Fn(&Snapshot) -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if what(&rx.borrow_and_update()) {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("registry did not pick up the change in time");
}

/// Writes like an editor: a temporary file renamed over the target.
fn save(path: &Path, text: &str) {
    save_bytes(path, text.as_bytes());
}

fn save_bytes(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn watcher_follows_file_edits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.yaml");
    std::fs::write(&file, GOOD_V1).unwrap();
    let src = Arc::new(FileSource::load(&file).unwrap());
    let reg = src.registry().clone();
    let mut rx = reg.subscribe();
    let task = src.clone().spawn_watcher_with(WatchConfig {
        debounce: Duration::from_millis(50),
        poll_interval: Duration::from_secs(60),
        release_after: Duration::from_millis(10),
    });
    // Let the watch be set up before the first change.
    tokio::time::sleep(Duration::from_millis(100)).await;

    save_bytes(&file, UNREADABLE);
    tokio::time::timeout(Duration::from_secs(10), async {
        while reg.last_error().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("bad edit not noticed");
    assert!(
        reg.snapshot().namespaces.contains_key("one"),
        "last good kept"
    );

    // The failed reload's own release (10 ms after it) is over before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let releases = crate::memory::releases();
    std::fs::write(&file, GOOD_V2).unwrap();
    wait_for(&mut rx, |s| s.namespaces.contains_key("two")).await;
    assert_eq!(reg.last_error(), None);
    assert_eq!(reg.snapshot().generation, 2);
    // What the reload freed, and the code only it ran, are handed back once it is quiet.
    tokio::time::timeout(Duration::from_secs(10), async {
        while crate::memory::releases() == releases {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("no release after the reload");
    task.abort();
}

#[tokio::test]
async fn watcher_follows_configmap_style_symlink_swaps() {
    // A ConfigMap volume: name.yaml -> ..data/name.yaml, ..data -> ..<timestamp>, swapped by rename.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let version = |n: &str, text: &str| {
        let v = d.join(format!("..{n}"));
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join("cluster.yaml"), text).unwrap();
        let tmp = d.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..{n}"), &tmp).unwrap();
        std::fs::rename(&tmp, d.join("..data")).unwrap();
    };
    version("v1", GOOD_V1);
    std::os::unix::fs::symlink("..data/cluster.yaml", d.join("cluster.yaml")).unwrap();

    let src = Arc::new(FileSource::load(d).unwrap());
    let reg = src.registry().clone();
    assert_eq!(reg.snapshot().sources, vec![d.join("cluster.yaml")]);
    let mut rx = reg.subscribe();
    let task = src.clone().spawn_watcher_with(WatchConfig {
        debounce: Duration::from_millis(50),
        poll_interval: Duration::from_secs(60),
        ..WatchConfig::default()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    version("v2", GOOD_V2);
    wait_for(&mut rx, |s| s.namespaces.contains_key("two")).await;
    task.abort();
}

#[tokio::test]
async fn watcher_polls_when_events_are_missed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.yaml");
    std::fs::write(&file, GOOD_V1).unwrap();
    let src = Arc::new(FileSource::load(&file).unwrap());
    let mut rx = src.registry().subscribe();
    // A debounce longer than the test: only the poll can see the change.
    let task = src.clone().spawn_watcher_with(WatchConfig {
        debounce: Duration::from_secs(3600),
        poll_interval: Duration::from_millis(100),
        ..WatchConfig::default()
    });
    save(&file, GOOD_V2);
    wait_for(&mut rx, |s| s.namespaces.contains_key("two")).await;
    task.abort();
}

#[test]
fn locate_never_panics_on_partial_documents() {
    let paths = [
        "metadata.name",
        "spec.containers[0].ports[1].containerPort",
        "spec.ports[2].targetPort",
        "status.podIPs[1].ip",
        "items[0].spec",
        "spec.http[0].route[0].destination.host",
    ];
    let lines: Vec<&str> = CLUSTER.lines().collect();
    for end in 0..lines.len() {
        for start in (0..end).step_by(7) {
            let text = lines[start..end].join("\n");
            for p in paths {
                if let Some(line) = file::locate(&text, p) {
                    assert!(
                        line >= 1 && line <= end - start,
                        "{p} in lines {start}..{end}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_source_publishes_to_the_registry() {
    let reg = Registry::new(Snapshot::empty());
    assert_eq!(reg.snapshot().generation, 0);
    let rx = reg.subscribe();
    let mut builder = SnapshotBuilder::new();
    let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}),
    )
    .unwrap();
    builder
        .insert(Object::Namespace(Box::new(ns.clone())))
        .unwrap();
    let dup = builder.insert(Object::Namespace(Box::new(ns))).unwrap_err();
    assert_eq!(dup[0].to_string(), "metadata.name: duplicate Namespace x");
    let snap = reg.publish(builder, Vec::new());
    assert_eq!(snap.generation, 1);
    assert!(rx.has_changed().unwrap());
    assert!(reg.snapshot().namespaces.contains_key("x"));
}

#[test]
fn unknown_fields_are_reported_for_core_kinds() {
    let yaml = "\
apiVersion: v1
kind: Pod
metadata:
  name: typo
  uid: u1
spec:
  contianers: []
  nodeNmae: node-1
---
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  ports:
  - port: 80
    targetPrt: 8080
";
    assert_eq!(
        errors_of(yaml),
        vec![
            "<inline>:7: document 1 (Pod default/typo): spec.contianers: unknown field \"contianers\" (did you mean \"containers\"?)",
            "<inline>:8: document 1 (Pod default/typo): spec.nodeNmae: unknown field \"nodeNmae\"",
            "<inline>:16: document 2 (Service default/s): spec.ports[0].targetPrt: unknown field \"targetPrt\"",
        ]
    );
    // Objects of the kinds weft reads: top-level and metadata fields too.
    let yaml = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespce: x}
sepc: {hosts: [a]}
";
    assert_eq!(
        errors_of(yaml),
        vec![
            "<inline>:4: document 1 (VirtualService default/vs): sepc: unknown field \"sepc\" in a VirtualService, expected apiVersion, kind, metadata, spec or status",
            "<inline>:3: document 1 (VirtualService default/vs): metadata.namespce: unknown field \"namespce\"",
        ]
    );
}

#[test]
fn probe_ports_are_those_the_kubelet_connects_to() {
    let yaml = "\
apiVersion: v1
kind: Pod
metadata: {namespace: default, name: app, uid: u-app}
spec:
  containers:
  - name: web
    ports: [{name: http, containerPort: 8080}, {name: health, containerPort: 8081}]
    readinessProbe: {httpGet: {path: /ready, port: health}}
    livenessProbe: {tcpSocket: {port: 8080}}
    startupProbe: {exec: {command: [true]}}
  - name: grpc
    ports: [{name: health, containerPort: 9000}]
    livenessProbe: {grpc: {port: 9001}}
    readinessProbe: {httpGet: {port: health}}
  - name: odd
    readinessProbe: {httpGet: {port: nope}}
status: {podIP: 10.244.1.9}
";
    let s = Snapshot::from_yaml(yaml).unwrap();
    let pod = s.pod_by_ip("10.244.1.9".parse().unwrap()).unwrap();
    // Named ports resolve in their own container (`health` is 8081 in one, 9000 in the
    // other); exec probes and names no container declares give nothing.
    assert_eq!(pod.probe_ports, vec![8080, 8081, 9000, 9001]);
}

#[test]
fn a_pods_owner_is_its_controller_else_its_first_owner() {
    let yaml = "\
apiVersion: v1
kind: Pod
metadata:
  namespace: back
  name: reviews-v1-7d4b9c8f6d-x2kqp
  generateName: reviews-v1-7d4b9c8f6d-
  uid: u-1
  labels: {app: reviews, pod-template-hash: 7d4b9c8f6d}
  ownerReferences:
  - {apiVersion: v1, kind: ConfigMap, name: cm, uid: u-cm}
  - {apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-7d4b9c8f6d, uid: u-rs, controller: true, blockOwnerDeletion: true}
status: {podIP: 10.244.1.9}
---
apiVersion: v1
kind: Pod
metadata:
  namespace: back
  name: kept
  uid: u-2
  ownerReferences: [{apiVersion: v1, kind: ConfigMap, name: cm, uid: u-cm}]
---
apiVersion: v1
kind: Pod
metadata: {namespace: back, name: bare, uid: u-3}
";
    let s = Snapshot::from_yaml(yaml).unwrap();
    let pod = s.pod("back", "reviews-v1-7d4b9c8f6d-x2kqp").unwrap();
    assert_eq!(
        pod.owner,
        Some(model::Owner {
            kind: "ReplicaSet".into(),
            name: "reviews-v1-7d4b9c8f6d".into(),
            controller: true,
        })
    );
    assert_eq!(pod.generate_name.as_deref(), Some("reviews-v1-7d4b9c8f6d-"));
    let w = workload::workload_of(pod);
    assert_eq!((w.name.as_str(), w.kind), ("reviews-v1", "Deployment"));

    // No controller: the first owner, marked as not controlling.
    let kept = s.pod("back", "kept").unwrap();
    assert_eq!(
        kept.owner.as_ref().map(|o| (o.kind.as_str(), o.controller)),
        Some(("ConfigMap", false))
    );
    assert_eq!(kept.generate_name, None);
    assert_eq!(workload::workload_of(kept).kind, "Pod");
    assert_eq!(s.pod("back", "bare").unwrap().owner, None);
}

#[test]
fn a_target_port_name_no_selected_pod_declares_is_warned_about() {
    let yaml = "\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo, uid: u1, labels: {app: web}}
spec:
  containers:
  - name: c
    ports: [{name: http, containerPort: 8080}]
status: {podIP: 10.0.0.5, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: htp
  - name: ok
    port: 81
    targetPort: http
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: demo}
spec:
  selector: {app: none}
  ports: [{port: 80, targetPort: htp}]
";
    let s = Snapshot::from_yaml(yaml).unwrap();
    let warnings: Vec<String> = s.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        vec![
            "<inline>:17: document 2 (Service demo/web): spec.ports[0].targetPort: no pod this Service selects (1 pods) declares a TCP port named \"htp\" (they declare http): calls to port 80 find no endpoint"
        ]
    );
    assert_eq!(
        s.service("demo", "web").unwrap().ports.len(),
        2,
        "still applied"
    );
}

#[test]
fn syntax_error_positions_are_file_lines() {
    let yaml = "\
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Namespace
metadata: {name: b
";
    let errors = errors_of(yaml);
    assert_eq!(errors.len(), 1, "{errors:?}");
    // Every position the message names is a line of the file, not of the document.
    let lines: Vec<usize> = errors[0]
        .match_indices(" at line ")
        .map(|(i, m)| {
            errors[0][i + m.len()..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        errors[0].starts_with("<inline>:8: document 2: "),
        "{errors:?}"
    );
    assert!(
        !lines.is_empty() && lines.iter().all(|l| (5..=8).contains(l)),
        "{errors:?}"
    );
}

#[test]
fn endpoint_slices_give_the_endpoints_where_present() {
    let yaml = "\
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: demo, uid: u1, labels: {app: web}}
spec: {containers: [{name: c}]}
status: {podIP: 10.0.0.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: demo, uid: u2, labels: {app: web}}
spec: {containers: [{name: c}]}
status: {podIP: 10.0.0.6, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.9
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 9090, protocol: TCP}]
endpoints:
- addresses: [10.0.0.5]
  conditions: {ready: true}
- addresses: [10.0.0.6]
  conditions: {ready: false}
- addresses: [10.0.0.99]
";
    let s = Snapshot::from_yaml(yaml).unwrap();
    let svc = s.service("demo", "web").unwrap();
    // The slice's ready address of a known pod, at the slice's port: not the selector's pods.
    assert_eq!(
        names(&s.endpoints(svc, &svc.ports[0])),
        vec![("a".to_string(), sa("10.0.0.5:9090"))]
    );
}

#[test]
fn an_invalid_edit_keeps_the_previous_version_except_for_security_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.yaml");
    let pod = |extra: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: n, uid: u1, labels: {{v: one}}}}\nspec:\n  containers: [{{name: c}}]\n{extra}")
    };
    let policy = |action: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ap, namespace: n}}\nspec:\n  action: {action}\n  rules: [{{}}]\n")
    };
    std::fs::write(&file, format!("{}---\n{}", pod(""), policy("DENY"))).unwrap();
    let src = FileSource::load(&file).unwrap();
    let reg = src.registry();
    assert_eq!(reg.snapshot().authorization_policies.len(), 1);

    // The pod gains a misspelt field, the policy a bad action: the pod's previous version stays
    // (as an edit the API server refused), the policy is gone and fails closed.
    std::fs::write(
        &file,
        format!(
            "{}---\n{}",
            pod("  nodeNmae: x\n").replace("v: one", "v: two"),
            policy("DENIE")
        ),
    )
    .unwrap();
    assert_eq!(src.reload(), Ok(true));
    let snap = reg.snapshot();
    assert_eq!(
        snap.pod("n", "p")
            .unwrap()
            .labels
            .get("v")
            .map(String::as_str),
        Some("one")
    );
    let reports: Vec<String> = snap.not_applied.iter().map(ToString::to_string).collect();
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert!(
        reports[0].contains("spec.nodeNmae")
            && reports[0].ends_with("(its previous version stays in force)"),
        "{reports:?}"
    );
    assert!(
        reports[1].contains("spec.action") && !reports[1].contains("previous version"),
        "{reports:?}"
    );
    assert!(snap.authorization_policies.is_empty());
    assert_eq!(snap.fail_closed.len(), 1);
    assert_eq!(snap.fail_closed[0].effect, FailEffect::DenyAll);

    // Still invalid on the next edit: the same previous version stays.
    std::fs::write(
        &file,
        format!("{}---\n{}", pod("  nodeNmae: y\n"), policy("DENY")),
    )
    .unwrap();
    assert_eq!(src.reload(), Ok(true));
    let snap = reg.snapshot();
    assert!(snap.pod("n", "p").is_some());
    assert_eq!(snap.authorization_policies.len(), 1);
    assert!(snap.fail_closed.is_empty());
}

/// A snapshot from converted objects, with the warnings a source adds.
fn build_from(objects: &[Conversion]) -> Snapshot {
    let mut b = SnapshotBuilder::new();
    for c in objects {
        b.add(c.clone()).unwrap();
    }
    for (key, error) in b.warnings() {
        b.warning(Problem {
            origin: "test".into(),
            object: key.to_string(),
            reason: error.to_string(),
        });
    }
    b.build(1, Vec::new())
}

#[test]
fn snapshots_from_the_same_converted_objects_share_policies_and_routes() {
    // A source keeping objects converted (the Kubernetes one) rebuilds from the same `Arc`s:
    // a pod change leaves policies and routes as they were compiled.
    let objects: Vec<Conversion> = Snapshot::parse_yaml(CLUSTER).good.into_values().collect();
    let a = build_from(&objects);
    let b = build_from(&objects);
    assert!(a.same_policies(&b) && a.same_routes(&b));
    // A Service converted again is another object: routes are compiled again.
    let mut changed = objects.clone();
    let i = changed
        .iter()
        .position(|c| c.key.kind == "Service")
        .unwrap();
    // The same content converted again into a fresh Arc.
    let fresh = match &changed[i].result {
        Ok(Converted::Service(s)) => Converted::Service(Arc::new((**s).clone())),
        other => panic!("{other:?}"),
    };
    changed[i].result = Ok(fresh);
    let c = build_from(&changed);
    assert!(a.same_policies(&c));
    assert!(!a.same_routes(&c));
}

#[test]
fn changing_pods_in_place_matches_a_rebuild() {
    // The Kubernetes source applies pod churn to the snapshot in force: the result must be
    // what a rebuild from the same objects gives.
    let parsed = Snapshot::parse_yaml(CLUSTER);
    let mut objects: Vec<Conversion> = parsed.good.into_values().collect();
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let before = build_from(&objects);
    let pod_at = |name: &str| {
        objects
            .iter()
            .position(|c| c.key.kind == "Pod" && c.key.name == name)
            .unwrap()
    };
    let pod_of = |c: &Conversion| match &c.result {
        Ok(Converted::Pod(p)) => p.clone(),
        other => panic!("{other:?}"),
    };
    // server-0 becomes not ready, server-1 leaves, a new server-9 arrives.
    let mut not_ready = (*pod_of(&objects[pod_at("server-0")])).clone();
    not_ready.ready = false;
    let mut newcomer = (*pod_of(&objects[pod_at("server-1")])).clone();
    newcomer.name = "server-9".into();
    newcomer.ip = Some(ip("10.244.9.9"));
    newcomer.ips = vec![ip("10.244.9.9")];
    let changes = vec![
        (
            ("demo".to_string(), "server-0".to_string()),
            Some(Arc::new(not_ready.clone())),
        ),
        (("demo".to_string(), "server-1".to_string()), None),
        (
            ("demo".to_string(), "server-9".to_string()),
            Some(Arc::new(newcomer.clone())),
        ),
    ];
    let patched = before.with_changes(2, &changes, &[], "test");

    let mut after = objects.clone();
    let i = pod_at("server-0");
    after[i].result = Ok(Converted::Pod(Arc::new(not_ready)));
    after.remove(pod_at("server-1"));
    after.push(Conversion {
        key: ObjectKey {
            name: "server-9".into(),
            ..objects[pod_at("server-1")].key.clone()
        },
        result: Ok(Converted::Pod(Arc::new(newcomer))),
        fail_closed: None,
    });
    let rebuilt = build_from(&after);

    let pods = |s: &Snapshot| {
        s.pods
            .iter()
            .map(|p| (p.namespace.clone(), p.name.clone(), p.ready))
            .collect::<Vec<_>>()
    };
    assert_eq!(pods(&patched), pods(&rebuilt));
    for svc in &rebuilt.services {
        for port in &svc.ports {
            assert_eq!(
                names(&patched.endpoints(svc, port)),
                names(&rebuilt.endpoints(svc, port)),
                "{}/{} {}",
                svc.namespace,
                svc.name,
                port.port
            );
        }
    }
    for p in &rebuilt.pods {
        for ip in &p.ips {
            assert_eq!(
                patched.pod_by_ip(*ip).map(|p| &p.name),
                rebuilt.pod_by_ip(*ip).map(|p| &p.name)
            );
        }
        if let Some(node) = &p.node_name {
            assert_eq!(
                patched.pods_on_node(node).count(),
                rebuilt.pods_on_node(node).count()
            );
        }
    }
    assert!(patched.pod_by_ip(ip("10.244.9.9")).is_some());
    assert_eq!(patched.warnings, rebuilt.warnings);
    assert_eq!(patched.generation, 2);
}

#[test]
fn a_pod_changed_in_place_patches_the_indexes_as_a_rebuild_would() {
    let parsed = Snapshot::parse_yaml(CLUSTER);
    let mut objects: Vec<Conversion> = parsed.good.into_values().collect();
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let before = build_from(&objects);
    let i = objects
        .iter()
        .position(|c| c.key.kind == "Pod" && c.key.name == "server-0")
        .unwrap();
    let Ok(Converted::Pod(old)) = &objects[i].result else {
        panic!()
    };
    // Not ready, and a new address (as after a sandbox restart).
    let mut changed = (**old).clone();
    changed.ready = false;
    changed.ip = Some(ip("10.244.7.7"));
    changed.ips = vec![ip("10.244.7.7")];
    let old_ip = old.ip.unwrap();
    let changes = [(
        ("demo".to_string(), "server-0".to_string()),
        Some(Arc::new(changed.clone())),
    )];
    let patched = before.with_changes(2, &changes, &[], "test");
    let mut after = objects.clone();
    after[i].result = Ok(Converted::Pod(Arc::new(changed)));
    let rebuilt = build_from(&after);
    assert!(patched.pod_by_ip(old_ip).is_none());
    assert_eq!(
        patched.pod_by_ip(ip("10.244.7.7")).map(|p| &p.name),
        Some(&"server-0".to_string())
    );
    for p in &rebuilt.pods {
        for a in &p.ips {
            assert_eq!(
                patched.pod_by_ip(*a).map(|p| &p.name),
                rebuilt.pod_by_ip(*a).map(|p| &p.name)
            );
        }
    }
    for svc in &rebuilt.services {
        for port in &svc.ports {
            assert_eq!(
                names(&patched.endpoints(svc, port)),
                names(&rebuilt.endpoints(svc, port))
            );
        }
    }
}
