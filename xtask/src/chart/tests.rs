//! The chart's tests: the plain manifest is the default render; overridden values do what they
//! say; every object is well formed and validates against the Kubernetes 1.34 schemas
//! (kubernetes-validate); real Helm renders the chart to the very same bytes. The two tools come
//! from `cargo xtask setup`: a test fails, naming it, when one is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value as Yaml;

use super::*;
use crate::setup;

mod grafana;

/// The plain manifest: the chart's default render.
const MANIFEST: &str = "deploy/weft.yaml";
const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";
const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHfake\n-----END PRIVATE KEY-----\n";

fn chart() -> Chart {
    Chart::load(&workspace_root().join(CHART_DIR)).expect("the chart loads")
}

fn everything_values() -> PathBuf {
    workspace_root().join("xtask/src/chart/testdata/values-everything.yaml")
}

/// Value sets the tests render besides the defaults: (values files, --set arguments).
fn variants() -> Vec<(Vec<PathBuf>, Vec<String>)> {
    let set = |s: &[&str]| (Vec::new(), s.iter().map(|s| s.to_string()).collect());
    vec![
        set(&["crds.install=false"]),
        set(&[
            "ca.create=true",
            &format!("ca.cert={CERT}"),
            &format!("ca.key={KEY}"),
        ]),
        set(&["podMonitor.enabled=true"]),
        set(&["image.tag=1.2.3,image.repository=registry.example.org/weft"]),
        set(&[
            "extraArgs={--trust-domain=example.org,--svid-ttl=12h}",
            "logLevel=debug",
        ]),
        set(&["securityContext.privileged=true"]),
        set(&["crds.gatewayApi=true,crds.keep=false"]),
        set(&["namespace.create=false", "ca.existingSecret=mesh-root"]),
        set(&["bpf.autoMount=false", "securityContext.seccompProfile=null"]),
        set(&["caService.enabled=false"]),
        set(&[
            "caService.replicas=1",
            r"caService.nodeSelector.node-role\.kubernetes\.io/control-plane=",
            "caService.tolerations[0].key=node-role.kubernetes.io/control-plane,\
             caService.tolerations[0].operator=Exists,caService.tolerations[0].effect=NoSchedule",
            "caService.extraArgs={--max-ttl=12h,--trust-domain=example.org}",
            "caService.affinity=null",
        ]),
        (vec![everything_values()], Vec::new()),
    ]
}

fn render(files: &[PathBuf], sets: &[String]) -> anyhow::Result<Vec<Manifest>> {
    let chart = chart();
    let values = chart.values(files, sets)?;
    chart.render(&values, RELEASE, NAMESPACE)
}

fn render_sets(sets: &[&str]) -> Vec<Manifest> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    render(&[], &sets).expect("the chart renders")
}

fn parse(m: &Manifest) -> Yaml {
    serde_yaml_ng::from_str(&m.content).expect("a rendered document parses")
}

fn object<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn docs(manifests: &[Manifest]) -> Vec<Yaml> {
    manifests.iter().map(parse).collect()
}

fn strings(v: &Yaml) -> Vec<&str> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|s| s.as_str().expect("a string"))
        .collect()
}

