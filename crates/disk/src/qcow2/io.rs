//! Guest I/O on a qcow2 image: cluster mapping, reads, writes with copy-on-write, zeroing
//! and discard.

use super::compress;
use super::refcount::OFFSET_MASK;
use super::state::{L2Table, State, COMPRESSED, COPIED, ZERO};
use super::Qcow2Error;
use crate::fileio;

/// What one allocation unit (cluster, or subcluster with extended L2) maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Not allocated here: read from the backing file.
    Unalloc,
    /// Reads as zeroes.
    Zero,
    /// Data at this host offset (of the unit's first byte).
    Data(u64),
    /// Compressed cluster with this L2 entry.
    Compressed(u64),
}

/// A run of guest bytes with one kind of mapping.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub unit: Unit,
    /// Host offset of the run's first byte, for `Data`.
    pub host: u64,
    pub len: u64,
}

const ALL_UNITS: u64 = 0xffff_ffff;

impl State {
    /// Decodes unit `ui` of a cluster from its L2 entry and bitmap.
    pub(crate) fn decode_unit(
        &self,
        gc: u64,
        entry: u64,
        bitmap: u64,
        ui: u64,
    ) -> Result<Unit, Qcow2Error> {
        let bad = |problem| Qcow2Error::BadEntry {
            what: "L2 table",
            entry,
            index: gc,
            problem,
        };
        if entry & COMPRESSED != 0 {
            return Ok(Unit::Compressed(entry));
        }
        let host = entry & OFFSET_MASK;
        if host & (self.cs - 1) != 0 {
            return Err(bad("data cluster offset is not cluster aligned"));
        }
        if !self.ext_l2 {
            if entry & 0x1fe != 0 || entry & 0x3f00_0000_0000_0000 != 0 {
                return Err(bad("reserved bits are set"));
            }
            if entry & ZERO != 0 && self.hdr.version >= 3 {
                return Ok(Unit::Zero);
            }
            return Ok(if host == 0 {
                Unit::Unalloc
            } else {
                Unit::Data(host)
            });
        }
        let alloc = (bitmap >> ui) & 1 != 0;
        let zero = (bitmap >> (32 + ui)) & 1 != 0;
        if alloc && zero {
            return Err(bad("subcluster is both allocated and zero"));
        }
        if alloc {
            if host == 0 {
                return Err(bad("allocated subcluster without a host cluster"));
            }
            return Ok(Unit::Data(host + ui * self.unit));
        }
        Ok(if zero { Unit::Zero } else { Unit::Unalloc })
    }

    /// Maps the longest run of like units starting at guest `off`, at most `max` bytes.
    pub(crate) fn map_run(&mut self, off: u64, max: u64) -> Result<Run, Qcow2Error> {
        let upc = self.cs / self.unit;
        let mut gc = off >> self.cbits;
        let (mut entry, mut bitmap) = self.l2_entry(gc)?;
        let mut ui = (off & (self.cs - 1)) / self.unit;
        let first = self.decode_unit(gc, entry, bitmap, ui)?;
        let within = off & (self.unit - 1);
        let host = match first {
            Unit::Data(h) => h + within,
            _ => 0,
        };
        let mut len = self.unit - within;
        if let Unit::Compressed(_) = first {
            len = self.cs - (off & (self.cs - 1));
            return Ok(Run {
                unit: first,
                host: 0,
                len: len.min(max),
            });
        }
        while len < max {
            ui += 1;
            if ui == upc {
                ui = 0;
                gc += 1;
                if gc << self.cbits >= self.hdr.size {
                    break;
                }
                (entry, bitmap) = self.l2_entry(gc)?;
            }
            let next = self.decode_unit(gc, entry, bitmap, ui)?;
            let same = match (first, next) {
                (Unit::Data(a), Unit::Data(b)) => b == a + len + within,
                (Unit::Zero, Unit::Zero) | (Unit::Unalloc, Unit::Unalloc) => true,
                _ => false,
            };
            if !same {
                break;
            }
            len += self.unit;
        }
        Ok(Run {
            unit: first,
            host,
            len: len.min(max),
        })
    }

