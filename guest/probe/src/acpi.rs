//! ACPI: RSDP, XSDT/RSDT, every table's checksum, the MADT's CPUs and the
//! FADT's power-off method (with `_S5_` from the DSDT's AML).
//!
//! Parsed once, early, before the probe allocates anything: the tables may
//! sit in e820 RAM, so their ranges go into [`Reserved`]. Only the statically
//! mapped first 4 GiB is readable at that point; that is where VMMs put ACPI.

use core::fmt;

use crate::ranges::Reserved;
use crate::ring0;
use crate::util::{peek, Printable, Reason};
use crate::{emit, reason};

const MAPPED: u64 = 1 << 32;
const MAX_TABLES: usize = 64;
const MAX_TABLE_LEN: u32 = 16 << 20;
/// Enabled CPUs whose APIC ids we keep (more are counted, not kept).
pub const MAX_CPUS: usize = 4096;
pub const MAX_IOAPICS: usize = 8;

const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
const FADT_RESET_REG_SUP: u32 = 1 << 10;
const SLP_EN_PM1: u32 = 1 << 13;
const SLP_EN_SLEEP_CTL: u32 = 0x20;

/// Address space of a register (ACPI Generic Address Structure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Memory,
    Io,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerOff {
    /// PM1a control block: write (SLP_TYP << 10) | SLP_EN as 16 bits.
    Pm1a { space: Space, addr: u64, slp_typ: u8 },
    /// HW-reduced sleep control register: write (SLP_TYP << 2) | SLP_EN as 8 bits.
    SleepCtl { space: Space, addr: u64, slp_typ: u8 },
}

impl PowerOff {
    /// Hands the method to ring 0 (used by `ring0::poweroff` and the fault path).
    pub fn install(self) {
        match self {
            PowerOff::Pm1a { space, addr, slp_typ } => {
                let kind = if space == Space::Io { 1 } else { 3 };
                ring0::set_poweroff(kind, addr, (u32::from(slp_typ) << 10) | SLP_EN_PM1);
            }
            PowerOff::SleepCtl { space, addr, slp_typ } => {
                let kind = if space == Space::Io { 2 } else { 4 };
                ring0::set_poweroff(kind, addr, (u32::from(slp_typ) << 2) | SLP_EN_SLEEP_CTL);
            }
        }
    }
}

impl fmt::Display for PowerOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PowerOff::Pm1a { addr, .. } => write!(f, "pm1a:{addr:#x}"),
            PowerOff::SleepCtl { addr, .. } => write!(f, "sleepctl:{addr:#x}"),
        }
    }
}

/// What the MADT says about CPUs.
pub struct Madt {
    pub lapic_addr: u64,
    /// I/O APIC MMIO addresses (type 1 entries), the first [`MAX_IOAPICS`].
    pub ioapics: [u64; MAX_IOAPICS],
    pub nioapics: usize,
    /// Enabled Local APIC (type 0) plus Local x2APIC (type 9) entries.
    pub enabled: u32,
    ids: [u32; MAX_CPUS],
}

impl Madt {
    /// APIC ids of the enabled CPUs (the first MAX_CPUS of them).
    pub fn ids(&self) -> &[u32] {
        &self.ids[..(self.enabled as usize).min(MAX_CPUS)]
    }

    /// I/O APIC MMIO addresses.
    pub fn ioapics(&self) -> &[u64] {
        &self.ioapics[..self.nioapics]
    }
}

pub struct Acpi {
    pub rsdp: u64,
    sigs: [[u8; 4]; MAX_TABLES],
    nsigs: usize,
    pub madt: Option<Madt>,
    pub poweroff: Option<PowerOff>,
    /// FADT reset register and value, when RESET_REG_SUP is set.
    pub reset: Option<(Space, u64, u8)>,
    /// The MCFG table (address, length), if there is one.
    pub mcfg: Option<(u64, u32)>,
    /// The DSDT (address, length), once found through the FADT.
    pub dsdt: Option<(u64, u32)>,
    /// The first problem found; the check fails if set.
    pub error: Option<Reason>,
}

