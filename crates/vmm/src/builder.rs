//! The one linear recipe that turns a [`VmConfig`] into a running [`Vm`]: KVM, memory,
//! devices, kernel, boot tables, vCPUs. The vCPUs start as its last step, so the guest's
//! first instruction runs before any work that is not needed for it. Each step is a
//! function below; `Vm::build` reads top to bottom.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};

use kiln_arch::acpi::{self, AcpiConfig};
use kiln_arch::boot::{self, BootInfo};
use kiln_arch::layout::{acpi_ports, ports, KVM_TSS_ADDR, MMIO_HOLE_START};
use kiln_arch::regs::{self, EntryPoint};
use kiln_arch::{cpuid, e820};
use kiln_devices::legacy::{AcpiPm, Cmos, SerialPort, I8042};
use kiln_devices::{Bus, IrqLine, SharedExitHandle};
use kiln_disk::ImageFormat;
use kiln_virtio::block::{Block, BlockParams};
use kiln_virtio::console::{Console, ConsoleBackend, ConsoleParams};
use kiln_virtio::net::{Net, NetParams};
use kiln_virtio::rng::Rng;
use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{BootEntry, ConsoleTarget, DiskFormat, MemorySize, SerialConfig, VmConfig};
use crate::console::{EscapeFilter, FdWriter, RawTerminal};
use crate::devices::DeviceManager;
use crate::error::{kvm_err, os_err, VmError};
use crate::events::VmEvents;
use crate::loader::{self, KernelKind, LoaderError};
use crate::memory::{self, DeferredSlots, GuestMemory, SlotSpec};
use crate::vcpu::{self, Vcpu};
use crate::vm::{stop_sigset, ConsoleInput, Vm};

impl Vm {
    /// Builds the VM described by `cfg` and starts its vCPUs.
    pub fn build(cfg: &VmConfig) -> Result<Vm, VmError> {
        let kvm = open_kvm()?;
        let (base_cpuid, phys_bits) = check_host(&kvm, cfg)?;
        log::debug!("creating the VM");
        let (vm_fd, mem, deferred) = create_vm(&kvm, cfg)?;
        let vm_fd = Arc::new(vm_fd);
        log::debug!("memory, irqchip and PIT ready");

        let (events, events_rx, wake) =
            VmEvents::new().map_err(os_err("cannot create an eventfd"))?;
        let legacy = attach_legacy_devices(&vm_fd, cfg, &events)?;
        let progress = Arc::new(DeferredSlots::default());
        let mmio = pending_ram_bus(&mem, &deferred, &progress)?;
        let mut devices = attach_pci_root(&vm_fd, &mem, cfg, phys_bits, &legacy.pio, &mmio)?;
        attach_rng(&mut devices, cfg)?;
        attach_disks(&mut devices, cfg)?;
        attach_nets(&mut devices, cfg)?;
        attach_console(&mut devices, cfg)?;

        let entry = load_guest(&mem, cfg, &devices)?;
        log::debug!("entering the kernel through {entry:?}");

        let vcpus = create_vcpus(
            &kvm,
            &vm_fd,
            &mem,
            cfg,
            entry,
            &base_cpuid,
            &legacy.pio,
            &mmio,
            &events,
        )?;
        let mut handles = Vec::with_capacity(vcpus.len());
        for v in vcpus {
            handles.push(
                v.start(false)
                    .map_err(os_err("cannot start a vCPU thread"))?,
            );
        }
        log::debug!("vCPUs started");

        // Everything below runs while the guest already does.
        let slot_thread = if deferred.is_empty() {
            None
        } else {
            Some(
                memory::register_in_background(vm_fd.clone(), deferred, progress.clone())
                    .map_err(os_err("cannot start the memory slot thread"))?,
            )
        };
        let input = match cfg.serial {
            SerialConfig::Stdio => Some(ConsoleInput {
                fd: libc::STDIN_FILENO,
                raw: RawTerminal::enter(libc::STDIN_FILENO),
                escape: EscapeFilter::default(),
                pending: VecDeque::new(),
                drained: legacy.input_drained,
                polling: false,
            }),
            _ => None,
        };
        Ok(Vm {
            vm_fd,
            mem,
            vcpus: handles,
            devices,
            events: events_rx,
            wake,
            serial: legacy.serial,
            input,
            deferred: progress,
            backlog: VecDeque::new(),
            slot_thread,
            _kvm: kvm,
        })
    }
}

