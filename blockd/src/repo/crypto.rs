//! Keys and sealing.
//!
//! A repository has 64 bytes of key material: an *id key* (keyed BLAKE3 for
//! chunk and index ids, and for the integrity tags of unencrypted objects)
//! and a *data key* (AES-256-GCM-SIV). With a passphrase the material is
//! wrapped in the config object by a key derived with Argon2id; without one
//! it is stored in the clear and objects are sealed with a keyed BLAKE3 tag
//! instead of encrypted, so corruption is still detected.
//!
//! Every sealed object binds its own name (associated data): an object
//! swapped for another, or a chunk moved inside a pack, fails to open.

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use zeroize::Zeroizing;

/// Bytes added by [`Keys::seal`] when encrypting: nonce + tag.
pub const SEAL_OVERHEAD_ENCRYPTED: usize = 12 + 16;
/// Bytes added by [`Keys::seal`] without encryption: the tag.
pub const SEAL_OVERHEAD_PLAIN: usize = 16;

/// Argon2id cost used for new repositories.
pub const ARGON2_M_KIB: u32 = 64 * 1024;
/// Argon2id passes.
pub const ARGON2_T: u32 = 3;
/// Argon2id lanes.
pub const ARGON2_P: u32 = 1;

/// The key material of one repository.
#[derive(Clone)]
pub struct Keys {
    id_key: [u8; 32],
    mac_key: [u8; 32],
    cipher: Option<Box<Aes256GcmSiv>>,
}

impl Drop for Keys {
    fn drop(&mut self) {
        // The cipher wipes its own key schedule (aes's `zeroize`).
        zeroize::Zeroize::zeroize(&mut self.id_key);
        zeroize::Zeroize::zeroize(&mut self.mac_key);
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("encrypted", &self.cipher.is_some())
            .finish_non_exhaustive()
    }
}

/// An object failed to open: corrupt, truncated, swapped, or the wrong key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("integrity check failed")]
pub struct Tampered;

impl Keys {
    /// Keys from 64 bytes of material (id key, data key).
    pub fn new(material: &[u8; 64], encrypted: bool) -> Self {
        let mut id_key = [0u8; 32];
        id_key.copy_from_slice(&material[..32]);
        let mac_key = blake3::derive_key(crate::magic::TAG_KEY_CONTEXT, &id_key);
        let cipher = encrypted.then(|| {
            Box::new(
                Aes256GcmSiv::new_from_slice(&material[32..])
                    .unwrap_or_else(|_| unreachable!("a 32-byte key is always valid")),
            )
        });
        Self {
            id_key,
            mac_key,
            cipher,
        }
    }

