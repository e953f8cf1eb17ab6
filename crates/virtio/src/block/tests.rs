//! virtio-blk device tests against a driver-side queue in guest memory.

// Test sizes are small constants.
#![allow(clippy::cast_possible_truncation)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;

use kiln_devices::virtio::{features, Activation, VirtioDevice};
use kiln_disk::aio::EngineKind;
use virtio_bindings::virtio_blk as vb;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::testing::{guest_memory, TestDriver, TestInterrupt};

const MIB: u64 = 1 << 20;

struct Rig {
    dev: Block,
    drv: TestDriver,
    irq: Arc<TestInterrupt>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

fn image(size: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    (dir, p)
}

fn rig_with(edit: impl FnOnce(&mut BlockParams)) -> Rig {
    let (dir, path) = image(8 * MIB);
    let mut p = BlockParams::new(&path);
    p.serial = Some("kiln-serial-1".into());
    edit(&mut p);
    let mut dev = Block::new(p).unwrap();
    let mem = guest_memory(16 << 20);
    let mut drv = TestDriver::new(&mem, 0, 256);
    let irq = TestInterrupt::new();
    let feats = dev.features();
    dev.activate(Activation {
        mem,
        features: feats,
        queues: vec![drv.active(0)],
        interrupt: irq.clone(),
    })
    .unwrap();
    Rig {
        dev,
        drv,
        irq,
        path,
        _dir: dir,
    }
}

fn rig() -> Rig {
    rig_with(|_| {})
}

fn header(d: &mut TestDriver, kind: u32, sector: u64) -> GuestAddress {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    d.buffer(&h)
}

fn status_byte(d: &mut TestDriver) -> GuestAddress {
    d.buffer(&[0xff])
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap() ^ seed)
        .collect()
}

impl Rig {
    /// Posts a chain, kicks, waits for it, returns (used len, status).
    fn run(&mut self, bufs: &[(GuestAddress, u32, bool)], status: GuestAddress) -> (u32, u8) {
        let head = self.drv.add_chain(bufs);
        self.drv.kick();
        let (id, len) = self.drv.wait_used();
        assert_eq!(id, u32::from(head));
        (len, self.drv.mem().read_obj::<u8>(status).unwrap())
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        let h = header(&mut self.drv, vb::VIRTIO_BLK_T_OUT, sector);
        let b = self.drv.buffer(data);
        let s = status_byte(&mut self.drv);
        let n = u32::try_from(data.len()).unwrap();
        self.run(&[(h, 16, false), (b, n, false), (s, 1, true)], s)
            .1
    }

    fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        let h = header(&mut self.drv, vb::VIRTIO_BLK_T_IN, sector);
        let b = self.drv.alloc(u64::from(len));
        let s = status_byte(&mut self.drv);
        let (used, st) = self.run(&[(h, 16, false), (b, len, true), (s, 1, true)], s);
        let mut out = vec![0u8; len as usize];
        self.drv.mem().read_slice(&mut out, b).unwrap();
        if st == 0 {
            assert_eq!(used, len + 1);
        }
        (st, out)
    }

    fn simple(&mut self, kind: u32) -> u8 {
        let h = header(&mut self.drv, kind, 0);
        let s = status_byte(&mut self.drv);
        self.run(&[(h, 16, false), (s, 1, true)], s).1
    }

    fn zeroes(&mut self, kind: u32, segs: &[(u64, u32, u32)]) -> u8 {
        let h = header(&mut self.drv, kind, 0);
        let mut raw = Vec::new();
        for &(sector, n, flags) in segs {
            raw.extend_from_slice(&sector.to_le_bytes());
            raw.extend_from_slice(&n.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        let b = self.drv.buffer(&raw);
        let s = status_byte(&mut self.drv);
        let n = u32::try_from(raw.len()).unwrap();
        self.run(&[(h, 16, false), (b, n, false), (s, 1, true)], s)
            .1
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(&self.path).unwrap();
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, offset).unwrap();
        b
    }
}

