//! The node's side of Istio's certificate service: a CSR for one workload identity, sent to
//! `weft ca serve`, istiod or istio-csr over TLS with the node's bearer token, and the answer
//! checked before it is used.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::certificate_service::istio_certificate_service_client::IstioCertificateServiceClient;
use super::certificate_service::IstioCertificateRequest;
use super::{is_self_signed, pem_encode, SpiffeId};

/// Metadata key of the identity a node asks for on behalf of a workload (as ztunnel sends it).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection (made on first use, remade after failures) to the certificate service.
pub struct CaClient {
    address: String,
    client: IstioCertificateServiceClient<Channel>,
    /// The node's credential, read at every request (a projected token is rewritten in place).
    token: Option<PathBuf>,
}

impl CaClient {
    /// `address` is `https://HOST:PORT`; the service's certificate must chain to one of `roots`
    /// and name HOST. Call it within a Tokio runtime (the connection is made on first use).
    pub fn new(
        address: &str,
        roots: &[CertificateDer<'static>],
        token: Option<PathBuf>,
    ) -> Result<CaClient> {
        let uri: http::Uri = address
            .parse()
            .with_context(|| format!("--ca-address {address:?}: not a URL"))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            bail!("--ca-address {address:?}: expected https://HOST:PORT");
        }
        let pem: String = roots.iter().map(|c| pem_encode("CERTIFICATE", c)).collect();
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        let channel = Endpoint::from_shared(address.to_string())?
            .tls_config(tls)
            .with_context(|| format!("TLS for the CA service {address}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .connect_lazy();
        Ok(CaClient {
            address: address.to_string(),
            client: IstioCertificateServiceClient::new(channel),
            token,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Asks for a certificate of `id` over `key`'s public key, valid for `ttl`. Returns the leaf
    /// and its intermediates (roots are dropped: peers have them). The leaf must name exactly `id`
    /// and hold `key`'s public key.
    pub async fn sign(
        &self,
        id: &SpiffeId,
        key: &KeyPair,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        let csr = params.serialize_request(key)?.pem()?;
        let metadata = prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                },
            )]
            .into(),
        };
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: ttl.as_secs() as i64,
            metadata: Some(metadata),
        });
        if let Some(path) = &self.token {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading the CA token {}", path.display()))?;
            let value = format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| anyhow!("{}: not a valid token", path.display()))?;
            request.metadata_mut().insert("authorization", value);
        }
        let response = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(|s| {
                anyhow!(
                    "the CA {} refused: {:?}: {}",
                    self.address,
                    s.code(),
                    s.message()
                )
            })?
            .into_inner();
        let mut chain = Vec::with_capacity(response.cert_chain.len());
        for pem in &response.cert_chain {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(
                    cert.map_err(|e| anyhow!("the CA {} answered a bad PEM: {e}", self.address))?,
                );
            }
        }
        let leaf = chain
            .first()
            .ok_or_else(|| anyhow!("the CA {} answered no certificate", self.address))?;
        check_leaf(leaf, id, key)
            .with_context(|| format!("the certificate from the CA {}", self.address))?;
        let mut out = vec![chain[0].clone()];
        out.extend(chain.into_iter().skip(1).filter(|c| !is_self_signed(c)));
        Ok(out)
    }
}

/// The leaf's only SPIFFE id is `id` and its public key is `key`'s.
fn check_leaf(leaf: &CertificateDer<'_>, id: &SpiffeId, key: &KeyPair) -> Result<()> {
    let (_, x) = x509_parser::parse_x509_certificate(leaf).map_err(|e| anyhow!("{e}"))?;
    if x.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        bail!("it is not for the key that was sent");
    }
    let want = id.to_string();
    let uris: Vec<String> = x
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris != [want.clone()] {
        bail!("it names {uris:?}, not {want}");
    }
    Ok(())
}
