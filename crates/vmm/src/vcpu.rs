//! vCPU threads: one per vCPU, each an explicit state machine (running, paused, exited)
//! driven by [`VcpuCommand`] messages. A command is delivered with a signal that kicks the
//! vCPU out of `KVM_RUN` (the handler sets `immediate_exit`, so a kick that lands just
//! before `KVM_RUN` is not lost).

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use kiln_devices::{Bus, ExitRequest};
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::events::{VmEvent, VmEvents};

/// Messages to a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Stop running guest code and wait.
    Pause,
    /// Run guest code again.
    Resume,
    /// Leave the thread.
    Exit,
}

/// Where a vCPU thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// In or around `KVM_RUN`.
    Running,
    /// Waiting for a command; its state may be read.
    Paused,
    /// Done.
    Exited,
}

/// Why a vCPU stopped on its own.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VcpuStop {
    /// `KVM_EXIT_SHUTDOWN`: a triple fault.
    #[error("vCPU {id}: the guest triple-faulted (KVM_EXIT_SHUTDOWN) at rip={rip:#x}")]
    TripleFault {
        /// vCPU.
        id: u32,
        /// Where.
        rip: u64,
    },
    /// `KVM_EXIT_INTERNAL_ERROR`.
    #[error("vCPU {id}: KVM internal error, suberror {suberror} (1 = instruction emulation failed), rip={rip:#x}, data {data:x?}")]
    InternalError {
        /// vCPU.
        id: u32,
        /// KVM's suberror code.
        suberror: u32,
        /// Extra words KVM gave.
        data: Vec<u64>,
        /// Where.
        rip: u64,
    },
    /// `KVM_EXIT_FAIL_ENTRY`.
    #[error("vCPU {id}: KVM could not enter the guest, hardware reason {reason:#x}")]
    FailEntry {
        /// vCPU.
        id: u32,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// `KVM_SYSTEM_EVENT_CRASH` or another system event kiln does not handle.
    #[error("vCPU {id}: guest system event {kind}")]
    SystemEvent {
        /// vCPU.
        id: u32,
        /// Event type.
        kind: u32,
    },
    /// An exit kiln does not handle.
    #[error("vCPU {id}: unexpected exit {exit}")]
    Unexpected {
        /// vCPU.
        id: u32,
        /// The exit, as debug text.
        exit: String,
    },
    /// `KVM_RUN` failed.
    #[error("vCPU {id}: KVM_RUN failed: {message}")]
    RunFailed {
        /// vCPU.
        id: u32,
        /// The error.
        message: String,
    },
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping; it is set while the
        // VcpuFd that owns the mapping is alive on this thread and cleared before it is
        // dropped. A volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The signal that kicks vCPUs.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler; call once before starting vCPUs.
pub fn register_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// A vCPU and what it needs to handle exits.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: VmEvents,
}

/// The VM's handle on a vCPU thread.
pub struct VcpuHandle {
    id: u32,
    tx: Sender<VcpuCommand>,
    thread: Option<JoinHandle<VcpuFd>>,
}

impl VcpuHandle {
    /// The vCPU's index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends `cmd` and kicks the thread out of `KVM_RUN`.
    pub fn send(&self, cmd: VcpuCommand) {
        if self.tx.send(cmd).is_err() {
            return; // the thread already left
        }
        if let Some(t) = &self.thread {
            if !t.is_finished() {
                let _ = t.kill(kick_signal());
            }
        }
    }

