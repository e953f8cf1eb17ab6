//! Several threads on one qcow2 image: data requests overlap (the shared lock), metadata
//! changes wait for them (the exclusive lock), and whatever the interleaving, the image
//! holds what a sequential model says and `qemu-img check` finds it clean.

// Test code works on small, known sizes; truncating casts are intended there.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::{Duration, Instant};

use kiln_disk::qcow2::CreateOptions;
use kiln_disk::{BlockDevice, DiskError, Extent, ExtentKind, ImageFormat, OpenOptions, Qcow2Image};

/// Fails the test loudly when qemu-img is missing: interop tests never pass by skipping.
fn require_qemu() {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "these tests need qemu-img (Debian package qemu-utils: apt-get install qemu-utils); they do not skip");
}

fn qemu_check(img: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A backing "disk" whose reads block until released, counting how many are inside at once.
struct GateDisk {
    size: u64,
    inside: AtomicUsize,
    most_inside: AtomicUsize,
    open: Mutex<bool>,
    cv: Condvar,
}

impl GateDisk {
    fn new(size: u64) -> Arc<Self> {
        Arc::new(GateDisk {
            size,
            inside: AtomicUsize::new(0),
            most_inside: AtomicUsize::new(0),
            open: Mutex::new(false),
            cv: Condvar::new(),
        })
    }

    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }

    /// Waits until `n` reads are blocked inside (or the deadline passes); returns the count.
    fn wait_inside(&self, n: usize, deadline: Duration) -> usize {
        let start = Instant::now();
        while self.inside.load(Ordering::SeqCst) < n && start.elapsed() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.inside.load(Ordering::SeqCst)
    }
}

impl BlockDevice for GateDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, _offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let now = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_inside.fetch_max(now, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !*open && Instant::now() < deadline {
            open = self
                .cv
                .wait_timeout(open, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        drop(open);
        buf.fill(0xbb);
        self.inside.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
    fn write_at(&self, _: u64, _: &[u8]) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }
    fn block_status(&self, _: u64, len: u64) -> Result<Extent, DiskError> {
        Ok(Extent {
            len,
            kind: ExtentKind::Data,
            host_offset: None,
            compressed: false,
            zero_in_file: false,
        })
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }
    fn allocated_size(&self) -> Result<u64, DiskError> {
        Ok(0)
    }
    fn resize(&self, _: u64) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }
}

fn image_over(dir: &Path, gate: &Arc<GateDisk>) -> Arc<Qcow2Image> {
    let p = dir.join("top.qcow2");
    Qcow2Image::create(
        &p,
        &CreateOptions {
            size: gate.size,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let q = Arc::new(Qcow2Image::open(&p, &OpenOptions::default()).unwrap());
    q.replace_backing(Some(gate.clone() as Arc<dyn BlockDevice>));
    q
}

#[test]
fn reads_from_several_threads_are_in_flight_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let gate = GateDisk::new(8 << 20);
    let q = image_over(dir.path(), &gate);
    let readers: Vec<_> = (0..2u64)
        .map(|i| {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                q.read_at(i << 20, &mut buf).unwrap();
                buf
            })
        })
        .collect();
    // With one lock around all I/O the second read would wait for the first to finish.
    let inside = gate.wait_inside(2, Duration::from_secs(5));
    gate.release();
    for r in readers {
        assert!(r.join().unwrap().iter().all(|&b| b == 0xbb));
    }
    assert_eq!(inside, 2, "the two reads did not overlap");
    assert_eq!(gate.most_inside.load(Ordering::SeqCst), 2);
}

