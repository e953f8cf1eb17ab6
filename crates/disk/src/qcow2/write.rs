//! Guest writes on a qcow2 image: in place where the cluster allows it, else with
//! allocation and copy-on-write; zeroing, discard and compressed writes.
//!
//! [`State::write_in_place`] takes `&self` and runs under the image's shared lock; the rest
//! changes metadata and runs under the exclusive lock.

use super::compress;
use super::io::ALL_UNITS;
use super::refcount::OFFSET_MASK;
use super::state::{L2Table, State, COMPRESSED, COPIED, ZERO};
use super::Qcow2Error;

impl State {
    /// Returns the host offset of a writable (refcount 1) L2 table for guest cluster `gc`,
    /// allocating or copying it.
    pub(crate) fn l2_for_write(&mut self, gc: u64) -> Result<u64, Qcow2Error> {
        let l1i = gc >> self.l2_bits;
        let i = usize::try_from(l1i).map_err(|_| Qcow2Error::NoSpace)?;
        let Some(&e) = self.l1.get(i) else {
            return Err(Qcow2Error::table("L1 table", "too small for the write"));
        };
        let old = e & OFFSET_MASK;
        if old != 0 && e & COPIED != 0 {
            return Ok(old);
        }
        self.mark_dirty_if_lazy()?;
        let data = if old == 0 {
            vec![0u64; self.cs_usize() / 8]
        } else {
            let ext = self.ext_l2;
            let t = self.l2_table(old)?;
            t.data
                .iter()
                .enumerate()
                .map(|(k, &v)| if !ext || k % 2 == 0 { v & !COPIED } else { v })
                .collect()
        };
        let new = self.alloc_clusters(1)?;
        self.l2_cache.insert(new, L2Table { data, dirty: true });
        if old != 0 {
            self.free_clusters(old, self.cs);
        }
        self.l1[i] = new | COPIED;
        self.l1_dirty = true;
        Ok(new)
    }

