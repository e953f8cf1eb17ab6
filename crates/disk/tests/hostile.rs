//! Hostile images: thousands of mutated and truncated images go through open, read, write
//! and check. None may panic or hang; targeted corruptions get errors that name the problem.
//!
//! Every case runs `kiln_disk::testing::exercise_image`, the same workload as the fuzz
//! target, and the corpus in tests/corpus/qcow2 (seed images from qemu-img and kiln, plus
//! whatever `fuzz/run-stable.sh` adds) is replayed with mutations of each file.

// Test code works on small, known sizes; truncating casts are intended there.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use kiln_disk::qcow2::{CompressionType, CreateOptions};
use kiln_disk::{BlockDevice, OpenOptions, Qcow2Image};

/// The replayed corpus (see fuzz/run-stable.sh).
const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/qcow2");

/// Builds a small image using most features: data, zero clusters, compressed clusters,
/// a snapshot, subclusters optional.
fn seed_image(path: &Path, ext: bool) -> Vec<u8> {
    Qcow2Image::create(
        path,
        &CreateOptions {
            size: 1 << 20,
            cluster_size: if ext { 16384 } else { 4096 },
            extended_l2: ext,
            compression: CompressionType::Zstd,
            refcount_bits: 4,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let q = Qcow2Image::open(path, &OpenOptions::default()).unwrap();
    q.write_at(0, &[0x11; 20000]).unwrap();
    q.write_zeroes(65536, 65536, false).unwrap();
    let cs = q.cluster_size();
    q.write_compressed(12 * cs, &vec![0x22; cs as usize])
        .unwrap();
    q.snapshot_create("s").unwrap();
    q.write_at(1000, &[0x33; 5000]).unwrap();
    drop(q);
    std::fs::read(path).unwrap()
}

/// Runs the fuzz target's workload on `bytes` in a thread with a deadline.
fn run_case(dir: &Path, name: &str, bytes: &[u8]) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let (tx, rx) = mpsc::channel();
    let p2 = p.clone();
    let h = std::thread::spawn(move || {
        let r = std::panic::catch_unwind(|| kiln_disk::testing::exercise_image(&p2));
        let _ = tx.send(r.is_ok());
    });
    let failed = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(true) => None,
        Ok(false) => Some("panicked"),
        Err(_) => Some("hung"),
    };
    if let Some(how) = failed {
        // Keep the input for reproduction (and for the corpus once fixed).
        let keep = std::env::temp_dir().join(format!("kiln-hostile-{name}"));
        std::fs::write(&keep, bytes).unwrap();
        panic!("case {name} {how}; input saved to {}", keep.display());
    }
    let _ = h.join();
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn mutated_and_truncated_images_never_panic_or_hang() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for ext in [false, true] {
        let seed = seed_image(&dir.path().join("seed.qcow2"), ext);
        // Metadata lives in the first clusters and wherever the tables point; mutate mostly
        // there, sometimes anywhere.
        for case in 0..300 {
            let mut img = seed.clone();
            let flips = 1 + rng.below(8);
            for _ in 0..flips {
                let pos = if rng.below(4) == 0 {
                    rng.below(img.len())
                } else {
                    rng.below(img.len().min(8 * 16384))
                };
                match rng.below(3) {
                    0 => img[pos] ^= 1 << rng.below(8),
                    1 => img[pos] = 0xff,
                    _ => img[pos] = rng.next() as u8,
                }
            }
            run_case(dir.path(), &format!("m{ext}{case}.qcow2"), &img);
        }
        for cut in [
            0usize, 3, 4, 20, 71, 72, 100, 104, 111, 112, 200, 511, 4095, 4096, 4097, 10000, 20000,
        ] {
            let n = cut.min(seed.len());
            run_case(dir.path(), &format!("t{ext}{cut}.qcow2"), &seed[..n]);
        }
        for _ in 0..40 {
            let n = rng.below(seed.len());
            run_case(dir.path(), &format!("r{ext}{n}.qcow2"), &seed[..n]);
        }
    }
}

/// Flips, overwrites and truncates `img` a little, mostly in the metadata at its start.
fn mutate(rng: &mut Rng, img: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(8) {
        if img.is_empty() {
            return;
        }
        let pos = if rng.below(4) == 0 {
            rng.below(img.len())
        } else {
            rng.below(img.len().min(4096))
        };
        match rng.below(5) {
            0 => img[pos] ^= 1 << rng.below(8),
            1 => img[pos] = 0xff,
            2 => img[pos] = 0,
            3 => {
                let cut = pos.max(1);
                img.truncate(cut);
            }
            _ => img[pos] = rng.next() as u8,
        }
    }
}

