//! The probe kernel's ring-3 main: runs the selected checks in order, prints
//! the summary and powers off. The checks themselves live in the library
//! (src/lib.rs); the ring-0 part is asm/ring0.S.

#![no_std]
#![no_main]

use probe::bootinfo::{self, Entry};
use probe::clock::Clock;
use probe::cmdline::{self, Check, End};
use probe::dma::Dma;
use probe::ranges::Reserved;
use probe::util::Printable;
use probe::{acpi, boot, cpu, emit, mem, paging, pci, reason, ring0, rtc, smp, tsc, virtio};

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
    if let Some((addr, size)) = boot.initrd {
        match bootinfo::fnv1a(addr, size) {
            Some(hash) => emit!("PROBE info initrd addr={:#x} size={} fnv1a={:#018x}", addr, size, hash),
            None => emit!("PROBE info initrd addr={:#x} size={} (not in the first 4 GiB)", addr, size),
        }
    }
    let (opts, cmdline_fails) = cmdline::parse(boot.cmdline.unwrap_or(b""));

    // ACPI first: its tables may sit in RAM, and they must be reserved before
    // anything is allocated. Power-off needs it whatever the checks are.
    let acpi = acpi::parse(boot.rsdp, &mut reserved);
    if let Some(p) = acpi.poweroff {
        p.install();
    }
    if let Some(f) = opts.fault {
        f.raise();
    }
    let mapped = paging::map_all(boot.e820(), &mut reserved);
    let pci = match (opts.needs_pci(), mapped) {
        (false, _) => Err(reason!("not enumerated")),
        (true, Ok(top)) => pci::discover(&acpi, boot.e820(), &mut reserved, top, opts.dev.pci_high),
        (true, Err(r)) => Err(r),
    };
    let needs_virtio = opts.needs_virtio();
    // Virtio devices: PCI functions, then virtio-mmio devices from the command line.
    let mut devs = virtio::Devs::new();
    if needs_virtio {
        if let Ok(p) = &pci {
            devs.add_pci(p);
        }
        virtio::mmio::add_from_cmdline(&mut devs, boot.cmdline.unwrap_or(b""), boot.e820(), &mut reserved);
    }
    let mut dma = if needs_virtio { Dma::new(boot.e820(), &mut reserved, opts.dev.dma_bytes()) } else { None };
    // The hostile check's huge buffer starts in the last RAM page below 4 GiB.
    let edge =
        if opts.enabled(Check::Hostile) { reserved.alloc_top(boot.e820(), 4096, 1 << 20, 1 << 32) } else { None };
    let tsc = if opts.enabled(Check::Smp) || opts.enabled(Check::Mem) || opts.enabled(Check::Cpu) || needs_virtio {
        tsc::calibrate()
    } else {
        None
    };
    let clock = Clock::new(tsc);

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
            Check::Pci => pci::check(pci.as_ref(), boot.e820(), &acpi),
            Check::Msix => match dma.as_mut() {
                Some(dma) => virtio::msix::check(pci.as_ref().ok(), &devs, opts.dev.msix_enable, dma, &clock),
                None => {
                    emit!("PROBE msix fail no RAM below 4 GiB for virtqueues");
                    false
                }
            },
            Check::Intx => match dma.as_mut() {
                Some(dma) => {
                    let ioapic = acpi.madt.as_ref().and_then(|m| m.ioapics().first().copied());
                    virtio::intx::check(pci.as_ref().ok(), ioapic, &devs, dma, &clock)
                }
                None => {
                    emit!("PROBE intx fail no RAM below 4 GiB for virtqueues");
                    false
                }
            },
            dev => match dma.as_mut() {
                Some(dma) => virtio_check(dev, &devs, dma, &clock, &opts.dev, edge),
                None => {
                    emit!("PROBE {} fail no RAM below 4 GiB for virtqueues", dev.name());
                    false
                }
            },
        };
        if passed {
            ok += 1;
        } else {
            fail += 1;
        }
    }
    emit!("PROBE summary ok={} fail={}", ok, fail);
    match opts.end {
        End::PowerOff => {}
        End::Reset => match acpi.reset {
            Some((acpi::Space::Io, port, value)) if port <= 0xffff => {
                emit!("PROBE reset acpi:{:#x}", port);
                // SAFETY: the FADT names this port as the reset register.
                unsafe { probe::io::outb(port as u16, value) };
            }
            _ => emit!("PROBE reset fail no I/O-port ACPI reset register"),
        },
        End::I8042 => {
            emit!("PROBE reset i8042");
            // SAFETY: 0xfe to the i8042 command port pulses the CPU reset line.
            unsafe { probe::io::outb(0x64, 0xfe) };
        }
        End::TripleFault => {
            emit!("PROBE triplefault");
            ring0::triple_fault()
        }
    }
    // If a reset did not happen, power off so the VMM does not wait forever.
    emit!("PROBE poweroff");
    ring0::poweroff()
}

/// Runs one of the virtio device checks.
fn virtio_check(
    check: Check,
    devs: &virtio::Devs,
    dma: &mut Dma,
    clock: &Clock,
    dev: &probe::devopts::DevOptions,
    edge: Option<u64>,
) -> bool {
    match check {
        Check::Rng => virtio::rng::check(devs, dev.qsize, dma, clock),
        Check::Blk => virtio::blk::check(devs, dev, dma, clock),
        Check::Net => virtio::net::check(devs, dev, dma, clock),
        Check::Console => virtio::console::check(devs, dev.console_wait_ms, dev.qsize, dma, clock),
        Check::Hostile => probe::hostile::check(devs, dev, edge, dma, clock),
        // The other checks are not virtio checks (the caller never passes them).
        _ => false,
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    match info.location() {
        Some(l) => emit!("PROBE fault panic at {}:{}: {}", l.file(), l.line(), info.message()),
        None => emit!("PROBE fault panic: {}", info.message()),
    }
    ring0::poweroff()
}
