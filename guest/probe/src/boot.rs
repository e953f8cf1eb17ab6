//! The `boot` check: the e820 map and the command line the VMM gave.

use crate::bootinfo::{BootInfo, E820_RAM};
use crate::util::Reason;
use crate::{emit, reason};

fn verify(bi: &BootInfo, image: (u64, u64)) -> Result<(), Reason> {
    if let Some(e) = bi.error {
        return Err(reason!("{}", e));
    }
    let e820 = bi.e820();
    if e820.is_empty() {
        return Err(reason!("empty e820 map"));
    }
    if bi.e820_truncated {
        return Err(reason!("more than {} e820 entries", e820.len()));
    }
    for (i, w) in e820.windows(2).enumerate() {
        if w[1].addr < w[0].addr {
            return Err(reason!("e820 not sorted at entry {}", i + 1));
        }
        if w[1].addr < w[0].end() {
            return Err(reason!("e820 entries {} and {} overlap", i, i + 1));
        }
    }
    if let Some((i, _)) = e820.iter().enumerate().find(|(_, e)| e.size == 0) {
        return Err(reason!("e820 entry {} is empty", i));
    }
    let (start, end) = image;
    if !e820.iter().any(|e| e.kind == E820_RAM && e.addr <= start && end <= e.end()) {
        return Err(reason!("probe image {:#x}-{:#x} is not inside one e820 RAM entry", start, end));
    }
    if bi.cmdline.is_none() {
        return Err(reason!("no command line"));
    }
    Ok(())
}

pub fn check(bi: &BootInfo, image: (u64, u64)) -> bool {
    match verify(bi, image) {
        Ok(()) => {
            emit!("PROBE boot ok e820={} ram={}", bi.e820().len(), bi.ram_bytes());
            true
        }
        Err(r) => {
            emit!("PROBE boot fail {}", r);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootinfo::E820Entry;

    const IMAGE: (u64, u64) = (0x10_0000, 0x14_0000);

    fn e(addr: u64, size: u64, kind: u32) -> E820Entry {
        E820Entry { addr, size, kind }
    }

    #[test]
    fn accepts_a_sorted_map_holding_the_image() {
        let bi = BootInfo::for_test(&[e(0, 0x9fc00, 1), e(0x9fc00, 0x400, 2), e(0x10_0000, 0xff0_0000, 1)], Some(b""));
        assert!(verify(&bi, IMAGE).is_ok());
        assert_eq!(bi.ram_bytes(), 0x9fc00 + 0xff0_0000);
    }

    #[test]
    fn rejects_unsorted_overlapping_empty_or_missing() {
        let unsorted = BootInfo::for_test(&[e(0x10_0000, 0x100_0000, 1), e(0, 0x9fc00, 1)], Some(b""));
        assert!(verify(&unsorted, IMAGE).unwrap_err().as_str().contains("not sorted"));
        let overlap = BootInfo::for_test(&[e(0, 0x20_0000, 1), e(0x10_0000, 0x100_0000, 1)], Some(b""));
        assert!(verify(&overlap, IMAGE).unwrap_err().as_str().contains("overlap"));
        let empty_entry = BootInfo::for_test(&[e(0x10_0000, 0x100_0000, 1), e(0x200_0000, 0, 0)], Some(b""));
        assert!(verify(&empty_entry, IMAGE).unwrap_err().as_str().contains("empty"));
        let no_map = BootInfo::for_test(&[], Some(b""));
        assert!(verify(&no_map, IMAGE).is_err());
        let no_cmdline = BootInfo::for_test(&[e(0x10_0000, 0x100_0000, 1)], None);
        assert!(verify(&no_cmdline, IMAGE).unwrap_err().as_str().contains("command line"));
    }

    #[test]
    fn rejects_an_image_outside_ram() {
        let bi = BootInfo::for_test(&[e(0, 0x9fc00, 1), e(0x10_0000, 0x1_0000, 1)], Some(b""));
        assert!(verify(&bi, IMAGE).unwrap_err().as_str().contains("image"));
    }
}
