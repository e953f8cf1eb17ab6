use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::testing::{fake, memory};
use super::*;
use crate::virtio::{status as st, InterruptKind};

struct NoInterrupt;
impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _: InterruptKind) -> std::io::Result<()> {
        Ok(())
    }
    fn needs_reset(&self, _: &str) {}
}

fn core() -> (
    VirtioCore,
    Arc<std::sync::Mutex<testing::FakeLog>>,
    Arc<dyn VirtioInterrupt>,
) {
    let (dev, log) = fake();
    (
        VirtioCore::new(dev, memory()).unwrap(),
        log,
        Arc::new(NoInterrupt),
    )
}

fn negotiate(c: &mut VirtioCore, irq: &Arc<dyn VirtioInterrupt>, features: u64) -> StatusChange {
    c.write_status(st::ACKNOWLEDGE, irq);
    c.write_status(st::ACKNOWLEDGE | st::DRIVER, irq);
    c.driver_feature_select = 0;
    c.write_driver_features_word(u32::try_from(features & 0xffff_ffff).unwrap());
    c.driver_feature_select = 1;
    c.write_driver_features_word(u32::try_from(features >> 32).unwrap());
    c.write_status(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK, irq)
}

fn setup_queue(c: &mut VirtioCore, i: u16, size: u16, desc: u64) {
    c.queue_select = i;
    let q = c.selected_queue_mut().unwrap();
    q.size = size;
    q.desc = desc;
    q.driver = desc + 16 * u64::from(size);
    q.device = (q.driver + 6 + 2 * u64::from(size)).next_multiple_of(4);
    q.ready = true;
}

const ALL: u8 = st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK;

#[test]
fn activates_with_negotiated_features_and_enabled_queues_only() {
    let (mut c, log, irq) = core();
    negotiate(&mut c, &irq, features::VERSION_1 | features::RING_EVENT_IDX);
    assert_ne!(c.status() & st::FEATURES_OK, 0);
    setup_queue(&mut c, 0, 128, 0x1000);
    assert_eq!(c.write_status(ALL, &irq), StatusChange::Activated);
    let log = log.lock().unwrap();
    assert_eq!(log.activations.len(), 1);
    let (feat, queues) = &log.activations[0];
    assert_eq!(*feat, features::VERSION_1 | features::RING_EVENT_IDX);
    assert_eq!(queues, &vec![(0, 128, 0x1000)]);
    assert_eq!(log.notifies.len(), 1);
}

#[test]
fn refuses_features_without_version_1_or_not_offered() {
    let (mut c, _, irq) = core();
    negotiate(&mut c, &irq, features::RING_EVENT_IDX);
    assert_eq!(c.status() & st::FEATURES_OK, 0, "VERSION_1 is required");
    c.write_status(0, &irq);
    negotiate(&mut c, &irq, features::VERSION_1 | features::RING_PACKED);
    assert_eq!(
        c.status() & st::FEATURES_OK,
        0,
        "RING_PACKED was not offered"
    );
}

#[test]
fn driver_ok_without_features_ok_needs_reset_and_does_not_activate() {
    let (mut c, log, irq) = core();
    c.write_status(st::ACKNOWLEDGE | st::DRIVER, &irq);
    assert_eq!(
        c.write_status(st::ACKNOWLEDGE | st::DRIVER | st::DRIVER_OK, &irq),
        StatusChange::NeedsReset
    );
    assert_ne!(c.status() & st::DEVICE_NEEDS_RESET, 0);
    assert_eq!(c.status() & st::DRIVER_OK, 0);
    assert!(log.lock().unwrap().activations.is_empty());
    // Only a reset clears it.
    c.write_status(ALL | st::DEVICE_NEEDS_RESET, &irq);
    assert_ne!(c.status() & st::DEVICE_NEEDS_RESET, 0);
    c.write_status(0, &irq);
    assert_eq!(c.status(), 0);
}

#[test]
fn bad_queues_are_refused_at_driver_ok() {
    let cases: [(&str, u16, u64); 5] = [
        ("size not a power of two", 100, 0x1000),
        ("size above the maximum", 512, 0x1000),
        ("size zero", 0, 0x1000),
        ("descriptor table outside RAM", 256, (1 << 20) - 0x100),
        ("misaligned descriptor table", 256, 0x1008),
    ];
    for (what, size, desc) in cases {
        let (mut c, log, irq) = core();
        negotiate(&mut c, &irq, features::VERSION_1);
        setup_queue(&mut c, 0, size, desc);
        assert_eq!(
            c.write_status(ALL, &irq),
            StatusChange::NeedsReset,
            "{what}"
        );
        assert!(log.lock().unwrap().activations.is_empty(), "{what}");
        assert!(!c.activated());
    }
    // Rings that wrap around the address space.
    let (mut c, _, irq) = core();
    negotiate(&mut c, &irq, features::VERSION_1);
    c.queue_select = 0;
    let q = c.selected_queue_mut().unwrap();
    q.desc = 0x1000;
    q.driver = u64::MAX - 1;
    q.device = 0x8000;
    q.ready = true;
    assert_eq!(c.write_status(ALL, &irq), StatusChange::NeedsReset);
}

