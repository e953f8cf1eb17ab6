//! The qcow2 format (versions 2 and 3), following QEMU's docs/interop/qcow2.rst.
//!
//! [`Qcow2Image`] implements [`BlockDevice`] and adds qcow2-only operations: snapshots,
//! check and repair, compressed writes, backing file changes.

mod check;
mod compress;
mod create;
mod device;
mod error;
pub mod header;
mod io;
mod refcount;
mod resize;
mod snapshot;
mod state;
mod write;

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use check::{CheckReport, RepairMode};
pub use create::{CreateOptions, EncryptOptions, Prealloc};
pub use error::Qcow2Error;
pub use header::CompressionType;
pub use snapshot::Snapshot;

use crate::crypto::{Cipher, LuksHeader};
use crate::{check_range, BlockDevice, DiskError, ImageFormat, OpenOptions};
use header::{Header, AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use state::State;

/// The four bytes every qcow2 image starts with.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// A summary of an image's format settings, for `info`.
#[derive(Debug, Clone)]
pub struct Qcow2Info {
    /// 2 or 3.
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width.
    pub refcount_bits: u32,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
    /// Corrupt bit set.
    pub corrupt: bool,
    /// Dirty bit set (at open).
    pub dirty: bool,
    /// Compression type.
    pub compression: CompressionType,
    /// Backing file name as recorded.
    pub backing_file: Option<String>,
    /// Backing file format as recorded.
    pub backing_format: Option<String>,
    /// 0 none, 1 aes, 2 luks.
    pub crypt_method: u32,
    /// Internal snapshots.
    pub snapshots: Vec<Snapshot>,
    /// Virtual size.
    pub size: u64,
    /// Bitmaps extension present.
    pub has_bitmaps: bool,
}

/// An open qcow2 image.
///
/// Guest reads, and writes into clusters that are already allocated to this image, run
/// under a shared lock: several queues or threads do their I/O at once. Anything that
/// changes metadata (allocation, copy-on-write, zeroing, discard, flush, snapshots, resize)
/// takes the lock exclusively, so it waits for the data requests in flight and no cluster
/// is freed or reused under one. L2 tables that are not cached yet are loaded under the
/// exclusive lock too.
pub struct Qcow2Image {
    st: RwLock<State>,
    dirty_at_open: bool,
    /// See `metadata_preallocated` (device.rs).
    metadata_prealloc: std::sync::OnceLock<bool>,
}

pub(crate) fn fileio_write(file: &File, off: u64, buf: &[u8]) -> Result<(), Qcow2Error> {
    crate::fileio::write_all(file, off, buf).map_err(Qcow2Error::io("writing"))
}

impl Qcow2Image {
    /// Opens an image (and its backing chain, read-only).
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self, DiskError> {
        let canonical = std::fs::canonicalize(path).map_err(|source| DiskError::Io {
            op: "open",
            path: path.to_owned(),
            source,
        })?;
        let mut seen = vec![canonical];
        Self::open_with_chain(path, opts, &mut seen)
    }

    /// Creates a new image (truncating any file at `path`).
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), DiskError> {
        let mut st = create::create(path, opts)?;
        st.close()?;
        Ok(())
    }

    pub(crate) fn open_with_chain(
        path: &Path,
        opts: &OpenOptions,
        seen: &mut Vec<PathBuf>,
    ) -> Result<Self, DiskError> {
        let io_err = |op, source| DiskError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        let file = FsOpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(|e| io_err("open", e))?;
        let file_len = file.metadata().map_err(|e| io_err("stat", e))?.len();
        let mut probe = vec![0u8; usize::try_from(file_len.min(4096)).unwrap_or(4096)];
        crate::fileio::read_up_to(&file, 0, &mut probe).map_err(|e| io_err("read", e))?;
        let cbits = if probe.len() >= 24 {
            u32::from_be_bytes([probe[20], probe[21], probe[22], probe[23]])
        } else {
            header::MIN_CLUSTER_BITS
        };
        let first_len = if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cbits) {
            (1u64 << cbits).min(file_len)
        } else {
            probe.len() as u64
        };
        let mut first = vec![0u8; usize::try_from(first_len).unwrap_or(0)];
        crate::fileio::read_up_to(&file, 0, &mut first).map_err(|e| io_err("read", e))?;
        let hdr = Header::parse(&first)?;
        let dirty_at_open = hdr.incompatible & INCOMPAT_DIRTY != 0;
        if hdr.incompatible & INCOMPAT_CORRUPT != 0 && !opts.read_only && !opts.allow_corrupt {
            return Err(Qcow2Error::MarkedCorrupt.into());
        }
        let mut st = State::new(file, path.to_owned(), opts.read_only, hdr, file_len);
        st.no_sync = opts.no_sync;
        st.load_refcount_table()?;
        st.load_l1()?;
        st.load_snapshots()?;
        st.encrypted = st.hdr.crypt_method != 0;
        if let Some(key) = &opts.key {
            st.cipher = Some(unlock(&st, key)?);
        }
        if let Some(name) = st.hdr.backing_file.clone() {
            if !opts.no_backing {
                st.backing = Some(open_backing(
                    path,
                    &name,
                    st.hdr.backing_format.as_deref(),
                    opts,
                    seen,
                )?);
            }
        }
        if !opts.read_only {
            if dirty_at_open && !opts.no_repair {
                log::info!(
                    "qcow2: {} was not closed cleanly; repairing refcounts",
                    path.display()
                );
                st.check(RepairMode::All)?;
                st.hdr.incompatible &= !INCOMPAT_DIRTY;
                st.write_header()?;
                st.sync()?;
            }
            if st.hdr.autoclear & AUTOCLEAR_BITMAPS != 0 {
                // We do not maintain bitmaps: mark them inconsistent, as the spec asks.
                st.hdr.autoclear &= !AUTOCLEAR_BITMAPS;
                st.write_header()?;
                st.sync()?;
            }
        }
        Ok(Qcow2Image {
            st: RwLock::new(st),
            dirty_at_open,
            metadata_prealloc: std::sync::OnceLock::new(),
        })
    }

    /// The exclusive lock, for metadata changes.
    fn lock(&self) -> RwLockWriteGuard<'_, State> {
        // A panic while holding the lock leaves the state as consistent as an I/O error
        // would; keep serving rather than poisoning every later request.
        self.st.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared lock, for data I/O and lookups.
    fn shared(&self) -> RwLockReadGuard<'_, State> {
        self.st.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Format settings and snapshots.
    pub fn info(&self) -> Qcow2Info {
        let st = self.shared();
        let h = &st.hdr;
        Qcow2Info {
            version: h.version,
            cluster_size: h.cluster_size(),
            refcount_bits: h.refcount_bits(),
            extended_l2: h.extended_l2(),
            lazy_refcounts: h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0,
            corrupt: h.incompatible & INCOMPAT_CORRUPT != 0,
            dirty: self.dirty_at_open,
            compression: h.compression,
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            crypt_method: h.crypt_method,
            snapshots: st.snapshots.clone(),
            size: h.size,
            has_bitmaps: h.bitmaps.is_some(),
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.shared().cs
    }

    /// Checks (and optionally repairs) refcounts and flags.
    pub fn check(&self, mode: RepairMode) -> Result<CheckReport, DiskError> {
        Ok(self.lock().check(mode)?)
    }

    /// Creates an internal snapshot named `name`.
    pub fn snapshot_create(&self, name: &str) -> Result<(), DiskError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
        Ok(self
            .lock()
            .snapshot_create(name, (secs, now.subsec_nanos()))?)
    }

    /// Reverts the disk to a snapshot (by id or name).
    pub fn snapshot_apply(&self, key: &str) -> Result<(), DiskError> {
        Ok(self.lock().snapshot_apply(key)?)
    }

    /// Deletes a snapshot (by id or name).
    pub fn snapshot_delete(&self, key: &str) -> Result<(), DiskError> {
        Ok(self.lock().snapshot_delete(key)?)
    }

    /// Lists snapshots.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.shared().snapshots.clone()
    }

    /// Reads from a snapshot's state instead of the active one.
    pub fn read_snapshot(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let mut st = self.lock();
        let i = st
            .find_snapshot(key)
            .ok_or_else(|| Qcow2Error::SnapshotNotFound(key.to_owned()))?;
        let snap = st.snapshots[i].clone();
        check_range(offset, buf.len() as u64, snap.disk_size)?;
        let l1 = st.read_l1_at(snap.l1_offset, snap.l1_size)?;
        for (k, e) in l1.iter().enumerate() {
            state::check_l1_entry(*e, k as u64, st.cs)?;
        }
        // Nothing dirty may be written back while the snapshot's L1 stands in.
        st.write_back_metadata()?;
        let saved_l1 = std::mem::replace(&mut st.l1, l1);
        let saved_size = std::mem::replace(&mut st.hdr.size, snap.disk_size);
        let r = st.read(offset, buf);
        st.l1 = saved_l1;
        st.hdr.size = saved_size;
        Ok(r?)
    }

    /// Writes one whole cluster compressed; the cluster must be unallocated.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let mut st = self.lock();
        check_range(offset, data.len() as u64, st.hdr.size)?;
        if !offset.is_multiple_of(st.cs) {
            return Err(Qcow2Error::Unsupported("unaligned compressed write".into()).into());
        }
        let gc = offset >> st.cbits;
        Ok(st.write_compressed(gc, data)?)
    }

    /// Records a new backing file (or none) without touching data (`rebase -u`, `commit`).
    pub fn set_backing(&self, file: Option<&str>, format: Option<&str>) -> Result<(), DiskError> {
        let mut st = self.lock();
        if st.read_only {
            return Err(DiskError::ReadOnly);
        }
        st.hdr.backing_file = file.map(str::to_owned);
        st.hdr.backing_format = file.and(format).map(str::to_owned);
        st.write_header()?;
        st.sync()?;
        Ok(())
    }

    /// Replaces the backing device used for reads (after a rebase).
    pub fn replace_backing(&self, dev: Option<Arc<dyn BlockDevice>>) {
        self.lock().backing = dev;
    }

    /// Makes every cluster unallocated (reads fall through to the backing file), like
    /// qemu's make_empty after a commit.
    pub fn make_empty(&self) -> Result<(), DiskError> {
        Ok(self.lock().deallocate_all()?)
    }

    /// The LUKS header of an image encrypted with encrypt.format=luks (`None` for other
    /// images); needs no key.
    pub fn luks_header(&self) -> Result<Option<LuksHeader>, DiskError> {
        let st = self.shared();
        if st.hdr.crypt_method != 2 {
            return Ok(None);
        }
        let Some((off, len)) = st.hdr.crypto_header else {
            return Err(Qcow2Error::Header("missing encryption header".into()).into());
        };
        st.check_table_placement("encryption header", off, len)?;
        let raw = st.read_meta(
            off,
            (crate::crypto::LUKS_HEADER_LEN as u64).min(len),
            "LUKS header",
        )?;
        Ok(Some(LuksHeader::parse(&raw).map_err(Qcow2Error::Crypto)?))
    }

    /// Whether the image is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.shared().encrypted
    }

    /// Flushes and clears the lazy-refcount dirty bit. Also done on drop.
    pub fn close(&self) -> Result<(), DiskError> {
        Ok(self.lock().close()?)
    }
}

