//! Data encryption for qcow2: LUKS1 (as qemu-img writes it into the image) and the legacy
//! qcow2 AES-CBC method (read-only).

use aes::cipher::{BlockDecryptMut, KeyInit, KeyIvInit};
use aes::{Aes128, Aes256};
use sha2::Digest;
use xts_mode::{get_tweak_default, Xts128};

/// Encryption errors.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The LUKS header is malformed.
    #[error("invalid LUKS header: {0}")]
    BadHeader(String),
    /// A cipher, mode or hash this implementation does not support.
    #[error("unsupported LUKS {what} '{value}'")]
    Unsupported {
        /// Which parameter.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// No key slot opens with the passphrase.
    #[error("invalid password, cannot unlock any keyslot")]
    BadPassphrase,
    /// Legacy AES images are read-only.
    #[error("writing legacy AES-encrypted images is not supported (convert to LUKS)")]
    LegacyWrite,
    /// Data not aligned to 512-byte sectors.
    #[error("encrypted I/O must be aligned to 512-byte sectors")]
    Unaligned,
    /// The system random source failed.
    #[error("random number generator failed: {0}")]
    Random(String),
    /// Invalid creation parameter.
    #[error("invalid encryption option: {0}")]
    Option(String),
}

const SECTOR: usize = 512;
const LUKS_MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
const NUM_SLOTS: usize = 8;
const STRIPES: u32 = 4000;
const DIGEST_LEN: usize = 20;
/// Bytes of the LUKS1 partition header.
pub const LUKS_HEADER_LEN: usize = 592;

enum Xts {
    Aes128(Box<Xts128<Aes128>>),
    Aes256(Box<Xts128<Aes256>>),
}

impl Xts {
    fn new(key: &[u8]) -> Result<Xts, CryptoError> {
        let half = key.len() / 2;
        match key.len() {
            32 => Ok(Xts::Aes128(Box::new(Xts128::new(
                Aes128::new_from_slice(&key[..half])
                    .map_err(|e| CryptoError::Option(e.to_string()))?,
                Aes128::new_from_slice(&key[half..])
                    .map_err(|e| CryptoError::Option(e.to_string()))?,
            )))),
            64 => Ok(Xts::Aes256(Box::new(Xts128::new(
                Aes256::new_from_slice(&key[..half])
                    .map_err(|e| CryptoError::Option(e.to_string()))?,
                Aes256::new_from_slice(&key[half..])
                    .map_err(|e| CryptoError::Option(e.to_string()))?,
            )))),
            n => Err(CryptoError::Unsupported {
                what: "key size",
                value: n.to_string(),
            }),
        }
    }

    fn encrypt(&self, buf: &mut [u8], first_sector: u64) {
        match self {
            Xts::Aes128(x) => {
                x.encrypt_area(buf, SECTOR, u128::from(first_sector), get_tweak_default)
            }
            Xts::Aes256(x) => {
                x.encrypt_area(buf, SECTOR, u128::from(first_sector), get_tweak_default)
            }
        }
    }

    fn decrypt(&self, buf: &mut [u8], first_sector: u64) {
        match self {
            Xts::Aes128(x) => {
                x.decrypt_area(buf, SECTOR, u128::from(first_sector), get_tweak_default)
            }
            Xts::Aes256(x) => {
                x.decrypt_area(buf, SECTOR, u128::from(first_sector), get_tweak_default)
            }
        }
    }
}

/// A data cipher for an open image.
pub enum Cipher {
    /// LUKS, aes-xts-plain64; IVs from host sector numbers.
    Luks(LuksCipher),
    /// Legacy qcow2 AES-128-CBC with plain64 IVs from guest sector numbers.
    LegacyAes([u8; 16]),
}

/// The unlocked LUKS data cipher.
pub struct LuksCipher {
    xts: Xts,
}