#[test]
fn queue_configuration_is_frozen_once_enabled_and_select_past_the_end_is_harmless() {
    let (mut c, _, irq) = core();
    negotiate(&mut c, &irq, features::VERSION_1);
    setup_queue(&mut c, 1, 16, 0x2000);
    assert!(c.selected_queue_mut().is_none(), "enabled queue");
    c.queue_select = 7;
    assert!(c.selected_queue().is_none());
    assert!(c.selected_queue_mut().is_none());
}

#[test]
fn clearing_status_bits_is_ignored_and_reset_restores_defaults() {
    let (mut c, log, irq) = core();
    negotiate(&mut c, &irq, features::VERSION_1);
    setup_queue(&mut c, 0, 64, 0x1000);
    c.write_status(ALL, &irq);
    assert_eq!(c.write_status(st::ACKNOWLEDGE, &irq), StatusChange::None);
    assert_eq!(c.status(), ALL);
    assert_eq!(c.write_status(0, &irq), StatusChange::Reset);
    assert_eq!(log.lock().unwrap().resets, 1);
    assert_eq!(c.status(), 0);
    assert_eq!(c.driver_features(), 0);
    c.queue_select = 0;
    let q = c.selected_queue().unwrap();
    assert_eq!((q.size, q.ready, q.desc), (256, false, 0));
    // And it can be activated again.
    negotiate(&mut c, &irq, features::VERSION_1);
    setup_queue(&mut c, 0, 32, 0x3000);
    assert_eq!(c.write_status(ALL, &irq), StatusChange::Activated);
    assert_eq!(log.lock().unwrap().activations.len(), 2);
}

#[test]
fn features_cannot_change_after_features_ok() {
    let (mut c, _, irq) = core();
    negotiate(&mut c, &irq, features::VERSION_1);
    c.driver_feature_select = 0;
    c.write_driver_features_word(0xffff_ffff);
    assert_eq!(c.driver_features(), features::VERSION_1);
    c.device_feature_select = 5;
    assert_eq!(c.device_features_word(), 0);
}

#[test]
fn needs_reset_from_a_worker_sticks_until_reset() {
    let (mut c, _, irq) = core();
    negotiate(&mut c, &irq, features::VERSION_1);
    c.shared().set_needs_reset("fake", "test");
    assert_ne!(c.status() & st::DEVICE_NEEDS_RESET, 0);
    assert_eq!(c.write_status(ALL, &irq), StatusChange::NeedsReset);
    c.write_status(0, &irq);
    assert_eq!(c.shared().status.load(Ordering::Acquire), 0);
}

#[test]
fn state_round_trips_and_reactivates() {
    let (mut c, log, irq) = core();
    negotiate(&mut c, &irq, features::VERSION_1 | features::RING_EVENT_IDX);
    setup_queue(&mut c, 0, 64, 0x1000);
    setup_queue(&mut c, 1, 16, 0x4000);
    c.write_status(ALL, &irq);
    c.pause().unwrap();
    let s = c.state().unwrap();
    let json = serde_json::to_string(&s).unwrap();
    let back: TransportState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);

    let (mut d, dlog, _) = core();
    d.restore(back, &irq).unwrap();
    assert_eq!(d.status(), ALL);
    assert!(d.activated());
    let dl = dlog.lock().unwrap();
    assert_eq!(dl.activations[0].1, vec![(0, 64, 0x1000), (1, 16, 0x4000)]);
    assert_eq!(
        dl.restored,
        Some(serde_json::json!({ "fake": [1, 2, 3, 4, 5, 6, 7, 8] }))
    );
    assert_eq!(log.lock().unwrap().pauses, 1);

    let (mut e, _, _) = core();
    let mut wrong = s.clone();
    wrong.queues.pop();
    assert!(e.restore(wrong, &irq).is_err());
}

#[test]
fn restore_while_paused_leaves_the_device_paused_until_resume() {
    let (mut c, _, irq) = core();
    negotiate(&mut c, &irq, features::VERSION_1);
    setup_queue(&mut c, 0, 64, 0x1000);
    c.write_status(ALL, &irq);
    c.pause().unwrap();
    let s = c.state().unwrap();

    let (mut d, dlog, _) = core();
    d.pause().unwrap();
    assert_eq!(dlog.lock().unwrap().pauses, 0, "nothing to pause yet");
    d.restore(s, &irq).unwrap();
    assert_eq!(dlog.lock().unwrap().activations.len(), 1);
    assert_eq!(dlog.lock().unwrap().pauses, 1, "activated, then paused");
    d.pause().unwrap();
    assert_eq!(dlog.lock().unwrap().pauses, 1, "pausing twice is one pause");
    d.resume().unwrap();
}
