//! The signing half of a CA: its certificate and key, loaded and checked, and the one way an SVID
//! is made from a public key and a SPIFFE id. `weft ca serve` signs with it for the nodes;
//! `weft node --ca-key` (single-node and development mode) signs with it for itself.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use super::{is_self_signed, random_serial, read_certs, truncate_to_secs, SpiffeId};
use super::{tls, NOT_BEFORE_SKEW};

/// A CA that can sign: the issuing certificate (root or intermediate) with its key.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// notAfter of the issuing CA: what it signs never outlives it.
    not_after: SystemTime,
    /// Sent after a leaf: the issuing CA when it is an intermediate, and further intermediates.
    intermediates: Vec<CertificateDer<'static>>,
    /// The self-signed certificates of the CA file: the roots its chains end in.
    roots: Vec<CertificateDer<'static>>,
    provider: CryptoProvider,
}

/// A leaf certificate just signed.
pub struct Signed {
    pub leaf: CertificateDer<'static>,
    pub serial: [u8; 16],
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl LocalCa {
    /// Reads the CA certificate file (issuing certificate first, then the rest of its chain) and
    /// its private key, and checks that they belong together, are a CA, and have not expired.
    pub fn load(ca_cert: &Path, ca_key: &Path) -> Result<LocalCa> {
        let key_pem = fs::read_to_string(ca_key)
            .with_context(|| format!("reading the CA key {}", ca_key.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("parsing the CA key {}", ca_key.display()))?;
        let certs = read_certs(ca_cert)?;
        let issuing = certs
            .first()
            .ok_or_else(|| anyhow!("{}: no certificate", ca_cert.display()))?;
        let not_after = {
            let (_, x) = x509_parser::parse_x509_certificate(issuing)
                .map_err(|e| anyhow!("{}: {e}", ca_cert.display()))?;
            if !x.is_ca() {
                bail!("{}: not a CA certificate", ca_cert.display());
            }
            if x.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                bail!(
                    "{} does not belong to the CA certificate {}",
                    ca_key.display(),
                    ca_cert.display()
                );
            }
            let t = x.validity().not_after.timestamp();
            UNIX_EPOCH + Duration::from_secs(t.max(0) as u64)
        };
        if not_after <= SystemTime::now() {
            bail!("the CA certificate {} has expired", ca_cert.display());
        }
        let issuer = Issuer::from_ca_cert_der(issuing, key)
            .map_err(|e| anyhow!("{}: {e}", ca_cert.display()))?;
        let (roots, intermediates) = certs.into_iter().partition(|c| is_self_signed(c));
        Ok(LocalCa {
            issuer,
            not_after,
            intermediates,
            roots,
            provider: tls::provider(),
        })
    }

    /// The certificates sent after a leaf this CA signed (up to, not including, the root).
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// The self-signed certificates of the CA file.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs an SVID for `id` over `public_key`: an end-entity certificate whose only SAN is the
    /// SPIFFE id, for client and server authentication, valid from `now` (less the clock-skew
    /// allowance) for `ttl`, never past the CA's own notAfter.
    pub fn sign_svid(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Signed> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(params, public_key, ttl, now)
    }

    /// Signs a TLS server certificate for `names` (DNS names or IP addresses): what
    /// `weft ca serve` presents to the nodes.
    pub fn sign_server(
        &self,
        names: &[String],
        public_key: &impl PublicKeyData,
        ttl: Duration,
    ) -> Result<Signed> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, public_key, ttl, SystemTime::now())
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Signed> {
        let now_s = truncate_to_secs(now);
        let not_before = now_s - NOT_BEFORE_SKEW;
        let not_after = (now_s + ttl).min(self.not_after);
        if not_after <= now {
            bail!("the CA certificate has expired");
        }
        let serial = random_serial(&self.provider)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(Signed {
            leaf: cert.der().clone(),
            serial,
            not_before,
            not_after,
        })
    }
}
