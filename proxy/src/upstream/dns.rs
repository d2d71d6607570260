//! DNS for external services (ServiceEntry `resolution: DNS` / `DNS_ROUND_ROBIN`): names are
//! resolved asynchronously and the answers cached for their TTL, so a changed record moves
//! traffic once the old answer expires. The servers are the node's (`/etc/resolv.conf`) or the
//! one given with `--dns-server`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;

/// Resolves external hosts.
pub struct Dns {
    resolver: TokioResolver,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns").finish_non_exhaustive()
    }
}

impl Dns {
    /// A resolver asking `server` (else the system's servers).
    pub fn new(server: Option<SocketAddr>) -> anyhow::Result<Dns> {
        let mut opts = ResolverOpts::default();
        // Answers are reused for their TTL and no longer: the TTL is the contract.
        opts.positive_max_ttl = None;
        opts.negative_max_ttl = Some(Duration::from_secs(5));
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        opts.ndots = 0;
        let builder = match server {
            Some(addr) => {
                let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], group),
                    TokioConnectionProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio()
                .map_err(|e| anyhow::anyhow!("reading the system's DNS configuration: {e}"))?,
        };
        Ok(Dns {
            resolver: builder.with_options(opts).build(),
        })
    }

    /// The addresses of `host` (IPv4 first), from the cache while its TTL lasts.
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        // A trailing dot: the name is absolute, never searched.
        let fqdn = if host.ends_with('.') {
            host.to_string()
        } else {
            format!("{host}.")
        };
        let answer = self
            .resolver
            .lookup_ip(fqdn)
            .await
            .map_err(|e| format!("resolving {host}: {e}"))?;
        let mut ips: Vec<IpAddr> = answer.iter().collect();
        ips.sort_by_key(|ip| ip.is_ipv6());
        if ips.is_empty() {
            return Err(format!("resolving {host}: no address"));
        }
        Ok(ips)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot DNS server answering every A query with `ip` and `ttl`.
    async fn server(ip: [u8; 4], ttl: u32) -> SocketAddr {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let q = &buf[..n];
                // Header: id, flags (response, recursion available), 1 question, 1 answer.
                let mut r = q[..2].to_vec();
                r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
                // The question as asked (it ends 4 bytes after its name's zero byte).
                let end = 12 + q[12..].iter().position(|&b| b == 0).unwrap() + 5;
                r.extend_from_slice(&q[12..end]);
                let qtype = u16::from_be_bytes([q[end - 4], q[end - 3]]);
                if qtype != 1 {
                    // Not A: answer with no records.
                    r[7] = 0;
                    sock.send_to(&r, peer).await.unwrap();
                    continue;
                }
                r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
                r.extend_from_slice(&ttl.to_be_bytes());
                r.extend_from_slice(&[0, 4]);
                r.extend_from_slice(&ip);
                sock.send_to(&r, peer).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn asks_the_given_server() {
        let addr = server([192, 0, 2, 7], 30).await;
        let dns = Dns::new(Some(addr)).unwrap();
        assert_eq!(
            dns.lookup("external.example.test").await.unwrap(),
            vec!["192.0.2.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            dns.lookup("10.1.2.3").await.unwrap(),
            vec!["10.1.2.3".parse::<IpAddr>().unwrap()],
            "an address is its own answer"
        );
    }
}
