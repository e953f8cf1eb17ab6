//! Guest reads on a qcow2 image: decoding L2 entries, mapping runs of guest bytes, reading.
//!
//! The mapping and the reads take `&self`: they run under the image's shared lock, several at
//! once, as long as the L2 tables they need are cached. A miss returns early and the caller
//! loads the table under the exclusive lock ([`State::read`] does both, for callers that
//! already hold it).

use super::compress;
use super::refcount::OFFSET_MASK;
use super::state::{State, COMPRESSED, ZERO};
use super::Qcow2Error;
use crate::fileio;

/// What one allocation unit (cluster, or subcluster with extended L2) maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Not allocated here: read from the backing file. With extended L2 entries the host
    /// cluster may exist for other subclusters: then `Some(host offset of this unit)`.
    Unalloc(Option<u64>),
    /// Reads as zeroes; `Some(host offset)` when the zero flag keeps an allocation.
    Zero(Option<u64>),
    /// Data at this host offset (of the unit's first byte).
    Data(u64),
    /// Compressed cluster with this L2 entry.
    Compressed(u64),
}

impl Unit {
    /// Host offset of the unit's first byte, where there is one.
    fn host(self) -> Option<u64> {
        match self {
            Unit::Data(h) => Some(h),
            Unit::Zero(h) | Unit::Unalloc(h) => h,
            Unit::Compressed(_) => None,
        }
    }

    /// Whether `next`, lying `dist` bytes after `self`, continues the same run (same kind,
    /// and host offsets contiguous where there are any).
    fn continued_by(self, next: Unit, dist: u64) -> bool {
        let same_kind = matches!(
            (self, next),
            (Unit::Data(_), Unit::Data(_))
                | (Unit::Zero(_), Unit::Zero(_))
                | (Unit::Unalloc(_), Unit::Unalloc(_))
        );
        same_kind
            && match (self.host(), next.host()) {
                (Some(a), Some(b)) => a.checked_add(dist) == Some(b),
                (None, None) => true,
                _ => false,
            }
    }
}

/// A run of guest bytes with one kind of mapping.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub unit: Unit,
    /// Host offset of the run's first byte, where the unit has one.
    pub host: Option<u64>,
    pub len: u64,
}

