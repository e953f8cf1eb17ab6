//! Engine tests: every operation through io_uring, threads and the synchronous mode, with the
//! same results.

// Test sizes are small constants.
#![allow(clippy::cast_possible_truncation)]

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::qcow2::CreateOptions;
use crate::{ImageFormat, Qcow2Image};

const MIB: u64 = 1 << 20;

fn raw_image(size: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    (dir, p)
}

fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

/// Waits (up to 5 s) for the completion of `user_data`, checking the eventfd fires.
fn wait(engine: &mut dyn AsyncIo, user_data: u64) -> std::io::Result<usize> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(c) = engine.next_completion() {
            assert_eq!(c.user_data, user_data, "unexpected completion");
            return c.result;
        }
        let mut pfd = libc::pollfd {
            fd: engine.notifier(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd that lives across the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, 100) };
        assert!(rc >= 0);
        let mut v = 0u64;
        if rc == 1 {
            // SAFETY: reads 8 bytes into a local u64 from the engine's eventfd.
            unsafe { libc::read(pfd.fd, (&mut v as *mut u64).cast(), 8) };
        }
        assert!(
            std::time::Instant::now() < deadline,
            "request {user_data} never completed"
        );
    }
}

fn write(engine: &mut dyn AsyncIo, offset: u64, data: &mut [u8], ud: u64) {
    let v = [iov(data)];
    // SAFETY: `data` outlives the request: we wait for its completion below.
    unsafe { engine.write_vectored(offset, &v, ud) }.unwrap();
    engine.submit().unwrap();
    assert_eq!(wait(engine, ud).unwrap(), data.len());
}