fn unlock(st: &State, key: &[u8]) -> Result<Cipher, Qcow2Error> {
    match st.hdr.crypt_method {
        1 => Ok(Cipher::legacy_aes(key)),
        2 => {
            let Some((off, len)) = st.hdr.crypto_header else {
                return Err(Qcow2Error::Header("missing encryption header".into()));
            };
            st.check_table_placement("encryption header", off, len)?;
            let head_len = (crate::crypto::LUKS_HEADER_LEN as u64).min(len);
            let raw = st.read_meta(off, head_len, "LUKS header")?;
            let luks = LuksHeader::parse(&raw)?;
            let cipher = luks.unlock(key, |rel, n| {
                if rel.saturating_add(n as u64) > len {
                    return Err(crate::crypto::CryptoError::BadHeader(
                        "key material lies outside the encryption header area".into(),
                    ));
                }
                st.read_meta(off + rel, n as u64, "LUKS key material")
                    .map_err(|e| crate::crypto::CryptoError::BadHeader(e.to_string()))
            })?;
            Ok(cipher)
        }
        _ => Err(Qcow2Error::Header(
            "a key was given for an unencrypted image".into(),
        )),
    }
}

/// Resolves a backing file name relative to the image that names it.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_owned();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_owned(),
    }
}

fn open_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
    opts: &OpenOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<Arc<dyn BlockDevice>, DiskError> {
    let path = resolve_backing(image, name);
    let format = match format {
        Some(f) => {
            Some(ImageFormat::from_name(f).ok_or_else(|| DiskError::UnknownFormat(f.to_owned()))?)
        }
        None => None,
    };
    let bopts = OpenOptions {
        read_only: true,
        format,
        key: None,
        no_backing: false,
        no_repair: true,
        allow_corrupt: opts.allow_corrupt,
        no_sync: false,
    };
    crate::open_chained(&path, &bopts, seen).map_err(|e| match e {
        DiskError::BackingLoop(_) | DiskError::ChainTooDeep(_) => e,
        other => DiskError::Backing {
            path,
            source: Box::new(other),
        },
    })
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        let mut st = self.lock();
        if let Err(e) = st.close() {
            log::error!("qcow2: closing {} failed: {e}", st.path.display());
        }
    }
}
