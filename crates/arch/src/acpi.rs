//! ACPI tables: RSDP, XSDT, FADT (+FACS), DSDT and MADT, written into the BIOS area so that
//! both the boot-protocol pointer and a legacy scan find them.
//!
//! The PCI host bridge is `\_SB_.PCI0` (PNP0A08, compatible PNP0A03) with its bus range,
//! the 0xCF8 configuration ports and the MMIO windows in `_CRS`; its ECAM area is in MCFG
//! and, as a motherboard resource, in `\_SB_.MRES` (PNP0C02). `_PRT` routes INTA#..INTD#
//! of every slot to IOAPIC pins 16-19 ([`layout::pci_intx_gsi`]), for drivers that do not
//! use MSI-X.
//!
//! Power management is "full" ACPI (not hardware-reduced): PM1a event/control blocks at
//! [`acpi_ports`], `\_S5` = SLP_TYP 5, and a one-byte reset register. Processors are listed
//! in the MADT: a Local APIC entry for APIC ids below 255, a Local x2APIC entry above.

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{self, acpi_ports, ports, ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR};

const OEM_ID: [u8; 6] = *b"KILNVM";
const OEM_TABLE_ID: [u8; 8] = *b"KILNVMM ";
const OEM_REVISION: u32 = 1;

/// Errors building ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables outgrew the BIOS area.
    #[error("ACPI tables need {needed} bytes, only {available} fit below 1 MiB")]
    TooLarge {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Guest memory write failed.
    #[error("cannot write ACPI table {table} into guest memory")]
    Write {
        /// Table signature.
        table: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct AcpiConfig {
    /// Number of vCPUs; vCPU `i` has APIC id `i`.
    pub cpus: u32,
    /// The PCI host bridge, when there is one.
    pub pci: Option<PciHostConfig>,
}

/// Where the PCI host bridge decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHostConfig {
    /// ECAM base (the address of bus 0).
    pub ecam_base: u64,
    /// Last bus number (buses `0..=bus_last`).
    pub bus_last: u8,
    /// 32-bit MMIO window `(start, size)`.
    pub mmio32: (u64, u64),
    /// 64-bit MMIO window `(start, size)`, if any.
    pub mmio64: Option<(u64, u64)>,
}

impl PciHostConfig {
    /// Bytes of ECAM for the bus range.
    pub fn ecam_size(&self) -> u64 {
        (u64::from(self.bus_last) + 1) << 20
    }
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// Places tables one after another, 64-byte aligned (FACS needs it).
struct Placer<'a, M> {
    mem: &'a M,
    next: u64,
}

impl<M: GuestMemoryBackend> Placer<'_, M> {
    fn place(&mut self, table: &'static str, bytes: &[u8]) -> Result<u64, AcpiError> {
        let addr = self.next.next_multiple_of(64);
        let end = addr + bytes.len() as u64;
        if end > ACPI_END {
            return Err(AcpiError::TooLarge {
                needed: end - ACPI_START,
                available: ACPI_END - ACPI_START,
            });
        }
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::Write { table, source })?;
        self.next = end;
        Ok(addr)
    }
}

