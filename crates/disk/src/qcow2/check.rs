//! Consistency check and repair: recompute every cluster's refcount from the metadata and
//! compare, like `qemu-img check`. Also used to repair an image left dirty by lazy refcounts.

use super::compress;
use super::refcount::{rb_get, OFFSET_MASK};
use super::state::{parse_u64s, State, COMPRESSED, COPIED, ZERO};
use super::Qcow2Error;

/// What `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Report only.
    None,
    /// Fix refcounts that are too high.
    Leaks,
    /// Fix every refcount and the COPIED flags.
    All,
}

/// The result of a check, with qemu-img's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Refcounts too low, wrong flags, entries pointing outside the file.
    pub corruptions: u64,
    /// Refcounts too high.
    pub leaks: u64,
    /// Problems that stopped the check from completing.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// End of the last used cluster.
    pub image_end_offset: u64,
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active L1 table.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// One line per problem, worded like qemu-img's.
    pub messages: Vec<String>,
}

/// Clusters counted in a dense vector up to here; above it (a file that a hostile image
/// made grow sparse, far past its metadata) in a map, so memory follows the references, not
/// the file size.
const DENSE_CLUSTERS: u64 = 1 << 24;
/// One metadata region never spans more clusters than this (qemu's largest tables are a
/// few MiB); a claim of more is reported instead of counted cluster by cluster.
const MAX_REGION_CLUSTERS: u64 = 1 << 22;

/// At most this many problem lines are kept (qemu prints every one; a hostile image could
/// make that millions). The counters still count them all.
const MAX_MESSAGES: usize = 100_000;
/// The comparison of stored against counted refcounts visits at most this many clusters
/// (2^28: 128 GiB of 512-byte clusters, 16 TiB of 64 KiB ones); past it the check stops
/// with a check error instead of running for minutes on a hostile image.
const MAX_COMPARED: u64 = 1 << 28;

fn note(rep: &mut CheckReport, msg: String) {
    if rep.messages.len() < MAX_MESSAGES {
        rep.messages.push(msg);
    }
}

struct Counter {
    dense: Vec<u32>,
    sparse: std::collections::BTreeMap<u64, u32>,
    /// One past the highest cluster counted.
    end: u64,
    cs_bits: u32,
    file_clusters: u64,
}

impl Counter {
    fn new(cs_bits: u32, file_clusters: u64) -> Self {
        Counter {
            dense: Vec::new(),
            sparse: std::collections::BTreeMap::new(),
            end: 0,
            cs_bits,
            file_clusters,
        }
    }

    /// References counted for cluster `c`.
    fn get(&self, c: u64) -> u32 {
        if c < DENSE_CLUSTERS {
            usize::try_from(c)
                .ok()
                .and_then(|i| self.dense.get(i))
                .copied()
                .unwrap_or(0)
        } else {
            self.sparse.get(&c).copied().unwrap_or(0)
        }
    }

    fn bump(&mut self, c: u64) {
        self.end = self.end.max(c + 1);
        match usize::try_from(c) {
            Ok(i) if c < DENSE_CLUSTERS => {
                if i >= self.dense.len() {
                    self.dense.resize(i + 1, 0);
                }
                self.dense[i] = self.dense[i].saturating_add(1);
            }
            _ => {
                let n = self.sparse.entry(c).or_insert(0);
                *n = n.saturating_add(1);
            }
        }
    }

    /// Counted clusters at or above `from` with their counts, in order.
    fn counted_from(&self, from: u64) -> Vec<(u64, u32)> {
        let mut out: Vec<(u64, u32)> = (0u64..)
            .zip(self.dense.iter().copied())
            .skip(usize::try_from(from).unwrap_or(usize::MAX))
            .filter(|&(_, n)| n > 0)
            .collect();
        out.extend(
            self.sparse
                .range(from.max(DENSE_CLUSTERS)..)
                .filter(|(_, &n)| n > 0)
                .map(|(&c, &n)| (c, n)),
        );
        out
    }

    /// Whether no cluster in `[start, end)` was counted.
    fn none_in(&self, start: u64, end: u64) -> bool {
        let len = self.dense.len() as u64;
        let dense_clear = start >= len || {
            let (a, b) = (
                usize::try_from(start).unwrap_or(usize::MAX),
                usize::try_from(end.min(len)).unwrap_or(usize::MAX),
            );
            self.dense
                .get(a..b)
                .is_none_or(|s| s.iter().all(|&n| n == 0))
        };
        dense_clear && self.sparse.range(start..end).next().is_none()
    }

