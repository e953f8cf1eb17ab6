//! What the VMM handed over: PVH `hvm_start_info` or Linux `boot_params`.
//!
//! All of it is live until parsed here: every structure we read is recorded
//! in [`Reserved`] so that nothing of ours (page tables, trampoline, memory
//! test patterns) lands on it.

use crate::ranges::Reserved;
use crate::util::peek;

pub const E820_RAM: u32 = 1;
pub const MAX_E820: usize = 256;
const MAX_CMDLINE: usize = 4096;
/// Boot data must lie in the statically mapped first 4 GiB.
const MAPPED: u64 = 1 << 32;

const PVH_MAGIC: u32 = 0x336e_c578;

#[derive(Clone, Copy, Debug, Default)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl E820Entry {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Entry {
    Pvh,
    Linux64,
}

impl Entry {
    pub fn name(self) -> &'static str {
        match self {
            Entry::Pvh => "pvh",
            Entry::Linux64 => "linux64",
        }
    }
}

pub struct BootInfo {
    pub cmdline: Option<&'static [u8]>,
    e820: [E820Entry; MAX_E820],
    e820_len: usize,
    /// The VMM gave more entries than we keep.
    pub e820_truncated: bool,
    /// RSDP address from the boot protocol (0 or absent means: scan).
    pub rsdp: Option<u64>,
    /// A problem that made the boot information unusable.
    pub error: Option<&'static str>,
    /// The initial ramdisk (first PVH module, or the zero page's ramdisk): address, size.
    pub initrd: Option<(u64, u64)>,
}

impl BootInfo {
    pub fn e820(&self) -> &[E820Entry] {
        &self.e820[..self.e820_len]
    }

    /// Total bytes of usable RAM (type 1).
    pub fn ram_bytes(&self) -> u64 {
        self.e820().iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum()
    }

    /// Boot info with the given map and command line (host unit tests).
    #[cfg(test)]
    pub fn for_test(e820: &[E820Entry], cmdline: Option<&'static [u8]>) -> Self {
        let mut bi = BootInfo {
            cmdline,
            e820: [E820Entry::default(); MAX_E820],
            e820_len: 0,
            e820_truncated: false,
            rsdp: None,
            error: None,
            initrd: None,
        };
        e820.iter().for_each(|&e| bi.push_e820(e));
        bi
    }

    fn push_e820(&mut self, e: E820Entry) {
        if self.e820_len == MAX_E820 {
            self.e820_truncated = true;
        } else {
            self.e820[self.e820_len] = e;
            self.e820_len += 1;
        }
    }
}

fn mapped(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|end| end <= MAPPED)
}

/// FNV-1a 64 of `size` bytes at `addr`, if they lie in the identity-mapped first 4 GiB:
/// lets a test check that the VMM loaded the initrd byte for byte.
pub fn fnv1a(addr: u64, size: u64) -> Option<u64> {
    if !mapped(addr, size) {
        return None;
    }
    // SAFETY: [addr, addr + size) lies in the identity-mapped first 4 GiB (checked above).
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, size as usize) };
    Some(bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)))
}

/// Reads a NUL-terminated string (at most MAX_CMDLINE bytes).
fn c_string(addr: u64) -> Option<&'static [u8]> {
    if !mapped(addr, 1) {
        return None;
    }
    let max = (MAPPED - addr).min(MAX_CMDLINE as u64) as usize;
    // SAFETY: [addr, addr + max) lies in the identity-mapped first 4 GiB.
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, max) };
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(max);
    Some(&bytes[..len])
}

/// Parses the boot information at `info` for the given entry kind.
pub fn parse(entry: Entry, info: u64, reserved: &mut Reserved) -> BootInfo {
    let mut bi = BootInfo {
        cmdline: None,
        e820: [E820Entry::default(); MAX_E820],
        e820_len: 0,
        e820_truncated: false,
        rsdp: None,
        error: None,
        initrd: None,
    };
    match entry {
        Entry::Pvh => parse_pvh(&mut bi, info, reserved),
        Entry::Linux64 => parse_boot_params(&mut bi, info, reserved),
    }
    if let Some(c) = bi.cmdline {
        reserved.add(c.as_ptr() as u64, c.len() as u64 + 1);
    }
    bi
}