/// Opens `/dev/kvm`, or the device `KILN_KVM_DEVICE` names.
fn open_kvm() -> Result<Kvm, VmError> {
    let path = std::env::var("KILN_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string());
    let unavailable = |source| VmError::KvmUnavailable {
        path: path.clone(),
        source,
    };
    let c_path = std::ffi::CString::new(path.clone())
        .map_err(|_| unavailable(kvm_ioctls::Error::new(libc::EINVAL)))?;
    Kvm::new_with_path(&c_path).map_err(unavailable)
}

/// Checks that KVM and the host can run `cfg`; returns KVM's supported CPUID and the host's
/// physical-address bits.
fn check_host(kvm: &Kvm, cfg: &VmConfig) -> Result<(CpuId, u32), VmError> {
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::UserMemory, "user memory slots (KVM_CAP_USER_MEMORY)"),
        (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    if cpuid::uses_x2apic_api(cfg.cpus) && !kvm.check_extension(Cap::X2ApicApi) {
        return Err(VmError::MissingCapability(
            "KVM_CAP_X2APIC_API, needed above 254 vCPUs",
        ));
    }
    let max_cpus = kvm.get_max_vcpus();
    if usize::try_from(cfg.cpus).unwrap_or(usize::MAX) > max_cpus {
        return Err(VmError::TooManyCpus {
            asked: cfg.cpus,
            max: max_cpus,
        });
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let phys_bits = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map_or(36, |e| e.eax & 0xff);
    let ram_end = kiln_arch::layout::ram_ranges(cfg.memory)
        .last()
        .map_or(0, |(s, l)| s + l);
    if phys_bits < 64 && ram_end > 1u64 << phys_bits {
        return Err(VmError::MemoryBeyondPhysBits {
            memory: MemorySize(cfg.memory),
            end: ram_end,
            bits: phys_bits,
        });
    }
    memory::check_tracking_fits(cfg.memory, memory::host_available_memory())?;
    Ok((cpuid, phys_bits))
}

/// Creates the VM with its memory, irqchip and PIT. Returns the slots left to register in
/// the background.
fn create_vm(kvm: &Kvm, cfg: &VmConfig) -> Result<(VmFd, GuestMemory, Vec<SlotSpec>), VmError> {
    let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm_fd
        .set_tss_address(usize::try_from(KVM_TSS_ADDR).unwrap_or_default())
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    let mem = memory::create_guest_memory(cfg.memory)?;
    let max_slots = usize::try_from(kvm.check_extension_int(Cap::NrMemslots)).unwrap_or(32);
    let (now, deferred): (Vec<_>, Vec<_>) = memory::slots(&mem, max_slots)
        .into_iter()
        .partition(|s| s.gpa < memory::SYNC_SLOT_LIMIT);
    for slot in now {
        memory::register_slot(&vm_fd, slot)?;
    }
    // The irqchip after the memory: registering the first memory slot right after creating
    // the irqchip waits out an SRCU grace period (milliseconds).
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    if cpuid::uses_x2apic_api(cfg.cpus) {
        let flags = kvm_bindings::KVM_X2APIC_API_USE_32BIT_IDS
            | kvm_bindings::KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK;
        let cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X2APIC_API,
            args: [u64::from(flags), 0, 0, 0],
            ..Default::default()
        };
        vm_fd
            .enable_cap(&cap)
            .map_err(kvm_err("KVM_ENABLE_CAP(X2APIC_API)"))?;
    }
    Ok((vm_fd, mem, deferred))
}

/// The legacy PC devices, on the port I/O bus.
struct LegacyDevices {
    pio: Arc<Bus>,
    serial: Arc<Mutex<SerialPort>>,
    /// Signalled when the guest empties the serial receive FIFO.
    input_drained: Arc<EventFd>,
}

/// COM1, the i8042, the CMOS RTC and the ACPI PM block.
fn attach_legacy_devices(
    vm_fd: &VmFd,
    cfg: &VmConfig,
    events: &VmEvents,
) -> Result<LegacyDevices, VmError> {
    let exit: SharedExitHandle = Arc::new(events.clone());
    let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("cannot create an eventfd"));
    let input_drained = Arc::new(eventfd()?);
    let serial_out: Box<dyn Write + Send> = match &cfg.serial {
        SerialConfig::Stdio => Box::new(FdWriter(libc::STDOUT_FILENO)),
        SerialConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        ),
        SerialConfig::None => Box::new(std::io::sink()),
    };
    // COM1 stays an edge (a plain irqfd pulse), unlike INTx and virtio-mmio: ISA IRQ 4 is
    // edge-triggered (the MADT overrides only the SCI), the 16550 raises a new pulse for each
    // new interrupt condition, and drivers read IIR until nothing is pending before they
    // return, so an interrupt that comes in during the handler is served by that loop.
    let serial_irq = eventfd()?;
    vm_fd
        .register_irqfd(&serial_irq, ports::COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD"))?;
    let serial = Arc::new(Mutex::new(SerialPort::new(
        IrqLine::new(serial_irq),
        Some(input_drained.clone()),
        serial_out,
    )));

    let (below_4g, above_4g) = split_memory(cfg.memory);
    let pio = Bus::new();
    pio.insert(serial.clone(), u64::from(ports::COM1), 8)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone(), None))),
        u64::from(ports::I8042_DATA),
        5,
    )?;
    pio.insert(
        Arc::new(Mutex::new(Cmos::new(below_4g, above_4g))),
        u64::from(ports::CMOS),
        2,
    )?;
    let pm = AcpiPm::new(exit, acpi_ports::SLP_TYP_S5, acpi_ports::RESET_VALUE);
    pio.insert(
        Arc::new(Mutex::new(pm)),
        u64::from(acpi_ports::BLOCK_START),
        u64::from(acpi_ports::BLOCK_LEN),
    )?;
    Ok(LegacyDevices {
        pio: Arc::new(pio),
        serial,
        input_drained,
    })
}

