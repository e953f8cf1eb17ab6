//! Refcount table and blocks: lookup, update, cluster allocation and table growth.
//!
//! Refcount blocks are cached and written back at flush time, always before the L2 tables
//! that reference newly allocated clusters, so a crash can only leak clusters. Decrements are
//! deferred until after the referencing tables are on disk ([`State::free_clusters`]).

use super::state::State;
use super::Qcow2Error;
use crate::fileio;

/// qemu refuses refcount tables larger than this; so do we.
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Offsets above this cannot be stored in L1/L2 entries.
pub(crate) const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Mask for the offset in refcount table and L1/L2 entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// One cached refcount block.
#[derive(Debug)]
pub(crate) struct RefBlock {
    pub data: Vec<u8>,
    pub dirty: bool,
}

/// Reads entry `idx` of a refcount block of width `1 << order` bits.
pub(crate) fn rb_get(data: &[u8], order: u32, idx: usize) -> u64 {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = idx * bits;
        let byte = data[bit / 8];
        u64::from((byte >> (bit % 8)) & ((1u8 << bits) - 1))
    } else {
        let w = bits / 8;
        let s = &data[idx * w..idx * w + w];
        s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Writes entry `idx` of a refcount block; `value` must fit the width.
pub(crate) fn rb_set(data: &mut [u8], order: u32, idx: usize, value: u64) {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = idx * bits;
        let mask = ((1u8 << bits) - 1) << (bit % 8);
        // value < 2^bits <= 16, fits u8
        let v = u8::try_from(value).unwrap_or(0) << (bit % 8);
        data[bit / 8] = (data[bit / 8] & !mask) | (v & mask);
    } else {
        let w = bits / 8;
        let bytes = value.to_be_bytes();
        data[idx * w..idx * w + w].copy_from_slice(&bytes[8 - w..]);
    }
}

impl State {
    /// Largest refcount the width allows.
    pub(crate) fn refcount_max(&self) -> u64 {
        let bits = self.hdr.refcount_bits();
        if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }

