//! Library-level interop with qemu-img / qemu-io: images either side makes are read and
//! checked by the other. Skipped (with a message) when qemu-img is not installed.

// Test code works on small, known sizes; truncating casts are intended there.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_disk::qcow2::{CompressionType, CreateOptions, EncryptOptions, Prealloc, RepairMode};
use kiln_disk::{open, BlockDevice, ExtentKind, OpenOptions, Qcow2Image};

/// Fails the test loudly when qemu-img is missing: interop tests never pass by skipping.
fn require_qemu() {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "these interop tests need qemu-img (Debian package qemu-utils: apt-get install qemu-utils); they do not skip");
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(img: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("qcow2");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(img);
    let out = c.output().expect("run qemu-io");
    assert!(
        out.status.success(),
        "qemu-io failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "qemu-io: {text}");
}

fn check_clean(img: &Path) {
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

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(dev.size()).unwrap()];
    dev.read_at(0, &mut buf).unwrap();
    buf
}

fn raw_of(img: &Path, fmt: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("out.raw");
    qemu_img(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

fn rw() -> OpenOptions {
    OpenOptions::default()
}

/// Writes a mix of patterns through kiln, then lets qemu-img check and read the result.
fn kiln_writes_then_qemu_reads(opts: CreateOptions, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    Qcow2Image::create(&p, &opts).unwrap();
    let size = opts.size as usize;
    let mut expect = vec![0u8; size];
    {
        let img = Qcow2Image::open(&p, &rw()).unwrap();
        let writes: &[(usize, usize)] = &[
            (0, 4096),
            (65536 * 3 + 100, 70000),
            (size - 5000, 5000),
            (1 << 20, 1 << 20),
            (777, 1),
        ];
        for (i, &(off, len)) in writes.iter().enumerate() {
            let data = pattern(i as u64 + 1, len);
            img.write_at(off as u64, &data).unwrap();
            expect[off..off + len].copy_from_slice(&data);
        }
        img.write_zeroes(1 << 20, 65536 * 2, true).unwrap();
        expect[1 << 20..(1 << 20) + 65536 * 2].fill(0);
        assert_eq!(read_all(&img), expect);
    }
    check_clean(&p);
    assert_eq!(raw_of(&p, "qcow2", dir.path()), expect, "{name}");
}

#[test]
fn kiln_images_pass_qemu_check_for_every_layout() {
    require_qemu();
    let base = CreateOptions {
        size: 8 << 20,
        ..CreateOptions::default()
    };
    kiln_writes_then_qemu_reads(base.clone(), "default.qcow2");
    kiln_writes_then_qemu_reads(
        CreateOptions {
            version: 2,
            ..base.clone()
        },
        "v2.qcow2",
    );
    for cs in [512u64, 4096, 2 << 20] {
        kiln_writes_then_qemu_reads(
            CreateOptions {
                cluster_size: cs,
                ..base.clone()
            },
            "cs.qcow2",
        );
    }
    for bits in [1u32, 2, 4, 8, 32, 64] {
        kiln_writes_then_qemu_reads(
            CreateOptions {
                refcount_bits: bits,
                cluster_size: 4096,
                ..base.clone()
            },
            "rc.qcow2",
        );
    }
    kiln_writes_then_qemu_reads(
        CreateOptions {
            extended_l2: true,
            ..base.clone()
        },
        "ext.qcow2",
    );
    kiln_writes_then_qemu_reads(
        CreateOptions {
            lazy_refcounts: true,
            ..base.clone()
        },
        "lazy.qcow2",
    );
    kiln_writes_then_qemu_reads(
        CreateOptions {
            preallocation: Prealloc::Metadata,
            ..base
        },
        "pre.qcow2",
    );
}

#[test]
fn qemu_images_read_byte_exact() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    for opts in [
        "compat=1.1",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=64",
        "extended_l2=on",
        "extended_l2=on,cluster_size=2M",
        "lazy_refcounts=on",
        "preallocation=metadata",
    ] {
        let p = dir.path().join("q.qcow2");
        let ps = p.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, ps, "16M"]);
        qemu_io(
            ps,
            &[
                "write -P 0x11 0 1M",
                "write -P 0x22 3M 4k",
                "write -z 128k 64k",
                "write -P 0x33 15M 300k",
                "discard 15M 64k",
            ],
        );
        let expect = raw_of(&p, "qcow2", dir.path());
        let img = open(
            &p,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        assert_eq!(read_all(img.as_ref()), expect, "options {opts}");
    }
}

