//! Privileged integration tests of the eBPF capture (`weft::capture`).
//!
//! Needs root, a cgroup v2 hierarchy (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts), and `ip` (iproute2). Each test
//! builds its own world, named after the test and the process id so tests can run in parallel:
//!
//! * a network namespace whose `lo` carries 10.250.0.1 (the proxy, also the node's address),
//!   10.250.0.2 (a service), 10.250.0.3 (a pod server) and 10.250.0.200 (an excluded network),
//!   with a "proxy" listener on 10.250.0.1:15001 and "direct" listeners on 0.0.0.0:8080 and
//!   0.0.0.0:9090;
//! * a cgroup subtree under `/sys/fs/cgroup/unified/weft-cap-<test>-<pid>` (the attach point),
//!   with a pod cgroup and a container cgroup below it;
//! * a bpffs pin directory `/sys/fs/bpf/weft-cap-<test>-<pid>`.
//!
//! "Pod" processes are this test binary re-executed (tests `client_helper` and `server_helper`):
//! the child joins the requested cgroup first, then enters the network namespace, and connects
//! and reports which listener answered, or listens until its stdin closes. Everything is removed
//! on drop, also when a test panics.

use std::{
    collections::{HashMap, HashSet},
    fs::{self, File},
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, SystemTime},
};

use socket2::{Domain, Protocol, Socket, Type};
use weft::capture::{Capture, CaptureConfig, Redirect, StrictMode};

const HELPER_ENV: &str = "WEFT_CAPTURE_TEST_CLIENT";
const SERVER_ENV: &str = "WEFT_CAPTURE_TEST_SERVER";
const PROXY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 250, 0, 1), 15001);
const SERVICE: &str = "10.250.0.2:8080";
const TIMEOUT: Duration = Duration::from_secs(5);

/// The cgroup v2 mount: `/sys/fs/cgroup` on a pure v2 host, `/sys/fs/cgroup/unified` on a hybrid one.
fn cgroup2_root() -> PathBuf {
    let pure = Path::new("/sys/fs/cgroup");
    if pure.join("cgroup.controllers").exists() {
        pure.to_path_buf()
    } else {
        pure.join("unified")
    }
}

/// Not a test on its own: the "pod" process of the tests below (a no-op unless re-executed).
#[test]
fn client_helper() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let mut cgroup = None;
    let mut netns = None;
    let mut target = None;
    let mut burst = None;
    for part in spec.split(';') {
        match part.split_once('=') {
            Some(("cgroup", v)) => cgroup = Some(v.to_owned()),
            Some(("netns", v)) => netns = Some(v.to_owned()),
            Some(("target", v)) => target = Some(v.parse::<SocketAddr>().expect("target")),
            Some(("burst", v)) => burst = Some(v.parse::<usize>().expect("burst")),
            _ => panic!("bad helper spec {spec:?}"),
        }
    }
    // The cgroup first: entering the netns does not change what /sys shows, but keep the order
    // the real test cluster uses.
    fs::write(
        Path::new(&cgroup.expect("cgroup")).join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("joining the cgroup");
    enter_netns(&netns.expect("netns"));
    let target = target.expect("target");
    if let Some(n) = burst {
        // `n` connects as fast as they can be made: each started without waiting for the
        // handshake, and closed.
        let result = (0..n).try_for_each(|_| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_nonblocking(true)?;
            match socket.connect(&target.into()) {
                Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => Err(e),
                _ => Ok(()),
            }
        });
        match result {
            Ok(()) => println!("\nRESULT connects={n}"),
            Err(err) => println!("\nRESULT error={err}"),
        }
        return;
    }
    let result = (|| -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        let local = stream.local_addr()?;
        let peer = stream.peer_addr()?;
        let mut tag = String::new();
        stream.read_to_string(&mut tag)?;
        Ok(format!("local={local} peer={peer} tag={tag}"))
    })();
    match result {
        Ok(line) => println!("\nRESULT {line}"),
        Err(err) => println!("\nRESULT error={err}"),
    }
}

/// Not a test on its own: a "pod" server for the tests below (a no-op unless re-executed).
/// Listens on every `listen` address, answers each connection with its local port, prints
/// `READY` once listening and exits when its stdin closes.
#[test]
fn server_helper() {
    let Ok(spec) = std::env::var(SERVER_ENV) else {
        return;
    };
    let mut cgroup = None;
    let mut netns = None;
    let mut listen = Vec::new();
    for part in spec.split(';') {
        match part.split_once('=') {
            Some(("cgroup", v)) => cgroup = Some(v.to_owned()),
            Some(("netns", v)) => netns = Some(v.to_owned()),
            Some(("listen", v)) => listen.extend(
                v.split(',')
                    .map(|a| a.parse::<SocketAddr>().expect("listen")),
            ),
            _ => panic!("bad helper spec {spec:?}"),
        }
    }
    // The cgroup first: a socket belongs to the cgroup its creator was in at the time.
    fs::write(
        Path::new(&cgroup.expect("cgroup")).join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("joining the cgroup");
    enter_netns(&netns.expect("netns"));
    for addr in listen {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let _ = stream.write_all(addr.port().to_string().as_bytes());
            }
        });
    }
    println!("\nREADY");
    io::stdout().flush().unwrap();
    let _ = io::copy(&mut io::stdin(), &mut io::sink());
    std::process::exit(0);
}

