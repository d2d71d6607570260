//! rustls configurations of the HBONE tunnel: TLS 1.3, ALPN `h2`, mutual authentication with
//! SVIDs, server certificate chosen by SNI, server SPIFFE id pinned by the client.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, Error as TlsError, OtherError, RootCertStore,
    SignatureScheme,
};
use tracing::debug;

use super::{SpiffeId, State};

/// The only application protocol of the tunnel.
pub const ALPN_H2: &[u8] = b"h2";

/// aws-lc-rs, with AES-128-GCM preferred (the cheapest suite on hardware with AES instructions)
/// and the AES-GCM records sealed from the plaintext where it lies ([`super::seal`]).
pub(crate) fn provider() -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256;
    let [aes_128, aes_256] = super::seal::aes_gcm_suites();
    CryptoProvider {
        cipher_suites: vec![aes_128, aes_256, TLS13_CHACHA20_POLY1305_SHA256],
        ..rustls::crypto::aws_lc_rs::default_provider()
    }
}

pub(crate) fn server_config(state: &Arc<State>) -> Result<Arc<rustls::ServerConfig>> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        state.roots.clone(),
        state.provider.clone(),
    )
    .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(state.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SniResolver {
            state: state.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection authenticates with the peer's current certificate.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

pub(crate) fn client_config(
    state: &Arc<State>,
    source: &SpiffeId,
    expected_server: &SpiffeId,
) -> Result<Arc<rustls::ClientConfig>> {
    let verifier = SpiffeServerVerifier {
        roots: state.roots.clone(),
        algorithms: state.provider.signature_verification_algorithms,
        trust_domain: state.trust_domain.clone(),
        expected: expected_server.clone(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(state.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(CurrentSvid {
            state: state.clone(),
            id: source.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SPIFFE id of a peer: the only URI SAN of the leaf (first) certificate, which must be a
/// valid `spiffe://` id in `trust_domain`. The chain itself must already have been verified
/// (the TLS handshake does that).
pub fn peer_identity(certs: &[CertificateDer<'_>], trust_domain: &str) -> Result<SpiffeId> {
    let leaf = certs
        .first()
        .ok_or_else(|| anyhow!("peer presented no certificate"))?;
    let (_, x) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| anyhow!("peer certificate: {e}"))?;
    let san = x
        .subject_alternative_name()
        .map_err(|e| anyhow!("peer certificate subjectAltName: {e}"))?
        .ok_or_else(|| anyhow!("peer certificate has no subjectAltName"))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        bail!("peer certificate must have exactly one URI SAN");
    };
    let id: SpiffeId = uri
        .parse()
        .map_err(|e| anyhow!("peer certificate URI SAN {uri:?}: {e}"))?;
    if id.trust_domain() != trust_domain {
        bail!("peer identity {id} is not in the trust domain {trust_domain}");
    }
    Ok(id)
}

/// Serves, by SNI, the current SVID of a local identity; nothing for other names.
struct SniResolver {
    state: Arc<State>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SniResolver")
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            debug!("TLS client sent no server name; no certificate to serve");
            return None;
        };
        let Some(id) = self.state.local_by_sni(name) else {
            debug!(sni = name, "no local identity for this server name");
            return None;
        };
        match self.state.svid(&id) {
            Ok(svid) => Some(svid.certified_key()),
            Err(e) => {
                debug!(identity = %id, error = %e, "no SVID to serve");
                None
            }
        }
    }
}

/// Presents the *current* SVID of one identity at every handshake.
struct CurrentSvid {
    state: Arc<State>,
    id: SpiffeId,
}

impl std::fmt::Debug for CurrentSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CurrentSvid({})", self.id)
    }
}

impl ResolvesClientCert for CurrentSvid {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        match self.state.svid(&self.id) {
            Ok(svid) => Some(svid.certified_key()),
            Err(e) => {
                debug!(identity = %self.id, error = %e, "no client SVID");
                None
            }
        }
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// webpki chain verification against the trust bundle, then the leaf's SPIFFE id must be the
/// expected one. The TLS server name is ignored: it only carries the requested identity.
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    trust_domain: String,
    expected: SpiffeId,
}

impl std::fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpiffeServerVerifier({})", self.expected)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct IdentityMismatch(String);

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let mismatch = |why: String| {
            TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                IdentityMismatch(why),
            ))))
        };
        let id = peer_identity(std::slice::from_ref(end_entity), &self.trust_domain)
            .map_err(|e| mismatch(e.to_string()))?;
        if id != self.expected {
            return Err(mismatch(format!(
                "server identity is {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
