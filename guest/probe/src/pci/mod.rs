//! PCI: find configuration space (MCFG, the DSDT's `_CBA`, or 0xCF8), list
//! every function, size every BAR, walk the capability lists, place BARs the
//! VMM left unassigned, and check the layout (the `pci` check).
//!
//! Enumeration starts at the first bus of the ECAM region and follows bridges'
//! secondary buses, so a one-bus VM costs 32 vendor-id reads, not 8192.

pub mod assign;
pub mod config;
pub mod layout;

use core::fmt;

use crate::acpi::Acpi;
use crate::bootinfo::E820Entry;
use crate::paging;
use crate::pcihost::{self, Ecam, EcamSource, HostBridge, Window};
use crate::ranges::Reserved;
use crate::util::Reason;
use crate::{emit, reason};

pub use config::{Bdf, Config};

pub const MAX_FUNCTIONS: usize = 32;
pub const MAX_CAPS: usize = 16;
/// The most capabilities a 256-byte space can hold (4-byte minimum, from 0x40).
const CAP_WALK_LIMIT: usize = 48;

pub const CMD_IO: u16 = 1 << 0;
pub const CMD_MEM: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
pub const CAP_VENDOR: u8 = 0x09;
pub const CAP_MSIX: u8 = 0x11;
const STATUS_CAP_LIST: u16 = 1 << 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

/// One base address register, sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// BAR slot (0..5; a 64-bit BAR uses this slot and the next).
    pub index: u8,
    pub kind: BarKind,
    pub prefetch: bool,
    pub addr: u64,
    pub size: u64,
}

impl Bar {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }

    pub fn is_mem(&self) -> bool {
        self.kind != BarKind::Io
    }
}

impl fmt::Display for Bar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            BarKind::Io => "io",
            BarKind::Mem32 => "m32",
            BarKind::Mem64 => "m64",
        };
        let p = if self.prefetch { "p" } else { "" };
        write!(f, "{}:{}{}:{:#x}+{:#x}", self.index, kind, p, self.addr, self.size)
    }
}

/// A capability: id and offset in configuration space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cap {
    pub id: u8,
    pub off: u8,
}

#[derive(Clone, Copy, Debug)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// Class code, subclass and programming interface (24 bits).
    pub class: u32,
    /// Header type without the multi-function bit (0 device, 1 bridge).
    pub header: u8,
    pub subsystem: u16,
    pub bars: [Option<Bar>; 6],
    caps: [Cap; MAX_CAPS],
    ncaps: usize,
    /// The first malformation found in this function's header or capabilities.
    pub problem: Option<Reason>,
}

impl Function {
    fn new(bdf: Bdf) -> Self {
        Function {
            bdf,
            vendor: 0,
            device: 0,
            class: 0,
            header: 0,
            subsystem: 0,
            bars: [None; 6],
            caps: [Cap::default(); MAX_CAPS],
            ncaps: 0,
            problem: None,
        }
    }

    pub fn caps(&self) -> &[Cap] {
        &self.caps[..self.ncaps]
    }

    pub fn bar(&self, index: u8) -> Option<Bar> {
        self.bars.iter().flatten().find(|b| b.index == index).copied()
    }

    fn flag(&mut self, r: Reason) {
        if self.problem.is_none() {
            self.problem = Some(r);
        }
    }
}

/// Displays a function's BARs as `0:m32:0x..+0x..,4:m64p:...` (or `none`).
struct Bars<'a>(&'a [Option<Bar>; 6]);

impl fmt::Display for Bars<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for b in self.0.iter().flatten() {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{b}")?;
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// Displays capability ids as `0x11,0x09` (or `none`).
struct Caps<'a>(&'a [Cap]);

impl fmt::Display for Caps<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{:#04x}", c.id)?;
        }
        Ok(())
    }
}

/// Everything enumeration found.
pub struct Pci {
    pub config: Config,
    functions: [Function; MAX_FUNCTIONS],
    nfunctions: usize,
    /// More functions than [`MAX_FUNCTIONS`] answered.
    pub truncated: bool,
    /// The host bridge as the DSDT describes it.
    pub bridge: Option<HostBridge>,
    /// BARs the probe placed because the VMM left them at 0.
    pub assigned: u32,
    /// 64-bit BARs the probe moved above 4 GiB (`probe.pci_high=1`).
    pub moved: u32,
    /// Whether 0xCF8 answers too (then it is compared with ECAM).
    pub cf8: bool,
    /// A problem found while setting up (assignment, mapping).
    pub problem: Option<Reason>,
}

