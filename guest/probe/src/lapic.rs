//! The calling CPU's local APIC as ring 3 reaches it: xAPIC registers by
//! MMIO (the LAPIC page is identity mapped and user-accessible), x2APIC
//! registers as MSRs through the ring-0 service gate. The `msix` check uses
//! it to hold interrupts off with the task priority and to read the IRR.

use core::sync::atomic::Ordering;

use crate::clock::Clock;
use crate::io::{mmio_read32, mmio_write32};
use crate::ring0::{ApicCall, APIC_CALL_READ, APIC_CALL_WRITE, PROBE_APIC_CALL};
use crate::util::Reason;
use crate::{reason, ring0};

pub(crate) const MSR_APIC_BASE: u32 = 0x1b;
pub(crate) const APIC_BASE_ENABLE: u64 = 1 << 11;
pub(crate) const APIC_BASE_X2APIC: u64 = 1 << 10;
/// First x2APIC MSR: xAPIC offset `o` is MSR `X2APIC_MSR_BASE + o / 16`.
const X2APIC_MSR_BASE: u32 = 0x800;

/// Register offsets in the xAPIC page.
const REG_ID: u32 = 0x20;
const REG_TPR: u32 = 0x80;
const REG_SVR: u32 = 0xf0;
const REG_IRR: u32 = 0x200;
const REG_ICR_LO: u32 = 0x300;
const REG_ICR_HI: u32 = 0x310;

/// ICR: delivery mode NMI, level assert, physical destination, no shorthand.
const ICR_NMI: u32 = 0x4400;
/// How long another CPU may take to answer an [`ApicCall`].
const CALL_MS: u64 = 100;

/// SVR: APIC software enable, spurious vector 0xff (its IDT entry just returns).
const SVR_ENABLE_SPURIOUS_FF: u32 = 0x1ff;

/// The task priority that holds back every vector: a fixed interrupt is only
/// delivered when its priority class (vector >> 4) is above the TPR's, and
/// 0xf is the highest class. Signalled vectors then stay pending in the IRR.
pub const TPR_BLOCK_ALL: u32 = 0xf0;

/// The xAPIC register offset and bit of `vector` in the IRR.
pub fn irr_bit(vector: u8) -> (u32, u32) {
    (REG_IRR + 0x10 * (u32::from(vector) / 32), u32::from(vector) % 32)
}

/// The MSI address that targets APIC id `id` (physical destination mode,
/// redirection hint off): 0xFEE0_0000 with id bits 7:0 in bits 19:12. Above
/// 255 only with `ext_dest_id` (the hypervisor offers
/// KVM_FEATURE_MSI_EXT_DEST_ID, see [`ext_dest_id_offered`]): id bits 14:8 in
/// address bits 11:5. `None` where the id cannot be reached.
pub fn msi_address(id: u32, ext_dest_id: bool) -> Option<u32> {
    match id {
        0..=0xff => Some(0xfee0_0000 | (id << 12)),
        0x100..=0x7fff if ext_dest_id => Some(0xfee0_0000 | ((id & 0xff) << 12) | ((id >> 8) << 5)),
        _ => None,
    }
}

/// Whether the hypervisor is KVM and offers the MSI extended destination ID
/// (CPUID 0x40000001 eax bit 15).
pub fn ext_dest_id_offered() -> bool {
    let sig = crate::io::cpuid(0x4000_0000, 0);
    let kvm = [sig.ebx, sig.ecx, sig.edx] == [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
    kvm && sig.eax >= 0x4000_0001 && crate::io::cpuid(0x4000_0001, 0).eax & (1 << 15) != 0
}

/// How the APIC is addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lapic {
    /// xAPIC mode: registers at this (identity-mapped) physical base.
    X(u64),
    /// x2APIC mode: registers are MSRs.
    X2,
}

impl Lapic {
    /// The mode the VMM left the APIC in (IA32_APIC_BASE).
    pub fn current() -> Result<Lapic, Reason> {
        let base = ring0::rdmsr(MSR_APIC_BASE);
        if base & APIC_BASE_ENABLE == 0 {
            return Err(reason!("local APIC globally disabled (APIC_BASE={:#x})", base));
        }
        if base & APIC_BASE_X2APIC != 0 {
            return Ok(Lapic::X2);
        }
        let addr = base & 0x000f_ffff_ffff_f000;
        if addr >= 1 << 32 {
            return Err(reason!("xAPIC base {:#x} above 4 GiB (outside the identity map)", addr));
        }
        Ok(Lapic::X(addr))
    }

