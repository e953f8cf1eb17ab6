//! Kernel command line: `probe.*` options. Other words are ignored.
//!
//! - `probe.checks=boot,acpi,smp,mem,cpu,rtc,pci,rng,blk,net,console,hostile,msix,intx`
//!   (default: the first six; the PCI and virtio checks run only when named)
//! - `probe.mem=full|sample` (default full)
//! - `probe.cpu_iters=N` (default [`crate::cpu::DEFAULT_ITERS`])
//! - `probe.smp_timeout_ms=N` (default 10000)
//! - `probe.fault=ud|pf|gp|de`: raise that CPU exception right after ACPI is
//!   parsed (tests the fault report and the VMM's handling of a dying guest)
//! - `probe.end=poweroff|reset|i8042|triplefault`: how the probe ends after
//!   the summary (default poweroff): the FADT reset register, the i8042 reset
//!   line, or a triple fault (tests how a VMM reports each)
//! - the device options (`probe.blk_*`, `probe.net_*`, `probe.console_*`,
//!   `probe.hostile*`) are in [`crate::devopts`]

use crate::devopts::DevOptions;
use crate::fault::Fault;
use crate::util::Reason;
use crate::{emit, reason};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Check {
    Boot,
    Acpi,
    Smp,
    Mem,
    Cpu,
    Rtc,
    Pci,
    Rng,
    Blk,
    Net,
    Console,
    Hostile,
    Msix,
    Intx,
}

impl Check {
    /// Every check, in the order they run and report.
    pub const ALL: [Check; 14] = [
        Check::Boot,
        Check::Acpi,
        Check::Smp,
        Check::Mem,
        Check::Cpu,
        Check::Rtc,
        Check::Pci,
        Check::Rng,
        Check::Blk,
        Check::Net,
        Check::Console,
        Check::Hostile,
        Check::Msix,
        Check::Intx,
    ];
    /// The checks that run when `probe.checks` is not given.
    pub const DEFAULT: [Check; 6] = [Check::Boot, Check::Acpi, Check::Smp, Check::Mem, Check::Cpu, Check::Rtc];

    pub fn name(self) -> &'static str {
        match self {
            Check::Boot => "boot",
            Check::Acpi => "acpi",
            Check::Smp => "smp",
            Check::Mem => "mem",
            Check::Cpu => "cpu",
            Check::Rtc => "rtc",
            Check::Pci => "pci",
            Check::Rng => "rng",
            Check::Blk => "blk",
            Check::Net => "net",
            Check::Console => "console",
            Check::Hostile => "hostile",
            Check::Msix => "msix",
            Check::Intx => "intx",
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MemMode {
    Full,
    Sample,
}

impl MemMode {
    pub fn name(self) -> &'static str {
        match self {
            MemMode::Full => "full",
            MemMode::Sample => "sample",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    checks: u32,
    pub mem: MemMode,
    pub cpu_iters: u64,
    pub smp_timeout_ms: u64,
    pub fault: Option<Fault>,
    pub end: End,
    pub dev: DevOptions,
}

/// How the probe ends once the checks are done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// ACPI power-off.
    PowerOff,
    /// The FADT reset register (ACPI reset).
    Reset,
    /// The i8042 "pulse reset line" command.
    I8042,
    /// A triple fault (an exception with an empty IDT).
    TripleFault,
}

impl Options {
    pub fn enabled(&self, c: Check) -> bool {
        self.checks & c.bit() != 0
    }

    /// Whether any virtio device check is selected.
    pub fn needs_virtio(&self) -> bool {
        [Check::Rng, Check::Blk, Check::Net, Check::Console, Check::Hostile, Check::Msix, Check::Intx]
            .iter()
            .any(|&c| self.enabled(c))
    }

    /// Whether any check that needs PCI enumeration is selected.
    pub fn needs_pci(&self) -> bool {
        [Check::Pci, Check::Rng, Check::Blk, Check::Net, Check::Console, Check::Hostile, Check::Msix, Check::Intx]
            .iter()
            .any(|&c| self.enabled(c))
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            checks: Check::DEFAULT.iter().fold(0, |m, c| m | c.bit()),
            mem: MemMode::Full,
            cpu_iters: crate::cpu::DEFAULT_ITERS,
            smp_timeout_ms: 10_000,
            fault: None,
            end: End::PowerOff,
            dev: DevOptions::default(),
        }
    }
}

pub(crate) fn parse_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0')))
}

pub(crate) fn show(v: &[u8]) -> &str {
    core::str::from_utf8(v).unwrap_or("<non-utf8>")
}