impl Acpi {
    fn fail(&mut self, r: Reason) {
        if self.error.is_none() {
            self.error = Some(r);
        }
    }

    fn push_sig(&mut self, sig: [u8; 4]) {
        if self.nsigs < MAX_TABLES {
            self.sigs[self.nsigs] = sig;
            self.nsigs += 1;
        }
    }
}

/// Displays the table signatures as `FACP,APIC,DSDT`.
struct Sigs<'a>(&'a [[u8; 4]]);

impl fmt::Display for Sigs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", Printable(s))?;
        }
        Ok(())
    }
}

fn mapped(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|end| end <= MAPPED)
}

/// The bytes at `[addr, addr + len)`; the caller has checked `mapped`.
pub(crate) fn bytes(addr: u64, len: u32) -> &'static [u8] {
    debug_assert!(mapped(addr, u64::from(len)));
    // SAFETY: callers only pass ranges inside the identity-mapped first 4 GiB,
    // which the probe never writes while ACPI data is read.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) }
}

fn checksum_ok(b: &[u8]) -> bool {
    b.iter().fold(0u8, |s, &x| s.wrapping_add(x)) == 0
}

fn valid_rsdp(addr: u64) -> bool {
    if !mapped(addr, 20) {
        return false;
    }
    let b = bytes(addr, 20);
    &b[..8] == b"RSD PTR " && checksum_ok(b)
}

/// Looks for the RSDP in the first KiB of the EBDA and in 0xE0000..0xFFFFF.
fn scan_rsdp() -> Option<u64> {
    // SAFETY: 0x40e (the BIOS data area's EBDA segment) is in mapped low memory.
    let ebda = u64::from(unsafe { peek::<u16>(0x40e) }) << 4;
    let ebda_scan = if (0x400..0xa0000).contains(&ebda) { ebda..ebda + 1024 } else { 0..0 };
    ebda_scan.chain(0xe0000..0x100000).step_by(16).find(|&a| valid_rsdp(a))
}

/// A checked table header: signature and length.
fn table(addr: u64) -> Result<([u8; 4], u32), Reason> {
    if !mapped(addr, 36) {
        return Err(reason!("table pointer {:#x} outside the first 4 GiB", addr));
    }
    let sig: [u8; 4] = bytes(addr, 4).try_into().unwrap_or([0; 4]);
    // SAFETY: the 36-byte header is mapped (checked above).
    let len: u32 = unsafe { peek(addr + 4) };
    if !(36..=MAX_TABLE_LEN).contains(&len) || !mapped(addr, u64::from(len)) {
        return Err(reason!("table {} at {:#x} has bad length {}", Printable(&sig), addr, len));
    }
    if !checksum_ok(bytes(addr, len)) {
        return Err(reason!("bad checksum in {} at {:#x}", Printable(&sig), addr));
    }
    Ok((sig, len))
}

