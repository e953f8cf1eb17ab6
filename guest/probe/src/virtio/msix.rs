//! The `msix` check: a virtio-pci device's MSI-X message reaches this vCPU's
//! local APIC, without the probe taking the interrupt.
//!
//! The task priority is raised to 0xF0, so the APIC delivers no vector and
//! keeps every signalled one pending in its IRR, where ring 3 can see it (the
//! TPR stays raised until power-off: the IRR bits can only be cleared by
//! taking the interrupts). On the first virtio-rng PCI function: MSI-X
//! enabled in its capability, one table entry aimed at this APIC with
//! [`VECTOR`], assigned to queue 0 (read back: NO_VECTOR means refused), a
//! read posted with interrupts wanted; once the used ring moved, the vector
//! must show in the IRR. Then the entry is masked and retargeted to
//! [`MASKED_VECTOR`]: another read must leave the IRR clear (and sets the
//! entry's PBA bit, reported), and unmasking must deliver it. Last the
//! function mask: the entry unmasked with [`FMASK_VECTOR`] but the function
//! masked in message control, two reads must leave the IRR clear with the
//! PBA bit set after each (a second message must not undo the first), and
//! clearing the function mask must deliver the vector (once is enough: MSI-X
//! keeps one pending bit per vector) and clear the PBA bit. When the `smp`
//! check started an AP, the entry is last aimed at that AP's APIC with
//! [`OTHER_VECTOR`]: a read must put it in the AP's IRR (read by the AP
//! itself, see [`RemoteLapic`]) and not in this CPU's. With APIC ids above 255
//! the AP is one of those, addressed through the extended destination ID when
//! the hypervisor offers it. Last the configuration
//! vector: queue 0 gives up its entry, the entry is aimed back at this CPU
//! with [`CONFIG_VECTOR`] and assigned to configuration changes, and queue 0
//! is handed a chain whose head is past the descriptor table: the device must
//! set NEEDS_RESET, bump `config_generation`, and signal [`CONFIG_VECTOR`].
//!
//! With `probe.msix_enable=0` MSI-X stays disabled and the same unmasked
//! entry and request must leave the IRR clear.

use core::sync::atomic::Ordering;

use crate::clock::Clock;
use crate::dma::Dma;
use crate::io::{mmio_read32, mmio_write32};
use crate::lapic::{ext_dest_id_offered, msi_address, Lapic, RemoteLapic, TPR_BLOCK_ALL};
use crate::pci::{Bdf, Config, Function, Pci, CAP_MSIX};
use crate::ring0::{AP_NMI_STACKS, PROBE_AP_IDS, PROBE_AP_SLOT, PROBE_AP_STARTED};
use crate::util::Reason;
use crate::{emit, reason};

use super::transport::NO_VECTOR;
use super::{open, request, Dev, DevId, Devs, Seg, TYPE_RNG};

/// The vector the unmasked entry sends.
pub const VECTOR: u8 = 0x41;
/// The vector the masked entry is retargeted to.
pub const MASKED_VECTOR: u8 = 0x42;
/// The vector the entry sends while the whole function is masked.
pub const FMASK_VECTOR: u8 = 0x43;
/// The vector the entry sends to another CPU.
pub const OTHER_VECTOR: u8 = 0x44;
/// The vector configuration changes send.
pub const CONFIG_VECTOR: u8 = 0x45;
/// How long a signalled vector may take to show in the IRR.
const DELIVER_MS: u64 = 1000;
/// How long a vector that must not arrive is watched for.
const HOLD_MS: u64 = 200;
/// Bytes per read request.
const READ: u32 = 64;

pub(super) const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// A function's MSI-X capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCap {
    /// Offset of the capability in configuration space.
    pub off: u8,
    /// Table entries.
    pub size: u16,
    /// (BAR index, offset) of the table and of the pending-bit array.
    pub table: (u8, u32),
    pub pba: (u8, u32),
}

impl MsixCap {
    /// Decodes message control and the table and PBA dwords.
    pub fn decode(off: u8, control: u16, table: u32, pba: u32) -> MsixCap {
        MsixCap {
            off,
            size: (control & 0x7ff) + 1,
            table: ((table & 7) as u8, table & !7),
            pba: ((pba & 7) as u8, pba & !7),
        }
    }