impl Cipher {
    /// Decrypts sectors read from host offset `host` (guest offset `guest`).
    pub fn decrypt(&self, host: u64, guest: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        if !host.is_multiple_of(512)
            || !buf.len().is_multiple_of(SECTOR)
            || !guest.is_multiple_of(512)
        {
            return Err(CryptoError::Unaligned);
        }
        match self {
            Cipher::Luks(c) => {
                c.xts.decrypt(buf, host / 512);
                Ok(())
            }
            Cipher::LegacyAes(key) => {
                for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
                    let mut iv = [0u8; 16];
                    iv[..8].copy_from_slice(&(guest / 512 + i as u64).to_le_bytes());
                    let dec = cbc::Decryptor::<Aes128>::new(key.into(), &iv.into());
                    dec.decrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(sector)
                        .map_err(|_| CryptoError::Unaligned)?;
                }
                Ok(())
            }
        }
    }

    /// Encrypts sectors to be written at host offset `host` (guest offset `guest`).
    pub fn encrypt(&self, host: u64, guest: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        if !host.is_multiple_of(512)
            || !buf.len().is_multiple_of(SECTOR)
            || !guest.is_multiple_of(512)
        {
            return Err(CryptoError::Unaligned);
        }
        match self {
            Cipher::Luks(c) => {
                c.xts.encrypt(buf, host / 512);
                Ok(())
            }
            Cipher::LegacyAes(_) => Err(CryptoError::LegacyWrite),
        }
    }

    /// The legacy qcow2 AES key: the passphrase's first 16 bytes, zero padded.
    pub fn legacy_aes(passphrase: &[u8]) -> Cipher {
        let mut key = [0u8; 16];
        let n = passphrase.len().min(16);
        key[..n].copy_from_slice(&passphrase[..n]);
        Cipher::LegacyAes(key)
    }

    /// Whether this is the writable LUKS cipher.
    pub fn is_luks(&self) -> bool {
        matches!(self, Cipher::Luks(_))
    }

    /// Used by the legacy-AES test to build images like qemu's.
    #[cfg(test)]
    pub(crate) fn legacy_encrypt_for_test(key: &[u8; 16], guest: u64, buf: &mut [u8]) {
        use aes::cipher::BlockEncryptMut;
        for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let mut iv = [0u8; 16];
            iv[..8].copy_from_slice(&(guest / 512 + i as u64).to_le_bytes());
            let enc = cbc::Encryptor::<Aes128>::new(key.into(), &iv.into());
            let _ = enc.encrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(sector, SECTOR);
        }
    }
}

#[derive(Clone, Copy)]
enum Hash {
    Sha1,
    Sha256,
    Sha512,
}

impl Hash {
    fn parse(s: &str) -> Result<Hash, CryptoError> {
        match s {
            "sha1" => Ok(Hash::Sha1),
            "sha256" => Ok(Hash::Sha256),
            "sha512" => Ok(Hash::Sha512),
            _ => Err(CryptoError::Unsupported {
                what: "hash",
                value: s.to_owned(),
            }),
        }
    }

    fn pbkdf2(self, pass: &[u8], salt: &[u8], iters: u32, out: &mut [u8]) {
        match self {
            Hash::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(pass, salt, iters, out),
            Hash::Sha256 => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(pass, salt, iters, out),
            Hash::Sha512 => pbkdf2::pbkdf2_hmac::<sha2::Sha512>(pass, salt, iters, out),
        }
    }

    fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            Hash::Sha1 => run::<sha1::Sha1>(parts),
            Hash::Sha256 => run::<sha2::Sha256>(parts),
            Hash::Sha512 => run::<sha2::Sha512>(parts),
        }
    }

    /// LUKS anti-forensic diffusion of one block.
    fn diffuse(self, block: &mut [u8]) {
        let ds = self.digest(&[]).len();
        for (i, chunk) in block.chunks_mut(ds).enumerate() {
            let iv = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
            let h = self.digest(&[&iv, chunk]);
            let n = chunk.len();
            chunk.copy_from_slice(&h[..n]);
        }
    }

    fn af_merge(self, split: &[u8], key_len: usize, stripes: usize) -> Vec<u8> {
        let mut d = vec![0u8; key_len];
        for s in 0..stripes - 1 {
            for (a, b) in d.iter_mut().zip(&split[s * key_len..(s + 1) * key_len]) {
                *a ^= b;
            }
            self.diffuse(&mut d);
        }
        let last = &split[(stripes - 1) * key_len..stripes * key_len];
        d.iter().zip(last).map(|(a, b)| a ^ b).collect()
    }

    fn af_split(self, key: &[u8], stripes: usize) -> Result<Vec<u8>, CryptoError> {
        let kl = key.len();
        let mut out = vec![0u8; kl * stripes];
        random(&mut out[..kl * (stripes - 1)])?;
        let mut d = vec![0u8; kl];
        for s in 0..stripes - 1 {
            for (a, b) in d.iter_mut().zip(&out[s * kl..(s + 1) * kl]) {
                *a ^= b;
            }
            self.diffuse(&mut d);
        }
        for (i, b) in out[(stripes - 1) * kl..].iter_mut().enumerate() {
            *b = d[i] ^ key[i];
        }
        Ok(out)
    }
}

