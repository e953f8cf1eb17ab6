//! The in-memory state of an open qcow2 image: tables, caches, and metadata write-back.
//!
//! Write-back order (see [`State::write_back_metadata`]): refcount blocks and table first,
//! then L2 tables, then the L1 table, then deferred refcount decrements, then the header.
//! Between the steps the file is synced, so a crash (or a kill) at any point leaves on disk
//! either the old metadata or refcounts that are higher than needed: leaks, never corruption.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::header::{Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY};
use super::refcount::{RefBlock, OFFSET_MASK};
use super::snapshot::Snapshot;
use super::Qcow2Error;
use crate::crypto::Cipher;
use crate::fileio;
use crate::BlockDevice;

/// L1/L2 entry flag: refcount is exactly one.
pub(crate) const COPIED: u64 = 1 << 63;
/// L2 entry flag: compressed cluster.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (standard entries): reads as zeroes.
pub(crate) const ZERO: u64 = 1;
/// qemu's limit on the L1 table size in bytes.
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;

/// Hasher for cluster offsets and indices: the keys are already well spread, so a
/// multiply is enough (SipHash showed up in random-read profiles).
#[derive(Default)]
pub(crate) struct OffsetHasher(u64);

impl std::hash::Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by cluster offset or index.
pub(crate) type OffsetMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<OffsetHasher>>;

/// A cached L2 table. `data` holds raw entries; with extended L2 entries, even indices are
/// descriptors and odd ones subcluster bitmaps.
#[derive(Debug)]
pub(crate) struct L2Table {
    pub data: Vec<u64>,
    pub dirty: bool,
}

/// Everything about an open image, guarded by the image's lock.
///
/// Methods taking `&self` (the data paths: [`State::read_cached`], [`State::write_in_place`])
/// run under the shared lock, several at once; they touch no metadata. Everything that
/// changes metadata takes `&mut self`, under the exclusive lock, so no cluster is freed or
/// reused while a data request on it is in flight.
pub(crate) struct State {
    /// Shared so that a flush can sync it after the exclusive lock is released.
    pub file: Arc<File>,
    pub path: PathBuf,
    pub read_only: bool,
    pub hdr: Header,
    /// Cluster size and its log2.
    pub cs: u64,
    pub cbits: u32,
    /// Guest clusters per L2 table (log2).
    pub l2_bits: u32,
    /// Extended L2 entries in use.
    pub ext_l2: bool,
    /// Size of the allocation unit: a subcluster with extended L2, else a cluster.
    pub unit: u64,
    pub l1: Vec<u64>,
    pub l1_dirty: bool,
    pub l2_cache: OffsetMap<L2Table>,
    pub l2_cache_cap: usize,
    pub rc_table: Vec<u64>,
    pub rc_table_dirty: bool,
    pub rb_cache: OffsetMap<RefBlock>,
    pub rb_cache_cap: usize,
    /// log2 of refcount entries per block.
    pub rb_bits: u32,
    /// Lowest cluster index that may be free.
    pub free_hint: u64,
    /// One past the highest cluster index in use (or the file end).
    pub end_cluster: u64,
    /// Deferred reference drops: cluster index -> count.
    pub pending_free: OffsetMap<u64>,
    pub hdr_dirty: bool,
    pub snapshots: Vec<Snapshot>,
    /// Bytes of the snapshot table on disk.
    pub snap_table_len: u64,
    pub backing: Option<Arc<dyn BlockDevice>>,
    pub cipher: Option<Cipher>,
    /// The image is encrypted (whether or not a key was given).
    pub encrypted: bool,
    /// Next free byte for packing compressed clusters.
    pub compressed_cursor: Option<u64>,
    /// The last decompressed cluster: (L2 entry, data). Its own lock: compressed reads run
    /// under the shared image lock.
    pub decompressed: Mutex<Option<(u64, Vec<u8>)>>,
    /// Lazy refcounts: the dirty bit is set while metadata is outstanding.
    pub lazy: bool,
    /// The dirty bit is set on disk by us.
    pub marked_dirty: bool,
    /// Current length of the file (grown by data writes under the shared lock too).
    file_len: AtomicU64,
    /// Skip fdatasync (cache=unsafe).
    pub no_sync: bool,
}