    fn read(cfg: &Config, bdf: Bdf, off: u8) -> MsixCap {
        let o = u16::from(off);
        MsixCap::decode(off, cfg.read16(bdf, o + 2), cfg.read32(bdf, o + 4), cfg.read32(bdf, o + 8))
    }

    /// The address of a structure of `len` bytes at (`bar`, `offset`), if it
    /// lies inside an assigned memory BAR.
    fn locate(f: &Function, (bar, offset): (u8, u32), len: u64, what: &str) -> Result<u64, Reason> {
        let b = f.bar(bar).filter(|b| b.is_mem() && b.addr != 0);
        let b = b.ok_or_else(|| reason!("{}: MSI-X {} in BAR {}, not an assigned memory BAR", f.bdf, what, bar))?;
        if u64::from(offset) + len > b.size {
            return Err(reason!("{}: MSI-X {} at {:#x}+{:#x} exceeds BAR {}", f.bdf, what, offset, len, bar));
        }
        Ok(b.addr + u64::from(offset))
    }
}

/// The byte offset of the 32-bit PBA word that holds `entry`'s bit, and the bit.
pub fn pba_bit(entry: u16) -> (u64, u32) {
    (4 * u64::from(entry / 32), u32::from(entry % 32))
}

/// What the check saw.
struct Report {
    entry: u16,
    apic_id: u32,
    apic: &'static str,
    /// With MSI-X enabled: what [`Masks`] says.
    masks: Option<Masks>,
}

struct Masks {
    /// The entry's PBA bit while it was masked with a message pending.
    pba: bool,
    /// The same while the function was masked.
    fmask_pba: bool,
    /// The other CPU's APIC id, when an AP was there to target.
    other: Option<u32>,
}

/// An AP the `smp` check started that can answer [`RemoteLapic`] calls and
/// that an MSI can reach; one with an APIC id above 255 when there is one (it
/// takes the extended destination ID).
fn other_cpu(own_id: u32, ext_dest_id: bool) -> Option<u32> {
    let started = PROBE_AP_STARTED.load(Ordering::Acquire) as usize;
    let slots = (PROBE_AP_SLOT.load(Ordering::Acquire) as usize).min(started);
    let reachable = || {
        PROBE_AP_IDS
            .iter()
            .take(slots.min(AP_NMI_STACKS))
            .map(|id| id.load(Ordering::Acquire))
            .filter(move |&id| id != own_id && msi_address(id, ext_dest_id).is_some())
    };
    reachable().find(|&id| id > 0xff).or_else(|| reachable().next())
}

/// One MSI-X table entry of the function under test.
struct Entry {
    addr: u64,
}

impl Entry {
    fn write(&self, word: u64, v: u32) {
        // SAFETY: the entry lies in the function's assigned memory BAR (checked
        // by `MsixCap::locate`), identity mapped; the table takes dword writes.
        unsafe { mmio_write32(self.addr + 4 * word, v) }
    }

    fn read(&self, word: u64) -> u32 {
        // SAFETY: as in `write`; table reads have no side effects.
        unsafe { mmio_read32(self.addr + 4 * word) }
    }

    fn mask(&self, masked: bool) {
        self.write(3, if masked { VECTOR_MASKED } else { 0 });
    }

    /// Masks the entry, writes the message, then unmasks it unless `masked`.
    fn program(&self, address: u32, vector: u8, masked: bool) {
        self.mask(true);
        self.write(0, address);
        self.write(1, 0);
        self.write(2, u32::from(vector));
        self.mask(masked);
    }
}