/// `\_SB_.PCI0` and the motherboard resource that reserves its ECAM area.
fn pci_host(pci: &PciHostConfig, out: &mut Vec<u8>) {
    let last = |start: u64, size: u64| start + size.saturating_sub(1);
    let bus = aml::AddressSpace::new_bus_number(0u16, u16::from(pci.bus_last));
    let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let (m32, m32_size) = pci.mmio32;
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        u32::try_from(m32).unwrap_or(u32::MAX),
        u32::try_from(last(m32, m32_size)).unwrap_or(u32::MAX),
        None,
    );
    let mmio64 = pci.mmio64.map(|(start, size)| {
        aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            start,
            last(start, size),
            None,
        )
    });
    let mut resources: Vec<&dyn Aml> = vec![&bus, &cfg_io, &mmio32];
    if let Some(m) = &mmio64 {
        resources.push(m);
    }
    let crs = aml::ResourceTemplate::new(resources);
    let prt = pci_routing_table();
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let parts = [
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_CID".into(), &cid),
        aml::Name::new("_ADR".into(), &aml::ZERO),
        aml::Name::new("_SEG".into(), &aml::ZERO),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_BBN".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &crs),
        aml::Name::new("_PRT".into(), &prt),
    ];
    let pci0 = aml::Device::new(
        "_SB_.PCI0".into(),
        parts.iter().map(|n| n as &dyn Aml).collect(),
    );
    out.extend_from_slice(&bytes_of(&pci0));

    let ecam = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        false,
        pci.ecam_base,
        last(pci.ecam_base, pci.ecam_size()),
        None,
    );
    let mres_crs = aml::ResourceTemplate::new(vec![&ecam]);
    let mres_hid = aml::EISAName::new("PNP0C02");
    let mres_parts = [
        aml::Name::new("_HID".into(), &mres_hid),
        aml::Name::new("_UID".into(), &aml::ONE),
        aml::Name::new("_CRS".into(), &mres_crs),
    ];
    let mres = aml::Device::new(
        "_SB_.MRES".into(),
        mres_parts.iter().map(|n| n as &dyn Aml).collect(),
    );
    out.extend_from_slice(&bytes_of(&mres));
}

/// `_PRT`: for slots 1-31 and pins INTA#..INTD#, the GSI each raises.
fn pci_routing_table() -> aml::PackageBuilder {
    let mut prt = aml::PackageBuilder::new();
    for slot in 1..32u8 {
        for pin in 0..4u8 {
            let address = u32::from(slot) << 16 | 0xffff;
            let gsi = layout::pci_intx_gsi(slot, pin);
            let entry = aml::Package::new(vec![&address, &pin, &aml::ZERO, &gsi]);
            prt.add_element(&entry);
        }
    }
    prt
}

fn mcfg(pci: &PciHostConfig) -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(pci.ecam_base, 0, 0, pci.bus_last);
    bytes_of(&m)
}

fn dsdt(pci: Option<&PciHostConfig>) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5_pkg = aml::Package::new(vec![&acpi_ports::SLP_TYP_S5, &0u8, &0u8, &0u8]);
    let s5 = aml::Name::new("_S5_".into(), &s5_pkg);

    let com1_io = aml::IO::new(ports::COM1, ports::COM1, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, ports::COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_parts = [
        aml::Name::new("_HID".into(), &com1_hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &com1_crs),
    ];
    let com1 = aml::Device::new(
        "_SB_.COM1".into(),
        com1_parts.iter().map(|n| n as &dyn Aml).collect(),
    );

    let rtc_io = aml::IO::new(ports::CMOS, ports::CMOS, 1, 2);
    let rtc_crs = aml::ResourceTemplate::new(vec![&rtc_io]);
    let rtc_hid = aml::EISAName::new("PNP0B00");
    let rtc_parts = [
        aml::Name::new("_HID".into(), &rtc_hid),
        aml::Name::new("_CRS".into(), &rtc_crs),
    ];
    let rtc = aml::Device::new(
        "_SB_.RTC_".into(),
        rtc_parts.iter().map(|n| n as &dyn Aml).collect(),
    );

    let kbd_data = aml::IO::new(ports::I8042_DATA, ports::I8042_DATA, 1, 1);
    let kbd_cmd = aml::IO::new(ports::I8042_CMD, ports::I8042_CMD, 1, 1);
    let kbd_crs = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd]);
    let kbd_hid = aml::EISAName::new("PNP0303");
    let kbd_parts = [
        aml::Name::new("_HID".into(), &kbd_hid),
        aml::Name::new("_CRS".into(), &kbd_crs),
    ];
    let kbd = aml::Device::new(
        "_SB_.PS2K".into(),
        kbd_parts.iter().map(|n| n as &dyn Aml).collect(),
    );

    let sb = aml::Scope::new("_SB_".into(), vec![]);
    for part in [&s5 as &dyn Aml, &sb, &com1, &rtc, &kbd] {
        dsdt.append_slice(&bytes_of(part));
    }
    if let Some(pci) = pci {
        let mut host = Vec::new();
        pci_host(pci, &mut host);
        dsdt.append_slice(&host);
    }
    dsdt.as_slice().to_vec()
}

