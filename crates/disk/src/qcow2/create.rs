//! Creating qcow2 images: layout, encryption header, preallocation.

use std::fs::OpenOptions;
use std::path::Path;

use super::header::{
    CompressionType, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2,
    V2_HEADER_LEN, V3_HEADER_LEN,
};
use super::refcount::rb_set;
use super::state::{State, COPIED};
use super::Qcow2Error;
use crate::crypto;

/// Preallocation modes (qemu's `preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prealloc {
    /// Nothing allocated.
    #[default]
    Off,
    /// L2 tables and cluster mappings allocated; the file stays sparse.
    Metadata,
    /// Like metadata, and the file's space reserved with fallocate.
    Falloc,
    /// Like metadata, and the data area written with zeroes.
    Full,
}

impl Prealloc {
    /// Parses qemu's option value.
    pub fn parse(s: &str) -> Option<Prealloc> {
        match s {
            "off" => Some(Prealloc::Off),
            "metadata" => Some(Prealloc::Metadata),
            "falloc" => Some(Prealloc::Falloc),
            "full" => Some(Prealloc::Full),
            _ => None,
        }
    }
}

/// Encryption settings for a new image.
#[derive(Debug, Clone)]
pub struct EncryptOptions {
    /// The passphrase.
    pub passphrase: Vec<u8>,
    /// PBKDF2 time budget per key slot in milliseconds (qemu's encrypt.iter-time).
    pub iter_time_ms: u64,
}

/// Options for [`super::Qcow2Image::create`], with qemu-img's defaults.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Cluster size in bytes, a power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// Refcount width: 1, 2, 4, 8, 16, 32 or 64.
    pub refcount_bits: u32,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Lazy refcounts.
    pub lazy_refcounts: bool,
    /// Preallocation.
    pub preallocation: Prealloc,
    /// Compression type for compressed clusters.
    pub compression: CompressionType,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_format: Option<String>,
    /// LUKS encryption.
    pub encrypt: Option<EncryptOptions>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            extended_l2: false,
            lazy_refcounts: false,
            preallocation: Prealloc::Off,
            compression: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            encrypt: None,
        }
    }
}

