//! The `smp` check: start every AP with a broadcast INIT, SIPI, SIPI and
//! collect the APIC ids they report.
//!
//! The IPIs go through the xAPIC ICR by MMIO from ring 3 (the all-excluding-
//! self shorthand reaches any number of CPUs, APIC ids above 255 included),
//! or through the x2APIC ICR MSR via the ring-0 service gate if the VMM left
//! the BSP in x2APIC mode. Each AP runs the trampoline in asm/ring0.S: it
//! enters long mode on the BSP's page tables, records its id with `lock xadd`
//! and halts with interrupts off for good (no spinning: there may be hundreds
//! of vCPU threads on two host cores).

use core::sync::atomic::Ordering;

use crate::acpi::Madt;
use crate::bootinfo::E820Entry;
use crate::io::{cpuid, mmio_read32, mmio_write32, pause, rdtsc};
use crate::lapic::{APIC_BASE_ENABLE, APIC_BASE_X2APIC, MSR_APIC_BASE};
use crate::ranges::{Reserved, PAGE};
use crate::ring0::{self, AP_IDS_MAX, PROBE_AP_IDS, PROBE_AP_SLOT, PROBE_AP_STARTED};
use crate::tsc::Tsc;
use crate::util::{IdList, Reason};
use crate::{emit, reason};

const XAPIC_SVR: u64 = 0xf0;
const XAPIC_ICR_LO: u64 = 0x300;
const XAPIC_ICR_HI: u64 = 0x310;
const X2APIC_SVR: u32 = 0x80f;
const X2APIC_ICR: u32 = 0x830;
const ICR_INIT: u32 = 0x000c_4500; // all excluding self, assert, INIT
const ICR_SIPI: u32 = 0x000c_4600; // all excluding self, assert, start-up
const ICR_BUSY: u32 = 1 << 12;

/// The calling CPU's (x2)APIC id.
pub fn my_apic_id() -> u32 {
    if cpuid(0, 0).eax >= 0xb {
        let r = cpuid(0xb, 0);
        if r.ebx != 0 {
            return r.edx;
        }
    }
    cpuid(1, 0).ebx >> 24
}

enum Apic {
    X(u64),
    X2,
}

impl Apic {
    fn enable(&self) {
        match *self {
            // SAFETY: the LAPIC page is identity mapped (MMIO hole below 4 GiB);
            // setting SVR's software-enable bit with spurious vector 0xff, whose
            // IDT handler just returns.
            Apic::X(base) => unsafe {
                let svr = mmio_read32(base + XAPIC_SVR);
                mmio_write32(base + XAPIC_SVR, svr | 0x1ff);
            },
            // SAFETY: as above, through the x2APIC SVR MSR.
            Apic::X2 => unsafe {
                let svr = ring0::rdmsr(X2APIC_SVR);
                ring0::wrmsr(X2APIC_SVR, svr | 0x1ff);
            },
        }
    }

    fn send(&self, icr: u32) {
        match *self {
            // SAFETY: ICR writes only send the IPIs we ask for; the high word is
            // ignored with a shorthand. Delivery-status polling is bounded.
            Apic::X(base) => unsafe {
                mmio_write32(base + XAPIC_ICR_HI, 0);
                mmio_write32(base + XAPIC_ICR_LO, icr);
                for _ in 0..100_000 {
                    if mmio_read32(base + XAPIC_ICR_LO) & ICR_BUSY == 0 {
                        break;
                    }
                    pause();
                }
            },
            // SAFETY: x2APIC ICR write: destination in the high half, unused here.
            Apic::X2 => unsafe { ring0::wrmsr(X2APIC_ICR, u64::from(icr)) },
        }
    }
}

fn delay_us(tsc: Option<Tsc>, us: u64) {
    let ticks = tsc.map_or(us * 4000, |t| t.ticks_per_ms() * us / 1000);
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < ticks {
        pause();
    }
}