fn madt(cpus: u32) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    const ENABLED: u32 = 1;
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, u32::try_from(LAPIC_ADDR).unwrap_or_default());
    madt.write_u32(40, PCAT_COMPAT);
    let mut entries = Vec::new();
    for id in 0..cpus {
        match u8::try_from(id) {
            Ok(id8) if id8 < 0xff => {
                // Processor Local APIC: type 0, length 8, UID, APIC id, flags.
                entries.extend_from_slice(&[0, 8, id8, id8]);
                entries.extend_from_slice(&ENABLED.to_le_bytes());
            }
            _ => {
                // Processor Local x2APIC: type 9, length 16, reserved, x2APIC id, flags, UID.
                entries.extend_from_slice(&[9, 16, 0, 0]);
                entries.extend_from_slice(&id.to_le_bytes());
                entries.extend_from_slice(&ENABLED.to_le_bytes());
                entries.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
    entries.extend_from_slice(&[1, 12, 0, 0]);
    entries.extend_from_slice(&u32::try_from(IOAPIC_ADDR).unwrap_or_default().to_le_bytes());
    entries.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source override for the SCI: ISA IRQ 9 -> GSI 9, level, active high.
    entries.extend_from_slice(&[2, 10, 0, acpi_ports::SCI_IRQ]);
    entries.extend_from_slice(&u32::from(acpi_ports::SCI_IRQ).to_le_bytes());
    entries.extend_from_slice(&0x000du16.to_le_bytes());
    // Local APIC NMI on LINT1 for all processors.
    entries.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}

fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_64(facs)
        .flag(Flags::Wbinvd)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    f.sci_int = u16::from(acpi_ports::SCI_IRQ).into();
    f.pm1a_evt_blk = u32::from(acpi_ports::PM1A_EVT).into();
    f.pm1a_cnt_blk = u32::from(acpi_ports::PM1A_CNT).into();
    f.pm1_evt_len = acpi_ports::PM1A_EVT_LEN;
    f.pm1_cnt_len = acpi_ports::PM1A_CNT_LEN;
    f.x_pm1a_evt_blk = GAS::new(
        AddressSpace::SystemIo,
        32,
        0,
        AccessSize::WordAccess,
        acpi_ports::PM1A_EVT.into(),
    );
    f.x_pm1a_cnt_blk = GAS::new(
        AddressSpace::SystemIo,
        16,
        0,
        AccessSize::WordAccess,
        acpi_ports::PM1A_CNT.into(),
    );
    f.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        acpi_ports::RESET.into(),
    );
    f.reset_value = acpi_ports::RESET_VALUE;
    // IA-PC boot architecture: legacy devices present, 8042 present.
    f.iapc_boot_arch = 0x3u16.into();
    f.century = 0x32;
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"KILNKILN").into();
    bytes_of(&f.finalize())
}