/// Applies one `probe.key=value` word; `Err` is the reason for a fail line.
fn apply(opts: &mut Options, key: &[u8], value: Option<&[u8]>) -> Result<(), Reason> {
    let Some(v) = value else {
        return Err(reason!("option without value: probe.{}", show(key)));
    };
    match key {
        b"checks" => {
            let mut mask = 0;
            for name in v.split(|&b| b == b',').filter(|n| !n.is_empty()) {
                match Check::ALL.iter().find(|c| c.name().as_bytes() == name) {
                    Some(c) => mask |= c.bit(),
                    None => return Err(reason!("unknown check in probe.checks: {}", show(name))),
                }
            }
            opts.checks = mask;
        }
        b"mem" => {
            opts.mem = match v {
                b"full" => MemMode::Full,
                b"sample" => MemMode::Sample,
                _ => return Err(reason!("bad value for probe.mem: {}", show(v))),
            }
        }
        b"cpu_iters" => match parse_u64(v) {
            Some(n) if n > 0 => opts.cpu_iters = n,
            _ => return Err(reason!("bad value for probe.cpu_iters: {}", show(v))),
        },
        b"smp_timeout_ms" => match parse_u64(v) {
            Some(n) => opts.smp_timeout_ms = n,
            None => return Err(reason!("bad value for probe.smp_timeout_ms: {}", show(v))),
        },
        b"fault" => match Fault::parse(v) {
            Some(f) => opts.fault = Some(f),
            None => return Err(reason!("bad value for probe.fault: {}", show(v))),
        },
        b"end" => {
            opts.end = match v {
                b"poweroff" => End::PowerOff,
                b"reset" => End::Reset,
                b"i8042" => End::I8042,
                b"triplefault" => End::TripleFault,
                _ => return Err(reason!("bad value for probe.end: {}", show(v))),
            }
        }
        _ => {
            if !opts.dev.apply(key, v)? {
                return Err(reason!("unknown option probe.{}", show(key)));
            }
        }
    }
    Ok(())
}

/// Parses the command line, printing `PROBE cmdline fail <reason>` for each
/// bad `probe.*` word. Returns the options and the number of fail lines.
pub fn parse(cmdline: &[u8]) -> (Options, u32) {
    let mut opts = Options::default();
    let mut fails = 0;
    for word in cmdline.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()) {
        let Some(rest) = word.strip_prefix(b"probe.") else { continue };
        let (key, value) = match rest.iter().position(|&b| b == b'=') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if let Err(r) = apply(&mut opts, key, value) {
            emit!("PROBE cmdline fail {}", r);
            fails += 1;
        }
    }
    (opts, fails)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_enable_every_check_with_full_memory_test() {
        let (o, fails) = parse(b"console=ttyS0 quiet");
        assert_eq!(fails, 0);
        assert!(Check::DEFAULT.iter().all(|&c| o.enabled(c)));
        assert!(!o.enabled(Check::Pci) && !o.needs_pci());
        assert_eq!(o.mem, MemMode::Full);
        assert_eq!(o.cpu_iters, crate::cpu::DEFAULT_ITERS);
        assert_eq!(o.smp_timeout_ms, 10_000);
    }

    #[test]
    fn selects_checks_and_values() {
        let (o, fails) = parse(b"a probe.checks=smp,rtc probe.mem=sample probe.cpu_iters=42 probe.smp_timeout_ms=5 b");
        assert_eq!(fails, 0);
        assert!(o.enabled(Check::Smp) && o.enabled(Check::Rtc));
        assert!(!o.enabled(Check::Boot) && !o.enabled(Check::Mem));
        assert_eq!((o.mem, o.cpu_iters, o.smp_timeout_ms), (MemMode::Sample, 42, 5));
        assert_eq!(o.fault, None);
        assert_eq!(parse(b"probe.fault=pf").0.fault, Some(Fault::Pf));
        assert_eq!(o.end, End::PowerOff);
        assert_eq!(parse(b"probe.end=triplefault").0.end, End::TripleFault);
        assert_eq!(parse(b"probe.end=reset").0.end, End::Reset);
        assert_eq!(parse(b"probe.end=never").1, 1);
        let (m, fails) = parse(b"probe.checks=msix");
        assert_eq!(fails, 0);
        assert!(m.enabled(Check::Msix) && m.needs_pci() && m.needs_virtio());
    }

    #[test]
    fn counts_a_fail_for_each_bad_probe_word() {
        let (o, fails) =
            parse(b"probe.nope=1 probe.mem=half probe.cpu_iters=0 probe.checks=boot,disk probe.smp_timeout_ms probe.x probe.fault=oops");
        assert_eq!(fails, 7);
        assert_eq!(o.mem, MemMode::Full);
    }

    #[test]
    fn ignores_words_that_only_look_similar() {
        let (_, fails) = parse(b"probe probex=1 noprobe.mem=x");
        assert_eq!(fails, 0);
    }
}