fn random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::getrandom(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// A parsed LUKS1 header.
#[derive(Debug, Clone)]
pub struct LuksHeader {
    /// Cipher name ("aes").
    pub cipher_name: String,
    /// Cipher mode ("xts-plain64").
    pub cipher_mode: String,
    /// Hash ("sha256").
    pub hash_spec: String,
    /// Payload offset in sectors.
    pub payload_offset: u32,
    /// Master key length.
    pub key_bytes: u32,
    mk_digest: [u8; DIGEST_LEN],
    mk_digest_salt: [u8; 32],
    /// Master key digest iterations.
    pub mk_digest_iter: u32,
    /// UUID string.
    pub uuid: String,
    slots: Vec<Slot>,
}

/// What `info` shows of one LUKS key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksSlotInfo {
    /// The slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations (meaningful when active).
    pub iterations: u32,
    /// Anti-forensic stripes (meaningful when active).
    pub stripes: u32,
    /// Byte offset of the key material from the start of the LUKS header.
    pub key_offset: u64,
}

#[derive(Debug, Clone)]
struct Slot {
    active: bool,
    iterations: u32,
    salt: [u8; 32],
    key_offset: u32,
    stripes: u32,
}

impl LuksHeader {
    /// Parses the 592-byte LUKS1 header at the start of `raw`.
    pub fn parse(raw: &[u8]) -> Result<LuksHeader, CryptoError> {
        let bad = |s: &str| CryptoError::BadHeader(s.to_owned());
        if raw.len() < LUKS_HEADER_LEN {
            return Err(bad("shorter than 592 bytes"));
        }
        if raw[..6] != LUKS_MAGIC {
            return Err(bad("bad magic"));
        }
        let version = u16::from_be_bytes([raw[6], raw[7]]);
        if version != 1 {
            return Err(CryptoError::Unsupported {
                what: "version",
                value: version.to_string(),
            });
        }
        let mut h = LuksHeader {
            cipher_name: cstr(&raw[8..40]),
            cipher_mode: cstr(&raw[40..72]),
            hash_spec: cstr(&raw[72..104]),
            payload_offset: be32(raw, 104),
            key_bytes: be32(raw, 108),
            mk_digest: [0; DIGEST_LEN],
            mk_digest_salt: [0; 32],
            mk_digest_iter: be32(raw, 164),
            uuid: cstr(&raw[168..208]),
            slots: Vec::new(),
        };
        h.mk_digest.copy_from_slice(&raw[112..132]);
        h.mk_digest_salt.copy_from_slice(&raw[132..164]);
        if h.key_bytes != 32 && h.key_bytes != 64 {
            return Err(CryptoError::Unsupported {
                what: "key size",
                value: h.key_bytes.to_string(),
            });
        }
        if h.mk_digest_iter == 0 {
            return Err(bad("master key digest iteration count is zero"));
        }
        for i in 0..NUM_SLOTS {
            let s = &raw[208 + i * 48..208 + (i + 1) * 48];
            let mut salt = [0u8; 32];
            salt.copy_from_slice(&s[8..40]);
            let active = match be32(s, 0) {
                SLOT_ACTIVE => true,
                SLOT_INACTIVE => false,
                _ => return Err(bad("key slot state is neither active nor inactive")),
            };
            h.slots.push(Slot {
                active,
                iterations: be32(s, 4),
                salt,
                key_offset: be32(s, 40),
                stripes: be32(s, 44),
            });
        }
        Ok(h)
    }