/// The MMIO bus, with the RAM whose KVM slots are still being registered.
fn pending_ram_bus(
    mem: &GuestMemory,
    deferred: &[SlotSpec],
    progress: &Arc<DeferredSlots>,
) -> Result<Arc<Bus>, VmError> {
    let mmio = Bus::new();
    for (index, s) in deferred.iter().enumerate() {
        let pending = memory::PendingRam::new(mem.clone(), index, progress.clone());
        mmio.insert(Arc::new(Mutex::new(pending)), s.gpa, s.size)?;
    }
    Ok(Arc::new(mmio))
}

/// The PCI host bridge: configuration ports, ECAM and the BAR windows. No KVM calls: a VM
/// without devices starts as fast as before.
fn attach_pci_root(
    vm_fd: &Arc<VmFd>,
    mem: &GuestMemory,
    cfg: &VmConfig,
    phys_bits: u32,
    pio: &Bus,
    mmio: &Arc<Bus>,
) -> Result<DeviceManager, VmError> {
    Ok(DeviceManager::new(
        vm_fd.clone(),
        mem.clone(),
        cfg.memory,
        phys_bits,
        pio,
        mmio,
        cpuid::uses_x2apic_api(cfg.cpus),
    )?)
}

/// `--rng`: virtio-rng.
fn attach_rng(devices: &mut DeviceManager, cfg: &VmConfig) -> Result<(), VmError> {
    if let Some(r) = cfg.rng {
        devices.attach_virtio(Box::new(Rng::new()), r.transport)?;
    }
    Ok(())
}

/// `--disk`: virtio-blk, one device per disk.
fn attach_disks(devices: &mut DeviceManager, cfg: &VmConfig) -> Result<(), VmError> {
    for d in &cfg.disks {
        let params = BlockParams {
            readonly: d.readonly,
            serial: d.serial.clone(),
            direct: d.direct,
            queues: d.queues,
            format: d.format.map(|f| match f {
                DiskFormat::Raw => ImageFormat::Raw,
                DiskFormat::Qcow2 => ImageFormat::Qcow2,
            }),
            poll_us: d.poll_us,
            ..BlockParams::new(&d.path)
        };
        let blk = Block::new(params).map_err(|source| VmError::Disk {
            path: d.path.clone(),
            source,
        })?;
        devices.attach_virtio(Box::new(blk), d.transport)?;
    }
    Ok(())
}

/// `--net`: virtio-net, one device per tap.
fn attach_nets(devices: &mut DeviceManager, cfg: &VmConfig) -> Result<(), VmError> {
    for n in &cfg.nets {
        let params = NetParams {
            mac: n.mac.map(|m| m.0),
            queues: n.queues,
            ..NetParams::new(n.tap.clone())
        };
        let net = Net::new(params).map_err(|source| VmError::Net {
            tap: n.tap.clone(),
            source,
        })?;
        devices.attach_virtio(Box::new(net), n.transport)?;
    }
    Ok(())
}

/// `--console`: virtio-console with one port.
fn attach_console(devices: &mut DeviceManager, cfg: &VmConfig) -> Result<(), VmError> {
    let Some(c) = &cfg.console else { return Ok(()) };
    let backend = match &c.target {
        ConsoleTarget::Stdio => ConsoleBackend::Stdio,
        ConsoleTarget::File(p) => ConsoleBackend::File(p.clone()),
        ConsoleTarget::Socket(p) => ConsoleBackend::Socket(p.clone()),
    };
    let console = Console::new(ConsoleParams::new(backend)).map_err(VmError::Console)?;
    devices.attach_virtio(Box::new(console), c.transport)?;
    Ok(())
}

