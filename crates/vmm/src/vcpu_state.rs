//! A vCPU's architectural state as plain data: everything KVM holds for it, read while the
//! vCPU is paused and written back to a new vCPU to resume the guest elsewhere (snapshots,
//! live migration).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Errors saving or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM call failed.
    #[error("{what} failed")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some MSRs.
    #[error("KVM_SET_MSRS took {set} of {total} MSRs (first refused: {refused:#x})")]
    PartialMsrs {
        /// MSRs set.
        set: usize,
        /// MSRs given.
        total: usize,
        /// Index of the first MSR KVM refused.
        refused: u32,
    },
    /// The vCPU was running: state can only be read or written while it is paused.
    #[error("vCPU {0} is not paused")]
    NotPaused(u32),
    /// The vCPU thread is gone.
    #[error("vCPU {0} has exited")]
    Gone(u32),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// Everything KVM keeps for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u32,
    /// CPUID table.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Model-specific registers.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// Extended state (x87, SSE, AVX, ...), as `KVM_GET_XSAVE` gives it.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Run state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// TSC frequency in kHz, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// Reads MSRs `indices`, skipping those KVM cannot read.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut i = 0;
    while i < indices.len() {
        let chunk = &indices[i..(i + kvm_bindings::KVM_MAX_MSR_ENTRIES).min(indices.len())];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::PartialMsrs {
            set: 0,
            total: entries.len(),
            refused: chunk[0],
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // KVM stops at the first MSR it cannot read: skip that one and go on after it.
        i += if n == chunk.len() { n } else { n + 1 };
    }
    Ok(out)
}

/// Reads the state of the vCPU behind `fd`. The vCPU must not be in `KVM_RUN`.
pub fn save(fd: &VcpuFd, id: u32, msr_indices: &[u32]) -> Result<VcpuState, VcpuStateError> {
    let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, msr_indices)?;
    let events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(VcpuState {
        id,
        cpuid,
        msrs,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        mp_state,
        events,
        tsc_khz,
    })
}

/// Writes `s` into the (new, not yet run) vCPU behind `fd`.
pub fn restore(fd: &VcpuFd, s: &VcpuState) -> Result<(), VcpuStateError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuStateError::PartialMsrs {
        set: 0,
        total: s.cpuid.len(),
        refused: 0,
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    if let Some(khz) = s.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz).map_err(kvm("KVM_SET_TSC_KHZ"))?;
        }
    }
    fd.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    fd.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    // SAFETY: `s.xsave` is a complete kvm_xsave of the legacy 4 KiB size that KVM_SET_XSAVE
    // reads; no larger XSAVE area is in use since the state was read with KVM_GET_XSAVE.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    for chunk in s.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuStateError::PartialMsrs {
            set: 0,
            total: chunk.len(),
            refused: chunk[0].index,
        })?;
        let n = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if n != chunk.len() {
            return Err(VcpuStateError::PartialMsrs {
                set: n,
                total: chunk.len(),
                refused: chunk[n].index,
            });
        }
    }
    fd.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
