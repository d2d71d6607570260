//! Tests of the cluster-on-one-machine harness itself (no weft involved).

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use std::time::Instant;
use weft_tests::traffic::{
    self, grpc_call, http, http_load, json_str as s, serve_grpc, serve_https, websocket,
};
use weft_tests::{
    cgroup, labels, netns, server_certs, wait_for_tcp, CgroupDriver, Cluster, Dns, InNetns, Pod,
    PodSpec, Qos, ServiceSpec,
};

const T: Duration = Duration::from_secs(10);

fn testpod() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft-testpod"))
}

fn serve(pod: &Pod, port: u16, mode: &str, name: &str) -> weft_tests::Proc {
    let listen = format!("0.0.0.0:{port}");
    let p = pod
        .spawn(testpod().args(["serve", "--listen", &listen, "--mode", mode, "--name", name]))
        .unwrap();
    wait_for_tcp(pod, pod.addr(port), T).unwrap();
    p
}

/// Run `weft-testpod call` from `from`, return (exit code, stdout, stderr).
fn call(from: &Pod, addr: &str, text: &str) -> (i32, String, String) {
    let out = from
        .output(testpod().args(["call", addr, "--send", text, "--timeout-ms", "5000"]))
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn same_file(a: &Path, b: &Path) -> bool {
    let (a, b) = (std::fs::metadata(a).unwrap(), std::fs::metadata(b).unwrap());
    a.dev() == b.dev() && a.ino() == b.ino()
}

fn pid_alive(pid: u32) -> bool {
    // A zombie (not yet reaped) counts as dead.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s[s.rfind(')').unwrap() + 2..].chars().next();
            state != Some('Z') && state != Some('X')
        })
        .unwrap_or(false)
}

/// Everything a cluster id owns on the machine.
fn leftovers(id: &str) -> Vec<String> {
    let mut v: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("wt{id}-")))
        .collect();
    let cg = weft_tests::cgroup::unified_root().join(format!("weft-test-{id}"));
    if cg.exists() {
        v.push(cg.display().to_string());
    }
    let marker = PathBuf::from(format!("/run/weft-tests/{id}"));
    if marker.exists() {
        v.push(marker.display().to_string());
    }
    v
}

#[test]
fn cross_node_pod_to_pod_sees_client_pod_ip() {
    let c = Cluster::new("cross_node").unwrap();
    let a = c.add_node("node-a").unwrap();
    let b = c.add_node("node-b").unwrap();
    assert_eq!(a.ip().to_string(), "172.30.0.11");
    assert_eq!(b.ip().to_string(), "172.30.0.12");
    let client = c.add_pod(&a, PodSpec::new("default", "client")).unwrap();
    let server = c
        .add_pod(&b, PodSpec::new("default", "server").port("tcp", 8080))
        .unwrap();
    assert_eq!(client.ip().to_string(), "10.244.1.2");
    assert_eq!(server.ip().to_string(), "10.244.2.2");
    let _srv = serve(&server, 8080, "whoami", "server");
    let (code, out, err) = call(&client, &server.addr(8080).to_string(), "hello");
    assert_eq!(code, 0, "stderr: {err}");
    let lines: Vec<&str> = out.split('\n').collect();
    assert_eq!(lines[0], "name=server");
    assert!(
        lines[1].starts_with(&format!("peer={}:", client.ip())),
        "server saw {out:?}"
    );
    assert_eq!(lines[2], "hello");
}

#[test]
fn pod_to_pod_same_node_and_load() {
    let c = Cluster::new("same_node").unwrap();
    let n = c.add_node("node-1").unwrap();
    let p1 = c.add_pod(&n, PodSpec::new("ns1", "one")).unwrap();
    let p2 = c.add_pod(&n, PodSpec::new("ns2", "two")).unwrap();
    let _srv = serve(&p2, 9000, "whoami", "two");
    let (code, out, err) = call(&p1, &p2.addr(9000).to_string(), "x");
    assert_eq!(code, 0, "stderr: {err}");
    assert!(out.contains(&format!("peer={}:", p1.ip())), "{out:?}");

    let out = p1
        .output(testpod().args([
            "load",
            &p2.addr(9000).to_string(),
            "--conns",
            "50",
            "--parallel",
            "5",
            "--tag",
            "t1",
        ]))
        .unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["ok"], 50, "{summary}");
    assert_eq!(summary["failed"], 0);
    assert_eq!(summary["backends"]["two"], 50);
    assert!(out.status.success());
}