/// Parses everything, reserving what it reads. Never fails outright: problems
/// land in `Acpi::error` and whatever was understood is kept.
pub fn parse(hint: Option<u64>, reserved: &mut Reserved) -> Acpi {
    let mut acpi = Acpi {
        rsdp: 0,
        sigs: [[0; 4]; MAX_TABLES],
        nsigs: 0,
        madt: None,
        poweroff: None,
        reset: None,
        mcfg: None,
        dsdt: None,
        error: None,
    };
    let rsdp = match hint {
        Some(a) if valid_rsdp(a) => a,
        Some(a) => {
            acpi.fail(reason!("no valid RSDP at the boot-info address {:#x}", a));
            return acpi;
        }
        None => match scan_rsdp() {
            Some(a) => a,
            None => {
                acpi.fail(reason!("no RSDP found"));
                return acpi;
            }
        },
    };
    acpi.rsdp = rsdp;
    // SAFETY: the 20-byte v1 RSDP is mapped (valid_rsdp checked it).
    let (revision, rsdt) = unsafe { (peek::<u8>(rsdp + 15), peek::<u32>(rsdp + 16)) };
    let mut root = u64::from(rsdt);
    let mut entry_size = 4;
    reserved.add(rsdp, 20);
    if revision >= 2 {
        if !mapped(rsdp, 36) {
            acpi.fail(reason!("RSDP v2 at {:#x} crosses 4 GiB", rsdp));
            return acpi;
        }
        // SAFETY: the 36-byte v2 RSDP is mapped (checked above).
        let (len, xsdt) = unsafe { (peek::<u32>(rsdp + 20), peek::<u64>(rsdp + 24)) };
        if !(36..=4096).contains(&len) || !mapped(rsdp, u64::from(len)) || !checksum_ok(bytes(rsdp, len)) {
            acpi.fail(reason!("bad RSDP extended checksum"));
        }
        reserved.add(rsdp, u64::from(len));
        if xsdt != 0 {
            root = xsdt;
            entry_size = 8;
        }
    }
    let (root_sig, root_len) = match table(root) {
        Ok(t) => t,
        Err(r) => {
            acpi.fail(r);
            return acpi;
        }
    };
    let want: &[u8; 4] = if entry_size == 8 { b"XSDT" } else { b"RSDT" };
    if &root_sig != want {
        acpi.fail(reason!("root table at {:#x} is {}, want {}", root, Printable(&root_sig), Printable(want)));
        return acpi;
    }
    reserved.add(root, u64::from(root_len));

    let mut fadt = None;
    let mut ssdts = [0u64; 8];
    let mut nssdt = 0;
    let entries = (root_len - 36) / entry_size;
    for i in 0..entries {
        let at = root + 36 + u64::from(i * entry_size);
        // SAFETY: the entry lies within the checked root table.
        let addr = unsafe {
            if entry_size == 8 {
                peek::<u64>(at)
            } else {
                u64::from(peek::<u32>(at))
            }
        };
        match table(addr) {
            Ok((sig, len)) => {
                reserved.add(addr, u64::from(len));
                acpi.push_sig(sig);
                match &sig {
                    b"FACP" => fadt = Some((addr, len)),
                    b"APIC" => acpi.madt = Some(parse_madt(addr, len, &mut acpi)),
                    b"MCFG" => acpi.mcfg = Some((addr, len)),
                    b"SSDT" if nssdt < ssdts.len() => {
                        ssdts[nssdt] = addr;
                        nssdt += 1;
                    }
                    _ => {}
                }
            }
            Err(r) => acpi.fail(r),
        }
    }
    if acpi.madt.is_none() {
        acpi.fail(reason!("no MADT"));
    }
    match fadt {
        Some((addr, len)) => parse_fadt(addr, len, &ssdts[..nssdt], reserved, &mut acpi),
        None => acpi.fail(reason!("no FADT")),
    }
    acpi
}

