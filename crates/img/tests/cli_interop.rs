//! `kiln img` against qemu-img: same command lines, same results. Skipped (with a message)
//! when qemu-img is not installed.

// Test code works on small, known sizes; truncating casts are intended there.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::{Command, Output};

const KILN: &str = env!("CARGO_BIN_EXE_kiln-img");

/// Fails the test loudly when qemu-img is missing: interop tests never pass by skipping.
fn require_qemu() {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "these interop tests need qemu-img (Debian package qemu-utils: apt-get install qemu-utils); they do not skip");
}

fn run(prog: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("spawn")
}

/// qemu's LUKS key-slot timing reads the thread CPU clock and gives up ("Unable to get
/// accurate CPU usage") when one round measured 0 ms, which a coarse clock on a busy VM
/// sometimes does: such a run is retried.
const QEMU_CLOCK_FLAKE: &str = "Unable to get accurate CPU usage";

fn ok(prog: &str, args: &[&str], dir: &Path) -> String {
    let mut o = run(prog, args, dir);
    for _ in 0..5 {
        if o.status.success() || !String::from_utf8_lossy(&o.stderr).contains(QEMU_CLOCK_FLAKE) {
            break;
        }
        o = run(prog, args, dir);
    }
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn kiln(args: &[&str], dir: &Path) -> String {
    ok(KILN, args, dir)
}

fn qemu(args: &[&str], dir: &Path) -> String {
    ok("qemu-img", args, dir)
}

fn qemu_io(img: &str, cmds: &[&str], dir: &Path) {
    let mut a = vec!["-f", "qcow2"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(img);
    let o = run("qemu-io", &a, dir);
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("failed"));
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad json {e}: {s}"))
}

fn same_data(a: &str, b: &str, dir: &Path) {
    let o = run("qemu-img", &["compare", a, b], dir);
    assert!(
        o.status.success(),
        "{a} vs {b}: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

fn clean(img: &str, dir: &Path) {
    qemu(&["check", img], dir);
}

fn write_pattern(path: &Path, size: usize) {
    let mut data = vec![0u8; size];
    for (i, chunk) in data.chunks_mut(65536).enumerate() {
        match i % 4 {
            0 => chunk.fill(0),
            1 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j * 31 + i) as u8),
            2 => chunk[..100].fill(0xaa),
            _ => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = ((j as u64 * 2654435761) >> 13) as u8),
        }
    }
    std::fs::write(path, data).unwrap();
}

#[test]
fn create_matches_qemu_info() {
    require_qemu();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for opts in [
        "",
        "compat=0.10",
        "cluster_size=4k,refcount_bits=8",
        "extended_l2=on,cluster_size=128k",
        "lazy_refcounts=on,compression_type=zstd",
        "preallocation=metadata",
        "refcount_bits=64,cluster_size=512",
    ] {
        let mut ka = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            ka.extend(["-o", opts]);
        }
        let (mut k, mut q) = (ka.clone(), ka.clone());
        k.extend(["k.qcow2", "100M"]);
        q.extend(["q.qcow2", "100M"]);
        kiln(&k, dir);
        qemu(&q, dir);
        clean("k.qcow2", dir);
        let mut ki = json(&qemu(&["info", "--output=json", "k.qcow2"], dir));
        let mut qi = json(&qemu(&["info", "--output=json", "q.qcow2"], dir));
        for v in [&mut ki, &mut qi] {
            let o = v.as_object_mut().unwrap();
            o.remove("filename");
            o.remove("actual-size");
        }
        assert_eq!(ki, qi, "info differs for -o '{opts}'");
        // And kiln's own info of the qemu image equals qemu's.
        let mut own = json(&kiln(&["info", "--output=json", "q.qcow2"], dir));
        own.as_object_mut().unwrap().remove("actual-size");
        own.as_object_mut().unwrap().remove("filename");
        assert_eq!(own, qi, "kiln info differs for -o '{opts}'");
    }
}