    /// This APIC in x2APIC mode: from xAPIC it is switched (setting EXTD in
    /// IA32_APIC_BASE, the architectural transition, which keeps its state).
    /// An NMI can name a destination above 255 only from x2APIC mode.
    pub fn to_x2apic(self) -> Result<Lapic, Reason> {
        if self == Lapic::X2 {
            return Ok(self);
        }
        if crate::io::cpuid(1, 0).ecx & (1 << 21) == 0 {
            return Err(reason!("no x2APIC (CPUID 1 ecx bit 21 clear)"));
        }
        let base = ring0::rdmsr(MSR_APIC_BASE);
        // SAFETY: enabled xAPIC to x2APIC is a legal mode change; every later
        // user of this CPU's APIC reads the mode again (`Lapic::current`).
        unsafe { ring0::wrmsr(MSR_APIC_BASE, base | APIC_BASE_X2APIC) };
        match Lapic::current()? {
            Lapic::X2 => Ok(Lapic::X2),
            Lapic::X(_) => Err(reason!("the x2APIC bit of APIC_BASE did not stick")),
        }
    }

    pub fn mode_name(&self) -> &'static str {
        match self {
            Lapic::X(_) => "xapic",
            Lapic::X2 => "x2apic",
        }
    }

    /// Reads the register at xAPIC offset `reg` (its low 32 bits in x2APIC mode).
    fn read(&self, reg: u32) -> u32 {
        match *self {
            // SAFETY: `base` is the APIC page below 4 GiB, identity mapped by
            // the static page tables; the registers read here (ID, TPR, SVR,
            // IRR) have no read side effects.
            Lapic::X(base) => unsafe { mmio_read32(base + u64::from(reg)) },
            Lapic::X2 => ring0::rdmsr(X2APIC_MSR_BASE + reg / 16) as u32,
        }
    }

    /// Writes the register at xAPIC offset `reg`.
    ///
    /// # Safety
    /// The write must be one the probe means (TPR, SVR here): other APIC
    /// registers send IPIs or arm timers.
    unsafe fn write(&self, reg: u32, value: u32) {
        match *self {
            // SAFETY: as in `read`; the caller vouches for the register.
            Lapic::X(base) => unsafe { mmio_write32(base + u64::from(reg), value) },
            // SAFETY: the x2APIC MSR of the same register; the caller vouches for it.
            Lapic::X2 => unsafe { ring0::wrmsr(X2APIC_MSR_BASE + reg / 16, u64::from(value)) },
        }
    }

    /// This CPU's APIC id as MSI destinations name it.
    pub fn id(&self) -> u32 {
        match self {
            Lapic::X(_) => self.read(REG_ID) >> 24,
            Lapic::X2 => self.read(REG_ID),
        }
    }

    /// Sets SVR's software-enable bit: a software-disabled APIC drops fixed
    /// interrupts instead of keeping them in the IRR.
    pub fn software_enable(&self) {
        let svr = self.read(REG_SVR);
        // SAFETY: enabling the APIC with spurious vector 0xff, whose IDT gate
        // only returns; nothing else in SVR changes.
        unsafe { self.write(REG_SVR, svr | SVR_ENABLE_SPURIOUS_FF) };
    }

    pub fn tpr(&self) -> u32 {
        self.read(REG_TPR) & 0xff
    }

    pub fn set_tpr(&self, tpr: u32) {
        // SAFETY: the task priority only decides which pending interrupts are
        // delivered; raising it delivers none.
        unsafe { self.write(REG_TPR, tpr & 0xff) };
    }

    /// Whether `vector` is pending in the IRR.
    pub fn irr_has(&self, vector: u8) -> bool {
        let (reg, bit) = irr_bit(vector);
        self.read(reg) & (1 << bit) != 0
    }

    /// Polls the IRR for `vector` for up to `ms`; whether it arrived.
    pub fn wait_irr(&self, vector: u8, ms: u64, clock: &Clock) -> bool {
        let d = clock.deadline_ms(ms);
        loop {
            if self.irr_has(vector) {
                return true;
            }
            if d.expired() {
                return false;
            }
            clock.sleep_us(50);
        }
    }

    /// Sends an NMI to the CPU with APIC id `dest`.
    ///
    /// # Safety
    /// That CPU's NMI handler must expect it (a posted [`ApicCall`]):
    /// otherwise it reports a fault and powers off.
    unsafe fn send_nmi(&self, dest: u32) {
        match *self {
            Lapic::X(base) => {
                // SAFETY: as in `read`; the ICR write sends the one NMI the
                // caller vouches for, the high word names its destination.
                unsafe {
                    mmio_write32(base + u64::from(REG_ICR_HI), dest << 24);
                    mmio_write32(base + u64::from(REG_ICR_LO), ICR_NMI);
                }
            }
            // SAFETY: the x2APIC ICR MSR takes destination and command in one write.
            Lapic::X2 => unsafe {
                ring0::wrmsr(X2APIC_MSR_BASE + REG_ICR_LO / 16, u64::from(dest) << 32 | u64::from(ICR_NMI))
            },
        }
    }
}