    /// Loads the refcount table; validates its placement against the file.
    pub(crate) fn load_refcount_table(&mut self) -> Result<(), Qcow2Error> {
        let off = self.hdr.refcount_table_offset;
        let clusters = u64::from(self.hdr.refcount_table_clusters);
        let bytes = clusters << self.cbits;
        if clusters == 0 {
            return Err(Qcow2Error::table("refcount table", "has zero clusters"));
        }
        if bytes > MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::TooLarge {
                what: "refcount table",
                value: bytes,
                limit: MAX_REFTABLE_BYTES,
            });
        }
        self.check_table_placement("refcount table", off, bytes)?;
        let raw = self.read_meta(off, bytes, "refcount table")?;
        self.rc_table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        for (i, e) in self.rc_table.iter().enumerate() {
            if e & !OFFSET_MASK != 0 || (e & (self.cs - 1)) != 0 {
                return Err(Qcow2Error::BadEntry {
                    what: "refcount table",
                    entry: *e,
                    index: i as u64,
                    problem: "refcount block offset is not cluster aligned",
                });
            }
        }
        Ok(())
    }

    /// Entries per refcount block.
    pub(crate) fn rb_entries(&self) -> u64 {
        1u64 << self.rb_bits
    }

    /// Makes sure refcount block `ti` is cached; returns false if it is not allocated.
    fn load_refblock(&mut self, ti: u64) -> Result<bool, Qcow2Error> {
        if self.rb_cache.contains_key(&ti) {
            return Ok(true);
        }
        let Some(&entry) = usize::try_from(ti).ok().and_then(|i| self.rc_table.get(i)) else {
            return Ok(false);
        };
        if entry == 0 {
            return Ok(false);
        }
        let off = entry & OFFSET_MASK;
        let data = self.read_meta(off, self.cs, "refcount block")?;
        self.evict_refblocks()?;
        self.rb_cache.insert(ti, RefBlock { data, dirty: false });
        Ok(true)
    }

    fn evict_refblocks(&mut self) -> Result<(), Qcow2Error> {
        if self.rb_cache.len() < self.rb_cache_cap {
            return Ok(());
        }
        if self.rb_cache.values().any(|b| b.dirty) {
            self.write_back_metadata()?;
        }
        self.rb_cache.retain(|_, b| b.dirty);
        Ok(())
    }

    /// Refcount of host cluster `idx`.
    pub(crate) fn refcount(&mut self, idx: u64) -> Result<u64, Qcow2Error> {
        let ti = idx >> self.rb_bits;
        if !self.load_refblock(ti)? {
            return Ok(0);
        }
        let bi = usize::try_from(idx & (self.rb_entries() - 1)).unwrap_or(0);
        let order = self.hdr.refcount_order;
        Ok(self
            .rb_cache
            .get(&ti)
            .map_or(0, |b| rb_get(&b.data, order, bi)))
    }

    /// Sets the refcount of host cluster `idx`, allocating refcount blocks (and growing the
    /// table) as needed.
    pub(crate) fn set_refcount(&mut self, idx: u64, value: u64) -> Result<(), Qcow2Error> {
        if value > self.refcount_max() {
            return Err(Qcow2Error::RefcountOverflow {
                offset: idx << self.cbits,
                bits: self.hdr.refcount_bits(),
            });
        }
        let ti = idx >> self.rb_bits;
        if !self.load_refblock(ti)? {
            if value == 0 {
                return Ok(());
            }
            self.new_refblock(ti)?;
        }
        let bi = usize::try_from(idx & (self.rb_entries() - 1)).unwrap_or(0);
        let order = self.hdr.refcount_order;
        let Some(b) = self.rb_cache.get_mut(&ti) else {
            return Err(Qcow2Error::table("refcount block", "vanished from cache"));
        };
        rb_set(&mut b.data, order, bi, value);
        b.dirty = true;
        if value > 0 {
            self.end_cluster = self.end_cluster.max(idx + 1);
        } else {
            if idx < self.free_hint {
                self.free_hint = idx;
            }
            // Compressed data may no longer be packed into a cluster that became free: it
            // may be handed out as a data cluster next.
            if self
                .compressed_cursor
                .is_some_and(|c| c >> self.cbits == idx)
            {
                self.compressed_cursor = None;
            }
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of host cluster `idx`.
    pub(crate) fn adjust_refcount(&mut self, idx: u64, delta: i64) -> Result<u64, Qcow2Error> {
        let cur = self.refcount(idx)?;
        let new = if delta >= 0 {
            cur.checked_add(delta.unsigned_abs())
        } else {
            cur.checked_sub(delta.unsigned_abs())
        };
        let new =
            new.filter(|&v| v <= self.refcount_max())
                .ok_or(Qcow2Error::RefcountOverflow {
                    offset: idx << self.cbits,
                    bits: self.hdr.refcount_bits(),
                })?;
        self.set_refcount(idx, new)?;
        Ok(new)
    }

    /// Creates refcount block `ti` (all zero) in a free cluster.
    fn new_refblock(&mut self, ti: u64) -> Result<(), Qcow2Error> {
        if ti >= self.rc_table.len() as u64 {
            self.grow_refcount_table(ti)?;
            if self.load_refblock(ti)? {
                return Ok(());
            }
        }
        loop {
            let c = self.find_free(1)?;
            let tc = c >> self.rb_bits;
            if tc == ti {
                // The block describes its own cluster.
                let mut data = vec![0u8; self.cs_usize()];
                let bi = usize::try_from(c & (self.rb_entries() - 1)).unwrap_or(0);
                rb_set(&mut data, self.hdr.refcount_order, bi, 1);
                self.install_refblock(ti, c, data);
                return Ok(());
            }
            if tc >= self.rc_table.len() as u64 || !self.load_refblock(tc)? {
                // The free cluster's own block is missing: create it first (it will describe
                // itself), then retry.
                self.new_refblock(tc)?;
                continue;
            }
            self.set_refcount(c, 1)?;
            let data = vec![0u8; self.cs_usize()];
            self.install_refblock(ti, c, data);
            return Ok(());
        }
    }

    fn install_refblock(&mut self, ti: u64, cluster: u64, data: Vec<u8>) {
        self.rb_cache.insert(ti, RefBlock { data, dirty: true });
        if let Some(e) = usize::try_from(ti)
            .ok()
            .and_then(|i| self.rc_table.get_mut(i))
        {
            *e = cluster << self.cbits;
        }
        self.rc_table_dirty = true;
        self.end_cluster = self.end_cluster.max(cluster + 1);
    }

    /// Finds `n` contiguous free clusters at or after the free hint (without claiming them).
    pub(crate) fn find_free(&mut self, n: u64) -> Result<u64, Qcow2Error> {
        let mut start = self.free_hint;
        let mut run = 0u64;
        let mut idx = start;
        loop {
            if (idx + 1) << self.cbits > MAX_HOST_OFFSET {
                return Err(Qcow2Error::NoSpace);
            }
            // Past everything in use, or under a missing refcount block: free.
            let ti = idx >> self.rb_bits;
            let free = idx >= self.end_cluster
                || !self.load_refblock(ti)?
                || (self.refcount(idx)? == 0 && !self.pending_free_contains(idx));
            if free {
                if run == 0 {
                    start = idx;
                }
                run += 1;
                if run == n {
                    return Ok(start);
                }
            } else {
                run = 0;
            }
            idx += 1;
        }
    }

    fn pending_free_contains(&self, idx: u64) -> bool {
        // Clusters freed since the last flush are not reused before it (a crash must not
        // leave an old L2 entry pointing at new data).
        self.pending_free.contains_key(&idx)
    }

    /// Allocates `n` contiguous clusters with refcount 1; returns the host offset.
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Result<u64, Qcow2Error> {
        let start = loop {
            let start = self.find_free(n)?;
            // Make sure the run's refcount blocks exist first: a new block may be placed
            // inside the run, in which case search again.
            let mut created = false;
            for ti in (start >> self.rb_bits)..=((start + n - 1) >> self.rb_bits) {
                if !self.load_refblock(ti)? {
                    self.new_refblock(ti)?;
                    created = true;
                }
            }
            if !created {
                break start;
            }
        };
        for c in start..start + n {
            self.set_refcount(c, 1)?;
        }
        if n == 1 || start == self.free_hint {
            self.free_hint = start + n;
        }
        Ok(start << self.cbits)
    }

    /// Tries to claim the specific free cluster `idx` (used to extend compressed runs).
    pub(crate) fn try_claim(&mut self, idx: u64) -> Result<bool, Qcow2Error> {
        let ti = idx >> self.rb_bits;
        if !self.load_refblock(ti)? {
            self.new_refblock(ti)?;
        }
        if idx < self.end_cluster && (self.refcount(idx)? != 0 || self.pending_free_contains(idx)) {
            return Ok(false);
        }
        self.set_refcount(idx, 1)?;
        Ok(self.refcount(idx)? == 1)
    }

    /// Queues a reference drop on host clusters `[off, off + len)`; applied after the tables
    /// that no longer reference them are on disk.
    pub(crate) fn free_clusters(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off >> self.cbits;
        let last = (off + len - 1) >> self.cbits;
        for c in first..=last {
            *self.pending_free.entry(c).or_insert(0) += 1;
        }
    }

    /// Grows the refcount table so that index `min_ti` exists. The new table and the refcount
    /// blocks that describe it are placed past everything in use, written, and then the header
    /// is switched over in one write.
    fn grow_refcount_table(&mut self, min_ti: u64) -> Result<(), Qcow2Error> {
        let per_block = self.rb_entries();
        let start = self.end_cluster.max(self.free_hint);
        let min_entries = (min_ti + 1).max(self.rc_table.len() as u64 + 1);
        let mut nblocks = 0u64;
        let mut tclusters = 1u64;
        // The table may not outgrow qemu's limit: check before sizing anything by `min_ti`
        // (a hostile image can name any cluster) and on every round.
        let too_big = |clusters: u64| clusters.saturating_mul(self.cs) > MAX_REFTABLE_BYTES;
        if too_big(min_ti.saturating_add(1).saturating_mul(8).div_ceil(self.cs)) {
            return Err(Qcow2Error::NoSpace);
        }
        let entries = loop {
            if too_big(tclusters) || too_big(nblocks) {
                return Err(Qcow2Error::NoSpace);
            }
            let end = start + nblocks + tclusters;
            let last_ti = (end - 1) / per_block;
            let want = min_entries.max(last_ti + 1);
            let want = want + want / 2;
            let new_tclusters = (want * 8).div_ceil(self.cs);
            let mut count = 0;
            for ti in (start / per_block)..=last_ti {
                let have = usize::try_from(ti)
                    .ok()
                    .and_then(|i| self.rc_table.get(i))
                    .is_some_and(|&e| e != 0);
                if !have {
                    count += 1;
                }
            }
            if count <= nblocks && new_tclusters <= tclusters {
                break (tclusters << self.cbits) / 8;
            }
            nblocks = nblocks.max(count);
            tclusters = tclusters.max(new_tclusters);
        };
        if tclusters << self.cbits > MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::NoSpace);
        }
        let entries_us = usize::try_from(entries).map_err(|_| Qcow2Error::NoSpace)?;
        let old_offset = self.hdr.refcount_table_offset;
        let old_clusters = u64::from(self.hdr.refcount_table_clusters);
        self.rc_table.resize(entries_us, 0);
        let table_start = start + nblocks;
        let end = table_start + tclusters;
        let mut next_block = start;
        for ti in (start / per_block)..=((end - 1) / per_block) {
            if self.rc_table[usize::try_from(ti).map_err(|_| Qcow2Error::NoSpace)?] == 0 {
                self.install_refblock(ti, next_block, vec![0u8; self.cs_usize()]);
                next_block += 1;
            }
        }
        for c in start..end {
            self.set_refcount(c, 1)?;
        }
        self.end_cluster = self.end_cluster.max(end);
        // Write the blocks, then the table, then switch the header.
        self.write_refblocks()?;
        let table_bytes = self.serialize_rc_table(tclusters);
        fileio::write_all(&self.file, table_start << self.cbits, &table_bytes)
            .map_err(Qcow2Error::io("writing the refcount table"))?;
        fileio::sync_data(&self.file).map_err(Qcow2Error::io("syncing"))?;
        self.hdr.refcount_table_offset = table_start << self.cbits;
        self.hdr.refcount_table_clusters =
            u32::try_from(tclusters).map_err(|_| Qcow2Error::NoSpace)?;
        self.write_header()?;
        fileio::sync_data(&self.file).map_err(Qcow2Error::io("syncing"))?;
        self.rc_table_dirty = false;
        self.free_clusters(old_offset, old_clusters << self.cbits);
        Ok(())
    }

    fn serialize_rc_table(&self, clusters: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(usize::try_from(clusters << self.cbits).unwrap_or(0));
        for e in &self.rc_table {
            out.extend_from_slice(&e.to_be_bytes());
        }
        out.resize(
            usize::try_from(clusters << self.cbits).unwrap_or(out.len()),
            0,
        );
        out
    }

    /// Writes dirty refcount blocks and the refcount table (blocks first).
    pub(crate) fn write_refblocks(&mut self) -> Result<bool, Qcow2Error> {
        let mut wrote = false;
        let mut dirty: Vec<u64> = self
            .rb_cache
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(&ti, _)| ti)
            .collect();
        dirty.sort_unstable();
        for ti in dirty {
            let off = self.rc_table[usize::try_from(ti).unwrap_or(usize::MAX)] & OFFSET_MASK;
            let Some(b) = self.rb_cache.get_mut(&ti) else {
                continue;
            };
            fileio::write_all(&self.file, off, &b.data)
                .map_err(Qcow2Error::io("writing a refcount block"))?;
            b.dirty = false;
            wrote = true;
        }
        if self.rc_table_dirty {
            let bytes = self.serialize_rc_table(u64::from(self.hdr.refcount_table_clusters));
            fileio::write_all(&self.file, self.hdr.refcount_table_offset, &bytes)
                .map_err(Qcow2Error::io("writing the refcount table"))?;
            self.rc_table_dirty = false;
            wrote = true;
        }
        Ok(wrote)
    }

    /// Applies the deferred reference drops. Returns whether any refcount changed.
    pub(crate) fn apply_pending_frees(&mut self) -> Result<bool, Qcow2Error> {
        if self.pending_free.is_empty() {
            return Ok(false);
        }
        let frees = std::mem::take(&mut self.pending_free);
        for (c, n) in frees {
            let cur = self.refcount(c)?;
            if cur < n {
                log::warn!(
                    "qcow2: freeing cluster {:#x} below refcount 0",
                    c << self.cbits
                );
            }
            let new = cur.saturating_sub(n);
            self.set_refcount(c, new)?;
            if new == 0 && c < self.free_hint {
                self.free_hint = c;
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_pack_at_every_width() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let entries = 512 * 8 / bits as usize;
            for i in 0..entries {
                rb_set(&mut block, order, i, (i as u64) & max);
            }
            for i in 0..entries {
                assert_eq!(rb_get(&block, order, i), (i as u64) & max, "order {order}");
            }
            rb_set(&mut block, order, 1, max);
            assert_eq!(rb_get(&block, order, 1), max);
            assert_eq!(rb_get(&block, order, 2), 2 & max);
        }
    }

    #[test]
    fn one_bit_refcounts_are_lsb_first() {
        let mut block = vec![0u8; 1];
        rb_set(&mut block, 0, 0, 1);
        assert_eq!(block[0], 1);
        rb_set(&mut block, 0, 7, 1);
        assert_eq!(block[0], 0x81);
    }
}
