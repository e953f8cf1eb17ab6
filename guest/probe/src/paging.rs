//! Identity map for RAM above 4 GiB, built from ring 3.
//!
//! Ring 0 starts on static tables (asm/ring0.S) that map the first 4 GiB
//! with 2 MiB pages: RAM below 4 GiB and the MMIO hole. Here we extend the
//! map to the top of the e820 map with user-accessible 1 GiB pages, or, if
//! the CPU lacks them, 2 MiB pages (4 TiB of RAM then needs 4096 page
//! directories = 16 MiB, taken from RAM below 4 GiB).
//!
//! Under shadow paging every write to a page that is already a live page
//! table traps, so all new tables are filled first, while they are plain
//! memory, and then linked with one write per PML4 entry. The first PML4
//! entry is replaced by a fresh copy of the static PDPT (same first four
//! entries, so the translations in use do not change).

use crate::bootinfo::E820Entry;
use crate::io::cpuid;
use crate::ranges::{align_up, Reserved, PAGE};
use crate::reason;
use crate::ring0;
use crate::util::Reason;

const GIB: u64 = 1 << 30;
const STATIC_GIB: u64 = 4;
/// present | writable | user
const TABLE_FLAGS: u64 = 0x7;
/// present | writable | user | 2 MiB page
const LARGE_FLAGS: u64 = 0x87;

/// Guest physical address width from CPUID (36 if the leaf is missing).
fn phys_bits() -> u32 {
    if cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
        cpuid(0x8000_0008, 0).eax & 0xff
    } else {
        36
    }
}

/// Whether to map RAM above 4 GiB with 1 GiB pages: when the VM's CPU has
/// them (CPUID 0x80000001 EDX bit 26), unless the probe was built with
/// `PROBE_NO_1G` set (to exercise the 2 MiB path). Under shadow paging every
/// page directory costs a shadow page on first use: with 1 GiB pages a
/// sampled 4 TiB guest touches 8 PDPTs instead of 4096 page directories.
fn gib_pages() -> bool {
    option_env!("PROBE_NO_1G").is_none()
        && cpuid(0x8000_0000, 0).eax >= 0x8000_0001
        && cpuid(0x8000_0001, 0).edx & (1 << 26) != 0
}

/// Maps every address below the end of the last e820 entry. Returns the end
/// of the identity map.
pub fn map_all(e820: &[E820Entry], reserved: &mut Reserved) -> Result<u64, Reason> {
    let top = e820.iter().map(|e| e.end()).max().unwrap_or(0);
    let top = align_up(top, GIB);
    if top <= STATIC_GIB * GIB {
        return Ok(STATIC_GIB * GIB);
    }
    let bits = phys_bits();
    if top > (1u64 << bits.min(52)) {
        return Err(reason!("e820 reaches {:#x}, beyond the {}-bit physical address width", top, bits));
    }
    let gibs = top / GIB;
    let pdpts = gibs.div_ceil(512);
    if pdpts > 512 {
        return Err(reason!("e820 reaches {:#x}: too large to map", top));
    }
    let huge = gib_pages();
    let new_pds = if huge { 0 } else { gibs - STATIC_GIB };
    let pages = new_pds + pdpts;
    // Below 4 GiB, so that the tables are themselves mapped while we fill them.
    let base = reserved
        .alloc(e820, pages * PAGE, 1 << 20, STATIC_GIB * GIB)
        .ok_or_else(|| reason!("no free RAM below 4 GiB for {} KiB of page tables", pages * 4))?;
    let pd_base = base;
    let pdpt_base = base + new_pds * PAGE;

    // SAFETY: [base, base + pages * PAGE) is RAM below 4 GiB (mapped), reserved
    // for us just now, and not yet used as a page table, so plain writes are fine.
    let tables = unsafe { core::slice::from_raw_parts_mut(base as *mut u64, (pages * 512) as usize) };
    let (pds, pdpt_tables) = tables.split_at_mut((new_pds * 512) as usize);
    for (i, e) in pds.iter_mut().enumerate() {
        let addr = (STATIC_GIB * GIB) + (i as u64) * (2 << 20);
        *e = addr | LARGE_FLAGS;
    }
    // SAFETY: the static PDPT is a page of u64s in the image.
    let static_pdpt = unsafe { core::slice::from_raw_parts(ring0::pdpt0_addr() as *const u64, 512) };
    for (gib, e) in pdpt_tables.iter_mut().enumerate() {
        let gib = gib as u64;
        *e = if gib < STATIC_GIB {
            static_pdpt[gib as usize]
        } else if gib < gibs && huge {
            (gib * GIB) | LARGE_FLAGS
        } else if gib < gibs {
            (pd_base + (gib - STATIC_GIB) * PAGE) | TABLE_FLAGS
        } else {
            0
        };
    }
    // Link: one (trapping) write per PML4 entry.
    let pml4 = ring0::pml4_addr() as *mut u64;
    for k in 0..pdpts {
        // SAFETY: the PML4 is a mapped page of the image; entry k < 512. The new
        // PDPT maps the same first 4 GiB as the one it replaces, so memory in use
        // keeps its translation; the other entries were not present before.
        unsafe { core::ptr::write_volatile(pml4.add(k as usize), (pdpt_base + k * PAGE) | TABLE_FLAGS) };
    }
    Ok(top)
}