/// Loads the kernel and initrd, writes the command line, ACPI tables and both boot
/// protocols' information, and picks the entry point.
fn load_guest(
    mem: &GuestMemory,
    cfg: &VmConfig,
    devices: &DeviceManager,
) -> Result<EntryPoint, VmError> {
    let kernel = loader::load_kernel(mem, &cfg.kernel, true)?;
    log::debug!("kernel loaded: {kernel:?}");
    let initrd = match &cfg.initrd {
        Some(p) => Some(loader::load_initrd(mem, p, &kernel)?),
        None => None,
    };
    let mut cmdline = cfg.cmdline.clone();
    for word in devices.cmdline_additions() {
        cmdline.push(' ');
        cmdline.push_str(word);
    }
    let cmdline_len = boot::write_cmdline(mem, &cmdline)?;
    let rsdp = acpi::write_tables(
        mem,
        &AcpiConfig {
            cpus: cfg.cpus,
            pci: Some(devices.pci_host()),
        },
    )?;
    let e820 = e820::e820_map(cfg.memory);
    let info = BootInfo {
        e820: &e820,
        cmdline_len,
        rsdp,
        initrd,
    };
    let zero_page = boot::write_zero_page(mem, &info, kernel.setup_header)?;
    let start_info = boot::write_pvh_start_info(mem, &info)?;
    Ok(match (cfg.entry, kernel.pvh_entry) {
        (BootEntry::Pvh, None) => {
            return Err(LoaderError::NoPvh {
                path: cfg.kernel.clone(),
            }
            .into())
        }
        (BootEntry::Pvh, Some(addr)) => EntryPoint::Pvh { addr, start_info },
        (BootEntry::Auto, Some(addr)) if kernel.kind == KernelKind::Elf => {
            EntryPoint::Pvh { addr, start_info }
        }
        _ => EntryPoint::Linux64 {
            addr: kernel.entry64,
            zero_page,
        },
    })
}

/// Creates and configures every vCPU (CPUID, MSRs, FPU, LAPIC; the boot vCPU's registers
/// for `entry`). They are started by the caller.
#[allow(clippy::too_many_arguments)]
fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    mem: &GuestMemory,
    cfg: &VmConfig,
    entry: EntryPoint,
    base_cpuid: &CpuId,
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
    events: &VmEvents,
) -> Result<Vec<Vcpu>, VmError> {
    vcpu::register_kick_handler().map_err(os_err("cannot install the vCPU kick signal handler"))?;
    // SAFETY: blocks the stop signals in this thread (inherited by vCPU threads) so that only
    // the VMM thread's signalfd sees them.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &stop_sigset(), std::ptr::null_mut()) };
    let msrs = Msrs::from_entries(&regs::boot_msrs())
        .map_err(|_| VmError::MissingCapability("room for boot MSRs"))?;
    let msr_indices: Arc<[u32]> = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .into();
    let mut vcpus = Vec::with_capacity(usize::try_from(cfg.cpus).unwrap_or_default());
    for id in 0..cfg.cpus {
        let fd = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut c = base_cpuid.clone();
        cpuid::configure(&mut c, id, cfg.cpus)?;
        fd.set_cpuid2(&c).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            log::debug!(
                "vCPU {id}: KVM took {set} of {} boot MSRs",
                msrs.as_slice().len()
            );
        }
        fd.set_fpu(&regs::boot_fpu())
            .map_err(kvm_err("KVM_SET_FPU"))?;
        let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        regs::set_lint(&mut lapic);
        fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        if id == 0 {
            let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            fd.set_sregs(&regs::boot_sregs(mem, entry, sregs)?)
                .map_err(kvm_err("KVM_SET_SREGS"))?;
            fd.set_regs(&regs::boot_regs(entry))
                .map_err(kvm_err("KVM_SET_REGS"))?;
        }
        vcpus.push(Vcpu::new(
            id,
            fd,
            msr_indices.clone(),
            pio.clone(),
            mmio.clone(),
            events.clone(),
        ));
    }
    Ok(vcpus)
}

/// RAM below and above 4 GiB.
fn split_memory(size: u64) -> (u64, u64) {
    if size <= MMIO_HOLE_START {
        (size, 0)
    } else {
        (MMIO_HOLE_START, size - MMIO_HOLE_START)
    }
}
