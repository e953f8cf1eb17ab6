//! The guest-physical address map kiln gives every x86_64 guest.
//!
//! ```text
//! 0x0000_0500  GDT (boot)                  0x0000_9000  PML4, then PDPT, then 4 PDs (boot)
//! 0x0000_6000  PVH start info + memmap     0x0002_0000  kernel command line (64 KiB)
//! 0x0000_7000  Linux zero page             0x0009_fc00  reserved: EBDA .. 1 MiB
//! 0x0000_8ff0  boot stack top              0x000e_0000  ACPI tables (RSDP first)
//! 0x0010_0000  RAM continues (kernel)      0xc000_0000  32-bit MMIO hole up to 4 GiB
//! 0x1_0000_0000  RAM above 4 GiB
//! ```
//!
//! The 32-bit MMIO hole:
//!
//! ```text
//! 0xc000_0000  PCI 32-bit MMIO window (512 MiB): BARs
//! 0xe000_0000  PCI ECAM, bus 0 only (1 MiB; reserved in e820)
//! 0xf000_0000  virtio-mmio devices, 4 KiB each (16 MiB)
//! 0xfec0_0000  IOAPIC          0xfee0_0000  LAPIC          0xfffb_d000  KVM TSS (3 pages)
//! ```
//!
//! Above RAM (and above 4 GiB), aligned to 1 GiB: the PCI 64-bit MMIO window, up to 1 TiB
//! and below the host's physical-address limit ([`pci_mmio64_window`]).

/// Boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH memory map entries (24 bytes each) right after the start info.
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// Linux boot protocol "zero page" (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Boot page tables: PML4, PDPT, then 4 page directories mapping 4 GiB with 2 MiB pages.
pub const PML4_ADDR: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line kiln passes, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the reserved area below 1 MiB (EBDA, VGA hole, BIOS area holding ACPI).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area so that a legacy scan finds the RSDP too.
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0x100000;
/// Where RAM resumes, and where kernels load.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO hole: RAM below 4 GiB stops here.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole: RAM continues here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// IOAPIC registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Intel VMX needs three pages for its real-mode TSS; they sit at the top of the hole.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// PCI 32-bit MMIO window: where BARs go first.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (ECAM) of bus 0: 4 KiB per function.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// ECAM size: one bus (32 devices x 8 functions x 4 KiB).
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// The only PCI bus kiln emulates.
pub const PCI_BUS_LAST: u8 = 0;
/// virtio-mmio devices: one [`VIRTIO_MMIO_SIZE`] slot each, from here.
pub const VIRTIO_MMIO_START: u64 = 0xf000_0000;
/// Space for virtio-mmio devices.
pub const VIRTIO_MMIO_AREA: u64 = 0x100_0000;
/// The register block of one virtio-mmio device.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC pins (GSIs) virtio-mmio devices may use, in order: ISA lines nothing else uses,
/// then the pins above PCI's INTx lines.
pub const VIRTIO_MMIO_GSIS: [u32; 11] = [5, 6, 7, 10, 11, 14, 15, 20, 21, 22, 23];
/// IOAPIC pins of the PCI INTx lines (see [`pci_intx_gsi`]).
pub const PCI_INTX_GSIS: [u32; 4] = [16, 17, 18, 19];
/// GSIs KVM routes to the IOAPIC (and, below 16, the PICs) by default.
pub const IOAPIC_PINS: u32 = 24;
/// Alignment and granule of the 64-bit window.
const PCI_MMIO64_ALIGN: u64 = 1 << 30;
/// Largest 64-bit window.
const PCI_MMIO64_MAX: u64 = 1 << 40;

/// ACPI fixed-hardware I/O ports (our PM block).
pub mod acpi_ports {
    /// PM1a event block: status (2 bytes) then enable (2 bytes).
    pub const PM1A_EVT: u16 = 0x600;
    /// Length of the PM1a event block.
    pub const PM1A_EVT_LEN: u8 = 4;
    /// PM1a control block.
    pub const PM1A_CNT: u16 = 0x604;
    /// Length of the PM1a control block.
    pub const PM1A_CNT_LEN: u8 = 2;
    /// ACPI reset register (one byte).
    pub const RESET: u16 = 0x608;
    /// Value the guest writes to the reset register.
    pub const RESET_VALUE: u8 = 1;
    /// Whole block, for the I/O bus.
    pub const BLOCK_START: u16 = 0x600;
    /// Size of the whole block.
    pub const BLOCK_LEN: u16 = 0x10;
    /// SLP_TYP value the DSDT's `\_S5` package gives for soft-off.
    pub const SLP_TYP_S5: u8 = 5;
    /// SCI interrupt line.
    pub const SCI_IRQ: u8 = 9;
}