    /// The key slots, for `info`.
    pub fn slot_info(&self) -> Vec<LuksSlotInfo> {
        self.slots
            .iter()
            .map(|s| LuksSlotInfo {
                active: s.active,
                iterations: s.iterations,
                stripes: s.stripes,
                key_offset: u64::from(s.key_offset) * SECTOR as u64,
            })
            .collect()
    }

    /// Bytes of key material per slot.
    fn split_len(&self, slot: &Slot) -> u64 {
        u64::from(self.key_bytes) * u64::from(slot.stripes)
    }

    /// Unlocks the master key. `area` reads `len` bytes at an offset relative to the start
    /// of the LUKS header.
    pub fn unlock(
        &self,
        passphrase: &[u8],
        mut area: impl FnMut(u64, usize) -> Result<Vec<u8>, CryptoError>,
    ) -> Result<Cipher, CryptoError> {
        if self.cipher_name != "aes" {
            return Err(CryptoError::Unsupported {
                what: "cipher",
                value: self.cipher_name.clone(),
            });
        }
        if self.cipher_mode != "xts-plain64" {
            return Err(CryptoError::Unsupported {
                what: "cipher mode",
                value: self.cipher_mode.clone(),
            });
        }
        let hash = Hash::parse(&self.hash_spec)?;
        let kl = self.key_bytes as usize;
        for slot in self.slots.iter().filter(|s| s.active) {
            if slot.stripes == 0 || slot.stripes > 65536 || slot.iterations == 0 {
                return Err(CryptoError::BadHeader(
                    "key slot has invalid stripes or iterations".into(),
                ));
            }
            let len = usize::try_from(self.split_len(slot))
                .map_err(|_| CryptoError::BadHeader("key material too large".into()))?;
            let mut material = area(
                u64::from(slot.key_offset) * 512,
                len.div_ceil(SECTOR) * SECTOR,
            )?;
            let mut slot_key = vec![0u8; kl];
            hash.pbkdf2(passphrase, &slot.salt, slot.iterations, &mut slot_key);
            Xts::new(&slot_key)?.decrypt(&mut material, 0);
            let mk = hash.af_merge(&material[..len], kl, slot.stripes as usize);
            let mut digest = [0u8; DIGEST_LEN];
            hash.pbkdf2(&mk, &self.mk_digest_salt, self.mk_digest_iter, &mut digest);
            if digest == self.mk_digest {
                return Ok(Cipher::Luks(LuksCipher {
                    xts: Xts::new(&mk)?,
                }));
            }
        }
        Err(CryptoError::BadPassphrase)
    }
}

/// A freshly made LUKS header area (header + key material), ready to be written.
pub struct NewLuks {
    /// The bytes to store (payload_offset sectors long).
    pub area: Vec<u8>,
    /// The data cipher.
    pub cipher: Cipher,
}