#[test]
fn writes_reach_the_file_and_reads_return_it() {
    for engine in [
        EngineKind::IoUring,
        EngineKind::Threads(2),
        EngineKind::Sync,
    ] {
        let mut r = rig_with(|p| p.engine = engine);
        let data = pattern(8192, 0x5a);
        assert_eq!(r.write(16, &data), 0, "{engine:?}");
        assert_eq!(r.file_bytes(16 * 512, 8192), data);
        std::fs::File::options()
            .write(true)
            .open(&r.path)
            .unwrap()
            .write_all_at(&pattern(4096, 7), MIB)
            .unwrap();
        let (st, back) = r.read(MIB / 512, 4096);
        assert_eq!(st, 0);
        assert_eq!(back, pattern(4096, 7), "{engine:?}");
    }
}

#[test]
fn data_split_across_descriptors_and_header_framing_are_free() {
    let mut r = rig();
    // Header and data in one readable descriptor, data and status in one writable one.
    let mut out = vec![0u8; 16];
    out[..4].copy_from_slice(&vb::VIRTIO_BLK_T_OUT.to_le_bytes());
    out[8..].copy_from_slice(&3u64.to_le_bytes());
    out.extend_from_slice(&pattern(1024, 1));
    let b = r.drv.buffer(&out);
    let s = status_byte(&mut r.drv);
    assert_eq!(r.run(&[(b, 16 + 1024, false), (s, 1, true)], s).1, 0);
    let h = header(&mut r.drv, vb::VIRTIO_BLK_T_IN, 3);
    let data_and_status = r.drv.alloc(1025);
    let (used, st) = r.run(
        &[(h, 16, false), (data_and_status, 1025, true)],
        data_and_status.unchecked_add(1024),
    );
    assert_eq!((used, st), (1025, 0));
    let mut back = vec![0u8; 1024];
    r.drv.mem().read_slice(&mut back, data_and_status).unwrap();
    assert_eq!(back, pattern(1024, 1));
}

#[test]
fn flush_get_id_and_unknown_requests() {
    let mut r = rig();
    assert_eq!(r.simple(vb::VIRTIO_BLK_T_FLUSH), 0);
    let h = header(&mut r.drv, vb::VIRTIO_BLK_T_GET_ID, 0);
    let id = r.drv.alloc(20);
    let s = status_byte(&mut r.drv);
    let (used, st) = r.run(&[(h, 16, false), (id, 20, true), (s, 1, true)], s);
    assert_eq!((used, st), (21, 0));
    let mut got = [0u8; 20];
    r.drv.mem().read_slice(&mut got, id).unwrap();
    assert_eq!(&got[..13], b"kiln-serial-1");
    assert!(got[13..].iter().all(|&b| b == 0));
    assert_eq!(r.simple(vb::VIRTIO_BLK_T_SCSI_CMD), 2, "UNSUPP");
    assert_eq!(r.simple(0xdead), 2);
}

#[test]
fn discard_and_write_zeroes_zero_the_range_and_free_space() {
    let mut r = rig();
    assert_eq!(r.write(0, &pattern(2 * MIB as usize, 3)), 0);
    assert_eq!(r.simple(vb::VIRTIO_BLK_T_FLUSH), 0);
    let before = std::fs::metadata(&r.path).unwrap().blocks();
    // Write-zeroes without unmap (sectors 0..8), with unmap (MiB 1), discard (last 256 KiB).
    assert_eq!(r.zeroes(vb::VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0)]), 0);
    assert_eq!(
        r.zeroes(vb::VIRTIO_BLK_T_WRITE_ZEROES, &[(2048, 512, 1)]),
        0
    );
    assert_eq!(r.zeroes(vb::VIRTIO_BLK_T_DISCARD, &[(3584, 512, 0)]), 0);
    assert!(r.file_bytes(0, 4096).iter().all(|&b| b == 0));
    assert_eq!(
        r.file_bytes(4096, 512),
        pattern(2 * MIB as usize, 3)[4096..4608]
    );
    assert!(r.file_bytes(MIB, 256 * 1024).iter().all(|&b| b == 0));
    assert!(r.file_bytes(3584 * 512, 256 * 1024).iter().all(|&b| b == 0));
    let after = std::fs::metadata(&r.path).unwrap().blocks();
    assert!(after < before, "no space freed: {before} -> {after}");
    // Several segments in one request.
    assert_eq!(
        r.zeroes(vb::VIRTIO_BLK_T_WRITE_ZEROES, &[(100, 1, 0), (200, 2, 1)]),
        0
    );
}