impl State {
    pub(crate) fn cs_usize(&self) -> usize {
        1usize << self.cbits
    }

    /// Guest clusters per L2 table.
    pub(crate) fn l2_entries(&self) -> u64 {
        1u64 << self.l2_bits
    }

    /// Builds the state from a parsed header; tables are loaded by the caller.
    pub(crate) fn new(
        file: File,
        path: PathBuf,
        read_only: bool,
        hdr: Header,
        file_len: u64,
    ) -> Self {
        let cbits = hdr.cluster_bits;
        let cs = 1u64 << cbits;
        let ext_l2 = hdr.extended_l2();
        let l2_bits = cbits - if ext_l2 { 4 } else { 3 };
        let rb_bits = cbits + 3 - hdr.refcount_order;
        let unit = if ext_l2 { cs / 32 } else { cs };
        let l2_cache_cap = usize::try_from((32u64 << 20) >> cbits)
            .unwrap_or(16)
            .max(16);
        let rb_cache_cap = usize::try_from((8u64 << 20) >> cbits).unwrap_or(16).max(16);
        let lazy = hdr.compatible & COMPAT_LAZY_REFCOUNTS != 0;
        State {
            file: Arc::new(file),
            path,
            read_only,
            cs,
            cbits,
            l2_bits,
            ext_l2,
            unit,
            l1: Vec::new(),
            l1_dirty: false,
            l2_cache: OffsetMap::default(),
            l2_cache_cap,
            rc_table: Vec::new(),
            rc_table_dirty: false,
            rb_cache: OffsetMap::default(),
            rb_cache_cap,
            rb_bits,
            free_hint: 0,
            end_cluster: file_len.div_ceil(cs),
            pending_free: OffsetMap::default(),
            hdr_dirty: false,
            snapshots: Vec::new(),
            snap_table_len: 0,
            backing: None,
            cipher: None,
            encrypted: false,
            compressed_cursor: None,
            decompressed: Mutex::new(None),
            lazy,
            marked_dirty: false,
            file_len: AtomicU64::new(file_len),
            no_sync: false,
            hdr,
        }
    }

    /// Validates that a table of `bytes` at `off` is cluster aligned and inside the file.
    pub(crate) fn check_table_placement(
        &self,
        what: &'static str,
        off: u64,
        bytes: u64,
    ) -> Result<(), Qcow2Error> {
        if off & (self.cs - 1) != 0 {
            return Err(Qcow2Error::table(
                what,
                format!("offset {off:#x} is not cluster aligned"),
            ));
        }
        if off == 0 && bytes != 0 {
            return Err(Qcow2Error::table(
                what,
                "overlaps the image header at offset 0",
            ));
        }
        match off.checked_add(bytes) {
            Some(end) if end <= self.file_len() => Ok(()),
            _ => Err(Qcow2Error::table(
                what,
                format!(
                    "at offset {off:#x} ({bytes} bytes) lies past the end of the file ({} bytes)",
                    self.file_len()
                ),
            )),
        }
    }

