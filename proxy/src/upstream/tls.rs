//! TLS origination: weft opens TLS to an external service on the application's behalf
//! (DestinationRule `trafficPolicy.tls.mode: SIMPLE`), verifying it against the given CA
//! certificates (else the system's) and sending the configured SNI.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Where weft looks for the system's CA bundle when a DestinationRule names none.
const SYSTEM_ROOTS: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// How to originate TLS to one upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origination {
    /// Server name sent (SNI) and verified.
    pub sni: String,
    /// PEM file of CA certificates to trust (`caCertificates`); `None`: the system's.
    pub ca_certificates: Option<PathBuf>,
    /// Skip verifying the server's certificate (`insecureSkipVerify`).
    pub insecure_skip_verify: bool,
    /// ALPN protocols to offer (`h2`, `http/1.1`).
    pub alpn: Vec<Vec<u8>>,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading CA certificates {path}: {error}")]
    Roots { path: String, error: String },
    #[error("invalid server name {0:?}")]
    ServerName(String),
    #[error("TLS handshake with the upstream failed: {0}")]
    Handshake(std::io::Error),
    #[error("building the TLS client: {0}")]
    Config(rustls::Error),
}

/// Client configurations, built once per distinct [`Origination`].
#[derive(Default)]
pub struct Originator {
    configs: Mutex<HashMap<Origination, Arc<rustls::ClientConfig>>>,
}

impl Originator {
    /// TLS over `tcp` as `o` says.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        o: &Origination,
    ) -> Result<TlsStream<TcpStream>, TlsError> {
        let config = self.config(o)?;
        let name =
            ServerName::try_from(o.sni.clone()).map_err(|_| TlsError::ServerName(o.sni.clone()))?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(TlsError::Handshake)
    }

    fn config(&self, o: &Origination) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        if let Some(c) = self.configs.lock().get(o) {
            return Ok(c.clone());
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(TlsError::Config)?;
        let mut config = if o.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                .with_no_client_auth()
        } else {
            let roots = roots(o.ca_certificates.as_deref())?;
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        config.alpn_protocols = o.alpn.clone();
        let config = Arc::new(config);
        self.configs.lock().insert(o.clone(), config.clone());
        Ok(config)
    }
}

fn roots(ca: Option<&Path>) -> Result<rustls::RootCertStore, TlsError> {
    let path = match ca {
        Some(p) => p.to_path_buf(),
        None => SYSTEM_ROOTS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| TlsError::Roots {
                path: SYSTEM_ROOTS.join(", "),
                error: "no system CA bundle found".into(),
            })?,
    };
    let err = |error: String| TlsError::Roots {
        path: path.display().to_string(),
        error,
    };
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&path).map_err(|e| err(e.to_string()))? {
        let cert = cert.map_err(|e| err(e.to_string()))?;
        store.add(cert).map_err(|e| err(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(store)
}

/// `insecureSkipVerify`: signatures are still checked, the chain and name are not.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_empty_ca_files_are_clear_errors() {
        let e = roots(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = roots(Some(&empty)).unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
    }

    #[tokio::test]
    async fn originates_tls_with_the_given_sni_and_ca() {
        let ca = rcgen::CertifiedIssuer::self_signed(
            rcgen::CertificateParams::new(Vec::<String>::new()).unwrap(),
            rcgen::KeyPair::generate().unwrap(),
        )
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["external.example.test".into()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let tls = acceptor.accept(s).await.unwrap();
            tls.get_ref().1.server_name().map(str::to_string)
        });
        let o = Origination {
            sni: "external.example.test".into(),
            ca_certificates: Some(ca_path),
            insecure_skip_verify: false,
            alpn: vec![b"http/1.1".to_vec()],
        };
        let originator = Originator::default();
        let tcp = TcpStream::connect(addr).await.unwrap();
        originator.connect(tcp, &o).await.unwrap();
        assert_eq!(
            served.await.unwrap().as_deref(),
            Some("external.example.test")
        );
        // A name the certificate does not carry fails verification.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = l.accept().await;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        });
        let wrong = Origination {
            sni: "other.example.test".into(),
            ..o
        };
        let tcp = TcpStream::connect(addr).await.unwrap();
        assert!(originator.connect(tcp, &wrong).await.is_err());
    }
}
