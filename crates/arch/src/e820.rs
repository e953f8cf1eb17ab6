//! The e820 memory map kiln reports to the guest.

use crate::layout::{ram_ranges, EBDA_START, HIMEM_START, PCI_ECAM_SIZE, PCI_ECAM_START};

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved: not RAM the guest may use.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry: `size` bytes from `addr`, of type `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The map for a guest with `mem_size` bytes of RAM: low RAM up to the EBDA, the legacy
/// area reserved (it holds the ACPI tables), RAM from 1 MiB to the 32-bit MMIO hole, the
/// PCI ECAM area reserved (operating systems check that MCFG's range is), and whatever RAM
/// is left above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let ecam = E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    };
    for (start, size) in ram_ranges(mem_size) {
        let end = start + size;
        let start = start.max(HIMEM_START);
        if start >= PCI_ECAM_START + PCI_ECAM_SIZE && !map.contains(&ecam) {
            map.push(ecam);
        }
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    if !map.contains(&ecam) {
        map.push(ecam);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

    #[test]
    fn small_guest_map_reserves_legacy_area() {
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[1],
            E820Entry {
                addr: 0x9fc00,
                size: 0x60400,
                kind: E820_RESERVED
            }
        );
        assert_eq!(
            map[2],
            E820Entry {
                addr: 1 << 20,
                size: (256 << 20) - (1 << 20),
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn large_guest_map_leaves_the_mmio_hole_out() {
        let map = e820_map(8 << 30);
        assert_eq!(map.len(), 5);
        assert_eq!(map[2].addr + map[2].size, MMIO_HOLE_START);
        assert_eq!(map[4].addr, MMIO_HOLE_END);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (8 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn ecam_is_reserved_whatever_the_memory_size() {
        for mem in [16u64 << 20, 3 << 30, 8 << 30] {
            let map = e820_map(mem);
            let ecam = map
                .iter()
                .find(|e| e.addr == PCI_ECAM_START)
                .expect("ECAM entry");
            assert_eq!((ecam.size, ecam.kind), (PCI_ECAM_SIZE, E820_RESERVED));
        }
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        for mem in [16u64 << 20, 3 << 30, (3 << 30) + 4096, 4 << 40] {
            let map = e820_map(mem);
            for w in map.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{mem:#x}: {:?}", w);
            }
        }
    }
}