fn exercise(pci: &Pci, dev: &Dev, enable: bool, dma: &mut Dma, clock: &Clock) -> Result<Report, Reason> {
    let DevId::Pci(bdf) = dev.id else {
        return Err(reason!("{}: not a PCI function", dev.id));
    };
    let f = pci.functions().iter().find(|f| f.bdf == bdf).ok_or_else(|| reason!("{}: not enumerated", bdf))?;
    let cap = f.caps().iter().find(|c| c.id == CAP_MSIX).ok_or_else(|| reason!("{}: no MSI-X capability", bdf))?;
    let cfg = &pci.config;
    let cap = MsixCap::read(cfg, bdf, cap.off);
    // Entry 1 when there are two: exercises the table's indexing.
    let entry = cap.size.min(2) - 1;
    let table = MsixCap::locate(f, cap.table, u64::from(cap.size) * 16, "table")?;
    let (pba_off, pba_bit) = pba_bit(entry);
    let pba = MsixCap::locate(f, cap.pba, pba_off + 4, "PBA")? + pba_off;
    let entry_regs = Entry { addr: table + 16 * u64::from(entry) };

    let ext = ext_dest_id_offered();
    let mut apic = Lapic::current()?;
    // An NMI reaches an AP past APIC id 255 only with a 32-bit destination.
    if other_cpu(apic.id(), ext).is_some_and(|id| id > 0xff) {
        apic = apic.to_x2apic()?;
    }
    let apic_id = apic.id();
    let address =
        msi_address(apic_id, ext).ok_or_else(|| reason!("APIC id {} needs an extended destination", apic_id))?;
    apic.software_enable();
    apic.set_tpr(TPR_BLOCK_ALL);
    if apic.tpr() != TPR_BLOCK_ALL {
        return Err(reason!("{} TPR reads {:#x} after writing {:#x}", apic.mode_name(), apic.tpr(), TPR_BLOCK_ALL));
    }
    for v in [VECTOR, MASKED_VECTOR, FMASK_VECTOR, OTHER_VECTOR, CONFIG_VECTOR] {
        if apic.irr_has(v) {
            return Err(reason!("vector {:#x} already pending in the IRR before the device was set up", v));
        }
    }

    let mut d = open::<1>(dev, 0, 16, dma, clock)?;
    let buf = dma.alloc(u64::from(READ), 64).ok_or_else(|| reason!("out of DMA memory"))?;
    let ctrl_off = u16::from(cap.off) + 2;
    let control = cfg.read16(bdf, ctrl_off) & !CONTROL_FUNCTION_MASK;
    let control = if enable { control | CONTROL_ENABLE } else { control & !CONTROL_ENABLE };
    cfg.write16(bdf, ctrl_off, control);
    let pba_set = || {
        // SAFETY: the PBA word lies in an assigned memory BAR (checked above).
        let word = unsafe { mmio_read32(pba) };
        word & (1 << pba_bit) != 0
    };
    let result = (|| {
        if enable && cfg.read16(bdf, ctrl_off) & CONTROL_ENABLE == 0 {
            return Err(reason!("{}: MSI-X enable does not stick (control {:#x})", bdf, cfg.read16(bdf, ctrl_off)));
        }
        entry_regs.program(address, VECTOR, false);
        let got = d.t.set_queue_vector(0, entry)?;
        if enable && got != entry {
            return Err(reason!("{}: queue 0 refused MSI-X entry {} (reads back {:#x})", bdf, entry, got));
        }
        let q = &mut d.queues[0];
        q.want_interrupts();
        request(&d.t, q, &[Seg::inp(buf, READ)], clock, 2000)?;
        let arrived = apic.wait_irr(VECTOR, if enable { DELIVER_MS } else { HOLD_MS }, clock);
        if !enable {
            if arrived {
                return Err(reason!("{}: MSI-X is disabled but vector {:#x} reached the IRR", bdf, VECTOR));
            }
            return Ok(None);
        }
        if !arrived {
            return Err(reason!(
                "{}: used ring moved but vector {:#x} was not in the IRR within {} ms",
                bdf,
                VECTOR,
                DELIVER_MS
            ));
        }

        // Masked: the message must wait (PBA bit set) and go out on unmask.
        entry_regs.program(address, MASKED_VECTOR, true);
        request(&d.t, q, &[Seg::inp(buf, READ)], clock, 2000)?;
        if apic.wait_irr(MASKED_VECTOR, HOLD_MS, clock) {
            return Err(reason!("{}: masked entry {} delivered vector {:#x}", bdf, entry, MASKED_VECTOR));
        }
        let pending = pba_set();
        entry_regs.mask(false);
        if !apic.wait_irr(MASKED_VECTOR, DELIVER_MS, clock) {
            return Err(reason!(
                "{}: vector {:#x} held by the mask was not delivered on unmask (PBA bit was {})",
                bdf,
                MASKED_VECTOR,
                u8::from(pending)
            ));
        }
        if pending && pba_set() {
            return Err(reason!("{}: PBA bit of entry {} still set after its message went out", bdf, entry));
        }

        // Function mask: the entry is unmasked, the function masked.
        cfg.write16(bdf, ctrl_off, control | CONTROL_FUNCTION_MASK);
        if cfg.read16(bdf, ctrl_off) & CONTROL_FUNCTION_MASK == 0 {
            return Err(reason!(
                "{}: MSI-X function mask does not stick (control {:#x})",
                bdf,
                cfg.read16(bdf, ctrl_off)
            ));
        }
        entry_regs.program(address, FMASK_VECTOR, false);
        let mut fpending = true;
        for n in 1..=2 {
            request(&d.t, q, &[Seg::inp(buf, READ)], clock, 2000)?;
            if apic.wait_irr(FMASK_VECTOR, HOLD_MS, clock) {
                return Err(reason!(
                    "{}: function masked, but entry {} delivered vector {:#x} (read {})",
                    bdf,
                    entry,
                    FMASK_VECTOR,
                    n
                ));
            }
            let p = pba_set();
            if n == 2 && fpending && !p {
                return Err(reason!(
                    "{}: a second message under the function mask cleared entry {}'s PBA bit",
                    bdf,
                    entry
                ));
            }
            fpending &= p;
        }
        if pending && !fpending {
            return Err(reason!(
                "{}: PBA bit of entry {} set under its own mask but not under the function mask",
                bdf,
                entry
            ));
        }
        if entry_regs.read(3) & VECTOR_MASKED != 0 {
            return Err(reason!("{}: the function mask set entry {}'s own mask bit", bdf, entry));
        }
        cfg.write16(bdf, ctrl_off, control);
        if !apic.wait_irr(FMASK_VECTOR, DELIVER_MS, clock) {
            return Err(reason!(
                "{}: vector {:#x} held by the function mask was not delivered when it was cleared (PBA bit was {})",
                bdf,
                FMASK_VECTOR,
                u8::from(fpending)
            ));
        }
        if fpending && pba_set() {
            return Err(reason!("{}: PBA bit of entry {} still set after the function mask was cleared", bdf, entry));
        }

        // Another CPU: the AP's APIC must be software-enabled to accept it.
        let other = match other_cpu(apic_id, ext) {
            None => None,
            Some(id) => {
                let remote = RemoteLapic::new(&apic, id, clock);
                remote.software_enable()?;
                if remote.irr_has(OTHER_VECTOR)? {
                    return Err(reason!("vector {:#x} already pending in APIC {}'s IRR", OTHER_VECTOR, id));
                }
                let to = msi_address(id, ext).ok_or_else(|| reason!("APIC id {} needs an extended destination", id))?;
                entry_regs.program(to, OTHER_VECTOR, false);
                request(&d.t, q, &[Seg::inp(buf, READ)], clock, 2000)?;
                let dl = clock.deadline_ms(DELIVER_MS);
                while !remote.irr_has(OTHER_VECTOR)? {
                    if dl.expired() {
                        return Err(reason!(
                            "{}: entry {} aimed at APIC {}, but vector {:#x} was not in its IRR within {} ms",
                            bdf,
                            entry,
                            id,
                            OTHER_VECTOR,
                            DELIVER_MS
                        ));
                    }
                    clock.sleep_us(1000);
                }
                if apic.irr_has(OTHER_VECTOR) {
                    return Err(reason!(
                        "{}: vector {:#x} for APIC {} also reached APIC {}",
                        bdf,
                        OTHER_VECTOR,
                        id,
                        apic_id
                    ));
                }
                Some(id)
            }
        };

        // Configuration change: a broken queue makes the device ask for a reset.
        d.t.set_queue_vector(0, NO_VECTOR)?;
        entry_regs.program(address, CONFIG_VECTOR, false);
        let got = d.t.set_config_vector(entry)?;
        if got != entry {
            return Err(reason!(
                "{}: configuration changes refused MSI-X entry {} (reads back {:#x})",
                bdf,
                entry,
                got
            ));
        }
        let generation = d.t.config_generation()?;
        let q = &mut d.queues[0];
        q.raw_push(q.size + 3);
        q.publish();
        q.notify_now();
        if !apic.wait_irr(CONFIG_VECTOR, DELIVER_MS, clock) {
            return Err(reason!(
                "{}: a head past the table on queue 0, but configuration vector {:#x} was not in the IRR within {} ms (status {:#x})",
                bdf,
                CONFIG_VECTOR,
                DELIVER_MS,
                d.t.status()
            ));
        }
        if !d.t.needs_reset() {
            return Err(reason!("{}: configuration vector {:#x} arrived without NEEDS_RESET", bdf, CONFIG_VECTOR));
        }
        if d.t.config_generation()? == generation {
            return Err(reason!("{}: NEEDS_RESET was signalled but config_generation stayed {}", bdf, generation));
        }
        Ok(Some(Masks { pba: pending, fmask_pba: fpending, other }))
    })();

    // Back to the polled default for later users of the device.
    let _ = d.t.set_queue_vector(0, NO_VECTOR);
    let _ = d.t.set_config_vector(NO_VECTOR);
    entry_regs.mask(true);
    cfg.write16(bdf, ctrl_off, control & !CONTROL_ENABLE);
    let reset = d.t.reset(clock);
    let masks = result?;
    reset?;
    Ok(Report { entry, apic_id, apic: apic.mode_name(), masks })
}

