//! Certificates for TLS backends in tests (a server outside the mesh that weft originates TLS
//! to): a throwaway CA and a server certificate it signs, written as PEM files.
//!
//! Imports: rcgen only.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// PEM files of a TLS backend.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate: what a client trusts (DestinationRule `caCertificates`).
    pub ca: PathBuf,
    /// The server certificate (`weft-testpod serve --mode https --cert`).
    pub cert: PathBuf,
    /// Its private key (`--key`).
    pub key: PathBuf,
}

/// A new CA and a server certificate for `hosts` (DNS names in the SAN), written to `dir` as
/// `ca.crt`, `server.crt` and `server.key`.
pub fn server_certs(dir: &Path, hosts: &[&str]) -> Result<TlsFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "weft test backend CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let mut params = CertificateParams::new(names)?;
    if let Some(first) = hosts.first() {
        params.distinguished_name.push(DnType::CommonName, *first);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    let files = TlsFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    std::fs::write(&files.ca, ca_cert.pem())?;
    std::fs::write(&files.cert, cert.pem())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;

    #[test]
    fn a_client_trusting_the_ca_accepts_the_server_for_its_hosts_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = server_certs(dir.path(), &["external.example.test"]).unwrap();
        assert!(std::fs::read_to_string(&f.key)
            .unwrap()
            .contains("PRIVATE KEY-----"));
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&f.ca).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        let leaf = CertificateDer::from_pem_file(&f.cert).unwrap();
        let verify = |name: &str| {
            verifier.verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
        };
        verify("external.example.test").unwrap();
        assert!(verify("other.example.test").is_err());
    }
}
