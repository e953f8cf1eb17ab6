//! PCI configuration space access: ECAM (memory-mapped, 4 KiB per function)
//! or the legacy 0xCF8/0xCFC port pair (256 bytes per function).

use core::fmt;

use crate::io::{inb, inl, inw, mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32, outl, outw};
use crate::pcihost::Ecam;

const CF8: u16 = 0xcf8;
const CFC: u16 = 0xcfc;

/// Bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.dev, self.func)
    }
}

/// How configuration space is reached.
#[derive(Clone, Copy, Debug)]
pub enum Config {
    /// Memory-mapped; the region lies in the probe's identity map (see [`Config::ecam`]).
    Ecam(Ecam),
    /// Configuration mechanism #1 through ports 0xCF8/0xCFC.
    Cf8,
}

impl Config {
    /// ECAM access; `mapped_top` is the end of the identity map. `None` if the
    /// region is not entirely mapped.
    pub fn ecam(e: Ecam, mapped_top: u64) -> Option<Config> {
        let (_, end) = e.range();
        (end <= mapped_top).then_some(Config::Ecam(e))
    }

    /// Whether a host bridge answers on 0xCF8 (the address register reads back).
    pub fn cf8_present() -> bool {
        // SAFETY: 0xCF8 is the PCI configuration address register; we restore it.
        unsafe {
            let saved = inl(CF8);
            outl(CF8, 0x8000_0000);
            let v = inl(CF8);
            outl(CF8, saved);
            v == 0x8000_0000
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Config::Ecam(e) => e.source.name(),
            Config::Cf8 => "cf8",
        }
    }

    /// Whether `bus` is reachable through this mechanism.
    pub fn covers(&self, bus: u8) -> bool {
        match self {
            Config::Ecam(e) => (e.bus_start..=e.bus_end).contains(&bus),
            Config::Cf8 => true,
        }
    }

    /// Size of each function's configuration space.
    pub fn space(&self) -> u16 {
        match self {
            Config::Ecam(_) => 4096,
            Config::Cf8 => 256,
        }
    }

    fn ecam_addr(e: &Ecam, bdf: Bdf, off: u16) -> u64 {
        e.base
            + ((u64::from(bdf.bus) << 20)
                | (u64::from(bdf.dev & 0x1f) << 15)
                | (u64::from(bdf.func & 7) << 12)
                | u64::from(off & 0xfff))
    }

    fn cf8_addr(bdf: Bdf, off: u16) -> u32 {
        0x8000_0000
            | (u32::from(bdf.bus) << 16)
            | (u32::from(bdf.dev & 0x1f) << 11)
            | (u32::from(bdf.func & 7) << 8)
            | u32::from(off & 0xfc)
    }

    fn valid(&self, bdf: Bdf, off: u16, width: u16) -> bool {
        self.covers(bdf.bus) && off.is_multiple_of(width) && off + width <= self.space()
    }

    pub fn read32(&self, bdf: Bdf, off: u16) -> u32 {
        if !self.valid(bdf, off, 4) {
            return u32::MAX;
        }
        match self {
            // SAFETY: the ECAM region is identity mapped (`Config::ecam`), the
            // offset is aligned and inside the function's 4 KiB.
            Config::Ecam(e) => unsafe { mmio_read32(Self::ecam_addr(e, bdf, off)) },
            // SAFETY: configuration mechanism #1: address, then data.
            Config::Cf8 => unsafe {
                outl(CF8, Self::cf8_addr(bdf, off));
                inl(CFC)
            },
        }
    }

    pub fn read16(&self, bdf: Bdf, off: u16) -> u16 {
        if !self.valid(bdf, off, 2) {
            return u16::MAX;
        }
        match self {
            // SAFETY: as in `read32`.
            Config::Ecam(e) => unsafe { mmio_read16(Self::ecam_addr(e, bdf, off)) },
            // SAFETY: as in `read32`; the data port is offset by the byte lane.
            Config::Cf8 => unsafe {
                outl(CF8, Self::cf8_addr(bdf, off));
                inw(CFC + (off & 2))
            },
        }
    }

    pub fn read8(&self, bdf: Bdf, off: u16) -> u8 {
        if !self.valid(bdf, off, 1) {
            return u8::MAX;
        }
        match self {
            // SAFETY: as in `read32`.
            Config::Ecam(e) => unsafe { mmio_read8(Self::ecam_addr(e, bdf, off)) },
            // SAFETY: as in `read16`.
            Config::Cf8 => unsafe {
                outl(CF8, Self::cf8_addr(bdf, off));
                inb(CFC + (off & 3))
            },
        }
    }

    pub fn write32(&self, bdf: Bdf, off: u16, value: u32) {
        if !self.valid(bdf, off, 4) {
            return;
        }
        match self {
            // SAFETY: as in `read32`; callers write only registers they mean to.
            Config::Ecam(e) => unsafe { mmio_write32(Self::ecam_addr(e, bdf, off), value) },
            // SAFETY: as in `read32`.
            Config::Cf8 => unsafe {
                outl(CF8, Self::cf8_addr(bdf, off));
                outl(CFC, value)
            },
        }
    }

    pub fn write16(&self, bdf: Bdf, off: u16, value: u16) {
        if !self.valid(bdf, off, 2) {
            return;
        }
        match self {
            // SAFETY: as in `write32`.
            Config::Ecam(e) => unsafe { mmio_write16(Self::ecam_addr(e, bdf, off), value) },
            // SAFETY: as in `read16`.
            Config::Cf8 => unsafe {
                outl(CF8, Self::cf8_addr(bdf, off));
                outw(CFC + (off & 2), value)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pcihost::EcamSource;

    #[test]
    fn addresses_follow_the_ecam_and_cf8_layouts() {
        let e = Ecam { base: 0xe000_0000, bus_start: 0, bus_end: 255, source: EcamSource::Mcfg };
        let bdf = Bdf { bus: 2, dev: 3, func: 4 };
        assert_eq!(Config::ecam_addr(&e, bdf, 0x10), 0xe000_0000 + (2 << 20) + (3 << 15) + (4 << 12) + 0x10);
        assert_eq!(Config::cf8_addr(bdf, 0x13), 0x8002_1c10);
        assert_eq!(format!("{bdf}"), "02:03.4");
    }

    #[test]
    fn refuses_unaligned_out_of_range_and_uncovered_accesses() {
        let e = Ecam { base: 0xe000_0000, bus_start: 0, bus_end: 0, source: EcamSource::Mcfg };
        let c = Config::Ecam(e);
        let bdf = Bdf::default();
        assert!(!c.valid(bdf, 2, 4));
        assert!(!c.valid(bdf, 4094, 4));
        assert!(!c.valid(Bdf { bus: 1, ..bdf }, 0, 4));
        assert!(!Config::Cf8.valid(bdf, 0x100, 1));
        assert!(c.valid(bdf, 0xffc, 4));
        assert_eq!(c.read32(Bdf { bus: 1, ..bdf }, 0), u32::MAX);
        assert!(Config::ecam(e, 0xe000_0000).is_none());
        assert!(Config::ecam(e, 0xe010_0000).is_some());
    }
}
