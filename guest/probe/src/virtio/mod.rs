//! Polling virtio drivers: the PCI transport (`pci`), split queues
//! (`queue`) and one module per device check.

pub mod blk;
pub mod blkbench;
pub mod console;
pub mod intx;
pub mod mmio;
pub mod msix;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
pub mod transport;

use core::fmt;

use crate::clock::Clock;
use crate::dma::Dma;
use crate::pci::{Bdf, Function, Pci};
use crate::reason;
use crate::util::Reason;

pub use queue::{Seg, Virtqueue};
pub use transport::{Regs, Transport};

pub const TYPE_NET: u16 = 1;
pub const TYPE_BLOCK: u16 = 2;
pub const TYPE_CONSOLE: u16 = 3;
pub const TYPE_RNG: u16 = 4;

pub const STATUS_ACK: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

pub fn type_name(t: u16) -> &'static str {
    match t {
        TYPE_NET => "net",
        TYPE_BLOCK => "blk",
        TYPE_CONSOLE => "console",
        TYPE_RNG => "rng",
        _ => "other",
    }
}

/// The virtio device type of a PCI function, if it is a virtio device:
/// 0x1040 + type (modern), or 0x1000..0x103f with the type in the subsystem id
/// (transitional).
pub fn device_type(f: &Function) -> Option<u16> {
    if f.vendor != 0x1af4 || f.header != 0 {
        return None;
    }
    match f.device {
        0x1040..=0x107f => Some(f.device - 0x1040),
        0x1000..=0x103f => Some(f.subsystem),
        _ => None,
    }
}

/// Which device: a PCI function or a virtio-mmio register block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevId {
    Pci(Bdf),
    Mmio(u64),
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DevId::Pci(bdf) => write!(f, "{bdf}"),
            DevId::Mmio(base) => write!(f, "mmio@{base:#x}"),
        }
    }
}

/// A virtio device found on PCI or announced for virtio-mmio.
#[derive(Clone, Copy, Debug)]
pub struct Dev {
    pub id: DevId,
    pub dev_type: u16,
    /// Its registers, or why they are unusable (reported when it is opened).
    pub regs: Result<Regs, Reason>,
}

pub const MAX_DEVS: usize = 32;

/// Every virtio device: PCI functions in bus order, then virtio-mmio devices
/// in command-line order.
pub struct Devs {
    list: [Option<Dev>; MAX_DEVS],
    n: usize,
}

impl Devs {
    pub fn new() -> Devs {
        Devs { list: [None; MAX_DEVS], n: 0 }
    }

    pub fn push(&mut self, d: Dev) {
        if self.n < MAX_DEVS {
            self.list[self.n] = Some(d);
            self.n += 1;
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &Dev> {
        self.list[..self.n].iter().flatten()
    }

    /// Devices of type `t`.
    pub fn of_type(&self, t: u16) -> impl Iterator<Item = &Dev> {
        self.all().filter(move |d| d.dev_type == t)
    }

    /// Adds every virtio function of `pci` (locating its structures).
    pub fn add_pci(&mut self, pci: &Pci) {
        for f in pci.functions() {
            if let Some(t) = device_type(f) {
                self.push(Dev { id: DevId::Pci(f.bdf), dev_type: t, regs: pci::regs(&pci.config, f) });
            }
        }
    }
}

impl Default for Devs {
    fn default() -> Self {
        Self::new()
    }
}

/// A device after the handshake, with its queues set up and DRIVER_OK.
pub struct Device<const Q: usize> {
    pub t: Transport,
    pub queues: [Virtqueue; Q],
}

/// The transport of `dev`, not yet initialised.
pub fn transport(dev: &Dev) -> Result<Transport, Reason> {
    Ok(Transport::new(dev.id, dev.dev_type, dev.regs?))
}

/// Initialises `dev`: features (`wanted` & offered), queues 0..Q of at most
/// `qsize` entries, DRIVER_OK.
pub fn open<const Q: usize>(
    dev: &Dev,
    wanted: u64,
    qsize: u16,
    dma: &mut Dma,
    clock: &Clock,
) -> Result<Device<Q>, Reason> {
    let mut t = transport(dev)?;
    t.init(wanted, clock)?;
    let mut err = None;
    let queues = core::array::from_fn(|i| {
        let index = u16::try_from(i).unwrap_or(u16::MAX);
        match t.setup_queue(index, qsize, dma) {
            Ok(q) => Some(q),
            Err(r) => {
                err.get_or_insert(r);
                None
            }
        }
    });
    if let Some(r) = err {
        return Err(r);
    }
    let queues = queues.map(|q: Option<Virtqueue>| q.expect("every queue was set up (checked above)"));
    t.driver_ok()?;
    Ok(Device { t, queues })
}

/// Polls queue `q` until a completion arrives, the device sets NEEDS_RESET,
/// or `ms` pass.
pub fn wait(t: &Transport, q: &mut Virtqueue, clock: &Clock, ms: u64) -> Result<(u16, u32), Reason> {
    let d = clock.deadline_ms(ms);
    let mut spins = 0u32;
    loop {
        if let Some(done) = q.poll()? {
            return Ok(done);
        }
        spins = spins.wrapping_add(1);
        // Reading the status is an exit: only now and then.
        if spins.is_multiple_of(4096) {
            if t.needs_reset() {
                return Err(reason!("{}: device set NEEDS_RESET (status {:#x})", t.id, t.status()));
            }
            if d.expired() {
                return Err(reason!("{}: queue {} gave no completion within {} ms", t.id, q.index, ms));
            }
        }
        core::hint::spin_loop();
    }
}

/// Posts one request on `q`, notifies, and waits for it (`ms` timeout).
/// Returns the bytes the device reports written.
pub fn request(t: &Transport, q: &mut Virtqueue, segs: &[Seg], clock: &Clock, ms: u64) -> Result<u32, Reason> {
    let head = q.add(segs).ok_or_else(|| reason!("{}: queue {} full", t.id, q.index))?;
    q.kick();
    let (id, len) = wait(t, q, clock, ms)?;
    if id != head {
        return Err(reason!("{}: completion for {} while only {} was posted", t.id, id, head));
    }
    Ok(len)
}
