//! The block benchmark (issue 4): the probe's ring-3 polling virtio-blk driver under kiln,
//! against host fio on the same file and against QEMU microvm running the same probe.
//!
//! Rows: 4 KiB random read and write IOPS (queue depth 32) and 1 MiB sequential read and
//! write MB/s. Columns: host fio (io_uring, O_DIRECT), host fio again while one thread spins
//! on a core (what a guest's polling driver does to its vCPU's core: on a small host this
//! bounds any VMM once the disk is fast enough that fio needs the CPU), kiln with
//! `direct=on`, kiln through the page cache, QEMU microvm (aio=io_uring, cache=none). Runs
//! are interleaved and the median of each cell is printed, with the two ratios the issue sets
//! targets for.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::proc::{median, qemu_microvm, result_line, run_sampling, IoThread};

/// Command-line options.
pub struct Options {
    runs: usize,
    kiln: PathBuf,
    qemu: PathBuf,
    probe: PathBuf,
    dir: PathBuf,
    size_mib: u64,
    secs: u64,
    /// Only the rows whose name contains this.
    only: Option<String>,
}

impl Options {
    /// Parses `--runs N --kiln P --qemu P --probe P --dir D --size-mib N --secs N --only TEXT`.
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let mut o = Options {
            runs: 3,
            kiln: PathBuf::from("target/x86_64-unknown-linux-gnu/release/kiln"),
            qemu: PathBuf::from("qemu-system-x86_64"),
            probe: PathBuf::from("guest/probe/target/x86_64-unknown-linux-gnu/release/probe"),
            dir: PathBuf::from("/var/tmp"),
            size_mib: 1024,
            secs: 3,
            only: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
            let num = |v: String| v.parse::<u64>().map_err(|_| format!("{a} needs a number"));
            match a.as_str() {
                "--runs" => o.runs = usize::try_from(num(val()?)?).map_err(|_| "--runs")?,
                "--kiln" => o.kiln = val()?.into(),
                "--qemu" => o.qemu = val()?.into(),
                "--probe" => o.probe = val()?.into(),
                "--only" => o.only = Some(val()?),
                "--dir" => o.dir = val()?.into(),
                "--size-mib" => o.size_mib = num(val()?)?,
                "--secs" => o.secs = num(val()?)?,
                _ => return Err(format!("unknown option {a}")),
            }
        }
        if o.runs == 0 || o.size_mib < 64 || o.secs == 0 {
            return Err("--runs >= 1, --size-mib >= 64, --secs >= 1".into());
        }
        Ok(o)
    }
}

#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    probe: &'static str,
    fio_rw: &'static str,
    bs: u64,
    /// Report IOPS (true) or MB/s.
    iops: bool,
}

const MODES: [Mode; 4] = [
    Mode {
        name: "4K random read",
        probe: "randread",
        fio_rw: "randread",
        bs: 4096,
        iops: true,
    },
    Mode {
        name: "4K random write",
        probe: "randwrite",
        fio_rw: "randwrite",
        bs: 4096,
        iops: true,
    },
    Mode {
        name: "1M sequential read",
        probe: "seqread",
        fio_rw: "read",
        bs: 1 << 20,
        iops: false,
    },
    Mode {
        name: "1M sequential write",
        probe: "seqwrite",
        fio_rw: "write",
        bs: 1 << 20,
        iops: false,
    },
];

const QD: u32 = 32;

