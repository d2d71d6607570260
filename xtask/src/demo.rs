//! `cargo xtask demo`: a two-node cluster on this machine, weft on each node, traffic across
//! nodes in mutual TLS, a call denied by an AuthorizationPolicy, then HTTP routed per request
//! (an Istio canary split, shifted live by editing the registry) and authorized per request (an
//! L7 AuthorizationPolicy), and what `weft flows`, `weft flows --http`, `weft workloads`,
//! `weft certs` and `weft status` show about it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use weft_tests::traffic::{HttpReply, LoadSummary};
use weft_tests::{
    labels, testpod_bin, wait_for, wait_for_tcp, weft_bin, Cluster, InNetns, Pod, PodSpec, Service,
    ServiceSpec, Weft,
};

/// Where each node's weft serves Prometheus metrics: its default `--metrics-address`
/// (0.0.0.0:15020), which the harness leaves as it is, so the node IP on this port.
const METRICS_PORT: u16 = 15020;

/// The reviews Service's port, and its pods' (Istio's bookinfo uses 9080).
const REVIEWS_PORT: u16 = 9080;

/// The Host header the demo's HTTP clients send to the reviews Service.
const REVIEWS_HOST: &str = "reviews.shop.svc.cluster.local";

/// Requests per canary measurement: enough for the split to show (90/10 gives 180 ± 8 to v1
/// about 19 times in 20), few enough to take about a second.
const CANARY_REQUESTS: u64 = 200;

