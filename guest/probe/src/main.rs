//! kiln's probe guest: a tiny kernel that checks a VM from inside.
//!
//! Ring 0 is a few hundred instructions of assembly (asm/ring0.S): it prints
//! `PROBE hello`, enters long mode and drops to ring 3, where this Rust code
//! runs natively even on a nested KVM that emulates ring 0. See README.md for
//! the boot flow, the command line and the output contract.

#![no_std]
#![no_main]

mod acpi;
mod boot;
mod bootinfo;
mod cmdline;
mod cpu;
mod cpuloop;
mod intrinsics;
mod io;
mod mem;
mod paging;
mod ranges;
mod ring0;
mod rtc;
mod serial;
mod smp;
mod tsc;
mod util;

use bootinfo::Entry;
use cmdline::Check;
use ranges::Reserved;
use util::Printable;

/// Ring-3 entry, called from asm/ring0.S with the entry kind (0 PVH,
/// 1 Linux 64-bit) and the boot-info pointer (hvm_start_info or boot_params).
#[no_mangle]
extern "C" fn probe_main(entry: u64, info: u64) -> ! {
    let entry = if entry == 0 { Entry::Pvh } else { Entry::Linux64 };
    emit!("PROBE info entry={}", entry.name());

    let mut reserved = Reserved::new();
    let image = ring0::image_range();
    reserved.add(image.0, image.1 - image.0);
    let boot = bootinfo::parse(entry, info, &mut reserved);
    emit!("PROBE info cmdline={}", Printable(boot.cmdline.unwrap_or(b"")));
    for e in boot.e820() {
        emit!("PROBE info e820 start={:#x} size={:#x} type={}", e.addr, e.size, e.kind);
    }
    let (opts, cmdline_fails) = cmdline::parse(boot.cmdline.unwrap_or(b""));

    // ACPI first: its tables may sit in RAM, and they must be reserved before
    // anything is allocated. Power-off needs it whatever the checks are.
    let acpi = acpi::parse(boot.rsdp, &mut reserved);
    if let Some(p) = acpi.poweroff {
        p.install();
    }
    let mapped = paging::map_all(boot.e820(), &mut reserved);
    let tsc = if opts.enabled(Check::Smp) || opts.enabled(Check::Mem) || opts.enabled(Check::Cpu) {
        tsc::calibrate()
    } else {
        None
    };

    let mut ok = 0;
    let mut fail = cmdline_fails;
    for check in Check::ALL.into_iter().filter(|&c| opts.enabled(c)) {
        let passed = match check {
            Check::Boot => boot::check(&boot, image),
            Check::Acpi => acpi::check(&acpi),
            Check::Smp => smp::check(acpi.madt.as_ref(), boot.e820(), &mut reserved, opts.smp_timeout_ms, tsc),
            Check::Mem => mem::check(boot.e820(), &reserved, opts.mem, mapped, tsc),
            Check::Cpu => cpu::check(opts.cpu_iters, tsc),
            Check::Rtc => rtc::check(),
        };
        if passed {
            ok += 1;
        } else {
            fail += 1;
        }
    }
    emit!("PROBE summary ok={} fail={}", ok, fail);
    emit!("PROBE poweroff");
    ring0::poweroff()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    match info.location() {
        Some(l) => emit!("PROBE fault panic at {}:{}: {}", l.file(), l.line(), info.message()),
        None => emit!("PROBE fault panic: {}", info.message()),
    }
    ring0::poweroff()
}