    /// Reads `len` bytes of metadata at `off`; the range must lie inside the file, so no
    /// buffer is ever sized by a number the file claims beyond what it holds.
    pub(crate) fn read_meta(
        &self,
        off: u64,
        len: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, Qcow2Error> {
        match off.checked_add(len) {
            Some(end) if end <= self.file_len() => {}
            _ => return Err(Qcow2Error::Truncated { what, offset: off }),
        }
        let len = usize::try_from(len).map_err(|_| Qcow2Error::Truncated { what, offset: off })?;
        let mut buf = vec![0u8; len];
        let n = fileio::read_up_to(&self.file, off, &mut buf).map_err(Qcow2Error::io(what))?;
        if n < len {
            return Err(Qcow2Error::Truncated { what, offset: off });
        }
        Ok(buf)
    }

    /// Current length of the image file.
    pub(crate) fn file_len(&self) -> u64 {
        self.file_len.load(Ordering::Acquire)
    }

    /// Records that the file now reaches at least `end` bytes.
    pub(crate) fn note_file_end(&self, end: u64) {
        self.file_len.fetch_max(end, Ordering::AcqRel);
    }

    /// Writes host bytes, keeping track of the file length.
    pub(crate) fn write_host(
        &self,
        off: u64,
        buf: &[u8],
        what: &'static str,
    ) -> Result<(), Qcow2Error> {
        fileio::write_all(&self.file, off, buf).map_err(Qcow2Error::io(what))?;
        self.note_file_end(off + buf.len() as u64);
        Ok(())
    }

    pub(crate) fn sync(&self) -> Result<(), Qcow2Error> {
        if self.no_sync {
            return Ok(());
        }
        fileio::sync_data(&self.file).map_err(Qcow2Error::io("syncing the image"))
    }

    /// Rewrites the header (with extensions and backing name) in one write.
    pub(crate) fn write_header(&mut self) -> Result<(), Qcow2Error> {
        let bytes = self.hdr.serialize()?;
        self.write_host(0, &bytes, "writing the header")?;
        self.hdr_dirty = false;
        Ok(())
    }

    /// Loads the active L1 table.
    pub(crate) fn load_l1(&mut self) -> Result<(), Qcow2Error> {
        let bytes = u64::from(self.hdr.l1_size) * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Qcow2Error::TooLarge {
                what: "L1 table",
                value: bytes,
                limit: MAX_L1_BYTES,
            });
        }
        let needed = self.l1_entries_for(self.hdr.size)?;
        if u64::from(self.hdr.l1_size) < needed {
            return Err(Qcow2Error::table(
                "L1 table",
                format!(
                    "has {} entries, too few for a virtual size of {} bytes",
                    self.hdr.l1_size, self.hdr.size
                ),
            ));
        }
        if bytes == 0 {
            self.l1.clear();
            return Ok(());
        }
        self.check_table_placement("L1 table", self.hdr.l1_table_offset, bytes)?;
        let raw = self.read_meta(self.hdr.l1_table_offset, bytes, "L1 table")?;
        self.l1 = parse_u64s(&raw);
        for (i, &e) in self.l1.iter().enumerate() {
            check_l1_entry(e, i as u64, self.cs)?;
        }
        Ok(())
    }

    /// L1 entries needed to map `size` bytes.
    pub(crate) fn l1_entries_for(&self, size: u64) -> Result<u64, Qcow2Error> {
        let per_l1 = 1u128 << (self.l2_bits + self.cbits);
        let n = u128::from(size).div_ceil(per_l1);
        u64::try_from(n).map_err(|_| Qcow2Error::NoSpace)
    }

    /// Returns the L2 table at host offset `off`, loading it if needed.
    pub(crate) fn l2_table(&mut self, off: u64) -> Result<&mut L2Table, Qcow2Error> {
        if !self.l2_cache.contains_key(&off) {
            if self.l2_cache.len() >= self.l2_cache_cap {
                if self.l2_cache.values().any(|t| t.dirty) {
                    self.write_back_metadata()?;
                }
                self.l2_cache.retain(|_, t| t.dirty);
            }
            let raw = self.read_meta(off, self.cs, "L2 table")?;
            self.l2_cache.insert(
                off,
                L2Table {
                    data: parse_u64s(&raw),
                    dirty: false,
                },
            );
        }
        self.l2_cache
            .get_mut(&off)
            .ok_or_else(|| Qcow2Error::table("L2 table", "vanished from cache"))
    }

    /// Sets the dirty bit before the first metadata change of a lazy-refcount session.
    pub(crate) fn mark_dirty_if_lazy(&mut self) -> Result<(), Qcow2Error> {
        if self.lazy && !self.marked_dirty && self.hdr.version == 3 {
            self.hdr.incompatible |= INCOMPAT_DIRTY;
            self.write_header()?;
            self.sync()?;
            self.marked_dirty = true;
        }
        Ok(())
    }

    /// Writes every dirty cached table in crash-safe order. Does not sync at the end.
    pub(crate) fn write_back_metadata(&mut self) -> Result<(), Qcow2Error> {
        if self.read_only {
            return Ok(());
        }
        let l2_dirty = self.l2_cache.values().any(|t| t.dirty);
        let wrote_rc = self.write_refblocks()?;
        if wrote_rc && (l2_dirty || self.l1_dirty) && !self.lazy {
            self.sync()?;
        }
        if l2_dirty {
            let mut dirty: Vec<u64> = self
                .l2_cache
                .iter()
                .filter(|(_, t)| t.dirty)
                .map(|(&o, _)| o)
                .collect();
            dirty.sort_unstable();
            for off in dirty {
                let bytes = match self.l2_cache.get(&off) {
                    Some(t) => serialize_u64s(&t.data),
                    None => continue,
                };
                self.write_host(off, &bytes, "writing an L2 table")?;
                if let Some(t) = self.l2_cache.get_mut(&off) {
                    t.dirty = false;
                }
            }
        }
        if self.l1_dirty {
            if l2_dirty {
                self.sync()?;
            }
            let bytes = serialize_u64s(&self.l1);
            let off = self.hdr.l1_table_offset;
            self.write_host(off, &bytes, "writing the L1 table")?;
            self.l1_dirty = false;
        }
        if !self.pending_free.is_empty() {
            self.sync()?;
            self.apply_pending_frees()?;
            self.write_refblocks()?;
        }
        if self.hdr_dirty {
            self.write_header()?;
        }
        Ok(())
    }

    /// Writes back metadata and syncs: after this, every earlier write is durable.
    pub(crate) fn flush(&mut self) -> Result<(), Qcow2Error> {
        if self.read_only {
            return Ok(());
        }
        self.write_back_metadata()?;
        self.sync()
    }

    /// Flushes and, for a lazy-refcount session, clears the dirty bit (clean close).
    pub(crate) fn close(&mut self) -> Result<(), Qcow2Error> {
        if self.read_only {
            return Ok(());
        }
        self.flush()?;
        if self.marked_dirty {
            self.hdr.incompatible &= !INCOMPAT_DIRTY;
            self.write_header()?;
            self.sync()?;
            self.marked_dirty = false;
        }
        Ok(())
    }

    /// Host offset of the L2 table for L1 index `l1i`, or 0.
    pub(crate) fn l2_offset(&self, l1i: u64) -> u64 {
        usize::try_from(l1i)
            .ok()
            .and_then(|i| self.l1.get(i))
            .map_or(0, |e| e & OFFSET_MASK)
    }

    /// Reads an L2 entry (and bitmap) for guest cluster `gc`; zeroes if unmapped.
    pub(crate) fn l2_entry(&mut self, gc: u64) -> Result<(u64, u64), Qcow2Error> {
        self.load_l2_for(gc)?;
        self.l2_entry_cached(gc)
            .ok_or_else(|| Qcow2Error::table("L2 table", "vanished from cache"))
    }

    /// Makes sure the L2 table mapping guest cluster `gc` (if any) is cached.
    pub(crate) fn load_l2_for(&mut self, gc: u64) -> Result<(), Qcow2Error> {
        let l2off = self.l2_offset(gc >> self.l2_bits);
        if l2off != 0 {
            self.l2_table(l2off)?;
        }
        Ok(())
    }

    /// The L2 entry (and bitmap) for guest cluster `gc` if its table is cached (or there is
    /// none: then zeroes); `None` when the table has to be loaded first.
    pub(crate) fn l2_entry_cached(&self, gc: u64) -> Option<(u64, u64)> {
        let l2off = self.l2_offset(gc >> self.l2_bits);
        if l2off == 0 {
            return Some((0, 0));
        }
        let idx = usize::try_from(gc & (self.l2_entries() - 1)).ok()?;
        let t = self.l2_cache.get(&l2off)?;
        if self.ext_l2 {
            Some((*t.data.get(idx * 2)?, *t.data.get(idx * 2 + 1)?))
        } else {
            Some((*t.data.get(idx)?, 0))
        }
    }
}

/// Validates an L1 entry.
pub(crate) fn check_l1_entry(e: u64, index: u64, cs: u64) -> Result<(), Qcow2Error> {
    let off = e & OFFSET_MASK;
    if e & !(OFFSET_MASK | COPIED) != 0 {
        return Err(Qcow2Error::BadEntry {
            what: "L1 table",
            entry: e,
            index,
            problem: "reserved bits are set",
        });
    }
    if off & (cs - 1) != 0 {
        return Err(Qcow2Error::BadEntry {
            what: "L1 table",
            entry: e,
            index,
            problem: "L2 table offset is not cluster aligned",
        });
    }
    Ok(())
}

pub(crate) fn parse_u64s(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

pub(crate) fn serialize_u64s(v: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 8);
    for e in v {
        out.extend_from_slice(&e.to_be_bytes());
    }
    out
}