/// A tool `cargo xtask setup` installs: the test fails (never skips) without it.
fn tool(path: &Path) -> &Path {
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup`, which installs it",
        path.display()
    );
    path
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-chart-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn manifest_is_the_default_render() {
    let want = format!("{MANIFEST_HEADER}{}", template(&render_sets(&[])));
    let path = workspace_root().join(MANIFEST);
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have != want {
        let line = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(have.lines().count().min(want.lines().count()));
        panic!(
            "{MANIFEST} is not the chart's default render (first difference at line {}): run \
             `cargo xtask chart --out {MANIFEST}`",
            line + 1
        );
    }
}

#[test]
fn default_render_holds_the_install() {
    let docs = docs(&render_sets(&[]));
    let mut objects: Vec<(String, String)> = docs
        .iter()
        .map(|d| {
            let s = |v: &Yaml| v.as_str().unwrap_or_default().to_string();
            (s(&d["kind"]), s(&d["metadata"]["name"]))
        })
        .collect();
    objects.sort();
    let want = [
        ("ClusterRole", "weft"),
        ("ClusterRole", "weft-ca"),
        ("ClusterRoleBinding", "weft"),
        ("ClusterRoleBinding", "weft-ca"),
        (
            "CustomResourceDefinition",
            "authorizationpolicies.security.istio.io",
        ),
        (
            "CustomResourceDefinition",
            "destinationrules.networking.istio.io",
        ),
        (
            "CustomResourceDefinition",
            "peerauthentications.security.istio.io",
        ),
        (
            "CustomResourceDefinition",
            "serviceentries.networking.istio.io",
        ),
        (
            "CustomResourceDefinition",
            "virtualservices.networking.istio.io",
        ),
        ("DaemonSet", "weft"),
        ("Deployment", "weft-ca"),
        ("Namespace", "weft-system"),
        ("PodDisruptionBudget", "weft-ca"),
        ("Service", "weft-ca"),
        ("Service", "weft-metrics"),
        ("ServiceAccount", "weft"),
        ("ServiceAccount", "weft-ca"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(k, n)| (k.to_string(), n.to_string()))
        .collect();
    assert_eq!(objects, want);

    let ds = object(&docs, "DaemonSet", "weft");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["serviceAccountName"], "weft");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["terminationGracePeriodSeconds"], 60);
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(
        pod["tolerations"],
        serde_yaml_ng::from_str::<Yaml>("[{operator: Exists}]").unwrap()
    );
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    // The new pod starts beside the old one and takes its sockets over.
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        serde_yaml_ng::from_str::<Yaml>(
            "{app.kubernetes.io/name: weft, app.kubernetes.io/instance: weft}"
        )
        .unwrap()
    );
    let labels = &ds["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/version"], "0.1.0");
    assert_eq!(labels["helm.sh/chart"], "weft-0.1.0");

    let weft = &pod["containers"][0];
    assert_eq!(weft["name"], "weft");
    assert_eq!(weft["image"], "weft:0.1.0");
    assert_eq!(strings(&weft["command"]), ["weft"]);
    assert_eq!(
        strings(&weft["args"]),
        [
            "node",
            "--node-name=$(NODE_NAME)",
            "--registry=kube",
            "--ca-cert=/etc/weft/ca/ca.crt",
            "--ca-address=https://weft-ca.weft-system.svc:15012",
            "--ca-token=/var/run/secrets/weft/ca-token",
            "--cgroup-root=/sys/fs/cgroup",
            "--bpffs=/sys/fs/bpf/weft",
            "--admin-socket=/run/weft/admin.sock",
            "--metrics-address=0.0.0.0:15020",
        ]
    );
    assert_eq!(weft["env"][0]["name"], "NODE_NAME");
    assert_eq!(
        weft["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(weft["env"][1]["name"], "WEFT_LOG");
    assert_eq!(weft["env"][1]["value"], "info");
    // No declared port: on the host network each would be a host port the scheduler reserves,
    // and the surge pod of an update could not start beside this one.
    assert!(weft["ports"].is_null(), "{:?}", weft["ports"]);
    assert_eq!(weft["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
    assert_eq!(weft["readinessProbe"]["httpGet"]["port"], 15020);
    assert_eq!(weft["livenessProbe"]["httpGet"]["path"], "/healthz/live");
    assert_eq!(weft["resources"]["requests"]["cpu"], "100m");
    assert_eq!(weft["resources"]["requests"]["memory"], "128Mi");
    assert_eq!(weft["resources"]["limits"]["memory"], "512Mi");
    let sc = &weft["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        [
            "BPF",
            "NET_ADMIN",
            "SYS_ADMIN",
            "SYS_RESOURCE",
            "NET_RAW",
            "PERFMON"
        ]
    );
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    // Kubernetes refuses allowPrivilegeEscalation: false beside CAP_SYS_ADMIN.
    assert_eq!(sc["allowPrivilegeEscalation"], true);
    assert_eq!(sc["seccompProfile"]["type"], "Unconfined");

    let mounts: Vec<(&str, &str)> = weft["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap(),
                m["mountPath"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        mounts,
        [
            ("cgroup", "/sys/fs/cgroup"),
            ("bpffs", "/sys/fs/bpf"),
            ("run", "/run/weft"),
            ("ca", "/etc/weft/ca"),
            ("ca-token", "/var/run/secrets/weft"),
            ("tmp", "/tmp"),
        ]
    );
    assert_eq!(
        weft["volumeMounts"][1]["mountPropagation"],
        "HostToContainer"
    );
    assert_eq!(
        weft["volumeMounts"][0]["readOnly"],
        Yaml::Null,
        "cgroup root is read-write"
    );
    let volumes = &pod["volumes"];
    assert_eq!(volumes[0]["hostPath"]["path"], "/sys/fs/cgroup");
    assert_eq!(volumes[0]["hostPath"]["type"], "Directory");
    assert_eq!(volumes[1]["hostPath"]["type"], "DirectoryOrCreate");
    assert_eq!(volumes[2]["hostPath"]["path"], "/run/weft");
    assert_eq!(volumes[3]["secret"]["secretName"], "weft-ca");
    // The privileged step that mounts bpffs on the host, propagated back.
    let init = &pod["initContainers"][0];
    assert_eq!(init["name"], "mount-bpffs");
    assert_eq!(init["securityContext"]["privileged"], true);
    assert_eq!(init["volumeMounts"][0]["mountPropagation"], "Bidirectional");

    // Read-only access, but for Events.
    let role = object(&docs, "ClusterRole", "weft");
    for rule in role["rules"].as_sequence().unwrap() {
        let verbs = strings(&rule["verbs"]);
        if strings(&rule["resources"]) == ["events"] {
            assert_eq!(verbs, ["create", "patch"]);
            assert_eq!(strings(&rule["apiGroups"]), ["", "events.k8s.io"]);
        } else {
            assert_eq!(verbs, ["get", "list", "watch"], "{rule:?}");
        }
    }
    let resources: Vec<&str> = role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|r| strings(&r["resources"]))
        .collect();
    for r in [
        "namespaces",
        "nodes",
        "pods",
        "services",
        "endpointslices",
        "authorizationpolicies",
        "peerauthentications",
        "virtualservices",
        "destinationrules",
        "serviceentries",
        "httproutes",
        "grpcroutes",
    ] {
        assert!(resources.contains(&r), "{r} not readable");
    }
    // Nothing more: weft learns that a CRD is missing from the 404 of its list.
    assert_eq!(resources.len(), 13, "{resources:?}");
    let binding = object(&docs, "ClusterRoleBinding", "weft");
    assert_eq!(binding["subjects"][0]["name"], "weft");
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);

    let service = object(&docs, "Service", "weft-metrics");
    assert_eq!(service["spec"]["ports"][0]["port"], 15020);
    assert_eq!(service["spec"]["ports"][0]["name"], "http-metrics");
    assert_eq!(
        service["spec"]["selector"],
        ds["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        service["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );

    let vs = object(
        &docs,
        "CustomResourceDefinition",
        "virtualservices.networking.istio.io",
    );
    let versions: Vec<(&str, bool, bool)> = vs["spec"]["versions"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| {
            let b = |k: &str| v[k].as_bool().unwrap();
            (v["name"].as_str().unwrap(), b("served"), b("storage"))
        })
        .collect();
    assert_eq!(
        versions,
        [
            ("v1", true, true),
            ("v1beta1", true, false),
            ("v1alpha3", true, false)
        ]
    );
    assert_eq!(strings(&vs["spec"]["names"]["shortNames"]), ["vs"]);
    let ap = object(
        &docs,
        "CustomResourceDefinition",
        "authorizationpolicies.security.istio.io",
    );
    let names: Vec<&str> = ap["spec"]["versions"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["v1", "v1beta1"]);
    assert_eq!(
        ap["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
}

#[test]
fn overridden_values() {
    let kinds = |m: &[Manifest]| m.iter().map(|m| m.kind.clone()).collect::<Vec<_>>();

    let no_crds = render_sets(&["crds.install=false"]);
    assert!(!kinds(&no_crds).contains(&"CustomResourceDefinition".to_string()));

    let gateway = docs(&render_sets(&["crds.gatewayApi=true"]));
    object(
        &gateway,
        "CustomResourceDefinition",
        "httproutes.gateway.networking.k8s.io",
    );
    let grpc = object(
        &gateway,
        "CustomResourceDefinition",
        "grpcroutes.gateway.networking.k8s.io",
    );
    let served: Vec<&str> = grpc["spec"]["versions"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(served, ["v1", "v1alpha2"], "the versions weft reads");

    let with_ca = docs(&render_sets(&[
        "ca.create=true",
        &format!("ca.cert={CERT}"),
        &format!("ca.key={KEY}"),
    ]));
    let secret = object(&with_ca, "Secret", "weft-ca");
    assert_eq!(secret["type"], "Opaque");
    assert_eq!(secret["metadata"]["namespace"], NAMESPACE);
    let b64 = |s: &str| funcs_b64(s);
    assert_eq!(secret["data"]["ca.crt"], b64(CERT).as_str());
    assert_eq!(secret["data"]["ca.key"], b64(KEY).as_str());
    let missing = render(&[], &["ca.create=true".to_string()])
        .map(|_| ())
        .unwrap_err();
    assert!(format!("{missing:#}").contains("ca.cert"), "{missing:#}");

    let existing = docs(&render_sets(&["ca.existingSecret=mesh-root"]));
    assert!(!existing.iter().any(|d| d["kind"] == "Secret"));
    let pod = &object(&existing, "DaemonSet", "weft")["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"][3]["secret"]["secretName"], "mesh-root");

    let monitored = docs(&render_sets(&["podMonitor.enabled=true"]));
    let monitor = object(&monitored, "PodMonitor", "weft");
    let ds = object(&monitored, "DaemonSet", "weft");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        ds["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        monitor["spec"]["podMetricsEndpoints"][0]["portNumber"],
        15020
    );
    assert_eq!(
        strings(&monitor["spec"]["namespaceSelector"]["matchNames"]),
        [NAMESPACE]
    );
    // Unknown to Helm's install order: last.
    assert_eq!(monitored.last().unwrap()["kind"], "PodMonitor");

    let tagged = docs(&render_sets(&[
        "image.tag=1.2.3,image.repository=registry.example.org/weft",
    ]));
    let pod = &object(&tagged, "DaemonSet", "weft")["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["image"],
        "registry.example.org/weft:1.2.3"
    );
    assert_eq!(
        pod["initContainers"][0]["image"],
        "registry.example.org/weft:1.2.3"
    );

    let args = docs(&render_sets(&[
        "extraArgs={--trust-domain=example.org,--svid-ttl=12h}",
        "logLevel=debug",
    ]));
    let weft = &object(&args, "DaemonSet", "weft")["spec"]["template"]["spec"]["containers"][0];
    let all = strings(&weft["args"]);
    assert_eq!(
        all[all.len() - 3..],
        [
            "--metrics-address=0.0.0.0:15020",
            "--trust-domain=example.org",
            "--svid-ttl=12h"
        ]
    );
    assert_eq!(weft["env"][1]["value"], "debug");

    let privileged = docs(&render_sets(&["securityContext.privileged=true"]));
    let pod = &object(&privileged, "DaemonSet", "weft")["spec"]["template"]["spec"];
    assert_eq!(pod["initContainers"], Yaml::Null);
    assert_eq!(pod["containers"][0]["securityContext"]["privileged"], true);
    assert_eq!(
        pod["containers"][0]["securityContext"]["capabilities"],
        Yaml::Null
    );
    assert_eq!(
        pod["containers"][0]["volumeMounts"][1]["mountPropagation"],
        "Bidirectional"
    );

    let no_ns = render_sets(&["namespace.create=false"]);
    assert!(!kinds(&no_ns).contains(&"Namespace".to_string()));
    let elsewhere = docs(&render_sets(&["namespace.name=mesh"]));
    object(&elsewhere, "Namespace", "mesh");
    assert_eq!(
        object(&elsewhere, "DaemonSet", "weft")["metadata"]["namespace"],
        "mesh"
    );
}

/// The pod spec of a workload object.
fn pod_spec<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    &object(docs, kind, name)["spec"]["template"]["spec"]
}

/// A pod's volume by name.
fn volume<'a>(pod: &'a Yaml, name: &str) -> &'a Yaml {
    pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn has_volume(pod: &Yaml, name: &str) -> bool {
    pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|v| v["name"] == name)
}

/// Whether `selector` (matchLabels) selects a pod labelled `labels`.
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    selector
        .as_mapping()
        .unwrap()
        .iter()
        .all(|(k, v)| labels.get(k.as_str().unwrap()) == Some(v))
}

#[test]
fn ca_service_is_in_the_default_render() {
    let docs = docs(&render_sets(&[]));
    let deployment = object(&docs, "Deployment", "weft-ca");
    assert_eq!(deployment["metadata"]["namespace"], NAMESPACE);
    assert_eq!(deployment["spec"]["replicas"], 2);
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    assert_eq!(
        selector,
        &serde_yaml_ng::from_str::<Yaml>(
            "{app.kubernetes.io/name: weft-ca, app.kubernetes.io/instance: weft}"
        )
        .unwrap()
    );
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(selects(selector, pod_labels));
    // The nodes' selectors (DaemonSet, weft-metrics) never take the CA pods, nor the reverse.
    let ds = object(&docs, "DaemonSet", "weft");
    let node_selector = &ds["spec"]["selector"]["matchLabels"];
    assert!(!selects(node_selector, pod_labels));
    assert!(!selects(
        selector,
        &ds["spec"]["template"]["metadata"]["labels"]
    ));
    assert!(!selects(
        &object(&docs, "Service", "weft-metrics")["spec"]["selector"],
        pod_labels
    ));

    let pod = pod_spec(&docs, "Deployment", "weft-ca");
    assert_eq!(pod["serviceAccountName"], "weft-ca");
    assert_eq!(pod["hostNetwork"], Yaml::Null);
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["tolerations"], Yaml::Null);
    let spread =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(
        spread["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert!(selects(
        &spread["podAffinityTerm"]["labelSelector"]["matchLabels"],
        pod_labels
    ));

    let ca = &pod["containers"][0];
    assert_eq!(ca["image"], "weft:0.1.0");
    assert_eq!(strings(&ca["command"]), ["weft"]);
    assert_eq!(
        strings(&ca["args"]),
        [
            "ca",
            "serve",
            "--ca-cert=/etc/weft/ca/ca.crt",
            "--ca-key=/etc/weft/ca/ca.key",
            "--registry=kube",
            "--node-service-account=weft-system/weft",
            "--server-name=weft-ca",
            "--server-name=weft-ca.weft-system",
            "--server-name=weft-ca.weft-system.svc",
            "--server-name=weft-ca.weft-system.svc.cluster.local",
        ]
    );
    assert_eq!(ca["ports"][0]["containerPort"], 15012);
    assert_eq!(ca["ports"][0]["name"], "grpc-ca");
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(ca[probe]["tcpSocket"]["port"], "grpc-ca", "{probe}");
    }
    let sc = &ca["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["capabilities"]["add"], Yaml::Null);
    assert_eq!(ca["resources"]["requests"]["cpu"], "50m");
    assert_eq!(ca["volumeMounts"][0]["name"], "ca");
    assert_eq!(ca["volumeMounts"][0]["mountPath"], "/etc/weft/ca");
    // The whole Secret, key included: only here.
    let secret = &volume(pod, "ca")["secret"];
    assert_eq!(secret["secretName"], "weft-ca");
    assert_eq!(secret["items"], Yaml::Null);
    assert_eq!(pod["volumes"].as_sequence().unwrap().len(), 1);

    let service = object(&docs, "Service", "weft-ca");
    let port = &service["spec"]["ports"][0];
    assert_eq!(port["port"], 15012);
    assert_eq!(port["name"], "grpc-ca");
    assert_eq!(port["targetPort"], "grpc-ca");
    assert_eq!(port["appProtocol"], "grpc");
    assert_eq!(&service["spec"]["selector"], selector);

    let pdb = object(&docs, "PodDisruptionBudget", "weft-ca");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);

    object(&docs, "ServiceAccount", "weft-ca");
}

#[test]
fn nodes_mount_only_the_ca_root_and_ask_the_ca_service() {
    let docs = docs(&render_sets(&[]));
    let pod = pod_spec(&docs, "DaemonSet", "weft");
    let args = strings(&pod["containers"][0]["args"]);
    assert!(args.contains(&"--ca-address=https://weft-ca.weft-system.svc:15012"));
    assert!(args.contains(&"--ca-token=/var/run/secrets/weft/ca-token"));
    assert!(!args.iter().any(|a| a.starts_with("--ca-key")), "{args:?}");
    // The Secret projects ca.crt alone: the key never reaches a node.
    let secret = &volume(pod, "ca")["secret"];
    assert_eq!(secret["secretName"], "weft-ca");
    assert_eq!(
        secret["items"],
        serde_yaml_ng::from_str::<Yaml>("[{key: ca.crt, path: ca.crt}]").unwrap()
    );
    let token = &volume(pod, "ca-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "weft-ca");
    assert_eq!(token["expirationSeconds"], 3600);
    assert_eq!(token["path"], "ca-token");
    let mount = pod["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "ca-token")
        .expect("the token is mounted");
    assert_eq!(mount["mountPath"], "/var/run/secrets/weft");
    // No other workload than the CA service mounts the CA Secret whole.
    for doc in &docs {
        let pod = &doc["spec"]["template"]["spec"];
        for v in pod["volumes"].as_sequence().into_iter().flatten() {
            if v["secret"]["secretName"] == "weft-ca" && v["secret"]["items"].is_null() {
                assert_eq!(doc["kind"], "Deployment");
                assert_eq!(doc["metadata"]["name"], "weft-ca");
            }
        }
    }
}

#[test]
fn ca_service_role_reads_as_the_nodes_and_reviews_tokens() {
    let docs = docs(&render_sets(&[]));
    let rules = |name: &str| -> Vec<Yaml> {
        object(&docs, "ClusterRole", name)["rules"]
            .as_sequence()
            .unwrap()
            .clone()
    };
    let node: Vec<Yaml> = rules("weft")
        .into_iter()
        .filter(|r| strings(&r["resources"]) != ["events"])
        .collect();
    let ca = rules("weft-ca");
    let (reviews, reads): (Vec<Yaml>, Vec<Yaml>) = ca
        .into_iter()
        .partition(|r| strings(&r["resources"]) == ["tokenreviews"]);
    assert_eq!(reads, node, "the nodes' read-only rules, without Events");
    assert_eq!(reviews.len(), 1);
    assert_eq!(strings(&reviews[0]["apiGroups"]), ["authentication.k8s.io"]);
    assert_eq!(strings(&reviews[0]["verbs"]), ["create"]);
    for rule in &reads {
        assert_eq!(
            strings(&rule["verbs"]),
            ["get", "list", "watch"],
            "{rule:?}"
        );
    }
    let binding = object(&docs, "ClusterRoleBinding", "weft-ca");
    assert_eq!(binding["roleRef"]["name"], "weft-ca");
    assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], "weft-ca");
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);
}

#[test]
fn ca_service_disabled_is_development_mode() {
    let docs = docs(&render_sets(&["caService.enabled=false"]));
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["name"] == "weft-ca" && d["kind"] != "Secret"),
        "no CA service object"
    );
    let pod = pod_spec(&docs, "DaemonSet", "weft");
    let args = strings(&pod["containers"][0]["args"]);
    assert!(args.contains(&"--ca-cert=/etc/weft/ca/ca.crt"));
    assert!(args.contains(&"--ca-key=/etc/weft/ca/ca.key"));
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--ca-address") || a.starts_with("--ca-token")),
        "{args:?}"
    );
    let secret = &volume(pod, "ca")["secret"];
    assert_eq!(secret["secretName"], "weft-ca");
    assert_eq!(
        secret["items"],
        Yaml::Null,
        "the whole Secret, key included"
    );
    assert!(!has_volume(pod, "ca-token"));
    assert!(!pod["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "ca-token"));
}

#[test]
fn ca_service_values() {
    let one = docs(&render_sets(&[
        "caService.replicas=1",
        r"caService.nodeSelector.node-role\.kubernetes\.io/control-plane=",
        "caService.tolerations[0].key=node-role.kubernetes.io/control-plane,\
         caService.tolerations[0].operator=Exists,caService.tolerations[0].effect=NoSchedule",
        "caService.extraArgs={--max-ttl=12h}",
        "caService.affinity=null",
    ]));
    assert_eq!(object(&one, "Deployment", "weft-ca")["spec"]["replicas"], 1);
    // A budget of one replica would block every drain of its node.
    assert!(!one.iter().any(|d| d["kind"] == "PodDisruptionBudget"));
    let pod = pod_spec(&one, "Deployment", "weft-ca");
    assert_eq!(
        pod["nodeSelector"]["node-role.kubernetes.io/control-plane"],
        ""
    );
    assert_eq!(
        pod["tolerations"][0]["key"],
        "node-role.kubernetes.io/control-plane"
    );
    assert_eq!(pod["tolerations"][0]["effect"], "NoSchedule");
    assert_eq!(pod["affinity"], Yaml::Null);
    let args = strings(&pod["containers"][0]["args"]);
    assert_eq!(args.last(), Some(&"--max-ttl=12h"));

    let three = docs(&render_sets(&["caService.replicas=3"]));
    assert_eq!(
        object(&three, "Deployment", "weft-ca")["spec"]["replicas"],
        3
    );
    object(&three, "PodDisruptionBudget", "weft-ca");

    // The names follow the namespace and the nodes' ServiceAccount.
    let elsewhere = docs(&render_sets(&[
        "namespace.name=mesh",
        "serviceAccount.name=node",
    ]));
    let args = strings(&pod_spec(&elsewhere, "DaemonSet", "weft")["containers"][0]["args"]);
    assert!(args.contains(&"--ca-address=https://weft-ca.mesh.svc:15012"));
    let ca = pod_spec(&elsewhere, "Deployment", "weft-ca");
    let args = strings(&ca["containers"][0]["args"]);
    for want in [
        "--node-service-account=mesh/node",
        "--server-name=weft-ca",
        "--server-name=weft-ca.mesh",
        "--server-name=weft-ca.mesh.svc",
        "--server-name=weft-ca.mesh.svc.cluster.local",
    ] {
        assert!(args.contains(&want), "{want} not in {args:?}");
    }
    assert_eq!(
        object(&elsewhere, "ClusterRoleBinding", "weft-ca")["subjects"][0]["namespace"],
        "mesh"
    );

    // The CA service mounts the Secret the values name.
    let existing = docs(&render_sets(&["ca.existingSecret=mesh-root"]));
    let ca = pod_spec(&existing, "Deployment", "weft-ca");
    assert_eq!(volume(ca, "ca")["secret"]["secretName"], "mesh-root");
}

fn funcs_b64(s: &str) -> String {
    let v = gtmpl_ng::Value::from(s);
    match super::funcs::FUNCS
        .iter()
        .find(|(n, _)| *n == "b64enc")
        .unwrap()
        .1(&[v])
    .unwrap()
    {
        gtmpl_ng::Value::String(s) => s,
        other => panic!("{other:?}"),
    }
}

#[test]
fn objects_are_well_formed() {
    const CLUSTER_SCOPED: &[&str] = &[
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
    ];
    let mut renders = vec![(Vec::new(), Vec::new())];
    renders.extend(variants());
    for (files, sets) in renders {
        let manifests = render(&files, &sets).expect("the chart renders");
        for m in &manifests {
            let doc = parse(m);
            let what = format!("{} ({files:?} {sets:?})", m.source);
            for field in ["apiVersion", "kind"] {
                assert!(
                    doc[field].as_str().is_some_and(|s| !s.is_empty()),
                    "{what}: no {field}"
                );
            }
            assert!(
                doc["metadata"]["name"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{what}: no name"
            );
            let namespace = &doc["metadata"]["namespace"];
            if CLUSTER_SCOPED.contains(&m.kind.as_str()) {
                assert_eq!(
                    namespace,
                    &Yaml::Null,
                    "{what}: a cluster-scoped object with a namespace"
                );
            } else {
                assert_eq!(namespace, NAMESPACE, "{what}");
            }
        }
    }
}

/// Every object of every render, and deploy/uninstall.yaml, against the Kubernetes 1.34 schemas
/// (strict: no unknown field). PodMonitor, which they do not know, is checked in
/// `overridden_values`.
#[test]
fn objects_validate_against_kubernetes_1_34() {
    let validate = tool(&setup::kubernetes_validate_bin()).to_path_buf();
    let dir = scratch_dir("validate");
    let mut renders = vec![(Vec::new(), Vec::new())];
    renders.extend(variants());
    let mut files = Vec::new();
    let mut objects = 0;
    for (i, (values, sets)) in renders.iter().enumerate() {
        let manifests: Vec<Manifest> = render(values, sets)
            .expect("the chart renders")
            .into_iter()
            .filter(|m| m.kind != "PodMonitor")
            .collect();
        objects += manifests.len();
        let file = dir.join(format!("render-{i}.yaml"));
        std::fs::write(&file, template(&manifests)).unwrap();
        files.push(file);
    }
    // The uninstall DaemonSet, kept beside the chart by hand.
    files.push(workspace_root().join("deploy/uninstall.yaml"));
    objects += 1;
    let out = Command::new(&validate)
        .args(["--kubernetes-version", "1.34.0", "--strict"])
        .args(&files)
        .output()
        .expect("running kubernetes-validate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{stdout}\n{stderr}"
    );
    let passed = stdout
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert_eq!(
        passed, objects,
        "every object validated:\n{stdout}\n{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn helm(args: &[&str]) -> String {
    let helm = tool(Path::new(setup::HELM));
    let home = std::env::temp_dir().join("weft-chart-helm-home");
    let out = Command::new(helm)
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The renderer is faithful: Helm renders every variant to the same bytes.
#[test]
fn helm_renders_the_same() {
    let chart_dir = workspace_root().join(CHART_DIR);
    let chart_dir = chart_dir.to_str().unwrap();
    let mut renders = vec![(Vec::new(), Vec::new())];
    renders.extend(variants());
    for (files, sets) in renders {
        let mut args = vec!["template", RELEASE, chart_dir, "--namespace", NAMESPACE];
        for f in &files {
            args.extend(["--values", f.to_str().unwrap()]);
        }
        for s in &sets {
            args.extend(["--set", s.as_str()]);
        }
        let want = helm(&args);
        let have = template(&render(&files, &sets).expect("the chart renders"));
        if have != want {
            let line = have.lines().zip(want.lines()).position(|(a, b)| a != b);
            let context = |s: &str| {
                let l = line.unwrap_or(0);
                s.lines()
                    .skip(l.saturating_sub(3))
                    .take(6)
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            panic!(
                "cargo xtask chart and helm differ for {files:?} {sets:?} at line {:?}:\n\
                 --- xtask\n{}\n--- helm\n{}",
                line.map(|l| l + 1),
                context(&have),
                context(&want)
            );
        }
    }
    helm(&["lint", "--strict", chart_dir]);
    helm(&[
        "lint",
        "--strict",
        chart_dir,
        "--values",
        everything_values().to_str().unwrap(),
    ]);
}

#[test]
fn set_and_merge_like_helm() {
    let chart = chart();
    let values = chart
        .values(
            &[],
            &[
                "a.b=1,a.c=true,a.d=null,e={x,y}".into(),
                "f[1]=z".into(),
                "g=0755".into(),
                r"h=a\,b".into(),
                "resources.limits=null".into(),
            ],
        )
        .unwrap();
    let y = |s: &str| serde_yaml_ng::from_str::<Yaml>(s).unwrap();
    assert_eq!(values["a"], y("{b: 1, c: true}"));
    assert_eq!(values["e"], y("[x, y]"));
    assert_eq!(values["f"], y("[null, z]"));
    assert_eq!(values["g"], "0755");
    assert_eq!(values["h"], "a,b");
    assert_eq!(
        values["resources"],
        y("{requests: {cpu: 100m, memory: 128Mi}}")
    );
    assert_eq!(values["namespace"]["name"], NAMESPACE);
}

#[test]
fn unknown_functions_are_refused() {
    let sources = vec![("t".to_string(), "{{ upper \"x\" }}".to_string())];
    let err = super::funcs::template_set("t", &sources[0].1, &sources)
        .map(|_| ())
        .unwrap_err();
    assert!(err.contains("upper"), "{err}");
}

/// The values tables of the chart's README and docs/install.md name every value of values.yaml
/// (a key stands for what is under it), and no other.
#[test]
fn values_tables_cover_every_value() {
    fn leaves(prefix: &str, v: &Yaml, out: &mut Vec<String>) {
        match v.as_mapping() {
            Some(m) if !m.is_empty() => {
                for (k, v) in m {
                    let k = k.as_str().expect("string keys");
                    let path = if prefix.is_empty() {
                        k.to_string()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(&path, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut values = Vec::new();
    leaves("", &chart().defaults, &mut values);
    let under = |path: &str, key: &str| path == key || path.starts_with(&format!("{key}."));
    for doc in ["deploy/helm/weft/README.md", "docs/install.md"] {
        let text = std::fs::read_to_string(workspace_root().join(doc)).expect(doc);
        let keys: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("| `"))
            .flat_map(|l| {
                l.split('|')
                    .nth(1)
                    .unwrap_or("")
                    .split(',')
                    .map(|k| k.trim().trim_matches('`'))
            })
            .collect();
        for value in &values {
            assert!(
                keys.iter().any(|k| under(value, k)),
                "{doc}: {value} is not in the values table"
            );
        }
        for key in &keys {
            assert!(
                values.iter().any(|v| under(v, key)),
                "{doc}: {key} is not a value of the chart"
            );
        }
    }
}