#[test]
fn discard_and_write_zeroes_reject_bad_segments() {
    let mut r = rig();
    let cap = r.dev.config().capacity;
    // Discard has no flags: UNMAP or unknown bits are unsupported.
    assert_eq!(r.zeroes(vb::VIRTIO_BLK_T_DISCARD, &[(0, 8, 1)]), 2);
    assert_eq!(r.zeroes(vb::VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 2)]), 2);
    // Past the end, overflowing, empty segment list, too many segments.
    assert_eq!(r.zeroes(vb::VIRTIO_BLK_T_DISCARD, &[(cap - 1, 2, 0)]), 1);
    assert_eq!(r.zeroes(vb::VIRTIO_BLK_T_DISCARD, &[(u64::MAX, 1, 0)]), 1);
    assert_eq!(r.zeroes(vb::VIRTIO_BLK_T_DISCARD, &[]), 1);
    let many: Vec<_> = (0..17).map(|i| (i, 1, 0)).collect();
    assert_eq!(r.zeroes(vb::VIRTIO_BLK_T_DISCARD, &many), 1);
}

#[test]
fn out_of_range_and_misaligned_requests_fail_with_ioerr() {
    let mut r = rig();
    let cap = r.dev.config().capacity;
    assert_eq!(cap, 8 * MIB / 512);
    assert_eq!(r.read(cap - 1, 1024).0, 1, "past the end");
    assert_eq!(r.read(cap - 2, 1024).0, 0, "up to the end");
    assert_eq!(r.read(u64::MAX, 512).0, 1, "sector overflow");
    assert_eq!(r.read(u64::MAX / 512, 512).0, 1, "byte offset overflow");
    assert_eq!(r.write(0, &[1u8; 100]), 1, "not whole sectors");
    assert_eq!(r.read(0, 0).0, 0, "empty read");
    // Nothing was written by the failed requests.
    assert!(r.file_bytes(0, 512).iter().all(|&b| b == 0));
}

#[test]
fn read_only_disk_refuses_writes_and_offers_ro() {
    let (dir, path) = image(MIB);
    std::fs::write(&path, pattern(MIB as usize, 9)).unwrap();
    let mut r = {
        let mut p = BlockParams::new(&path);
        p.readonly = true;
        let mut dev = Block::new(p).unwrap();
        assert_ne!(dev.features() & config::F_RO, 0);
        assert_eq!(
            dev.features() & (config::F_DISCARD | config::F_WRITE_ZEROES),
            0
        );
        let mem = guest_memory(16 << 20);
        let mut drv = TestDriver::new(&mem, 0, 64);
        let irq = TestInterrupt::new();
        let f = dev.features();
        dev.activate(Activation {
            mem,
            features: f,
            queues: vec![drv.active(0)],
            interrupt: irq.clone(),
        })
        .unwrap();
        Rig {
            dev,
            drv,
            irq,
            path: path.clone(),
            _dir: dir,
        }
    };
    assert_eq!(r.write(0, &[0u8; 512]), 1, "IOERR");
    assert_eq!(r.zeroes(vb::VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0)]), 2);
    assert_eq!(r.zeroes(vb::VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)]), 2);
    assert_eq!(r.simple(vb::VIRTIO_BLK_T_FLUSH), 0);
    assert_eq!(r.read(0, 512).1, pattern(MIB as usize, 9)[..512]);
    assert_eq!(r.file_bytes(0, 512), pattern(MIB as usize, 9)[..512]);
    // A second read-only user may share the image; a writer may not.
    let mut p = BlockParams::new(&path);
    p.readonly = true;
    Block::new(p).unwrap();
    let err = Block::new(BlockParams::new(&path)).err().unwrap();
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    assert!(r.irq.reset_reasons().is_empty());
}

