//! What records call pods, Services and addresses, made once and shared.
//!
//! A connection's record names its pods and Service in text (the flow) and in Istio's labels
//! (the metrics). Made afresh, that is a dozen allocations and as many formatted strings per
//! connection; a pod or Service of the registry is the same object (one `Arc`) for every
//! connection until the registry changes, so its names are made once per object, per thread,
//! and each record takes shared copies.
//!
//! A memo keeps the objects it names alive (it holds their `Arc`), so an object's address is
//! never reused for another while its names are kept; a changed pod is a new object with
//! names of its own. Each thread keeps up to [`MEMO_MAX`] of each; past that it starts over.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use super::istio::Peer;
use super::record::Names;
use crate::admin::api::Text;
use crate::registry::{Pod, Service};

/// How many pods (and Services) a thread keeps the names of.
const MEMO_MAX: usize = 256;

/// A pod as records name it.
#[derive(Debug)]
pub struct PodNames {
    pub namespace: Text,
    pub name: Text,
    /// Its workload, as Istio's labels name it.
    pub peer: Arc<Peer>,
}

impl PodNames {
    fn of(pod: &Pod) -> PodNames {
        PodNames {
            namespace: pod.namespace.as_str().into(),
            name: pod.name.as_str().into(),
            peer: Arc::new(Peer::of_pod(pod)),
        }
    }
}

/// `pod`'s names, made on this thread's first use of this pod object.
pub fn pod(pod: &Arc<Pod>) -> Arc<PodNames> {
    thread_local! {
        static PODS: RefCell<Memo<Pod, PodNames>> = RefCell::new(Memo::default());
    }
    PODS.with(|m| m.borrow_mut().get(pod, PodNames::of))
}

/// `service`'s names ([`Names::service`]), made on this thread's first use of this Service
/// object.
pub fn service(service: &Arc<Service>) -> Arc<Names> {
    thread_local! {
        static SERVICES: RefCell<Memo<Service, Names>> = RefCell::new(Memo::default());
    }
    SERVICES.with(|m| m.borrow_mut().get(service, Names::service))
}

/// `addr` as a flow writes it (`ip:port`, `[ip]:port`): an IPv4 address written directly into
/// a buffer on the stack, without the formatting machinery, and shared from one allocation.
pub fn address(addr: SocketAddr) -> Text {
    match addr {
        SocketAddr::V4(v4) => {
            let mut out = Digits::default();
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.decimal(u32::from(octet));
            }
            out.push(b':');
            out.decimal(u32::from(v4.port()));
            out.as_str().into()
        }
        SocketAddr::V6(_) => {
            let mut out = String::with_capacity(48);
            let _ = write!(out, "{addr}");
            out.as_str().into()
        }
    }
}

/// ASCII written on the stack: an IPv4 address and port fit (21 bytes).
#[derive(Default)]
struct Digits {
    buf: [u8; 24],
    len: usize,
}

impl Digits {
    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    /// Appends `n` in decimal.
    fn decimal(&mut self, n: u32) {
        let mut digits = [0u8; 10];
        let mut at = digits.len();
        let mut n = n;
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &d in &digits[at..] {
            self.push(d);
        }
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits, dots and colons are written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// Values made from `Arc`-held objects, by object.
struct Memo<K, V> {
    /// By the object's address; the `Arc` kept keeps that address the object's.
    made: HashMap<usize, (Arc<K>, Arc<V>), foldhash::fast::RandomState>,
}

impl<K, V> Default for Memo<K, V> {
    fn default() -> Self {
        Memo {
            made: HashMap::default(),
        }
    }
}

impl<K, V> Memo<K, V> {
    fn get(&mut self, key: &Arc<K>, make: impl FnOnce(&K) -> V) -> Arc<V> {
        let at = Arc::as_ptr(key) as *const () as usize;
        if let Some((k, v)) = self.made.get(&at) {
            if Arc::ptr_eq(k, key) {
                return v.clone();
            }
        }
        if self.made.len() >= MEMO_MAX {
            self.made.clear();
        }
        let v = Arc::new(make(key));
        self.made.insert(at, (key.clone(), v.clone()));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        for a in [
            "0.0.0.0:0",
            "10.1.2.3:80",
            "255.255.255.255:65535",
            "192.168.100.9:8080",
            "[::1]:443",
            "[fe80::1%2]:15008",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(&*address(addr), addr.to_string(), "{a}");
        }
    }

    #[test]
    fn one_object_is_named_once_and_a_changed_one_anew() {
        let mut memo: Memo<String, usize> = Memo::default();
        let mut made = 0;
        let a = Arc::new("a".to_string());
        let mut make = |s: &String| {
            made += 1;
            s.len()
        };
        let first = memo.get(&a, &mut make);
        let again = memo.get(&a, &mut make);
        assert!(Arc::ptr_eq(&first, &again));
        // An equal value in another object (the registry changed): made anew.
        let b = Arc::new("a".to_string());
        memo.get(&b, &mut make);
        assert_eq!(made, 2);
    }

    #[test]
    fn a_full_memo_starts_over_and_keeps_no_more_than_its_bound() {
        let mut memo: Memo<u32, u32> = Memo::default();
        let keys: Vec<Arc<u32>> = (0..MEMO_MAX as u32 + 10).map(Arc::new).collect();
        for k in &keys {
            assert_eq!(*memo.get(k, |v| v * 2), **k * 2);
        }
        assert!(memo.made.len() <= MEMO_MAX);
        // The first keys went with the rest when it started over: made anew.
        assert_eq!(*memo.get(&keys[1], |v| v * 3), 3);
    }
}
