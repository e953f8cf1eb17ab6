//! kiln benchmarks. Each compares kiln against a baseline measured in the same run, and
//! prints medians and ratios, because timings on shared machines are noisy.
//!
//! `kiln-bench boot`: time from process start to the probe guest's first serial line, and
//! the VMM's peak RSS not counting guest RAM, for kiln and for QEMU's microvm booting the
//! same probe; and the probe's CPU loop against the same loop run natively.

mod blk;
mod boot;
#[path = "../../guest/probe/src/cpuloop.rs"]
mod cpuloop;
mod net;
mod proc;

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!(
        "usage: kiln-bench boot [--runs N] [--kiln PATH] [--qemu PATH] [--probe PATH]\n\
         \x20      kiln-bench blk [--runs N] [--secs N] [--size-mib N] [--dir DIR] [--only ROW] [--kiln P] [--qemu P] [--probe P]\n\
         \x20      kiln-bench net [--runs N] [--secs N] [--only ROW] [--kiln P] [--qemu P] [--probe P]\n\
         \x20      kiln-bench net-floor [--secs N]\n\
         \x20      kiln-bench cpuloop ITERS\n\n\
         Runs kiln and qemu-system-x86_64 -M microvm alternately on the probe guest and\n\
         prints medians: time to the first guest line, VMM RSS without guest RAM, and the\n\
         guest CPU loop against the same loop run natively.\n\
         blk runs the probe's virtio-blk benchmark under kiln (direct and cached) and QEMU\n\
         microvm against host fio on the same file.\n\
         net (as root: it creates a tap) runs the probe's virtio-net benchmark, guest to host\n\
         and host to guest, under kiln and QEMU microvm (vhost=off).\n\
         --only ROW runs only the rows whose name contains ROW (e.g. --only 'host->guest').\n\
         net-floor (as root) measures a thread that only reads frames from a tap: the\n\
         cost per frame that any userspace network backend starts from.\n\
         cpuloop runs the probe's CPU loop natively and prints TSC ticks per iteration."
    );
    ExitCode::from(2)
}

/// Runs one benchmark: exit 0 when its targets were met, 1 when not or on an error, 2 for
/// bad options.
fn bench<O>(opts: Result<O, String>, run: impl FnOnce(O) -> Result<bool, String>) -> ExitCode {
    match opts {
        Ok(opts) => match run(opts) {
            Ok(ok) => ExitCode::from(if ok { 0 } else { 1 }),
            Err(e) => {
                eprintln!("kiln-bench: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("kiln-bench: {e}");
            usage()
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("boot") => bench(boot::Options::parse(&args[1..]), |o| boot::run(&o)),
        Some("blk") => bench(blk::Options::parse(&args[1..]), |o| blk::run(&o)),
        Some("net") => bench(net::Options::parse(&args[1..]), |o| net::run(&o)),
        Some("net-floor") => bench(net::floor_secs(&args[1..]), net::floor),
        Some("cpuloop") => match args.get(1).and_then(|n| n.parse::<u64>().ok()) {
            Some(iters) if iters > 0 => {
                println!("{:.3}", boot::native_tsc_per_iter(iters));
                ExitCode::SUCCESS
            }
            _ => usage(),
        },
        _ => usage(),
    }
}
