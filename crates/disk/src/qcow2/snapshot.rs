//! Internal snapshots: the snapshot table, and create / apply / delete with exact refcounts.
//!
//! A data cluster's refcount counts the L1 tables (active and snapshots) that reach it, an
//! L2 table's counts the L1 tables that point at it; that is what `qemu-img check` expects.

use super::header::INCOMPAT_DIRTY;
use super::refcount::OFFSET_MASK;
use super::state::{parse_u64s, serialize_u64s, State, COMPRESSED, COPIED, MAX_L1_BYTES};
use super::Qcow2Error;

/// qemu's limits on the snapshot table.
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
const MAX_EXTRA: u32 = 1024;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Host offset of the snapshot's L1 table.
    pub l1_offset: u64,
    /// Entries in it.
    pub l1_size: u32,
    /// Unique id (qemu numbers them "1", "2", ...).
    pub id: String,
    /// Name.
    pub name: String,
    /// Seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds part.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Saved VM state size.
    pub vm_state_size: u64,
    /// Virtual disk size when taken.
    pub disk_size: u64,
    /// icount (-1 when unused).
    pub icount: Option<u64>,
    /// Extra data beyond the fields we know.
    pub extra_rest: Vec<u8>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Parses the snapshot table.
pub(crate) fn parse_table(
    raw: &[u8],
    count: u32,
    image_size: u64,
) -> Result<(Vec<Snapshot>, u64), Qcow2Error> {
    let bad = |p: &str| Qcow2Error::table("snapshot table", p.to_owned());
    let mut out = Vec::new();
    let mut off = 0usize;
    for _ in 0..count {
        if off + 40 > raw.len() {
            return Err(bad("is truncated"));
        }
        let e = &raw[off..];
        let l1_offset = be64(e, 0);
        let l1_size = be32(e, 8);
        let id_len = usize::from(u16::from_be_bytes([e[12], e[13]]));
        let name_len = usize::from(u16::from_be_bytes([e[14], e[15]]));
        let extra = be32(e, 36);
        if extra > MAX_EXTRA {
            return Err(bad("has an entry with too much extra data"));
        }
        let extra = extra as usize;
        let total = 40 + extra + id_len + name_len;
        if off + total > raw.len() {
            return Err(bad("is truncated"));
        }
        let x = &e[40..40 + extra];
        let vm_state_size = if extra >= 8 {
            be64(x, 0)
        } else {
            u64::from(be32(e, 32))
        };
        let disk_size = if extra >= 16 { be64(x, 8) } else { image_size };
        let icount = (extra >= 24)
            .then(|| be64(x, 16))
            .filter(|&v| v != u64::MAX);
        let extra_rest = if extra > 24 {
            x[24..].to_vec()
        } else {
            Vec::new()
        };
        let id = String::from_utf8_lossy(&e[40 + extra..40 + extra + id_len]).into_owned();
        let name = String::from_utf8_lossy(&e[40 + extra + id_len..total]).into_owned();
        out.push(Snapshot {
            l1_offset,
            l1_size,
            id,
            name,
            date_sec: be32(e, 16),
            date_nsec: be32(e, 20),
            vm_clock_nsec: be64(e, 24),
            vm_state_size,
            disk_size,
            icount,
            extra_rest,
        });
        off += total.div_ceil(8) * 8;
    }
    Ok((out, off as u64))
}

/// Serialises the snapshot table.
pub(crate) fn serialize_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in snaps {
        let start = b.len();
        b.extend_from_slice(&s.l1_offset.to_be_bytes());
        b.extend_from_slice(&s.l1_size.to_be_bytes());
        b.extend_from_slice(&u16::try_from(s.id.len()).unwrap_or(0).to_be_bytes());
        b.extend_from_slice(&u16::try_from(s.name.len()).unwrap_or(0).to_be_bytes());
        b.extend_from_slice(&s.date_sec.to_be_bytes());
        b.extend_from_slice(&s.date_nsec.to_be_bytes());
        b.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&u32::try_from(s.vm_state_size).unwrap_or(0).to_be_bytes());
        let extra = 24 + s.extra_rest.len();
        b.extend_from_slice(&u32::try_from(extra).unwrap_or(24).to_be_bytes());
        b.extend_from_slice(&s.vm_state_size.to_be_bytes());
        b.extend_from_slice(&s.disk_size.to_be_bytes());
        b.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        b.extend_from_slice(&s.extra_rest);
        b.extend_from_slice(s.id.as_bytes());
        b.extend_from_slice(s.name.as_bytes());
        let len = b.len() - start;
        b.resize(start + len.div_ceil(8) * 8, 0);
    }
    b
}