fn read(engine: &mut dyn AsyncIo, offset: u64, len: usize, ud: u64) -> Vec<u8> {
    let mut data = vec![0xeeu8; len];
    let v = [iov(&mut data)];
    // SAFETY: `data` outlives the request: we wait for its completion below.
    unsafe { engine.read_vectored(offset, &v, ud) }.unwrap();
    engine.submit().unwrap();
    assert_eq!(wait(engine, ud).unwrap(), len);
    data
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const ENGINES: [EngineKind; 4] = [
    EngineKind::IoUring,
    EngineKind::Threads(2),
    EngineKind::Sync,
    EngineKind::Auto,
];

fn open(p: &Path, engine: EngineKind, read_only: bool, direct: bool) -> DiskImage {
    DiskImage::open(
        p,
        &AioOptions {
            read_only,
            direct,
            engine,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn every_engine_writes_what_the_others_read() {
    let (_d, p) = raw_image(4 * MIB);
    for (i, &w) in ENGINES.iter().enumerate() {
        let seed = u8::try_from(i).unwrap();
        let data = pattern(64 * 1024, seed);
        {
            let img = open(&p, w, false, false);
            let mut e = img.engine(8).unwrap();
            write(&mut *e, MIB, &mut data.clone(), 1);
        }
        for &r in &ENGINES {
            let img = open(&p, r, true, false);
            let mut e = img.engine(8).unwrap();
            assert_eq!(read(&mut *e, MIB, data.len(), 2), data, "{w:?} -> {r:?}");
        }
    }
}

#[test]
fn vectored_io_scatters_and_gathers_in_order() {
    let (_d, p) = raw_image(MIB);
    for &kind in &ENGINES {
        let img = open(&p, kind, false, false);
        let mut e = img.engine(4).unwrap();
        let mut a = pattern(512, 1);
        let mut b = pattern(1536, 2);
        let v = [iov(&mut a), iov(&mut b)];
        // SAFETY: a and b outlive the request (we wait for it).
        unsafe { e.write_vectored(4096, &v, 7) }.unwrap();
        e.submit().unwrap();
        assert_eq!(wait(&mut *e, 7).unwrap(), 2048);
        let back = read(&mut *e, 4096, 2048, 8);
        assert_eq!(&back[..512], &pattern(512, 1)[..]);
        assert_eq!(&back[512..], &pattern(1536, 2)[..]);
    }
}

#[test]
fn direct_io_bounces_unaligned_buffers() {
    let (_d, p) = raw_image(MIB);
    let img = open(&p, EngineKind::IoUring, false, true);
    assert!(img.direct());
    let mut e = img.engine(4).unwrap();
    // An odd address inside a larger buffer: not aligned for O_DIRECT.
    let mut big = pattern(4096 + 3, 9);
    let unaligned = &mut big[3..];
    write(&mut *e, 8192, unaligned, 1);
    let back = read(&mut *e, 8192, 4096, 2);
    assert_eq!(back, pattern(4096 + 3, 9)[3..]);
    // An aligned buffer goes straight through.
    let mut buf = AlignedBuf::new(4096, 4096).unwrap();
    buf.as_mut_slice().copy_from_slice(&pattern(4096, 4));
    write(&mut *e, 0, buf.as_mut_slice(), 3);
    assert_eq!(read(&mut *e, 0, 4096, 4), pattern(4096, 4));
}

#[test]
fn write_zeroes_and_discard_read_back_as_zeroes_and_free_space() {
    for &kind in &ENGINES {
        let (_d, p) = raw_image(4 * MIB);
        let img = open(&p, kind, false, false);
        let mut e = img.engine(4).unwrap();
        write(&mut *e, 0, &mut pattern(2 * MIB as usize, 5), 1);
        e.flush(2).unwrap();
        e.submit().unwrap();
        wait(&mut *e, 2).unwrap();
        let before = std::fs::metadata(&p).unwrap().blocks();

        e.write_zeroes(0, 64 * 1024, false, 3).unwrap();
        e.submit().unwrap();
        wait(&mut *e, 3).unwrap();
        assert!(read(&mut *e, 0, 64 * 1024, 4).iter().all(|&b| b == 0));

        e.write_zeroes(MIB, 256 * 1024, true, 5).unwrap();
        e.discard(MIB + 512 * 1024, 256 * 1024, 6).unwrap();
        e.submit().unwrap();
        let mut got = [e.next_completion_blocking(), e.next_completion_blocking()];
        got.sort_by_key(|c| c.user_data);
        assert_eq!(got[0].user_data, 5);
        assert_eq!(got[1].user_data, 6);
        assert!(got.iter().all(|c| c.result.is_ok()));
        assert!(read(&mut *e, MIB, 256 * 1024, 7).iter().all(|&b| b == 0));
        assert!(read(&mut *e, MIB + 512 * 1024, 256 * 1024, 8)
            .iter()
            .all(|&b| b == 0));
        // Untouched data in between survives.
        assert_eq!(
            read(&mut *e, MIB + 256 * 1024, 1024, 9),
            pattern(2 * MIB as usize, 5)[(MIB + 256 * 1024) as usize..][..1024]
        );
        let after = std::fs::metadata(&p).unwrap().blocks();
        assert!(
            after < before,
            "{kind:?}: no space freed ({before} -> {after})"
        );
    }
}

/// Test helper: blocks for the next completion of any request.
trait BlockingCompletion {
    fn next_completion_blocking(&mut self) -> Completion;
}

impl BlockingCompletion for Box<dyn AsyncIo> {
    fn next_completion_blocking(&mut self) -> Completion {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Some(c) = self.next_completion() {
                return c;
            }
            assert!(std::time::Instant::now() < deadline, "no completion");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

#[test]
fn many_requests_in_flight_complete_once_each() {
    let (_d, p) = raw_image(4 * MIB);
    for &kind in &ENGINES {
        let img = open(&p, kind, false, false);
        let mut e = img.engine(64).unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..64).map(|i| pattern(4096, i)).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            let v = [iov(b)];
            // SAFETY: bufs outlive the requests (all collected below).
            unsafe { e.write_vectored(i as u64 * 4096, &v, i as u64) }.unwrap();
        }
        assert_eq!(e.in_flight(), 64);
        let mut b = vec![0u8; 4096];
        let v = [iov(&mut b)];
        // SAFETY: never submitted: refused because the queue is full.
        let full = unsafe { e.write_vectored(0, &v, 99) };
        assert!(matches!(full, Err(AioError::QueueFull(64))), "{kind:?}");
        e.submit().unwrap();
        let mut seen = [false; 64];
        for _ in 0..64 {
            let c = e.next_completion_blocking();
            assert_eq!(c.result.unwrap(), 4096);
            let i = usize::try_from(c.user_data).unwrap();
            assert!(!seen[i], "completed twice");
            seen[i] = true;
        }
        assert_eq!(e.in_flight(), 0);
        for i in 0..64u8 {
            assert_eq!(
                read(&mut *e, u64::from(i) * 4096, 4096, 100),
                pattern(4096, i)
            );
        }
    }
}

#[test]
fn read_only_image_refuses_writes_with_an_error_completion() {
    let (_d, p) = raw_image(MIB);
    for &kind in &ENGINES {
        let img = open(&p, kind, true, false);
        assert!(img.read_only());
        let mut e = img.engine(4).unwrap();
        let mut data = vec![1u8; 512];
        let v = [iov(&mut data)];
        // SAFETY: data outlives the request (we wait for it).
        unsafe { e.write_vectored(0, &v, 1) }.unwrap();
        e.submit().unwrap();
        assert!(wait(&mut *e, 1).is_err(), "{kind:?}");
    }
}

#[test]
fn a_second_writer_is_refused_while_the_first_holds_the_image() {
    let (_d, p) = raw_image(MIB);
    let first = open(&p, EngineKind::Auto, false, false);
    let err = DiskImage::open(&p, &AioOptions::default()).unwrap_err();
    assert!(matches!(err, AioError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("disk.raw"));
    // Readers are refused too while a writer holds it.
    let ro = AioOptions {
        read_only: true,
        ..Default::default()
    };
    assert!(matches!(
        DiskImage::open(&p, &ro),
        Err(AioError::Locked { .. })
    ));
    drop(first);
    let a = DiskImage::open(&p, &ro).unwrap();
    let b = DiskImage::open(&p, &ro).unwrap();
    assert!(a.read_only() && b.read_only());
}

#[test]
fn missing_image_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = DiskImage::open(&dir.path().join("gone.img"), &AioOptions::default()).unwrap_err();
    assert!(matches!(err, AioError::NotFound(_)));
    assert_eq!(
        err.to_string(),
        format!(
            "disk image {} does not exist",
            dir.path().join("gone.img").display()
        )
    );
}

#[test]
fn qcow2_runs_on_the_pool_with_locking() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.qcow2");
    Qcow2Image::create(
        &p,
        &CreateOptions {
            size: 8 * MIB,
            ..Default::default()
        },
    )
    .unwrap();
    let img = open(&p, EngineKind::Auto, false, false);
    assert_eq!(img.format(), ImageFormat::Qcow2);
    assert_eq!(img.size(), 8 * MIB);
    assert_eq!(img.engine_name(), "threads");
    assert!(matches!(
        DiskImage::open(&p, &AioOptions::default()),
        Err(AioError::Locked { .. })
    ));
    let mut e = img.engine(8).unwrap();
    let data = pattern(128 * 1024, 3);
    write(&mut *e, 3 * MIB, &mut data.clone(), 1);
    e.flush(2).unwrap();
    e.submit().unwrap();
    wait(&mut *e, 2).unwrap();
    assert_eq!(read(&mut *e, 3 * MIB, data.len(), 3), data);
    e.write_zeroes(3 * MIB, 64 * 1024, false, 4).unwrap();
    e.submit().unwrap();
    wait(&mut *e, 4).unwrap();
    assert!(read(&mut *e, 3 * MIB, 64 * 1024, 5).iter().all(|&b| b == 0));
    // Reads past the end fail as a completion, not a panic.
    let mut b = vec![0u8; 4096];
    let v = [iov(&mut b)];
    // SAFETY: b outlives the request (we wait for it).
    unsafe { e.read_vectored(8 * MIB, &v, 6) }.unwrap();
    e.submit().unwrap();
    assert!(wait(&mut *e, 6).is_err());
}

#[test]
fn engine_choice_is_reported() {
    let (_d, p) = raw_image(MIB);
    assert_eq!(
        open(&p, EngineKind::IoUring, true, false).engine_name(),
        "io_uring"
    );
    assert_eq!(
        open(&p, EngineKind::Threads(3), true, false).engine_name(),
        "threads"
    );
    assert_eq!(
        open(&p, EngineKind::Sync, true, false).engine_name(),
        "sync"
    );
}

/// What the kernel says, independently of the engine: does a read with `RWF_NOWAIT` on the
/// file at `p` fail with EOPNOTSUPP?
fn refuses_nowait(p: &Path) -> bool {
    let f = std::fs::File::open(p).unwrap();
    let mut buf = [0u8; 512];
    let v = iov(&mut buf);
    // SAFETY: one iovec over a local buffer that outlives the call.
    let rc = unsafe { libc::preadv2(f.as_raw_fd(), &v, 1, 0, libc::RWF_NOWAIT) };
    rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP)
}

#[test]
fn disks_say_whether_the_kernel_finishes_their_requests_without_workers() {
    // A disk file system (ext4 here) takes non-blocking I/O; tmpfs refuses it, and io_uring
    // then hands every request to a worker thread.
    let disk_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let on_disk = disk_dir.path().join("disk.raw");
    std::fs::write(&on_disk, vec![7u8; MIB as usize]).unwrap();
    assert!(!refuses_nowait(&on_disk), "/var/tmp refuses RWF_NOWAIT");
    assert!(open(&on_disk, EngineKind::IoUring, false, false).completes_in_kernel());
    assert!(open(&on_disk, EngineKind::IoUring, false, true).completes_in_kernel());
    // The thread pool runs every request on its threads, whatever the file system.
    assert!(!open(&on_disk, EngineKind::Threads(2), false, false).completes_in_kernel());
    assert!(!open(&on_disk, EngineKind::Sync, false, false).completes_in_kernel());
    let shm_dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let in_memory = shm_dir.path().join("disk.raw");
    std::fs::write(&in_memory, vec![7u8; MIB as usize]).unwrap();
    let img = open(&in_memory, EngineKind::IoUring, false, false);
    assert_eq!(img.completes_in_kernel(), !refuses_nowait(&in_memory));
}

#[test]
fn an_idle_engine_moves_to_another_thread() {
    // A queue's engine is created on the VMM thread and served by an I/O thread that is
    // replaced on pause/resume; io_uring rings bound to one thread must follow.
    let (_d, p) = raw_image(4 * MIB);
    for &kind in &ENGINES {
        let img = open(&p, kind, false, false);
        let mut e = img.engine(8).unwrap();
        for round in 0..3u8 {
            e = std::thread::spawn(move || {
                let mut data = pattern(8192, round);
                write(&mut *e, u64::from(round) * MIB, &mut data, 1);
                assert_eq!(read(&mut *e, u64::from(round) * MIB, 8192, 2), data);
                e
            })
            .join()
            .unwrap();
        }
        assert_eq!(
            read(&mut *e, 2 * MIB, 8192, 3),
            pattern(8192, 2),
            "{kind:?}"
        );
    }
}
