//! Workload identity: SPIFFE ids, the mesh CA, and short-lived X.509 SVIDs.
//!
//! A node holds SVIDs for the pods it hosts, and only for those
//! ([`IdentityManager::set_local_identities`]). An SVID is an ECDSA P-256 leaf whose only URI
//! SAN is the workload's SPIFFE id; its key is made on the node and never leaves memory. The
//! certificate comes from the [`Authority`]:
//! - a CA service (`--ca-address`: `weft ca serve`, istiod or istio-csr), asked over TLS with a
//!   CSR and the node's token ([`ca_client`]); the CA signs only identities of pods scheduled on
//!   the asking node. An SVID is renewed at half of its lifetime; while the CA cannot be reached
//!   the current one keeps serving until it expires, and renewal is retried with backoff;
//! - the CA key itself (`--ca-key`, single-node and development mode), signing on the node
//!   ([`issuer`]).
//!
//! [`IdentityManager::spawn_rotation`] renews even when nobody uses an identity. Open TLS
//! connections keep the certificate they were made with; new handshakes use the current one.
//!
//! TLS configurations for the HBONE tunnel ([`IdentityManager::client_config`],
//! [`IdentityManager::server_config`]) live in [`tls`]: TLS 1.3 only, ALPN `h2`, mutual
//! authentication against the trust bundle, the server certificate chosen by SNI ([`sni_for`]),
//! the server's SPIFFE id checked by the client.
//!
//! May import: `admin::api` (certificate rows), `memory` (a release once new SVIDs are made).

pub mod ca_client;
pub mod issuer;
mod seal;
mod spiffe;
mod tls;

/// Istio's certificate service (`proto/ca.proto`): messages, client and server.
pub mod certificate_service {
    tonic::include_proto!("istio.v1.auth");
}

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use parking_lot::{Mutex, MutexGuard};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use time::OffsetDateTime;
use tracing::{debug, info, warn};

use crate::admin::api::CertInfo;

pub use spiffe::{identity_from_sni, sni_for, validate_trust_domain, SpiffeId, SpiffeIdError};
pub use tls::{peer_identity, ALPN_H2};

/// How far in the past a new SVID's notBefore is set, to tolerate clock skew between nodes.
pub const NOT_BEFORE_SKEW: Duration = Duration::from_secs(60);
/// Longest pause of the rotation task between two looks at the local identities.
const ROTATION_MAX_SLEEP: Duration = Duration::from_secs(60);

/// Where the node's certificates come from and how long SVIDs live.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// PEM. With a CA service: the mesh root(s). With a CA key: the issuing CA certificate (root
    /// or intermediate), optionally followed by the rest of its chain. Self-signed certificates in
    /// this file are trusted roots.
    pub ca_cert: PathBuf,
    pub authority: AuthorityConfig,
    /// Extra PEM files of trusted roots, e.g. the next root during a root rotation. Peers whose
    /// chain ends in any of these roots, or in the CA's own root, are accepted.
    pub trust_bundle: Vec<PathBuf>,
    pub trust_domain: String,
    /// Lifetime of minted SVIDs (whole seconds; at least 1 s).
    pub svid_ttl: Duration,
}

/// Who signs this node's SVIDs.
#[derive(Debug, Clone)]
pub enum AuthorityConfig {
    /// A certificate service at `address` (`https://HOST:PORT`), the node authenticated by the
    /// bearer token in `token`.
    Service {
        address: String,
        token: Option<PathBuf>,
    },
    /// The CA's own key (PEM: PKCS#8, SEC1 or PKCS#1): single-node and development mode.
    Key(PathBuf),
}

/// Who signs: see [`AuthorityConfig`].
enum Authority {
    Service(Box<ca_client::CaClient>),
    Key(Box<issuer::LocalCa>),
}

/// An X.509 SVID: certificate chain and key of one workload identity.
pub struct Svid {
    pub id: SpiffeId,
    /// Leaf first, then the intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 private key of the leaf.
    pub key: PrivateKeyDer<'static>,
    /// Serial number, lowercase hex without separators.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When it is due for re-minting (half of its lifetime after it was minted).
    pub refresh_at: SystemTime,
    certified: Arc<CertifiedKey>,
}

