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
use crate::vcpu_state::{self, VcpuState, VcpuStateError};

/// Messages to a vCPU thread.
#[derive(Debug)]
pub enum VcpuCommand {
    /// Stop running guest code and wait.
    Pause,
    /// Run guest code again.
    Resume,
    /// Leave the thread.
    Exit,
    /// Reply with the vCPU's state (only while paused).
    SaveState(Sender<Result<VcpuState, VcpuStateError>>),
    /// Load this state into the vCPU (only while paused).
    RestoreState(Box<VcpuState>, Sender<Result<(), VcpuStateError>>),
}

/// Where a vCPU thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
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
    msr_indices: Arc<[u32]>,
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

    /// The vCPU's state; the vCPU must be paused.
    pub fn save_state(&self) -> Result<VcpuState, VcpuStateError> {
        let (tx, rx) = channel();
        self.send(VcpuCommand::SaveState(tx));
        rx.recv().map_err(|_| VcpuStateError::Gone(self.id))?
    }

    /// Loads `state` into the vCPU; the vCPU must be paused.
    pub fn restore_state(&self, state: VcpuState) -> Result<(), VcpuStateError> {
        let (tx, rx) = channel();
        self.send(VcpuCommand::RestoreState(Box::new(state), tx));
        rx.recv().map_err(|_| VcpuStateError::Gone(self.id))?
    }

    /// Waits for the thread to end and returns its vCPU fd.
    pub fn join(mut self) -> Option<VcpuFd> {
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Vcpu {
    /// A vCPU that will dispatch port I/O to `pio` and MMIO to `mmio`.
    pub fn new(
        id: u32,
        fd: VcpuFd,
        msr_indices: Arc<[u32]>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        events: VmEvents,
    ) -> Self {
        Self {
            id,
            fd,
            msr_indices,
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
            RunState::Paused
        } else {
            RunState::Running
        };
        if paused {
            self.events.send(VmEvent::VcpuPaused(self.id));
        }
        while state != RunState::Exited {
            state = match state {
                RunState::Running => {
                    let mut next = RunState::Running;
                    while let Ok(cmd) = rx.try_recv() {
                        next = self.transition(next, cmd);
                    }
                    if next != RunState::Running {
                        next
                    } else if self.events.stopping() {
                        // The VM is ending: no more guest code; wait for the exit command.
                        match rx.recv() {
                            Ok(cmd) => self.transition(RunState::Paused, cmd),
                            Err(_) => RunState::Exited,
                        }
                    } else {
                        self.run_once()
                    }
                }
                RunState::Paused => match rx.recv() {
                    Ok(cmd) => self.transition(RunState::Paused, cmd),
                    Err(_) => RunState::Exited,
                },
                RunState::Exited => RunState::Exited,
            };
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        self.fd
    }

    fn transition(&self, from: RunState, cmd: VcpuCommand) -> RunState {
        match (from, cmd) {
            (_, VcpuCommand::Exit) => RunState::Exited,
            (RunState::Running, VcpuCommand::Pause) | (RunState::Paused, VcpuCommand::Pause) => {
                self.events.send(VmEvent::VcpuPaused(self.id));
                RunState::Paused
            }
            (RunState::Paused, VcpuCommand::Resume) => {
                self.events.send(VmEvent::VcpuResumed(self.id));
                RunState::Running
            }
            (s, VcpuCommand::Resume) => s,
            (RunState::Paused, VcpuCommand::SaveState(reply)) => {
                let _ = reply.send(vcpu_state::save(&self.fd, self.id, &self.msr_indices));
                RunState::Paused
            }
            (RunState::Paused, VcpuCommand::RestoreState(state, reply)) => {
                let _ = reply.send(vcpu_state::restore(&self.fd, &state));
                RunState::Paused
            }
            (s, VcpuCommand::SaveState(reply)) => {
                let _ = reply.send(Err(VcpuStateError::NotPaused(self.id)));
                s
            }
            (s, VcpuCommand::RestoreState(_, reply)) => {
                let _ = reply.send(Err(VcpuStateError::NotPaused(self.id)));
                s
            }
            (RunState::Exited, _) => RunState::Exited,
        }
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map_or(0, |r| r.rip)
    }

    fn stop(&self, reason: VcpuStop) -> RunState {
        self.events.send(VmEvent::VcpuStopped(reason));
        RunState::Exited
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn run_once(&mut self) -> RunState {
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
                RunState::Running
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                // SAFETY: as above.
                let size = usize::from(unsafe { (*run_ptr).__bindgen_anon_1.io.size }).max(1);
                for chunk in data.chunks_mut(size) {
                    if !self.pio.read(u64::from(port), chunk) {
                        chunk.fill(0xff);
                    }
                }
                RunState::Running
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                RunState::Running
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio.write(addr, data);
                RunState::Running
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => {
                RunState::Running
            }
            Ok(VcpuExit::Shutdown) => {
                let rip = self.rip();
                self.stop(VcpuStop::TripleFault { id, rip })
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    self.events.send(VmEvent::Exit(ExitRequest::PowerOff));
                    RunState::Running
                }
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    self.events.send(VmEvent::Exit(ExitRequest::Reset));
                    RunState::Running
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
                RunState::Running
            }
            Err(e) => self.stop(VcpuStop::RunFailed {
                id,
                message: e.to_string(),
            }),
        }
    }
}
