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