impl Pci {
    pub fn functions(&self) -> &[Function] {
        &self.functions[..self.nfunctions]
    }

    pub fn windows(&self) -> &[Window] {
        self.bridge.as_ref().map_or(&[], |b| b.windows())
    }
}

/// Where configuration space is: MCFG first, then the DSDT's `_CBA` (QEMU
/// microvm has no MCFG), then 0xCF8.
fn find_config(acpi: &Acpi, bridge: Option<&HostBridge>) -> Result<(Option<Ecam>, bool), Reason> {
    let mut ecam = None;
    if let Some((addr, len)) = acpi.mcfg {
        ecam = pcihost::parse_mcfg(crate::acpi::bytes(addr, len))?;
    }
    if ecam.is_none() {
        if let Some(base) = bridge.and_then(|b| b.cba) {
            let (start, end) = bridge.and_then(|b| b.buses()).unwrap_or((0, 0));
            ecam = Some(Ecam { base, bus_start: start, bus_end: end, source: EcamSource::Cba });
        }
    }
    Ok((ecam, Config::cf8_present()))
}

/// Sizes BAR slot `i` (and `i + 1` for a 64-bit BAR) with decoding off.
/// Returns the BAR (None if unimplemented) and how many slots it used.
fn size_bar(cfg: &Config, f: &mut Function, i: u8, slots: u8) -> (Option<Bar>, u8) {
    let off = 0x10 + u16::from(i) * 4;
    let orig = cfg.read32(f.bdf, off);
    cfg.write32(f.bdf, off, u32::MAX);
    let mask = cfg.read32(f.bdf, off);
    cfg.write32(f.bdf, off, orig);
    if mask == 0 {
        return (None, 1);
    }
    if orig & 1 != 0 {
        let bits = mask & 0xffff_fffc;
        let size = u64::from(bits & bits.wrapping_neg());
        if size == 0 || (bits | (size as u32 - 1) | 3) & 0xffff != 0xffff {
            f.flag(reason!("BAR {} I/O sizing mask {:#x} is malformed", i, mask));
        }
        let bar = Bar { index: i, kind: BarKind::Io, prefetch: false, addr: u64::from(orig & 0xffff_fffc), size };
        return (Some(bar), 1);
    }
    let prefetch = orig & 8 != 0;
    match (orig >> 1) & 3 {
        0 => {
            let bits = mask & 0xffff_fff0;
            let size = u64::from(bits & bits.wrapping_neg());
            if size == 0 || bits | (size as u32 - 1) != u32::MAX {
                f.flag(reason!("BAR {} sizing mask {:#x} is malformed", i, mask));
            }
            let bar = Bar { index: i, kind: BarKind::Mem32, prefetch, addr: u64::from(orig & 0xffff_fff0), size };
            (Some(bar), 1)
        }
        2 if i + 1 < slots => {
            let hi_off = off + 4;
            let orig_hi = cfg.read32(f.bdf, hi_off);
            cfg.write32(f.bdf, hi_off, u32::MAX);
            let mask_hi = cfg.read32(f.bdf, hi_off);
            cfg.write32(f.bdf, hi_off, orig_hi);
            let bits = (u64::from(mask_hi) << 32) | u64::from(mask & 0xffff_fff0);
            let size = bits & bits.wrapping_neg();
            if size == 0 || bits | (size - 1) != u64::MAX {
                f.flag(reason!("64-bit BAR {} sizing mask {:#x} is malformed", i, bits));
            }
            let addr = (u64::from(orig_hi) << 32) | u64::from(orig & 0xffff_fff0);
            (Some(Bar { index: i, kind: BarKind::Mem64, prefetch, addr, size }), 2)
        }
        2 => {
            f.flag(reason!("64-bit BAR {} has no upper half (last slot)", i));
            (None, 1)
        }
        t => {
            f.flag(reason!("BAR {} has reserved memory type {}", i, t));
            (None, 1)
        }
    }
}