#[test]
fn info_check_map_measure_output_match_qemu() {
    require_qemu();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    write_pattern(&dir.join("base.raw"), 4 << 20);
    qemu(
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "t.qcow2", "8M",
        ],
        dir,
    );
    // (Holes in the image file inside data clusters only count where qemu looks for them:
    // see map_matches_qemu_on_preallocated_zeroed_and_subcluster_images.)
    qemu_io(
        "t.qcow2",
        &["write -P 1 0 128k", "write -z 1M 64k", "write -P 2 5M 320k"],
        dir,
    );
    qemu(&["snapshot", "-c", "snap", "t.qcow2"], dir);
    for args in [
        &["info", "t.qcow2"][..],
        &["info", "--output=json", "t.qcow2"],
        &["info", "--backing-chain", "--output=json", "t.qcow2"],
        &["check", "t.qcow2"],
        &["check", "--output=json", "t.qcow2"],
        &["map", "t.qcow2"],
        &["map", "--output=json", "t.qcow2"],
        &["map", "--output=json", "base.raw"],
        &["snapshot", "-l", "t.qcow2"],
        &["measure", "-O", "qcow2", "t.qcow2"],
        &[
            "measure",
            "--output=json",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "t.qcow2",
        ],
        &["measure", "--size", "10G", "-O", "qcow2"],
        &["measure", "--size", "10G", "-O", "raw"],
    ] {
        let k = kiln(args, dir);
        let q = qemu(args, dir);
        if args.contains(&"--output=json") {
            let (mut kj, mut qj) = (json(&k), json(&q));
            // actual-size depends on the file system's block accounting of the same file.
            assert_eq!(kj.take(), qj.take(), "{args:?}");
        } else {
            assert_eq!(k, q, "{args:?}");
        }
    }
}

#[test]
fn convert_both_directions_and_formats() {
    require_qemu();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    write_pattern(&dir.join("src.raw"), 8 << 20);
    // raw -> qcow2 (plain, compressed zlib/zstd, v2, subclusters), then back to raw.
    for (i, extra) in [
        vec![],
        vec!["-c"],
        vec!["-c", "-o", "compression_type=zstd"],
        vec!["-o", "compat=0.10,cluster_size=4k"],
        vec!["-o", "extended_l2=on"],
    ]
    .iter()
    .enumerate()
    {
        let out = format!("k{i}.qcow2");
        let mut a = vec!["convert", "-f", "raw", "-O", "qcow2"];
        a.extend(extra.iter().copied());
        a.extend(["src.raw", out.as_str()]);
        kiln(&a, dir);
        clean(&out, dir);
        same_data("src.raw", &out, dir);
        // qemu-img makes the same conversion; kiln converts it back to raw.
        let q = format!("q{i}.qcow2");
        let mut a = vec!["convert", "-f", "raw", "-O", "qcow2"];
        a.extend(extra.iter().copied());
        a.extend(["src.raw", q.as_str()]);
        qemu(&a, dir);
        let back = format!("back{i}.raw");
        kiln(&["convert", "-p", "-O", "raw", &q, &back], dir);
        assert_eq!(
            std::fs::read(dir.join("src.raw")).unwrap(),
            std::fs::read(dir.join(&back)).unwrap()
        );
    }
    // Compressed output really is compressed.
    let info = json(&qemu(&["check", "--output=json", "k1.qcow2"], dir));
    assert!(
        info["compressed-clusters"].as_u64().unwrap_or(0) > 0,
        "{info}"
    );
    // Snapshot source, -n into an existing target, and two sources concatenated.
    qemu(&["convert", "-O", "qcow2", "src.raw", "s.qcow2"], dir);
    qemu(&["snapshot", "-c", "old", "s.qcow2"], dir);
    qemu_io("s.qcow2", &["write -P 9 0 1M"], dir);
    kiln(
        &[
            "convert",
            "-l",
            "snapshot.name=old",
            "-O",
            "raw",
            "s.qcow2",
            "old.raw",
        ],
        dir,
    );
    same_data("old.raw", "src.raw", dir);
    qemu(&["create", "-q", "-f", "qcow2", "n.qcow2", "8M"], dir);
    qemu_io("n.qcow2", &["write -P 7 0 8M"], dir);
    kiln(&["convert", "-n", "-O", "qcow2", "src.raw", "n.qcow2"], dir);
    same_data("n.qcow2", "src.raw", dir);
    clean("n.qcow2", dir);
    kiln(
        &["convert", "-O", "qcow2", "src.raw", "src.raw", "two.qcow2"],
        dir,
    );
    qemu(
        &["convert", "-O", "qcow2", "src.raw", "src.raw", "qtwo.qcow2"],
        dir,
    );
    same_data("two.qcow2", "qtwo.qcow2", dir);
}