#[test]
fn node_reaches_its_pod_from_node_ip() {
    let c = Cluster::new("node_to_pod").unwrap();
    let n = c.add_node("node-1").unwrap();
    let p = c.add_pod(&n, PodSpec::new("default", "web")).unwrap();
    let _srv = serve(&p, 8080, "whoami", "web");
    let out = n
        .output(testpod().args(["call", &p.addr(8080).to_string(), "--send", "hi"]))
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(s.contains(&format!("peer={}:", n.ip())), "{s:?}");
}

#[test]
fn call_exit_codes() {
    let c = Cluster::new("exit_codes").unwrap();
    let n = c.add_node("node-1").unwrap();
    let p = c.add_pod(&n, PodSpec::new("default", "a")).unwrap();
    let q = c.add_pod(&n, PodSpec::new("default", "b")).unwrap();
    // Nothing listens: refused → 2.
    let (code, _, err) = call(&p, &q.addr(1234).to_string(), "x");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("connect"), "{err}");
    // A listener that never answers → timeout → 3 (nc-like: accept, never read/close).
    let listener = weft_tests::netns::in_netns(q.netns_name(), || {
        std::net::TcpListener::bind("0.0.0.0:4321")
    })
    .unwrap()
    .unwrap();
    let out = p
        .output(testpod().args([
            "call",
            &q.addr(4321).to_string(),
            "--send",
            "x",
            "--timeout-ms",
            "300",
        ]))
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    drop(listener);
}

#[test]
fn processes_join_cgroup_then_netns() {
    let c = Cluster::new("cgroups").unwrap();
    let n = c.add_node("node-1").unwrap();
    let cases = [
        (
            CgroupDriver::Systemd,
            Qos::BestEffort,
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod",
        ),
        (
            CgroupDriver::Systemd,
            Qos::Burstable,
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod",
        ),
        (
            CgroupDriver::Systemd,
            Qos::Guaranteed,
            "kubepods.slice/kubepods-pod",
        ),
        (
            CgroupDriver::Cgroupfs,
            Qos::BestEffort,
            "kubepods/besteffort/pod",
        ),
        (CgroupDriver::Cgroupfs, Qos::Guaranteed, "kubepods/pod"),
    ];
    for (i, (driver, qos, prefix)) in cases.into_iter().enumerate() {
        let pod = c
            .add_pod(
                &n,
                PodSpec::new("default", &format!("p{i}"))
                    .qos(qos)
                    .driver(driver),
            )
            .unwrap();
        let rel = pod
            .container_cgroup()
            .strip_prefix(n.cgroup_root())
            .unwrap();
        let rel = rel.to_str().unwrap();
        assert!(rel.starts_with(prefix), "{rel} vs {prefix}");
        let uid_part = match driver {
            CgroupDriver::Systemd => pod.uid().replace('-', "_"),
            CgroupDriver::Cgroupfs => pod.uid().to_string(),
        };
        assert!(rel.contains(&uid_part), "{rel}");
        let leaf = rel.rsplit('/').next().unwrap();
        match driver {
            CgroupDriver::Systemd => {
                assert_eq!(leaf, format!("cri-containerd-{}.scope", pod.container_id()))
            }
            CgroupDriver::Cgroupfs => assert_eq!(leaf, pod.container_id()),
        }

        let mut proc = pod.spawn(Command::new("sleep").arg("30")).unwrap();
        let pid = proc.pid();
        // Through the unified hierarchy entry (0::/…), as the process sees it.
        assert_eq!(
            cgroup::of_pid(pid).unwrap(),
            cgroup::relative(pod.container_cgroup())
        );
        assert!(cgroup::procs(pod.container_cgroup()).contains(&pid));
        assert!(
            cgroup::procs(pod.pod_cgroup()).is_empty(),
            "no internal processes"
        );
        assert!(same_file(
            Path::new(&format!("/proc/{pid}/ns/net")),
            &pod.netns_path()
        ));
        proc.kill();
        assert!(!pid_alive(pid));
    }

    // A pod's own view: its cgroup file and its interfaces.
    let pod = c.pod("default", "p0").unwrap();
    let out = pod
        .output(Command::new("cat").arg("/proc/self/cgroup"))
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l == format!("0::{}", cgroup::relative(pod.container_cgroup()))),
        "{text}"
    );
    let out = pod.output(Command::new("ip").args(["-o", "addr"])).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("eth0    inet {}/32", pod.ip())),
        "{text}"
    );

    // Node processes: node netns, system cgroup outside the node's cgroup root.
    let proc = n.spawn(Command::new("sleep").arg("30")).unwrap();
    let cg = cgroup::of_pid(proc.pid()).unwrap();
    assert_eq!(cg, cgroup::relative(n.system_cgroup()));
    assert!(!Path::new(&cg).starts_with(cgroup::relative(n.cgroup_root())));
    assert!(!n.system_cgroup().starts_with(n.cgroup_root()));
    assert!(same_file(
        Path::new(&format!("/proc/{}/ns/net", proc.pid())),
        &n.netns_path()
    ));
    assert_eq!(
        netns::read_sysctl(n.netns_name(), "net.ipv4.ip_forward").unwrap(),
        "1"
    );
    assert_eq!(
        netns::read_sysctl(
            n.netns_name(),
            &format!("net.ipv4.conf.{}.proxy_arp", pod.host_veth())
        )
        .unwrap(),
        "1"
    );
}