/// Another CPU's local APIC, reached by posting an [`ApicCall`] and sending
/// that CPU an NMI (its ring-0 handler does the access). The CPU must be an
/// AP parked by the `smp` check in one of the first `AP_NMI_STACKS` slots.
pub struct RemoteLapic<'a> {
    local: &'a Lapic,
    pub id: u32,
    clock: &'a Clock,
}

impl<'a> RemoteLapic<'a> {
    pub fn new(local: &'a Lapic, id: u32, clock: &'a Clock) -> RemoteLapic<'a> {
        RemoteLapic { local, id, clock }
    }

    fn call(&self, op: u32, reg: u32, value: u32) -> Result<u32, Reason> {
        let c: &ApicCall = &PROBE_APIC_CALL;
        if c.op.load(Ordering::Acquire) != 0 {
            return Err(reason!("an earlier call to another CPU's APIC was never answered"));
        }
        c.reg.store(reg, Ordering::Relaxed);
        c.value.store(value, Ordering::Relaxed);
        c.op.store(op, Ordering::Release);
        // SAFETY: the call is posted, so the target's NMI handler performs it.
        unsafe { self.local.send_nmi(self.id) };
        let d = self.clock.deadline_ms(CALL_MS);
        while c.op.load(Ordering::Acquire) != 0 {
            if d.expired() {
                return Err(reason!("APIC {} did not answer an NMI within {} ms", self.id, CALL_MS));
            }
            self.clock.sleep_us(20);
        }
        Ok(c.value.load(Ordering::Acquire))
    }

    /// Sets SVR's software-enable bit, as [`Lapic::software_enable`] does.
    pub fn software_enable(&self) -> Result<(), Reason> {
        let svr = self.call(APIC_CALL_READ, REG_SVR, 0)?;
        self.call(APIC_CALL_WRITE, REG_SVR, svr | SVR_ENABLE_SPURIOUS_FF)?;
        Ok(())
    }

    /// Whether `vector` is pending in that CPU's IRR. The APs run with
    /// interrupts off, so a signalled vector stays there.
    pub fn irr_has(&self, vector: u8) -> Result<bool, Reason> {
        let (reg, bit) = irr_bit(vector);
        Ok(self.call(APIC_CALL_READ, reg, 0)? & (1 << bit) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irr_bits_follow_the_register_layout() {
        assert_eq!(irr_bit(0x00), (0x200, 0));
        assert_eq!(irr_bit(0x41), (0x220, 1));
        assert_eq!(irr_bit(0x5f), (0x220, 31));
        assert_eq!(irr_bit(0xff), (0x270, 31));
        // The x2APIC MSR of IRR[2] is 0x822.
        assert_eq!(X2APIC_MSR_BASE + irr_bit(0x41).0 / 16, 0x822);
        assert_eq!(X2APIC_MSR_BASE + REG_TPR / 16, 0x808);
    }

    #[test]
    fn nmi_ipis_name_one_destination() {
        // Delivery mode 100b (NMI), assert, no shorthand, physical destination.
        assert_eq!((ICR_NMI >> 8) & 7, 4);
        assert_eq!(ICR_NMI & (1 << 14), 1 << 14);
        assert_eq!(ICR_NMI & (3 << 18 | 1 << 11), 0);
        assert_eq!(X2APIC_MSR_BASE + REG_ICR_LO / 16, 0x830);
    }

    #[test]
    fn msi_addresses_carry_the_destination_id() {
        assert_eq!(msi_address(0, false), Some(0xfee0_0000));
        assert_eq!(msi_address(3, false), Some(0xfee0_3000));
        assert_eq!(msi_address(255, false), Some(0xfeef_f000));
        assert_eq!(msi_address(256, false), None);
        assert_eq!(msi_address(3, true), Some(0xfee0_3000));
        assert_eq!(msi_address(0x123, true), Some(0xfee2_3020));
        assert_eq!(msi_address(0x7fff, true), Some(0xfeef_ffe0));
        assert_eq!(msi_address(0x8000, true), None);
    }

    #[test]
    fn tpr_f0_holds_back_every_vector_class() {
        // Delivered only when the vector's class is above the TPR's class.
        let delivered = |v: u32| v >> 4 > TPR_BLOCK_ALL >> 4;
        assert!((0x10..=0xff).all(|v| !delivered(v)));
    }
}
