//! Building a VM from a [`VmConfig`] and running it until the guest powers off.
//!
//! [`Vm::build`] is the one linear recipe: KVM, memory, devices, kernel, boot tables,
//! vCPUs. It starts the vCPUs as its last step, so the guest's first instruction runs before
//! any work that is not needed for it. [`Vm::run`] then serves the event loop: guest exits,
//! vCPU errors, console input and signals.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use kiln_arch::acpi::{self, AcpiConfig};
use kiln_arch::boot::{self, BootInfo};
use kiln_arch::layout::{acpi_ports, ports, KVM_TSS_ADDR, MMIO_HOLE_START};
use kiln_arch::regs::{self, EntryPoint};
use kiln_arch::{cpuid, e820};
use kiln_devices::legacy::{AcpiPm, Cmos, SerialPort, I8042};
use kiln_devices::{bus, Bus, ExitRequest, IrqLine, SharedExitHandle};
use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{BootEntry, SerialConfig, VmConfig};
use crate::console::{EscapeFilter, FdWriter, RawTerminal};
use crate::events::{VmEvent, VmEvents};
use crate::loader::{self, LoaderError};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::vcpu::{self, Vcpu, VcpuCommand, VcpuHandle, VcpuStop};
use crate::vcpu_state::{VcpuState, VcpuStateError};

