//! TLS 1.3 AES-GCM records sealed from the plaintext where it lies.
//!
//! rustls's encrypter copies a record's plaintext into the record's buffer and seals it there
//! (aws-lc-rs seals in place only): on a bulk HBONE stream that copy cost the sending node more
//! than the encryption itself. This encrypter zero-fills the record's buffer (its only way to
//! grow) and lets AWS-LC's GCM read each piece of plaintext from where it is and write the
//! ciphertext into the record. The bytes on the wire are the same: only the copy is gone.
//! Decryption, key lengths and key export are rustls's own.

use std::ffi::c_int;
use std::ptr;
use std::sync::LazyLock;

use aws_lc_sys::{
    EVP_CIPHER_CTX_ctrl, EVP_CIPHER_CTX_free, EVP_CIPHER_CTX_new, EVP_EncryptFinal_ex,
    EVP_EncryptInit_ex, EVP_EncryptUpdate, EVP_aes_128_gcm, EVP_aes_256_gcm, EVP_CIPHER_CTX,
    EVP_CTRL_GCM_GET_TAG,
};
use rustls::crypto::aws_lc_rs::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
use rustls::crypto::cipher::{
    make_tls13_aad, AeadKey, Iv, MessageDecrypter, MessageEncrypter, Nonce, OutboundChunks,
    OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload, Tls13AeadAlgorithm,
    UnsupportedOperationError,
};
use rustls::crypto::CipherSuiteCommon;
use rustls::{
    ConnectionTrafficSecrets, ContentType, Error, ProtocolVersion, SupportedCipherSuite,
    Tls13CipherSuite,
};

const TAG_LEN: usize = 16;

/// aws-lc-rs's TLS 1.3 AES-GCM suites (AES-128 first), their records sealed by [`Sealer`].
pub(crate) fn aes_gcm_suites() -> [SupportedCipherSuite; 2] {
    static AEADS: LazyLock<[Aead; 2]> = LazyLock::new(|| {
        [TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384].map(|suite| Aead {
            inner: tls13(suite).aead_alg,
        })
    });
    static SUITES: LazyLock<[Tls13CipherSuite; 2]> = LazyLock::new(|| {
        let [aes_128, aes_256] = &*AEADS;
        [
            sealed_by(tls13(TLS13_AES_128_GCM_SHA256), aes_128),
            sealed_by(tls13(TLS13_AES_256_GCM_SHA384), aes_256),
        ]
    });
    let [aes_128, aes_256] = &*SUITES;
    [
        SupportedCipherSuite::Tls13(aes_128),
        SupportedCipherSuite::Tls13(aes_256),
    ]
}

fn tls13(suite: SupportedCipherSuite) -> &'static Tls13CipherSuite {
    suite.tls13().expect("a TLS 1.3 suite")
}

fn sealed_by(suite: &'static Tls13CipherSuite, aead: &'static Aead) -> Tls13CipherSuite {
    Tls13CipherSuite {
        common: CipherSuiteCommon {
            suite: suite.common.suite,
            hash_provider: suite.common.hash_provider,
            confidentiality_limit: suite.common.confidentiality_limit,
        },
        hkdf_provider: suite.hkdf_provider,
        aead_alg: aead,
        quic: suite.quic,
    }
}

/// AES-GCM for TLS 1.3: rustls's own algorithm for everything but encryption.
struct Aead {
    inner: &'static dyn Tls13AeadAlgorithm,
}

impl Tls13AeadAlgorithm for Aead {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        match Sealer::new(key.as_ref(), iv) {
            Ok(sealer) => Box::new(sealer),
            Err(iv) => self.inner.encrypter(key, iv),
        }
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        self.inner.decrypter(key, iv)
    }

    fn key_len(&self) -> usize {
        self.inner.key_len()
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: Iv,
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        self.inner.extract_keys(key, iv)
    }
}

/// One direction's AES-GCM key, expanded once, in an AWS-LC cipher context.
struct Sealer {
    ctx: ptr::NonNull<EVP_CIPHER_CTX>,
    iv: Iv,
}

// The context is touched only through `&mut self` (sealing) and in `drop`.
unsafe impl Send for Sealer {}
unsafe impl Sync for Sealer {}