    /// True when objects are encrypted.
    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// Keyed BLAKE3 of `data`: chunk ids.
    pub fn chunk_id(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id_key, data).as_bytes()
    }

    /// Keyed BLAKE3 of a domain tag and `data`: index block ids.
    pub fn object_id(&self, domain: &[u8], data: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.id_key);
        h.update(&(domain.len() as u64).to_le_bytes());
        h.update(domain);
        h.update(data);
        *h.finalize().as_bytes()
    }

    fn tag(&self, ad: &[u8], plain: &[u8]) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.mac_key);
        h.update(&(ad.len() as u64).to_le_bytes());
        h.update(ad);
        h.update(plain);
        let mut t = [0u8; 16];
        t.copy_from_slice(&h.finalize().as_bytes()[..16]);
        t
    }

    /// Bytes `seal` adds.
    pub fn overhead(&self) -> usize {
        if self.encrypted() {
            SEAL_OVERHEAD_ENCRYPTED
        } else {
            SEAL_OVERHEAD_PLAIN
        }
    }

    /// Seals `plain`, bound to `ad`, appending to `out`.
    /// Encrypted: `nonce(12) | ciphertext | tag(16)`; plain: `plain | tag(16)`.
    pub fn seal_into(&self, ad: &[u8], plain: &[u8], out: &mut Vec<u8>) {
        match &self.cipher {
            Some(c) => {
                let mut nonce = [0u8; 12];
                fill_random(&mut nonce);
                let ct = c
                    .encrypt(
                        &Nonce::from(nonce),
                        Payload {
                            msg: plain,
                            aad: ad,
                        },
                    )
                    .unwrap_or_else(|_| unreachable!("AES-GCM-SIV encryption cannot fail"));
                out.extend_from_slice(&nonce);
                out.extend_from_slice(&ct);
            }
            None => {
                out.extend_from_slice(plain);
                out.extend_from_slice(&self.tag(ad, plain));
            }
        }
    }

    /// Seals into a new buffer.
    pub fn seal(&self, ad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plain.len() + self.overhead());
        self.seal_into(ad, plain, &mut out);
        out
    }

    /// Opens what [`Keys::seal`] made.
    ///
    /// # Errors
    /// [`Tampered`] when the bytes, the name or the key do not match.
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Tampered> {
        if sealed.len() < self.overhead() {
            return Err(Tampered);
        }
        match &self.cipher {
            Some(c) => {
                let (nonce, ct) = sealed.split_at(12);
                let mut n = [0u8; 12];
                n.copy_from_slice(nonce);
                c.decrypt(&Nonce::from(n), Payload { msg: ct, aad: ad })
                    .map_err(|_| Tampered)
            }
            None => {
                let (plain, tag) = sealed.split_at(sealed.len() - 16);
                if constant_eq(&self.tag(ad, plain), tag) {
                    Ok(plain.to_vec())
                } else {
                    Err(Tampered)
                }
            }
        }
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Fills `buf` from the OS random source.
pub fn fill_random(buf: &mut [u8]) {
    getrandom::fill(buf).unwrap_or_else(|e| panic!("the OS random source failed: {e}"));
}

/// Derives the key-encryption key from a passphrase with Argon2id.
///
/// # Errors
/// Unusable parameters (from a damaged config).
pub fn derive_kek(
    passphrase: &str,
    salt: &[u8],
    m_kib: u32,
    t: u32,
    p: u32,
) -> Result<Zeroizing<[u8; 32]>, String> {
    // Refuse costs a damaged config could use to exhaust memory or time.
    if m_kib > 4 * 1024 * 1024 || t > 64 || p > 64 {
        return Err(format!(
            "key derivation parameters out of range (m={m_kib} KiB, t={t}, p={p})"
        ));
    }
    let params = argon2::Params::new(m_kib, t, p, Some(32)).map_err(|e| e.to_string())?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(passphrase.as_bytes(), salt, &mut *out)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Wraps key material under a key-encryption key.
pub fn wrap(kek: &[u8; 32], material: &[u8; 64], nonce: &[u8; 12]) -> Vec<u8> {
    let c = Aes256GcmSiv::new_from_slice(kek)
        .unwrap_or_else(|_| unreachable!("a 32-byte key is always valid"));
    c.encrypt(
        &Nonce::from(*nonce),
        Payload {
            msg: material,
            aad: b"blockd repository keys v1",
        },
    )
    .unwrap_or_else(|_| unreachable!("AES-GCM-SIV encryption cannot fail"))
}

/// Unwraps key material; `None` means the passphrase is wrong (or the
/// config was altered).
pub fn unwrap(kek: &[u8; 32], wrapped: &[u8], nonce: &[u8; 12]) -> Option<Zeroizing<[u8; 64]>> {
    let c = Aes256GcmSiv::new_from_slice(kek).ok()?;
    let plain = Zeroizing::new(
        c.decrypt(
            &Nonce::from(*nonce),
            Payload {
                msg: wrapped,
                aad: b"blockd repository keys v1",
            },
        )
        .ok()?,
    );
    let mut out = Zeroizing::new([0u8; 64]);
    if plain.len() != out.len() {
        return None;
    }
    out.copy_from_slice(&plain);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_binds_name_and_detects_flips() {
        for encrypted in [false, true] {
            let k = Keys::new(&[7u8; 64], encrypted);
            let s = k.seal(b"name-a", b"hello world");
            assert_eq!(k.open(b"name-a", &s).unwrap(), b"hello world");
            assert_eq!(k.open(b"name-b", &s), Err(Tampered));
            for i in 0..s.len() {
                let mut bad = s.clone();
                bad[i] ^= 1;
                assert_eq!(k.open(b"name-a", &bad), Err(Tampered), "flip at {i}");
            }
            assert_eq!(k.open(b"name-a", &s[..s.len() - 1]), Err(Tampered));
            assert_eq!(k.open(b"name-a", &[]), Err(Tampered));
        }
    }

    #[test]
    fn wrong_key_fails() {
        let a = Keys::new(&[1u8; 64], true);
        let b = Keys::new(&[2u8; 64], true);
        assert_eq!(b.open(b"x", &a.seal(b"x", b"data")), Err(Tampered));
    }

    #[test]
    fn wrap_roundtrip() {
        let kek = derive_kek("correct horse", b"0123456789abcdef", 64, 1, 1).unwrap();
        let wrong = derive_kek("wrong horse", b"0123456789abcdef", 64, 1, 1).unwrap();
        let m = [9u8; 64];
        let w = wrap(&kek, &m, &[3u8; 12]);
        assert_eq!(unwrap(&kek, &w, &[3u8; 12]).as_deref(), Some(&m));
        assert_eq!(unwrap(&wrong, &w, &[3u8; 12]), None);
        assert!(derive_kek("x", b"0123456789abcdef", u32::MAX, 1, 1).is_err());
    }
}