/// How a VM run ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset (reboot).
    Reset,
    /// The user typed the console escape (Ctrl-A x).
    Quit,
    /// kiln received this signal.
    Signal(i32),
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device cannot be used.
    #[error("cannot open {path} ({source}): kiln needs KVM: load the kvm module and make {path} readable and writable by this user")]
    KvmUnavailable {
        /// The device path (`/dev/kvm`, or `KILN_KVM_DEVICE`).
        path: String,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM lacks something kiln needs.
    #[error("KVM on this host lacks {0}")]
    MissingCapability(&'static str),
    /// A KVM call failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// The call.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// More vCPUs than KVM allows.
    #[error("--cpus {asked}: KVM on this host allows at most {max} vCPUs")]
    TooManyCpus {
        /// Asked.
        asked: u32,
        /// KVM's limit.
        max: usize,
    },
    /// More RAM than the host can address.
    #[error("--memory {memory}: guest RAM would end at {end:#x}, beyond this host's {bits}-bit physical address space")]
    MemoryBeyondPhysBits {
        /// Memory size as given.
        memory: crate::config::MemorySize,
        /// End of guest RAM.
        end: u64,
        /// Host physical address bits.
        bits: u32,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel or initrd.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Boot information.
    #[error(transparent)]
    BootInfo(#[from] boot::BootInfoError),
    /// Boot registers.
    #[error(transparent)]
    BootRegs(#[from] regs::BootWriteError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// CPUID.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// Device wiring.
    #[error("device setup: {0}")]
    Bus(#[from] kiln_devices::BusError),
    /// The serial output file.
    #[error("cannot open serial output file {path}")]
    SerialFile {
        /// File.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An OS call failed.
    #[error("{what}")]
    Os {
        /// What kiln was doing.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU stopped on an error.
    #[error(transparent)]
    Vcpu(#[from] VcpuStop),
    /// vCPU state could not be read or written.
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    /// Saved state does not fit this VM.
    #[error("saved state does not fit this VM: {0}")]
    StateMismatch(String),
    /// vCPUs did not acknowledge a pause or resume.
    #[error("{0} vCPUs did not acknowledge within 10 s")]
    VcpuTimeout(usize),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn os_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Os { what, source }
}

const TOKEN_EVENTS: u64 = 1;
const TOKEN_STDIN: u64 = 2;
const TOKEN_DRAINED: u64 = 3;
const TOKEN_SIGNAL: u64 = 4;

/// Console input waiting to reach the guest.
struct ConsoleInput {
    fd: RawFd,
    raw: Option<RawTerminal>,
    escape: EscapeFilter,
    pending: VecDeque<u8>,
    drained: Arc<EventFd>,
    polling: bool,
}

/// A running VM.
pub struct Vm {
    vm_fd: Arc<VmFd>,
    mem: GuestMemory,
    vcpus: Vec<VcpuHandle>,
    events: Receiver<VmEvent>,
    wake: Arc<EventFd>,
    serial: Arc<Mutex<SerialPort>>,
    input: Option<ConsoleInput>,
    deferred: Arc<memory::DeferredSlots>,
    /// Events that arrived while waiting for pause or resume acknowledgements.
    backlog: VecDeque<VmEvent>,
    slot_thread: Option<std::thread::JoinHandle<Result<(), MemoryError>>>,
    _kvm: Kvm,
}

/// The signals kiln turns into an orderly stop.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn stop_sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset adds valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

impl Vm {
    /// Builds the VM described by `cfg` and starts its vCPUs.
    pub fn build(cfg: &VmConfig) -> Result<Vm, VmError> {
        let kvm = open_kvm()?;
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
        let max_cpus = kvm.get_max_vcpus();
        if usize::try_from(cfg.cpus).unwrap_or(usize::MAX) > max_cpus {
            return Err(VmError::TooManyCpus {
                asked: cfg.cpus,
                max: max_cpus,
            });
        }
        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let phys_bits = base_cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .map_or(36, |e| e.eax & 0xff);
        let ram_end = kiln_arch::layout::ram_ranges(cfg.memory)
            .last()
            .map_or(0, |(s, l)| s + l);
        if phys_bits < 64 && ram_end > 1u64 << phys_bits {
            return Err(VmError::MemoryBeyondPhysBits {
                memory: crate::config::MemorySize(cfg.memory),
                end: ram_end,
                bits: phys_bits,
            });
        }

        memory::check_tracking_fits(cfg.memory, memory::host_available_memory())?;

        log::debug!("creating the VM");
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(usize::try_from(KVM_TSS_ADDR).unwrap_or_default())
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        log::debug!("VM created");
        let mem = memory::create_guest_memory(cfg.memory)?;
        let max_slots = usize::try_from(kvm.check_extension_int(Cap::NrMemslots)).unwrap_or(32);
        let (now, deferred): (Vec<_>, Vec<_>) = memory::slots(&mem, max_slots)
            .into_iter()
            .partition(|s| s.gpa < memory::SYNC_SLOT_LIMIT);
        for slot in now {
            memory::register_slot(&vm_fd, slot)?;
        }
        let deferred_progress = Arc::new(memory::DeferredSlots::default());
        // The irqchip after the memory: registering the first memory slot right after
        // creating the irqchip waits out an SRCU grace period (milliseconds).
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        if cfg.cpus > 254 {
            if !kvm.check_extension(Cap::X2ApicApi) {
                return Err(VmError::MissingCapability(
                    "KVM_CAP_X2APIC_API, needed above 254 vCPUs",
                ));
            }
            let cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_X2APIC_API,
                args: [
                    u64::from(
                        kvm_bindings::KVM_X2APIC_API_USE_32BIT_IDS
                            | kvm_bindings::KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK,
                    ),
                    0,
                    0,
                    0,
                ],
                ..Default::default()
            };
            vm_fd
                .enable_cap(&cap)
                .map_err(kvm_err("KVM_ENABLE_CAP(X2APIC_API)"))?;
        }

        log::debug!("memory, irqchip and PIT ready");

        // Events, devices and buses.
        let (events, events_rx, wake) =
            VmEvents::new().map_err(os_err("cannot create an eventfd"))?;
        let exit: SharedExitHandle = Arc::new(events.clone());
        let drained =
            Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("cannot create an eventfd"))?);
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
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("cannot create an eventfd"))?;
        vm_fd
            .register_irqfd(&serial_irq, ports::COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let serial = Arc::new(Mutex::new(SerialPort::new(
            IrqLine::new(serial_irq),
            Some(drained.clone()),
            serial_out,
        )));
        let (below_4g, above_4g) = split_memory(cfg.memory);
        let mut pio = Bus::new();
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
        pio.insert(
            Arc::new(Mutex::new(AcpiPm::new(
                exit,
                acpi_ports::SLP_TYP_S5,
                acpi_ports::RESET_VALUE,
            ))),
            u64::from(acpi_ports::BLOCK_START),
            u64::from(acpi_ports::BLOCK_LEN),
        )?;
        let pio = Arc::new(pio);
        let mut mmio = Bus::new();
        for (index, s) in deferred.iter().enumerate() {
            let pending = memory::PendingRam::new(mem.clone(), index, deferred_progress.clone());
            mmio.insert(Arc::new(Mutex::new(pending)), s.gpa, s.size)?;
        }
        let mmio = Arc::new(mmio);

        // Kernel, initrd and what the kernel is told.
        let kernel = loader::load_kernel(&mem, &cfg.kernel, true)?;
        log::debug!("kernel loaded: {kernel:?}");
        let initrd = match &cfg.initrd {
            Some(p) => Some(loader::load_initrd(&mem, p, &kernel)?),
            None => None,
        };
        let cmdline_len = boot::write_cmdline(&mem, &cfg.cmdline)?;
        let rsdp = acpi::write_tables(&mem, &AcpiConfig { cpus: cfg.cpus })?;
        let e820 = e820::e820_map(cfg.memory);
        let info = BootInfo {
            e820: &e820,
            cmdline_len,
            rsdp,
            initrd,
        };
        let zero_page = boot::write_zero_page(&mem, &info, kernel.setup_header)?;
        let start_info = boot::write_pvh_start_info(&mem, &info)?;
        let entry = match (cfg.entry, kernel.pvh_entry) {
            (BootEntry::Pvh, None) => {
                return Err(LoaderError::NoPvh {
                    path: cfg.kernel.clone(),
                }
                .into())
            }
            (BootEntry::Pvh, Some(addr)) => EntryPoint::Pvh { addr, start_info },
            (BootEntry::Auto, Some(addr)) if kernel.kind == loader::KernelKind::Elf => {
                EntryPoint::Pvh { addr, start_info }
            }
            _ => EntryPoint::Linux64 {
                addr: kernel.entry64,
                zero_page,
            },
        };
        log::debug!("entering the kernel through {entry:?}");

        // vCPUs: create and configure all, then start them (the boot vCPU first).
        vcpu::register_kick_handler()
            .map_err(os_err("cannot install the vCPU kick signal handler"))?;
        // SAFETY: blocks the stop signals in this thread (inherited by vCPU threads) so that
        // only the VMM thread's signalfd sees them.
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
                fd.set_sregs(&regs::boot_sregs(&mem, entry, sregs)?)
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
        let mut handles = Vec::with_capacity(vcpus.len());
        for v in vcpus {
            handles.push(
                v.start(false)
                    .map_err(os_err("cannot start a vCPU thread"))?,
            );
        }
        log::debug!("vCPUs started");
        let vm_fd = Arc::new(vm_fd);
        let slot_thread = if deferred.is_empty() {
            None
        } else {
            Some(
                memory::register_in_background(vm_fd.clone(), deferred, deferred_progress.clone())
                    .map_err(os_err("cannot start the memory slot thread"))?,
            )
        };

        let input = match cfg.serial {
            SerialConfig::Stdio => Some(ConsoleInput {
                fd: libc::STDIN_FILENO,
                raw: RawTerminal::enter(libc::STDIN_FILENO),
                escape: EscapeFilter::default(),
                pending: VecDeque::new(),
                drained,
                polling: false,
            }),
            _ => None,
        };
        Ok(Vm {
            vm_fd,
            mem,
            vcpus: handles,
            events: events_rx,
            wake,
            serial,
            input,
            deferred: deferred_progress,
            backlog: VecDeque::new(),
            slot_thread,
            _kvm: kvm,
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Stops every vCPU and waits until all have acknowledged.
    pub fn pause(&mut self) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.send(VcpuCommand::Pause);
        }
        self.wait_for_all(|e| matches!(e, VmEvent::VcpuPaused(_)))
    }

    /// Lets every vCPU run again.
    pub fn resume(&mut self) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.send(VcpuCommand::Resume);
        }
        self.wait_for_all(|e| matches!(e, VmEvent::VcpuResumed(_)))
    }

    /// The state of every vCPU; the VM must be paused.
    pub fn save_vcpu_states(&self) -> Result<Vec<VcpuState>, VmError> {
        self.vcpus
            .iter()
            .map(|v| v.save_state().map_err(VmError::from))
            .collect()
    }

    /// Loads vCPU states (one per vCPU, in order); the VM must be paused.
    pub fn restore_vcpu_states(&self, states: Vec<VcpuState>) -> Result<(), VmError> {
        if states.len() != self.vcpus.len() {
            return Err(VmError::StateMismatch(format!(
                "{} vCPU states for {} vCPUs",
                states.len(),
                self.vcpus.len()
            )));
        }
        for (v, s) in self.vcpus.iter().zip(states) {
            v.restore_state(s)?;
        }
        Ok(())
    }

    /// Waits until every vCPU sent an event matching `ack`; other events are kept for the
    /// event loop. A vCPU that stopped on an error ends the wait with that error.
    fn wait_for_all(&mut self, ack: impl Fn(&VmEvent) -> bool) -> Result<(), VmError> {
        let mut remaining = self.vcpus.len();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while remaining > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) if ack(&e) => remaining -= 1,
                Ok(VmEvent::VcpuStopped(stop)) => return Err(stop.into()),
                Ok(other) => self.backlog.push_back(other),
                Err(_) => return Err(VmError::VcpuTimeout(remaining)),
            }
        }
        Ok(())
    }

    /// Serves events until the guest powers off or resets, a vCPU fails, the user quits or a
    /// stop signal arrives; then stops every vCPU.
    pub fn run(mut self) -> Result<VmOutcome, VmError> {
        let result = self.event_loop();
        log::debug!("stopping: {result:?}");
        self.deferred.stop();
        for v in &self.vcpus {
            v.send(VcpuCommand::Exit);
        }
        for v in self.vcpus.drain(..) {
            v.join();
        }
        log::debug!("vCPUs joined");
        if let Some(input) = self.input.as_mut() {
            input.raw.take();
        }
        // A slot registration that failed is an error even if the guest never noticed.
        if let Some(t) = self.slot_thread.take() {
            if t.is_finished() {
                if let Ok(Err(e)) = t.join() {
                    return Err(e.into());
                }
            }
        }
        result
    }

    fn event_loop(&mut self) -> Result<VmOutcome, VmError> {
        let epoll = Epoll::new().map_err(os_err("cannot create an epoll instance"))?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(self.wake.as_raw_fd(), TOKEN_EVENTS).map_err(os_err("epoll_ctl"))?;
        // SAFETY: signalfd on a valid, initialised signal set, creating a new descriptor.
        let sigfd =
            unsafe { libc::signalfd(-1, &stop_sigset(), libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if sigfd < 0 {
            return Err(os_err("signalfd")(std::io::Error::last_os_error()));
        }
        // SAFETY: sigfd was just created and is owned here.
        let sigfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sigfd) };
        add(sigfd.as_raw_fd(), TOKEN_SIGNAL).map_err(os_err("epoll_ctl"))?;
        if let Some(input) = self.input.as_mut() {
            add(input.drained.as_raw_fd(), TOKEN_DRAINED).map_err(os_err("epoll_ctl"))?;
            // Files and /dev/null cannot be polled: then there is simply no input.
            input.polling = add(input.fd, TOKEN_STDIN).is_ok();
        }

        let mut ready = [EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(os_err("epoll_wait")(e)),
            };
            for ev in &ready[..n] {
                match ev.data() {
                    TOKEN_EVENTS => {
                        let _ = self.wake.read();
                        while let Some(e) = self
                            .backlog
                            .pop_front()
                            .or_else(|| self.events.try_recv().ok())
                        {
                            match e {
                                VmEvent::Exit(ExitRequest::PowerOff) => {
                                    return Ok(VmOutcome::PowerOff)
                                }
                                VmEvent::Exit(ExitRequest::Reset) => return Ok(VmOutcome::Reset),
                                VmEvent::VcpuStopped(stop) => return Err(stop.into()),
                                VmEvent::VcpuPaused(_) | VmEvent::VcpuResumed(_) => {}
                            }
                        }
                    }
                    TOKEN_SIGNAL => {
                        // SAFETY: reading one signalfd_siginfo into a zeroed buffer of its size.
                        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
                        let size = std::mem::size_of::<libc::signalfd_siginfo>();
                        // SAFETY: as above; `info` is writable for `size` bytes.
                        let got = unsafe {
                            libc::read(
                                sigfd.as_raw_fd(),
                                (&mut info as *mut libc::signalfd_siginfo).cast(),
                                size,
                            )
                        };
                        if usize::try_from(got).is_ok_and(|g| g == size) {
                            return Ok(VmOutcome::Signal(
                                i32::try_from(info.ssi_signo).unwrap_or(0),
                            ));
                        }
                    }
                    TOKEN_STDIN if self.read_console(&epoll)? => return Ok(VmOutcome::Quit),
                    TOKEN_DRAINED => {
                        if let Some(input) = self.input.as_mut() {
                            let _ = input.drained.read();
                        }
                        self.feed_console(&epoll);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Reads console input; returns true when the user asked to quit.
    fn read_console(&mut self, epoll: &Epoll) -> Result<bool, VmError> {
        let Some(input) = self.input.as_mut() else {
            return Ok(false);
        };
        let mut buf = [0u8; 256];
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::read(input.fd, buf.as_mut_ptr().cast(), buf.len()) };
        let n = match usize::try_from(n) {
            Ok(0) => {
                // End of input: stop polling it.
                let _ = epoll.ctl(ControlOperation::Delete, input.fd, EpollEvent::default());
                input.polling = false;
                return Ok(false);
            }
            Ok(n) => n,
            Err(_) => return Ok(false),
        };
        let mut bytes = Vec::with_capacity(n);
        if input.raw.is_some() {
            if input.escape.feed(&buf[..n], &mut bytes) {
                return Ok(true);
            }
        } else {
            bytes.extend_from_slice(&buf[..n]);
        }
        input.pending.extend(bytes);
        self.feed_console(epoll);
        Ok(false)
    }

    /// Moves pending input into the UART; stops reading stdin while the UART is full.
    fn feed_console(&mut self, epoll: &Epoll) {
        let Some(input) = self.input.as_mut() else {
            return;
        };
        if !input.pending.is_empty() {
            let chunk: Vec<u8> = input.pending.iter().copied().take(64).collect();
            let taken = bus::lock(&self.serial).enqueue_input(&chunk);
            input.pending.drain(..taken);
        }
        let want_stdin = input.pending.is_empty();
        if want_stdin != input.polling {
            let op = if want_stdin {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            if epoll
                .ctl(op, input.fd, EpollEvent::new(EventSet::IN, TOKEN_STDIN))
                .is_ok()
            {
                input.polling = want_stdin;
            }
        }
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

/// RAM below and above 4 GiB.
fn split_memory(size: u64) -> (u64, u64) {
    if size <= MMIO_HOLE_START {
        (size, 0)
    } else {
        (MMIO_HOLE_START, size - MMIO_HOLE_START)
    }
}

/// Builds and runs a VM to completion.
pub fn run(cfg: &VmConfig) -> Result<VmOutcome, VmError> {
    Vm::build(cfg)?.run()
}