impl State {
    /// Loads and validates the snapshot table.
    pub(crate) fn load_snapshots(&mut self) -> Result<(), Qcow2Error> {
        let n = self.hdr.nb_snapshots;
        if n == 0 {
            return Ok(());
        }
        if n > MAX_SNAPSHOTS {
            return Err(Qcow2Error::TooLarge {
                what: "snapshot count",
                value: u64::from(n),
                limit: u64::from(MAX_SNAPSHOTS),
            });
        }
        let off = self.hdr.snapshots_offset;
        if off & (self.cs - 1) != 0 || off == 0 {
            return Err(Qcow2Error::table(
                "snapshot table",
                format!("offset {off:#x} is invalid"),
            ));
        }
        // Entries are variable-sized: read what the file has, bounded by qemu's limit.
        let avail = self.file_len().saturating_sub(off).min(MAX_SNAPSHOT_TABLE);
        if avail == 0 {
            return Err(Qcow2Error::Truncated {
                what: "snapshot table",
                offset: off,
            });
        }
        let raw = self.read_meta(off, avail, "snapshot table")?;
        (self.snapshots, self.snap_table_len) = parse_table(&raw, n, self.hdr.size)?;
        for s in &self.snapshots {
            let bytes = u64::from(s.l1_size) * 8;
            if bytes > MAX_L1_BYTES {
                return Err(Qcow2Error::TooLarge {
                    what: "snapshot L1 table",
                    value: bytes,
                    limit: MAX_L1_BYTES,
                });
            }
            self.check_table_placement("snapshot L1 table", s.l1_offset, bytes)?;
        }
        Ok(())
    }