fn parse_madt(addr: u64, len: u32, acpi: &mut Acpi) -> Madt {
    let mut madt =
        Madt { lapic_addr: 0xfee0_0000, ioapics: [0; MAX_IOAPICS], nioapics: 0, enabled: 0, ids: [0; MAX_CPUS] };
    let b = bytes(addr, len);
    if len < 44 {
        acpi.fail(reason!("MADT too short"));
        return madt;
    }
    madt.lapic_addr = u64::from(u32::from_le_bytes([b[36], b[37], b[38], b[39]]));
    let mut off = 44;
    while off + 2 <= b.len() {
        let (kind, elen) = (b[off], usize::from(b[off + 1]));
        if elen < 2 || off + elen > b.len() {
            acpi.fail(reason!("MADT entry at offset {} has bad length {}", off, elen));
            break;
        }
        let e = &b[off..off + elen];
        let le32 = |o: usize| u32::from_le_bytes([e[o], e[o + 1], e[o + 2], e[o + 3]]);
        let cpu = match kind {
            0 if elen >= 8 => Some((u32::from(e[3]), le32(4))),
            9 if elen >= 16 => Some((le32(4), le32(8))),
            1 if elen >= 12 => {
                if madt.nioapics < MAX_IOAPICS {
                    madt.ioapics[madt.nioapics] = u64::from(le32(4));
                    madt.nioapics += 1;
                }
                None
            }
            5 if elen >= 12 => {
                madt.lapic_addr = u64::from_le_bytes(e[4..12].try_into().unwrap_or([0; 8]));
                None
            }
            _ => None,
        };
        if let Some((id, flags)) = cpu {
            if flags & 1 != 0 {
                if (madt.enabled as usize) < MAX_CPUS {
                    madt.ids[madt.enabled as usize] = id;
                }
                madt.enabled += 1;
            }
        }
        off += elen;
    }
    madt
}

/// Reads a Generic Address Structure at `at`: (space, address).
fn gas(at: u64) -> (u8, u64) {
    // SAFETY: callers pass a GAS inside a checked (mapped) FADT.
    unsafe { (peek::<u8>(at), peek::<u64>(at + 4)) }
}

fn space(id: u8) -> Option<Space> {
    match id {
        0 => Some(Space::Memory),
        1 => Some(Space::Io),
        _ => None,
    }
}

fn parse_fadt(addr: u64, len: u32, ssdts: &[u64], reserved: &mut Reserved, acpi: &mut Acpi) {
    if len < 116 {
        acpi.fail(reason!("FADT too short ({} bytes)", len));
        return;
    }
    // SAFETY: offsets below are inside the checked FADT (len >= 116, more where tested).
    let (dsdt32, pm1a32, flags) = unsafe { (peek::<u32>(addr + 40), peek::<u32>(addr + 64), peek::<u32>(addr + 112)) };
    // SAFETY: as above, len >= 148.
    let xdsdt = if len >= 148 { unsafe { peek::<u64>(addr + 140) } } else { 0 };
    let dsdt = if xdsdt != 0 { xdsdt } else { u64::from(dsdt32) };
    let mut slp_typ = None;
    match table(dsdt) {
        Ok((sig, dlen)) if &sig == b"DSDT" => {
            reserved.add(dsdt, u64::from(dlen));
            acpi.push_sig(sig);
            acpi.dsdt = Some((dsdt, dlen));
            slp_typ = find_s5(&bytes(dsdt, dlen)[36..]);
        }
        Ok((sig, _)) => acpi.fail(reason!("FADT's DSDT pointer leads to {}", Printable(&sig))),
        Err(r) => acpi.fail(r),
    }
    for &s in ssdts {
        if slp_typ.is_some() {
            break;
        }
        if let Ok((_, slen)) = table(s) {
            slp_typ = find_s5(&bytes(s, slen)[36..]);
        }
    }
    let Some(slp_typ) = slp_typ else {
        acpi.fail(reason!("no usable \\_S5_ package in the DSDT/SSDTs"));
        return;
    };
    if flags & FADT_RESET_REG_SUP != 0 && len >= 129 {
        let (reg_space, reg_addr) = gas(addr + 116);
        // SAFETY: inside the FADT (len >= 129).
        let value = unsafe { peek::<u8>(addr + 128) };
        acpi.reset = space(reg_space).map(|s| (s, reg_addr, value));
    }
    let sleep_ctl = if flags & FADT_HW_REDUCED_ACPI != 0 && len >= 256 { gas(addr + 244) } else { (0, 0) };
    let xpm1a = if len >= 184 { gas(addr + 172) } else { (0, 0) };
    let method = if sleep_ctl.1 != 0 {
        space(sleep_ctl.0).map(|space| PowerOff::SleepCtl { space, addr: sleep_ctl.1, slp_typ })
    } else if xpm1a.1 != 0 {
        space(xpm1a.0).map(|space| PowerOff::Pm1a { space, addr: xpm1a.1, slp_typ })
    } else if pm1a32 != 0 {
        Some(PowerOff::Pm1a { space: Space::Io, addr: u64::from(pm1a32), slp_typ })
    } else {
        acpi.fail(reason!("FADT has neither a sleep control register nor PM1a_CNT"));
        return;
    };
    match method {
        Some(m) => acpi.poweroff = Some(m),
        None => acpi.fail(reason!("power-off register in an unsupported address space")),
    }
}

