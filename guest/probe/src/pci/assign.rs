//! Placing memory BARs the VMM left at address 0 (QEMU microvm without
//! firmware does; Linux would do the same from the host bridge's `_CRS`).
//! Largest first, naturally aligned, first fit in the bridge's memory windows,
//! below 4 GiB when possible (it is identity mapped from the start).

use super::layout::Context;
use super::{Bar, BarKind, Bdf, Config, Pci, CMD_MEM};
use crate::acpi::Acpi;
use crate::bootinfo::E820Entry;
use crate::pcihost::{Window, WindowKind};
use crate::ranges::align_up;
use crate::reason;
use crate::util::Reason;

const FOUR_GIB: u64 = 1 << 32;
const MAX_USED: usize = 320;

/// Ranges already taken.
pub struct Used {
    r: [(u64, u64); MAX_USED],
    n: usize,
}

impl Default for Used {
    fn default() -> Self {
        Used { r: [(0, 0); MAX_USED], n: 0 }
    }
}

impl Used {
    pub fn add(&mut self, start: u64, end: u64) -> Result<(), Reason> {
        if self.n == MAX_USED {
            return Err(reason!("more than {} busy address ranges", MAX_USED));
        }
        self.r[self.n] = (start, end);
        self.n += 1;
        Ok(())
    }

    fn overlap(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        self.r[..self.n].iter().find(|u| u.0 < end && start < u.1).copied()
    }
}

/// First naturally aligned fit for `size` bytes in the memory windows
/// (only below 4 GiB if `below_4g`), avoiding `used`.
pub fn place(size: u64, windows: &[Window], below_4g: bool, used: &Used) -> Option<u64> {
    for w in windows.iter().filter(|w| w.kind == WindowKind::Mem) {
        let end = if below_4g { w.end.min(FOUR_GIB) } else { w.end };
        let mut a = align_up(w.start, size);
        while a.checked_add(size).is_some_and(|e| e <= end) {
            match used.overlap(a, a + size) {
                Some(u) => a = align_up(u.1, size),
                None => return Some(a),
            }
        }
    }
    None
}

/// Everything a new BAR must avoid: RAM, ACPI and NVS, the ECAM region,
/// the APICs, and every assigned memory BAR.
fn busy(pci: &Pci, e820: &[E820Entry], acpi: &Acpi) -> Result<Used, Reason> {
    let mut used = Used::default();
    for e in e820.iter().filter(|e| [1, 3, 4].contains(&e.kind)) {
        used.add(e.addr, e.end())?;
    }
    for a in Context::new(pci, e820, acpi).avoided() {
        used.add(a.0, a.1)?;
    }
    for f in pci.functions() {
        for b in f.bars.iter().flatten().filter(|b| b.is_mem() && b.addr != 0) {
            used.add(b.addr, b.end())?;
        }
    }
    Ok(used)
}

/// Writes `addr` into a memory BAR with decoding off, checks it reads back,
/// and restores the command register.
fn program(cfg: &Config, bdf: Bdf, bar: &Bar, addr: u64) -> Result<(), Reason> {
    let cmd = cfg.read16(bdf, 4);
    cfg.write16(bdf, 4, cmd & !CMD_MEM);
    let off = 0x10 + u16::from(bar.index) * 4;
    // The BAR's low bits are read-only type bits; writing the address is enough.
    cfg.write32(bdf, off, (addr & 0xffff_fff0) as u32);
    if bar.kind == BarKind::Mem64 {
        cfg.write32(bdf, off + 4, (addr >> 32) as u32);
    }
    let mut back = u64::from(cfg.read32(bdf, off) & 0xffff_fff0);
    if bar.kind == BarKind::Mem64 {
        back |= u64::from(cfg.read32(bdf, off + 4)) << 32;
    }
    cfg.write16(bdf, 4, cmd);
    if back != addr {
        return Err(reason!("{} BAR {}: wrote {:#x}, reads back {:#x}", bdf, bar.index, addr, back));
    }
    Ok(())
}

/// Which BARs to (re)place.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pick {
    /// Memory BARs at address 0, anywhere they fit (below 4 GiB first).
    Unassigned,
    /// Every 64-bit memory BAR, into the windows above 4 GiB.
    High,
}