impl Svid {
    /// The chain and key in the form rustls serves.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    pub fn info(&self) -> CertInfo {
        CertInfo {
            identity: self.id.to_string(),
            serial: self.serial.clone(),
            not_before: OffsetDateTime::from(self.not_before),
            not_after: OffsetDateTime::from(self.not_after),
        }
    }
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.to_string())
            .field("serial", &self.serial)
            .field("not_before", &OffsetDateTime::from(self.not_before))
            .field("not_after", &OffsetDateTime::from(self.not_after))
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Mints, caches and rotates the SVIDs of the identities hosted on this node, and builds the
/// TLS configurations that present them.
pub struct IdentityManager {
    state: Arc<State>,
    server_config: Arc<rustls::ServerConfig>,
    client_configs: Mutex<HashMap<(SpiffeId, SpiffeId), Arc<rustls::ClientConfig>>>,
}

/// What the TLS callbacks (certificate resolvers) share with the manager.
pub(crate) struct State {
    trust_domain: String,
    ttl: Duration,
    authority: Authority,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    local: Mutex<Local>,
    changed: tokio::sync::Notify,
    /// One request to the CA service at a time.
    fetching: tokio::sync::Mutex<()>,
    /// Requests to the CA service answered with a certificate, and failed.
    issued: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    /// SVIDs made since start (minted here or fetched), and how many of them had been made
    /// when [`rotate`] last finished a round (it hands memory back [`RELEASE_AFTER`] then).
    made: std::sync::atomic::AtomicU64,
    released: std::sync::atomic::AtomicU64,
    /// The last failure, for `weft status`.
    last_error: Mutex<Option<String>>,
}

#[derive(Default)]
struct Local {
    ids: HashSet<SpiffeId>,
    svids: HashMap<SpiffeId, Arc<Svid>>,
}