impl Sealer {
    /// A sealer for an AES-128 or AES-256 key; `iv` back for another length or if AWS-LC
    /// fails.
    fn new(key: &[u8], iv: Iv) -> Result<Self, Iv> {
        // SAFETY: the cipher getters return static tables; `key` is as long as the cipher's
        // key; a context from `_new` is freed here on failure, by `drop` otherwise.
        unsafe {
            let cipher = match key.len() {
                16 => EVP_aes_128_gcm(),
                32 => EVP_aes_256_gcm(),
                _ => return Err(iv),
            };
            let Some(ctx) = ptr::NonNull::new(EVP_CIPHER_CTX_new()) else {
                return Err(iv);
            };
            let keyed = EVP_EncryptInit_ex(
                ctx.as_ptr(),
                cipher,
                ptr::null_mut(),
                key.as_ptr(),
                ptr::null(),
            );
            if keyed != 1 {
                EVP_CIPHER_CTX_free(ctx.as_ptr());
                return Err(iv);
            }
            Ok(Self { ctx, iv })
        }
    }

    /// Seals `payload ‖ typ` under `seq` into `out`, which is exactly as long as the
    /// ciphertext and its tag.
    fn seal(
        &mut self,
        payload: &OutboundChunks<'_>,
        typ: ContentType,
        seq: u64,
        out: &mut [u8],
    ) -> Option<()> {
        let nonce = Nonce::new(&self.iv, seq).0;
        let aad = make_tls13_aad(out.len());
        let ctx = self.ctx.as_ptr();
        let mut at = 0;
        let update = |input: *const u8, len: usize, out: &mut [u8], at: &mut usize| {
            if len == 0 {
                return Some(());
            }
            let room = out.len().checked_sub(*at)?;
            if len > room || len > c_int::MAX as usize {
                return None;
            }
            let mut written: c_int = 0;
            // SAFETY: `input` points at `len` readable bytes and `out[*at..]` has room for
            // them (GCM writes exactly its input's length); the context has its key.
            let ok = unsafe {
                EVP_EncryptUpdate(
                    ctx,
                    out.as_mut_ptr().add(*at),
                    &mut written,
                    input,
                    len as c_int,
                )
            };
            (ok == 1 && written as usize == len).then(|| *at += len)
        };
        let mut ignored: c_int = 0;
        // SAFETY: the nonce is the cipher's 12-byte IV; the AAD is read, nothing written.
        unsafe {
            if EVP_EncryptInit_ex(
                ctx,
                ptr::null(),
                ptr::null_mut(),
                ptr::null(),
                nonce.as_ptr(),
            ) != 1
                || EVP_EncryptUpdate(
                    ctx,
                    ptr::null_mut(),
                    &mut ignored,
                    aad.as_ptr(),
                    aad.len() as c_int,
                ) != 1
            {
                return None;
            }
        }
        for_each_chunk(payload, |chunk| {
            update(chunk.as_ptr(), chunk.len(), out, &mut at)
        })?;
        let typ = [u8::from(typ)];
        update(typ.as_ptr(), 1, out, &mut at)?;
        if out.len() - at != TAG_LEN {
            return None;
        }
        let tag = &mut out[at..];
        // SAFETY: GCM's final writes nothing; the tag is `TAG_LEN` bytes into `tag`.
        unsafe {
            if EVP_EncryptFinal_ex(ctx, tag.as_mut_ptr(), &mut ignored) != 1
                || EVP_CIPHER_CTX_ctrl(
                    ctx,
                    EVP_CTRL_GCM_GET_TAG as c_int,
                    TAG_LEN as c_int,
                    tag.as_mut_ptr().cast(),
                ) != 1
            {
                return None;
            }
        }
        Some(())
    }
}

/// Calls `f` on each piece of `chunks` (the window rustls cut out of them), in order, until it
/// fails; a piece may be empty.
fn for_each_chunk(
    chunks: &OutboundChunks<'_>,
    mut f: impl FnMut(&[u8]) -> Option<()>,
) -> Option<()> {
    match *chunks {
        OutboundChunks::Single(chunk) => f(chunk),
        OutboundChunks::Multiple { chunks, start, end } => {
            let mut offset = 0;
            for chunk in chunks {
                let (from, to) = (offset, offset + chunk.len());
                offset = to;
                if to <= start || from >= end {
                    continue;
                }
                let lo = start.saturating_sub(from);
                let hi = end.min(to) - from;
                f(&chunk[lo..hi])?;
            }
            Some(())
        }
    }
}