/// Legacy I/O ports.
pub mod ports {
    /// First serial port.
    pub const COM1: u16 = 0x3f8;
    /// IRQ of COM1.
    pub const COM1_IRQ: u32 = 4;
    /// i8042 data port.
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 command/status port.
    pub const I8042_CMD: u16 = 0x64;
    /// CMOS index/data ports.
    pub const CMOS: u16 = 0x70;
}

/// The guest RAM ranges for `mem_size` bytes of memory: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// The GSI that INTx `pin` (0 = INTA# .. 3 = INTD#) of the device in `slot` of bus 0 raises:
/// the usual swizzle over four lines, as the DSDT's `_PRT` says.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSIS[(usize::from(slot) + usize::from(pin)) % PCI_INTX_GSIS.len()]
}

/// The PCI 64-bit MMIO window `(start, size)` for `mem_size` bytes of RAM on a host with
/// `phys_bits` physical-address bits: from the first 1 GiB boundary above RAM (and above
/// 4 GiB), at most 1 TiB, ending below `2^phys_bits`. `None` when not even 1 GiB fits.
pub fn pci_mmio64_window(mem_size: u64, phys_bits: u32) -> Option<(u64, u64)> {
    let ram_end = ram_ranges(mem_size)
        .last()
        .map_or(0, |(s, l)| s.saturating_add(*l));
    let start = ram_end
        .max(MMIO_HOLE_END)
        .checked_next_multiple_of(PCI_MMIO64_ALIGN)?;
    let limit = if phys_bits >= 64 {
        u64::MAX
    } else {
        1u64 << phys_bits
    };
    let size = limit.checked_sub(start)?.min(PCI_MMIO64_MAX);
    let size = size - size % PCI_MMIO64_ALIGN;
    (size > 0).then_some((start, size))
}

// The boot structures must not overlap one another.
const _: () = {
    assert!(BOOT_STACK_TOP < PML4_ADDR);
    assert!(PVH_MEMMAP_ADDR + 128 * 24 + 32 <= ZERO_PAGE_ADDR);
    assert!(PML4_ADDR + 6 * 0x1000 <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    // The hole's tenants, in order, without overlap.
    assert!(MMIO_HOLE_START <= PCI_MMIO32_START);
    assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= VIRTIO_MMIO_START);
    assert!(VIRTIO_MMIO_START + VIRTIO_MMIO_AREA <= IOAPIC_ADDR);
    assert!(IOAPIC_ADDR < LAPIC_ADDR && LAPIC_ADDR < KVM_TSS_ADDR);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_ranges(8 << 30);
        assert_eq!(
            r,
            vec![
                (0, MMIO_HOLE_START),
                (MMIO_HOLE_END, (8 << 30) - MMIO_HOLE_START)
            ]
        );
        assert_eq!(r.iter().map(|(_, s)| s).sum::<u64>(), 8 << 30);
    }

    #[test]
    fn mmio64_window_starts_above_ram_and_ends_below_the_host_limit() {
        assert_eq!(pci_mmio64_window(256 << 20, 48), Some((4 << 30, 1 << 40)));
        // 8 GiB of RAM ends at 9 GiB; the window starts there.
        assert_eq!(pci_mmio64_window(8 << 30, 48), Some((9 << 30, 1 << 40)));
        // A small physical address space caps the window.
        assert_eq!(
            pci_mmio64_window(8 << 30, 36),
            Some((9 << 30, (64 - 9) << 30))
        );
        // RAM right up to the limit leaves no room.
        assert_eq!(pci_mmio64_window((64 << 30) - (1 << 30), 36), None);
        // Unaligned RAM ends round up.
        let (start, _) = pci_mmio64_window((5 << 30) + 4096, 48).unwrap();
        assert_eq!(start, 7 << 30);
    }
}