impl IdentityManager {
    pub fn new(config: IdentityConfig) -> Result<Self> {
        validate_trust_domain(&config.trust_domain)?;
        let ttl = Duration::from_secs(config.svid_ttl.as_secs().max(1));

        let (authority, file_roots) = match &config.authority {
            AuthorityConfig::Key(key) => {
                let ca = issuer::LocalCa::load(&config.ca_cert, key)?;
                let roots = ca.roots().to_vec();
                (Authority::Key(Box::new(ca)), roots)
            }
            AuthorityConfig::Service { address, token } => {
                let certs = read_certs(&config.ca_cert)?;
                let roots: Vec<_> = certs.into_iter().filter(|c| is_self_signed(c)).collect();
                let client = ca_client::CaClient::new(address, &roots, token.clone())?;
                (Authority::Service(Box::new(client)), roots)
            }
        };
        let mut roots = RootCertStore::empty();
        for cert in file_roots {
            roots
                .add(cert)
                .with_context(|| format!("{}: bad root", config.ca_cert.display()))?;
        }
        for path in &config.trust_bundle {
            let certs = read_certs(path)?;
            if certs.is_empty() {
                bail!("{}: no certificate", path.display());
            }
            for cert in certs {
                roots
                    .add(cert)
                    .with_context(|| format!("{}: bad root", path.display()))?;
            }
        }
        if roots.is_empty() {
            bail!(
                "no trusted root: {} holds no self-signed certificate and no trust bundle is configured",
                config.ca_cert.display()
            );
        }

        let state = Arc::new(State {
            trust_domain: config.trust_domain,
            ttl,
            authority,
            roots: Arc::new(roots),
            provider: Arc::new(tls::provider()),
            local: Mutex::new(Local::default()),
            changed: tokio::sync::Notify::new(),
            fetching: tokio::sync::Mutex::new(()),
            issued: Default::default(),
            failed: Default::default(),
            made: Default::default(),
            released: Default::default(),
            last_error: Mutex::new(None),
        });
        let server_config = tls::server_config(&state)?;
        Ok(IdentityManager {
            state,
            server_config,
            client_configs: Mutex::new(HashMap::new()),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.state.trust_domain
    }

    pub fn svid_ttl(&self) -> Duration {
        self.state.ttl
    }

    /// The trusted roots (the CA's own root and the trust bundle).
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.state.roots.clone()
    }

    /// Sets the identities of the pods hosted on this node. SVIDs of identities that are no
    /// longer local are dropped (their handshakes fail from now on); new ones are minted by the
    /// rotation task, or on first use.
    pub fn set_local_identities(&self, ids: HashSet<SpiffeId>) {
        {
            let mut local = self.state.lock();
            local.svids.retain(|id, _| ids.contains(id));
            local.ids = ids;
        }
        self.client_configs
            .lock()
            .retain(|(src, _), _| self.state.is_local(src));
        self.state.changed.notify_one();
    }

    /// The identities currently hosted on this node.
    pub fn local_identities(&self) -> HashSet<SpiffeId> {
        self.state.lock().ids.clone()
    }

    /// Whether `id` is hosted on this node.
    pub fn is_local(&self, id: &SpiffeId) -> bool {
        self.state.is_local(id)
    }

    /// The current SVID of `id`, without waiting: with a CA key, minted if there is none or the
    /// cached one is past half of its lifetime; from a CA service, the one held if it has not
    /// expired. Fails for identities this node does not host.
    pub fn svid(&self, id: &SpiffeId) -> Result<Arc<Svid>> {
        self.state.svid(id)
    }

    /// The current SVID of `id`, asking the CA service for one when none is held (the first
    /// connection of a new pod may come before the rotation task has fetched it).
    pub async fn ready(&self, id: &SpiffeId) -> Result<Arc<Svid>> {
        self.state.ready(id).await
    }

    /// The local identity a TLS client asked for by SNI ([`sni_for`]), if this node hosts it.
    pub fn local_by_sni(&self, name: &str) -> Option<SpiffeId> {
        self.state.local_by_sni(name)
    }

    /// Requests to the CA service: answered with a certificate, failed, and the last failure.
    pub fn ca_requests(&self) -> (u64, u64, Option<String>) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.state.issued.load(Relaxed),
            self.state.failed.load(Relaxed),
            self.state.last_error.lock().clone(),
        )
    }

    /// Seconds until the first of the SVIDs held expires (`None`: none held).
    pub fn earliest_expiry(&self) -> Option<Duration> {
        let now = SystemTime::now();
        self.state
            .lock()
            .svids
            .values()
            .map(|s| s.not_after.duration_since(now).unwrap_or_default())
            .min()
    }

    /// Where certificates come from, for `weft status`: `service https://…` or `key`.
    pub fn authority(&self) -> String {
        match &self.state.authority {
            Authority::Service(c) => format!("service {}", c.address()),
            Authority::Key(_) => "key".to_string(),
        }
    }

    /// Renews every local identity at half-life, in the background, until the manager is
    /// dropped. Open connections are not touched.
    pub fn spawn_rotation(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        let state = Arc::downgrade(&self.state);
        drop(self);
        tokio::spawn(rotate(state))
    }

    /// The SVIDs currently held, sorted by identity.
    pub fn certs(&self) -> Vec<CertInfo> {
        // Every handshake takes this lock (`svid`, `is_local`): only clone the `Arc`s under it,
        // describing the certificates happens after.
        let svids: Vec<Arc<Svid>> = self.state.lock().svids.values().cloned().collect();
        let mut out: Vec<CertInfo> = svids.iter().map(|s| s.info()).collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Client side of the tunnel: presents the current SVID of `source` (looked up at every
    /// handshake, so a cached config keeps working across rotations) and accepts only a server
    /// whose chain ends in a trusted root and whose SPIFFE id is exactly `expected_server`.
    /// Connect with the server name [`sni_for`]`(expected_server)`.
    pub fn client_config(
        &self,
        source: &SpiffeId,
        expected_server: &SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>> {
        if !self.state.is_local(source) {
            bail!("{source} is not an identity hosted on this node");
        }
        let key = (source.clone(), expected_server.clone());
        if let Some(c) = self.client_configs.lock().get(&key) {
            return Ok(c.clone());
        }
        let config = tls::client_config(&self.state, source, expected_server)?;
        self.client_configs.lock().insert(key, config.clone());
        Ok(config)
    }

    /// Server side of the tunnel: requires a client certificate chained to a trusted root and
    /// serves the SVID of the local identity named in SNI (no certificate, so no handshake, for
    /// any other name).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config.clone()
    }

    /// The SPIFFE id in a verified peer chain (see [`peer_identity`]), in this trust domain.
    pub fn peer_identity(&self, certs: &[CertificateDer<'_>]) -> Result<SpiffeId> {
        peer_identity(certs, &self.state.trust_domain)
    }
}

/// Longest wait between two attempts to renew from an unreachable CA service.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Shortest: near the end of an SVID's life, attempts come this often.
const RETRY_MIN: Duration = Duration::from_millis(250);

/// How long after a round that made SVIDs its memory is handed back: what the exchange with
/// the CA runs after the answer has come (below) is done by then.
const RELEASE_AFTER: Duration = Duration::from_secs(1);

async fn rotate(state: Weak<State>) {
    // Consecutive failures per identity: the next attempt waits 1 s, 2 s, … up to RETRY_MAX.
    let mut failures: HashMap<SpiffeId, u32> = HashMap::new();
    loop {
        let (sleep, made_some) = {
            let Some(state) = state.upgrade() else { return };
            let next = state.renew_all(&mut failures).await;
            let made = state.made.load(std::sync::atomic::Ordering::Relaxed);
            let made_some = state
                .released
                .swap(made, std::sync::atomic::Ordering::Relaxed)
                != made;
            let sleep = next
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .max(Duration::from_millis(10));
            // Wake early when the set of local identities changes.
            let changed = async move { state.changed.notified().await };
            (tokio::time::timeout(sleep, changed), made_some)
        };
        if made_some {
            // Making a key and getting its certificate (signed here, or fetched by this task
            // or a connection that came first) ran code nothing on the data path runs: key
            // generation, the CA client's TLS and gRPC, X.509 parsing. Its pages, and what it
            // freed, are handed back (a busy node never goes quiet); not at once, as the
            // exchange goes on after the answer has come: the CA connection's own task reads
            // the stream's end and gives its window back, over TLS. Handed back before that,
            // its pages were mapped again for good a few milliseconds later.
            tokio::time::sleep(RELEASE_AFTER).await;
            crate::memory::release();
        }
        let _ = sleep.await;
    }
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Local> {
        self.local.lock()
    }

    /// Renews every local identity that is due (`failures`: consecutive failures per identity,
    /// for the backoff of the next attempt). Returns when the next round is due.
    async fn renew_all(&self, failures: &mut HashMap<SpiffeId, u32>) -> SystemTime {
        let now = SystemTime::now();
        let ids: Vec<SpiffeId> = self.lock().ids.iter().cloned().collect();
        failures.retain(|id, _| ids.contains(id));
        let mut next = now + ROTATION_MAX_SLEEP;
        for id in ids {
            match self.renew(&id).await {
                Ok(svid) => {
                    failures.remove(&id);
                    next = next.min(svid.refresh_at);
                }
                // Removed meanwhile, or the CA cannot sign: retry with backoff. The SVID held
                // (if any) keeps serving until it expires.
                Err(e) => {
                    let n = failures.entry(id.clone()).or_default();
                    *n = n.saturating_add(1);
                    // Never so long that the SVID held expires before the next attempt.
                    let remaining = self
                        .lock()
                        .svids
                        .get(&id)
                        .and_then(|s| s.not_after.duration_since(now).ok())
                        .map_or(RETRY_MAX, |r| (r / 4).max(RETRY_MIN));
                    let wait = Duration::from_secs(1u64 << (*n - 1).min(5))
                        .min(RETRY_MAX)
                        .min(remaining);
                    warn!(identity = %id, error = %format!("{e:#}"), retry_in = ?wait, "getting SVID failed");
                    next = next.min(now + wait);
                }
            }
        }
        next
    }

    fn is_local(&self, id: &SpiffeId) -> bool {
        self.lock().ids.contains(id)
    }

    pub(crate) fn svid(&self, id: &SpiffeId) -> Result<Arc<Svid>> {
        let mut local = self.lock();
        if !local.ids.contains(id) {
            bail!("{id} is not an identity hosted on this node");
        }
        let now = SystemTime::now();
        let held = local.svids.get(id);
        match &self.authority {
            Authority::Key(ca) => {
                if let Some(s) = held.filter(|s| now < s.refresh_at) {
                    return Ok(s.clone());
                }
                let svid = Arc::new(self.mint(ca, id, now)?);
                debug!(identity = %id, serial = %svid.serial, "minted SVID");
                local.svids.insert(id.clone(), svid.clone());
                self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(svid)
            }
            Authority::Service(ca) => match held.filter(|s| now < s.not_after) {
                Some(s) => Ok(s.clone()),
                None => bail!("no certificate for {id} yet from the CA {}", ca.address()),
            },
        }
    }

    /// [`State::svid`], asking the CA service when it has none.
    async fn ready(&self, id: &SpiffeId) -> Result<Arc<Svid>> {
        if let Ok(svid) = self.svid(id) {
            return Ok(svid);
        }
        let Authority::Service(ca) = &self.authority else {
            return self.svid(id);
        };
        let _one = self.fetching.lock().await;
        if let Ok(svid) = self.svid(id) {
            return Ok(svid);
        }
        self.fetch(ca, id).await
    }

    /// The SVID of `id` renewed if it is due: what the rotation task calls.
    async fn renew(&self, id: &SpiffeId) -> Result<Arc<Svid>> {
        let Authority::Service(ca) = &self.authority else {
            return self.svid(id);
        };
        let _one = self.fetching.lock().await;
        let due = {
            let local = self.lock();
            match local.svids.get(id) {
                Some(s) if SystemTime::now() < s.refresh_at => return Ok(s.clone()),
                _ => true,
            }
        };
        debug_assert!(due);
        self.fetch(ca, id).await
    }

    /// A new key, a CSR for `id` to the CA service, and the answer kept if `id` is still local.
    async fn fetch(&self, ca: &ca_client::CaClient, id: &SpiffeId) -> Result<Arc<Svid>> {
        if !self.is_local(id) {
            bail!("{id} is not an identity hosted on this node");
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let chain = match ca.sign(id, &key, self.ttl).await {
            Ok(chain) => {
                self.issued
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                chain
            }
            Err(e) => {
                self.failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *self.last_error.lock() = Some(format!("{id}: {e:#}"));
                return Err(e);
            }
        };
        let now = SystemTime::now();
        let (serial, not_before, not_after) = {
            let (_, x) = x509_parser::parse_x509_certificate(&chain[0])
                .map_err(|e| anyhow!("the certificate from the CA: {e}"))?;
            let v = x.validity();
            (
                hex(x.raw_serial()),
                UNIX_EPOCH + Duration::from_secs(v.not_before.timestamp().max(0) as u64),
                UNIX_EPOCH + Duration::from_secs(v.not_after.timestamp().max(0) as u64),
            )
        };
        if not_after <= now {
            bail!(
                "the CA {} signed a certificate that has expired",
                ca.address()
            );
        }
        let svid = Arc::new(self.assemble(id, key, chain, serial, not_before, not_after, now)?);
        info!(identity = %id, serial = %svid.serial, not_after = %OffsetDateTime::from(not_after), "SVID from the CA");
        let mut local = self.lock();
        if !local.ids.contains(id) {
            bail!("{id} is no longer hosted on this node");
        }
        local.svids.insert(id.clone(), svid.clone());
        self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(svid)
    }

    /// The local identity a client asked for by SNI.
    pub(crate) fn local_by_sni(&self, name: &str) -> Option<SpiffeId> {
        let local = self.lock();
        if let Some(id) = identity_from_sni(name) {
            return local.ids.contains(&id).then_some(id);
        }
        // The hashed form of long identities.
        let name = name.to_ascii_lowercase();
        local.ids.iter().find(|id| sni_for(id) == name).cloned()
    }

    fn mint(&self, ca: &issuer::LocalCa, id: &SpiffeId, now: SystemTime) -> Result<Svid> {
        if id.trust_domain() != self.trust_domain {
            bail!(
                "{id} is not in this node's trust domain {}",
                self.trust_domain
            );
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let signed = ca.sign_svid(id, &key, self.ttl, now)?;
        let mut chain = Vec::with_capacity(1 + ca.intermediates().len());
        chain.push(signed.leaf);
        chain.extend(ca.intermediates().iter().cloned());
        self.assemble(
            id,
            key,
            chain,
            hex(&signed.serial),
            signed.not_before,
            signed.not_after,
            now,
        )
    }

    /// An SVID of a chain and its key, due for renewal at half of its remaining lifetime.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        &self,
        id: &SpiffeId,
        key: KeyPair,
        chain: Vec<CertificateDer<'static>>,
        serial: String,
        not_before: SystemTime,
        not_after: SystemTime,
        now: SystemTime,
    ) -> Result<Svid> {
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = self
            .provider
            .key_provider
            .load_private_key(key_der.clone_key())?;
        let certified = Arc::new(CertifiedKey::new(chain.clone(), signer));
        let lifetime = not_after.duration_since(now).unwrap_or_default();
        Ok(Svid {
            id: id.clone(),
            chain,
            key: key_der,
            serial,
            not_before,
            not_after,
            refresh_at: now + lifetime / 2,
            certified,
        })
    }
}

fn truncate_to_secs(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// 16 random bytes, positive and without a leading zero byte, so the DER encoding and the hex
/// form agree.
fn random_serial(provider: &CryptoProvider) -> Result<[u8; 16]> {
    let mut serial = [0u8; 16];
    provider
        .secure_random
        .fill(&mut serial)
        .map_err(|_| anyhow!("no randomness for a serial number"))?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn is_self_signed(cert: &CertificateDer<'_>) -> bool {
    match x509_parser::parse_x509_certificate(cert) {
        Ok((_, x)) => x.subject().as_raw() == x.issuer().as_raw(),
        Err(_) => false,
    }
}

/// Creates a mesh root CA in `out_dir`: an ECDSA P-256 self-signed certificate (`ca.crt`, CA,
/// keyCertSign + cRLSign) valid for `validity`, and its PKCS#8 key (`ca.key`, mode 0600).
/// Refuses to overwrite an existing CA. Backs `weft ca init --out DIR`.
pub fn init_ca(out_dir: &Path, trust_domain: &str, validity: Duration) -> Result<()> {
    validate_trust_domain(trust_domain)?;
    let (crt, key) = ca_paths(out_dir)?;
    let provider = tls::provider();
    let key_pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(trust_domain, "weft root CA", validity, &provider)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key_pair)?;
    write_ca(&crt, &cert.pem(), &key, &key_pair.serialize_pem())?;
    info!(cert = %crt.display(), trust_domain, "created mesh root CA");
    Ok(())
}

/// Creates an intermediate CA in `out_dir`, signed by the CA in `parent_cert`/`parent_key`:
/// `ca.crt` holds the intermediate followed by the parent's chain (so a node configured with it
/// trusts the root), `ca.key` its key (0600). Lets the root key stay offline.
pub fn init_intermediate_ca(
    parent_cert: &Path,
    parent_key: &Path,
    out_dir: &Path,
    trust_domain: &str,
    validity: Duration,
) -> Result<()> {
    validate_trust_domain(trust_domain)?;
    let (crt, key) = ca_paths(out_dir)?;
    let parent_chain = read_certs(parent_cert)?;
    let parent = parent_chain
        .first()
        .ok_or_else(|| anyhow!("{}: no certificate", parent_cert.display()))?;
    let parent_key = KeyPair::from_pem(
        &fs::read_to_string(parent_key)
            .with_context(|| format!("reading {}", parent_key.display()))?,
    )?;
    let issuer = Issuer::from_ca_cert_der(parent, parent_key)?;
    let provider = tls::provider();
    let key_pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(trust_domain, "weft intermediate CA", validity, &provider)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key_pair, &issuer)?;
    let mut pem = cert.pem();
    for c in &parent_chain {
        pem.push_str(&pem_encode("CERTIFICATE", c));
    }
    write_ca(&crt, &pem, &key, &key_pair.serialize_pem())?;
    info!(cert = %crt.display(), trust_domain, "created intermediate CA");
    Ok(())
}

fn ca_paths(out_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let crt = out_dir.join("ca.crt");
    let key = out_dir.join("ca.key");
    for p in [&crt, &key] {
        if p.exists() {
            bail!("{} already exists; not overwriting a CA", p.display());
        }
    }
    Ok((crt, key))
}

fn ca_params(
    trust_domain: &str,
    cn: &str,
    validity: Duration,
    provider: &CryptoProvider,
) -> Result<CertificateParams> {
    let now = truncate_to_secs(SystemTime::now());
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::from(now - NOT_BEFORE_SKEW);
    params.not_after = OffsetDateTime::from(now + validity);
    params.serial_number = Some(SerialNumber::from_slice(&random_serial(provider)?));
    Ok(params)
}

fn write_ca(crt: &Path, crt_pem: &str, key: &Path, key_pem: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key)
        .with_context(|| format!("creating {}", key.display()))?;
    f.write_all(key_pem.as_bytes())?;
    f.sync_all()?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(crt)
        .with_context(|| format!("creating {}", crt.display()))?;
    f.write_all(crt_pem.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// PEM armour (RFC 7468) around DER bytes.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (chunk[0] as u32) << 16
            | (chunk.get(1).copied().unwrap_or(0) as u32) << 8
            | chunk.get(2).copied().unwrap_or(0) as u32;
        for i in 0..4 {
            if i <= n {
                b64.push(B64[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests;
