use std::os::unix::fs::PermissionsExt;

use x509_parser::extensions::GeneralName;

use super::*;

const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

fn manager(dir: &Path, ttl: Duration) -> IdentityManager {
    IdentityManager::new(IdentityConfig {
        ca_cert: dir.join("ca.crt"),
        authority: AuthorityConfig::Key(dir.join("ca.key")),
        trust_bundle: vec![],
        trust_domain: TD.into(),
        svid_ttl: ttl,
    })
    .unwrap()
}

#[test]
fn init_ca_writes_a_root() {
    let dir = tempfile::tempdir().unwrap();
    init_ca(dir.path(), TD, Duration::from_secs(86400 * 365)).unwrap();
    let key_mode = fs::metadata(dir.path().join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let certs = read_certs(&dir.path().join("ca.crt")).unwrap();
    assert_eq!(certs.len(), 1);
    let (_, x) = x509_parser::parse_x509_certificate(&certs[0]).unwrap();
    assert!(x.is_ca());
    assert!(is_self_signed(&certs[0]));
    let ku = x.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    assert_eq!(
        x.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
    // Never overwrite a CA.
    let e = init_ca(dir.path(), TD, Duration::from_secs(60)).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert!(init_ca(&dir.path().join("x"), "Bad/TD", Duration::from_secs(60)).is_err());
}

#[test]
fn mints_spiffe_leaf() {
    let dir = tempfile::tempdir().unwrap();
    init_ca(dir.path(), TD, Duration::from_secs(86400)).unwrap();
    let m = manager(dir.path(), Duration::from_secs(3600));
    let a = id("default", "sleep");
    assert!(m.svid(&a).is_err(), "not local yet");
    m.set_local_identities([a.clone()].into());
    let svid = m.svid(&a).unwrap();
    assert_eq!(svid.chain.len(), 1, "root CA: leaf only");
    let (_, x) = x509_parser::parse_x509_certificate(&svid.chain[0]).unwrap();
    assert!(!x.is_ca());
    assert!(!x.basic_constraints().unwrap().unwrap().value.ca);
    let sans: Vec<_> = x
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .clone();
    assert_eq!(
        sans,
        vec![GeneralName::URI(
            "spiffe://cluster.local/ns/default/sa/sleep"
        )]
    );
    let ku = x.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert_eq!(hex(x.raw_serial()), svid.serial);
    assert_eq!(svid.serial.len(), 32);
    let nb = x.validity().not_before.timestamp();
    let na = x.validity().not_after.timestamp();
    assert_eq!(na - nb, 3600 + NOT_BEFORE_SKEW.as_secs() as i64);
    assert_eq!(
        svid.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64,
        na
    );
    assert_eq!(m.peer_identity(&svid.chain).unwrap(), a);
    assert!(peer_identity(&svid.chain, "other.domain").is_err());

    // Verifies against the root with webpki, as a client certificate.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        m.roots(),
        Arc::new(tls::provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&svid.chain[0], &[], rustls::pki_types::UnixTime::now())
        .unwrap();

    // Cached until half-life; other identities refused; dropped when no longer local.
    assert_eq!(m.svid(&a).unwrap().serial, svid.serial);
    assert!(m.svid(&id("default", "other")).is_err());
    assert_eq!(m.certs().len(), 1);
    assert_eq!(m.certs()[0].identity, a.to_string());
    let json = serde_json::to_value(m.certs()).unwrap();
    assert!(json[0]["not_after"].as_str().unwrap().ends_with('Z'));
    m.set_local_identities(HashSet::new());
    assert!(m.svid(&a).is_err());
    assert!(m.certs().is_empty());
}

#[test]
fn remints_after_half_life() {
    let dir = tempfile::tempdir().unwrap();
    init_ca(dir.path(), TD, Duration::from_secs(86400)).unwrap();
    let m = manager(dir.path(), Duration::from_secs(2));
    let a = id("ns", "a");
    m.set_local_identities([a.clone()].into());
    let first = m.svid(&a).unwrap();
    assert!(first.refresh_at <= SystemTime::now() + Duration::from_secs(1));
    std::thread::sleep(
        first
            .refresh_at
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    );
    std::thread::sleep(Duration::from_millis(20));
    let second = m.svid(&a).unwrap();
    assert_ne!(first.serial, second.serial);
}

#[tokio::test]
async fn rotation_task_remints_idle_identities() {
    let dir = tempfile::tempdir().unwrap();
    init_ca(dir.path(), TD, Duration::from_secs(86400)).unwrap();
    let m = Arc::new(manager(dir.path(), Duration::from_secs(2)));
    let a = id("ns", "idle");
    m.set_local_identities([a.clone()].into());
    let task = m.clone().spawn_rotation();
    // Minted without anyone asking.
    let mut first = None;
    for _ in 0..100 {
        if let Some(c) = m.certs().pop() {
            first = Some(c.serial);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = first.expect("rotation task minted the SVID");
    // What making it ran is counted once the round is over, and handed back
    // ([`crate::memory::release`]) a second after.
    for _ in 0..100 {
        if m.state.released.load(std::sync::atomic::Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(m.state.made.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        m.state.released.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "memory handed back after the SVID was made"
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let now = m.certs().pop().unwrap().serial;
    assert_ne!(first, now, "re-minted at half-life");
    drop(m);
    // The task ends with the manager.
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn intermediate_ca_chain() {
    let root = tempfile::tempdir().unwrap();
    let inter = tempfile::tempdir().unwrap();
    init_ca(root.path(), TD, Duration::from_secs(86400)).unwrap();
    init_intermediate_ca(
        &root.path().join("ca.crt"),
        &root.path().join("ca.key"),
        inter.path(),
        TD,
        Duration::from_secs(3600),
    )
    .unwrap();
    let m = manager(inter.path(), Duration::from_secs(600));
    let a = id("ns", "a");
    m.set_local_identities([a.clone()].into());
    let svid = m.svid(&a).unwrap();
    assert_eq!(svid.chain.len(), 2, "leaf + intermediate");
    assert!(!is_self_signed(&svid.chain[1]));
    // The root (from the intermediate's ca.crt) verifies the chain.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        m.roots(),
        Arc::new(tls::provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(
            &svid.chain[0],
            &svid.chain[1..],
            rustls::pki_types::UnixTime::now(),
        )
        .unwrap();
    // The leaf alone does not.
    assert!(verifier
        .verify_client_cert(&svid.chain[0], &[], rustls::pki_types::UnixTime::now())
        .is_err());
    // SVIDs never outlive the issuing CA.
    let m = manager(inter.path(), Duration::from_secs(86400 * 10));
    m.set_local_identities([a.clone()].into());
    let svid = m.svid(&a).unwrap();
    assert!(svid.not_after <= SystemTime::now() + Duration::from_secs(3601));
}

#[test]
fn rejects_bad_ca_material() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    init_ca(a.path(), TD, Duration::from_secs(86400)).unwrap();
    init_ca(b.path(), TD, Duration::from_secs(86400)).unwrap();
    let e = IdentityManager::new(IdentityConfig {
        ca_cert: a.path().join("ca.crt"),
        authority: AuthorityConfig::Key(b.path().join("ca.key")),
        trust_bundle: vec![],
        trust_domain: TD.into(),
        svid_ttl: Duration::from_secs(60),
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("does not belong"), "{e}");
    let e = IdentityManager::new(IdentityConfig {
        ca_cert: a.path().join("missing.crt"),
        authority: AuthorityConfig::Key(a.path().join("ca.key")),
        trust_bundle: vec![],
        trust_domain: TD.into(),
        svid_ttl: Duration::from_secs(60),
    })
    .err()
    .unwrap();
    assert!(format!("{e:#}").contains("missing.crt"), "{e:#}");
    // An identity of another trust domain is never minted.
    let m = manager(a.path(), Duration::from_secs(60));
    let foreign = SpiffeId::new("other.org", "ns", "sa").unwrap();
    m.set_local_identities([foreign.clone()].into());
    assert!(m.svid(&foreign).is_err());
}

#[test]
fn pem_encoding_round_trips() {
    let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    for len in [0usize, 1, 2, 3, 47, 48, 49, 1000] {
        let pem = pem_encode("CERTIFICATE", &der[..len]);
        if len == 0 {
            continue;
        }
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(back.as_ref(), &der[..len]);
    }
}