/// Walks the capability list, recording ids and flagging malformations.
fn walk_caps(cfg: &Config, f: &mut Function) {
    if cfg.read16(f.bdf, 6) & STATUS_CAP_LIST == 0 {
        return;
    }
    let mut ptr = cfg.read8(f.bdf, 0x34);
    let mut seen = 0u64;
    for _ in 0..CAP_WALK_LIMIT {
        if ptr == 0 {
            return;
        }
        if ptr < 0x40 || ptr & 3 != 0 {
            f.flag(reason!("capability pointer {:#x} is invalid", ptr));
            return;
        }
        let slot = u32::from(ptr) / 4;
        if seen & (1u64 << slot) != 0 {
            f.flag(reason!("capability list loops back to {:#x}", ptr));
            return;
        }
        seen |= 1u64 << slot;
        let id = cfg.read8(f.bdf, u16::from(ptr));
        if f.ncaps < MAX_CAPS {
            f.caps[f.ncaps] = Cap { id, off: ptr };
            f.ncaps += 1;
        }
        if id == CAP_VENDOR {
            let len = cfg.read8(f.bdf, u16::from(ptr) + 2);
            if len < 3 || u16::from(ptr) + u16::from(len) > 256 {
                f.flag(reason!("vendor capability at {:#x} has length {}", ptr, len));
            }
        }
        ptr = cfg.read8(f.bdf, u16::from(ptr) + 1);
    }
    f.flag(reason!("capability list longer than {} entries", CAP_WALK_LIMIT));
}

/// Reads one function's header, BARs and capabilities.
fn read_function(cfg: &Config, bdf: Bdf) -> Function {
    let mut f = Function::new(bdf);
    f.vendor = cfg.read16(bdf, 0);
    f.device = cfg.read16(bdf, 2);
    f.class = cfg.read32(bdf, 8) >> 8;
    f.header = cfg.read8(bdf, 0x0e) & 0x7f;
    let slots = match f.header {
        0 => 6,
        1 => 2,
        _ => 0,
    };
    if f.header == 0 {
        f.subsystem = cfg.read16(bdf, 0x2e);
    }
    // Decoding off while the BARs hold the sizing pattern.
    let cmd = cfg.read16(bdf, 4);
    cfg.write16(bdf, 4, cmd & !(CMD_IO | CMD_MEM));
    let mut i = 0;
    let mut n = 0;
    while i < slots {
        let (bar, used) = size_bar(cfg, &mut f, i, slots);
        if let Some(b) = bar {
            f.bars[n] = Some(b);
            n += 1;
        }
        i += used;
    }
    cfg.write16(bdf, 4, cmd);
    walk_caps(cfg, &mut f);
    f
}

fn push(pci: &mut Pci, f: Function) {
    if pci.nfunctions == MAX_FUNCTIONS {
        pci.truncated = true;
    } else {
        pci.functions[pci.nfunctions] = f;
        pci.nfunctions += 1;
    }
}

fn scan_bus(pci: &mut Pci, bus: u8, depth: u32) {
    let cfg = pci.config;
    for dev in 0..32 {
        let bdf0 = Bdf { bus, dev, func: 0 };
        if cfg.read16(bdf0, 0) == u16::MAX {
            continue;
        }
        let nfunc = if cfg.read8(bdf0, 0x0e) & 0x80 != 0 { 8 } else { 1 };
        for func in 0..nfunc {
            let bdf = Bdf { bus, dev, func };
            if cfg.read16(bdf, 0) == u16::MAX {
                continue;
            }
            let f = read_function(&cfg, bdf);
            let bridge = f.header == 1;
            push(pci, f);
            if bridge && depth < 8 {
                let secondary = cfg.read8(bdf, 0x19);
                if secondary > bus && cfg.covers(secondary) {
                    scan_bus(pci, secondary, depth + 1);
                }
            }
        }
    }
}

