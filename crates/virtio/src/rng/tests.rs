use std::sync::atomic::Ordering;
use std::sync::Arc;

use kiln_devices::virtio::{Activation, VirtioInterrupt};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::testing::{guest_memory, TestDriver, TestInterrupt};

const MEM: usize = 4 << 20;

fn running(size: u16) -> (Rng, TestDriver, Arc<TestInterrupt>) {
    let mem = guest_memory(MEM);
    let mut drv = TestDriver::new(&mem, 0, size);
    let irq = TestInterrupt::new();
    let mut rng = Rng::new();
    rng.activate(Activation {
        mem,
        features: features::VERSION_1,
        queues: vec![drv.active(0)],
        interrupt: irq.clone() as Arc<dyn VirtioInterrupt>,
    })
    .unwrap();
    (rng, drv, irq)
}

fn read(drv: &TestDriver, addr: GuestAddress, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    drv.mem().read_slice(&mut v, addr).unwrap();
    v
}

#[test]
fn fills_writable_buffers_with_fresh_random_bytes() {
    let (_rng, mut drv, irq) = running(16);
    let a = drv.alloc(64);
    let b = drv.alloc(64);
    drv.add_chain(&[(a, 64, true)]);
    drv.kick();
    assert_eq!(drv.wait_used(), (0, 64));
    drv.add_chain(&[(b, 64, true)]);
    drv.kick();
    assert_eq!(drv.wait_used(), (1, 64));
    let (x, y) = (read(&drv, a, 64), read(&drv, b, 64));
    assert_ne!(x, vec![0; 64]);
    assert_ne!(x, y, "two reads differ");
    assert!(irq.queue_triggers.load(Ordering::SeqCst) >= 1);
    assert!(irq.reset_reasons().is_empty());
}

#[test]
fn serves_chains_posted_before_activation_and_spans_descriptors() {
    let mem = guest_memory(MEM);
    let mut drv = TestDriver::new(&mem, 0, 8);
    let (a, b, r) = (drv.alloc(16), drv.alloc(32), drv.buffer(&[7; 8]));
    drv.add_chain(&[(r, 8, false), (a, 16, true), (b, 32, true)]);
    let mut rng = Rng::new();
    rng.activate(Activation {
        mem,
        features: features::VERSION_1,
        queues: vec![drv.active(0)],
        interrupt: TestInterrupt::new(),
    })
    .unwrap();
    assert_eq!(drv.wait_used(), (0, 48), "readable descriptor skipped");
    assert_eq!(read(&drv, r, 8), vec![7; 8], "readable buffer untouched");
}

#[test]
fn a_huge_buffer_gets_a_bounded_amount() {
    let (_rng, mut drv, irq) = running(8);
    let a = drv.alloc(2 << 20);
    drv.add_chain(&[(a, 2 << 20, true)]);
    drv.kick();
    assert_eq!(drv.wait_used(), (0, MAX_BYTES_PER_REQUEST));
    assert!(irq.reset_reasons().is_empty());
}

#[test]
fn buffer_outside_ram_needs_reset_and_the_device_stays_stopped() {
    let (mut rng, mut drv, irq) = running(8);
    drv.add_chain(&[(GuestAddress(MEM as u64 - 16), 4096, true)]);
    drv.kick();
    assert!(irq.wait_reset().contains("not in guest RAM"));
    let a = drv.alloc(16);
    drv.add_chain(&[(a, 16, true)]);
    drv.kick();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(drv.next_used(), None, "a broken queue serves nothing");
    rng.reset().unwrap();
}

#[test]
fn descriptor_loop_needs_reset() {
    let (_rng, mut drv, irq) = running(4);
    let a = drv.alloc(16);
    // 0 -> 1 -> 0 ...
    drv.write_desc(0, a.0, 16, 1 | 2, 1);
    drv.write_desc(1, a.0, 16, 1 | 2, 0);
    drv.publish(0);
    drv.kick();
    irq.wait_reset();
}

#[test]
fn avail_index_far_ahead_needs_reset() {
    let (_rng, mut drv, irq) = running(4);
    drv.set_avail_idx(100);
    drv.kick();
    irq.wait_reset();
}

#[test]
fn activation_without_queue_zero_is_refused() {
    let mem = guest_memory(MEM);
    let mut drv = TestDriver::new(&mem, 0, 8);
    let mut rng = Rng::new();
    let err = rng.activate(Activation {
        mem,
        features: features::VERSION_1,
        queues: vec![drv.active(1)],
        interrupt: TestInterrupt::new(),
    });
    assert!(matches!(err, Err(VirtioError::BadActivation { .. })));
}

#[test]
fn pause_keeps_progress_and_state_round_trips_into_a_new_device() {
    let (mut rng, mut drv, _) = running(8);
    for i in 0..3u32 {
        let a = drv.alloc(8);
        drv.add_chain(&[(a, 8, true)]);
        drv.kick();
        assert_eq!(drv.wait_used(), (i, 8));
    }
    rng.pause().unwrap();
    // Requests posted while paused wait for resume.
    let a = drv.alloc(8);
    drv.add_chain(&[(a, 8, true)]);
    drv.kick();
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(drv.next_used(), None);
    let saved = rng.save_state().unwrap();
    let state: RngState = serde_json::from_value(saved.clone()).unwrap();
    assert_eq!(
        state.queue,
        Some(QueueProgress {
            next_avail: 3,
            next_used: 3
        })
    );
    assert_eq!(serde_json::to_value(state).unwrap(), saved);

    // A new device restored from the state carries on where the old one stopped.
    drop(rng);
    let mut again = Rng::new();
    again.restore_state(saved).unwrap();
    again
        .activate(Activation {
            mem: drv.mem().clone(),
            features: features::VERSION_1,
            queues: vec![drv.active(0)],
            interrupt: TestInterrupt::new(),
        })
        .unwrap();
    assert_eq!(drv.wait_used(), (3, 8));
    assert!(again.save_state().is_err(), "running: pause first");
    again.pause().unwrap();
    again.resume().unwrap();
    again.reset().unwrap();
    assert_eq!(
        serde_json::from_value::<RngState>(again.save_state().unwrap()).unwrap(),
        RngState::default()
    );
}

#[test]
fn resume_serves_what_arrived_while_paused() {
    let (mut rng, mut drv, _) = running(8);
    rng.pause().unwrap();
    let a = drv.alloc(8);
    drv.add_chain(&[(a, 8, true)]);
    drv.kick();
    rng.resume().unwrap();
    assert_eq!(drv.wait_used(), (0, 8));
}

#[test]
fn reports_type_and_features() {
    let rng = Rng::new();
    assert_eq!(rng.device_type(), 4);
    assert_eq!(rng.queue_max_sizes(), &[256]);
    assert_ne!(rng.features() & features::VERSION_1, 0);
    let mut b = [9u8; 4];
    rng.read_config(0, &mut b);
    assert_eq!(b, [0; 4]);
}