#[test]
fn compressed_clusters_both_directions() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; 4 << 20];
    for (i, chunk) in data.chunks_mut(65536).enumerate() {
        if i % 3 != 2 {
            let text: Vec<u8> = format!("cluster {i} is compressible text; ")
                .bytes()
                .cycle()
                .take(chunk.len())
                .collect();
            chunk.copy_from_slice(&text);
        }
    }
    data[65536 * 5..65536 * 6].copy_from_slice(&pattern(9, 65536));
    std::fs::write(&src, &data).unwrap();
    for ct in ["zlib", "zstd"] {
        // qemu-img writes compressed, kiln reads.
        let q = dir.path().join(format!("q-{ct}.qcow2"));
        let o = format!("compression_type={ct}");
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &o,
            src.to_str().unwrap(),
            q.to_str().unwrap(),
        ]);
        let img = open(
            &q,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        assert_eq!(read_all(img.as_ref()), data, "{ct} written by qemu");
        // kiln writes compressed, qemu reads.
        let k = dir.path().join(format!("k-{ct}.qcow2"));
        let compression = if ct == "zstd" {
            CompressionType::Zstd
        } else {
            CompressionType::Deflate
        };
        Qcow2Image::create(
            &k,
            &CreateOptions {
                size: data.len() as u64,
                compression,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        {
            let img = Qcow2Image::open(&k, &rw()).unwrap();
            for (i, chunk) in data.chunks(65536).enumerate() {
                if chunk.iter().any(|&b| b != 0) {
                    img.write_compressed(i as u64 * 65536, chunk).unwrap();
                }
            }
            let st = img.block_status(0, 65536).unwrap();
            assert!(st.compressed && st.kind == ExtentKind::Data);
            // Overwriting part of a compressed cluster turns it into a normal one.
            img.write_at(100, b"hello").unwrap();
        }
        data[100..105].copy_from_slice(b"hello");
        check_clean(&k);
        assert_eq!(
            raw_of(&k, "qcow2", dir.path()),
            data,
            "{ct} written by kiln"
        );
        let fresh = std::fs::read(&src).unwrap();
        data.copy_from_slice(&fresh);
    }
}

#[test]
fn backing_chains_both_directions() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    std::fs::write(&base, pattern(1, 4 << 20)).unwrap();
    let mid = d.join("mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        mid.to_str().unwrap(),
    ]);
    qemu_io(
        mid.to_str().unwrap(),
        &["write -P 0x44 64k 64k", "write -z 1M 128k"],
    );
    let top = d.join("top.qcow2");
    Qcow2Image::create(
        &top,
        &CreateOptions {
            size: 4 << 20,
            backing_file: Some("mid.qcow2".into()),
            backing_format: Some("qcow2".into()),
            extended_l2: true,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    {
        let img = open(&top, &rw()).unwrap();
        img.write_at(70000, &[0x55; 3000]).unwrap();
        img.write_at((2 << 20) + 1, &[0x66; 10]).unwrap();
    }
    check_clean(&top);
    let expect = raw_of(&top, "qcow2", d);
    let img = open(
        &top,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(read_all(img.as_ref()), expect);
    assert_eq!(&expect[70000..73000], &[0x55; 3000][..]);
}

#[test]
fn backing_loop_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    let mk = |p: &PathBuf, back: &str| {
        Qcow2Image::create(
            p,
            &CreateOptions {
                size: 1 << 20,
                backing_file: Some(back.into()),
                backing_format: Some("qcow2".into()),
                ..CreateOptions::default()
            },
        )
    };
    // Create b first with a placeholder raw backing, then a -> b, then b -> a.
    std::fs::write(dir.path().join("x.raw"), vec![0u8; 1 << 20]).unwrap();
    mk(&b, "x.raw").unwrap();
    mk(&a, "b.qcow2").unwrap();
    {
        let img = Qcow2Image::open(
            &b,
            &OpenOptions {
                no_backing: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        img.set_backing(Some("a.qcow2"), Some("qcow2")).unwrap();
    }
    let err = open(&a, &rw()).err().expect("loop must fail");
    assert!(err.to_string().contains("loop"), "{err}");
    let selfref = dir.path().join("self.qcow2");
    mk(&selfref, "self.qcow2").unwrap();
    assert!(open(&selfref, &rw())
        .err()
        .unwrap()
        .to_string()
        .contains("loop"));
}

#[test]
fn snapshots_interop_with_qemu() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    let ps = p.to_str().unwrap();
    Qcow2Image::create(
        &p,
        &CreateOptions {
            size: 4 << 20,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let v1 = pattern(1, 4 << 20);
    {
        let img = Qcow2Image::open(&p, &rw()).unwrap();
        img.write_at(0, &v1).unwrap();
        img.snapshot_create("one").unwrap();
        img.write_at(65536, &[9u8; 100_000]).unwrap();
        img.snapshot_create("two").unwrap();
        img.write_at(3 << 20, &[7u8; 4096]).unwrap();
    }
    check_clean(&p);
    let list = qemu_img(&["snapshot", "-l", ps]);
    assert!(list.contains("one") && list.contains("two"), "{list}");
    // qemu applies kiln's snapshot: data must be v1.
    qemu_img(&["snapshot", "-a", "one", ps]);
    check_clean(&p);
    assert_eq!(raw_of(&p, "qcow2", dir.path()), v1);
    // qemu makes one; kiln applies and deletes.
    qemu_io(ps, &["write -P 0x77 0 64k"]);
    qemu_img(&["snapshot", "-c", "three", ps]);
    {
        let img = Qcow2Image::open(&p, &rw()).unwrap();
        img.snapshot_apply("two").unwrap();
        let mut b = vec![0u8; 100_000];
        img.read_at(65536, &mut b).unwrap();
        assert_eq!(b, vec![9u8; 100_000]);
        img.snapshot_delete("one").unwrap();
        img.snapshot_delete("two").unwrap();
        img.snapshot_apply("three").unwrap();
    }
    check_clean(&p);
    let mut expect = v1.clone();
    expect[..65536].fill(0x77);
    assert_eq!(raw_of(&p, "qcow2", dir.path()), expect);
    let img = Qcow2Image::open(&p, &rw()).unwrap();
    img.snapshot_delete("three").unwrap();
    drop(img);
    check_clean(&p);
}

#[test]
fn luks_both_directions() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.qcow2");
    let qs = q.to_str().unwrap();
    // qemu's PBKDF benchmark sometimes reports "Unable to get accurate CPU usage": retry.
    let created = (0..5).any(|_| {
        Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "--object",
                "secret,id=s0,data=hunter2",
                "-f",
                "qcow2",
                "-o",
            ])
            .args([
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=50",
                qs,
                "2M",
            ])
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(created, "qemu-img could not create a LUKS image");
    let st = Command::new("qemu-io")
        .args([
            "--object",
            "secret,id=s0,data=hunter2",
            "--image-opts",
            "-c",
            "write -P 0x5a 4096 8192",
        ])
        .arg(format!(
            "driver=qcow2,file.filename={qs},encrypt.key-secret=s0"
        ))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let opts = OpenOptions {
        key: Some(b"hunter2".to_vec()),
        ..OpenOptions::default()
    };
    {
        let img = open(&q, &opts).unwrap();
        let mut b = vec![0u8; 12288];
        img.read_at(0, &mut b).unwrap();
        assert_eq!(&b[..4096], &[0u8; 4096][..]);
        assert_eq!(&b[4096..], &[0x5au8; 8192][..]);
        img.write_at(100_000, b"written by kiln").unwrap();
    }
    let bad = OpenOptions {
        key: Some(b"wrong".to_vec()),
        ..OpenOptions::default()
    };
    assert!(open(&q, &bad).is_err());
    // kiln creates, qemu reads.
    let k = dir.path().join("k.qcow2");
    Qcow2Image::create(
        &k,
        &CreateOptions {
            size: 2 << 20,
            encrypt: Some(EncryptOptions {
                passphrase: b"hunter2".to_vec(),
                iter_time_ms: 10,
            }),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    {
        let img = open(&k, &opts).unwrap();
        img.write_at(0, &[0xa5; 70000]).unwrap();
    }
    qemu_img(&[
        "check",
        "--object",
        "secret,id=s0,data=hunter2",
        "--image-opts",
        &format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=s0",
            k.display()
        ),
    ]);
    let out = dir.path().join("k.raw");
    qemu_img(&[
        "convert",
        "--object",
        "secret,id=s0,data=hunter2",
        "--image-opts",
        &format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=s0",
            k.display()
        ),
        "-O",
        "raw",
        out.to_str().unwrap(),
    ]);
    let raw = std::fs::read(out).unwrap();
    assert_eq!(&raw[..70000], &[0xa5; 70000][..]);
    assert!(raw[70000..].iter().all(|&b| b == 0));
}

#[test]
fn dirty_lazy_image_is_repaired_on_open() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.qcow2");
    Qcow2Image::create(
        &p,
        &CreateOptions {
            size: 4 << 20,
            lazy_refcounts: true,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    {
        let img = Qcow2Image::open(&p, &rw()).unwrap();
        img.write_at(0, &[1u8; 300_000]).unwrap();
        img.flush().unwrap();
        // Simulate a crash: never close (leak the handle so Drop does not clean up).
        std::mem::forget(img);
    }
    let info = Qcow2Image::open(
        &p,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap()
    .info();
    assert!(
        info.dirty,
        "dirty bit must be set after an unclean lazy-refcount session"
    );
    let img = Qcow2Image::open(&p, &rw()).unwrap();
    let rep = img.check(RepairMode::None).unwrap();
    assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.messages);
    drop(img);
    check_clean(&p);
}

#[test]
fn legacy_aes_images_from_qemu_read_but_refuse_writes() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("aes.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=pw12",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s0",
        ps,
        "1M",
    ]);
    let st = Command::new("qemu-io")
        .args([
            "--object",
            "secret,id=s0,data=pw12",
            "--image-opts",
            "-c",
            "write -P 0x61 4096 8192",
        ])
        .arg(format!(
            "driver=qcow2,file.filename={ps},encrypt.key-secret=s0"
        ))
        .output()
        .unwrap();
    assert!(st.status.success());
    let img = open(
        &p,
        &OpenOptions {
            key: Some(b"pw12".to_vec()),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let mut b = vec![0u8; 16384];
    img.read_at(0, &mut b).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0));
    assert!(b[4096..12288].iter().all(|&x| x == 0x61));
    assert!(
        img.write_at(0, &[1u8; 512]).is_err(),
        "legacy AES must be read-only"
    );
}