fn metric(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

fn probe_cmdline(m: Mode, secs: u64) -> String {
    format!(
        "probe.checks=blk probe.blk_bench={},qd={QD},bs={},secs={secs}",
        m.probe, m.bs
    )
}

fn run_guest(mut cmd: Command, m: Mode, who: &str) -> Result<f64, String> {
    cmd.stdin(std::process::Stdio::null());
    let out = cmd.output().map_err(|e| format!("{who}: {e}"))?;
    guest_result(&out, m, who)
}

/// The probe's IOPS or MB/s from its output.
fn guest_result(out: &std::process::Output, m: Mode, who: &str) -> Result<f64, String> {
    let line = result_line(out, "blk_bench", who)?;
    metric(&line, if m.iops { "iops" } else { "mbps" })
        .ok_or_else(|| format!("{who}: unreadable {line}"))
}

/// The probe's result under kiln, and the share of a core that kiln's disk thread had
/// while the probe measured (NaN when the thread was not found).
fn kiln(o: &Options, img: &Path, m: Mode, direct: bool) -> Result<(f64, f64), String> {
    let mut c = Command::new(&o.kiln);
    let disk = format!(
        "path={},direct={}",
        img.display(),
        if direct { "on" } else { "off" }
    );
    c.args([
        "run",
        "--cpus",
        "1",
        "--memory",
        "512M",
        "--disk",
        &disk,
        "--cmdline",
        &probe_cmdline(m, o.secs),
        "--kernel",
    ])
    .arg(&o.probe);
    let who = if direct { "kiln direct" } else { "kiln" };
    let (out, busy) =
        run_sampling(c, o.secs, IoThread::Named("blk-q0")).map_err(|e| format!("{who}: {e}"))?;
    Ok((guest_result(&out, m, who)?, busy.unwrap_or(f64::NAN)))
}

fn qemu(o: &Options, img: &Path, m: Mode) -> Result<f64, String> {
    let drive = format!(
        "if=none,id=d0,file={},format=raw,aio=io_uring,cache=none",
        img.display()
    );
    let c = qemu_microvm(
        &o.qemu,
        &o.probe,
        &probe_cmdline(m, o.secs),
        &["-drive", &drive, "-device", "virtio-blk-pci,drive=d0"],
    );
    run_guest(c, m, "qemu")
}

/// Host fio; with `spin`, while a thread of this process spins on one core.
fn fio(o: &Options, img: &Path, m: Mode, spin: bool) -> Result<f64, String> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinner = spin.then(|| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    });
    let out = Command::new("fio")
        .args([
            "--name=kiln-bench",
            "--ioengine=io_uring",
            "--direct=1",
            "--time_based",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .arg(format!("--filename={}", img.display()))
        .arg(format!("--rw={}", m.fio_rw))
        .arg(format!("--bs={}", m.bs))
        .arg(format!("--iodepth={QD}"))
        .arg(format!("--runtime={}", o.secs))
        .output();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) = spinner {
        let _ = t.join();
    }
    let out = out.map_err(|e| format!("fio: {e} (Debian package fio)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.trim().split(';').collect();
    // terse v3: read bw KiB/s at 6, read iops at 7; write bw at 47, write iops at 48.
    let (bw, iops) = if m.fio_rw.contains("read") {
        (6, 7)
    } else {
        (47, 48)
    };
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    if m.iops {
        get(iops)
    } else {
        get(bw).map(|kib| kib * 1024.0 / 1e6)
    }
    .ok_or_else(|| {
        format!(
            "fio: unreadable output: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Runs the benchmark; returns whether both targets were met.
pub fn run(o: &Options) -> Result<bool, String> {
    for p in [&o.kiln, &o.probe] {
        if !p.exists() {
            return Err(format!(
                "{} not found (build it first: see README.md)",
                p.display()
            ));
        }
    }
    let img = o
        .dir
        .join(format!("kiln-bench-blk-{}.img", std::process::id()));
    // A fully written file, so nobody reads holes.
    let status = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "status=none", "conv=fsync"])
        .arg(format!("of={}", img.display()))
        .arg(format!("count={}", o.size_mib))
        .status()
        .map_err(|e| format!("dd: {e}"))?;
    if !status.success() {
        return Err(format!("cannot write {}", img.display()));
    }
    let result = measure(o, &img);
    let _ = std::fs::remove_file(&img);
    result
}

fn measure(o: &Options, img: &Path) -> Result<bool, String> {
    println!(
        "block benchmark: probe's polling virtio-blk driver, qd {QD}, {} s per run, {} runs each (medians), {} MiB file in {}",
        o.secs,
        o.runs,
        o.size_mib,
        o.dir.display()
    );
    println!(
        "{:<22} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "",
        "host fio",
        "fio 1 busy",
        "kiln direct",
        "kiln cached",
        "qemu",
        "direct/fio",
        "cached/qemu"
    );
    let mut ok = true;
    for m in MODES {
        if o.only
            .as_ref()
            .is_some_and(|t| !m.name.contains(t.as_str()))
        {
            continue;
        }
        let (mut f, mut fb, mut kd, mut kc, mut q) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut kd_busy, mut kc_busy) = (vec![], vec![]);
        for _ in 0..o.runs {
            f.push(fio(o, img, m, false)?);
            fb.push(fio(o, img, m, true)?);
            let (iops, busy) = kiln(o, img, m, true)?;
            kd.push(iops);
            kd_busy.push(busy);
            let (iops, busy) = kiln(o, img, m, false)?;
            kc.push(iops);
            kc_busy.push(busy);
            q.push(qemu(o, img, m)?);
        }
        let (f, fb, kd, kc, q) = (
            median(&mut f),
            median(&mut fb),
            median(&mut kd),
            median(&mut kc),
            median(&mut q),
        );
        let unit = if m.iops { "IOPS" } else { "MB/s" };
        println!(
            "{:<22} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>12.3} {:>12.2}   {unit}",
            m.name,
            f,
            fb,
            kd,
            kc,
            q,
            kd / f,
            kc / q
        );
        println!(
            "{:<22} kiln's disk thread (blk-q0): {:.0} % of a core (direct), {:.0} % (cached)",
            "",
            100.0 * median(&mut kd_busy),
            100.0 * median(&mut kc_busy)
        );
        if m.iops {
            ok &= kd / f >= 0.95 && kc / q >= 4.0;
        }
    }
    println!("targets (4K rows): kiln direct >= 0.95 x host fio; kiln cached >= 4 x QEMU microvm");
    println!("all targets met: {}", if ok { "yes" } else { "NO" });
    Ok(ok)
}