#[test]
fn snapshot_commit_rebase_resize_match_qemu() {
    require_qemu();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    write_pattern(&dir.join("base0.raw"), 4 << 20);
    // Build the same chain twice: base.qcow2 <- top.qcow2, one for each tool.
    for who in ["k", "q"] {
        let base = format!("{who}-base.qcow2");
        let top = format!("{who}-top.qcow2");
        qemu(&["convert", "-O", "qcow2", "base0.raw", &base], dir);
        qemu(
            &[
                "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
            ],
            dir,
        );
        qemu_io(
            &top,
            &[
                "write -P 0x31 64k 64k",
                "write -z 1M 64k",
                "write -P 0x32 2M 4k",
            ],
            dir,
        );
        let tool = |a: &[&str]| {
            if who == "k" {
                kiln(a, dir)
            } else {
                qemu(a, dir)
            }
        };
        tool(&["snapshot", "-c", "s1", &top]);
        qemu_io(&top, &["write -P 0x33 0 4k"], dir);
        tool(&["snapshot", "-c", "s2", &top]);
        tool(&["snapshot", "-a", "s1", &top]);
        tool(&["snapshot", "-d", "s2", &top]);
        tool(&["commit", &top]);
        tool(&["resize", &top, "+1M"]);
        tool(&["resize", &base, "6M"]);
        clean(&top, dir);
        clean(&base, dir);
    }
    same_data("k-top.qcow2", "q-top.qcow2", dir);
    same_data("k-base.qcow2", "q-base.qcow2", dir);
    // Safe rebase onto a different base keeps the guest view; unsafe only edits the header.
    for who in ["k", "q"] {
        let top = format!("{who}-top.qcow2");
        qemu(
            &[
                "create",
                "-q",
                "-f",
                "raw",
                &format!("{who}-empty.raw"),
                "6M",
            ],
            dir,
        );
        let tool = |a: &[&str]| {
            if who == "k" {
                kiln(a, dir)
            } else {
                qemu(a, dir)
            }
        };
        qemu_io(&top, &["write -P 0x44 3M 64k"], dir);
        tool(&[
            "rebase",
            "-b",
            &format!("{who}-empty.raw"),
            "-F",
            "raw",
            &top,
        ]);
        clean(&top, dir);
    }
    same_data("k-top.qcow2", "q-top.qcow2", dir);
    let ki = json(&qemu(&["info", "--output=json", "k-top.qcow2"], dir));
    assert_eq!(ki["backing-filename"], "k-empty.raw");
    kiln(&["rebase", "-u", "-b", "", "k-top.qcow2"], dir);
    let ki = json(&qemu(&["info", "--output=json", "k-top.qcow2"], dir));
    assert!(ki.get("backing-filename").is_none());
    // Shrinking needs --shrink, like qemu-img (and no internal snapshots).
    kiln(&["snapshot", "-d", "s1", "k-top.qcow2"], dir);
    assert!(!run(KILN, &["resize", "k-top.qcow2", "1M"], dir)
        .status
        .success());
    kiln(&["resize", "--shrink", "k-top.qcow2", "1M"], dir);
    clean("k-top.qcow2", dir);
}