#[test]
fn teardown_removes_everything() {
    let c = Cluster::new("teardown").unwrap();
    let id = c.id().to_string();
    let n = c.add_node("node-1").unwrap();
    let p = c.add_pod(&n, PodSpec::new("default", "a")).unwrap();
    let proc = p.spawn(Command::new("sleep").arg("60")).unwrap();
    let pid = proc.pid();
    // A grandchild the harness did not start directly: dies with the cgroup.
    let out = p
        .output(Command::new("sh").args(["-c", "setsid sleep 60 >/dev/null 2>&1 & echo $!"]))
        .unwrap();
    let grandchild: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(pid_alive(grandchild));
    std::mem::forget(proc); // the cluster must clean up even processes nobody killed
    assert!(!leftovers(&id).is_empty());
    drop(c);
    assert_eq!(leftovers(&id), Vec::<String>::new());
    assert!(!pid_alive(pid));
    assert!(!pid_alive(grandchild));
}

#[test]
fn teardown_after_panic() {
    let id = std::sync::Mutex::new(String::new());
    let r = std::panic::catch_unwind(|| {
        let c = Cluster::new("teardown_panic").unwrap();
        *id.lock().unwrap() = c.id().to_string();
        let n = c.add_node("node-1").unwrap();
        let p = c.add_pod(&n, PodSpec::new("default", "a")).unwrap();
        let _proc = p.spawn(Command::new("sleep").arg("60")).unwrap();
        panic!("deliberate");
    });
    assert!(r.is_err());
    let id = id.into_inner().unwrap();
    assert_eq!(id.len(), 6);
    assert_eq!(leftovers(&id), Vec::<String>::new());
}

