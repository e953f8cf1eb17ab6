use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::hooks::testing::Recorder;
use crate::virtio::status as st;
use crate::virtio::transport::testing::{fake, memory, FakeLog};

const BASE: u64 = 0xf000_0000;

fn dev() -> (VirtioMmio, Arc<Mutex<FakeLog>>, Arc<Recorder>, EventFd) {
    let (d, log) = fake();
    let hooks = Arc::new(Recorder::default());
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let m = VirtioMmio::new(
        d,
        memory(),
        BASE,
        LevelIrqLine::new(
            irq.try_clone().unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ),
        hooks.clone(),
    )
    .unwrap();
    (m, log, hooks, irq)
}

fn r(m: &mut VirtioMmio, off: u64) -> u32 {
    let mut b = [0u8; 4];
    m.read(BASE, off, &mut b);
    u32::from_le_bytes(b)
}

fn w(m: &mut VirtioMmio, off: u64, v: u32) {
    m.write(BASE, off, &v.to_le_bytes());
}

fn bring_up(m: &mut VirtioMmio) {
    w(m, reg::STATUS, u32::from(st::ACKNOWLEDGE | st::DRIVER));
    w(m, reg::DRIVER_FEATURES_SEL, 1);
    w(m, reg::DRIVER_FEATURES, 1);
    w(
        m,
        reg::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK),
    );
    w(m, reg::QUEUE_SEL, 1);
    w(m, reg::QUEUE_NUM, 8);
    w(m, reg::QUEUE_DESC_LOW, 0x1000);
    w(m, reg::QUEUE_DRIVER_LOW, 0x2000);
    w(m, reg::QUEUE_DEVICE_LOW, 0x3000);
    w(m, reg::QUEUE_READY, 1);
    w(
        m,
        reg::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK),
    );
}

#[test]
fn identifies_as_a_modern_virtio_mmio_device() {
    let (mut m, ..) = dev();
    assert_eq!(r(&mut m, reg::MAGIC), 0x7472_6976);
    assert_eq!(r(&mut m, reg::VERSION), 2);
    assert_eq!(r(&mut m, reg::DEVICE_ID), 4);
    w(&mut m, reg::QUEUE_SEL, 0);
    assert_eq!(r(&mut m, reg::QUEUE_NUM_MAX), 256);
    w(&mut m, reg::QUEUE_SEL, 9);
    assert_eq!(r(&mut m, reg::QUEUE_NUM_MAX), 0, "no such queue");
}

#[test]
fn registers_notify_ioeventfds_with_the_queue_index() {
    let (m, _, hooks, _) = dev();
    assert_eq!(
        *hooks.ioevents.lock().unwrap(),
        vec![
            (IoEventAddress::Mmio(BASE + 0x50), Some(0)),
            (IoEventAddress::Mmio(BASE + 0x50), Some(1))
        ]
    );
    drop(m);
    assert!(hooks.ioevents.lock().unwrap().is_empty());
}

#[test]
fn activates_and_interrupts_through_the_line() {
    let (mut m, log, _, irq) = dev();
    bring_up(&mut m);
    assert_eq!(log.lock().unwrap().activations[0].1, vec![(1, 8, 0x1000)]);
    let int = log.lock().unwrap().interrupt.clone().unwrap();
    int.trigger(InterruptKind::Queue(1)).unwrap();
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(r(&mut m, reg::INTERRUPT_STATUS), 1);
    w(&mut m, reg::INTERRUPT_ACK, 1);
    assert_eq!(r(&mut m, reg::INTERRUPT_STATUS), 0);
    w(&mut m, reg::QUEUE_NOTIFY, 1);
    assert_eq!(log.lock().unwrap().notifies[0].read().unwrap(), 1);
    w(&mut m, reg::QUEUE_NOTIFY, 77);
}

/// KVM lowered the line after the guest's EOI and signalled the resample eventfd: the
/// transport's answer (whether it raised the line again).
fn eoi(m: &VirtioMmio) -> bool {
    let irq = m.irq();
    irq.line().resample_fd().write(1).unwrap();
    irq.resample().unwrap()
}