#[test]
fn check_repairs_leaks_and_reports_exit_codes() {
    require_qemu();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    qemu(&["create", "-q", "-f", "qcow2", "l.qcow2", "16M"], dir);
    qemu_io("l.qcow2", &["write 0 64k"], dir);
    // Bump the refcount of a cluster nobody references: a leak.
    let p = dir.join("l.qcow2");
    let mut img = std::fs::read(&p).unwrap();
    let rt = u64::from_be_bytes(img[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(img[rt..rt + 8].try_into().unwrap()) as usize;
    let n_clusters = img.len() / 65536;
    img.resize((n_clusters + 1) * 65536, 0);
    let e = rb + n_clusters * 2;
    img[e..e + 2].copy_from_slice(&1u16.to_be_bytes());
    std::fs::write(&p, &img).unwrap();
    assert_eq!(run(KILN, &["check", "l.qcow2"], dir).status.code(), Some(3));
    assert_eq!(
        run("qemu-img", &["check", "l.qcow2"], dir).status.code(),
        Some(3)
    );
    let j = json(&String::from_utf8_lossy(
        &run(KILN, &["check", "--output=json", "l.qcow2"], dir).stdout,
    ));
    assert_eq!(j["leaks"], 1);
    kiln(&["check", "-r", "leaks", "l.qcow2"], dir);
    clean("l.qcow2", dir);
    // Raw images cannot be checked; compare reports differences with exit 1, errors with 2.
    qemu(&["create", "-q", "-f", "raw", "a.raw", "1M"], dir);
    qemu(&["create", "-q", "-f", "raw", "b.raw", "1M"], dir);
    assert_eq!(
        run(KILN, &["compare", "a.raw", "b.raw"], dir).status.code(),
        Some(0)
    );
    std::fs::write(dir.join("b.raw"), [vec![0u8; 1000], vec![1u8]].concat()).unwrap();
    qemu(&["resize", "-f", "raw", "b.raw", "1M"], dir);
    let o = run(KILN, &["compare", "a.raw", "b.raw"], dir);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "Content mismatch at offset 512!\n"
    );
    assert_eq!(
        run(KILN, &["compare", "a.raw", "missing.raw"], dir)
            .status
            .code(),
        Some(2)
    );
    // Errors are one line.
    let o = run(KILN, &["info", "missing.qcow2"], dir);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&o.stderr).lines().count(), 1);
}

#[test]
fn encrypted_images_with_secrets() {
    require_qemu();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    kiln(
        &[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=topsecret",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "e.qcow2",
            "4M",
        ],
        dir,
    );
    write_pattern(&dir.join("p.raw"), 4 << 20);
    kiln(
        &[
            "convert",
            "--object",
            "secret,id=sec0,data=topsecret",
            "-n",
            "-f",
            "raw",
            "--target-image-opts",
            "p.raw",
            "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=sec0",
        ],
        dir,
    );
    let io = "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=sec0";
    let o = run(
        "qemu-img",
        &[
            "compare",
            "--object",
            "secret,id=sec0,data=topsecret",
            "--image-opts",
            io,
            "driver=raw,file.filename=p.raw",
        ],
        dir,
    );
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let info = json(&kiln(&["info", "--output=json", "e.qcow2"], dir));
    assert_eq!(info["encrypted"], true);
    // The wrong key is refused with one clear line.
    let o = run(
        KILN,
        &[
            "convert",
            "--object",
            "secret,id=s,data=nope",
            "--image-opts",
            "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s",
            "-O",
            "raw",
            "x.raw",
        ],
        dir,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid password"));
}

#[test]
fn convert_takes_qemu_cache_modes_and_refuses_unknown_ones() {
    require_qemu();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    write_pattern(&dir.join("src.raw"), 1 << 20);
    for mode in ["unsafe", "writeback", "none", "writethrough", "directsync"] {
        kiln(
            &[
                "convert", "-t", mode, "-f", "raw", "-O", "qcow2", "src.raw", "k.qcow2",
            ],
            dir,
        );
        clean("k.qcow2", dir);
        same_data("src.raw", "k.qcow2", dir);
    }
    let args = [
        "convert", "-t", "bogus", "-f", "raw", "-O", "raw", "src.raw", "x.raw",
    ];
    let k = run(KILN, &args, dir);
    let q = run("qemu-img", &args, dir);
    assert!(!q.status.success());
    assert!(!k.status.success());
    assert!(
        String::from_utf8_lossy(&k.stderr).contains("Invalid cache option: bogus"),
        "{}",
        String::from_utf8_lossy(&k.stderr)
    );
}

/// Runs the same command with both tools and asserts the same exit status and stdout
/// (JSON compared as values; `actual-size` and `disk size` depend on the file system).
fn same_output(args: &[&str], dir: &Path) {
    let k = run(KILN, args, dir);
    let q = run("qemu-img", args, dir);
    assert_eq!(k.status.code(), q.status.code(), "{args:?}: exit status");
    let strip = |o: &Output| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.starts_with("disk size:") && !l.contains("\"actual-size\""))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&k), strip(&q), "{args:?}");
}