/// Whether `addr` is mapped by the live page tables (identity map).
pub fn is_mapped(addr: u64) -> bool {
    let pml4 = ring0::pml4_addr();
    let entry = |table: u64, idx: u64| -> u64 {
        // SAFETY: every table the walk visits is in the identity-mapped first
        // 4 GiB (the static ones in the image, ours allocated below 4 GiB).
        unsafe { core::ptr::read_volatile((table + idx * 8) as *const u64) }
    };
    let e4 = entry(pml4, (addr >> 39) & 511);
    if e4 & 1 == 0 {
        return false;
    }
    let e3 = entry(e4 & ADDR_MASK, (addr >> 30) & 511);
    if e3 & 1 == 0 {
        return false;
    }
    if e3 & 0x80 != 0 {
        return true;
    }
    entry(e3 & ADDR_MASK, (addr >> 21) & 511) & 1 != 0
}

const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Adds `[start, end)` to the identity map (for MMIO above the RAM that
/// [`map_all`] mapped: ECAM or 64-bit BARs), with 1 GiB pages when the CPU has
/// them, else 2 MiB pages. Already-mapped GiBs are left alone. New tables are
/// filled before they are linked, so each link is one (trapping) write.
pub fn map_range(start: u64, end: u64, e820: &[E820Entry], reserved: &mut Reserved) -> Result<(), Reason> {
    if end <= start {
        return Ok(());
    }
    let bits = phys_bits().min(52);
    if end > (1u64 << bits) {
        return Err(reason!("{:#x}-{:#x} is beyond the {}-bit physical address width", start, end, bits));
    }
    let huge = gib_pages();
    let pml4 = ring0::pml4_addr();
    let alloc = |reserved: &mut Reserved| {
        reserved
            .alloc(e820, PAGE, 1 << 20, STATIC_GIB * GIB)
            .ok_or_else(|| reason!("no free RAM below 4 GiB for a page table"))
    };
    for gib in start / GIB..end.div_ceil(GIB) {
        if gib < STATIC_GIB || is_mapped(gib * GIB) {
            continue;
        }
        let slot4 = pml4 + (gib / 512) * 8;
        // SAFETY: the PML4 is a page of the image; slot4 is one of its entries.
        let mut e4 = unsafe { core::ptr::read_volatile(slot4 as *const u64) };
        if e4 & 1 == 0 {
            let pdpt = alloc(reserved)?;
            // SAFETY: a fresh page below 4 GiB, reserved for us, not yet a table.
            unsafe { core::ptr::write_bytes(pdpt as *mut u8, 0, PAGE as usize) };
            e4 = pdpt | TABLE_FLAGS;
            // SAFETY: links a zeroed PDPT into an entry that was not present.
            unsafe { core::ptr::write_volatile(slot4 as *mut u64, e4) };
        }
        let slot3 = (e4 & ADDR_MASK) + (gib % 512) * 8;
        let e3 = if huge {
            (gib * GIB) | LARGE_FLAGS
        } else {
            let pd = alloc(reserved)?;
            // SAFETY: a fresh page below 4 GiB, reserved for us, not yet a table.
            let table = unsafe { core::slice::from_raw_parts_mut(pd as *mut u64, 512) };
            for (i, e) in table.iter_mut().enumerate() {
                *e = (gib * GIB + (i as u64) * (2 << 20)) | LARGE_FLAGS;
            }
            pd | TABLE_FLAGS
        };
        // SAFETY: the PDPT is below 4 GiB (static or allocated by us) and this
        // entry was not present: nothing in use changes translation.
        unsafe { core::ptr::write_volatile(slot3 as *mut u64, e3) };
    }
    Ok(())
}
