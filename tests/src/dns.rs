//! A DNS server for tests: Debian's dnsmasq in a pod's or node's network namespace, answering A
//! records from a hosts file the test rewrites ([`Dns::set`]), with a short TTL so a changed
//! answer takes effect soon. Also a hand-written A query (no resolver library, no `/etc` files:
//! neither follows a netns) to check what it answers.
//!
//! Imports: the harness's pods, nodes, processes and netns entry.

use crate::netns::{self, InNetns};
use crate::node::Node;
use crate::pod::Pod;
use crate::process::Proc;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const DNSMASQ: &str = "/usr/sbin/dnsmasq";
const READY: Duration = Duration::from_secs(10);

/// A dnsmasq serving `<ip>:53` from a hosts file. Killed (with its process group) on drop.
pub struct Dns {
    proc: Proc,
    hosts_file: PathBuf,
    addr: SocketAddr,
    netns: String,
    ttl: Duration,
    entries: Mutex<BTreeMap<String, Vec<Ipv4Addr>>>,
}

impl Dns {
    /// dnsmasq on the pod's address, port 53. `ttl`: the TTL of every answer (whole seconds).
    pub fn in_pod(pod: &Pod, ttl: Duration) -> Result<Dns> {
        let dir = pod
            .node()
            .state_dir()
            .join(format!("dns-{}-{}", pod.namespace(), pod.name()));
        Self::start(pod.netns_name(), pod.ip(), &dir, ttl, |c| {
            pod.spawn_group(c)
        })
    }

    /// dnsmasq on the node's address, port 53.
    pub fn on_node(node: &Node, ttl: Duration) -> Result<Dns> {
        let dir = node.state_dir().join("dns");
        Self::start(node.netns_name(), node.ip(), &dir, ttl, |c| {
            node.spawn_group(c)
        })
    }

    fn start(
        netns: &str,
        ip: Ipv4Addr,
        dir: &Path,
        ttl: Duration,
        spawn: impl FnOnce(&Command) -> Result<Proc>,
    ) -> Result<Dns> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let hosts_file = dir.join("hosts");
        std::fs::write(&hosts_file, "")?;
        let mut cmd = Command::new(DNSMASQ);
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file",
            "--bind-interfaces",
            "--port=53",
            "--log-queries",
            "--log-facility=-",
        ])
        .arg(format!("--listen-address={ip}"))
        .arg(format!("--local-ttl={}", ttl.as_secs()))
        .arg(format!("--addn-hosts={}", hosts_file.display()));
        let proc = spawn(&cmd)?;
        let dns = Dns {
            proc,
            hosts_file,
            addr: SocketAddr::from((ip, 53)),
            netns: netns.to_string(),
            ttl,
            entries: Mutex::new(BTreeMap::new()),
        };
        let deadline = Instant::now() + READY;
        while dns.query("ready.weft.test").is_err() {
            if Instant::now() > deadline {
                bail!(
                    "dnsmasq on {} not answering within {READY:?}: {}",
                    dns.addr,
                    dns.proc.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(dns)
    }

    /// `<ip>:53`: what `--dns-server` is given.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Answer `host` with `ip` (only), and wait until dnsmasq does.
    pub fn set(&self, host: &str, ip: Ipv4Addr) -> Result<()> {
        self.set_all(host, &[ip])
    }

    /// Answer `host` with these addresses (none: remove it), and wait until dnsmasq does.
    pub fn set_all(&self, host: &str, ips: &[Ipv4Addr]) -> Result<()> {
        let text = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if ips.is_empty() {
                entries.remove(host);
            } else {
                entries.insert(host.to_string(), ips.to_vec());
            }
            hosts_text(&entries)
        };
        let tmp = self.hosts_file.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.hosts_file)?;
        // SIGHUP: dnsmasq clears its cache and reads the hosts file again.
        self.proc.signal(libc::SIGHUP)?;
        let mut want = ips.to_vec();
        want.sort();
        let deadline = Instant::now() + READY;
        loop {
            let mut got = self.query(host).map(|a| a.addrs).unwrap_or_default();
            got.sort();
            if got == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("dnsmasq answers {host} with {got:?}, not {want:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// An A query for `host`, sent from the server's own netns.
    pub fn query(&self, host: &str) -> Result<Answer> {
        query_from(&self.netns, self.addr, host, Duration::from_secs(1))
    }

    /// dnsmasq's log (queries and answers).
    pub fn log(&self) -> String {
        self.proc.stderr()
    }
}

/// The hosts file dnsmasq reads: one `ip host` line per address.
pub fn hosts_text(entries: &BTreeMap<String, Vec<Ipv4Addr>>) -> String {
    let mut out = String::new();
    for (host, ips) in entries {
        for ip in ips {
            out.push_str(&format!("{ip} {host}\n"));
        }
    }
    out
}

/// What a server answered to an A query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The response code (0 NOERROR, 3 NXDOMAIN, 5 REFUSED…).
    pub rcode: u8,
    pub addrs: Vec<Ipv4Addr>,
    /// The smallest TTL of the A records, in seconds.
    pub ttl: Option<u32>,
}

/// An A query for `host` to `server` over UDP from inside `netns`.
pub fn query_from(
    netns: &str,
    server: SocketAddr,
    host: &str,
    timeout: Duration,
) -> Result<Answer> {
    let id = (std::process::id() as u16) ^ (Instant::now().elapsed().subsec_nanos() as u16);
    let q = encode_query(id, host)?;
    let resp = netns::in_netns(netns, || -> std::io::Result<Vec<u8>> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(timeout))?;
        s.send_to(&q, server)?;
        let mut buf = [0u8; 1500];
        loop {
            let (n, from) = s.recv_from(&mut buf)?;
            if from == server {
                return Ok(buf[..n].to_vec());
            }
        }
    })?
    .with_context(|| format!("DNS query for {host} to {server}"))?;
    parse_response(id, &resp)
}

