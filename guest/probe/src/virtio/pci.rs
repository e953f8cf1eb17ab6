//! Locating a virtio-pci device's structures: the vendor capabilities
//! (common, notify, ISR, device configuration) in its memory BARs.

use crate::pci::{Bdf, Config, Function, CAP_VENDOR, CMD_BUS_MASTER, CMD_INTX_DISABLE, CMD_MEM};
use crate::reason;
use crate::util::Reason;

use super::transport::Regs;

const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// A structure capability: (BAR index, offset, length, extra dword).
fn read_cap(cfg: &Config, bdf: Bdf, off: u8) -> (u8, u32, u32, u32) {
    let off = u16::from(off);
    let bar = cfg.read8(bdf, off + 4);
    (bar, cfg.read32(bdf, off + 8), cfg.read32(bdf, off + 12), cfg.read32(bdf, off + 16))
}

/// Finds the structures of a virtio-pci function and turns on memory
/// decoding and bus mastering (INTx off). Touches no virtio register.
pub fn regs(cfg: &Config, f: &Function) -> Result<Regs, Reason> {
    let (mut common, mut notify, mut notify_len, mut notify_mul) = (0, 0, 0, 0);
    let (mut isr, mut device) = (None, None);
    for c in f.caps().iter().filter(|c| c.id == CAP_VENDOR) {
        let kind = cfg.read8(f.bdf, u16::from(c.off) + 3);
        if !(CFG_COMMON..=CFG_DEVICE).contains(&kind) {
            continue;
        }
        let (bar_idx, offset, len, extra) = read_cap(cfg, f.bdf, c.off);
        let bar = f.bar(bar_idx).filter(|b| b.is_mem() && b.addr != 0);
        let Some(bar) = bar else {
            return Err(reason!("{}: virtio structure {} in BAR {}, not an assigned memory BAR", f.bdf, kind, bar_idx));
        };
        if u64::from(offset) + u64::from(len) > bar.size {
            return Err(reason!("{}: virtio structure {} exceeds BAR {}", f.bdf, kind, bar_idx));
        }
        let addr = bar.addr + u64::from(offset);
        // The spec says to use the first capability of each type.
        match kind {
            CFG_COMMON if common == 0 => {
                if len < super::transport::COMMON_MIN_LEN {
                    return Err(reason!("{}: common configuration is only {} bytes", f.bdf, len));
                }
                common = addr;
            }
            CFG_NOTIFY if notify == 0 => (notify, notify_len, notify_mul) = (addr, len, extra),
            CFG_ISR if isr.is_none() => isr = Some(addr),
            CFG_DEVICE if device.is_none() => device = Some((addr, len)),
            _ => {}
        }
    }
    if common == 0 || notify == 0 {
        return Err(reason!("{}: no virtio common or notify capability (legacy-only device?)", f.bdf));
    }
    let cmd = cfg.read16(f.bdf, 4);
    cfg.write16(f.bdf, 4, cmd | CMD_MEM | CMD_BUS_MASTER | CMD_INTX_DISABLE);
    Ok(Regs::Pci { common, notify, notify_len, notify_mul, isr, device })
}
