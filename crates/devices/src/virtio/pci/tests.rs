use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::*;
use crate::hooks::testing::Recorder;
use crate::pci::config::{command, reg};
use crate::virtio::features;
use crate::virtio::status as st;
use crate::virtio::transport::testing::{fake, memory, FakeLog};
use vmm_sys_util::eventfd::EventFd;

struct Dev {
    pci: VirtioPci,
    log: Arc<Mutex<FakeLog>>,
    hooks: Arc<Recorder>,
}

fn dev() -> Dev {
    dev_with(None)
}

fn dev_with(intx: Option<(LevelIrqLine, u8)>) -> Dev {
    let (d, log) = fake();
    let hooks = Arc::new(Recorder::default());
    let mut pci = VirtioPci::new(d, memory(), hooks.clone(), hooks.clone(), intx).unwrap();
    pci.config_mut().set_bar_address(0, 0xc000_0000);
    pci.bar_moved(0, Some(0xc000_0000));
    pci.write_config(reg::COMMAND, &command::MEMORY.to_le_bytes());
    Dev { pci, log, hooks }
}

impl Dev {
    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.pci.read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, len: usize, v: u64) {
        self.pci.write_bar(0, off, &v.to_le_bytes()[..len]);
    }
    fn cfg(&mut self, off: usize, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.pci.read_config(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    /// Negotiates VERSION_1 and sets queue 0 up with `vector`, then DRIVER_OK.
    fn bring_up(&mut self, vector: u16) {
        self.w(0x14, 1, u64::from(st::ACKNOWLEDGE | st::DRIVER));
        self.w(0x08, 4, 1);
        self.w(0x0c, 4, 1); // VERSION_1 is bit 32
        self.w(
            0x14,
            1,
            u64::from(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK),
        );
        self.w(0x16, 2, 0);
        self.w(0x18, 2, 64);
        self.w(0x1a, 2, u64::from(vector));
        self.w(0x20, 8, 0x1000);
        self.w(0x28, 4, 0x2000);
        self.w(0x2c, 4, 0);
        self.w(0x30, 8, 0x3000);
        self.w(0x1c, 2, 1);
        self.w(
            0x14,
            1,
            u64::from(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK),
        );
    }
}

#[test]
fn header_identifies_a_modern_virtio_device() {
    let mut d = dev();
    assert_eq!(d.cfg(0, 4), 0x1044_1af4);
    assert_eq!(d.cfg(reg::REVISION, 1), 1);
    assert_eq!(d.cfg(reg::SUBSYSTEM_ID, 2), 0x40);
    assert_eq!(d.cfg(reg::BAR0, 4), 0xc000_0004, "64-bit memory BAR");
}

#[test]
fn capability_list_has_every_virtio_structure_and_msix() {
    let mut d = dev();
    let mut at = usize::try_from(d.cfg(reg::CAP_PTR, 1)).unwrap();
    let mut seen = vec![];
    while at != 0 {
        let id = d.cfg(at, 1);
        if id == 0x09 {
            let kind = d.cfg(at + 3, 1);
            let bar = d.cfg(at + 4, 1);
            let offset = d.cfg(at + 8, 4);
            let len = d.cfg(at + 12, 4);
            seen.push((kind, bar, offset, len));
            if kind == 2 {
                assert_eq!(d.cfg(at + 16, 4), 4, "notify multiplier");
            }
        } else {
            assert_eq!(id, 0x11);
            assert_eq!(d.cfg(at + 2, 2), 2, "3 vectors: 2 queues + config");
            assert_eq!(d.cfg(at + 4, 4), 0x4000);
            assert_eq!(d.cfg(at + 8, 4), 0x5000);
        }
        at = usize::try_from(d.cfg(at + 1, 1)).unwrap();
    }
    assert_eq!(
        seen,
        vec![
            (1, 0, 0x0000, 0x1000),
            (2, 0, 0x3000, 0x1000),
            (3, 0, 0x1000, 0x1000),
            (4, 0, 0x2000, 0x1000),
            (5, 0, 0, 0),
        ]
    );
}

#[test]
fn driver_brings_the_device_up_through_common_config() {
    let mut d = dev();
    assert_eq!(d.r(0x12, 2), 2, "num_queues");
    d.w(0x16, 2, 1);
    assert_eq!(d.r(0x18, 2), 16, "queue 1 max size");
    assert_eq!(d.r(0x1e, 2), 1, "queue 1 notify offset");
    d.w(0x00, 4, 1);
    assert_eq!(d.r(0x04, 4), 1, "VERSION_1 in the high word");
    d.bring_up(0);
    assert_eq!(d.r(0x14, 1), 0xf);
    d.w(0x16, 2, 0);
    assert_eq!(d.r(0x20, 8), 0x1000);
    assert_eq!(d.r(0x28, 4), 0x2000);
    assert_eq!(d.r(0x1c, 2), 1);
    let log = d.log.lock().unwrap();
    assert_eq!(
        log.activations,
        vec![(features::VERSION_1, vec![(0, 64, 0x1000)])]
    );
}

#[test]
fn queue_interrupt_goes_to_its_msix_vector_or_pends_while_masked() {
    let mut d = dev();
    d.bring_up(1);
    assert_eq!(d.r(0x1a, 2), 1);
    // Vector 1 programmed and unmasked, MSI-X enabled.
    d.w(0x4000 + 16, 4, 0xfee0_0000);
    d.w(0x4000 + 24, 4, 0x45);
    d.w(0x4000 + 28, 4, 0);
    let ctrl = d.pci.msix_cap + 2;
    d.pci
        .write_config(ctrl, &msix::CONTROL_ENABLE.to_le_bytes());
    let irq = d.log.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(InterruptKind::Queue(0)).unwrap();
    assert!(lock(&d.pci.msix).irqfd(1).unwrap().read().is_ok());
    // Function mask: pending bit instead.
    d.pci.write_config(
        ctrl,
        &(msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK).to_le_bytes(),
    );
    irq.trigger(InterruptKind::Queue(0)).unwrap();
    assert!(lock(&d.pci.msix).irqfd(1).unwrap().read().is_err());
    assert_eq!(d.r(0x5000, 8), 0b10);
    d.pci
        .write_config(ctrl, &msix::CONTROL_ENABLE.to_le_bytes());
    assert!(lock(&d.pci.msix).irqfd(1).unwrap().read().is_ok());
    assert_eq!(d.r(0x5000, 8), 0);
}

#[test]
fn without_a_vector_the_isr_records_the_interrupt_and_reading_clears_it() {
    let mut d = dev();
    d.bring_up(NO_VECTOR);
    let irq = d.log.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(InterruptKind::Queue(0)).unwrap();
    assert_eq!(d.r(0x1000, 1), 1);
    assert_eq!(d.r(0x1000, 1), 0);
}

fn efd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

/// A device with INTA# on GSI 17; the trigger eventfd to watch.
fn dev_with_intx() -> (Dev, EventFd) {
    let line = efd();
    let d = dev_with(Some((
        LevelIrqLine::new(line.try_clone().unwrap(), efd()),
        17,
    )));
    (d, line)
}

impl Dev {
    /// KVM lowered INTA# after the guest's EOI and signalled the resample eventfd: the
    /// transport's answer (whether it raised the line again).
    fn eoi(&self) -> bool {
        let intx = self.pci.intx().unwrap();
        intx.line().resample_fd().write(1).unwrap();
        intx.resample().unwrap()
    }
}

#[test]
fn without_msix_interrupts_assert_inta_unless_disabled() {
    let (mut d, line) = dev_with_intx();
    assert_eq!(d.cfg(reg::INTERRUPT_LINE, 2), 0x0111, "pin INTA#, line 17");
    d.bring_up(0);
    let irq = d.log.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(InterruptKind::Queue(0)).unwrap();
    assert_eq!(line.read().unwrap(), 1);
    assert_eq!(d.r(0x1000, 1), 1);
    // INTx disabled in the command register: the ISR only.
    let cmd = command::MEMORY | command::INTX_DISABLE;
    d.pci.write_config(reg::COMMAND, &cmd.to_le_bytes());
    irq.trigger(InterruptKind::Queue(0)).unwrap();
    assert!(line.read().is_err());
    assert_eq!(d.r(0x1000, 1), 1);
    // MSI-X on: the vector, never INTx (vector 0 is masked: pending).
    d.pci
        .write_config(reg::COMMAND, &command::MEMORY.to_le_bytes());
    let ctrl = d.pci.msix_cap + 2;
    d.pci
        .write_config(ctrl, &msix::CONTROL_ENABLE.to_le_bytes());
    irq.trigger(InterruptKind::Queue(0)).unwrap();
    assert!(line.read().is_err());
    assert_eq!(d.r(0x5000, 8), 1, "pending on vector 0");
}

#[test]
fn inta_is_raised_again_after_eoi_until_the_isr_is_read() {
    let (mut d, line) = dev_with_intx();
    d.bring_up(NO_VECTOR);
    let irq = d.log.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(InterruptKind::Queue(0)).unwrap();
    assert_eq!(line.read().unwrap(), 1);
    // The guest EOIs before reading the ISR: the interrupt is still pending.
    assert!(d.eoi());
    assert_eq!(line.read().unwrap(), 1, "raised again");
    // The lost-interrupt case: a second interrupt while the first is in service (the
    // line is already high, so KVM sees no new edge), the driver reads the ISR for the
    // first, then more work arrives before the EOI.
    irq.trigger(InterruptKind::Queue(0)).unwrap();
    assert_eq!(d.r(0x1000, 1), 1);
    irq.trigger(InterruptKind::Config).unwrap();
    assert_eq!(line.read().unwrap(), 2);
    assert!(d.eoi(), "the late interrupt is delivered after the EOI");
    assert_eq!(line.read().unwrap(), 1);
    // Reading the ISR acknowledges: after that EOI the line stays low.
    assert_eq!(d.r(0x1000, 1), 2);
    assert!(!d.eoi());
    assert!(line.read().is_err());
}

#[test]
fn inta_is_not_raised_again_while_masked_and_is_raised_once_unmasked() {
    let (mut d, line) = dev_with_intx();
    d.bring_up(NO_VECTOR);
    let irq = d.log.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(InterruptKind::Queue(0)).unwrap();
    assert_eq!(line.read().unwrap(), 1);
    let cmd = command::MEMORY | command::INTX_DISABLE;
    d.pci.write_config(reg::COMMAND, &cmd.to_le_bytes());
    assert!(!d.eoi(), "INTx disabled");
    assert!(line.read().is_err());
    // Enabling INTx with the ISR still set asserts the line, as on real hardware.
    d.pci
        .write_config(reg::COMMAND, &command::MEMORY.to_le_bytes());
    assert_eq!(line.read().unwrap(), 1);
    // Rewriting the command register with INTx already enabled does not raise it again.
    d.pci
        .write_config(reg::COMMAND, &command::MEMORY.to_le_bytes());
    assert!(line.read().is_err());
    // MSI-X on: INTA# is never asserted, even with ISR bits left over.
    let ctrl = d.pci.msix_cap + 2;
    d.pci
        .write_config(ctrl, &msix::CONTROL_ENABLE.to_le_bytes());
    assert!(!d.eoi());
    assert!(line.read().is_err());
}

#[test]
fn restoring_a_pending_isr_raises_inta() {
    let (mut d, _) = dev_with_intx();
    d.bring_up(NO_VECTOR);
    let irq = d.log.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(InterruptKind::Queue(0)).unwrap();
    d.pci.pause().unwrap();
    let s = d.pci.state().unwrap();
    assert_eq!(s.transport.isr, 1);
    let back: VirtioPciState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();

    let (mut e, line) = dev_with_intx();
    assert!(line.read().is_err());
    e.pci.restore(back).unwrap();
    assert_eq!(e.pci.state().unwrap(), s);
    assert!(line.read().is_ok(), "raised on restore");
    assert!(e.eoi(), "and kept up until the ISR is read");
    assert_eq!(e.r(0x1000, 1), 1);
    assert!(!e.eoi());
}

#[test]
fn vectors_past_the_table_read_back_as_no_vector() {
    let mut d = dev();
    d.w(0x10, 2, 3);
    assert_eq!(d.r(0x10, 2), u64::from(NO_VECTOR));
    d.w(0x10, 2, 2);
    assert_eq!(d.r(0x10, 2), 2);
}

#[test]
fn needs_reset_sets_the_status_bit_and_bumps_the_generation() {
    let mut d = dev();
    d.bring_up(NO_VECTOR);
    let gen = d.r(0x15, 1);
    let irq = d.log.lock().unwrap().interrupt.clone().unwrap();
    irq.needs_reset("test");
    assert_ne!(d.r(0x14, 1) & u64::from(st::DEVICE_NEEDS_RESET), 0);
    assert_ne!(d.r(0x15, 1), gen);
    assert_eq!(d.r(0x1000, 1), 2, "configuration interrupt in the ISR");
    d.w(0x14, 1, 0);
    assert_eq!(d.r(0x14, 1), 0);
    assert_eq!(d.log.lock().unwrap().resets, 1);
}

#[test]
fn notifications_follow_the_bar_and_reach_the_queue_eventfd() {
    let mut d = dev();
    let ev = |h: &Recorder| h.ioevents.lock().unwrap().clone();
    assert_eq!(
        ev(&d.hooks),
        vec![
            (IoEventAddress::Mmio(0xc000_3000), None),
            (IoEventAddress::Mmio(0xc000_3004), None)
        ]
    );
    d.pci.bar_moved(0, Some(0xd000_0000));
    assert_eq!(ev(&d.hooks)[0], (IoEventAddress::Mmio(0xd000_3000), None));
    assert_eq!(ev(&d.hooks).len(), 2);
    d.pci.bar_moved(0, None);
    assert!(ev(&d.hooks).is_empty());
    d.bring_up(NO_VECTOR);
    d.w(0x3000, 2, 0);
    let log = d.log.lock().unwrap();
    assert_eq!(log.notifies[0].read().unwrap(), 1, "userspace fallback");
}

#[test]
fn pci_cfg_capability_reaches_the_bar() {
    let mut d = dev();
    let cap = d.pci.cfg_cap;
    d.pci.write_config(cap + 4, &[0]);
    d.pci.write_config(cap + 8, &0x12u32.to_le_bytes());
    d.pci.write_config(cap + 12, &2u32.to_le_bytes());
    assert_eq!(d.cfg(cap + 16, 4), 2, "num_queues through the window");
    // A write through the window: device_feature_select.
    d.pci.write_config(cap + 8, &0u32.to_le_bytes());
    d.pci.write_config(cap + 12, &4u32.to_le_bytes());
    d.pci.write_config(cap + 16, &1u32.to_le_bytes());
    assert_eq!(d.pci.core.device_feature_select, 1);
    // A bad length or BAR does nothing.
    d.pci.write_config(cap + 12, &3u32.to_le_bytes());
    assert_eq!(d.cfg(cap + 16, 4), 0);
}

#[test]
fn device_config_is_the_devices() {
    let mut d = dev();
    assert_eq!(d.r(0x2000, 4), 0x0403_0201);
    d.w(0x2001, 1, 0xaa);
    assert_eq!(d.log.lock().unwrap().config[1], 0xaa);
}

#[test]
fn garbage_bar_and_config_writes_never_panic() {
    let mut d = dev();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..50_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = [1usize, 2, 4, 8][usize::try_from(x % 4).unwrap()];
        let off = (x >> 8) % 0x8000;
        let v = x >> 16;
        // Keep MSI-X off the router now and then, and never reset forever: plain chaos.
        d.w(off, len, v);
        let _ = d.r(off & !7, 8);
        let coff = usize::try_from((x >> 40) % 256).unwrap();
        d.pci.write_config(coff, &v.to_le_bytes()[..len.min(4)]);
    }
    assert_eq!(d.cfg(0, 4), 0x1044_1af4);
}

#[test]
fn state_round_trips() {
    let mut d = dev();
    d.bring_up(1);
    d.w(0x4000 + 16, 4, 0xfee0_0000);
    d.pci
        .write_config(d.pci.msix_cap + 2, &msix::CONTROL_ENABLE.to_le_bytes());
    d.pci.pause().unwrap();
    let s = d.pci.state().unwrap();
    let json = serde_json::to_string(&s).unwrap();
    let back: VirtioPciState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);

    let mut e = dev();
    e.pci.restore(back).unwrap();
    assert_eq!(e.pci.state().unwrap(), s);
    assert_eq!(e.r(0x14, 1), 0xf);
    assert_eq!(e.log.lock().unwrap().activations.len(), 1);
    assert!(lock(&e.pci.msix).enabled());
    assert_eq!(e.pci.vectors.queues[0].load(Ordering::Acquire), 1);
}