/// The release binaries the demo runs, each with what it is built from (relative to the
/// workspace root; a directory stands for every file below it). A change that does not reach a
/// binary (say a Cargo.lock entry it does not use) leaves it older than its sources: that only
/// costs a `cargo build` with nothing to do.
const RELEASE_BINS: [(&str, &[&str]); 2] = [
    (
        "weft",
        &[
            "proxy/src",
            "proxy/build.rs",
            "proxy/Cargo.toml",
            "common/src",
            "common/Cargo.toml",
            "ebpf/src",
            "ebpf/build.rs",
            "ebpf/Cargo.toml",
            "Cargo.toml",
            "Cargo.lock",
        ],
    ),
    (
        "weft-testpod",
        &["tests/src", "tests/Cargo.toml", "Cargo.toml", "Cargo.lock"],
    ),
];

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Leave the cluster and weft running until Ctrl-C, and print the commands that reach them
    /// (the `weft` CLI and the metrics of each node, a command in each pod). An up-to-date
    /// build in target/release is reused, as on every run [default: off: torn down at the end].
    #[arg(long)]
    keep: bool,
    /// Run target/release as it is, without `cargo build --release --bins` even when a source
    /// file is newer than a binary [default: off: build unless up to date].
    #[arg(long)]
    no_build: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::setup::run()?;
    crate::require_root("the demo creates network namespaces, cgroups and loads eBPF programs")?;
    let bins = release_build(args.no_build)?;
    std::env::set_var("WEFT_BIN", bins.join("weft"));
    std::env::set_var("WEFT_TESTPOD_BIN", bins.join("weft-testpod"));

    step(
        "A cluster on one machine: node-1 and node-2; namespace shop is in the mesh, legacy is not",
    );
    let cluster = Cluster::new("demo")?;
    let node = cluster.add_node("node-1")?;
    let node2 = cluster.add_node("node-2")?;
    let frontend = cluster.add_pod(
        &node,
        PodSpec::new("shop", "frontend").service_account("frontend"),
    )?;
    let catalog: Vec<_> = [&node, &node2]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            cluster.add_pod(
                n,
                PodSpec::new("shop", &format!("catalog-{i}"))
                    .label("app", "catalog")
                    .service_account("catalog")
                    .port("tcp", 8080),
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let payments = cluster.add_pod(
        &node2,
        PodSpec::new("shop", "payments-0")
            .label("app", "payments")
            .service_account("payments")
            .port("tcp", 8080),
    )?;
    let reviews: Vec<_> = ["v1", "v2"]
        .iter()
        .map(|v| {
            cluster.add_pod(
                &node2,
                PodSpec::new("shop", &format!("reviews-{v}"))
                    .label("app", "reviews")
                    .label("version", v)
                    .service_account("reviews")
                    .port("http", REVIEWS_PORT),
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let batch = cluster.add_pod(&node, PodSpec::new("legacy", "batch"))?;
    let svc = cluster.add_service(
        ServiceSpec::new("shop", "catalog")
            .selector("app", "catalog")
            .port("tcp", 80, "tcp", Some("tcp")),
    )?;
    let pay = cluster.add_service(
        ServiceSpec::new("shop", "payments")
            .selector("app", "payments")
            .port("tcp", 80, "tcp", Some("tcp")),
    )?;
    let orders = cluster.add_service(
        ServiceSpec::new("shop", "orders")
            .selector("app", "orders")
            .port("tcp", 80, 8080, Some("tcp")),
    )?;
    let reviews_svc = cluster.add_service(
        ServiceSpec::new("shop", "reviews")
            .selector("app", "reviews")
            .port("http", REVIEWS_PORT, REVIEWS_PORT, None),
    )?;
    cluster.set_namespace_labels("shop", labels(&[("weft.dev/mesh", "enabled")]))?;
    cluster.apply_yaml(PAYMENTS_POLICY)?;
    let mut servers = Vec::new();
    for pod in catalog.iter().chain([&payments]) {
        servers.push(pod.spawn(Command::new(testpod_bin()).args([
            "serve",
            "--listen",
            "0.0.0.0:8080",
            "--mode",
            "whoami",
            "--name",
            pod.name(),
        ]))?);
        wait_for_tcp(pod, pod.addr(8080), Duration::from_secs(10))?;
    }
    for pod in &reviews {
        servers.push(pod.spawn(Command::new(testpod_bin()).args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{REVIEWS_PORT}"),
            "--mode",
            "http",
            "--name",
            pod.name(),
        ]))?);
        wait_for_tcp(pod, pod.addr(REVIEWS_PORT), Duration::from_secs(10))?;
    }
    print_layout(&cluster);
    println!("  TCP Services (appProtocol: tcp): shop/catalog {} (catalog-0, catalog-1), shop/payments {}, shop/orders {} (no pods)", svc.addr(80), pay.addr(80), orders.addr(80));
    println!(
        "  HTTP Service (port named http): shop/reviews {} (reviews-v1, reviews-v2: labels version=v1, version=v2; they answer with x-backend: <pod>)",
        reviews_svc.addr(REVIEWS_PORT)
    );
    println!("  AuthorizationPolicy shop/payments: only cluster.local/ns/shop/sa/checkout may call payments");

    step("weft node on node-1 and node-2 (mesh CA from `weft ca init`)");
    let weft = Weft::start(&cluster, &node)?;
    let weft2 = Weft::start(&cluster, &node2)?;
    for w in [&weft, &weft2] {
        println!(
            "  {} ready: admin socket {}, metrics http://{}:{METRICS_PORT}/metrics (in the node netns)",
            w.node().name(),
            w.admin_socket().display(),
            w.node().ip()
        );
    }

    step("Traffic");
    let call = |pod: &Pod, addr: std::net::SocketAddr, what: &str| -> anyhow::Result<()> {
        let out = pod.output(Command::new(testpod_bin()).args([
            "call",
            &addr.to_string(),
            "--send",
            what,
            "--timeout-ms",
            "3000",
        ]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let answer = text
            .lines()
            .filter(|l| l.starts_with("name=") || l.starts_with("peer="))
            .collect::<Vec<_>>()
            .join(" ");
        let result = if out.status.success() {
            answer
        } else {
            format!("failed: {}", String::from_utf8_lossy(&out.stderr).trim())
        };
        println!("  {}/{} → {addr}: {result}", pod.namespace(), pod.name());
        Ok(())
    };
    for i in 0..4 {
        call(&frontend, svc.addr(80), &format!("GET /item/{i}"))?;
    }
    call(&frontend, pay.addr(80), "POST /charge")?;
    call(&frontend, orders.addr(80), "GET /orders")?;
    call(&frontend, catalog[0].addr(9090), "nothing listens here")?;
    call(&batch, catalog[1].addr(8080), "not meshed")?;
    std::thread::sleep(Duration::from_millis(300));

    step("weft flows (node-1: the calling side)");
    print!("{}", weft.cli(&["flows"])?);
    println!("  (catalog-1 and payments-0 are on node-2: reached over mutual TLS. legacy/batch is not in the mesh: its direct call is not a flow, and catalog-1 saw {} as its peer)", batch.ip());

    step("weft flows (node-2: the receiving side, identities from the peer certificates)");
    print!("{}", weft2.cli(&["flows"])?);

    step("weft flows -o json --verdict denied");
    print!(
        "{}",
        weft.cli(&["flows", "-o", "json", "--verdict", "denied"])?
    );

    let wefts = [&weft, &weft2];
    step("L7 canary: 90 % of the requests to reviews v1, 10 % to v2");
    println!(
        "  Istio's canonical canary, added to the registry ({}):",
        cluster.default_registry_path().display()
    );
    let canary = format!("{REVIEWS_SUBSETS}---\n{}", reviews_split(90, 10));
    print_yaml(&canary);
    apply_and_wait(&cluster, &wefts, &canary)?;
    canary_load(&frontend, &reviews_svc)?;

    step("Shift to 50/50: edit the two weights in the registry file");
    println!(
        "  VirtualService shop/reviews: `weight: 90` → `weight: 50`, `weight: 10` → `weight: 50`"
    );
    apply_and_wait(&cluster, &wefts, &reviews_split(50, 50))?;
    canary_load(&frontend, &reviews_svc)?;

    step("weft flows --http --last 5 (node-1: each request routed where it was made)");
    print!("{}", weft.cli(&["flows", "--http", "--last", "5"])?);
    println!(
        "  (upstream {} is reviews-v1, {} is reviews-v2, on node-2: reached over mutual TLS)",
        reviews[0].addr(REVIEWS_PORT),
        reviews[1].addr(REVIEWS_PORT)
    );

    step("L7 authorization: reviews is read-only, GET on /reviews/* only, checked by node-2 per request");
    println!("  added to the registry:");
    print_yaml(REVIEWS_READ_ONLY);
    apply_and_wait(&cluster, &wefts, REVIEWS_READ_ONLY)?;
    for (method, path) in [
        ("GET", "/reviews/1"),
        ("POST", "/reviews/1"),
        ("GET", "/admin"),
    ] {
        http_request(&frontend, &reviews_svc, method, path)?;
    }

    step("weft flows --http --status 4xx (node-2: the requests its policy denied)");
    print!("{}", weft2.cli(&["flows", "--http", "--status", "4xx"])?);

    step("weft workloads (node-1)");
    print!("{}", weft.cli(&["workloads"])?);

    step("weft certs (node-2)");
    print!("{}", weft2.cli(&["certs"])?);

    step("weft status (node-1)");
    print!("{}", weft.cli(&["status"])?);

    if args.keep {
        step("Left running (Ctrl-C tears it all down)");
        print_commands(&cluster, &[&weft, &weft2]);
        println!("  e.g. call the catalog Service from shop/frontend (enrolled: weft carries it):");
        println!(
            "    {} {} call {} --send hi",
            in_pod(&frontend),
            testpod_bin().display(),
            svc.addr(80)
        );
        println!(
            "  e.g. measure the reviews canary from shop/frontend (edit its weights in the \
             registry, run it again; the read-only policy lets GET under /reviews/ through):"
        );
        println!(
            "    {} {} http-load {} --host {REVIEWS_HOST} --path /reviews/1 --count {CANARY_REQUESTS}",
            in_pod(&frontend),
            testpod_bin().display(),
            reviews_svc.addr(REVIEWS_PORT)
        );
        println!(
            "  registry (edit it live, e.g. remove the shop label): {}",
            cluster.default_registry_path().display()
        );
        wait_for_interrupt().context("waiting for Ctrl-C")?;
    } else {
        println!(
            "\n(`cargo xtask demo --keep` leaves it running and prints how to reach each node \
             and pod)"
        );
    }
    drop(servers);
    drop(weft2);
    drop(weft);
    drop(cluster);
    Ok(())
}

const PAYMENTS_POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: payments
  namespace: shop
spec:
  selector:
    matchLabels:
      app: payments
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/shop/sa/checkout\"]
";

/// Subsets v1 and v2 of the reviews Service, by the pods' `version` label.
const REVIEWS_SUBSETS: &str = "apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
spec:
  host: reviews
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
";

/// The canary VirtualService: requests to reviews split between subsets v1 and v2 by weight.
fn reviews_split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: {v1}
    - destination:
        host: reviews
        subset: v2
      weight: {v2}
"
    )
}

/// An L7 rule: only GET requests on paths under /reviews/ reach the reviews pods.
const REVIEWS_READ_ONLY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-read-only
  namespace: shop
spec:
  selector:
    matchLabels:
      app: reviews
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: [\"GET\"]
        paths: [\"/reviews/*\"]
";

fn print_yaml(yaml: &str) {
    for line in yaml.lines() {
        println!("    {line}");
    }
}

/// Writes `yaml` into the registry file and waits until every node runs the snapshot holding
/// it; says how long that took. A node that refused an object fails the demo with its reason.
fn apply_and_wait(cluster: &Cluster, wefts: &[&Weft], yaml: &str) -> anyhow::Result<()> {
    let generation = |w: &Weft| -> anyhow::Result<u64> {
        w.status()?["registry"]["generation"]
            .as_u64()
            .context("weft status -o json: no registry.generation")
    };
    let before = wefts
        .iter()
        .map(|w| generation(w))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let written = Instant::now();
    cluster.apply_yaml(yaml)?;
    for (w, before) in wefts.iter().zip(before) {
        let status = wait_for(Duration::from_secs(10), || {
            let s = w.status().ok()?;
            (s["registry"]["generation"].as_u64()? > before).then_some(s)
        })
        .with_context(|| format!("{} did not reload the registry", w.node().name()))?;
        let registry = &status["registry"];
        let refused = [&registry["last_error"], &registry["not_applied"]]
            .into_iter()
            .filter(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
            .map(|v| v.to_string())
            .collect::<Vec<_>>();
        if !refused.is_empty() {
            bail!(
                "{} refused the change: {}",
                w.node().name(),
                refused.join("; ")
            );
        }
    }
    println!(
        "  {} running it {:.2} s after the write (the registry file is watched)",
        wefts
            .iter()
            .map(|w| w.node().name().to_string())
            .collect::<Vec<_>>()
            .join(" and "),
        written.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `weft-testpod http-load` from `client` to the reviews Service: its real output, then the
/// share each version got.
fn canary_load(client: &Pod, svc: &Service) -> anyhow::Result<()> {
    let addr = svc.addr(REVIEWS_PORT).to_string();
    let count = CANARY_REQUESTS.to_string();
    let args = [
        "http-load",
        &addr,
        "--host",
        REVIEWS_HOST,
        "--count",
        &count,
    ];
    println!(
        "  $ weft-testpod {}    # in {}/{}",
        args.join(" "),
        client.namespace(),
        client.name()
    );
    let out = client.output(Command::new(testpod_bin()).args(args))?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("  {text}");
    let summary: LoadSummary = serde_json::from_str(&text).with_context(|| {
        format!(
            "http-load printed no summary: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if summary.status(200) != CANARY_REQUESTS {
        bail!("not every request was answered with 200: {summary:?}");
    }
    let shares = summary
        .backends
        .iter()
        .map(|(name, n)| {
            format!(
                "{name} {n} ({:.1} %)",
                100.0 * *n as f64 / CANARY_REQUESTS as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let over = match summary.connections {
        1 => "one keep-alive connection".to_string(),
        n => format!("{n} connections"),
    };
    println!("  → {shares}: requests over {over}, each routed on its own");
    Ok(())
}

/// One `weft-testpod http` request from `client` to the reviews Service: who answered, or the
/// body of a refusal.
fn http_request(client: &Pod, svc: &Service, method: &str, path: &str) -> anyhow::Result<()> {
    let addr = svc.addr(REVIEWS_PORT).to_string();
    let mut args = vec!["http", &addr, "--host", REVIEWS_HOST];
    if method != "GET" {
        args.extend(["--method", method]);
    }
    args.extend(["--path", path, "--include"]);
    println!(
        "  $ weft-testpod {}    # in {}/{}",
        args.join(" "),
        client.namespace(),
        client.name()
    );
    let out = client.output(Command::new(testpod_bin()).args(args))?;
    let reply = HttpReply::parse(
        &String::from_utf8_lossy(&out.stdout),
        out.status.code().unwrap_or(-1),
        &String::from_utf8_lossy(&out.stderr),
    );
    match (reply.status, reply.header("x-backend")) {
        (0, _) => bail!("no answer (exit {}): {}", reply.exit, reply.stderr.trim()),
        (status, Some(backend)) => println!("    status={status}  x-backend: {backend}"),
        (status, None) => println!("    status={status}  {}", reply.body.trim()),
    }
    Ok(())
}

/// Each node with its IP and netns, and below it its pods with theirs.
fn print_layout(cluster: &Cluster) {
    let pods = cluster.pods();
    for node in cluster.nodes() {
        println!(
            "  {} {}  netns {}",
            node.name(),
            node.ip(),
            node.netns_name()
        );
        for pod in pods.iter().filter(|p| p.node().name() == node.name()) {
            let name = format!("{}/{}", pod.namespace(), pod.name());
            println!("    {name:<18} {:<12} netns {}", pod.ip(), pod.netns_name());
        }
    }
}

/// Copy-paste lines: the `weft` CLI against each node, each node's metrics, and a command in
/// each pod.
fn print_commands(cluster: &Cluster, wefts: &[&Weft]) {
    println!("  weft CLI against each node (also: workloads, certs, status, flows -o json):");
    for w in wefts {
        println!(
            "    WEFT_ADMIN_SOCKET={} {} flows --follow",
            w.admin_socket().display(),
            weft_bin().display()
        );
    }
    println!("  Prometheus metrics of each node (served in the node's netns):");
    for w in wefts {
        println!(
            "    nsenter --net={} curl -s http://{}:{METRICS_PORT}/metrics",
            w.node().netns_path().display(),
            w.node().ip()
        );
    }
    println!(
        "  a command in a pod (joins its container cgroup, then its netns): append the command"
    );
    for pod in cluster.pods() {
        println!("    {} <cmd>", in_pod(&pod));
    }
}

/// A shell line that runs the command written after it in `pod` the way the harness starts
/// processes there: join the pod's container cgroup, then enter its netns (`nsenter --net`;
/// `ip netns exec` would remount /sys).
fn in_pod(pod: &Pod) -> String {
    format!(
        "sh -c 'echo $$ > {}/cgroup.procs && exec nsenter --net={} \"$@\"' {}/{}",
        pod.container_cgroup().display(),
        pod.netns_path().display(),
        pod.namespace(),
        pod.name()
    )
}

/// `target/release` (or `$CARGO_TARGET_DIR/release`) holding [`RELEASE_BINS`]: built with
/// `cargo build --release --bins` unless `no_build` or every binary there is newer than every
/// file it is built from (then `cargo build` would leave them as they are).
fn release_build(no_build: bool) -> anyhow::Result<PathBuf> {
    let dir = crate::release_dir();
    let root = crate::workspace_root();
    let stale = RELEASE_BINS
        .iter()
        .find_map(|(bin, sources)| out_of_date(&dir.join(bin), &root, sources));
    match stale {
        None => eprintln!(
            "demo: {} in {} are newer than their sources: not rebuilding",
            RELEASE_BINS.map(|(bin, _)| bin).join(" and "),
            dir.display()
        ),
        Some(why) if !no_build => {
            eprintln!("demo: building: {why}");
            crate::cargo(&["build", "--release", "--bins"])?;
        }
        Some(why) => {
            if let Some((bin, _)) = RELEASE_BINS.iter().find(|(bin, _)| !dir.join(bin).exists()) {
                bail!(
                    "{} is missing (build with `cargo build --release --bins`)",
                    dir.join(bin).display()
                );
            }
            eprintln!(
                "demo: --no-build: running {} as it is, although {why}",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Why `bin` needs building: it is missing, or a file below `sources` (relative to `root`) is
/// newer. `None` when it is up to date.
fn out_of_date(bin: &Path, root: &Path, sources: &[&str]) -> Option<String> {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return Some(format!("{} is missing", bin.display()));
    };
    let newer = sources
        .iter()
        .find_map(|s| newer_file(&root.join(s), built))?;
    Some(format!(
        "{} is newer than {}",
        newer.display(),
        bin.display()
    ))
}

/// `path`, or a file below it, modified after `than`.
fn newer_file(path: &Path, than: SystemTime) -> Option<PathBuf> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_dir() {
        return meta
            .modified()
            .is_ok_and(|m| m > than)
            .then(|| path.to_path_buf());
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .find_map(|e| newer_file(&e.path(), than))
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn wait_for_interrupt() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static STOP: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn a_binary_is_out_of_date_when_missing_or_older_than_a_source() {
        let root = std::env::temp_dir().join(format!("xtask-demo-{}", std::process::id()));
        std::fs::create_dir_all(root.join("src/deep")).unwrap();
        let now = SystemTime::now();
        let touch = |p: &Path, t: SystemTime| File::create(p).unwrap().set_modified(t).unwrap();
        let (bin, source) = (root.join("bin"), root.join("src/deep/a.rs"));
        touch(&source, now - Duration::from_secs(60));
        let missing = out_of_date(&bin, &root, &["src"]).unwrap();
        assert!(missing.ends_with("bin is missing"), "{missing}");
        touch(&bin, now);
        assert_eq!(out_of_date(&bin, &root, &["src", "Cargo.lock"]), None);
        touch(&source, now + Duration::from_secs(60));
        let newer = out_of_date(&bin, &root, &["src"]).unwrap();
        assert!(newer.contains("src/deep/a.rs is newer than"), "{newer}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
