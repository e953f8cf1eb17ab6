//! The VM lifecycle through the library: pause a running guest, read every vCPU's state,
//! write it back, resume, and let the guest finish as if nothing happened.

mod common;

use std::time::Duration;

use kiln_vmm::config::{BootEntry, SerialConfig, VmConfig};
use kiln_vmm::{Vm, VmOutcome};

#[test]
fn pause_save_restore_resume_keeps_the_guest_running() {
    common::require_kvm();
    let dir = std::env::temp_dir().join(format!("kiln-lifecycle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let console = dir.join("console.log");
    let cfg = VmConfig {
        kernel: common::probe().to_path_buf(),
        initrd: None,
        // Long enough that the pause lands while the guest computes.
        cmdline: "probe.checks=smp,cpu probe.cpu_iters=1500000000".into(),
        cpus: 2,
        memory: 256 << 20,
        serial: SerialConfig::File(console.clone()),
        entry: BootEntry::Auto,
        disks: vec![],
        nets: vec![],
        rng: None,
        console: None,
    };
    let mut vm = Vm::build(&cfg).expect("build VM");
    std::thread::sleep(Duration::from_millis(700));

    vm.pause().expect("pause");
    let states = vm.save_vcpu_states().expect("save vCPU states");
    assert_eq!(states.len(), 2);
    assert_eq!(states[0].id, 0);
    assert!(!states[0].msrs.is_empty(), "MSRs were saved");
    let json = serde_json::to_string(&states).expect("vCPU state serializes");
    let back: Vec<kiln_vmm::vcpu_state::VcpuState> =
        serde_json::from_str(&json).expect("and deserializes");
    assert_eq!(
        serde_json::to_string(&back).unwrap(),
        json,
        "serde round trip is lossless"
    );
    let rip = states[0].regs.rip;

    // The guest does not move while paused.
    std::thread::sleep(Duration::from_millis(200));
    let again = vm.save_vcpu_states().expect("save again");
    assert_eq!(again[0].regs.rip, rip, "a paused vCPU does not run");

    // The in-kernel PICs, IOAPIC, PIT and clock go through JSON and back into the VM too.
    let chips = vm.save_chips().expect("save the in-kernel chips");
    let json = serde_json::to_string(&chips).expect("chip state serializes");
    let chips: kiln_vmm::chips::ChipsState = serde_json::from_str(&json).expect("and deserializes");
    vm.restore_chips(&chips)
        .expect("restore the in-kernel chips");

    vm.restore_vcpu_states(back).expect("restore vCPU states");
    vm.resume().expect("resume");
    assert_eq!(vm.run().expect("run to power-off"), VmOutcome::PowerOff);

    let out = std::fs::read_to_string(&console).unwrap();
    assert!(out.contains("PROBE smp ok cpus=2"), "{out}");
    assert!(out.contains("PROBE cpu ok"), "{out}");
    assert!(out.contains("PROBE summary ok=2 fail=0"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn state_cannot_be_read_while_running() {
    common::require_kvm();
    let cfg = VmConfig {
        kernel: common::probe().to_path_buf(),
        initrd: None,
        cmdline: "probe.checks=cpu probe.cpu_iters=500000000".into(),
        cpus: 1,
        memory: 64 << 20,
        serial: SerialConfig::None,
        entry: BootEntry::Auto,
        disks: vec![],
        nets: vec![],
        rng: None,
        console: None,
    };
    let vm = Vm::build(&cfg).expect("build VM");
    let err = vm.save_vcpu_states().unwrap_err().to_string();
    assert!(err.contains("not paused"), "{err}");
    assert_eq!(vm.run().expect("run"), VmOutcome::PowerOff);
}