/// PBKDF2-SHA256 iterations per millisecond on this machine.
fn iterations_per_ms() -> u64 {
    let start = std::time::Instant::now();
    let mut out = [0u8; 32];
    let mut iters = 0u64;
    while start.elapsed().as_millis() < 20 {
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(b"benchmark", b"salt", 1000, &mut out);
        iters += 1000;
    }
    let ms = u64::try_from(start.elapsed().as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    (iters * 1000 / ms).max(1)
}

/// Makes a LUKS1 header (aes-256-xts-plain64, sha256, one active slot) as qemu-img does,
/// with slot iterations chosen to take about `iter_time_ms`.
pub fn create_luks(passphrase: &[u8], iter_time_ms: u64) -> Result<NewLuks, CryptoError> {
    let kl = 64usize;
    let mut mk = vec![0u8; kl];
    random(&mut mk)?;
    let rate = iterations_per_ms();
    let slot_iters = u32::try_from((rate * iter_time_ms).max(1000)).unwrap_or(u32::MAX);
    let mk_iters = u32::try_from((rate * iter_time_ms / 8).max(1000)).unwrap_or(u32::MAX);
    let hash = Hash::Sha256;
    let split_sectors = (kl * STRIPES as usize).div_ceil(SECTOR);
    let slot_sectors = split_sectors.div_ceil(8) * 8;
    let first = 4096 / SECTOR;
    let payload = first + slot_sectors * NUM_SLOTS;
    let mut area = vec![0u8; payload * SECTOR];
    let h = &mut area[..LUKS_HEADER_LEN];
    h[..6].copy_from_slice(&LUKS_MAGIC);
    h[6..8].copy_from_slice(&1u16.to_be_bytes());
    h[8..11].copy_from_slice(b"aes");
    h[40..51].copy_from_slice(b"xts-plain64");
    h[72..78].copy_from_slice(b"sha256");
    let to_u32 =
        |v: usize| u32::try_from(v).map_err(|_| CryptoError::Option("header too large".into()));
    h[104..108].copy_from_slice(&to_u32(payload)?.to_be_bytes());
    h[108..112].copy_from_slice(&to_u32(kl)?.to_be_bytes());
    let mut salt = [0u8; 32];
    random(&mut salt)?;
    let mut digest = [0u8; DIGEST_LEN];
    hash.pbkdf2(&mk, &salt, mk_iters, &mut digest);
    h[112..132].copy_from_slice(&digest);
    h[132..164].copy_from_slice(&salt);
    h[164..168].copy_from_slice(&mk_iters.to_be_bytes());
    let mut u = [0u8; 16];
    random(&mut u)?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    h[168..168 + uuid.len()].copy_from_slice(uuid.as_bytes());
    let mut slot_salt = [0u8; 32];
    random(&mut slot_salt)?;
    for i in 0..NUM_SLOTS {
        let s = &mut h[208 + i * 48..208 + (i + 1) * 48];
        let active = i == 0;
        s[0..4].copy_from_slice(&(if active { SLOT_ACTIVE } else { SLOT_INACTIVE }).to_be_bytes());
        if active {
            s[4..8].copy_from_slice(&slot_iters.to_be_bytes());
            s[8..40].copy_from_slice(&slot_salt);
        }
        s[40..44].copy_from_slice(&to_u32(first + i * slot_sectors)?.to_be_bytes());
        s[44..48].copy_from_slice(&STRIPES.to_be_bytes());
    }
    let mut material = hash.af_split(&mk, STRIPES as usize)?;
    material.resize(split_sectors * SECTOR, 0);
    let mut slot_key = vec![0u8; kl];
    hash.pbkdf2(passphrase, &slot_salt, slot_iters, &mut slot_key);
    Xts::new(&slot_key)?.encrypt(&mut material, 0);
    area[first * SECTOR..first * SECTOR + material.len()].copy_from_slice(&material);
    Ok(NewLuks {
        area,
        cipher: Cipher::Luks(LuksCipher {
            xts: Xts::new(&mk)?,
        }),
    })
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn created_header_unlocks_with_the_passphrase_only() {
        let made = create_luks(b"secret", 1).unwrap();
        let hdr = LuksHeader::parse(&made.area).unwrap();
        assert_eq!(hdr.cipher_mode, "xts-plain64");
        let area = |off: u64, len: usize| Ok(made.area[off as usize..off as usize + len].to_vec());
        let cipher = hdr.unlock(b"secret", area).unwrap();
        let mut data = vec![0x5au8; 1024];
        made.cipher.encrypt(4096, 0, &mut data).unwrap();
        cipher.decrypt(4096, 0, &mut data).unwrap();
        assert_eq!(data, vec![0x5au8; 1024]);
        assert!(matches!(
            hdr.unlock(b"wrong", area),
            Err(CryptoError::BadPassphrase)
        ));
    }

    #[test]
    fn af_split_merges_back() {
        let key: Vec<u8> = (0..64).collect();
        let split = Hash::Sha256.af_split(&key, 10).unwrap();
        assert_eq!(Hash::Sha256.af_merge(&split, 64, 10), key);
    }

    #[test]
    fn legacy_aes_decrypts_what_it_encrypted() {
        let c = Cipher::legacy_aes(b"pw");
        let Cipher::LegacyAes(key) = &c else {
            unreachable!()
        };
        let mut buf = vec![3u8; 1024];
        Cipher::legacy_encrypt_for_test(key, 512, &mut buf);
        assert_ne!(buf, vec![3u8; 1024]);
        c.decrypt(0, 512, &mut buf).unwrap();
        assert_eq!(buf, vec![3u8; 1024]);
        assert!(matches!(
            c.encrypt(0, 0, &mut buf),
            Err(CryptoError::LegacyWrite)
        ));
    }
}
