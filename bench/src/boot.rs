//! The boot benchmark: kiln vs QEMU microvm on the probe, and the probe's CPU loop vs native.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::cpuloop::cpu_loop;
use crate::proc::{median, run_vmm, RunResult};

/// Guest RAM for the runs: small, and the probe touches little of it.
const GUEST_MIB: u64 = 128;
/// Probe checks: nothing that touches much memory.
const CMDLINE: &str = "probe.checks=boot,acpi,cpu";
/// Targets from the issue.
const TARGET_READY_RATIO: f64 = 0.11;
const TARGET_RSS_KIB: u64 = 3 * 1024;
const TARGET_CPU: f64 = 0.98;

/// Command-line options.
pub struct Options {
    runs: usize,
    kiln: PathBuf,
    qemu: PathBuf,
    probe: PathBuf,
}

impl Options {
    /// Parses `--runs N --kiln P --qemu P --probe P`.
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let mut o = Options {
            runs: 7,
            kiln: PathBuf::from("target/x86_64-unknown-linux-gnu/release/kiln"),
            qemu: PathBuf::from("qemu-system-x86_64"),
            probe: PathBuf::from("guest/probe/target/x86_64-unknown-linux-gnu/release/probe"),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
            match a.as_str() {
                "--runs" => {
                    o.runs = val()?
                        .parse()
                        .map_err(|_| "--runs needs a number".to_string())?
                }
                "--kiln" => o.kiln = val()?.into(),
                "--qemu" => o.qemu = val()?.into(),
                "--probe" => o.probe = val()?.into(),
                _ => return Err(format!("unknown option {a}")),
            }
        }
        if o.runs < 5 {
            return Err("--runs must be at least 5".into());
        }
        Ok(o)
    }
}

fn kiln_cmd(o: &Options) -> Command {
    let mut c = Command::new(&o.kiln);
    c.args([
        "run",
        "--cpus",
        "1",
        "--memory",
        &format!("{GUEST_MIB}M"),
        "--cmdline",
        CMDLINE,
        "--kernel",
    ])
    .arg(&o.probe);
    c
}

fn qemu_cmd(o: &Options) -> Command {
    let mut c = Command::new(&o.qemu);
    c.args([
        "-M",
        "microvm",
        "-enable-kvm",
        "-smp",
        "1",
        "-m",
        &format!("{GUEST_MIB}M"),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-append",
        CMDLINE,
        "-kernel",
    ])
    .arg(&o.probe);
    c
}

fn field<T: std::str::FromStr>(output: &[String], check: &str, key: &str) -> Option<T> {
    let prefix = format!("PROBE {check} ok ");
    let line = output.iter().find(|l| l.starts_with(&prefix))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

/// Native TSC ticks per iteration of the probe's loop (one run, like one guest run).
pub fn native_tsc_per_iter(iters: u64) -> f64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    std::hint::black_box(cpu_loop(std::hint::black_box(iters)));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    (t1 - t0) as f64 / iters as f64
}

fn check(r: &RunResult, who: &str) -> Result<(), String> {
    if !r.success
        || !r
            .output
            .iter()
            .any(|l| l.starts_with("PROBE summary ok=") && l.ends_with("fail=0"))
    {
        return Err(format!("{who}: the probe did not pass: {:?}", r.output));
    }
    Ok(())
}

/// Runs the benchmark; returns whether every target was met.
pub fn run(o: &Options) -> Result<bool, String> {
    for p in [&o.kiln, &o.probe] {
        if !p.exists() {
            return Err(format!(
                "{} not found (build it first: see README.md)",
                p.display()
            ));
        }
    }
    let timeout = Duration::from_secs(60);
    let (mut k_ready, mut q_ready, mut k_rss, mut q_rss, mut k_cpu) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut native = vec![];
    for i in 0..o.runs {
        // Alternate which goes first, so neither always runs on a warmer machine.
        let order: [bool; 2] = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_kiln in order {
            let cmd = if is_kiln { kiln_cmd(o) } else { qemu_cmd(o) };
            let who = if is_kiln { "kiln" } else { "qemu" };
            let r = run_vmm(cmd, GUEST_MIB << 10, timeout).map_err(|e| format!("{who}: {e}"))?;
            if is_kiln {
                check(&r, who)?;
                k_ready.push(r.first_line.as_secs_f64() * 1e3);
                k_rss.push(r.peak_rss_kib as f64);
                k_cpu.push(field(&r.output, "cpu", "tsc_per_iter").ok_or("kiln: no cpu result")?);
                // The same loop natively, right after, under the same machine conditions.
                let iters = field(&r.output, "cpu", "iters").unwrap_or(100_000_000);
                native.push(native_tsc_per_iter(iters));
            } else {
                if !r.output.iter().any(|l| l == "PROBE hello") {
                    return Err(format!("qemu: the probe did not start: {:?}", r.output));
                }
                q_ready.push(r.first_line.as_secs_f64() * 1e3);
                q_rss.push(r.peak_rss_kib as f64);
            }
        }
    }
    let native = median(&mut native);

    let (kr, qr) = (median(&mut k_ready), median(&mut q_ready));
    let (ks, qs) = (median(&mut k_rss), median(&mut q_rss));
    let kc = median(&mut k_cpu);
    let ready_ratio = kr / qr;
    let cpu_ratio = native / kc;
    println!(
        "boot benchmark: {} runs each (medians), 1 vCPU, {GUEST_MIB} MiB, probe `{CMDLINE}`",
        o.runs
    );
    println!(
        "{:<38} {:>12} {:>14} {:>8}",
        "", "kiln", "qemu microvm", "ratio"
    );
    println!(
        "{:<38} {:>12.2} {:>14.2} {:>8.3}   target <= {TARGET_READY_RATIO}",
        "process start -> first guest line (ms)", kr, qr, ready_ratio
    );
    println!(
        "{:<38} {:>12.0} {:>14.0} {:>8.3}   target kiln <= {TARGET_RSS_KIB} KiB",
        "peak VMM RSS without guest RAM (KiB)",
        ks,
        qs,
        ks / qs
    );
    println!(
        "guest CPU loop: {kc:.3} TSC ticks/iter in kiln, {native:.3} native (medians, interleaved): {:.1}% of native   target >= {:.0}%",
        cpu_ratio * 100.0,
        TARGET_CPU * 100.0
    );
    let ok =
        ready_ratio <= TARGET_READY_RATIO && ks <= TARGET_RSS_KIB as f64 && cpu_ratio >= TARGET_CPU;
    println!("all targets met: {}", if ok { "yes" } else { "NO" });
    Ok(ok)
}