#[test]
fn info_of_encrypted_images_matches_qemu_with_luks_slot_details() {
    require_qemu();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let secret = "secret,id=s0,data=pw";
    qemu(&["create", "-q", "-f", "qcow2", "base.qcow2", "8M"], dir);
    for (tool, name, extra) in [
        ("qemu-img", "q.qcow2", ""),
        ("qemu-img", "qb.qcow2", "backing"),
        (KILN, "k.qcow2", ""),
    ] {
        let mut a = vec!["create", "-q", "-f", "qcow2", "--object", secret];
        a.extend([
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        ]);
        if extra == "backing" {
            a.extend(["-b", "base.qcow2", "-F", "qcow2"]);
        }
        a.extend([name, "8M"]);
        ok(tool, &a, dir);
        for args in [
            &["info", name][..],
            &["info", "--output=json", name],
            &["info", "--backing-chain", name],
        ] {
            same_output(args, dir);
        }
        let j = json(&kiln(&["info", "--output=json", name], dir));
        let slots = &j["format-specific"]["data"]["encrypt"]["slots"];
        assert_eq!(slots.as_array().map(Vec::len), Some(8), "{j}");
        assert_eq!(slots[0]["active"], true);
    }
    // Legacy AES: qemu-img can still make one.
    qemu(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            secret,
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s0",
            "aes.qcow2",
            "8M",
        ],
        dir,
    );
    same_output(&["info", "aes.qcow2"], dir);
    same_output(&["info", "--output=json", "aes.qcow2"], dir);
}

#[test]
fn encrypted_images_open_without_their_key_only_for_info() {
    require_qemu();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    qemu(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            "l.qcow2",
            "8M",
        ],
        dir,
    );
    for args in [
        &["check", "l.qcow2"][..],
        &["map", "l.qcow2"],
        &["compare", "l.qcow2", "l.qcow2"],
        &["convert", "-O", "raw", "l.qcow2", "o.raw"],
        &["snapshot", "-l", "l.qcow2"],
    ] {
        let k = run(KILN, args, dir);
        let q = run("qemu-img", args, dir);
        assert_eq!(k.status.code(), q.status.code(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&k.stderr).contains("'encrypt.key-secret' is required"),
            "{args:?}: {}",
            String::from_utf8_lossy(&k.stderr)
        );
    }
}

#[test]
fn map_matches_qemu_on_preallocated_zeroed_and_subcluster_images() {
    require_qemu();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // Metadata preallocation: qemu asks the file system, so holes in data clusters (and a
    // file shorter than the clusters it maps) show as zero.
    for (tool, name, opts) in [
        (
            "qemu-img",
            "pq.qcow2",
            "preallocation=metadata,cluster_size=4k",
        ),
        (KILN, "pk.qcow2", "preallocation=metadata"),
        (KILN, "pke.qcow2", "preallocation=metadata,extended_l2=on"),
    ] {
        ok(
            tool,
            &["create", "-q", "-f", "qcow2", "-o", opts, name, "8M"],
            dir,
        );
        qemu_io(
            name,
            &["write -P 1 1M 100k", "write -P 2 3M 6k", "write -z 5M 64k"],
            dir,
        );
    }
    // Zero flags that keep their cluster, and subclusters of allocated clusters.
    qemu(&["create", "-q", "-f", "qcow2", "z.qcow2", "8M"], dir);
    qemu_io(
        "z.qcow2",
        &[
            "write -P 1 0 1M",
            "write -z 0 128k",
            "write -z -u 512k 128k",
        ],
        dir,
    );
    qemu(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "e.qcow2",
            "8M",
        ],
        dir,
    );
    qemu_io(
        "e.qcow2",
        &["write -P 1 0 8k", "write -P 1 64k 64k", "write -z 256k 8k"],
        dir,
    );
    qemu(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "e.qcow2",
            "-F",
            "qcow2",
            "eb.qcow2",
            "8M",
        ],
        dir,
    );
    qemu_io("eb.qcow2", &["write -P 3 0 8k", "write -P 3 256k 8k"], dir);
    // Compressed clusters: qemu's human map stops with an error.
    qemu(&["create", "-q", "-f", "qcow2", "c.qcow2", "4M"], dir);
    qemu_io(
        "c.qcow2",
        &["write -c -P 1 0 64k", "write -P 2 1M 64k"],
        dir,
    );
    for name in [
        "pq.qcow2",
        "pk.qcow2",
        "pke.qcow2",
        "z.qcow2",
        "e.qcow2",
        "eb.qcow2",
        "c.qcow2",
    ] {
        same_output(&["map", name], dir);
        same_output(&["map", "--output=json", name], dir);
    }
}