impl CreateOptions {
    fn validate(&self) -> Result<u32, Qcow2Error> {
        let bad = |s: &str| Err(Qcow2Error::InvalidOption(s.to_owned()));
        if !self.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&self.cluster_size) {
            return bad("Cluster size must be a power of two between 512 and 2048k");
        }
        let cbits = self.cluster_size.trailing_zeros();
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return bad("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if self.version != 2 && self.version != 3 {
            return bad("compat must be 0.10 or 1.1");
        }
        if self.version == 2 {
            if self.refcount_bits != 16 {
                return bad("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)");
            }
            if self.lazy_refcounts {
                return bad("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
            }
            if self.extended_l2 {
                return bad("Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
            }
            if self.compression != CompressionType::Deflate {
                return bad("Compression type 'zstd' requires compatibility level 1.1 and above (use compat=1.1 or greater)");
            }
        }
        if self.extended_l2 && cbits < 14 {
            return bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        if self.backing_file.is_some() && self.preallocation != Prealloc::Off {
            return bad("Backing file and preallocation can only be used at the same time if extended_l2 is on");
        }
        if !self.size.is_multiple_of(512) {
            return bad("Image size must be a multiple of 512 bytes");
        }
        Ok(cbits)
    }
}

/// Creates the image file and returns its open state (for the caller to close).
pub(crate) fn create(path: &Path, o: &CreateOptions) -> Result<State, Qcow2Error> {
    let cbits = o.validate()?;
    let cs = 1u64 << cbits;
    let refcount_order = o.refcount_bits.trailing_zeros();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(Qcow2Error::io("creating the image file"))?;
    let mut incompatible = 0;
    if o.extended_l2 {
        incompatible |= INCOMPAT_EXTL2;
    }
    if o.compression != CompressionType::Deflate {
        incompatible |= INCOMPAT_COMPRESSION;
    }
    let hdr = Header {
        version: o.version,
        cluster_bits: cbits,
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible,
        compatible: if o.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear: 0,
        refcount_order: if o.version == 2 { 4 } else { refcount_order },
        header_length: if o.version == 2 {
            V2_HEADER_LEN
        } else {
            V3_HEADER_LEN
        },
        compression: o.compression,
        extra_fields: Vec::new(),
        backing_file: o.backing_file.clone(),
        backing_format: o.backing_format.clone(),
        crypto_header: None,
        bitmaps: None,
        unknown: Vec::new(),
    };
    // Cluster 0: header; 1: refcount table; 2: the first refcount block.
    let mut head = hdr.serialize()?;
    head.resize(usize::try_from(3 * cs).map_err(|_| Qcow2Error::NoSpace)?, 0);
    let table_at = usize::try_from(cs).unwrap_or(0);
    head[table_at..table_at + 8].copy_from_slice(&(2 * cs).to_be_bytes());
    let block_at = usize::try_from(2 * cs).unwrap_or(0);
    for c in 0..3 {
        rb_set(&mut head[block_at..], hdr.refcount_order, c, 1);
    }
    super::fileio_write(&file, 0, &head)?;
    let mut st = State::new(file, path.to_owned(), false, hdr, 3 * cs);
    st.lazy = false;
    st.load_refcount_table()?;
    // The active L1 table.
    let l1_entries = st.l1_entries_for(o.size)?;
    let l1_bytes = l1_entries * 8;
    if l1_bytes > super::state::MAX_L1_BYTES {
        return Err(Qcow2Error::InvalidOption(format!(
            "image size {} is too large for cluster size {}",
            o.size, cs
        )));
    }
    if l1_entries > 0 {
        let off = st.alloc_clusters(l1_bytes.div_ceil(cs))?;
        st.write_host(
            off,
            &vec![0u8; usize::try_from(l1_bytes.div_ceil(cs) * cs).unwrap_or(0)],
            "writing the L1 table",
        )?;
        st.hdr.l1_table_offset = off;
    }
    st.hdr.l1_size = u32::try_from(l1_entries).map_err(|_| Qcow2Error::NoSpace)?;
    st.l1 = vec![0; usize::try_from(l1_entries).unwrap_or(0)];
    st.hdr.size = o.size;
    if let Some(enc) = &o.encrypt {
        let made = crypto::create_luks(&enc.passphrase, enc.iter_time_ms)?;
        let len = made.area.len() as u64;
        let off = st.alloc_clusters(len.div_ceil(cs))?;
        st.write_host(off, &made.area, "writing the LUKS header")?;
        st.hdr.crypt_method = 2;
        st.hdr.crypto_header = Some((off, len));
        st.cipher = Some(made.cipher);
        st.encrypted = true;
    }
    st.flush()?;
    st.write_header()?;
    st.sync()?;
    if o.preallocation != Prealloc::Off {
        preallocate(&mut st, o.preallocation)?;
    }
    st.lazy = o.lazy_refcounts;
    Ok(st)
}

/// Maps every guest cluster to a host cluster (contiguous per L2 table).
fn preallocate(st: &mut State, mode: Prealloc) -> Result<(), Qcow2Error> {
    let clusters = st.hdr.size.div_ceil(st.cs);
    let per = st.l2_entries();
    let mut gc = 0;
    let mut data_start = u64::MAX;
    while gc < clusters {
        let n = (per - (gc & (per - 1))).min(clusters - gc);
        let l2off = st.l2_for_write(gc)?;
        let host = st.alloc_clusters(n)?;
        data_start = data_start.min(host);
        for k in 0..n {
            let bitmap = if st.ext_l2 { 0xffff_ffff } else { 0 };
            st.set_l2_entry(l2off, gc + k, (host + k * st.cs) | COPIED, bitmap)?;
        }
        gc += n;
    }
    st.flush()?;
    let end = st.end_cluster << st.cbits;
    st.file
        .set_len(end.max(st.file_len()))
        .map_err(Qcow2Error::io("extending the image file"))?;
    st.note_file_end(end);
    match mode {
        Prealloc::Falloc => {
            use std::os::fd::AsRawFd;
            let len = i64::try_from(st.file_len()).map_err(|_| Qcow2Error::NoSpace)?;
            // SAFETY: fallocate with integer arguments on a valid fd.
            let rc = unsafe { libc::fallocate(st.file.as_raw_fd(), 0, 0, len) };
            if rc != 0 {
                return Err(Qcow2Error::io("preallocating")(
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Prealloc::Full if data_start != u64::MAX => {
            crate::fileio::write_zeroes(&st.file, data_start, st.file_len() - data_start)
                .map_err(Qcow2Error::io("preallocating"))?;
        }
        _ => {}
    }
    st.sync()
}