/// Finds configuration space and enumerates every function; places
/// unassigned memory BARs in the host bridge's windows; maps BARs above the
/// identity map (first moving 64-bit BARs above 4 GiB if `high`). Prints one
/// `PROBE info pci` line per function.
pub fn discover(
    acpi: &Acpi,
    e820: &[E820Entry],
    reserved: &mut Reserved,
    mapped_top: u64,
    high: bool,
) -> Result<Pci, Reason> {
    let bridge = acpi.dsdt.and_then(|(addr, len)| {
        let aml = crate::acpi::bytes(addr, len);
        pcihost::parse_host_bridge(aml.get(36..)?)
    });
    let (ecam, cf8) = find_config(acpi, bridge.as_ref())?;
    let config = match ecam {
        Some(e) => {
            let (start, end) = e.range();
            if end > mapped_top {
                paging::map_range(start.max(mapped_top), end, e820, reserved)?;
            }
            Config::Ecam(e)
        }
        None if cf8 => Config::Cf8,
        None => return Err(reason!("no ECAM (no MCFG, no _CBA in the DSDT) and no host bridge at 0xCF8")),
    };
    let start_bus = match config {
        Config::Ecam(e) => e.bus_start,
        Config::Cf8 => 0,
    };
    let mut pci = Pci {
        config,
        functions: [Function::new(Bdf::default()); MAX_FUNCTIONS],
        nfunctions: 0,
        truncated: false,
        bridge,
        assigned: 0,
        moved: 0,
        cf8,
        problem: None,
    };
    scan_bus(&mut pci, start_bus, 0);
    match assign::assign_unassigned(&mut pci, e820, acpi) {
        Ok(n) => pci.assigned = n,
        Err(r) => pci.problem = Some(r),
    }
    if high && pci.problem.is_none() {
        match assign::move_high(&mut pci, e820, acpi) {
            Ok(n) => pci.moved = n,
            Err(r) => pci.problem = Some(r),
        }
    }
    let mut map_error = None;
    for f in pci.functions() {
        for b in f.bars.iter().flatten().filter(|b| b.is_mem() && b.addr != 0) {
            if !paging::is_mapped(b.addr) || !paging::is_mapped(b.end() - 1) {
                if let Err(r) = paging::map_range(b.addr, b.end(), e820, reserved) {
                    map_error.get_or_insert(r);
                }
            }
        }
    }
    if let Some(r) = map_error {
        pci.problem.get_or_insert(r);
    }
    for f in pci.functions() {
        emit!(
            "PROBE info pci {} vendor={:#06x} device={:#06x} class={:#08x} bars={} caps={}",
            f.bdf,
            f.vendor,
            f.device,
            f.class,
            Bars(&f.bars),
            Caps(f.caps())
        );
    }
    Ok(pci)
}

/// Compares what ECAM and 0xCF8 say about each function's first dwords.
fn compare_cf8(pci: &Pci) -> Result<&'static str, Reason> {
    if !pci.cf8 {
        return Ok("absent");
    }
    if matches!(pci.config, Config::Cf8) {
        return Ok("only");
    }
    for f in pci.functions() {
        for off in [0u16, 8, 0x2c] {
            let (a, b) = (pci.config.read32(f.bdf, off), Config::Cf8.read32(f.bdf, off));
            if a != b {
                return Err(reason!("{} offset {:#x}: ECAM reads {:#x}, 0xCF8 reads {:#x}", f.bdf, off, a, b));
            }
        }
    }
    Ok("same")
}

/// The `pci` check.
pub fn check(pci: Result<&Pci, &Reason>, e820: &[E820Entry], acpi: &Acpi) -> bool {
    let pci = match pci {
        Ok(p) => p,
        Err(r) => {
            emit!("PROBE pci fail {}", r);
            return false;
        }
    };
    let result = (|| {
        if let Some(r) = pci.problem {
            return Err(r);
        }
        if pci.truncated {
            return Err(reason!("more than {} functions", MAX_FUNCTIONS));
        }
        if let Some(f) = pci.functions().iter().find(|f| f.problem.is_some()) {
            return Err(reason!("{}: {}", f.bdf, f.problem.unwrap_or_default()));
        }
        if let Config::Ecam(e) = pci.config {
            let (start, end) = e.range();
            let ram = e820.iter().find(|r| [1, 3, 4].contains(&r.kind) && r.addr < end && start < r.end());
            if let Some(r) = ram {
                return Err(reason!("ECAM {:#x}-{:#x} overlaps e820 type {} at {:#x}", start, end, r.kind, r.addr));
            }
        }
        layout::check(pci.functions(), &layout::Context::new(pci, e820, acpi), &pci.config)?;
        compare_cf8(pci)
    })();
    match result {
        Ok(cf8) => {
            let bars: usize = pci.functions().iter().map(|f| f.bars.iter().flatten().count()).sum();
            let (buses, ecam) = match pci.config {
                Config::Ecam(e) => ((e.bus_start, e.bus_end), e.base),
                Config::Cf8 => ((0, 255), 0),
            };
            emit!(
                "PROBE pci ok config={} ecam={:#x} buses={}-{} functions={} bars={} windows={} assigned={} moved={} cf8={}",
                pci.config.name(),
                ecam,
                buses.0,
                buses.1,
                pci.functions().len(),
                bars,
                pci.windows().len(),
                pci.assigned,
                pci.moved,
                cf8
            );
            true
        }
        Err(r) => {
            emit!("PROBE pci fail {}", r);
            false
        }
    }
}