#[test]
fn metadata_changes_wait_for_reads_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let gate = GateDisk::new(8 << 20);
    let q = image_over(dir.path(), &gate);
    let reader = {
        let q = q.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            q.read_at(1 << 20, &mut buf).unwrap();
        })
    };
    assert_eq!(gate.wait_inside(1, Duration::from_secs(5)), 1);
    // An allocating write and a discard need the exclusive lock: they must not finish while
    // the read is still inside.
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (q, done) = (q.clone(), done.clone());
        std::thread::spawn(move || {
            q.write_at(1 << 20, &[7u8; 65536]).unwrap();
            q.discard(2 << 20, 65536).unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !done.load(Ordering::SeqCst),
        "a metadata change ran during a read"
    );
    gate.release();
    reader.join().unwrap();
    writer.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    let mut buf = vec![0u8; 65536];
    q.read_at(1 << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 7));
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Threads own disjoint regions and hammer them with writes (allocating, in place,
/// unaligned, cluster-spanning), zeroing, discards and flushes while one thread takes
/// snapshots; afterwards every region reads as its model and the image is clean.
fn hammer(opts: CreateOptions, name: &str) {
    require_qemu();
    const THREADS: u64 = 4;
    const REGION: u64 = 2 << 20;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    let size = THREADS * REGION;
    Qcow2Image::create(&p, &CreateOptions { size, ..opts }).unwrap();
    let q = Arc::new(Qcow2Image::open(&p, &OpenOptions::default()).unwrap());
    let start = Arc::new(Barrier::new(THREADS as usize));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (q, start) = (q.clone(), start.clone());
            std::thread::spawn(move || {
                let base = t * REGION;
                let mut model = vec![0u8; REGION as usize];
                let mut x = 0x2545_f491_4f6c_dd1du64 ^ (t + 1);
                let mut rnd = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                start.wait();
                for i in 0..400u64 {
                    let r = rnd();
                    let off = r % REGION;
                    let len = (1 + (r >> 24) % 200_000).min(REGION - off);
                    let (o, l) = (off as usize, len as usize);
                    match (r >> 56) % 16 {
                        0 => {
                            q.write_zeroes(base + off, len, r & 1 == 0).unwrap();
                            model[o..o + l].fill(0);
                        }
                        1 => {
                            // Discard may keep or zero the range: make the model agree by
                            // reading back what it became.
                            q.discard(base + off, len).unwrap();
                            q.read_at(base + off, &mut model[o..o + l]).unwrap();
                        }
                        2 => q.flush().unwrap(),
                        3 if t == 0 && i % 50 == 3 => {
                            q.snapshot_create(&format!("s{i}")).unwrap();
                        }
                        _ => {
                            let data = pattern(r, l);
                            q.write_at(base + off, &data).unwrap();
                            model[o..o + l].copy_from_slice(&data);
                        }
                    }
                    if i % 7 == 0 {
                        let mut got = vec![0u8; l];
                        q.read_at(base + off, &mut got).unwrap();
                        assert!(
                            got == model[o..o + l],
                            "thread {t} step {i}: read-back differs"
                        );
                    }
                }
                let mut got = vec![0u8; REGION as usize];
                q.read_at(base, &mut got).unwrap();
                assert!(got == model, "thread {t}: region differs from its model");
                model
            })
        })
        .collect();
    let models: Vec<Vec<u8>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    q.close().unwrap();
    drop(q);
    qemu_check(&p);
    // qemu reads the same bytes.
    let raw = dir.path().join("expect.raw");
    std::fs::write(&raw, models.concat()).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&p)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn concurrent_writers_match_their_models_and_leave_a_clean_image() {
    hammer(
        CreateOptions {
            cluster_size: 4096,
            ..CreateOptions::default()
        },
        "plain.qcow2",
    );
}

#[test]
fn concurrent_writers_on_subclusters_match_their_models() {
    hammer(
        CreateOptions {
            cluster_size: 65536,
            extended_l2: true,
            ..CreateOptions::default()
        },
        "extl2.qcow2",
    );
}

#[test]
fn concurrent_writers_with_lazy_refcounts_and_small_clusters() {
    hammer(
        CreateOptions {
            cluster_size: 512,
            lazy_refcounts: true,
            refcount_bits: 4,
            ..CreateOptions::default()
        },
        "small.qcow2",
    );
}