fn enter_netns(name: &str) {
    let ns = File::open(format!("/run/netns/{name}")).expect("opening netns");
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// What a pod process saw.
#[derive(Debug)]
struct Client {
    local: SocketAddr,
    tag: String,
}

/// One test's cgroups, network namespace and pin directory; removed on drop.
struct World {
    name: String,
    top: PathBuf,
    pin_dir: PathBuf,
    accepted: mpsc::Receiver<(SocketAddr, SocketAddr)>,
}

impl World {
    fn new(test: &str) -> World {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the capture tests need root (eBPF, cgroups, network namespaces)"
        );
        let name = format!("weft-cap-{test}-{}", std::process::id());
        let top = cgroup2_root().join(&name);
        let pin_dir = Path::new("/sys/fs/bpf").join(&name);
        // Remove leftovers of an earlier run with the same pid.
        let _ = Capture::remove_pins(&pin_dir);
        remove_cgroup_tree(&top);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();

        fs::create_dir(&top).unwrap_or_else(|e| panic!("creating {}: {e}", top.display()));
        let (tx, accepted) = mpsc::channel();
        let world = World {
            name,
            top,
            pin_dir,
            accepted,
        };
        ip(&["netns", "add", &world.name]);
        ip(&["-n", &world.name, "link", "set", "lo", "up"]);
        for addr in [
            "10.250.0.1/32",
            "10.250.0.2/32",
            "10.250.0.3/32",
            "10.250.0.200/32",
        ] {
            ip(&["-n", &world.name, "addr", "add", addr, "dev", "lo"]);
        }
        world.serve(tx);
        world
    }

    /// Creates `rel` (and its parents) under the test's cgroup; returns its path.
    fn cgroup(&self, rel: &str) -> PathBuf {
        let path = self.top.join(rel);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        path
    }

    fn config(&self, cgroup_root: &Path) -> CaptureConfig {
        CaptureConfig {
            cgroup_root: cgroup_root.to_owned(),
            bpffs: self.pin_dir.clone(),
            proxy_addr: PROXY,
            exclude_ports: vec![9090],
            exclude_cidrs: vec!["10.250.0.192/26".parse().unwrap()],
        }
    }

    /// Listeners inside the namespace: the proxy reports each accepted (peer, local) pair.
    fn serve(&self, accepted: mpsc::Sender<(SocketAddr, SocketAddr)>) {
        let ns = self.name.clone();
        let (proxy, direct) = thread::spawn(move || {
            enter_netns(&ns);
            let proxy = TcpListener::bind(PROXY).expect("binding the proxy listener");
            let direct = ["0.0.0.0:8080", "0.0.0.0:9090"]
                .map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("binding {a}: {e}")));
            (proxy, direct)
        })
        .join()
        .unwrap();
        thread::spawn(move || {
            for stream in proxy.incoming() {
                let Ok(mut stream) = stream else { continue };
                let pair = (stream.peer_addr().unwrap(), stream.local_addr().unwrap());
                if accepted.send(pair).is_err() {
                    return;
                }
                let _ = stream.write_all(b"proxy");
            }
        });
        for listener in direct {
            thread::spawn(move || {
                for mut stream in listener.incoming().flatten() {
                    let _ = stream.write_all(b"direct");
                }
            });
        }
    }

    /// Runs the client helper as a pod process in `cgroup` (its options after `target`);
    /// returns the fields of the line it printed after `RESULT`.
    fn run_client(&self, cgroup: &Path, target: &str, more: &str) -> HashMap<String, String> {
        let spec = format!(
            "cgroup={};netns={};target={target}{more}",
            cgroup.display(),
            self.name
        );
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "client_helper",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, spec)
            .output()
            .expect("running the client helper");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
            .unwrap_or_else(|| {
                panic!(
                    "client helper printed no result: {stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let fields: HashMap<String, String> = line
            .split(' ')
            .filter_map(|f| f.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        if let Some(err) = fields.get("error") {
            panic!(
                "connect to {target} from {} failed: {err}",
                cgroup.display()
            );
        }
        fields
    }

    /// Runs a pod process in `cgroup` that connects to `target`.
    fn connect_from(&self, cgroup: &Path, target: &str) -> Client {
        let fields = self.run_client(cgroup, target, "");
        Client {
            local: fields["local"].parse().unwrap(),
            tag: fields["tag"].clone(),
        }
    }

    /// Runs a pod process in `cgroup` that starts `n` connects to `target` and closes them.
    fn burst_from(&self, cgroup: &Path, target: &str, n: usize) {
        let fields = self.run_client(cgroup, target, &format!(";burst={n}"));
        assert_eq!(fields["connects"], n.to_string());
    }

    /// Connects from `cgroup` and expects the proxy to answer; returns what `take_redirect`
    /// says about the accepted connection.
    fn redirected(&self, capture: &Capture, cgroup: &Path, target: &str) -> Redirect {
        let (peer, local) = self.expect_proxy(cgroup, target);
        let redirect = capture
            .take_redirect(peer, local)
            .unwrap_or_else(|| panic!("no redirect record for {peer} -> {local} ({target})"));
        assert_eq!(
            capture.take_redirect(peer, local),
            None,
            "take_redirect must consume the record"
        );
        redirect
    }

    /// Connects from `cgroup` and expects the proxy to answer; returns the accepted pair.
    fn expect_proxy(&self, cgroup: &Path, target: &str) -> (SocketAddr, SocketAddr) {
        let client = self.connect_from(cgroup, target);
        assert_eq!(client.tag, "proxy", "{target} should have been redirected");
        let (peer, local) = self.accepted.recv_timeout(TIMEOUT).expect("proxy accept");
        // (An IPv4-mapped IPv6 client sees its own address as ::ffff:a.b.c.d.)
        let client_local = SocketAddr::new(client.local.ip().to_canonical(), client.local.port());
        assert_eq!(peer, client_local, "the proxy sees the pod's own address");
        assert_eq!(local, SocketAddr::V4(PROXY));
        (peer, local)
    }

    /// Starts a pod server process in `cgroup` listening on `listen`; stopped on drop.
    fn serve_in(&self, cgroup: &Path, listen: &[&str]) -> Server {
        let spec = format!(
            "cgroup={};netns={};listen={}",
            cgroup.display(),
            self.name,
            listen.join(",")
        );
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "server_helper",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SERVER_ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("running the server helper");
        let stdout = child.stdout.take().unwrap();
        let server = Server(child);
        let ready = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l == "READY");
        assert!(ready, "the server helper did not start");
        server
    }

    /// Connects from `src` (an address in the namespace, any port) to `target` with a 1 s
    /// connect timeout; returns what the server answered.
    fn dial(&self, src: Ipv4Addr, target: &str) -> io::Result<String> {
        self.dial_from(src, 0, target)
    }

    /// [`World::dial`] from source port `port` (0: any).
    fn dial_from(&self, src: Ipv4Addr, port: u16, target: &str) -> io::Result<String> {
        let ns = self.name.clone();
        let target: SocketAddr = target.parse().unwrap();
        thread::spawn(move || {
            enter_netns(&ns);
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            socket.bind(&SocketAddr::from((src, port)).into())?;
            socket.connect_timeout(&target.into(), Duration::from_secs(1))?;
            let mut stream = TcpStream::from(socket);
            stream.set_read_timeout(Some(TIMEOUT))?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok(answer)
        })
        .join()
        .unwrap()
    }

    fn expect_direct(&self, cgroup: &Path, target: &str) {
        let client = self.connect_from(cgroup, target);
        assert_eq!(
            client.tag,
            "direct",
            "{target} from {} should not have been redirected",
            cgroup.display()
        );
    }
}

/// A server process in a pod; killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Err(err) = Capture::remove_pins(&self.pin_dir) {
            eprintln!("removing {}: {err:#}", self.pin_dir.display());
        }
        remove_cgroup_tree(&self.top);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn remove_cgroup_tree(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    if let Err(err) = fs::remove_dir(dir) {
        eprintln!("removing cgroup {}: {err}", dir.display());
    }
}