    /// Waits for the thread to end and returns its vCPU fd.
    pub fn join(mut self) -> Option<VcpuFd> {
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Vcpu {
    /// A vCPU that will dispatch port I/O to `pio` and MMIO to `mmio`.
    pub fn new(id: u32, fd: VcpuFd, pio: Arc<Bus>, mmio: Arc<Bus>, events: VmEvents) -> Self {
        Self {
            id,
            fd,
            pio,
            mmio,
            events,
        }
    }

    /// Starts the thread, running (or paused, if `paused`).
    pub fn start(self, paused: bool) -> std::io::Result<VcpuHandle> {
        let (tx, rx) = channel();
        let id = self.id;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .stack_size(256 << 10)
            .spawn(move || self.run(rx, paused))?;
        Ok(VcpuHandle {
            id,
            tx,
            thread: Some(thread),
        })
    }

    fn run(mut self, rx: Receiver<VcpuCommand>, paused: bool) -> VcpuFd {
        KVM_RUN.with(|c| c.set(self.fd.get_kvm_run()));
        let mut state = if paused {
            VcpuState::Paused
        } else {
            VcpuState::Running
        };
        if paused {
            self.events.send(VmEvent::VcpuPaused(self.id));
        }
        while state != VcpuState::Exited {
            state = match state {
                VcpuState::Running => {
                    let mut next = VcpuState::Running;
                    while let Ok(cmd) = rx.try_recv() {
                        next = self.transition(next, cmd);
                    }
                    if next == VcpuState::Running {
                        self.run_once()
                    } else {
                        next
                    }
                }
                VcpuState::Paused => match rx.recv() {
                    Ok(cmd) => self.transition(VcpuState::Paused, cmd),
                    Err(_) => VcpuState::Exited,
                },
                VcpuState::Exited => VcpuState::Exited,
            };
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        self.fd
    }

    fn transition(&self, from: VcpuState, cmd: VcpuCommand) -> VcpuState {
        match (from, cmd) {
            (_, VcpuCommand::Exit) => VcpuState::Exited,
            (VcpuState::Running, VcpuCommand::Pause) | (VcpuState::Paused, VcpuCommand::Pause) => {
                self.events.send(VmEvent::VcpuPaused(self.id));
                VcpuState::Paused
            }
            (VcpuState::Paused, VcpuCommand::Resume) => {
                self.events.send(VmEvent::VcpuResumed(self.id));
                VcpuState::Running
            }
            (s, VcpuCommand::Resume) => s,
            (VcpuState::Exited, _) => VcpuState::Exited,
        }
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map_or(0, |r| r.rip)
    }

    fn stop(&self, reason: VcpuStop) -> VcpuState {
        self.events.send(VmEvent::VcpuStopped(reason));
        VcpuState::Exited
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn run_once(&mut self) -> VcpuState {
        let id = self.id;
        let run_ptr = KVM_RUN.with(Cell::get);
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                // SAFETY: run_ptr is this vCPU's live kvm_run; for an I/O exit its `io`
                // member is the active one, and we only read its size field.
                let size = usize::from(unsafe { (*run_ptr).__bindgen_anon_1.io.size }).max(1);
                for chunk in data.chunks(size) {
                    self.pio.write(u64::from(port), chunk);
                }
                VcpuState::Running
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                // SAFETY: as above.
                let size = usize::from(unsafe { (*run_ptr).__bindgen_anon_1.io.size }).max(1);
                for chunk in data.chunks_mut(size) {
                    if !self.pio.read(u64::from(port), chunk) {
                        chunk.fill(0xff);
                    }
                }
                VcpuState::Running
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                VcpuState::Running
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio.write(addr, data);
                VcpuState::Running
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => {
                VcpuState::Running
            }
            Ok(VcpuExit::Shutdown) => {
                let rip = self.rip();
                self.stop(VcpuStop::TripleFault { id, rip })
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    self.events.send(VmEvent::Exit(ExitRequest::PowerOff));
                    VcpuState::Running
                }
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    self.events.send(VmEvent::Exit(ExitRequest::Reset));
                    VcpuState::Running
                }
                _ => self.stop(VcpuStop::SystemEvent { id, kind }),
            },
            Ok(VcpuExit::InternalError) => {
                // SAFETY: for KVM_EXIT_INTERNAL_ERROR the `internal` member is the active one.
                let internal = unsafe { (*run_ptr).__bindgen_anon_1.internal };
                let n = usize::try_from(internal.ndata)
                    .unwrap_or(0)
                    .min(internal.data.len());
                let data = internal.data[..n].to_vec();
                let rip = self.rip();
                self.stop(VcpuStop::InternalError {
                    id,
                    suberror: internal.suberror,
                    data,
                    rip,
                })
            }
            Ok(VcpuExit::FailEntry(reason, _)) => self.stop(VcpuStop::FailEntry { id, reason }),
            Ok(other) => {
                let exit = format!("{other:?}");
                self.stop(VcpuStop::Unexpected { id, exit })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                VcpuState::Running
            }
            Err(e) => self.stop(VcpuStop::RunFailed {
                id,
                message: e.to_string(),
            }),
        }
    }
}
