//! CPUID for each vCPU: KVM's supported leaves with the topology of this VM.
//!
//! Topology is one socket of `count` cores with one thread each; vCPU `i` has APIC id `i`.
//! The hypervisor leaves (0x4000_0000..) are passed on as KVM reports them, so paravirtual
//! features such as kvm-clock stay usable.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use thiserror::Error;

/// CPUID errors.
#[derive(Debug, Error)]
pub enum CpuidError {
    /// The CPUID table could not grow.
    #[error("cannot add CPUID leaf {leaf:#x}.{index}: table full")]
    TableFull {
        /// Leaf.
        leaf: u32,
        /// Subleaf.
        index: u32,
    },
}

const ECX_HYPERVISOR: u32 = 1 << 31;
/// KVM's paravirtual feature leaf.
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
/// KVM_FEATURE_MSI_EXT_DEST_ID: MSI address bits 11:5 carry APIC id bits 14:8.
const EAX_KVM_MSI_EXT_DEST_ID: u32 = 1 << 15;
const EDX_HTT: u32 = 1 << 28;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const AMD_LEAF_EXT_APIC_ID: u32 = 0x8000_001e;
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;

/// Number of bits needed to number `count` items (0 for 1).
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Whether a VM of `cpu_count` vCPUs (more than 254) runs with KVM's x2APIC API (32-bit
/// APIC ids in IPIs and MSI routes). Such a VM's CPUID offers the extended
/// destination ID (KVM_FEATURE_MSI_EXT_DEST_ID), so that device interrupts can reach every
/// vCPU without an IOMMU, and its MSI routes translate it (as QEMU does).
pub fn uses_x2apic_api(cpu_count: u32) -> bool {
    cpu_count > 254
}

/// Rewrites `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `vcpu_id` of a VM with
/// `cpu_count` vCPUs.
pub fn configure(cpuid: &mut CpuId, vcpu_id: u32, cpu_count: u32) -> Result<(), CpuidError> {
    let apic_id = vcpu_id;
    let max_basic = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let amd = cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 0 && e.ebx == u32::from_le_bytes(*b"Auth"));

    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                let logical = cpu_count.min(255);
                e.ebx = ((apic_id & 0xff) << 24) | (logical << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if cpu_count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            4 if e.eax != 0 => {
                // Cores per package; each cache is private except the last level.
                let cores = cpu_count.min(64) - 1;
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { cores } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | (cores << 26);
            }
            0x8000_0001 if amd => e.ecx |= AMD_ECX_CMP_LEGACY,
            0x8000_0008 if amd => {
                let nc = cpu_count.saturating_sub(1).min(255);
                e.ecx = (e.ecx & !0xf0ff) | (bits_for(cpu_count) << 12) | nc;
            }
            LEAF_KVM_FEATURES if uses_x2apic_api(cpu_count) => e.eax |= EAX_KVM_MSI_EXT_DEST_ID,
            AMD_LEAF_EXT_APIC_ID => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // one thread per core: core id = APIC id
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }

    let mut leaves = vec![LEAF_EXT_TOPOLOGY];
    if max_basic >= LEAF_V2_EXT_TOPOLOGY {
        leaves.push(LEAF_V2_EXT_TOPOLOGY);
    }
    for leaf in leaves {
        if max_basic < leaf {
            continue;
        }
        set_topology_leaf(cpuid, leaf, apic_id, cpu_count)?;
    }
    Ok(())
}

/// Leaf 0xB / 0x1F: level 0 is SMT (1 thread), level 1 is cores, level 2 ends the list.
fn set_topology_leaf(
    cpuid: &mut CpuId,
    leaf: u32,
    apic_id: u32,
    count: u32,
) -> Result<(), CpuidError> {
    let levels = [
        (0u32, 1u32, 0u32, 1u32), // (subleaf, level type, shift, logical)
        (1, 2, bits_for(count), count),
        (2, 0, 0, 0),
    ];
    for (index, kind, shift, logical) in levels {
        let entry = kvm_cpuid_entry2 {
            function: leaf,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: shift,
            ebx: logical,
            ecx: (kind << 8) | index,
            edx: apic_id,
            ..Default::default()
        };
        match cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == leaf && e.index == index)
        {
            Some(e) => *e = entry,
            None => cpuid
                .push(entry)
                .map_err(|_| CpuidError::TableFull { leaf, index })?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ebx: u32::from_le_bytes(*b"Genu"),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn the_extended_destination_id_is_offered_only_with_apic_ids_above_254() {
        let with_kvm_leaf = || {
            let mut c = base();
            c.push(kvm_cpuid_entry2 {
                function: LEAF_KVM_FEATURES,
                eax: 0x7efb,
                ..Default::default()
            })
            .unwrap();
            c
        };
        let mut c = with_kvm_leaf();
        configure(&mut c, 0, 254).unwrap();
        assert_eq!(find(&c, LEAF_KVM_FEATURES, 0).eax, 0x7efb);
        let mut c = with_kvm_leaf();
        configure(&mut c, 0, 255).unwrap();
        assert_eq!(
            find(&c, LEAF_KVM_FEATURES, 0).eax,
            0x7efb | EAX_KVM_MSI_EXT_DEST_ID
        );
    }

    #[test]
    fn leaf1_carries_apic_id_and_count() {
        let mut c = base();
        configure(&mut c, 7, 8).unwrap();
        let e = find(&c, 1, 0);
        assert_eq!(e.ebx >> 24, 7);
        assert_eq!((e.ebx >> 16) & 0xff, 8);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn leaf_b_describes_cores_with_full_x2apic_id() {
        let mut c = base();
        configure(&mut c, 287, 288).unwrap();
        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        let end = find(&c, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 287));
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (9, 288, 2, 287)
        );
        assert_eq!(end.ecx >> 8, 0);
        // Leaf 1 holds only 8 bits of APIC id: the low byte, as on hardware.
        assert_eq!(find(&c, 1, 0).ebx >> 24, 287 & 0xff);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(8), 3);
        assert_eq!(bits_for(9), 4);
        assert_eq!(bits_for(288), 9);
    }
}
