//! A running VM: its event loop ([`Vm::run`]: guest exits, vCPU errors, console input,
//! signals, and the resample events of level-triggered interrupt lines) and its lifecycle
//! (pause, resume, vCPU state). [`Vm::build`] lives in `builder.rs`.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use kiln_devices::legacy::SerialPort;
use kiln_devices::{bus, ExitRequest};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::console::{EscapeFilter, RawTerminal};
use crate::devices::{DeviceManager, DeviceStates};
use crate::error::{os_err, VmError};
use crate::events::VmEvent;
use crate::memory::{self, GuestMemory, MemoryError};
use crate::vcpu::{VcpuCommand, VcpuHandle};
use crate::vcpu_state::VcpuState;

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

const TOKEN_EVENTS: u64 = 1;
const TOKEN_STDIN: u64 = 2;
const TOKEN_DRAINED: u64 = 3;
const TOKEN_SIGNAL: u64 = 4;
/// Level-triggered line `i` of [`DeviceManager::level_irqs`] has token `TOKEN_RESAMPLE + i`.
const TOKEN_RESAMPLE: u64 = 0x1000;

/// Console input waiting to reach the guest.
pub(crate) struct ConsoleInput {
    pub(crate) fd: RawFd,
    pub(crate) raw: Option<RawTerminal>,
    pub(crate) escape: EscapeFilter,
    pub(crate) pending: VecDeque<u8>,
    pub(crate) drained: Arc<EventFd>,
    pub(crate) polling: bool,
}

/// A running VM.
pub struct Vm {
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) mem: GuestMemory,
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) devices: DeviceManager,
    pub(crate) events: Receiver<VmEvent>,
    pub(crate) wake: Arc<EventFd>,
    pub(crate) serial: Arc<Mutex<SerialPort>>,
    pub(crate) input: Option<ConsoleInput>,
    pub(crate) deferred: Arc<memory::DeferredSlots>,
    /// Events that arrived while waiting for pause or resume acknowledgements.
    pub(crate) backlog: VecDeque<VmEvent>,
    pub(crate) slot_thread: Option<std::thread::JoinHandle<Result<(), MemoryError>>>,
    pub(crate) _kvm: Kvm,
}

/// The signals kiln turns into an orderly stop.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

pub(crate) fn stop_sigset() -> libc::sigset_t {
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
    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Stops every vCPU and waits until all have acknowledged, then pauses the devices.
    pub fn pause(&mut self) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.send(VcpuCommand::Pause);
        }
        self.wait_for_all(|e| matches!(e, VmEvent::VcpuPaused(_)))?;
        Ok(self.devices.pause()?)
    }

    /// Resumes the devices, then lets every vCPU run again.
    pub fn resume(&mut self) -> Result<(), VmError> {
        self.devices.resume()?;
        for v in &self.vcpus {
            v.send(VcpuCommand::Resume);
        }
        self.wait_for_all(|e| matches!(e, VmEvent::VcpuResumed(_)))
    }

    /// The PCI root and virtio devices.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// The state of the PCI root and every virtio device; the VM must be paused.
    pub fn save_device_states(&self) -> Result<DeviceStates, VmError> {
        Ok(self.devices.save()?)
    }

    /// Loads device states (as [`Vm::save_device_states`] returned them, for a VM built
    /// from the same configuration); the VM must be paused.
    pub fn restore_device_states(&self, states: DeviceStates) -> Result<(), VmError> {
        Ok(self.devices.restore(states)?)
    }

    /// The in-kernel PICs, IOAPIC, PIT and kvm-clock base; the VM must be paused.
    pub fn save_chips(&self) -> Result<crate::chips::ChipsState, VmError> {
        Ok(crate::chips::save(&self.vm_fd)?)
    }

    /// Loads what [`Vm::save_chips`] returned (for a VM built from the same configuration),
    /// before the device states: those re-assert their pending interrupt lines into the
    /// loaded IOAPIC. The VM must be paused.
    pub fn restore_chips(&self, state: &crate::chips::ChipsState) -> Result<(), VmError> {
        Ok(crate::chips::restore(&self.vm_fd, state)?)
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
        self.devices.shutdown();
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
        // The guest EOI'd a level-triggered line and KVM lowered it: the device raises it
        // again if its interrupt is still pending. This thread is the one place that waits
        // on these eventfds; a line whose event waits here stays low, so serve it promptly.
        let level_irqs = self.devices.level_irqs().to_vec();
        for (i, irq) in (0u64..).zip(&level_irqs) {
            add(irq.line().resample_fd().as_raw_fd(), TOKEN_RESAMPLE + i)
                .map_err(os_err("epoll_ctl"))?;
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
                    t if t >= TOKEN_RESAMPLE => {
                        let irq = usize::try_from(t - TOKEN_RESAMPLE)
                            .ok()
                            .and_then(|i| level_irqs.get(i));
                        if let Some(Err(e)) = irq.map(|irq| irq.resample()) {
                            kiln_devices::warn_ratelimited!("interrupt line resample: {e}");
                        }
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

/// Builds and runs a VM to completion.
pub fn run(cfg: &VmConfig) -> Result<VmOutcome, VmError> {
    Vm::build(cfg)?.run()
}