#[test]
fn second_writer_is_refused_with_a_clear_error() {
    let r = rig();
    let err = Block::new(BlockParams::new(&r.path)).err().unwrap();
    assert!(matches!(err, BlockError::Disk(AioError::Locked { .. })));
    assert!(err.to_string().contains(&r.path.display().to_string()));
}

#[test]
fn constructor_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let e = Block::new(BlockParams::new(&missing)).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!("disk image {} does not exist", missing.display())
    );
    let (_d, p) = image(MIB);
    let mut params = BlockParams::new(&p);
    params.serial = Some("x".repeat(21));
    assert!(matches!(
        Block::new(params),
        Err(BlockError::SerialTooLong(_))
    ));
    let mut params = BlockParams::new(&p);
    params.queues = 0;
    assert!(matches!(Block::new(params), Err(BlockError::Queues(0))));
    let mut params = BlockParams::new(&p);
    params.queue_size = 100;
    assert!(matches!(
        Block::new(params),
        Err(BlockError::QueueSize(100))
    ));
    let (_d2, tiny) = image(100);
    assert!(matches!(
        Block::new(BlockParams::new(&tiny)),
        Err(BlockError::TooSmall(_))
    ));
}

#[test]
fn config_space_reports_capacity_queues_and_limits() {
    let r = rig_with(|p| p.queues = 4);
    let mut cap = [0u8; 8];
    r.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8 * MIB / 512);
    let mut nq = [0u8; 2];
    r.dev.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 4);
    let mut seg = [0u8; 4];
    r.dev.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), 254);
    assert_ne!(r.dev.features() & config::F_MQ, 0);
    assert_ne!(r.dev.features() & features::VERSION_1, 0);
    assert_eq!(r.dev.queue_max_sizes(), &[256; 4]);
}

