//! The layout rules the `pci` check applies to the BARs and capabilities that
//! enumeration found. Pure functions over the enumeration result.

use super::{Bar, BarKind, Config, Function, Pci, CAP_MSIX, CAP_VENDOR};
use crate::acpi::Acpi;
use crate::bootinfo::E820Entry;
use crate::pcihost::{Window, WindowKind};
use crate::reason;
use crate::util::Reason;

const FOUR_GIB: u64 = 1 << 32;
const MAX_AVOID: usize = 12;
/// e820 types a BAR must not overlap: RAM, ACPI reclaimable, ACPI NVS.
const E820_NOT_MMIO: [u32; 3] = [1, 3, 4];

/// Where BARs may and may not go.
pub struct Context<'a> {
    pub e820: &'a [E820Entry],
    /// The host bridge's windows (empty when unknown: then not checked).
    pub windows: &'a [Window],
    /// Other MMIO the BARs must not overlap: (start, end, name).
    avoid: [(u64, u64, &'static str); MAX_AVOID],
    navoid: usize,
}

impl<'a> Context<'a> {
    pub fn new(pci: &'a Pci, e820: &'a [E820Entry], acpi: &Acpi) -> Self {
        let mut c = Context::bare(e820, pci.windows());
        if let Config::Ecam(e) = pci.config {
            let (s, end) = e.range();
            c.avoid(s, end, "ECAM");
        }
        if let Some(m) = &acpi.madt {
            c.avoid(m.lapic_addr, m.lapic_addr + 0x1000, "LAPIC");
            for &a in m.ioapics() {
                c.avoid(a, a + 0x1000, "IOAPIC");
            }
        }
        c
    }

    pub fn bare(e820: &'a [E820Entry], windows: &'a [Window]) -> Self {
        Context { e820, windows, avoid: [(0, 0, ""); MAX_AVOID], navoid: 0 }
    }

    pub fn avoid(&mut self, start: u64, end: u64, name: &'static str) {
        if self.navoid < MAX_AVOID {
            self.avoid[self.navoid] = (start, end, name);
            self.navoid += 1;
        }
    }

    pub fn avoided(&self) -> &[(u64, u64, &'static str)] {
        &self.avoid[..self.navoid]
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Checks one BAR on its own.
fn check_bar(f: &Function, b: &Bar, decode_io: bool, ctx: &Context) -> Result<(), Reason> {
    let name = || reason!("{} BAR {}", f.bdf, b);
    if b.size == 0 || !b.size.is_power_of_two() {
        return Err(reason!("{}: size is not a power of two", name()));
    }
    if b.kind == BarKind::Io {
        if b.addr == 0 {
            // An I/O BAR nobody placed is fine as long as I/O decoding is off.
            return if decode_io { Err(reason!("{}: unassigned but I/O decoding is on", name())) } else { Ok(()) };
        }
        if b.end() > 0x1_0000 {
            return Err(reason!("{}: beyond the 64 KiB port space", name()));
        }
    } else if b.addr == 0 {
        return Err(reason!("{}: unassigned", name()));
    }
    if !b.addr.is_multiple_of(b.size) {
        return Err(reason!("{}: not naturally aligned", name()));
    }
    if b.kind == BarKind::Mem32 && b.end() > FOUR_GIB {
        return Err(reason!("{}: 32-bit BAR ends above 4 GiB", name()));
    }
    let range = (b.addr, b.end());
    if b.is_mem() {
        if let Some(e) = ctx.e820.iter().find(|e| E820_NOT_MMIO.contains(&e.kind) && overlaps(range, (e.addr, e.end())))
        {
            return Err(reason!("{}: overlaps e820 type {} at {:#x}", name(), e.kind, e.addr));
        }
        if let Some(a) = ctx.avoided().iter().find(|a| overlaps(range, (a.0, a.1))) {
            return Err(reason!("{}: overlaps the {} at {:#x}", name(), a.2, a.0));
        }
    }
    let kind = if b.is_mem() { WindowKind::Mem } else { WindowKind::Io };
    let mut windows = ctx.windows.iter().filter(|w| w.kind == kind).peekable();
    if windows.peek().is_some() && !windows.any(|w| w.start <= b.addr && b.end() <= w.end) {
        return Err(reason!("{}: outside the host bridge's windows", name()));
    }
    Ok(())
}

/// MSI-X table and PBA, and virtio structures, must lie inside a memory BAR.
fn check_cap_ranges(f: &Function, cap_regs: &dyn Fn(u8) -> [u32; 4]) -> Result<(), Reason> {
    for c in f.caps() {
        let r = cap_regs(c.off);
        let inside = |bir: u32, off: u64, len: u64, what: &str| -> Result<(), Reason> {
            let bar = u8::try_from(bir).ok().and_then(|i| f.bar(i)).filter(|b| b.is_mem());
            match bar {
                Some(b) if off.checked_add(len).is_some_and(|end| end <= b.size) => Ok(()),
                Some(b) => {
                    Err(reason!("{}: {} {:#x}+{:#x} exceeds BAR {} ({:#x})", f.bdf, what, off, len, bir, b.size))
                }
                None => Err(reason!("{}: {} in BAR {}, which is not a memory BAR", f.bdf, what, bir)),
            }
        };
        if c.id == CAP_MSIX {
            let entries = u64::from((r[0] >> 16) & 0x7ff) + 1;
            if r[0] & (1 << 31) != 0 {
                return Err(reason!("{}: MSI-X is enabled at boot", f.bdf));
            }
            inside(r[1] & 7, u64::from(r[1] & !7), entries * 16, "MSI-X table")?;
            inside(r[2] & 7, u64::from(r[2] & !7), entries.div_ceil(64) * 8, "MSI-X PBA")?;
        }
        // virtio 1.x structure capabilities (common, notify, ISR, device).
        if c.id == CAP_VENDOR && f.vendor == 0x1af4 {
            let cfg_type = (r[0] >> 24) & 0xff;
            if (1..=4).contains(&cfg_type) {
                inside(r[1] & 0xff, u64::from(r[2]), u64::from(r[3]), "virtio structure")?;
            }
        }
    }
    Ok(())
}

/// The whole layout: every BAR on its own, no two overlapping, capability
/// structures inside their BARs. `regs(f, off)` reads four dwords of `f`'s
/// configuration space at `off` (injected so the rules are testable).
pub fn check_with(
    functions: &[Function],
    ctx: &Context,
    regs: &dyn Fn(&Function, u8) -> [u32; 4],
) -> Result<(), Reason> {
    for f in functions {
        let decode_io = regs(f, 4)[0] & 1 != 0;
        for b in f.bars.iter().flatten() {
            check_bar(f, b, decode_io, ctx)?;
        }
        check_cap_ranges(f, &|off| regs(f, off))?;
    }
    let all = functions.iter().flat_map(|f| f.bars.iter().flatten().map(move |b| (f, b)));
    for (i, (fa, a)) in all.clone().enumerate() {
        for (fb, b) in all.clone().skip(i + 1) {
            if a.is_mem() == b.is_mem() && a.addr != 0 && b.addr != 0 && overlaps((a.addr, a.end()), (b.addr, b.end()))
            {
                return Err(reason!("{} BAR {} overlaps {} BAR {}", fa.bdf, a, fb.bdf, b));
            }
        }
    }
    Ok(())
}

/// [`check_with`] on live configuration space.
pub fn check(functions: &[Function], ctx: &Context, cfg: &Config) -> Result<(), Reason> {
    check_with(functions, ctx, &|f, off| {
        let off = u16::from(off);
        [0u16, 4, 8, 12].map(|k| cfg.read32(f.bdf, off + k))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{Bdf, Cap};

    fn func(dev: u8, bars: &[Bar]) -> Function {
        let mut f = Function::new(Bdf { bus: 0, dev, func: 0 });
        for (i, b) in bars.iter().enumerate() {
            f.bars[i] = Some(*b);
        }
        f
    }

    fn m32(index: u8, addr: u64, size: u64) -> Bar {
        Bar { index, kind: BarKind::Mem32, prefetch: false, addr, size }
    }

    fn m64(index: u8, addr: u64, size: u64) -> Bar {
        Bar { index, kind: BarKind::Mem64, prefetch: true, addr, size }
    }

    const RAM: [E820Entry; 2] =
        [E820Entry { addr: 0, size: 0x9fc00, kind: 1 }, E820Entry { addr: 0x10_0000, size: 0x3ff0_0000, kind: 1 }];

    fn no_regs(_: &Function, _: u8) -> [u32; 4] {
        [0; 4]
    }

    fn err(fs: &[Function], ctx: &Context) -> String {
        check_with(fs, ctx, &no_regs).unwrap_err().as_str().to_string()
    }

    #[test]
    fn accepts_a_sane_layout() {
        let fs = [
            func(1, &[m32(1, 0xc000_1000, 0x1000), m64(4, 0xc000_4000, 0x4000)]),
            func(2, &[m64(0, 1 << 36, 1 << 20)]),
        ];
        let windows = [
            Window { kind: WindowKind::Mem, start: 0xc000_0000, end: 0xe000_0000 },
            Window { kind: WindowKind::Mem, start: 1 << 36, end: 1 << 37 },
        ];
        assert!(check_with(&fs, &Context::bare(&RAM, &windows), &no_regs).is_ok());
    }

    #[test]
    fn rejects_misaligned_unassigned_ram_and_32bit_above_4g() {
        let ctx = Context::bare(&RAM, &[]);
        assert!(err(&[func(1, &[m32(0, 0xc000_0800, 0x1000)])], &ctx).contains("aligned"));
        assert!(err(&[func(1, &[m32(0, 0, 0x1000)])], &ctx).contains("unassigned"));
        assert!(err(&[func(1, &[m32(0, 0x3000_0000, 0x1000)])], &ctx).contains("e820"));
        assert!(err(&[func(1, &[m32(0, 1 << 32, 0x2000)])], &ctx).contains("4 GiB"));
    }

    #[test]
    fn rejects_overlaps_between_bars_and_with_avoided_ranges() {
        let fs = [func(1, &[m32(0, 0xc000_0000, 0x2000)]), func(2, &[m64(2, 0xc000_1000, 0x1000)])];
        assert!(err(&fs, &Context::bare(&RAM, &[])).contains("overlaps 00:02.0"));
        let mut ctx = Context::bare(&RAM, &[]);
        ctx.avoid(0xfee0_0000, 0xfee0_1000, "LAPIC");
        assert!(err(&[func(1, &[m32(0, 0xfee0_0000, 0x1000)])], &ctx).contains("LAPIC"));
    }

    #[test]
    fn rejects_bars_outside_the_windows() {
        let windows = [Window { kind: WindowKind::Mem, start: 0xc000_0000, end: 0xe000_0000 }];
        let ctx = Context::bare(&RAM, &windows);
        assert!(err(&[func(1, &[m32(0, 0xe000_0000, 0x1000)])], &ctx).contains("windows"));
    }

    #[test]
    fn io_bars_may_stay_unassigned_only_with_io_decoding_off() {
        let io = Bar { index: 0, kind: BarKind::Io, prefetch: false, addr: 0, size: 0x40 };
        let fs = [func(1, &[io])];
        let ctx = Context::bare(&RAM, &[]);
        assert!(check_with(&fs, &ctx, &no_regs).is_ok());
        assert!(check_with(&fs, &ctx, &|_, off| if off == 4 { [1, 0, 0, 0] } else { [0; 4] }).is_err());
    }

    #[test]
    fn msix_and_virtio_structures_must_fit_their_bar() {
        let mut f = func(1, &[m32(1, 0xc000_0000, 0x1000)]);
        f.caps[0] = Cap { id: CAP_MSIX, off: 0x40 };
        f.ncaps = 1;
        let ctx = Context::bare(&RAM, &[]);
        // 3 vectors, table at BAR 1 + 0, PBA at BAR 1 + 0x800: fits.
        let ok = |_: &Function, off: u8| if off == 0x40 { [0x0002_0011, 1, 0x801, 0] } else { [0; 4] };
        assert!(check_with(&[f], &ctx, &ok).is_ok());
        let table_in_bar0 = |_: &Function, off: u8| if off == 0x40 { [0x0002_0011, 0, 0x801, 0] } else { [0; 4] };
        assert!(check_with(&[f], &ctx, &table_in_bar0).is_err());
        let enabled = |_: &Function, off: u8| if off == 0x40 { [0x8002_0011, 1, 0x801, 0] } else { [0; 4] };
        assert!(check_with(&[f], &ctx, &enabled).is_err());
        f.vendor = 0x1af4;
        f.caps[0] = Cap { id: CAP_VENDOR, off: 0x50 };
        let too_long = |_: &Function, off: u8| if off == 0x50 { [0x0110_0009, 1, 0xf00, 0x200] } else { [0; 4] };
        assert!(check_with(&[f], &ctx, &too_long).unwrap_err().as_str().contains("virtio"));
    }
}