    fn inc(&mut self, off: u64, len: u64, what: &str, rep: &mut CheckReport) -> bool {
        if len == 0 {
            return true;
        }
        let first = off >> self.cs_bits;
        let Some(last) = off.checked_add(len - 1).map(|e| e >> self.cs_bits) else {
            rep.corruptions += 1;
            note(rep, format!("ERROR {what} at offset {off:#x} overflows"));
            return false;
        };
        if last >= self.file_clusters {
            rep.corruptions += 1;
            note(
                rep,
                format!(
                "ERROR {what} at offset {off:#x} (length {len}) is past the end of the image file"
            ),
            );
            return false;
        }
        if last - first >= MAX_REGION_CLUSTERS {
            rep.corruptions += 1;
            note(
                rep,
                format!("ERROR {what} at offset {off:#x} claims an absurd length ({len} bytes)"),
            );
            return false;
        }
        for c in first..=last {
            self.bump(c);
        }
        true
    }
}

impl State {
    /// Walks one L1 table, counting references; `active` also checks COPIED flags and stats.
    fn count_l1(
        &mut self,
        l1: &[u64],
        active: bool,
        cnt: &mut Counter,
        rep: &mut CheckReport,
        copied_fixes: &mut Vec<(Option<u64>, usize, u64)>,
    ) -> Result<(), Qcow2Error> {
        let ext = self.ext_l2;
        let mut next_contig = 0u64;
        let mut seen = std::collections::HashSet::new();
        for (i, &e) in l1.iter().enumerate() {
            let l2off = e & OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            if !seen.insert(l2off) {
                // One tree never uses an L2 table twice; walking it again would only let a
                // hostile image multiply the work.
                rep.corruptions += 1;
                note(
                    rep,
                    format!(
                    "ERROR: L2 table {l2off:#x} is referenced twice by one L1 table (index {i})"
                ),
                );
                continue;
            }
            if l2off & (self.cs - 1) != 0 {
                rep.corruptions += 1;
                note(
                    rep,
                    format!("ERROR: L2 table offset {l2off:#x} unaligned (L1 index: {i:#x})"),
                );
                continue;
            }
            if !cnt.inc(l2off, self.cs, "L2 table", rep) {
                continue;
            }
            if active {
                let rc = self.refcount(l2off >> self.cbits)?;
                if (rc == 1) != (e & COPIED != 0) {
                    rep.corruptions += 1;
                    note(
                        rep,
                        format!(
                        "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                    ),
                    );
                    copied_fixes.push((None, i, if rc == 1 { e | COPIED } else { e & !COPIED }));
                }
            }
            let data = match self.l2_cache.get(&l2off) {
                Some(t) => t.data.clone(),
                None => match self.read_meta(l2off, self.cs, "L2 table") {
                    Ok(raw) => parse_u64s(&raw),
                    Err(_) => {
                        rep.check_errors += 1;
                        continue;
                    }
                },
            };
            let step = if ext { 2 } else { 1 };
            for k in (0..data.len()).step_by(step) {
                let entry = data[k];
                let bitmap = if ext { data[k + 1] } else { 0 };
                if entry & COMPRESSED != 0 {
                    let (host, csize) = compress::descriptor(entry, self.cbits);
                    cnt.inc(host, csize, "compressed cluster", rep);
                    if active {
                        rep.allocated_clusters += 1;
                        rep.compressed_clusters += 1;
                    }
                    continue;
                }
                let host = entry & OFFSET_MASK;
                if ext && bitmap & (bitmap >> 32) & 0xffff_ffff != 0 {
                    rep.corruptions += 1;
                    note(
                        rep,
                        format!(
                            "ERROR: invalid subcluster bitmap {bitmap:#x} for L2 entry {entry:#x}"
                        ),
                    );
                }
                if host == 0 {
                    continue;
                }
                if host & (self.cs - 1) != 0 || (!ext && entry & 0x1fe != 0) {
                    rep.corruptions += 1;
                    note(rep, format!("ERROR offset={host:x}: Cluster is not properly aligned; L2 entry corrupted."));
                    continue;
                }
                if !cnt.inc(host, self.cs, "data cluster", rep) {
                    continue;
                }
                if active {
                    rep.allocated_clusters += 1;
                    if next_contig != 0 && host != next_contig {
                        rep.fragmented_clusters += 1;
                    }
                    next_contig = host + self.cs;
                    let rc = self.refcount(host >> self.cbits)?;
                    if (rc == 1) != (entry & COPIED != 0) {
                        rep.corruptions += 1;
                        let kind = if !ext && entry & ZERO != 0 {
                            "zero"
                        } else {
                            "data"
                        };
                        note(
                            rep,
                            format!(
                            "ERROR OFLAG_COPIED {kind} cluster: l2_entry={entry:x} refcount={rc}"
                        ),
                        );
                        let fixed = if rc == 1 {
                            entry | COPIED
                        } else {
                            entry & !COPIED
                        };
                        copied_fixes.push((Some(l2off), k, fixed));
                    }
                }
            }
        }
        Ok(())
    }

    fn count_bitmaps(&mut self, cnt: &mut Counter, rep: &mut CheckReport) {
        let Some(ext) = self.hdr.bitmaps.clone() else {
            return;
        };
        if ext.len() < 24 {
            return;
        }
        let dir_size = u64::from_be_bytes(ext[8..16].try_into().unwrap_or([0; 8]));
        let dir_off = u64::from_be_bytes(ext[16..24].try_into().unwrap_or([0; 8]));
        if !cnt.inc(dir_off, dir_size, "bitmap directory", rep) {
            return;
        }
        let Ok(dir) = self.read_meta(dir_off, dir_size, "bitmap directory") else {
            return;
        };
        let mut off = 0usize;
        while off + 24 <= dir.len() {
            let e = &dir[off..];
            let toff = u64::from_be_bytes(e[0..8].try_into().unwrap_or([0; 8]));
            let tsize = u64::from(u32::from_be_bytes(e[8..12].try_into().unwrap_or([0; 4])));
            let name = usize::from(u16::from_be_bytes([e[18], e[19]]));
            let extra = u32::from_be_bytes(e[20..24].try_into().unwrap_or([0; 4])) as usize;
            if cnt.inc(toff, tsize * 8, "bitmap table", rep) {
                if let Ok(t) = self.read_meta(toff, tsize * 8, "bitmap table") {
                    for d in parse_u64s(&t) {
                        if d & OFFSET_MASK != 0 {
                            cnt.inc(d & OFFSET_MASK, self.cs, "bitmap data", rep);
                        }
                    }
                }
            }
            off += (24 + extra + name).div_ceil(8) * 8;
        }
    }

    /// Checks refcounts against the metadata, repairing as asked.
    pub(crate) fn check(&mut self, mode: RepairMode) -> Result<CheckReport, Qcow2Error> {
        let mut first = self.check_once(mode)?;
        if mode != RepairMode::None && (first.leaks_fixed > 0 || first.corruptions_fixed > 0) {
            // Repairs may allocate refcount blocks; converge, then report the final state.
            for _ in 0..4 {
                let again = self.check_once(mode)?;
                if again.leaks == 0 && again.corruptions == 0 {
                    break;
                }
            }
            let after = self.check_once(RepairMode::None)?;
            first.image_end_offset = after.image_end_offset;
            first.messages.extend(after.messages.iter().cloned());
            first.leaks = after.leaks;
            first.corruptions = after.corruptions;
        }
        Ok(first)
    }

    fn check_once(&mut self, mode: RepairMode) -> Result<CheckReport, Qcow2Error> {
        self.write_back_metadata()?;
        let mut rep = CheckReport {
            total_clusters: self.hdr.size.div_ceil(self.cs),
            ..CheckReport::default()
        };
        let file_clusters = self.file_len().div_ceil(self.cs);
        let mut cnt = Counter::new(self.cbits, file_clusters);
        let mut fixes = Vec::new();
        cnt.inc(0, self.cs, "header", &mut rep);
        let l1 = self.l1.clone();
        cnt.inc(
            self.hdr.l1_table_offset,
            l1.len() as u64 * 8,
            "L1 table",
            &mut rep,
        );
        self.count_l1(&l1, true, &mut cnt, &mut rep, &mut fixes)?;
        for s in self.snapshots.clone() {
            cnt.inc(
                s.l1_offset,
                u64::from(s.l1_size) * 8,
                "snapshot L1 table",
                &mut rep,
            );
            match self.read_l1_at(s.l1_offset, s.l1_size) {
                Ok(sl1) => self.count_l1(&sl1, false, &mut cnt, &mut rep, &mut Vec::new())?,
                Err(_) => rep.check_errors += 1,
            }
        }
        if self.hdr.nb_snapshots > 0 {
            cnt.inc(
                self.hdr.snapshots_offset,
                self.snap_table_len,
                "snapshot table",
                &mut rep,
            );
        }
        cnt.inc(
            self.hdr.refcount_table_offset,
            u64::from(self.hdr.refcount_table_clusters) << self.cbits,
            "refcount table",
            &mut rep,
        );
        for &e in &self.rc_table.clone() {
            if e & OFFSET_MASK != 0 {
                cnt.inc(e & OFFSET_MASK, self.cs, "refcount block", &mut rep);
            }
        }
        if let Some((off, len)) = self.hdr.crypto_header {
            cnt.inc(off, len, "encryption header", &mut rep);
        }
        self.count_bitmaps(&mut cnt, &mut rep);

        // Compare with the stored refcounts.
        let per = self.rb_entries();
        let order = self.hdr.refcount_order;
        let mut fix_rc: Vec<(u64, u64)> = Vec::new();
        let covered = self.rc_table.len() as u64 * per;
        let mut last_used = 0u64;
        // Like qemu, compare only clusters that lie in the file or are referenced: refcounts
        // stored for clusters past both describe no storage, and a hostile table can name a
        // million blocks there.
        let bound = file_clusters.max(cnt.end);
        let mut compared = 0u64;
        for ti in 0..self.rc_table.len() as u64 {
            if ti * per >= bound {
                break;
            }
            let entry = self.rc_table[usize::try_from(ti).unwrap_or(0)] & OFFSET_MASK;
            let has = entry != 0;
            if !has && cnt.none_in(ti * per, (ti + 1) * per) {
                continue; // nothing stored, nothing referenced
            }
            compared += per;
            if compared > MAX_COMPARED {
                rep.check_errors += 1;
                note(
                    &mut rep,
                    format!(
                        "ERROR the image describes more than {MAX_COMPARED} clusters; \
                         refcounts past cluster {} were not compared",
                        ti * per
                    ),
                );
                break;
            }
            let block: Option<Vec<u8>> = if has {
                self.refcount(ti * per)?;
                self.rb_cache.get(&ti).map(|b| b.data.clone())
            } else {
                None
            };
            let start = ti * per;
            let lim = bound.saturating_sub(start).min(per);
            for bi in 0..lim {
                let c = start + bi;
                let stored = block
                    .as_ref()
                    .map_or(0, |b| rb_get(b, order, usize::try_from(bi).unwrap_or(0)));
                let want = u64::from(cnt.get(c));
                if stored != 0 || want != 0 {
                    last_used = last_used.max(c + 1);
                }
                if stored == want {
                    continue;
                }
                if stored > want {
                    rep.leaks += 1;
                    note(
                        &mut rep,
                        format!("Leaked cluster {c} refcount={stored} reference={want}"),
                    );
                    if mode != RepairMode::None {
                        fix_rc.push((c, want));
                        rep.leaks_fixed += 1;
                    }
                } else {
                    rep.corruptions += 1;
                    note(
                        &mut rep,
                        format!("ERROR cluster {c} refcount={stored} reference={want}"),
                    );
                    if mode == RepairMode::All {
                        fix_rc.push((c, want));
                        rep.corruptions_fixed += 1;
                    }
                }
            }
        }
        for (c, want) in cnt.counted_from(covered) {
            rep.corruptions += 1;
            note(
                &mut rep,
                format!("ERROR cluster {c} refcount=0 reference={want}"),
            );
            if mode == RepairMode::All {
                fix_rc.push((c, u64::from(want)));
                rep.corruptions_fixed += 1;
            }
            last_used = last_used.max(c + 1);
        }
        rep.image_end_offset = last_used << self.cbits;
        if mode == RepairMode::None || self.read_only {
            return Ok(rep);
        }
        for (c, v) in fix_rc {
            self.set_refcount(c, v)?;
        }
        if mode == RepairMode::All {
            let n = fixes.len() as u64;
            self.write_back_metadata()?;
            self.fix_copied_flags()?;
            rep.corruptions_fixed += n;
        }
        self.flush()?;
        Ok(rep)
    }
}