fn cgroup_id(path: &Path) -> u64 {
    fs::metadata(path).unwrap().ino()
}

fn own_cgroup_id() -> u64 {
    let cgroup = fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = cgroup.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    cgroup_id(&cgroup2_root().join(own.trim().trim_start_matches('/')))
}

fn enrolled(ids: &[u64]) -> HashSet<u64> {
    ids.iter().copied().collect()
}

#[test]
fn redirects_enrolled_pods_and_survives_restart() {
    let world = World::new("main");
    let root = world.top.clone();
    let pod = world.cgroup("pod");
    let ctr = world.cgroup("pod/ctr");
    let other = world.cgroup("other");
    let cfg = world.config(&root);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();

    let capture = Capture::attach(&cfg).expect("attach");
    let status = capture.status();
    assert!(!status.reused_pins);
    assert_eq!(status.attach_point, root);
    assert_eq!(status.pin_path, world.pin_dir);
    let names: Vec<_> = status.programs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "weft_connect4",
            "weft_connect6",
            "weft_sock_ops",
            "weft_ingress"
        ]
    );
    assert!(
        status.programs.iter().all(|p| p.attached && p.id != 0),
        "{status:?}"
    );
    for pin in ["link_weft_connect4", "ENROLLED", "BY_TUPLE", "EVENTS"] {
        assert!(world.pin_dir.join(pin).exists(), "{pin} not pinned");
    }
    let mut events = {
        let _rt = rt.enter();
        capture.events().expect("events")
    };

    // Nothing enrolled yet.
    world.expect_direct(&ctr, SERVICE);

    // The test process's own cgroup (standing in for the proxy's) is never enrolled.
    capture
        .set_enrolled(&enrolled(&[cgroup_id(&pod), own_cgroup_id()]))
        .unwrap();
    let enrolled_map = capture.status().maps;
    let enrolled_map = enrolled_map.iter().find(|m| m.name == "ENROLLED").unwrap();
    assert_eq!(enrolled_map.entries, 1);
    // A process in a container cgroup below the enrolled pod cgroup is redirected, and the
    // redirect names the pod cgroup.
    let before = SystemTime::now();
    let r = world.redirected(&capture, &ctr, SERVICE);
    assert_eq!(r.original_dst, SERVICE.parse().unwrap());
    assert_eq!(r.cgroup_id, cgroup_id(&pod));
    assert_ne!(r.cookie, 0);
    let event = rt
        .block_on(async { tokio::time::timeout(TIMEOUT, events.recv()).await })
        .expect("redirect event")
        .expect("event channel open");
    assert_eq!(event.redirect, r);
    let skew = event
        .time
        .duration_since(before - Duration::from_secs(1))
        .expect("event time before the connect");
    assert!(skew < Duration::from_secs(30), "event time off by {skew:?}");

    // A destination nothing listens on or routes to (a Service VIP) reaches the proxy too.
    let r = world.redirected(&capture, &ctr, "10.96.0.10:80");
    assert_eq!(r.original_dst, "10.96.0.10:80".parse().unwrap());
    // IPv4-mapped IPv6 through connect6; reported as IPv4.
    let r = world.redirected(&capture, &ctr, "[::ffff:10.250.0.2]:8080");
    assert_eq!(r.original_dst, SERVICE.parse().unwrap());
    assert_eq!(r.cgroup_id, cgroup_id(&pod));

    // Not redirected: other cgroup, loopback, the proxy's address, excluded port and CIDR.
    world.expect_direct(&other, SERVICE);
    world.expect_direct(&ctr, "127.0.0.1:8080");
    world.expect_direct(&ctr, "10.250.0.1:8080");
    world.expect_direct(&ctr, "10.250.0.2:9090");
    world.expect_direct(&ctr, "10.250.0.200:8080");

    let counters = capture.status().counters;
    let c = |name: &str| counters[name];
    assert_eq!(c("redirected"), 3, "{counters:?}");
    assert_eq!(c("tuple_recorded"), 3, "{counters:?}");
    assert_eq!(c("not_enrolled"), 2, "{counters:?}");
    assert_eq!(c("excluded"), 4, "{counters:?}");
    assert_eq!(c("connect_seen"), 9, "{counters:?}");
    assert_eq!(c("events_dropped"), 0, "{counters:?}");
    assert_eq!(c("strict_dropped"), 0, "{counters:?}");
    let prog_ids: Vec<u32> = status.programs.iter().map(|p| p.id).collect();

    // The proxy goes away without detaching: redirection continues, and the record of a
    // connection made meanwhile is still there for the next proxy.
    drop(events);
    drop(capture);
    let (peer, local) = world.expect_proxy(&ctr, SERVICE);

    let capture = Capture::attach(&cfg).expect("re-attach");
    let status = capture.status();
    assert!(status.reused_pins, "{status:?}");
    assert_eq!(
        status.programs.iter().map(|p| p.id).collect::<Vec<_>>(),
        prog_ids
    );
    assert!(status.programs.iter().all(|p| p.attached));
    let r = capture
        .take_redirect(peer, local)
        .expect("record of the connection made while the proxy was down");
    assert_eq!(r.original_dst, SERVICE.parse().unwrap());
    assert_eq!(status.counters["redirected"], 4);
    let enrolled_map = status.maps.iter().find(|m| m.name == "ENROLLED").unwrap();
    assert_eq!(enrolled_map.entries, 1);

    // A restart with other settings updates them: now 8080 is excluded, 9090 is not.
    drop(capture);
    let cfg = CaptureConfig {
        exclude_ports: vec![8080],
        ..cfg
    };
    let capture = Capture::attach(&cfg).expect("re-attach with new exclusions");
    assert!(capture.status().reused_pins);
    world.expect_direct(&ctr, SERVICE);
    let r = world.redirected(&capture, &ctr, "10.250.0.2:9090");
    assert_eq!(r.original_dst, "10.250.0.2:9090".parse().unwrap());

    // Un-enrolling stops redirection.
    capture.set_enrolled(&HashSet::new()).unwrap();
    world.expect_direct(&ctr, "10.250.0.2:9090");
    capture.set_enrolled(&enrolled(&[cgroup_id(&pod)])).unwrap();

    // Detaching removes the programs and the pins.
    capture.detach_and_unpin().expect("detach");
    assert!(!world.pin_dir.exists(), "pins left behind");
    world.expect_direct(&ctr, "10.250.0.2:9090");
}