/// Every subcluster of an extended L2 bitmap half.
pub(crate) const ALL_UNITS: u64 = 0xffff_ffff;

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
        let at = (host != 0).then_some(host + ui * self.unit);
        if !self.ext_l2 {
            if entry & 0x1fe != 0 || entry & 0x3f00_0000_0000_0000 != 0 {
                return Err(bad("reserved bits are set"));
            }
            if entry & ZERO != 0 && self.hdr.version >= 3 {
                return Ok(Unit::Zero(at));
            }
            return Ok(at.map_or(Unit::Unalloc(None), Unit::Data));
        }
        let alloc = (bitmap >> ui) & 1 != 0;
        let zero = (bitmap >> (32 + ui)) & 1 != 0;
        if alloc && zero {
            return Err(bad("subcluster is both allocated and zero"));
        }
        if alloc {
            return at
                .map(Unit::Data)
                .ok_or_else(|| bad("allocated subcluster without a host cluster"));
        }
        Ok(if zero {
            Unit::Zero(at)
        } else {
            Unit::Unalloc(at)
        })
    }

    /// Maps the longest run of like units starting at guest `off` (at most `max` bytes) as
    /// far as cached L2 tables tell; `None` when the first unit's table is not cached.
    pub(crate) fn map_run_cached(&self, off: u64, max: u64) -> Result<Option<Run>, Qcow2Error> {
        let upc = self.cs / self.unit;
        let mut gc = off >> self.cbits;
        let Some((mut entry, mut bitmap)) = self.l2_entry_cached(gc) else {
            return Ok(None);
        };
        let mut ui = (off & (self.cs - 1)) / self.unit;
        let first = self.decode_unit(gc, entry, bitmap, ui)?;
        let within = off & (self.unit - 1);
        let host = first.host().map(|h| h + within);
        if let Unit::Compressed(_) = first {
            let len = self.cs - (off & (self.cs - 1));
            return Ok(Some(Run {
                unit: first,
                host,
                len: len.min(max),
            }));
        }
        let mut len = self.unit - within;
        while len < max {
            ui += 1;
            if ui == upc {
                ui = 0;
                gc += 1;
                if gc << self.cbits >= self.hdr.size {
                    break;
                }
                match self.l2_entry_cached(gc) {
                    Some(e) => (entry, bitmap) = e,
                    // The run may be longer; this much is certain.
                    None => break,
                }
            }
            let next = self.decode_unit(gc, entry, bitmap, ui)?;
            if !first.continued_by(next, len + within) {
                break;
            }
            len += self.unit;
        }
        Ok(Some(Run {
            unit: first,
            host,
            len: len.min(max),
        }))
    }

    /// Maps the run at guest `off`, loading L2 tables as needed.
    pub(crate) fn map_run(&mut self, off: u64, max: u64) -> Result<Run, Qcow2Error> {
        if let Some(run) = self.map_run_cached(off, max)? {
            return Ok(run);
        }
        self.load_l2_for(off >> self.cbits)?;
        self.map_run_cached(off, max)?
            .ok_or_else(|| Qcow2Error::table("L2 table", "vanished from cache"))
    }

    /// Reads guest data at `off` while the L2 tables it needs are cached; returns how many
    /// bytes it read (0 when the first table is missing). `off + buf.len()` must be inside
    /// the disk.
    pub(crate) fn read_cached(&self, off: u64, buf: &mut [u8]) -> Result<usize, Qcow2Error> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let Some(run) = self.map_run_cached(pos, (buf.len() - done) as u64)? else {
                break;
            };
            let n = usize::try_from(run.len).unwrap_or(buf.len() - done);
            self.read_run(&run, pos, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(done)
    }

    /// Reads guest data, loading L2 tables as needed. `off + buf.len()` must be inside the
    /// disk.
    pub(crate) fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let cached = self.read_cached(pos, &mut buf[done..])?;
            done += cached;
            if cached == 0 {
                // The next run's L2 table is not cached: load it and read that run.
                let run = self.map_run(pos, (buf.len() - done) as u64)?;
                let n = usize::try_from(run.len).unwrap_or(buf.len() - done);
                self.read_run(&run, pos, &mut buf[done..done + n])?;
                done += n;
            }
        }
        Ok(())
    }

    /// Fills `chunk` (guest bytes at `pos`, all inside `run`).
    fn read_run(&self, run: &Run, pos: u64, chunk: &mut [u8]) -> Result<(), Qcow2Error> {
        match (run.unit, run.host) {
            (Unit::Data(_), Some(host)) => {
                fileio::read_zero_padded(&self.file, host, chunk)
                    .map_err(Qcow2Error::io("reading data"))?;
                if let Some(c) = &self.cipher {
                    c.decrypt(host, pos, chunk)?;
                }
                Ok(())
            }
            (Unit::Zero(_), _) => {
                chunk.fill(0);
                Ok(())
            }
            (Unit::Unalloc(_), _) => self.read_backing(pos, chunk),
            (Unit::Compressed(entry), _) => {
                let within = usize::try_from(pos & (self.cs - 1)).unwrap_or(0);
                self.read_compressed(entry, within, chunk)
            }
            (Unit::Data(_), None) => Err(Qcow2Error::table("L2 table", "data without an offset")),
        }
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

    /// Copies bytes `within..` of a compressed cluster into `out`, decompressing it unless
    /// it is the one decompressed last.
    fn read_compressed(&self, entry: u64, within: usize, out: &mut [u8]) -> Result<(), Qcow2Error> {
        let end = within
            .checked_add(out.len())
            .filter(|&e| e <= self.cs_usize())
            .ok_or_else(|| Qcow2Error::table("L2 table", "compressed read past the cluster"))?;
        {
            let cache = self.decompressed.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((e, data)) = cache.as_ref() {
                if *e == entry {
                    out.copy_from_slice(&data[within..end]);
                    return Ok(());
                }
            }
        }
        let (host, csize) = compress::descriptor(entry, self.cbits);
        let mut raw = vec![0u8; usize::try_from(csize).unwrap_or(0)];
        fileio::read_zero_padded(&self.file, host, &mut raw)
            .map_err(Qcow2Error::io("reading compressed data"))?;
        let mut data = vec![0u8; self.cs_usize()];
        compress::decompress(self.hdr.compression, &raw, &mut data).map_err(|problem| {
            Qcow2Error::Decompress {
                offset: host,
                problem,
            }
        })?;
        out.copy_from_slice(&data[within..end]);
        *self.decompressed.lock().unwrap_or_else(|p| p.into_inner()) = Some((entry, data));
        Ok(())
    }

    /// qemu's test for preallocated metadata: at least 10 % (and 2 clusters) more clusters
    /// have a refcount than the file has storage for.
    pub(crate) fn detect_metadata_preallocation(&mut self) -> Result<bool, Qcow2Error> {
        let file_len = self
            .file
            .metadata()
            .map_err(Qcow2Error::io("reading the image size"))?
            .len();
        let real_clusters = fileio::allocated_bytes(&self.file)
            .map_err(Qcow2Error::io("reading the image size"))?
            / self.cs;
        let threshold = (real_clusters.saturating_mul(10) / 9).max(real_clusters + 2);
        let end = file_len.div_ceil(self.cs);
        let mut in_use = 0u64;
        let mut c = 0u64;
        while c < end && in_use < threshold {
            if self.refcount(c)? != 0 {
                in_use += 1;
            }
            c += 1;
        }
        Ok(in_use >= threshold)
    }

    /// What the image file holds at `[host, host + len)`, as qemu asks the file system:
    /// `(length, reads as zero)` of the first stretch, a hole (or the end of the file)
    /// being zero and anything else data.
    pub(crate) fn host_file_status(&self, host: u64, len: u64) -> Result<(u64, bool), Qcow2Error> {
        let file_len = self
            .file
            .metadata()
            .map_err(Qcow2Error::io("reading the image size"))?
            .len();
        if host >= file_len {
            return Ok((len, true));
        }
        Ok(match fileio::seek_data_hole(&self.file, host, true) {
            // No data up to the end of the file: a hole that runs to the end reads as zero
            // for the whole range.
            None => (len, true),
            Some(d) if d > host => {
                if d >= file_len {
                    (len, true)
                } else {
                    ((d - host).min(len), true)
                }
            }
            Some(_) => {
                let hole = fileio::seek_data_hole(&self.file, host, false).unwrap_or(file_len);
                ((hole.max(host + 1) - host).min(len), false)
            }
        })
    }

    /// Forgets the decompressed cluster cached for `entry` (its cluster is being released).
    pub(crate) fn forget_decompressed(&self, entry: u64) {
        let mut cache = self.decompressed.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(cache.as_ref(), Some((e, _)) if *e == entry) {
            *cache = None;
        }
    }
}