/// An APIC id, or `none`.
struct OptId(Option<u32>);

impl core::fmt::Display for OptId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(id) => write!(f, "{}", id),
            None => f.write_str("none"),
        }
    }
}

fn set_or_clear(bit: bool) -> &'static str {
    if bit {
        "set"
    } else {
        "clear"
    }
}

pub fn check(pci: Option<&Pci>, devs: &Devs, enable: bool, dma: &mut Dma, clock: &Clock) -> bool {
    let Some(pci) = pci else {
        emit!("PROBE msix fail PCI was not enumerated");
        return false;
    };
    let Some(dev) = devs.of_type(TYPE_RNG).find(|d| matches!(d.id, DevId::Pci(_))) else {
        emit!("PROBE msix fail no virtio-rng PCI function");
        return false;
    };
    match exercise(pci, dev, enable, dma, clock) {
        Ok(r) => {
            match r.masks {
                Some(m) => emit!(
                    "PROBE msix ok dev={} vector={:#x} entry={} apic={}:{} enable=1 masked_vector={:#x} pba={} fmask_vector={:#x} fmask_pba={} other_vector={:#x} other_apic={} config_vector={:#x}",
                    dev.id,
                    VECTOR,
                    r.entry,
                    r.apic,
                    r.apic_id,
                    MASKED_VECTOR,
                    set_or_clear(m.pba),
                    FMASK_VECTOR,
                    set_or_clear(m.fmask_pba),
                    OTHER_VECTOR,
                    OptId(m.other),
                    CONFIG_VECTOR
                ),
                None => emit!(
                    "PROBE msix ok dev={} vector={:#x} entry={} apic={}:{} enable=0 irr=clear",
                    dev.id,
                    VECTOR,
                    r.entry,
                    r.apic,
                    r.apic_id
                ),
            }
            true
        }
        Err(r) => {
            emit!("PROBE msix fail {}", r);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_capability() {
        let c = MsixCap::decode(0x40, 0x8001, 0x4000 | 2, 0x5000 | 2);
        assert_eq!(c, MsixCap { off: 0x40, size: 2, table: (2, 0x4000), pba: (2, 0x5000) });
        assert_eq!(MsixCap::decode(0x50, 0x07ff, 0, 0x800).size, 2048);
    }

    #[test]
    fn pba_bits_are_little_endian_dwords() {
        assert_eq!(pba_bit(0), (0, 0));
        assert_eq!(pba_bit(1), (0, 1));
        assert_eq!(pba_bit(33), (4, 1));
    }
}