/// Writes all tables for `cfg` and returns the RSDP address.
pub fn write_tables<M: GuestMemoryBackend>(mem: &M, cfg: &AcpiConfig) -> Result<u64, AcpiError> {
    let mut p = Placer {
        mem,
        next: ACPI_START + 64,
    };
    let facs = p.place("FACS", &bytes_of(&FACS::new()))?;
    let dsdt = p.place("DSDT", &dsdt(cfg.pci.as_ref()))?;
    let fadt = p.place("FACP", &fadt(dsdt, facs))?;
    let madt = p.place("APIC", &madt(cfg.cpus))?;
    let mcfg = match &cfg.pci {
        Some(pci) => Some(p.place("MCFG", &mcfg(pci))?),
        None => None,
    };
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    if let Some(mcfg) = mcfg {
        xsdt.add_entry(mcfg);
    }
    let xsdt = p.place("XSDT", &bytes_of(&xsdt))?;
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt));
    mem.write_slice(&rsdp, GuestAddress(ACPI_START))
        .map_err(|source| AcpiError::Write {
            table: "RSDP",
            source,
        })?;
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn read_table(m: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = m.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut v = vec![0u8; len as usize];
        m.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    const PCI: PciHostConfig = PciHostConfig {
        ecam_base: 0xe000_0000,
        bus_last: 0,
        mmio32: (0xc000_0000, 0x2000_0000),
        mmio64: Some((0x1_0000_0000, 1 << 40)),
    };

    fn tables(cpus: u32) -> (GuestMemoryMmap, Vec<Vec<u8>>) {
        tables_with(AcpiConfig {
            cpus,
            pci: Some(PCI),
        })
    }

    fn tables_with(cfg: AcpiConfig) -> (GuestMemoryMmap, Vec<Vec<u8>>) {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp_addr = write_tables(&m, &cfg).unwrap();
        let mut rsdp = [0u8; 36];
        m.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt = read_table(&m, u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
        assert!(checksum_ok(&xsdt));
        let mut all = vec![];
        for c in xsdt[36..].chunks(8) {
            let t = read_table(&m, u64::from_le_bytes(c.try_into().unwrap()));
            assert!(
                checksum_ok(&t),
                "checksum of {:?}",
                std::str::from_utf8(&t[..4])
            );
            all.push(t);
        }
        (m, all)
    }

    #[test]
    fn every_table_checksums_and_fadt_points_at_dsdt() {
        let (m, t) = tables(2);
        let fadt = t.iter().find(|t| &t[..4] == b"FACP").unwrap();
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read_table(&m, x_dsdt);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert_eq!(u32::from_le_bytes(fadt[64..68].try_into().unwrap()), 0x604);
    }

    #[test]
    fn mcfg_gives_the_ecam_base_and_bus_range() {
        let (_, t) = tables(1);
        let mcfg = t.iter().find(|t| &t[..4] == b"MCFG").expect("MCFG");
        assert_eq!(mcfg.len(), 44 + 16);
        let entry = &mcfg[44..];
        assert_eq!(
            u64::from_le_bytes(entry[..8].try_into().unwrap()),
            0xe000_0000
        );
        assert_eq!(u16::from_le_bytes(entry[8..10].try_into().unwrap()), 0);
        assert_eq!((entry[10], entry[11]), (0, 0));
    }

    #[test]
    fn dsdt_has_the_pci_root_with_its_windows() {
        let (m, t) = tables(1);
        let fadt = t.iter().find(|t| &t[..4] == b"FACP").unwrap();
        let dsdt = read_table(&m, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0") && has(b"MRES"));
        // EISA ids PNP0A08 and PNP0A03, compressed.
        assert!(has(&[0x41, 0xd0, 0x0a, 0x08]) && has(&[0x41, 0xd0, 0x0a, 0x03]));
        // The 0xCF8 ports: IO descriptor, decode16, min, max, align 1, length 8.
        assert!(has(&[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]));
        // The 32-bit window's minimum and maximum, and the 64-bit window's minimum.
        assert!(has(&[0x00, 0x00, 0x00, 0xc0, 0xff, 0xff, 0xff, 0xdf]));
        assert!(has(&0x1_0000_0000u64.to_le_bytes()));
        // _PRT: slot 3 INTB# -> GSI 16 (swizzle (3 + 1) % 4): Package(4) { 0x0003FFFF, One,
        // Zero, 16 }.
        assert!(has(b"_PRT"));
        assert!(has(&[
            0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x03, 0x00, 0x01, 0x00, 0x0a, 0x10
        ]));
    }

    #[test]
    fn no_pci_means_no_mcfg_and_no_root() {
        let (_, t) = tables_with(AcpiConfig { cpus: 1, pci: None });
        assert!(t.iter().all(|t| &t[..4] != b"MCFG"));
    }

    #[test]
    fn madt_lists_every_cpu_with_x2apic_above_254() {
        let (_, t) = tables(288);
        let madt = t.iter().find(|t| &t[..4] == b"APIC").unwrap();
        let (mut lapic, mut x2apic, mut ids) = (0, 0, vec![]);
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                0 => {
                    lapic += 1;
                    ids.push(u32::from(madt[off + 3]));
                }
                9 => {
                    x2apic += 1;
                    ids.push(u32::from_le_bytes(
                        madt[off + 4..off + 8].try_into().unwrap(),
                    ));
                }
                _ => {}
            }
            off += len;
        }
        assert_eq!((lapic, x2apic), (255, 33));
        assert_eq!(ids, (0..288).collect::<Vec<_>>());
    }
}