/// Finds `_S5_` followed by a package in AML and returns its first element
/// (SLP_TYPa). Minimal on purpose: `_S5_ PackageOp PkgLength NumElements
/// (BytePrefix n | ZeroOp | OneOp | WordPrefix n)`.
pub fn find_s5(aml: &[u8]) -> Option<u8> {
    let mut i = 0;
    while i + 4 <= aml.len() {
        if &aml[i..i + 4] == b"_S5_" && aml.get(i + 4) == Some(&0x12) {
            let p = i + 5;
            let lead = *aml.get(p)?;
            let pkglen_bytes = 1 + usize::from(lead >> 6);
            let first = p + pkglen_bytes + 1; // skip PkgLength and NumElements
            let v = match *aml.get(first)? {
                0x00 => Some(0),
                0x01 => Some(1),
                0x0a | 0x0b => aml.get(first + 1).copied(),
                _ => None,
            };
            if let Some(v) = v {
                return Some(v & 0x7);
            }
        }
        i += 1;
    }
    None
}

/// The `acpi` check line.
pub fn check(acpi: &Acpi) -> bool {
    if let Some(r) = &acpi.error {
        emit!("PROBE acpi fail {}", r);
        return false;
    }
    let (Some(madt), Some(poweroff)) = (&acpi.madt, &acpi.poweroff) else {
        emit!("PROBE acpi fail incomplete tables");
        return false;
    };
    emit!(
        "PROBE acpi ok rsdp={:#x} tables={} cpus={} poweroff={}",
        acpi.rsdp,
        Sigs(&acpi.sigs[..acpi.nsigs]),
        madt.enabled,
        poweroff
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_s5_byte_prefix_package() {
        // Name (_S5, Package (0x04) { 0x05, 0x05, Zero, Zero }) as iasl emits it.
        let aml = [0x10, 0x08, 0x5f, 0x53, 0x35, 0x5f, 0x12, 0x0a, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00];
        assert_eq!(find_s5(&aml), Some(5));
    }

    #[test]
    fn finds_s5_zero_one_and_rooted_name() {
        assert_eq!(find_s5(&[0x08, 0x5c, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x02, 0x00, 0x00]), Some(0));
        assert_eq!(find_s5(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x01, 0x01]), Some(1));
    }

    #[test]
    fn handles_multi_byte_pkg_length() {
        let aml = [b'_', b'S', b'5', b'_', 0x12, 0x41, 0x00, 0x02, 0x0a, 0x07];
        assert_eq!(find_s5(&aml), Some(7));
    }

    #[test]
    fn rejects_s5_without_package_or_truncated() {
        assert_eq!(find_s5(b"_S5_"), None);
        assert_eq!(find_s5(&[b'_', b'S', b'5', b'_', 0x0a, 0x05]), None);
        assert_eq!(find_s5(&[b'_', b'S', b'5', b'_', 0x12, 0x06, 0x02, 0x0a]), None);
    }

    #[test]
    fn displays_power_off_methods() {
        let p = PowerOff::Pm1a { space: Space::Io, addr: 0x604, slp_typ: 5 };
        assert_eq!(format!("{p}"), "pm1a:0x604");
        let s = PowerOff::SleepCtl { space: Space::Memory, addr: 0xfea0_0200, slp_typ: 5 };
        assert_eq!(format!("{s}"), "sleepctl:0xfea00200");
    }
}