/// Whether `epoll` reports an event within `timeout`.
fn woken(epoll: &std::os::fd::OwnedFd, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut event = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: one event buffer of one entry, valid for the call.
    let n = unsafe {
        libc::epoll_wait(
            epoll.as_raw_fd(),
            &mut event,
            1,
            timeout.as_millis() as libc::c_int,
        )
    };
    assert!(n >= 0, "epoll_wait: {}", io::Error::last_os_error());
    n == 1
}

/// The programs wake the ring's reader once a quarter of the ring waits, and not before: a
/// burst of redirects is read while it lasts, and the connects of a quiet pod cost no wake-up.
#[test]
fn a_filling_event_ring_wakes_its_reader() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let world = World::new("wake");
    let root = world.top.clone();
    let pod = world.cgroup("pod");
    let capture = Capture::attach(&world.config(&root)).expect("attach");
    capture.set_enrolled(&enrolled(&[cgroup_id(&pod)])).unwrap();

    // A reader of the pinned ring of its own (the capture's is not started here), waiting as
    // the proxy's does: edge-triggered, so only a wake-up reports new records.
    let map = aya::maps::MapData::from_pin(world.pin_dir.join("EVENTS")).expect("pinned ring");
    let mut ring = aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(map)).expect("ring");
    // SAFETY: epoll_create1 returns a new descriptor (checked) that nothing else owns.
    let epoll = unsafe {
        let fd = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        assert!(fd >= 0, "epoll_create1: {}", io::Error::last_os_error());
        OwnedFd::from_raw_fd(fd)
    };
    let mut interest = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET) as u32,
        u64: 0,
    };
    // SAFETY: both descriptors are open; the event is read during the call only.
    let added = unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            ring.as_raw_fd(),
            &mut interest,
        )
    };
    assert_eq!(added, 0, "epoll_ctl: {}", io::Error::last_os_error());
    assert!(!woken(&epoll, Duration::ZERO), "the ring starts empty");

    // A record is 8 bytes of header and the event, rounded up to 8 bytes.
    let record = (std::mem::size_of::<weft_common::RedirectEvent>() + 8).next_multiple_of(8);
    let quarter = (weft_common::EVENTS_WAKE_BYTES as usize).div_ceil(record);
    world.burst_from(&pod, SERVICE, quarter - 1);
    assert!(
        !woken(&epoll, Duration::from_millis(300)),
        "{} records woke the reader, below a quarter of the ring",
        quarter - 1
    );
    world.burst_from(&pod, SERVICE, 1);
    assert!(
        woken(&epoll, TIMEOUT),
        "the record that made a quarter of the ring did not wake the reader"
    );
    let mut read = 0;
    while let Some(item) = ring.next() {
        assert_eq!(
            item.len(),
            std::mem::size_of::<weft_common::RedirectEvent>()
        );
        read += 1;
    }
    assert_eq!(read, quarter);
    let counters = capture.status().counters;
    assert_eq!(counters["redirected"], quarter as u64, "{counters:?}");
    assert_eq!(counters["events_dropped"], 0, "{counters:?}");
    drop(ring);
    capture.detach_and_unpin().expect("detach");
}