#[test]
fn parallel_clusters_do_not_collide() {
    let ids: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|i| {
                s.spawn(move || {
                    let c = Cluster::new(&format!("parallel{i}")).unwrap();
                    let a = c.add_node("node-a").unwrap();
                    let b = c.add_node("node-b").unwrap();
                    let client = c.add_pod(&a, PodSpec::new("default", "client")).unwrap();
                    let server = c.add_pod(&b, PodSpec::new("default", "server")).unwrap();
                    // Same addresses in both clusters; each must reach its own server.
                    let name = format!("server-of-{}", c.id());
                    let _srv = serve(&server, 8080, "whoami", &name);
                    for _ in 0..5 {
                        let (code, out, err) = call(&client, &server.addr(8080).to_string(), "p");
                        assert_eq!(code, 0, "{err}");
                        assert!(out.starts_with(&format!("name={name}\n")), "{out:?}");
                    }
                    c.id().to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_ne!(ids[0], ids[1]);
    for id in &ids {
        assert_eq!(leftovers(id), Vec::<String>::new());
    }
}

#[test]
fn registry_yaml_describes_the_cluster() {
    let c = Cluster::new("registry").unwrap();
    let a = c.add_node("node-a").unwrap();
    let b = c.add_node("node-b").unwrap();
    let web = c
        .add_pod(
            &b,
            PodSpec::new("shop", "web-0")
                .label("app", "web")
                .service_account("web-sa")
                .qos(Qos::Burstable)
                .port("http", 8080),
        )
        .unwrap();
    c.add_pod(&a, PodSpec::new("default", "client")).unwrap();
    let svc = c
        .add_service(
            ServiceSpec::new("shop", "web")
                .selector("app", "web")
                .port("http", 80, "http", Some("http"))
                .port("raw", 9000, 9000, None),
        )
        .unwrap();
    assert_eq!(svc.cluster_ip.to_string(), "10.96.0.10");
    c.set_namespace_labels("shop", labels(&[("weft.dev/mesh", "enabled")]))
        .unwrap();
    c.apply_yaml(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny\n  namespace: shop\nspec: {}\n",
    )
    .unwrap();

    let path = c.logs_dir().join("registry.yaml");
    c.sync_registry_to(&path).unwrap();
    let docs =
        weft_tests::registry::parse_documents(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    let ns = find("Namespace", "shop");
    assert_eq!(ns["metadata"]["labels"]["weft.dev/mesh"], "enabled");
    find("Namespace", "default");
    let node = find("Node", "node-b");
    assert_eq!(node["status"]["addresses"][0]["type"], "InternalIP");
    assert_eq!(
        node["status"]["addresses"][0]["address"],
        b.ip().to_string()
    );
    let pod = find("Pod", "web-0");
    assert_eq!(pod["metadata"]["uid"], web.uid());
    assert_eq!(pod["metadata"]["namespace"], "shop");
    assert_eq!(pod["metadata"]["labels"]["app"], "web");
    assert_eq!(pod["spec"]["nodeName"], "node-b");
    assert_eq!(pod["spec"]["serviceAccountName"], "web-sa");
    assert_eq!(pod["spec"]["containers"][0]["ports"][0]["name"], "http");
    assert_eq!(
        pod["spec"]["containers"][0]["ports"][0]["containerPort"],
        8080
    );
    assert_eq!(pod["status"]["podIP"], web.ip().to_string());
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(pod["status"]["qosClass"], "Burstable");
    assert_eq!(pod["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(pod["status"]["conditions"][0]["status"], "True");
    let s = find("Service", "web");
    assert_eq!(s["spec"]["clusterIP"], "10.96.0.10");
    assert_eq!(s["spec"]["selector"]["app"], "web");
    assert_eq!(s["spec"]["ports"][0]["port"], 80);
    assert_eq!(s["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(s["spec"]["ports"][0]["appProtocol"], "http");
    assert_eq!(s["spec"]["ports"][1]["targetPort"], 9000);
    assert!(s["spec"]["ports"][1].get("appProtocol").is_none());
    find("AuthorizationPolicy", "deny");

    // Changes are written through.
    c.set_pod_labels(&web, labels(&[("app", "web"), ("version", "v2")]))
        .unwrap();
    c.set_pod_ready(&web, false).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let docs = weft_tests::registry::parse_documents(&text).unwrap();
    let pod = docs
        .iter()
        .find(|d| d["kind"] == "Pod" && d["metadata"]["name"] == "web-0")
        .unwrap();
    assert_eq!(pod["metadata"]["labels"]["version"], "v2");
    assert_eq!(pod["status"]["conditions"][0]["status"], "False");
    assert!(c
        .delete_object("AuthorizationPolicy", "shop", "deny")
        .unwrap());
    assert!(!c.registry_yaml().contains("AuthorizationPolicy"));

    // Removing a pod removes its netns, cgroup and registry entry.
    let netns_path = web.netns_path();
    let pod_cg = web.pod_cgroup().to_path_buf();
    c.remove_pod(&web).unwrap();
    assert!(!netns_path.exists());
    assert!(!pod_cg.exists());
    assert!(!c.registry_yaml().contains("web-0"));
}

/// Not a test on its own: run by `cleanup_stale_removes_dead_runs` in a child process, which
/// builds a cluster and dies without cleaning up.
#[test]
#[ignore]
fn stale_helper_dies_without_cleanup() {
    if std::env::var_os("WEFT_TESTS_STALE_HELPER").is_none() {
        return;
    }
    let c = Cluster::new("stale_helper").unwrap();
    let n = c.add_node("node-1").unwrap();
    let p = c.add_pod(&n, PodSpec::new("default", "a")).unwrap();
    let proc = p.spawn(Command::new("sleep").arg("120")).unwrap();
    println!("STALE id={} pid={}", c.id(), proc.pid());
    std::mem::forget(proc);
    std::process::abort();
}

#[test]
fn cleanup_stale_removes_dead_runs() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "stale_helper_dies_without_cleanup",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WEFT_TESTS_STALE_HELPER", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.split_once("STALE ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("helper output: {text}"));
    let id = line
        .split_whitespace()
        .next()
        .unwrap()
        .strip_prefix("id=")
        .unwrap();
    let pid: u32 = line.split_whitespace().nth(1).unwrap()[4..]
        .parse()
        .unwrap();
    assert!(!out.status.success(), "helper must have aborted");
    let report = weft_tests::cleanup_stale().unwrap();
    // (Another test process may have cleaned it up first: only the end state is asserted.)
    let _ = report;
    assert_eq!(leftovers(id), Vec::<String>::new());
    assert!(!pid_alive(pid), "the dead run's pod process is killed");

    // Live clusters are left alone.
    let c = Cluster::new("stale_live").unwrap();
    weft_tests::cleanup_stale().unwrap();
    assert!(!leftovers(c.id()).is_empty());
    let set: BTreeSet<String> = netns::list().into_iter().collect();
    assert!(set.contains(c.fabric_netns()));
}

#[test]
fn binaries() {
    let w = weft_tests::weft_bin();
    assert_eq!(w.file_name().unwrap(), "weft");
    assert_eq!(
        weft_tests::testpod_bin(),
        PathBuf::from(env!("CARGO_BIN_EXE_weft-testpod"))
    );
}

#[test]
fn testpod_http_mode() {
    let c = Cluster::new("http_mode").unwrap();
    let n = c.add_node("node-1").unwrap();
    let client = c.add_pod(&n, PodSpec::new("default", "client")).unwrap();
    let web = c.add_pod(&n, PodSpec::new("default", "web")).unwrap();
    let _srv = serve(&web, 8080, "http", "web-1");
    let addr = web.addr(8080).to_string();
    let run = |args: &[&str]| {
        let out = client
            .output(testpod().arg("http").arg(&addr).args(args))
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = run(&["--path", "/hello?x=1", "-H", "x-test: yes", "--include"]);
    assert!(out.starts_with("status=200\n"), "{out}");
    assert!(out.contains("< x-testpod-name: web-1\n"), "{out}");
    assert!(out.contains("name=web-1\n"), "{out}");
    assert!(out.contains(&format!("peer={}:", client.ip())), "{out}");
    assert!(out.contains("path=/hello?x=1\n"), "{out}");
    assert!(out.contains("header x-test: yes\n"), "{out}");
    let out = run(&["--path", "/status/503"]);
    assert!(out.starts_with("status=503\n"), "{out}");
    let out = run(&["--method", "POST", "--data", "abc"]);
    assert!(
        out.contains("method=POST\n") && out.contains("body-bytes=3\n"),
        "{out}"
    );

    // Keep-alive: two pipelined requests on one connection.
    let two =
        "GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let (code, out, err) = call(&client, &addr, two);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert!(
        out.contains("path=/a\n") && out.contains("path=/b\n"),
        "{out}"
    );

    // Chunked request bodies are read.
    let chunked = "POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    let (code, out, _) = call(&client, &addr, chunked);
    assert_eq!(code, 0);
    assert!(out.contains("body-bytes=5\n"), "{out}");
}

/// The example of tests/README.md, kept compiling and passing.
#[test]
fn readme_example() {
    use weft_tests::{testpod_bin, ServiceSpec};
    let c = Cluster::new("readme_example").unwrap();
    let (a, b) = (c.add_node("node-a").unwrap(), c.add_node("node-b").unwrap());
    let client = c.add_pod(&a, PodSpec::new("default", "client")).unwrap();
    let server = c
        .add_pod(
            &b,
            PodSpec::new("default", "server")
                .label("app", "srv")
                .port("tcp", 8080),
        )
        .unwrap();
    let svc = c
        .add_service(
            ServiceSpec::new("default", "srv")
                .selector("app", "srv")
                .port("tcp", 80, 8080, None),
        )
        .unwrap();
    c.set_namespace_labels("default", labels(&[("weft.dev/mesh", "enabled")]))
        .unwrap();
    c.sync_registry_to(&c.default_registry_path()).unwrap();
    let _srv = server
        .spawn(Command::new(testpod_bin()).args([
            "serve",
            "--listen",
            "0.0.0.0:8080",
            "--mode",
            "whoami",
            "--name",
            "srv",
        ]))
        .unwrap();
    wait_for_tcp(&client, server.addr(8080), Duration::from_secs(10)).unwrap();
    let out = client
        .output(Command::new(testpod_bin()).args([
            "call",
            &server.addr(8080).to_string(),
            "--send",
            "hi",
        ]))
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("peer={}:", client.ip())));
    assert_eq!(svc.addr(80).to_string(), "10.96.0.10:80");
    assert!(std::fs::read_to_string(c.default_registry_path())
        .unwrap()
        .contains("weft.dev/mesh: enabled"));
}

// ---- The L7 tools: testpod HTTP/h2c/TLS/WebSocket, the gRPC echo, dnsmasq ----------------------

/// Two pods on one node: (cluster, client, server).
fn kit_cluster(name: &str) -> (Cluster, Pod, Pod) {
    let c = Cluster::new(name).unwrap();
    let n = c.add_node("node-1").unwrap();
    let client = c.add_pod(&n, PodSpec::new("kit", "client")).unwrap();
    let server = c.add_pod(&n, PodSpec::new("kit", "server")).unwrap();
    (c, client, server)
}

/// testpod's HTTP server speaks HTTP/1.1 and h2c on one port, TLS with the SNI echoed, and
/// WebSocket; `http-load` keeps one connection; `ws` checks the accept key.
#[test]
fn testpod_http_server_speaks_h1_h2c_tls_and_websocket() {
    let (c, client, server) = kit_cluster("kit_http");
    let _http = traffic::serve(&server, 9080, "http");
    let tls = server_certs(&c.logs_dir().join("tls"), &["external.example.test"]).unwrap();
    let _https = serve_https(&server, 8443, &tls);
    let addr = server.addr(9080);

    let r = http(
        &client,
        addr,
        &["--path", "/p?q=1", "-H", "x-test: 1", "--host", "h.test"],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-backend"), Some("server"));
    assert_eq!(r.seen("name"), Some("server"));
    assert_eq!(r.seen("path"), Some("/p?q=1"));
    assert_eq!(r.seen("host"), Some("h.test"));
    assert_eq!(r.seen("proto"), Some("HTTP/1.1"));
    assert_eq!(r.seen("method"), Some("GET"));
    assert!(r
        .seen("peer")
        .unwrap()
        .starts_with(&client.ip().to_string()));
    assert_eq!(r.seen_header("x-test"), vec!["1"]);
    assert_eq!(r.seen("sni"), None);
    assert_eq!(http(&client, addr, &["--path", "/status/418"]).status, 418);
    let started = Instant::now();
    assert_eq!(http(&client, addr, &["--path", "/delay/300"]).status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    for args in [vec![], vec!["--http2"]] {
        let s = http_load(&client, addr, 50, &args);
        assert_eq!(
            (s.ok, s.failed, s.connections, s.status(200)),
            (50, 0, 1, 50),
            "{args:?}: {s:?}"
        );
        assert_eq!(s.backends.get("server"), Some(&50), "{s:?}");
    }
    let s = http_load(&client, addr, 5, &["--path", "/status/503", "--http2"]);
    assert_eq!(s.status(503), 5, "{s:?}");

    let curl = |args: &[&str]| {
        let out = client
            .output(
                Command::new("curl")
                    .args(["-sS", "-i", "--max-time", "5"])
                    .args(args),
            )
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = curl(&["--http2-prior-knowledge", &format!("http://{addr}/h2")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(
        out.contains("proto=HTTP/2\n") && out.contains("path=/h2\n"),
        "{out}"
    );
    assert!(
        out.contains(&format!("host={addr}\n")),
        ":authority as host: {out}"
    );

    let resolve = format!("external.example.test:8443:{}", server.ip());
    let url = "https://external.example.test:8443/tls";
    let ca = tls.ca.display().to_string();
    let (code, out) = curl(&["--cacert", &ca, "--resolve", &resolve, url]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("sni=external.example.test\n"), "{out}");
    assert!(out.contains("host=external.example.test:8443\n"), "{out}");
    assert!(out.contains("path=/tls\n"), "{out}");
    let (code, out) = curl(&["--resolve", &resolve, url]);
    assert_ne!(
        code, 0,
        "a client that does not trust the CA refuses: {out}"
    );

    let (code, out) = websocket(&client, addr, &["--path", "/ws"], "raw bytes back");
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("status=101\n"), "{out}");
    assert!(out.contains("< x-backend: server\n"), "{out}");
    assert!(out.contains("echo=raw bytes back\n"), "{out}");
}

/// The gRPC echo answers unary and streaming calls and ends with the status asked for, with
/// trailing metadata; a call to nothing ends UNAVAILABLE.
#[test]
fn grpc_echo_answers_unary_streaming_and_errors() {
    let (_c, client, server) = kit_cluster("kit_grpc");
    let _g = serve_grpc(&server, 50051);
    let addr = server.addr(50051);
    let r = grpc_call(&client, addr, "Say", "hello", Some("echo.test"));
    assert_eq!(s(&r, "/code"), "OK", "{r}");
    assert_eq!(r["messages"], serde_json::json!(["server|hello"]), "{r}");
    assert_eq!(s(&r, "/trailing_metadata/x-backend"), "server", "{r}");
    let r = grpc_call(&client, addr, "Count", "3", None);
    assert_eq!(
        r["messages"],
        serde_json::json!(["server|1", "server|2", "server|3"]),
        "{r}"
    );
    let r = grpc_call(&client, addr, "Fail", "PERMISSION_DENIED:go away", None);
    assert_eq!(
        (s(&r, "/code"), s(&r, "/details")),
        ("PERMISSION_DENIED", "go away"),
        "{r}"
    );
    assert_eq!(
        s(&r, "/trailing_metadata/x-detail"),
        "failed-on-purpose",
        "{r}"
    );
    let r = grpc_call(&client, server.addr(50052), "Say", "x", None);
    assert_eq!(s(&r, "/code"), "UNAVAILABLE", "{r}");
}

/// dnsmasq in a pod answers what `Dns::set` last said, with the TTL asked for, to a client in
/// another netns.
#[test]
fn dns_server_answers_from_its_hosts_file() {
    let (_c, client, server) = kit_cluster("kit_dns");
    let dns = Dns::in_pod(&server, Duration::from_secs(2)).unwrap();
    let ask = |host: &str| {
        weft_tests::dns::query_from(
            client.netns_name(),
            dns.addr(),
            host,
            Duration::from_secs(2),
        )
        .unwrap()
    };
    let (one, two) = (
        std::net::Ipv4Addr::new(10, 244, 1, 50),
        std::net::Ipv4Addr::new(10, 244, 1, 51),
    );
    dns.set("external.example.test", one).unwrap();
    let got = ask("external.example.test");
    assert_eq!(
        (got.rcode, got.addrs.clone(), got.ttl),
        (0, vec![one], Some(2))
    );
    dns.set("external.example.test", two).unwrap();
    assert_eq!(ask("external.example.test").addrs, vec![two]);
    dns.set_all("other.example.test", &[one, two]).unwrap();
    let mut both = ask("other.example.test").addrs;
    both.sort();
    assert_eq!(both, vec![one, two]);
    assert!(ask("unknown.example.test").addrs.is_empty());
    assert!(
        dns.log().contains(&format!(
            "query[A] external.example.test from {}",
            client.ip()
        )),
        "{}",
        dns.log()
    );
}