/// PVH: struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h).
fn parse_pvh(bi: &mut BootInfo, info: u64, reserved: &mut Reserved) {
    if !mapped(info, 56) {
        bi.error = Some("hvm_start_info pointer not in the first 4 GiB");
        return;
    }
    // SAFETY: [info, info + 56) is mapped (checked above).
    let magic: u32 = unsafe { peek(info) };
    if magic != PVH_MAGIC {
        bi.error = Some("bad hvm_start_info magic");
        return;
    }
    // SAFETY: see above.
    let (version, nr_modules, modlist, cmdline, rsdp) = unsafe {
        (
            peek::<u32>(info + 4),
            peek::<u32>(info + 12),
            peek::<u64>(info + 16),
            peek::<u64>(info + 24),
            peek::<u64>(info + 32),
        )
    };
    reserved.add(info, if version >= 1 { 56 } else { 40 });
    bi.cmdline = c_string(cmdline);
    bi.rsdp = (rsdp != 0).then_some(rsdp);
    let modlist_len = u64::from(nr_modules) * 32;
    if nr_modules > 0 && mapped(modlist, modlist_len) {
        reserved.add(modlist, modlist_len);
        for i in 0..u64::from(nr_modules).min(16) {
            // SAFETY: entry i lies inside the mapped module list.
            let (paddr, size, mcmd) = unsafe {
                let e = modlist + i * 32;
                (peek::<u64>(e), peek::<u64>(e + 8), peek::<u64>(e + 16))
            };
            reserved.add(paddr, size);
            if i == 0 && size != 0 {
                bi.initrd = Some((paddr, size));
            }
            if let Some(c) = c_string(mcmd) {
                reserved.add(mcmd, c.len() as u64 + 1);
            }
        }
    }
    if version < 1 {
        bi.error = Some("hvm_start_info version 0 has no memory map");
        return;
    }
    // SAFETY: inside the mapped 56-byte structure.
    let (memmap, entries) = unsafe { (peek::<u64>(info + 40), peek::<u32>(info + 48)) };
    let len = u64::from(entries) * 24;
    if entries == 0 || !mapped(memmap, len) {
        bi.error = Some("hvm_start_info has no usable memory map");
        return;
    }
    reserved.add(memmap, len);
    for i in 0..u64::from(entries) {
        let e = memmap + i * 24;
        // SAFETY: entry i lies inside the mapped memory map.
        let entry = unsafe { E820Entry { addr: peek(e), size: peek(e + 8), kind: peek(e + 16) } };
        bi.push_e820(entry);
    }
}

/// Linux: struct boot_params, the "zero page" (Documentation/arch/x86/zero-page.rst).
fn parse_boot_params(bi: &mut BootInfo, bp: u64, reserved: &mut Reserved) {
    if !mapped(bp, 4096) {
        bi.error = Some("boot_params pointer not in the first 4 GiB");
        return;
    }
    reserved.add(bp, 4096);
    let (rsdp, e820_entries, cmd_lo, cmd_hi) =
        // SAFETY: the 4 KiB zero page is mapped (checked above).
        unsafe { (peek::<u64>(bp + 0x070), peek::<u8>(bp + 0x1e8), peek::<u32>(bp + 0x228), peek::<u32>(bp + 0x0c8)) };
    bi.rsdp = (rsdp != 0).then_some(rsdp);
    bi.cmdline = c_string((u64::from(cmd_hi) << 32) | u64::from(cmd_lo));
    // SAFETY: see above.
    let (rd_lo, rd_hi, rs_lo, rs_hi) =
        unsafe { (peek::<u32>(bp + 0x218), peek::<u32>(bp + 0x0c0), peek::<u32>(bp + 0x21c), peek::<u32>(bp + 0x0c4)) };
    let ramdisk = (u64::from(rd_hi) << 32) | u64::from(rd_lo);
    let ramdisk_size = (u64::from(rs_hi) << 32) | u64::from(rs_lo);
    if ramdisk != 0 {
        reserved.add(ramdisk, ramdisk_size);
        if ramdisk_size != 0 {
            bi.initrd = Some((ramdisk, ramdisk_size));
        }
    }
    // setup_data chain (hdr.setup_data at 0x250): reserve every node.
    // SAFETY: see above.
    let mut sd: u64 = unsafe { peek(bp + 0x250) };
    for _ in 0..16 {
        if !mapped(sd, 16) {
            break;
        }
        // SAFETY: the 16-byte node header is mapped (checked above).
        let (next, len) = unsafe { (peek::<u64>(sd), peek::<u32>(sd + 12)) };
        reserved.add(sd, 16 + u64::from(len));
        sd = next;
    }
    let n = usize::from(e820_entries).min(128);
    for i in 0..n as u64 {
        let e = bp + 0x2d0 + i * 20;
        // SAFETY: the e820 table (128 entries of 20 bytes) lies inside the zero page.
        let entry = unsafe { E820Entry { addr: peek(e), size: peek(e + 8), kind: peek(e + 16) } };
        bi.push_e820(entry);
    }
    if usize::from(e820_entries) > 128 {
        bi.e820_truncated = true;
    }
}