#[test]
fn stale_pins_are_replaced() {
    let world = World::new("stale");
    let a = world.cgroup("a");
    let a_pod = world.cgroup("a/pod");
    let b = world.cgroup("b");
    let b_pod = world.cgroup("b/pod");

    let capture = Capture::attach(&world.config(&a)).expect("attach to a");
    capture
        .set_enrolled(&enrolled(&[cgroup_id(&a_pod), cgroup_id(&b_pod)]))
        .unwrap();
    world.redirected(&capture, &a_pod, SERVICE);
    drop(capture);

    // Same pin directory, another attach point: the pinned links do not fit and are replaced
    // (detached, not merely unpinned), and the maps start empty.
    let capture = Capture::attach(&world.config(&b)).expect("attach to b");
    let status = capture.status();
    assert!(!status.reused_pins);
    assert_eq!(status.attach_point, b);
    assert!(status.programs.iter().all(|p| p.attached), "{status:?}");
    assert_eq!(status.counters["redirected"], 0);
    capture
        .set_enrolled(&enrolled(&[cgroup_id(&a_pod), cgroup_id(&b_pod)]))
        .unwrap();
    world.expect_direct(&a_pod, SERVICE);
    let r = world.redirected(&capture, &b_pod, SERVICE);
    assert_eq!(r.cgroup_id, cgroup_id(&b_pod));

    // Broken pins: a link pin removed by hand.
    drop(capture);
    fs::remove_file(world.pin_dir.join("link_weft_sock_ops")).unwrap();
    let capture = Capture::attach(&world.config(&b)).expect("attach over broken pins");
    assert!(!capture.status().reused_pins);
    capture
        .set_enrolled(&enrolled(&[cgroup_id(&b_pod)]))
        .unwrap();
    let r = world.redirected(&capture, &b_pod, SERVICE);
    assert_eq!(r.cgroup_id, cgroup_id(&b_pod));
    assert_eq!(capture.status().counters["redirected"], 1);
    capture.detach_and_unpin().unwrap();
}