impl MessageEncrypter for Sealer {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, Error> {
        let total = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total);
        payload.extend(std::iter::repeat_n(&0u8, total));
        self.seal(&msg.payload, msg.typ, seq, payload.as_mut())
            .ok_or(Error::EncryptError)?;
        Ok(OutboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            payload,
        ))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + TAG_LEN
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        // SAFETY: the context came from `EVP_CIPHER_CTX_new` and is freed once.
        unsafe { EVP_CIPHER_CTX_free(self.ctx.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce as AeadNonce, UnboundKey, AES_128_GCM};

    #[test]
    fn the_mesh_provider_seals_aes_gcm_records_here() {
        let provider = super::super::tls::provider();
        let sealed = aes_gcm_suites();
        assert_eq!(provider.cipher_suites.len(), 3);
        for (offered, ours) in provider.cipher_suites.iter().zip(&sealed) {
            let (SupportedCipherSuite::Tls13(offered), SupportedCipherSuite::Tls13(ours)) =
                (offered, ours)
            else {
                panic!("the mesh speaks TLS 1.3 only");
            };
            assert!(
                std::ptr::eq(*offered, *ours),
                "{:?} is not sealed here",
                offered.common.suite
            );
        }
    }

    fn plain<'a>(payload: OutboundChunks<'a>) -> OutboundPlainMessage<'a> {
        OutboundPlainMessage {
            typ: ContentType::ApplicationData,
            version: ProtocolVersion::TLSv1_2,
            payload,
        }
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    /// Every way a record's plaintext arrives: one piece, several, and a window of several
    /// (as rustls hands over a record cut out of a vectored write).
    fn shapes(data: &[u8]) -> Vec<Vec<&[u8]>> {
        let n = data.len();
        vec![
            vec![data],
            vec![&data[..n / 3], &data[n / 3..n / 2], &data[n / 2..]],
            vec![&data[..0], &data[..n.min(9)], &[], &data[n.min(9)..]],
        ]
    }

    #[test]
    fn records_are_the_bytes_rustls_seals() {
        let key = [7u8; 32];
        let aead = tls13(TLS13_AES_256_GCM_SHA384).aead_alg;
        let mut theirs = aead.encrypter(AeadKey::from(key), Iv::from([3; 12]));
        let Ok(mut ours) = Sealer::new(&key, Iv::from([3; 12])) else {
            panic!("no sealer for a 32-byte key");
        };
        let data = data(40_000);
        let mut seq = 0;
        for len in [0, 1, 15, 16, 17, 1000, 16_384] {
            let data = &data[..len];
            for pieces in shapes(data) {
                let expected = theirs
                    .encrypt(plain(OutboundChunks::Single(data)), seq)
                    .unwrap()
                    .encode();
                let got = ours
                    .encrypt(plain(OutboundChunks::new(&pieces)), seq)
                    .unwrap()
                    .encode();
                assert_eq!(got, expected, "{len} bytes in {} pieces", pieces.len());
                seq += 1;
            }
        }
        // A window that starts and ends inside pieces.
        let pieces: [&[u8]; 3] = [&data[..100], &data[100..5000], &data[5000..9000]];
        let (_, window) = OutboundChunks::new(&pieces).split_at(50);
        let (window, _) = window.split_at(6000);
        let expected = theirs
            .encrypt(plain(OutboundChunks::Single(&data[50..6050])), seq)
            .unwrap()
            .encode();
        let got = ours.encrypt(plain(window), seq).unwrap().encode();
        assert_eq!(got, expected);
    }

    #[test]
    fn aes_128_records_open_with_the_key() {
        let key = [9u8; 16];
        let iv = [5u8; 12];
        let Ok(mut ours) = Sealer::new(&key, Iv::from(iv)) else {
            panic!("no sealer for a 16-byte key");
        };
        let opener = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).unwrap());
        let data = data(3000);
        for (seq, pieces) in shapes(&data).into_iter().enumerate() {
            let seq = seq as u64 + 41;
            let record = ours
                .encrypt(plain(OutboundChunks::new(&pieces)), seq)
                .unwrap()
                .encode();
            let (header, body) = record.split_at(5);
            assert_eq!(header, make_tls13_aad(body.len()));
            let mut body = body.to_vec();
            let nonce = AeadNonce::assume_unique_for_key(Nonce::new(&Iv::from(iv), seq).0);
            let opened = opener
                .open_in_place(nonce, Aad::from(header), &mut body)
                .unwrap();
            let (content, typ) = opened.split_at(opened.len() - 1);
            assert_eq!(content, &data[..]);
            assert_eq!(typ, [u8::from(ContentType::ApplicationData)]);
        }
    }

    #[test]
    fn other_keys_are_left_to_rustls() {
        assert!(Sealer::new(&[1; 24], Iv::from([0; 12])).is_err());
        let suites = aes_gcm_suites();
        let names = suites.map(|s| s.suite());
        assert_eq!(
            names,
            [
                TLS13_AES_128_GCM_SHA256.suite(),
                TLS13_AES_256_GCM_SHA384.suite()
            ]
        );
        for suite in suites {
            let ours = tls13(suite);
            assert!(ours.aead_alg.key_len() == 16 || ours.aead_alg.key_len() == 32);
        }
    }
}