#[test]
fn descriptor_loop_puts_the_device_in_needs_reset() {
    let mut r = rig();
    let h = header(&mut r.drv, vb::VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ...
    r.drv.write_desc(0, h.0, 16, 1, 1);
    r.drv.write_desc(1, h.0, 16, 1, 0);
    r.drv.publish(0);
    r.drv.kick();
    let reason = r.irq.wait_reset();
    assert!(reason.contains("does not end"), "{reason}");
    // A broken device takes nothing more, and does not panic.
    let h = header(&mut r.drv, vb::VIRTIO_BLK_T_FLUSH, 0);
    let s = status_byte(&mut r.drv);
    r.drv.add_chain(&[(h, 16, false), (s, 1, true)]);
    r.drv.kick();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(r.drv.next_used().is_none());
    assert_eq!(r.irq.reset_reasons().len(), 1);
}

#[test]
fn hostile_chains_are_answered_or_reset_never_served() {
    // Each case: build the chain, expect either a status or a reset.
    let mut r = rig();
    let ram_end = 16u64 << 20;
    // Data outside RAM: answered with IOERR.
    let h = header(&mut r.drv, vb::VIRTIO_BLK_T_IN, 0);
    let s = status_byte(&mut r.drv);
    assert_eq!(
        r.run(
            &[
                (h, 16, false),
                (GuestAddress(ram_end - 512), 4096, true),
                (s, 1, true)
            ],
            s
        )
        .1,
        1
    );
    // A 4 GiB data descriptor: IOERR.
    let h = header(&mut r.drv, vb::VIRTIO_BLK_T_OUT, 0);
    let s = status_byte(&mut r.drv);
    assert_eq!(
        r.run(
            &[
                (h, 16, false),
                (GuestAddress(0x10_0000), u32::MAX - 511, false),
                (s, 1, true)
            ],
            s
        )
        .1,
        1
    );
    // Header device-writable (wrong direction): IOERR, nothing written.
    let h = header(&mut r.drv, vb::VIRTIO_BLK_T_OUT, 0);
    let s = status_byte(&mut r.drv);
    assert_eq!(r.run(&[(h, 16, true), (s, 1, true)], s).1, 1);
    // Readable data after writable data: IOERR.
    let h = header(&mut r.drv, vb::VIRTIO_BLK_T_IN, 0);
    let w = r.drv.alloc(512);
    let s = status_byte(&mut r.drv);
    assert_eq!(
        r.run(
            &[(h, 16, false), (w, 512, true), (h, 16, false), (s, 1, true)],
            s
        )
        .1,
        1
    );
    // Short header: IOERR.
    let h = header(&mut r.drv, vb::VIRTIO_BLK_T_IN, 0);
    let s = status_byte(&mut r.drv);
    assert_eq!(r.run(&[(h, 8, false), (s, 1, true)], s).1, 1);
    assert!(r.irq.reset_reasons().is_empty());
    // No writable status byte: reset.
    let h = header(&mut r.drv, vb::VIRTIO_BLK_T_FLUSH, 0);
    r.drv.add_chain(&[(h, 16, false)]);
    r.drv.kick();
    assert!(r.irq.wait_reset().contains("no writable status"));
}

#[test]
fn status_outside_ram_and_bad_avail_index_reset_the_device() {
    let mut r = rig();
    let h = header(&mut r.drv, vb::VIRTIO_BLK_T_FLUSH, 0);
    r.drv
        .add_chain(&[(h, 16, false), (GuestAddress(1 << 40), 1, true)]);
    r.drv.kick();
    assert!(r.irq.wait_reset().contains("outside guest RAM"));

    let mut r = rig();
    r.drv.set_avail_idx(1000);
    r.drv.kick();
    assert!(r.irq.wait_reset().contains("available ring"));

    let mut r = rig();
    // Head index past the table.
    r.drv.publish(300);
    r.drv.kick();
    assert!(r.irq.wait_reset().contains("empty or unreadable"));
}

#[test]
fn indirect_descriptors_are_followed() {
    let mut r = rig();
    let data = pattern(512, 4);
    let h = header(&mut r.drv, vb::VIRTIO_BLK_T_OUT, 1);
    let b = r.drv.buffer(&data);
    let s = status_byte(&mut r.drv);
    // An indirect table of three descriptors.
    let table = r.drv.alloc(48);
    let mut raw = Vec::new();
    for (i, (addr, len, flags)) in [(h.0, 16u32, 1u16), (b.0, 512, 1), (s.0, 1, 2)]
        .iter()
        .enumerate()
    {
        raw.extend_from_slice(&addr.to_le_bytes());
        raw.extend_from_slice(&len.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
        raw.extend_from_slice(&(u16::try_from(i).unwrap() + 1).to_le_bytes());
    }
    r.drv.mem().write_slice(&raw, table).unwrap();
    r.drv.write_desc(10, table.0, 48, 4, 0);
    r.drv.publish(10);
    r.drv.kick();
    let (id, _) = r.drv.wait_used();
    assert_eq!(id, 10);
    assert_eq!(r.drv.mem().read_obj::<u8>(s).unwrap(), 0);
    assert_eq!(r.file_bytes(512, 512), data);
}

#[test]
fn multiqueue_serves_each_queue_on_its_own_thread_and_a_broken_queue_stays_alone() {
    let (dir, path) = image(4 * MIB);
    let mut p = BlockParams::new(&path);
    p.queues = 2;
    let mut dev = Block::new(p).unwrap();
    let mem = guest_memory(32 << 20);
    let mut d0 = TestDriver::new(&mem, 0, 64);
    let mut d1 = TestDriver::new(&mem, 8 << 20, 64);
    let irq = TestInterrupt::new();
    let f = dev.features();
    dev.activate(Activation {
        mem,
        features: f,
        queues: vec![d0.active(0), d1.active(1)],
        interrupt: irq.clone(),
    })
    .unwrap();
    // Break queue 0.
    d0.set_avail_idx(500);
    d0.kick();
    irq.wait_reset();
    // Queue 1 still works.
    let mut r = Rig {
        dev,
        drv: d1,
        irq,
        path,
        _dir: dir,
    };
    assert_eq!(r.write(8, &pattern(512, 2)), 0);
    assert_eq!(r.read(8, 512).1, pattern(512, 2));
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let mut r = rig();
    assert_ne!(r.dev.features() & features::RING_EVENT_IDX, 0);
    // used_event = 5: no interrupt until the 6th used entry.
    r.drv.set_used_event(5);
    for i in 0..5 {
        r.write(i, &[1u8; 512]);
    }
    assert_eq!(
        r.irq
            .queue_triggers
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    r.write(5, &[1u8; 512]);
    assert_eq!(
        r.irq
            .queue_triggers
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[test]
fn pause_finishes_io_and_resume_serves_what_arrived_meanwhile() {
    let mut r = rig();
    assert_eq!(r.write(0, &pattern(4096, 1)), 0);
    r.dev.pause().unwrap();
    // Posted while paused: not served.
    let h = header(&mut r.drv, vb::VIRTIO_BLK_T_OUT, 100);
    let b = r.drv.buffer(&pattern(512, 2));
    let s = status_byte(&mut r.drv);
    r.drv
        .add_chain(&[(h, 16, false), (b, 512, false), (s, 1, true)]);
    r.drv.kick();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(r.drv.next_used().is_none());
    let saved = r.dev.save_state().unwrap();
    let state: BlockState = serde_json::from_value(saved.clone()).unwrap();
    assert_eq!(state.queues[0].progress.next_used, 1);
    assert_eq!(state.serial, "kiln-serial-1");
    r.dev.resume().unwrap();
    r.drv.wait_used();
    assert_eq!(r.file_bytes(100 * 512, 512), pattern(512, 2));
    assert!(r.dev.save_state().is_err(), "save needs a paused device");
}

#[test]
fn state_round_trips_through_serde_and_restores_queue_progress() {
    let mut r = rig();
    for i in 0..3 {
        r.write(i, &[i as u8; 512]);
    }
    r.dev.pause().unwrap();
    let saved = r.dev.save_state().unwrap();
    let text = serde_json::to_string(&saved).unwrap();
    let state: BlockState = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(&state).unwrap(), saved);
    assert_eq!(
        state.queues[0].progress,
        QueueProgress {
            next_avail: 3,
            next_used: 3
        }
    );

    // A new device on the same image continues where the old one stopped.
    let path = r.path.clone();
    let mem = r.drv.mem().clone();
    drop(r.dev);
    let mut params = BlockParams::new(&path);
    params.serial = Some("kiln-serial-1".into());
    let mut dev = Block::new(params).unwrap();
    dev.restore_state(saved.clone()).unwrap();
    assert_eq!(dev.save_state().unwrap(), saved);
    let mut active = r.drv.active(0);
    // The transport rebuilds the queue from its own state; ring positions come from ours.
    active.queue = r.drv.queue();
    dev.activate(Activation {
        mem,
        features: state.acked_features,
        queues: vec![active],
        interrupt: r.irq.clone(),
    })
    .unwrap();
    r.dev = dev;
    assert_eq!(r.write(7, &[7u8; 512]), 0);
    assert_eq!(r.file_bytes(7 * 512, 512), vec![7u8; 512]);

    // A different disk refuses the state.
    let (_d, other) = image(2 * MIB);
    let mut dev2 = Block::new(BlockParams::new(&other)).unwrap();
    assert!(dev2.restore_state(saved).is_err());
}

#[test]
fn reset_stops_the_threads_and_the_device_can_be_activated_again() {
    let mut r = rig();
    assert_eq!(r.write(0, &[3u8; 512]), 0);
    r.dev.reset().unwrap();
    let mem = r.drv.mem().clone();
    let mut drv = TestDriver::new(&mem, 0x40_0000, 64);
    let f = r.dev.features();
    r.dev
        .activate(Activation {
            mem,
            features: f,
            queues: vec![drv.active(0)],
            interrupt: r.irq.clone(),
        })
        .unwrap();
    r.drv = drv;
    assert_eq!(r.read(0, 512).1, vec![3u8; 512]);
}

#[test]
fn qcow2_images_work_through_virtio_blk() {
    use kiln_disk::qcow2::CreateOptions;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    kiln_disk::Qcow2Image::create(
        &path,
        &CreateOptions {
            size: 4 * MIB,
            ..Default::default()
        },
    )
    .unwrap();
    let mut dev = Block::new(BlockParams::new(&path)).unwrap();
    assert_eq!(dev.disk().format(), ImageFormat::Qcow2);
    let mem = guest_memory(16 << 20);
    let mut drv = TestDriver::new(&mem, 0, 64);
    let irq = TestInterrupt::new();
    let f = dev.features();
    dev.activate(Activation {
        mem,
        features: f,
        queues: vec![drv.active(0)],
        interrupt: irq.clone(),
    })
    .unwrap();
    let mut r = Rig {
        dev,
        drv,
        irq,
        path: path.clone(),
        _dir: dir,
    };
    assert_eq!(r.write(2048, &pattern(65536, 8)), 0);
    assert_eq!(r.simple(vb::VIRTIO_BLK_T_FLUSH), 0);
    assert_eq!(r.read(2048, 65536).1, pattern(65536, 8));
    assert_eq!(r.zeroes(vb::VIRTIO_BLK_T_WRITE_ZEROES, &[(2048, 64, 0)]), 0);
    let back = r.read(2048, 65536).1;
    assert!(back[..32768].iter().all(|&b| b == 0));
    assert_eq!(back[32768..], pattern(65536, 8)[32768..]);
    r.dev.pause().unwrap();
    drop(r.dev);
    let img = kiln_disk::open(&path, &kiln_disk::OpenOptions::default()).unwrap();
    let mut b = vec![0u8; 512];
    img.read_at(2048 * 512 + 65536 - 512, &mut b).unwrap();
    assert_eq!(b, pattern(65536, 8)[65536 - 512..]);
}

#[test]
fn notification_suppression_follows_the_driver_flags() {
    // Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT stops interrupts.
    let (dir, path) = image(MIB);
    let mut dev = Block::new(BlockParams::new(&path)).unwrap();
    let mem = guest_memory(16 << 20);
    let mut drv = TestDriver::new(&mem, 0, 64);
    let irq = TestInterrupt::new();
    let f = dev.features() & !features::RING_EVENT_IDX;
    dev.activate(Activation {
        mem,
        features: f,
        queues: vec![drv.active(0)],
        interrupt: irq.clone(),
    })
    .unwrap();
    let mut r = Rig {
        dev,
        drv,
        irq,
        path,
        _dir: dir,
    };
    r.drv.set_avail_flags(1);
    r.write(0, &[1u8; 512]);
    assert_eq!(
        r.irq
            .queue_triggers
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    r.drv.set_avail_flags(0);
    r.write(1, &[1u8; 512]);
    assert_eq!(
        r.irq
            .queue_triggers
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // The device sleeps with notifications enabled (no NO_NOTIFY flag left behind).
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(r.drv.used_flags(), 0);

    // With EVENT_IDX: the device asks to be notified at the next entry it will take.
    let mut r = rig();
    r.write(0, &[1u8; 512]);
    r.write(1, &[1u8; 512]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(r.drv.avail_event(), 2);
}

/// A read of sector 0 on a 16-entry queue packed at address 0: the fuzzing entry's input
/// format (see `fuzzing::Fuzzer::pass`).
fn fuzz_seed() -> Vec<u8> {
    let mut mem = vec![0u8; 0x3100];
    let mut desc = |i: usize, addr: u64, len: u32, flags: u16, next: u16| {
        let d = &mut mem[i * 16..i * 16 + 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
    };
    let (next, write) = (1u16, 2u16);
    desc(0, 0x1000, 16, next, 1);
    desc(1, 0x2000, 512, next | write, 2);
    desc(2, 0x3000, 1, write, 0);
    // Available ring at 16 * 16: flags, idx = 1, ring[0] = 0.
    mem[256 + 2..256 + 4].copy_from_slice(&1u16.to_le_bytes());
    let mut input = vec![4u8, 0, 0, 0, 0, 0, 0, 0];
    input.extend_from_slice(&mem);
    input
}

#[test]
fn fuzz_entry_serves_a_valid_request() {
    let (_dir, path) = image(MIB);
    let mut dev = fuzzing::Fuzzer::new(Block::new(BlockParams::new(&path)).unwrap());
    let out = dev.pass(&fuzz_seed());
    assert_eq!(
        out,
        fuzzing::Outcome {
            ran: true,
            offered: 1,
            taken: 1,
            completed: 1,
            needs_reset: false
        }
    );
    // A layout no transport accepts (the used ring at an odd address) is not run.
    let mut bad = fuzz_seed();
    bad[1] = 2;
    bad[6] = 0xff;
    bad[7] = 0xff;
    assert!(!dev.pass(&bad).ran);
    // The engine is reused: a second pass serves the same request again.
    assert_eq!(dev.pass(&fuzz_seed()).completed, 1);
}

/// The fuzz target's property on inputs mutated from the seed: no panic, no hang, and never
/// more completions than chains the device took.
#[test]
fn mutated_queues_never_complete_more_than_taken() {
    let (_dir, path) = image(MIB);
    let mut dev = fuzzing::Fuzzer::new(Block::new(BlockParams::new(&path)).unwrap());
    let seed = fuzz_seed();
    let mut next = crate::testing::xorshift();
    let (mut ran, mut reset, mut served) = (0, 0, 0);
    for _ in 0..1500 {
        let mut input = seed.clone();
        for _ in 0..1 + next() % 8 {
            // Mostly the header, descriptors and available ring; sometimes anywhere.
            let span = if next().is_multiple_of(4) {
                input.len()
            } else {
                8 + 300
            };
            let at = usize::try_from(next()).unwrap() % span;
            input[at] = u8::try_from(next() & 0xff).unwrap();
        }
        let out = dev.pass(&input);
        assert!(
            out.completed <= u64::from(out.taken),
            "{out:?} for input {:?}",
            &input[..64]
        );
        ran += usize::from(out.ran);
        reset += usize::from(out.needs_reset);
        served += usize::from(out.completed > 0);
    }
    // The mutations reach every outcome.
    assert!(
        ran > 500 && reset > 50 && served > 100,
        "ran {ran} reset {reset} served {served}"
    );
}

#[test]
fn only_direct_disks_poll_unless_asked() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("poll.raw");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let budget = |direct: bool, poll_us: Option<u32>| {
        let mut p = BlockParams::new(&path);
        p.direct = direct;
        p.poll_us = poll_us;
        Block::new(p).unwrap().poll
    };
    assert_eq!(budget(true, None), Duration::from_micros(200));
    assert_eq!(budget(false, None), Duration::ZERO);
    assert_eq!(budget(true, Some(0)), Duration::ZERO);
    assert_eq!(budget(false, Some(20)), Duration::from_micros(20));
}