/// Replaces the attachment pinned in `pin_dir` by one of a build whose redirect-event ring is
/// `ring_bytes` large: the same programs, loaded with the other pinned maps (and what they
/// hold) and a ring of that size, attached beside the old links before those are let go of.
fn attach_as_build_with_ring(pin_dir: &Path, cgroup_root: &Path, ring_bytes: u32) {
    use aya::programs::{links::FdLink, links::PinnedLink, CgroupSkb, CgroupSockAddr, SockOps};
    use aya::programs::{CgroupAttachMode, Program};
    use weft_common::names;
    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft"));
    let ring = pin_dir.join(names::EVENTS);
    let ring_tmp = pin_dir.join("EVENTS_other_build");
    let mut loader = aya::EbpfLoader::new();
    loader.map_max_entries(names::EVENTS, ring_bytes);
    loader.map_pin_path(names::EVENTS, &ring_tmp);
    // Every other map pinned (links apart) is the other build's too.
    let maps: Vec<String> = fs::read_dir(pin_dir)
        .expect("pin directory")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with(names::LINK_PIN_PREFIX) && n != names::EVENTS)
        .collect();
    for name in &maps {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    let mut ebpf = loader.load(OBJECT).expect("loading the object");
    let cgroup = File::open(cgroup_root).expect("cgroup");
    let mut links = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        use std::os::fd::AsFd;
        let link = match program {
            Program::CgroupSockAddr(p) => {
                let p: &mut CgroupSockAddr = p;
                p.load().unwrap();
                let id = p.attach(cgroup.as_fd(), CgroupAttachMode::Single).unwrap();
                FdLink::try_from(p.take_link(id).unwrap()).unwrap()
            }
            Program::SockOps(p) => {
                let p: &mut SockOps = p;
                p.load().unwrap();
                let id = p.attach(cgroup.as_fd(), CgroupAttachMode::Single).unwrap();
                FdLink::try_from(p.take_link(id).unwrap()).unwrap()
            }
            Program::CgroupSkb(p) => {
                let p: &mut CgroupSkb = p;
                p.load().unwrap();
                let kind = (*p.expected_attach_type()).unwrap();
                let id = p
                    .attach(cgroup.as_fd(), kind, CgroupAttachMode::Single)
                    .unwrap();
                FdLink::try_from(p.take_link(id).unwrap()).unwrap()
            }
            other => panic!("unexpected program {name}: {:?}", other.prog_type()),
        };
        links.push((name.to_owned(), link));
    }
    // The old links go (the last reference to a link detaches it), the new ones take their pins.
    for (name, link) in links {
        let pin = pin_dir.join(format!("{}{name}", names::LINK_PIN_PREFIX));
        drop(
            PinnedLink::from_pin(&pin)
                .expect("old link")
                .unpin()
                .unwrap(),
        );
        link.pin(&pin).expect("pinning the link");
    }
    fs::rename(&ring_tmp, &ring).expect("the other build's ring in place");
}

