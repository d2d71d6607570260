//! Unique names: cluster ids, pod uids, container ids.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// `n` random bytes from the kernel.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: writes at most n - filled bytes into buf[filled..].
        let r = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), n - filled, 0) };
        if r > 0 {
            filled += r as usize;
        } else {
            // getrandom only fails when interrupted; fall back to a time/counter mix.
            let x = mix(now_nanos() ^ u64::from(std::process::id()));
            buf[filled] = x as u8;
            filled += 1;
        }
    }
    buf
}

/// Lowercase hex of `n` random bytes (2n chars).
pub fn random_hex(n: usize) -> String {
    hex(&random_bytes(n))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random RFC 4122 version 4 UUID, lowercase with dashes.
pub fn uuid_v4() -> String {
    let mut b = random_bytes(16);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A 64-hex-digit container id, as containerd makes them.
pub fn container_id() -> String {
    random_hex(32)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// splitmix64 finalizer.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A short (6 hex chars) id from pid, a process-wide counter, time and kernel randomness.
/// Uniqueness across processes is enforced by the marker file (created exclusively).
pub fn cluster_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r = u64::from_le_bytes(random_bytes(8).try_into().unwrap());
    let x = mix(u64::from(std::process::id()) << 32 ^ c ^ mix(now_nanos()) ^ r);
    format!("{:06x}", x & 0xff_ffff)
}

/// Is `s` a cluster id (6 lowercase hex digits)?
pub fn is_cluster_id(s: &str) -> bool {
    s.len() == 6
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_shape() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(u, uuid_v4());
    }

    #[test]
    fn ids() {
        let a = cluster_id();
        assert!(is_cluster_id(&a), "{a}");
        assert!(!is_cluster_id("abcdeg"));
        assert_eq!(container_id().len(), 64);
    }
}