#[test]
fn corpus_images_and_their_mutations_never_panic_or_hang() {
    let dir = tempfile::tempdir().unwrap();
    let mut files: Vec<_> = std::fs::read_dir(CORPUS)
        .unwrap_or_else(|e| panic!("corpus {CORPUS}: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 20,
        "corpus {CORPUS} has only {} files",
        files.len()
    );
    let mut rng = Rng(0x5851_f42d_4c95_7f2d);
    for (i, f) in files.iter().enumerate() {
        let seed = std::fs::read(f).unwrap();
        run_case(dir.path(), &format!("c{i}.qcow2"), &seed);
        for k in 0..12 {
            let mut img = seed.clone();
            mutate(&mut rng, &mut img);
            run_case(dir.path(), &format!("c{i}m{k}.qcow2"), &img);
        }
    }
}

fn put(img: &mut [u8], off: usize, v: &[u8]) {
    img[off..off + v.len()].copy_from_slice(v);
}

fn open_err(dir: &Path, bytes: &[u8]) -> String {
    let p = dir.join("bad.qcow2");
    std::fs::write(&p, bytes).unwrap();
    match Qcow2Image::open(
        &p,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    ) {
        Ok(_) => "opened".into(),
        Err(e) => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            s
        }
    }
}

#[test]
fn targeted_corruptions_get_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let seed = seed_image(&dir.path().join("seed.qcow2"), false);
    type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("bad magic", Box::new(|i| put(i, 0, b"QFI\0"))),
        ("version", Box::new(|i| put(i, 4, &7u32.to_be_bytes()))),
        (
            "cluster_bits",
            Box::new(|i| put(i, 20, &8u32.to_be_bytes())),
        ),
        (
            "cluster_bits",
            Box::new(|i| put(i, 20, &30u32.to_be_bytes())),
        ),
        (
            "refcount_order",
            Box::new(|i| put(i, 96, &7u32.to_be_bytes())),
        ),
        (
            "L1 table",
            Box::new(|i| put(i, 36, &u32::MAX.to_be_bytes())),
        ),
        (
            "L1 table",
            Box::new(|i| put(i, 40, &(1u64 << 50).to_be_bytes())),
        ),
        (
            "L1 table",
            Box::new(|i| put(i, 40, &0x1234u64.to_be_bytes())),
        ),
        (
            "refcount table",
            Box::new(|i| put(i, 56, &u32::MAX.to_be_bytes())),
        ),
        (
            "refcount table",
            Box::new(|i| put(i, 48, &(1u64 << 40).to_be_bytes())),
        ),
        (
            "snapshot",
            Box::new(|i| put(i, 60, &u32::MAX.to_be_bytes())),
        ),
        (
            "header_length",
            Box::new(|i| put(i, 100, &0x10_0000u32.to_be_bytes())),
        ),
        (
            "unsupported incompatible features",
            Box::new(|i| put(i, 72, &(1u64 << 40).to_be_bytes())),
        ),
        ("truncated", Box::new(|i| i.truncate(50))),
        (
            "L1 table",
            Box::new(|i| put(i, 24, &(1u64 << 62).to_be_bytes())),
        ),
    ];
    for (want, mutate) in cases {
        let mut img = seed.clone();
        mutate(&mut img);
        let err = open_err(dir.path(), &img);
        assert!(
            err.contains(want),
            "expected an error naming '{want}', got: {err}"
        );
    }
    // A backing file that is itself.
    let p = dir.path().join("selfish.qcow2");
    Qcow2Image::create(
        &p,
        &CreateOptions {
            size: 1 << 20,
            backing_file: Some("selfish.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let err = kiln_disk::open(&p, &OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("loop"), "{err}");
    // The corrupt bit keeps writers out.
    let mut img = seed.clone();
    let f = u64::from_be_bytes(img[72..80].try_into().unwrap()) | 2;
    put(&mut img, 72, &f.to_be_bytes());
    let p = dir.path().join("corrupt.qcow2");
    std::fs::write(&p, &img).unwrap();
    let err = Qcow2Image::open(&p, &OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("corrupt"), "{err}");
    assert!(Qcow2Image::open(
        &p,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        }
    )
    .is_ok());
}