/// A build whose redirect ring is another size than the pinned one's makes the ring anew and
/// keeps the other maps: the pods stay enrolled and STRICT enforced, without a window, and the
/// programs it attaches write to the new ring while the old ones are gone.
#[test]
fn a_map_of_another_size_is_made_anew_and_the_rest_kept() {
    let world = World::new("resize");
    let root = world.top.clone();
    let pod = world.cgroup("pod");
    let capture = Capture::attach(&world.config(&root)).expect("attach");
    capture.set_enrolled(&enrolled(&[cgroup_id(&pod)])).unwrap();
    capture
        .set_strict(&strict(&[(&pod, 7070, StrictMode::Strict)]))
        .unwrap();
    drop(capture);
    let other = 2 * weft_common::EVENTS_BYTES;
    attach_as_build_with_ring(&world.pin_dir, &root, other);
    let ring_pin = world.pin_dir.join("EVENTS");
    let ring_size = || {
        aya::maps::MapInfo::from_pin(&ring_pin)
            .expect("pinned ring")
            .max_entries()
    };
    assert_eq!(ring_size(), other);
    // The other build's programs redirect, and record in their ring.
    let old_ring = aya::maps::MapData::from_pin(&ring_pin).expect("pinned ring");
    let mut old_ring =
        aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(old_ring)).expect("ring");
    let _accepted = world.expect_proxy(&pod, SERVICE);
    assert!(
        old_ring.next().is_some(),
        "the other build's ring holds its redirect"
    );

    let capture = Capture::attach(&world.config(&root)).expect("attach over the other build");
    let status = capture.status();
    assert!(!status.reused_pins, "{status:?}");
    assert!(status.programs.iter().all(|p| p.attached), "{status:?}");
    assert_eq!(ring_size(), weft_common::EVENTS_BYTES);
    let entries = |name: &str| {
        capture
            .status()
            .maps
            .into_iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} in status"))
            .entries
    };
    assert_eq!(entries("ENROLLED"), 1, "the enrolled pods are kept");
    assert_eq!(entries("STRICT"), 1, "STRICT is kept");

    // Redirected without enrolling again, recorded in the new ring only.
    let ring = aya::maps::MapData::from_pin(&ring_pin).expect("pinned ring");
    let mut ring = aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(ring)).expect("ring");
    let r = world.redirected(&capture, &pod, SERVICE);
    assert_eq!(r.cgroup_id, cgroup_id(&pod));
    assert!(ring.next().is_some(), "the redirect is in the new ring");
    assert!(ring.next().is_none(), "one program redirected it, not two");
    assert!(
        old_ring.next().is_none(),
        "the other build's programs are detached"
    );
    drop((ring, old_ring));
    capture.detach_and_unpin().expect("detach");
}

fn strict(entries: &[(&Path, u16, StrictMode)]) -> HashMap<(u64, u16), StrictMode> {
    entries
        .iter()
        .map(|&(cgroup, port, mode)| ((cgroup_id(cgroup), port), mode))
        .collect()
}