/// A standard query (recursion desired) for the A record of `name`.
pub fn encode_query(id: u16, name: &str) -> Result<Vec<u8>> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            bail!("bad DNS name {name:?}");
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]); // A, IN
    Ok(q)
}

/// Skips a (possibly compressed) name at `at`; the offset after it.
fn skip_name(msg: &[u8], mut at: usize) -> Result<usize> {
    loop {
        let len = *msg.get(at).context("truncated name")? as usize;
        if len == 0 {
            return Ok(at + 1);
        }
        if len & 0xC0 == 0xC0 {
            return Ok(at + 2);
        }
        at += 1 + len;
    }
}

fn u16_at(msg: &[u8], at: usize) -> Result<u16> {
    let b = msg.get(at..at + 2).context("truncated message")?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

/// The A records of a response to query `id`.
pub fn parse_response(id: u16, msg: &[u8]) -> Result<Answer> {
    if msg.len() < 12 {
        bail!("DNS response of {} bytes", msg.len());
    }
    if u16_at(msg, 0)? != id {
        bail!("DNS response to another query");
    }
    let flags = u16_at(msg, 2)?;
    if flags & 0x8000 == 0 {
        bail!("not a DNS response");
    }
    let (qd, an) = (u16_at(msg, 4)?, u16_at(msg, 6)?);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(msg, at)? + 4;
    }
    let mut addrs = Vec::new();
    let mut ttl: Option<u32> = None;
    for _ in 0..an {
        at = skip_name(msg, at)?;
        let (ty, class) = (u16_at(msg, at)?, u16_at(msg, at + 2)?);
        let t = msg.get(at + 4..at + 8).context("truncated record")?;
        let rr_ttl = u32::from_be_bytes([t[0], t[1], t[2], t[3]]);
        let len = u16_at(msg, at + 8)? as usize;
        let data = msg
            .get(at + 10..at + 10 + len)
            .context("truncated record data")?;
        if ty == 1 && class == 1 && len == 4 {
            addrs.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
            ttl = Some(ttl.map_or(rr_ttl, |t| t.min(rr_ttl)));
        }
        at += 10 + len;
    }
    Ok(Answer {
        rcode: (flags & 0x000F) as u8,
        addrs,
        ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_one_question_for_an_a_record() {
        let q = encode_query(0xBEEF, "external.example.test.").unwrap();
        let mut want = vec![0xBE, 0xEF, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in ["external", "example", "test"] {
            want.push(l.len() as u8);
            want.extend_from_slice(l.as_bytes());
        }
        want.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(q, want);
        assert!(encode_query(1, "a..b").is_err());
        assert!(encode_query(1, &"x".repeat(64)).is_err());
    }

    /// A response as servers write it: the question repeated, answers naming it by pointer.
    fn response(id: u16, rcode: u8, answers: &[(Ipv4Addr, u32)]) -> Vec<u8> {
        let mut m = encode_query(id, "external.example.test").unwrap();
        m[2] = 0x81;
        m[3] = 0x80 | rcode;
        m[7] = answers.len() as u8;
        for (ip, ttl) in answers {
            m.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&[0, 4]);
            m.extend_from_slice(&ip.octets());
        }
        m
    }

    #[test]
    fn answers_are_read_through_name_pointers() {
        let a = Ipv4Addr::new(10, 244, 2, 5);
        let b = Ipv4Addr::new(10, 244, 2, 6);
        let got = parse_response(7, &response(7, 0, &[(a, 2), (b, 1)])).unwrap();
        assert_eq!(
            got,
            Answer {
                rcode: 0,
                addrs: vec![a, b],
                ttl: Some(1)
            }
        );
        let none = parse_response(7, &response(7, 3, &[])).unwrap();
        assert_eq!((none.rcode, none.addrs.len(), none.ttl), (3, 0, None));
    }

    #[test]
    fn foreign_or_broken_responses_are_refused() {
        let ok = response(7, 0, &[(Ipv4Addr::LOCALHOST, 2)]);
        assert!(parse_response(8, &ok).is_err(), "another id");
        assert!(parse_response(7, &ok[..ok.len() - 2]).is_err(), "truncated");
        assert!(
            parse_response(7, &encode_query(7, "x.test").unwrap()).is_err(),
            "a query"
        );
    }

    #[test]
    fn the_hosts_file_has_a_line_per_address() {
        let mut e = BTreeMap::new();
        e.insert(
            "external.example.test".to_string(),
            vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
        );
        assert_eq!(
            hosts_text(&e),
            "10.0.0.1 external.example.test\n10.0.0.2 external.example.test\n"
        );
    }
}
