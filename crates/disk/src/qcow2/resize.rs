//! Growing and shrinking the virtual disk.

use super::refcount::OFFSET_MASK;
use super::state::{serialize_u64s, State, MAX_L1_BYTES};
use super::Qcow2Error;

impl State {
    /// Changes the virtual size. Growing keeps the new area reading as zeroes (even over a
    /// larger backing file); shrinking releases the clusters past the new end.
    pub(crate) fn resize(&mut self, new_size: u64) -> Result<(), Qcow2Error> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly("opened read-only"));
        }
        if !self.snapshots.is_empty() && new_size < self.hdr.size {
            return Err(Qcow2Error::Unsupported(
                "Internal snapshots prevent shrinking the image".into(),
            ));
        }
        if !new_size.is_multiple_of(512) {
            return Err(Qcow2Error::InvalidOption(
                "size must be a multiple of 512 bytes".into(),
            ));
        }
        let old = self.hdr.size;
        if new_size == old {
            return Ok(());
        }
        self.flush()?;
        if new_size > old {
            self.grow(old, new_size)
        } else {
            self.shrink(new_size)
        }
    }

    fn grow(&mut self, old: u64, new_size: u64) -> Result<(), Qcow2Error> {
        let need = self.l1_entries_for(new_size)?;
        if need > self.l1.len() as u64 {
            let bytes = need * 8;
            if bytes > MAX_L1_BYTES {
                return Err(Qcow2Error::TooLarge {
                    what: "L1 table",
                    value: bytes,
                    limit: MAX_L1_BYTES,
                });
            }
            let clusters = bytes.div_ceil(self.cs);
            let off = self.alloc_clusters(clusters)?;
            let mut l1 = self.l1.clone();
            l1.resize(usize::try_from(need).map_err(|_| Qcow2Error::NoSpace)?, 0);
            let mut raw = serialize_u64s(&l1);
            raw.resize(usize::try_from(clusters * self.cs).unwrap_or(raw.len()), 0);
            self.write_host(off, &raw, "writing the L1 table")?;
            self.write_back_metadata()?;
            self.sync()?;
            let old_off = self.hdr.l1_table_offset;
            let old_bytes = u64::from(self.hdr.l1_size) * 8;
            self.hdr.l1_table_offset = off;
            self.hdr.l1_size = u32::try_from(need).map_err(|_| Qcow2Error::NoSpace)?;
            self.hdr.size = new_size;
            self.write_header()?;
            self.sync()?;
            self.l1 = l1;
            self.l1_dirty = false;
            if old_off != 0 && old_bytes != 0 {
                self.free_clusters(old_off, old_bytes);
            }
        } else {
            self.hdr.size = new_size;
            self.write_header()?;
            self.sync()?;
        }
        // A backing file larger than the old size must not show through the new area.
        let bsize = self.backing.as_ref().map_or(0, |b| b.size());
        if bsize > old {
            let end = bsize.min(new_size);
            let a0 = (old.div_ceil(self.unit) * self.unit).min(end);
            if a0 > old {
                let z = vec![0u8; usize::try_from(a0 - old).unwrap_or(0)];
                self.write(old, &z)?;
            }
            let a1 = if end == new_size {
                end
            } else {
                (end / self.unit * self.unit).max(a0)
            };
            if a1 > a0 {
                self.zero_units(a0, a1 - a0, false, false)?;
            }
            if end > a1 {
                let z = vec![0u8; usize::try_from(end - a1).unwrap_or(0)];
                self.write(a1, &z)?;
            }
        }
        self.flush()
    }

    /// Drops every mapping of the active L1 table.
    pub(crate) fn deallocate_all(&mut self) -> Result<(), Qcow2Error> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly("opened read-only"));
        }
        let per = self.l2_entries();
        for l1i in 0..self.l1.len() as u64 {
            if self.l2_offset(l1i) == 0 {
                continue;
            }
            for gc in l1i * per..(l1i + 1) * per {
                let (entry, bitmap) = self.l2_entry(gc)?;
                if entry == 0 && bitmap == 0 {
                    continue;
                }
                let l2 = self.l2_for_write(gc)?;
                self.release_entry(entry);
                self.set_l2_entry(l2, gc, 0, 0)?;
            }
        }
        self.flush()
    }

    fn shrink(&mut self, new_size: u64) -> Result<(), Qcow2Error> {
        let first_gc = new_size.div_ceil(self.cs);
        let per = self.l2_entries();
        for l1i in 0..self.l1.len() as u64 {
            let l2off = self.l2_offset(l1i);
            if l2off == 0 {
                continue;
            }
            let base = l1i * per;
            if base + per <= first_gc {
                continue;
            }
            let start = first_gc.max(base);
            for gc in start..base + per {
                let (entry, bitmap) = self.l2_entry(gc)?;
                if entry == 0 && bitmap == 0 {
                    continue;
                }
                let l2 = self.l2_for_write(gc)?;
                self.release_entry(entry);
                self.set_l2_entry(l2, gc, 0, 0)?;
            }
            if start == base {
                // The whole table lies past the end: drop it.
                let l2 = self.l2_offset(l1i);
                let i = usize::try_from(l1i).map_err(|_| Qcow2Error::NoSpace)?;
                self.l1[i] = 0;
                self.l1_dirty = true;
                self.write_back_metadata()?;
                self.l2_cache.remove(&l2);
                self.free_clusters(l2 & OFFSET_MASK, self.cs);
            }
        }
        self.hdr.size = new_size;
        self.write_back_metadata()?;
        self.write_header()?;
        self.flush()
    }
}