    /// Finds a snapshot by id first, then by name.
    pub(crate) fn find_snapshot(&self, key: &str) -> Option<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == key)
            .or_else(|| self.snapshots.iter().position(|s| s.name == key))
    }

    pub(crate) fn read_l1_at(&self, off: u64, size: u32) -> Result<Vec<u64>, Qcow2Error> {
        if size == 0 {
            return Ok(Vec::new());
        }
        Ok(parse_u64s(&self.read_meta(
            off,
            u64::from(size) * 8,
            "snapshot L1 table",
        )?))
    }

    /// Adds `delta` to the refcount of every L2 table in `l1` and of every cluster they map.
    fn adjust_tree(&mut self, l1: &[u64], delta: i64) -> Result<(), Qcow2Error> {
        let ext = self.ext_l2;
        for &e in l1 {
            let l2off = e & OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            self.adjust_refcount(l2off >> self.cbits, delta)?;
            let entries: Vec<u64> = {
                let t = self.l2_table(l2off)?;
                if ext {
                    t.data.iter().step_by(2).copied().collect()
                } else {
                    t.data.clone()
                }
            };
            for entry in entries {
                if entry & COMPRESSED != 0 {
                    let (host, csize) = super::compress::descriptor(entry, self.cbits);
                    for c in (host >> self.cbits)..=((host + csize - 1) >> self.cbits) {
                        self.adjust_refcount(c, delta)?;
                    }
                } else if entry & OFFSET_MASK != 0 {
                    self.adjust_refcount((entry & OFFSET_MASK) >> self.cbits, delta)?;
                }
            }
        }
        Ok(())
    }

    /// Recomputes the COPIED flags of the active L1 table and its L2 tables from refcounts.
    pub(crate) fn fix_copied_flags(&mut self) -> Result<(), Qcow2Error> {
        let ext = self.ext_l2;
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let l2off = e & OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            let rc = self.refcount(l2off >> self.cbits)?;
            let want = if rc == 1 { l2off | COPIED } else { l2off };
            if want != e {
                self.l1[i] = want;
                self.l1_dirty = true;
            }
            let entries: Vec<(usize, u64)> = {
                let t = self.l2_table(l2off)?;
                let step = if ext { 2 } else { 1 };
                t.data.iter().copied().enumerate().step_by(step).collect()
            };
            for (k, entry) in entries {
                if entry & COMPRESSED != 0 || entry & OFFSET_MASK == 0 {
                    continue;
                }
                let rc = self.refcount((entry & OFFSET_MASK) >> self.cbits)?;
                let want = if rc == 1 {
                    entry | COPIED
                } else {
                    entry & !COPIED
                };
                if want != entry {
                    let t = self.l2_table(l2off)?;
                    t.data[k] = want;
                    t.dirty = true;
                }
            }
        }
        Ok(())
    }

    /// Sets the dirty bit (v3) around a snapshot operation. Snapshot operations change
    /// refcounts and COPIED flags that live in different clusters, so a crash in between
    /// leaves flags that disagree with refcounts (qemu has the same window); with the dirty
    /// bit set, the next read-write open by kiln or qemu repairs them.
    fn begin_snapshot_op(&mut self) -> Result<(), Qcow2Error> {
        if self.hdr.version >= 3 && self.hdr.incompatible & INCOMPAT_DIRTY == 0 {
            self.hdr.incompatible |= INCOMPAT_DIRTY;
            self.write_header()?;
            self.sync()?;
        }
        Ok(())
    }

    fn end_snapshot_op(&mut self) -> Result<(), Qcow2Error> {
        self.flush()?;
        if self.hdr.incompatible & INCOMPAT_DIRTY != 0 && !self.marked_dirty {
            self.hdr.incompatible &= !INCOMPAT_DIRTY;
            self.write_header()?;
            self.sync()?;
        }
        Ok(())
    }

    /// Writes the snapshot table to fresh clusters and switches the header to it.
    fn commit_snapshot_table(&mut self) -> Result<(), Qcow2Error> {
        let bytes = serialize_table(&self.snapshots);
        let old = (self.hdr.snapshots_offset, self.snap_table_len);
        let new_off = if bytes.is_empty() {
            0
        } else {
            let n = (bytes.len() as u64).div_ceil(self.cs);
            let off = self.alloc_clusters(n)?;
            self.write_host(off, &bytes, "writing the snapshot table")?;
            off
        };
        // Refcounts for the new table must be on disk before the header points at it.
        self.write_back_metadata()?;
        self.sync()?;
        self.hdr.snapshots_offset = new_off;
        self.hdr.nb_snapshots =
            u32::try_from(self.snapshots.len()).map_err(|_| Qcow2Error::NoSpace)?;
        self.write_header()?;
        self.sync()?;
        self.snap_table_len = bytes.len() as u64;
        if old.0 != 0 && old.1 > 0 {
            self.free_clusters(old.0, old.1);
        }
        Ok(())
    }

    /// Creates a snapshot of the active state.
    pub(crate) fn snapshot_create(
        &mut self,
        name: &str,
        date: (u32, u32),
    ) -> Result<(), Qcow2Error> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly("opened read-only"));
        }
        if self.snapshots.iter().any(|s| s.name == name) {
            return Err(Qcow2Error::SnapshotExists(name.to_owned()));
        }
        if self.snapshots.len() >= MAX_SNAPSHOTS as usize {
            return Err(Qcow2Error::TooLarge {
                what: "snapshot count",
                value: MAX_SNAPSHOTS.into(),
                limit: MAX_SNAPSHOTS.into(),
            });
        }
        self.flush()?;
        self.begin_snapshot_op()?;
        let id = self
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        // 1. Take the references (leaks if we die here).
        let l1 = self.l1.clone();
        self.adjust_tree(&l1, 1)?;
        self.write_refblocks()?;
        self.sync()?;
        // 2. The shared tables are no longer private.
        self.fix_copied_flags()?;
        // 3. Copy the L1 table and record the snapshot.
        let l1_bytes = serialize_u64s(&l1.iter().map(|e| e & !COPIED).collect::<Vec<_>>());
        let l1_off = if l1_bytes.is_empty() {
            0
        } else {
            let off = self.alloc_clusters((l1_bytes.len() as u64).div_ceil(self.cs))?;
            self.write_host(off, &l1_bytes, "writing a snapshot L1 table")?;
            off
        };
        self.snapshots.push(Snapshot {
            l1_offset: l1_off,
            l1_size: self.hdr.l1_size,
            id: id.to_string(),
            name: name.to_owned(),
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: self.hdr.size,
            // qemu-img records 0 (no record/replay) rather than "disabled".
            icount: Some(0),
            extra_rest: Vec::new(),
        });
        self.commit_snapshot_table()?;
        self.end_snapshot_op()
    }

    /// Makes a snapshot the active state (the current state is dropped).
    pub(crate) fn snapshot_apply(&mut self, key: &str) -> Result<(), Qcow2Error> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly("opened read-only"));
        }
        let i = self
            .find_snapshot(key)
            .ok_or_else(|| Qcow2Error::SnapshotNotFound(key.to_owned()))?;
        self.flush()?;
        self.begin_snapshot_op()?;
        let snap = self.snapshots[i].clone();
        let mut new_l1 = self.read_l1_at(snap.l1_offset, snap.l1_size)?;
        for (k, e) in new_l1.iter().enumerate() {
            super::state::check_l1_entry(*e, k as u64, self.cs)?;
        }
        let needed = usize::try_from(self.l1_entries_for(snap.disk_size)?)
            .map_err(|_| Qcow2Error::NoSpace)?;
        if new_l1.len() < needed {
            new_l1.resize(needed, 0);
        }
        // Reference the snapshot's tree for the active L1 first, then drop the old tree.
        self.adjust_tree(&new_l1, 1)?;
        self.write_refblocks()?;
        self.sync()?;
        let old_l1 = std::mem::take(&mut self.l1);
        let old_l1_off = self.hdr.l1_table_offset;
        let old_l1_size = self.hdr.l1_size;
        let stripped: Vec<u64> = new_l1.iter().map(|e| e & !COPIED).collect();
        let bytes = serialize_u64s(&stripped);
        let new_off = if bytes.is_empty() {
            0
        } else {
            let off = self.alloc_clusters((bytes.len() as u64).div_ceil(self.cs))?;
            self.write_host(off, &bytes, "writing the L1 table")?;
            off
        };
        self.write_back_metadata()?;
        self.sync()?;
        self.hdr.l1_table_offset = new_off;
        self.hdr.l1_size = u32::try_from(stripped.len()).map_err(|_| Qcow2Error::NoSpace)?;
        self.hdr.size = snap.disk_size;
        self.write_header()?;
        self.sync()?;
        self.l1 = stripped;
        if old_l1_off != 0 && old_l1_size != 0 {
            self.free_clusters(old_l1_off, u64::from(old_l1_size) * 8);
        }
        // Drop the old tree's references directly (its tables are unreachable now).
        self.adjust_tree(&old_l1, -1)?;
        self.write_back_metadata()?;
        self.fix_copied_flags()?;
        self.end_snapshot_op()
    }

    /// Deletes a snapshot and releases what only it referenced.
    pub(crate) fn snapshot_delete(&mut self, key: &str) -> Result<(), Qcow2Error> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly("opened read-only"));
        }
        let i = self
            .find_snapshot(key)
            .ok_or_else(|| Qcow2Error::SnapshotNotFound(key.to_owned()))?;
        self.flush()?;
        self.begin_snapshot_op()?;
        let snap = self.snapshots.remove(i);
        let l1 = self.read_l1_at(snap.l1_offset, snap.l1_size)?;
        // Unlink first: dying after this only leaks.
        self.commit_snapshot_table()?;
        self.adjust_tree(&l1, -1)?;
        if snap.l1_offset != 0 && snap.l1_size != 0 {
            self.free_clusters(snap.l1_offset, u64::from(snap.l1_size) * 8);
        }
        self.write_back_metadata()?;
        self.fix_copied_flags()?;
        self.end_snapshot_op()
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_table_round_trips() {
        let s = Snapshot {
            l1_offset: 0x50000,
            l1_size: 3,
            id: "1".into(),
            name: "before upgrade".into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: 1 << 30,
            icount: None,
            extra_rest: Vec::new(),
        };
        let raw = serialize_table(&[s.clone(), s.clone()]);
        assert_eq!(raw.len() % 8, 0);
        let (back, len) = parse_table(&raw, 2, 0).unwrap();
        assert_eq!(len, raw.len() as u64);
        assert_eq!(back, vec![s.clone(), s]);
    }

    #[test]
    fn truncated_snapshot_table_is_an_error() {
        assert!(parse_table(&[0u8; 39], 1, 0).is_err());
    }
}