fn place_all(pci: &mut Pci, e820: &[E820Entry], acpi: &Acpi, pick: Pick) -> Result<u32, Reason> {
    // (function index, BAR slot in `bars`, size), largest first.
    let mut todo = [(0usize, 0usize, 0u64); super::MAX_FUNCTIONS * 6];
    let mut ntodo = 0;
    for (fi, f) in pci.functions().iter().enumerate() {
        for (bi, b) in f.bars.iter().enumerate() {
            let wanted = |b: &Bar| match pick {
                Pick::Unassigned => b.is_mem() && b.addr == 0,
                Pick::High => b.kind == BarKind::Mem64,
            };
            if let Some(b) = b.filter(wanted) {
                todo[ntodo] = (fi, bi, b.size);
                ntodo += 1;
            }
        }
    }
    if ntodo == 0 {
        return Ok(0);
    }
    let mut used = busy(pci, e820, acpi)?;
    let todo = &mut todo[..ntodo];
    todo.sort_unstable_by_key(|t| core::cmp::Reverse(t.2));
    let bridge = pci.bridge;
    let all: &[Window] = bridge.as_ref().map_or(&[], |b| b.windows());
    let mut high = [Window { kind: WindowKind::Mem, start: 0, end: 0 }; 16];
    let mut nhigh = 0;
    for w in all.iter().filter(|w| w.kind == WindowKind::Mem && w.start >= FOUR_GIB).take(high.len()) {
        high[nhigh] = *w;
        nhigh += 1;
    }
    let high = &high[..nhigh];
    let cfg = pci.config;
    for &(fi, bi, size) in todo.iter() {
        let f = &mut pci.functions[fi];
        let Some(bar) = f.bars[bi].as_mut() else { continue };
        let addr = match (pick, bar.kind) {
            (Pick::High, _) => place(size, high, false, &used),
            (_, BarKind::Mem32) => place(size, all, true, &used),
            _ => place(size, all, true, &used).or_else(|| place(size, all, false, &used)),
        };
        let Some(addr) = addr else {
            return Err(if all.is_empty() {
                reason!("{} BAR {} is unassigned and the DSDT gives no host-bridge window", f.bdf, bar.index)
            } else {
                reason!("{} BAR {} ({:#x} bytes) does not fit the windows", f.bdf, bar.index, size)
            });
        };
        program(&cfg, f.bdf, bar, addr)?;
        bar.addr = addr;
        used.add(addr, addr + size)?;
    }
    Ok(u32::try_from(ntodo).unwrap_or(u32::MAX))
}

/// Places every unassigned memory BAR; returns how many were placed.
pub fn assign_unassigned(pci: &mut Pci, e820: &[E820Entry], acpi: &Acpi) -> Result<u32, Reason> {
    place_all(pci, e820, acpi, Pick::Unassigned)
}

/// `probe.pci_high=1`: moves every 64-bit memory BAR into the host bridge's
/// windows above 4 GiB (tests the VMM following a BAR the guest moves, and
/// the probe's mapping above RAM). Returns how many moved.
pub fn move_high(pci: &mut Pci, e820: &[E820Entry], acpi: &Acpi) -> Result<u32, Reason> {
    place_all(pci, e820, acpi, Pick::High)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_aligned_first_fit_avoiding_used_ranges() {
        let w = [Window { kind: WindowKind::Mem, start: 0xc000_0000, end: 0xc001_0000 }];
        let mut used = Used::default();
        used.add(0xc000_0000, 0xc000_1000).unwrap();
        assert_eq!(place(0x4000, &w, true, &used), Some(0xc000_4000));
        assert_eq!(place(0x1000, &w, true, &used), Some(0xc000_1000));
        assert_eq!(place(0x2_0000, &w, true, &used), None);
    }

    #[test]
    fn below_4g_skips_high_windows_and_io_windows() {
        let w = [
            Window { kind: WindowKind::Io, start: 0x1000, end: 0x2000 },
            Window { kind: WindowKind::Mem, start: 1 << 36, end: 1 << 37 },
        ];
        let used = Used::default();
        assert_eq!(place(0x1000, &w, true, &used), None);
        assert_eq!(place(0x1000, &w, false, &used), Some(1 << 36));
    }
}