#[test]
fn the_line_is_raised_again_after_eoi_until_the_driver_acknowledges() {
    let (mut m, log, _, irq) = dev();
    bring_up(&mut m);
    let int = log.lock().unwrap().interrupt.clone().unwrap();
    int.trigger(InterruptKind::Queue(1)).unwrap();
    assert_eq!(irq.read().unwrap(), 1);
    // The guest EOIs without acknowledging (or a second interrupt came in meanwhile).
    assert!(eoi(&m), "still pending: raised again");
    assert_eq!(irq.read().unwrap(), 1);
    // Reading the status alone acknowledges nothing on virtio-mmio.
    assert_eq!(r(&mut m, reg::INTERRUPT_STATUS), 1);
    assert!(eoi(&m));
    assert_eq!(irq.read().unwrap(), 1);
    // Configuration interrupt too; acknowledging one bit keeps the line up for the other.
    int.trigger(InterruptKind::Config).unwrap();
    assert_eq!(irq.read().unwrap(), 1);
    w(&mut m, reg::INTERRUPT_ACK, 1);
    assert!(eoi(&m));
    assert_eq!(irq.read().unwrap(), 1);
    w(&mut m, reg::INTERRUPT_ACK, 2);
    assert!(!eoi(&m), "acknowledged: the line stays low");
    assert!(irq.read().is_err());
    assert!(m.irq().line().resample_fd().read().is_err(), "consumed");
}

#[test]
fn misbehaving_driver_gets_needs_reset_and_odd_accesses_are_ignored() {
    let (mut m, log, _, irq) = dev();
    w(
        &mut m,
        reg::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DRIVER | st::DRIVER_OK),
    );
    assert_ne!(
        r(&mut m, reg::STATUS) & u32::from(st::DEVICE_NEEDS_RESET),
        0
    );
    assert_eq!(irq.read().unwrap(), 1, "configuration interrupt");
    assert!(log.lock().unwrap().activations.is_empty());
    let mut two = [0u8; 2];
    m.read(BASE, reg::MAGIC, &mut two);
    assert_eq!(two, [0xff; 2]);
    m.write(BASE, reg::STATUS, &[0]);
    assert_ne!(
        r(&mut m, reg::STATUS),
        0,
        "a 1-byte status write is ignored"
    );
    w(&mut m, reg::STATUS, 0);
    assert_eq!(r(&mut m, reg::STATUS), 0);
}

#[test]
fn device_config_starts_at_0x100() {
    let (mut m, ..) = dev();
    let mut b = [0u8; 2];
    m.read(BASE, 0x102, &mut b);
    assert_eq!(b, [3, 4]);
}

#[test]
fn state_round_trips() {
    let (mut m, ..) = dev();
    bring_up(&mut m);
    m.pause().unwrap();
    let s = m.state().unwrap();
    let back: VirtioMmioState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
    let (mut n, log, _, irq) = dev();
    n.restore(back).unwrap();
    assert_eq!(n.state().unwrap(), s);
    assert_eq!(log.lock().unwrap().activations.len(), 1);
    assert!(irq.read().is_err(), "nothing pending, line low");
}

#[test]
fn restoring_a_pending_interrupt_raises_the_line() {
    let (mut m, log, ..) = dev();
    bring_up(&mut m);
    let int = log.lock().unwrap().interrupt.clone().unwrap();
    int.trigger(InterruptKind::Queue(1)).unwrap();
    m.pause().unwrap();
    let s = m.state().unwrap();
    assert_eq!(s.transport.isr, 1);
    let (mut n, _, _, irq) = dev();
    n.restore(s).unwrap();
    assert_eq!(irq.read().unwrap(), 1, "raised on restore");
    assert_eq!(r(&mut n, reg::INTERRUPT_STATUS), 1);
    assert!(eoi(&n), "and kept up until acknowledged");
    w(&mut n, reg::INTERRUPT_ACK, 1);
    assert!(!eoi(&n));
}