#[test]
fn strict_pods_refuse_plaintext_from_other_sources() {
    let world = World::new("strict");
    let pod = world.cgroup("pod");
    let ctr = world.cgroup("pod/ctr");
    let other = world.cgroup("other");
    let cfg = world.config(&world.top);
    let node = *PROXY.ip();
    let outsider = Ipv4Addr::new(10, 250, 0, 2);
    let loopback = Ipv4Addr::LOCALHOST;

    let capture = Capture::attach(&cfg).expect("attach");
    let status = capture.status();
    let ingress = status
        .programs
        .iter()
        .find(|p| p.name == "weft_ingress")
        .expect("weft_ingress in status");
    assert!(ingress.attached && ingress.id != 0, "{status:?}");
    for pin in ["link_weft_ingress", "STRICT"] {
        assert!(world.pin_dir.join(pin).exists(), "{pin} not pinned");
    }
    let strict_map = |capture: &Capture| {
        capture
            .status()
            .maps
            .into_iter()
            .find(|m| m.name == "STRICT")
            .expect("STRICT in status")
            .entries
    };
    let dropped = |capture: &Capture| capture.counters()["strict_dropped"];

    // A pod server (not enrolled: enforcement does not depend on it) on an IPv4 socket for two
    // ports, and a dual-stack IPv6 socket that gets IPv4 connections as IPv4-mapped.
    let _server = world.serve_in(&ctr, &["0.0.0.0:7070", "0.0.0.0:7071", "[::]:7072"]);
    let open = |capture: &Capture, src: Ipv4Addr, target: &str| {
        let before = dropped(capture);
        let port = target.rsplit(':').next().unwrap();
        match world.dial(src, target) {
            Ok(answer) => assert_eq!(answer, port, "{src} -> {target}"),
            Err(err) => panic!("{src} -> {target} should connect: {err}"),
        }
        assert_eq!(
            dropped(capture),
            before,
            "{src} -> {target}: counted as dropped"
        );
    };
    let refused = |capture: &Capture, src: Ipv4Addr, target: &str| {
        let before = dropped(capture);
        match world.dial(src, target) {
            Err(err) if err.kind() == io::ErrorKind::TimedOut => {}
            other => panic!("{src} -> {target} should time out (SYN dropped), got {other:?}"),
        }
        assert!(dropped(capture) > before, "{src} -> {target}: not counted");
    };

    // Nothing STRICT yet.
    open(&capture, outsider, "10.250.0.3:7070");

    // STRICT pod: only loopback gets through, on every port and both socket families; the
    // node's address earns nothing by itself. The entry is on the pod cgroup; the server lives
    // in a container below.
    capture
        .set_node_addresses(&[node].into_iter().collect())
        .unwrap();
    capture
        .set_strict(&strict(&[
            (&pod, 0, StrictMode::Strict),
            (&other, 7071, StrictMode::NotStrict),
        ]))
        .unwrap();
    assert_eq!(strict_map(&capture), 2);
    refused(&capture, outsider, "10.250.0.3:7070");
    refused(&capture, outsider, "10.250.0.3:7071");
    refused(&capture, outsider, "10.250.0.3:7072");
    refused(&capture, node, "10.250.0.3:7070");
    refused(&capture, node, "10.250.0.3:7072");
    open(&capture, loopback, "127.0.0.1:7070");

    // weft's own connection, announced before its SYN, gets in from any address; the entry
    // is for that source port and destination only, and is gone once withdrawn.
    let target: std::net::SocketAddrV4 = "10.250.0.3:7070".parse().unwrap();
    capture.announce_delivery(47001, target).unwrap();
    assert_eq!(
        world.dial_from(outsider, 47001, "10.250.0.3:7070").unwrap(),
        "7070"
    );
    assert!(world.dial_from(outsider, 47002, "10.250.0.3:7070").is_err());
    capture.delivered(47001, target);
    capture.announce_delivery(47003, target).unwrap();
    capture.delivered(47003, target);
    assert!(world.dial_from(outsider, 47003, "10.250.0.3:7070").is_err());

    // A probe port: the node's addresses get in there, others still do not.
    capture
        .set_strict(&strict(&[
            (&pod, 0, StrictMode::Strict),
            (&pod, 7070, StrictMode::StrictProbe),
        ]))
        .unwrap();
    open(&capture, node, "10.250.0.3:7070");
    refused(&capture, outsider, "10.250.0.3:7070");
    refused(&capture, node, "10.250.0.3:7071");

    // A per-port PERMISSIVE/DISABLE override lets its port through; the others stay STRICT.
    capture
        .set_strict(&strict(&[
            (&pod, 0, StrictMode::Strict),
            (&pod, 7071, StrictMode::NotStrict),
        ]))
        .unwrap();
    assert_eq!(strict_map(&capture), 2);
    open(&capture, outsider, "10.250.0.3:7071");
    refused(&capture, outsider, "10.250.0.3:7070");

    // A STRICT port of a pod that is not STRICT by default.
    capture
        .set_strict(&strict(&[
            (&pod, 0, StrictMode::NotStrict),
            (&pod, 7070, StrictMode::Strict),
        ]))
        .unwrap();
    refused(&capture, outsider, "10.250.0.3:7070");
    open(&capture, outsider, "10.250.0.3:7071");

    // Enforcement goes on while the proxy is down, and a restart re-uses the pinned program and
    // keeps the entries.
    capture
        .set_strict(&strict(&[(&pod, 0, StrictMode::Strict)]))
        .unwrap();
    let prog_ids: Vec<u32> = capture.status().programs.iter().map(|p| p.id).collect();
    let before = dropped(&capture);
    drop(capture);
    assert!(world.dial(outsider, "10.250.0.3:7070").is_err());
    let capture = Capture::attach(&cfg).expect("re-attach");
    let status = capture.status();
    assert!(status.reused_pins, "{status:?}");
    assert_eq!(
        status.programs.iter().map(|p| p.id).collect::<Vec<_>>(),
        prog_ids
    );
    assert!(dropped(&capture) > before);
    assert_eq!(strict_map(&capture), 1);
    refused(&capture, outsider, "10.250.0.3:7071");
    refused(&capture, node, "10.250.0.3:7071");

    // No longer STRICT: everyone gets through again.
    capture.set_strict(&HashMap::new()).unwrap();
    assert_eq!(strict_map(&capture), 0);
    open(&capture, outsider, "10.250.0.3:7070");
    open(&capture, outsider, "10.250.0.3:7072");

    capture.detach_and_unpin().expect("detach");
}
