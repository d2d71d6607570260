//! `weft ca serve`: the mesh CA as a service, the only place its key lives. Nodes ask it for
//! their workloads' certificates with Istio's certificate service protocol
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`, gRPC over TLS), authenticated by
//! a token ([`authenticate`]); it signs an identity only for a node that runs a pod of it
//! ([`authorize`]), which it reads from the same registry the nodes read.
//!
//! May import: `identity` (signing, the protocol), `registry` (where pods run).

pub mod authenticate;
pub mod authorize;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use rcgen::{CertificateSigningRequestParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::identity::ca_client::IMPERSONATED_IDENTITY;
use crate::identity::certificate_service::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::identity::certificate_service::{IstioCertificateRequest, IstioCertificateResponse};
use crate::identity::issuer::LocalCa;
use crate::identity::{pem_encode, validate_trust_domain};
use crate::registry::file::FileSource;
use crate::registry::kube::{KubeOptions, KubeSource};
use crate::registry::Registry;

pub use authenticate::Authenticator;

/// Lifetime of the CA service's own TLS certificate; it is re-signed at half of it.
const SERVER_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `weft ca serve` settings.
#[derive(Debug, Clone)]
pub struct CaServeConfig {
    pub listen: SocketAddr,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub trust_domain: String,
    /// `kube`, or the registry file or directory nodes read.
    pub registry: PathBuf,
    pub kubeconfig: Option<PathBuf>,
    pub kube_context: Option<String>,
    /// Bootstrap tokens (`NODE TOKEN` lines); `None`: Kubernetes TokenReview.
    pub node_tokens: Option<PathBuf>,
    pub token_audience: String,
    /// `NAMESPACE/NAME` of the ServiceAccount weft's nodes run as.
    pub node_service_account: String,
    /// DNS names and addresses in the service's TLS certificate (what nodes dial).
    pub server_names: Vec<String>,
    pub max_ttl: Duration,
}

struct Service {
    ca: Arc<LocalCa>,
    registry: Arc<Registry>,
    auth: Authenticator,
    trust_domain: String,
    max_ttl: Duration,
}

pub async fn serve(cfg: CaServeConfig) -> Result<()> {
    validate_trust_domain(&cfg.trust_domain)?;
    let ca = Arc::new(LocalCa::load(&cfg.ca_cert, &cfg.ca_key).context("loading the mesh CA")?);
    let kube = cfg.registry == std::path::Path::new("kube");
    let options = KubeOptions {
        kubeconfig: cfg.kubeconfig.clone(),
        context: cfg.kube_context.clone(),
        node_name: String::new(),
    };
    // The Kubernetes watches run as long as their source lives: kept until the CA stops.
    let mut _kube_source = None;
    let registry = if kube {
        let source = KubeSource::start(options.clone())
            .await
            .context("reading pods from the Kubernetes API")?;
        let registry = source.registry().clone();
        _kube_source = Some(source);
        registry
    } else {
        FileSource::watched(&cfg.registry)?
    };
    let auth = match &cfg.node_tokens {
        Some(path) => {
            std::fs::metadata(path).with_context(|| format!("--node-tokens {}", path.display()))?;
            Authenticator::Tokens(path.clone())
        }
        None if kube => Authenticator::TokenReview {
            client: crate::registry::kube::client(&options).await?,
            audience: cfg.token_audience.clone(),
            service_account: cfg.node_service_account.clone(),
        },
        None => anyhow::bail!(
            "--node-tokens is required unless --registry kube (nodes are then authenticated by TokenReview)"
        ),
    };

    let resolver = Arc::new(ServerCert::new(ca.clone(), cfg.server_names.clone())?);
    tokio::spawn(resolver.clone().renew());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });

    let service = Service {
        ca,
        registry,
        auth,
        trust_domain: cfg.trust_domain.clone(),
        max_ttl: cfg.max_ttl,
    };
    info!(listen = %cfg.listen, trust_domain = %cfg.trust_domain, "CA service ready");
    tonic::transport::Server::builder()
        .add_service(IstioCertificateServiceServer::new(service))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), shutdown())
        .await
        .context("serving the CA")?;
    info!("CA service stopped");
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        let request = request.into_inner();
        let snapshot = self.registry.snapshot();
        let Some(token) = token else {
            warn!(%peer, "refused: no bearer token");
            return Err(Status::unauthenticated("no bearer token"));
        };
        let node = self.auth.node(&token, &snapshot).await.map_err(|e| {
            warn!(%peer, reason = %e, "refused: node not authenticated");
            Status::unauthenticated(e)
        })?;
        let refuse = |e: authorize::Refusal| {
            warn!(%peer, %node, reason = %e, "refused");
            match e {
                authorize::Refusal::Invalid(_) | authorize::Refusal::Ttl { .. } => {
                    Status::invalid_argument(e.to_string())
                }
                _ => Status::permission_denied(e.to_string()),
            }
        };
        let csr = CertificateSigningRequestParams::from_pem(&request.csr)
            .map_err(|e| refuse(authorize::Refusal::Invalid(format!("CSR: {e}"))))?;
        let impersonated = request
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.as_str()),
                _ => None,
            });
        let id = authorize::requested_identity(&csr, impersonated).map_err(refuse)?;
        authorize::may_sign(&snapshot, &self.trust_domain, &node, &id).map_err(refuse)?;
        let ttl = authorize::lifetime(request.validity_duration, self.max_ttl).map_err(refuse)?;
        let signed = self
            .ca
            .sign_svid(&id, &csr.public_key, ttl, SystemTime::now())
            .map_err(|e| {
                warn!(%node, identity = %id, error = %e, "signing failed");
                Status::internal(format!("signing: {e}"))
            })?;
        let serial: String = signed.serial.iter().map(|b| format!("{b:02x}")).collect();
        info!(%node, identity = %id, %serial, ttl = ?ttl, "signed");
        let mut cert_chain = vec![pem_encode("CERTIFICATE", &signed.leaf)];
        cert_chain.extend(
            self.ca
                .intermediates()
                .iter()
                .chain(self.ca.roots())
                .map(|c| pem_encode("CERTIFICATE", c)),
        );
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

/// The CA service's own certificate, signed by the CA it serves and renewed at half-life.
struct ServerCert {
    ca: Arc<LocalCa>,
    names: Vec<String>,
    current: ArcSwap<CertifiedKey>,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("names", &self.names)
            .finish()
    }
}

impl ServerCert {
    fn new(ca: Arc<LocalCa>, names: Vec<String>) -> Result<ServerCert> {
        if names.is_empty() {
            anyhow::bail!("--server-name: at least one name nodes dial the CA by");
        }
        let current = ArcSwap::from(Self::sign(&ca, &names)?);
        Ok(ServerCert { ca, names, current })
    }

    fn sign(ca: &LocalCa, names: &[String]) -> Result<Arc<CertifiedKey>> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let signed = ca.sign_server(names, &key, SERVER_CERT_TTL)?;
        let mut chain: Vec<CertificateDer<'static>> = vec![signed.leaf];
        chain.extend(ca.intermediates().iter().cloned());
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)?;
        Ok(Arc::new(CertifiedKey::new(chain, signer)))
    }

    async fn renew(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SERVER_CERT_TTL / 2).await;
            match Self::sign(&self.ca, &self.names) {
                Ok(c) => self.current.store(c),
                Err(e) => warn!(error = %e, "renewing the CA service's certificate failed"),
            }
        }
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