    /// Sets the L2 entry (and bitmap) of guest cluster `gc` in the table at `l2off`.
    pub(crate) fn set_l2_entry(
        &mut self,
        l2off: u64,
        gc: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<(), Qcow2Error> {
        // With lazy refcounts, L2 tables may reach the disk before the refcounts that back
        // them: the dirty bit has to be set first.
        self.mark_dirty_if_lazy()?;
        let idx = usize::try_from(gc & (self.l2_entries() - 1)).unwrap_or(0);
        let ext = self.ext_l2;
        let t = self.l2_table(l2off)?;
        if ext {
            t.data[idx * 2] = entry;
            t.data[idx * 2 + 1] = bitmap;
        } else {
            t.data[idx] = entry;
        }
        t.dirty = true;
        Ok(())
    }

    /// Drops this table's reference to whatever `entry` points at.
    pub(crate) fn release_entry(&mut self, entry: u64) {
        if entry & COMPRESSED != 0 {
            let (host, csize) = compress::descriptor(entry, self.cbits);
            self.free_clusters(host, csize);
            self.forget_decompressed(entry);
        } else if entry & OFFSET_MASK != 0 {
            self.free_clusters(entry & OFFSET_MASK, self.cs);
        }
    }

    /// Writes host data for guest offset `guest`, encrypting when needed.
    fn write_data(&self, host: u64, guest: u64, data: &[u8]) -> Result<(), Qcow2Error> {
        if let Some(c) = &self.cipher {
            let mut tmp = data.to_vec();
            c.encrypt(host, guest, &mut tmp)?;
            self.write_host(host, &tmp, "writing data")
        } else {
            self.write_host(host, data, "writing data")
        }
    }

    /// Whether a write touching units `touched` of guest cluster `gc` (L2 `entry`/`bitmap`)
    /// can go straight to the host cluster: it is allocated, unshared, not compressed, and the
    /// touched units hold data (not a zero flag).
    fn writable_in_place(&self, gc: u64, entry: u64, bitmap: u64, touched: u64) -> bool {
        let l1_copied = usize::try_from(gc >> self.l2_bits)
            .ok()
            .and_then(|i| self.l1.get(i))
            .is_some_and(|e| e & COPIED != 0);
        let owned =
            l1_copied && entry & COMPRESSED == 0 && entry & COPIED != 0 && entry & OFFSET_MASK != 0;
        owned
            && if self.ext_l2 {
                bitmap & touched == touched
            } else {
                entry & ZERO == 0
            }
    }

    /// Bitmask of the allocation units that `[within, within + len)` of a cluster touches.
    fn touched_units(&self, within: u64, len: u64) -> u64 {
        let u0 = within / self.unit;
        let u1 = (within + len - 1) / self.unit;
        ((1u64 << (u1 - u0 + 1)) - 1) << u0
    }

    /// Writes guest data at `off` into clusters that take it in place, while their L2
    /// tables are cached; contiguous host ranges go out as one write. Returns how many bytes
    /// it wrote: it stops at the first cluster that needs metadata work. Touches no
    /// metadata, so it runs under the shared lock.
    pub(crate) fn write_in_place(&self, off: u64, buf: &[u8]) -> Result<usize, Qcow2Error> {
        let mut done = 0usize;
        // (host offset, index into buf) of the pending contiguous piece.
        let mut piece: Option<(u64, usize)> = None;
        while done < buf.len() {
            let pos = off + done as u64;
            let gc = pos >> self.cbits;
            let within = pos & (self.cs - 1);
            let n = (self.cs - within).min((buf.len() - done) as u64);
            let Some((entry, bitmap)) = self.l2_entry_cached(gc) else {
                break;
            };
            if !self.writable_in_place(gc, entry, bitmap, self.touched_units(within, n)) {
                break;
            }
            let host = (entry & OFFSET_MASK) + within;
            match piece {
                Some((h, s)) if h + (done - s) as u64 == host => {}
                Some((h, s)) => {
                    self.write_data(h, off + s as u64, &buf[s..done])?;
                    piece = Some((host, done));
                }
                None => piece = Some((host, done)),
            }
            // n <= cluster size, which fits usize.
            done += usize::try_from(n).unwrap_or(0);
        }
        if let Some((h, s)) = piece {
            self.write_data(h, off + s as u64, &buf[s..done])?;
        }
        Ok(done)
    }

    /// Writes guest data. `off + buf.len()` must be inside the disk.
    pub(crate) fn write(&mut self, off: u64, buf: &[u8]) -> Result<(), Qcow2Error> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly("opened read-only"));
        }
        let mut done = 0usize;
        while done < buf.len() {
            done += self.write_in_place(off + done as u64, &buf[done..])?;
            if done < buf.len() {
                done += self.write_allocating(off + done as u64, &buf[done..])?;
            }
        }
        Ok(())
    }

    /// Writes the start of `data` (at guest `pos`) where metadata has to change: a run of
    /// whole clusters that all need new host clusters gets one contiguous allocation and one
    /// write; anything else goes cluster by cluster. Returns the bytes written (at least 1).
    fn write_allocating(&mut self, pos: u64, data: &[u8]) -> Result<usize, Qcow2Error> {
        let gc = pos >> self.cbits;
        let within = pos & (self.cs - 1);
        let whole = if within == 0 {
            data.len() as u64 >> self.cbits
        } else {
            0
        };
        // Make the L2 tables writable first, so that they are placed before the data.
        let mut targets = Vec::new();
        for k in 0..whole {
            let l2off = self.l2_for_write(gc + k)?;
            let (entry, _) = self.l2_entry(gc + k)?;
            let kept = entry & COMPRESSED == 0 && entry & COPIED != 0 && entry & OFFSET_MASK != 0;
            if kept {
                // Owned already (in place, or a zero flag over a kept cluster).
                break;
            }
            targets.push((l2off, entry));
        }
        if targets.is_empty() {
            let n = usize::try_from((self.cs - within).min(data.len() as u64)).unwrap_or(0);
            self.write_in_cluster(pos, &data[..n])?;
            return Ok(n);
        }
        let count = targets.len() as u64;
        let bytes = usize::try_from(count << self.cbits).map_err(|_| Qcow2Error::NoSpace)?;
        let host = self.alloc_clusters(count)?;
        self.write_data(host, pos, &data[..bytes])?;
        let bitmap = if self.ext_l2 { ALL_UNITS } else { 0 };
        for (k, (l2off, old)) in (0u64..).zip(targets) {
            self.release_entry(old);
            let entry = (host + (k << self.cbits)) | COPIED;
            self.set_l2_entry(l2off, gc + k, entry, bitmap)?;
        }
        Ok(bytes)
    }

    /// Writes data that lies within one guest cluster.
    fn write_in_cluster(&mut self, pos: u64, data: &[u8]) -> Result<(), Qcow2Error> {
        let gc = pos >> self.cbits;
        let cstart = gc << self.cbits;
        let within = pos - cstart;
        let (entry, bitmap) = self.l2_entry(gc)?;
        let u0 = within / self.unit;
        let u1 = (within + data.len() as u64 - 1) / self.unit;
        let touched = self.touched_units(within, data.len() as u64);
        if self.writable_in_place(gc, entry, bitmap, touched) {
            return self.write_data((entry & OFFSET_MASK) + within, pos, data);
        }
        let l2off = self.l2_for_write(gc)?;
        let (entry, bitmap) = self.l2_entry(gc)?;
        let host = entry & OFFSET_MASK;
        let writable = entry & COMPRESSED == 0 && entry & COPIED != 0 && host != 0;
        if !self.ext_l2 {
            // Build the whole cluster as the guest will see it.
            let mut full = vec![0u8; self.cs_usize()];
            if data.len() as u64 != self.cs {
                if !(writable && entry & ZERO != 0) {
                    self.read(cstart, &mut full)?;
                }
                let w = usize::try_from(within).unwrap_or(0);
                full[w..w + data.len()].copy_from_slice(data);
            } else {
                full.copy_from_slice(data);
            }
            let target = if writable {
                host
            } else {
                self.alloc_clusters(1)?
            };
            self.write_data(target, cstart, &full)?;
            if !writable {
                self.release_entry(entry);
            }
            return self.set_l2_entry(l2off, gc, target | COPIED, 0);
        }
        // Extended L2: write the touched subclusters, filling partial ones from what the
        // guest saw there.
        let ustart = cstart + u0 * self.unit;
        let ulen = (u1 - u0 + 1) * self.unit;
        let mut span = vec![0u8; usize::try_from(ulen).unwrap_or(0)];
        let head = pos - ustart;
        if head != 0 || data.len() as u64 != ulen {
            self.read(ustart, &mut span)?;
        }
        let h = usize::try_from(head).unwrap_or(0);
        span[h..h + data.len()].copy_from_slice(data);
        let alloc = bitmap & ALL_UNITS;
        let zero = (bitmap >> 32) & ALL_UNITS;
        if writable {
            self.write_data(host + u0 * self.unit, ustart, &span)?;
            let nb = (alloc | touched) | ((zero & !touched) << 32);
            return self.set_l2_entry(l2off, gc, entry, nb);
        }
        let target = self.alloc_clusters(1)?;
        let (new_alloc, new_zero) = if entry & COMPRESSED != 0 || host != 0 {
            // Copy every unit the guest sees from this cluster (compressed or shared data).
            let mut full = vec![0u8; self.cs_usize()];
            self.read(cstart, &mut full)?;
            let s = usize::try_from(u0 * self.unit).unwrap_or(0);
            full[s..s + span.len()].copy_from_slice(&span);
            self.write_data(target, cstart, &full)?;
            if entry & COMPRESSED != 0 {
                (ALL_UNITS, 0)
            } else {
                (alloc | touched, zero & !touched)
            }
        } else {
            self.write_data(target + u0 * self.unit, ustart, &span)?;
            (touched, zero & !touched)
        };
        if entry & COMPRESSED != 0 || host != 0 {
            self.release_entry(entry);
        }
        self.set_l2_entry(l2off, gc, target | COPIED, new_alloc | (new_zero << 32))
    }

    /// Makes whole allocation units in `[off, off + len)` read as zero (both must be unit
    /// aligned). `unmap` frees storage; `discard` means "only if cheap", qemu's discard.
    pub(crate) fn zero_units(
        &mut self,
        off: u64,
        len: u64,
        unmap: bool,
        discard: bool,
    ) -> Result<(), Qcow2Error> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly("opened read-only"));
        }
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let gc = pos >> self.cbits;
            let cstart = gc << self.cbits;
            let cend = (cstart + self.cs).min(end);
            let whole = pos == cstart && (cend - cstart == self.cs || cend == self.hdr.size);
            self.zero_in_cluster(gc, pos, cend, whole, unmap, discard)?;
            pos = cend;
        }
        Ok(())
    }

    fn zero_in_cluster(
        &mut self,
        gc: u64,
        pos: u64,
        cend: u64,
        whole: bool,
        unmap: bool,
        discard: bool,
    ) -> Result<(), Qcow2Error> {
        let (entry, bitmap) = self.l2_entry(gc)?;
        let host = entry & OFFSET_MASK;
        let has_backing = self.backing.is_some();
        if !self.ext_l2 {
            if !whole {
                if discard {
                    return Ok(());
                }
                let zeros = vec![0u8; usize::try_from(cend - pos).unwrap_or(0)];
                return self.write(pos, &zeros);
            }
            if self.hdr.version < 3 {
                if has_backing && !discard {
                    let zeros = vec![0u8; self.cs_usize()];
                    return self.write(pos, &zeros);
                }
                if entry == 0 {
                    return Ok(());
                }
                let l2off = self.l2_for_write(gc)?;
                let (entry, _) = self.l2_entry(gc)?;
                self.release_entry(entry);
                return self.set_l2_entry(l2off, gc, 0, 0);
            }
            if entry == 0 && !has_backing && discard {
                return Ok(());
            }
            if entry & ZERO != 0 && (!unmap || host == 0) {
                return Ok(());
            }
            let l2off = self.l2_for_write(gc)?;
            let (entry, _) = self.l2_entry(gc)?;
            let host = entry & OFFSET_MASK;
            let keep = !unmap && entry & COMPRESSED == 0 && entry & COPIED != 0 && host != 0;
            let new = if keep { host | COPIED | ZERO } else { ZERO };
            if !keep {
                self.release_entry(entry);
            }
            return self.set_l2_entry(l2off, gc, new, 0);
        }
        // Extended L2 entries: zero whole subclusters through the bitmap.
        let cstart = gc << self.cbits;
        let u0 = (pos - cstart) / self.unit;
        let u1 = (cend - cstart).div_ceil(self.unit);
        let mask = ((1u64 << (u1 - u0)) - 1) << u0;
        let zero = (bitmap >> 32) & ALL_UNITS;
        let alloc = bitmap & ALL_UNITS;
        if entry & COMPRESSED == 0 && zero & mask == mask && (!unmap || host == 0) {
            return Ok(());
        }
        if discard && entry == 0 && bitmap == 0 && !has_backing {
            return Ok(());
        }
        if entry & COMPRESSED != 0 && !whole {
            // A compressed cluster has no subclusters: decompress it into a normal one.
            let zeros = vec![0u8; usize::try_from(cend - pos).unwrap_or(0)];
            return self.write(pos, &zeros);
        }
        let l2off = self.l2_for_write(gc)?;
        let (entry, bitmap) = self.l2_entry(gc)?;
        let host = entry & OFFSET_MASK;
        let alloc_after = if entry & COMPRESSED != 0 {
            0
        } else {
            alloc & !mask
        };
        let zero_after = if entry & COMPRESSED != 0 {
            ALL_UNITS
        } else {
            zero | mask
        };
        let shared = entry & COPIED == 0 && host != 0;
        let free_host =
            entry & COMPRESSED != 0 || shared || (unmap && alloc_after == 0 && host != 0);
        if shared && alloc_after != 0 {
            // Keep the other subclusters: copy them to a private cluster.
            let mut full = vec![0u8; self.cs_usize()];
            self.read(cstart, &mut full)?;
            let target = self.alloc_clusters(1)?;
            self.write_data(target, cstart, &full)?;
            self.release_entry(entry);
            let _ = bitmap;
            return self.set_l2_entry(l2off, gc, target | COPIED, alloc_after | (zero_after << 32));
        }
        let new_entry = if free_host { 0 } else { entry };
        if free_host {
            self.release_entry(entry);
        }
        self.set_l2_entry(l2off, gc, new_entry, alloc_after | (zero_after << 32))
    }

    /// Writes one whole guest cluster compressed (it must be unallocated). Falls back to a
    /// normal write when the data does not compress.
    pub(crate) fn write_compressed(&mut self, gc: u64, data: &[u8]) -> Result<(), Qcow2Error> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly("opened read-only"));
        }
        if self.cipher.is_some() {
            return Err(Qcow2Error::Unsupported(
                "compression in encrypted images".into(),
            ));
        }
        let cstart = gc << self.cbits;
        let (entry, bitmap) = self.l2_entry(gc)?;
        if entry & (OFFSET_MASK | COMPRESSED) != 0 || bitmap & ALL_UNITS != 0 {
            return Err(Qcow2Error::Unsupported(
                "compressed write to an allocated cluster".into(),
            ));
        }
        let full_cluster = data.len() as u64 == self.cs
            || (cstart + data.len() as u64 == self.hdr.size && (data.len() as u64) < self.cs);
        if !full_cluster {
            return Err(Qcow2Error::Unsupported(
                "compressed writes must cover a whole cluster".into(),
            ));
        }
        let mut input = data.to_vec();
        input.resize(self.cs_usize(), 0);
        let Some(comp) = compress::compress(self.hdr.compression, &input)? else {
            return self.write(cstart, data);
        };
        let l2off = self.l2_for_write(gc)?;
        let host = self.alloc_bytes(comp.len() as u64)?;
        self.write_host(host, &comp, "writing compressed data")?;
        let e = compress::make_descriptor(host, comp.len() as u64, self.cbits);
        self.set_l2_entry(l2off, gc, e, 0)
    }

    /// Allocates `len` bytes for compressed data, packing them after the previous blob, and
    /// takes a reference on every host cluster touched.
    fn alloc_bytes(&mut self, len: u64) -> Result<u64, Qcow2Error> {
        if let Some(cur) = self.compressed_cursor {
            let cluster_end = (cur | (self.cs - 1)) + 1;
            let first = cur >> self.cbits;
            let last = (cur + len - 1) >> self.cbits;
            let mut ok = true;
            for c in (first + 1)..=last {
                if !self.try_claim(c)? {
                    ok = false;
                    break;
                }
            }
            if ok {
                self.adjust_refcount(first, 1)?;
                self.compressed_cursor = Some(cur + len).filter(|&e| e & (self.cs - 1) != 0);
                let _ = cluster_end;
                return Ok(cur);
            }
        }
        let n = len.div_ceil(self.cs);
        let start = self.alloc_clusters(n)?;
        self.compressed_cursor = Some(start + len).filter(|&e| e & (self.cs - 1) != 0);
        Ok(start)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::super::{CreateOptions, Qcow2Image, RepairMode};
    use crate::{BlockDevice, ExtentKind, OpenOptions};

    fn image(dir: &std::path::Path, opts: CreateOptions) -> Qcow2Image {
        let p = dir.join("t.qcow2");
        Qcow2Image::create(&p, &opts).unwrap();
        Qcow2Image::open(&p, &OpenOptions::default()).unwrap()
    }

    fn assert_clean(q: &Qcow2Image) {
        let rep = q.check(RepairMode::None).unwrap();
        assert_eq!(
            (rep.corruptions, rep.leaks),
            (0, 0),
            "check: {:?}",
            rep.messages
        );
    }

    #[test]
    fn write_over_unallocated_clusters_gets_one_contiguous_host_run() {
        let dir = tempfile::tempdir().unwrap();
        let q = image(
            dir.path(),
            CreateOptions {
                size: 16 << 20,
                ..CreateOptions::default()
            },
        );
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        q.write_at(1 << 20, &data).unwrap();
        let e = q.block_status(1 << 20, 1 << 20).unwrap();
        assert_eq!((e.kind, e.len), (ExtentKind::Data, 1 << 20));
        let mut back = vec![0u8; data.len()];
        q.read_at(1 << 20, &mut back).unwrap();
        assert!(back == data);
        assert_clean(&q);
    }

    #[test]
    fn whole_cluster_writes_replace_compressed_zero_and_shared_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let q = image(
            dir.path(),
            CreateOptions {
                size: 4 << 20,
                ..CreateOptions::default()
            },
        );
        let cs = 65536usize;
        q.write_compressed(0, &vec![5u8; cs]).unwrap();
        q.write_at(cs as u64, &vec![6u8; cs]).unwrap();
        q.write_zeroes(2 * cs as u64, cs as u64, false).unwrap();
        q.snapshot_create("s").unwrap();
        q.write_at(3 * cs as u64, &vec![7u8; cs]).unwrap();
        // One write over the compressed, shared, zero and fresh clusters.
        let data = vec![9u8; 4 * cs];
        q.write_at(0, &data).unwrap();
        let mut back = vec![0u8; 4 * cs];
        q.read_at(0, &mut back).unwrap();
        assert!(back == data);
        // The snapshot still sees the old contents.
        let mut old = vec![0u8; 3 * cs];
        q.read_snapshot("s", 0, &mut old).unwrap();
        assert!(old[..cs].iter().all(|&b| b == 5));
        assert!(old[cs..2 * cs].iter().all(|&b| b == 6));
        assert!(old[2 * cs..].iter().all(|&b| b == 0));
        q.flush().unwrap();
        assert_clean(&q);
    }

    #[test]
    fn freed_compressed_cluster_is_not_packed_into_after_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let q = image(
            dir.path(),
            CreateOptions {
                size: 4 << 20,
                ..CreateOptions::default()
            },
        );
        let cs = 65536u64;
        // Compresses to a few bytes: the packing cursor stays inside its host cluster.
        q.write_compressed(0, &vec![1u8; cs as usize]).unwrap();
        q.discard(0, cs).unwrap();
        q.flush().unwrap(); // the compressed cluster's host cluster is free now
        q.write_at(cs, &vec![2u8; cs as usize]).unwrap(); // and may be reused for data
        q.write_compressed(2 * cs, &vec![3u8; cs as usize]).unwrap();
        q.flush().unwrap();
        let mut back = vec![0u8; cs as usize];
        q.read_at(cs, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 2), "data cluster overwritten");
        q.read_at(2 * cs, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 3));
        assert_clean(&q);
    }
}