    /// Reads guest data. `off + buf.len()` must be inside the disk.
    pub(crate) fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let run = self.map_run(pos, (buf.len() - done) as u64)?;
            let n = usize::try_from(run.len).unwrap_or(buf.len() - done);
            let chunk = &mut buf[done..done + n];
            match run.unit {
                Unit::Data(_) => {
                    fileio::read_zero_padded(&self.file, run.host, chunk)
                        .map_err(Qcow2Error::io("reading data"))?;
                    if let Some(c) = &self.cipher {
                        c.decrypt(run.host, pos, chunk)?;
                    }
                }
                Unit::Zero => chunk.fill(0),
                Unit::Unalloc => self.read_backing(pos, chunk)?,
                Unit::Compressed(entry) => {
                    let within = usize::try_from(pos & (self.cs - 1)).unwrap_or(0);
                    let data = self.decompressed_cluster(entry)?;
                    chunk.copy_from_slice(&data[within..within + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Reads from the backing file, zeroes past its end or without one.
    pub(crate) fn read_backing(&self, pos: u64, chunk: &mut [u8]) -> Result<(), Qcow2Error> {
        let Some(b) = &self.backing else {
            chunk.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let avail = usize::try_from(bsize.saturating_sub(pos))
            .unwrap_or(usize::MAX)
            .min(chunk.len());
        if avail > 0 {
            b.read_at(pos, &mut chunk[..avail])
                .map_err(|e| Qcow2Error::Backing {
                    path: self.hdr.backing_file.clone().unwrap_or_default(),
                    source: Box::new(e),
                })?;
        }
        chunk[avail..].fill(0);
        Ok(())
    }

    fn decompressed_cluster(&mut self, entry: u64) -> Result<&[u8], Qcow2Error> {
        let cached = matches!(&self.decompressed, Some((e, _)) if *e == entry);
        if !cached {
            let (host, csize) = compress::descriptor(entry, self.cbits);
            let mut raw = vec![0u8; usize::try_from(csize).unwrap_or(0)];
            fileio::read_zero_padded(&self.file, host, &mut raw)
                .map_err(Qcow2Error::io("reading compressed data"))?;
            let mut out = vec![0u8; self.cs_usize()];
            compress::decompress(self.hdr.compression, &raw, &mut out).map_err(|problem| {
                Qcow2Error::Decompress {
                    offset: host,
                    problem,
                }
            })?;
            self.decompressed = Some((entry, out));
        }
        match &self.decompressed {
            Some((_, d)) => Ok(d),
            None => Err(Qcow2Error::Decompress {
                offset: 0,
                problem: "cache lost".into(),
            }),
        }
    }

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

    pub(crate) fn set_l2_entry(
        &mut self,
        l2off: u64,
        gc: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<(), Qcow2Error> {
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
            if matches!(&self.decompressed, Some((e, _)) if *e == entry) {
                self.decompressed = None;
            }
        } else if entry & OFFSET_MASK != 0 {
            self.free_clusters(entry & OFFSET_MASK, self.cs);
        }
    }

    /// Writes host data for guest offset `guest`, encrypting when needed.
    fn write_data(&mut self, host: u64, guest: u64, data: &[u8]) -> Result<(), Qcow2Error> {
        if let Some(c) = &self.cipher {
            let mut tmp = data.to_vec();
            c.encrypt(host, guest, &mut tmp)?;
            self.write_host(host, &tmp, "writing data")
        } else {
            self.write_host(host, data, "writing data")
        }
    }

    /// Writes guest data. `off + buf.len()` must be inside the disk.
    pub(crate) fn write(&mut self, off: u64, buf: &[u8]) -> Result<(), Qcow2Error> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly("opened read-only"));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let within = pos & (self.cs - 1);
            let n = usize::try_from((self.cs - within).min((buf.len() - done) as u64)).unwrap_or(0);
            self.write_in_cluster(pos, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes data that lies within one guest cluster.
    fn write_in_cluster(&mut self, pos: u64, data: &[u8]) -> Result<(), Qcow2Error> {
        let gc = pos >> self.cbits;
        let cstart = gc << self.cbits;
        let within = pos - cstart;
        // Fast path: an allocated, unshared cluster (or subclusters) written in place.
        let (entry, bitmap) = self.l2_entry(gc)?;
        let host = entry & OFFSET_MASK;
        let l1_ok = self
            .l1
            .get(usize::try_from(gc >> self.l2_bits).unwrap_or(usize::MAX))
            .is_some_and(|e| e & COPIED != 0);
        let writable = l1_ok && entry & COMPRESSED == 0 && entry & COPIED != 0 && host != 0;
        let u0 = within / self.unit;
        let u1 = (within + data.len() as u64 - 1) / self.unit;
        let touched = ((1u64 << (u1 - u0 + 1)) - 1) << u0;
        if writable && !self.ext_l2 && entry & ZERO == 0 {
            return self.write_data(host + within, pos, data);
        }
        if writable && self.ext_l2 && bitmap & touched == touched {
            return self.write_data(host + within, pos, data);
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