/// Starts the APs and waits until as many CPUs as the MADT lists have
/// checked in (BSP included) or the timeout passes. The APs' ids are left in
/// `PROBE_AP_IDS`.
fn start(
    madt: &Madt,
    e820: &[E820Entry],
    reserved: &mut Reserved,
    timeout_ms: u64,
    tsc: Option<Tsc>,
) -> Result<(), Reason> {
    let expected = madt.enabled;
    if expected <= 1 {
        return Ok(());
    }
    let apic_base = ring0::rdmsr(MSR_APIC_BASE);
    if apic_base & APIC_BASE_ENABLE == 0 {
        return Err(reason!("local APIC globally disabled (APIC_BASE={:#x})", apic_base));
    }
    let apic = if apic_base & APIC_BASE_X2APIC != 0 {
        Apic::X2
    } else {
        let base = apic_base & 0x000f_ffff_ffff_f000;
        if base >= 1 << 32 {
            return Err(reason!("xAPIC base {:#x} above 4 GiB", base));
        }
        Apic::X(base)
    };
    let page = reserved
        .alloc(e820, PAGE, 0x1000, 0xa0000)
        .ok_or_else(|| reason!("no free RAM page below 640 KiB for the AP trampoline"))?;
    let code = ring0::ap_trampoline();
    // SAFETY: `page` is a reserved, identity-mapped RAM page below 1 MiB that
    // nothing else uses; the trampoline is far smaller than a page.
    unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), page as *mut u8, code.len()) };
    let vector = (page >> 12) as u32;

    apic.enable();
    apic.send(ICR_INIT);
    delay_us(tsc, 100);
    apic.send(ICR_SIPI | vector);
    delay_us(tsc, 200);
    if PROBE_AP_STARTED.load(Ordering::Acquire) + 1 < expected {
        apic.send(ICR_SIPI | vector);
    }

    let limit = tsc.map_or(timeout_ms.saturating_mul(4_000_000), |t| timeout_ms.saturating_mul(t.ticks_per_ms()));
    let t0 = rdtsc();
    while PROBE_AP_STARTED.load(Ordering::Acquire) + 1 < expected {
        if rdtsc().wrapping_sub(t0) > limit {
            break;
        }
        pause();
    }
    Ok(())
}

pub fn check(
    madt: Option<&Madt>,
    e820: &[E820Entry],
    reserved: &mut Reserved,
    timeout_ms: u64,
    tsc: Option<Tsc>,
) -> bool {
    let Some(madt) = madt else {
        emit!("PROBE smp fail no MADT: cannot tell how many CPUs to expect");
        return false;
    };
    if let Err(r) = start(madt, e820, reserved, timeout_ms, tsc) {
        emit!("PROBE smp fail {}", r);
        return false;
    }
    let started = PROBE_AP_STARTED.load(Ordering::Acquire) as usize;
    let slots = (PROBE_AP_SLOT.load(Ordering::Acquire) as usize).min(AP_IDS_MAX).min(started);
    let mut ids = [0u32; AP_IDS_MAX + 1];
    ids[0] = my_apic_id();
    for (i, slot) in PROBE_AP_IDS.iter().take(slots).enumerate() {
        ids[i + 1] = slot.load(Ordering::Relaxed);
    }
    let n = started + 1;
    let ids = &mut ids[..slots + 1];
    ids.sort_unstable();

    let mut want = [0u32; crate::acpi::MAX_CPUS];
    let want = &mut want[..madt.ids().len()];
    want.copy_from_slice(madt.ids());
    want.sort_unstable();

    if n != madt.enabled as usize {
        emit!("PROBE smp fail cpus={} expected={} apic_ids={}", n, madt.enabled, IdList(ids));
        false
    } else if ids.windows(2).any(|w| w[0] == w[1]) {
        emit!("PROBE smp fail duplicate APIC ids: apic_ids={}", IdList(ids));
        false
    } else if ids.len() == want.len() && ids != want {
        emit!("PROBE smp fail apic_ids={} but MADT says {}", IdList(ids), IdList(want));
        false
    } else {
        emit!("PROBE smp ok cpus={} apic_ids={}", n, IdList(ids));
        true
    }
}
