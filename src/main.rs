//! The `kiln` command line: `kiln run` boots a VM, `kiln img` manages disk images.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kiln_vmm::config::{
    BootEntry, ConsoleConfig, DiskConfig, MemorySize, NetConfig, RngConfig, RngSetting,
    SerialConfig,
};
use kiln_vmm::{PartialConfig, VmConfig, VmOutcome};

/// Exit status when the guest powered off.
const EXIT_POWEROFF: u8 = 0;
/// Exit status for a runtime error.
const EXIT_ERROR: u8 = 1;
/// Exit status for bad usage: flags, config file, values.
const EXIT_USAGE: u8 = 2;
/// Exit status when the guest rebooted.
const EXIT_REBOOT: u8 = 3;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "kiln: a virtual machine monitor for Linux KVM",
    long_about = "kiln runs virtual machines on Linux KVM: one VM per process, one thread per vCPU.\n\n\
        Boot a kernel:   kiln run --kernel vmlinux --cpus 2 --memory 1G --cmdline \"console=ttyS0\"\n\
        From a file:     kiln run --config vm.toml\n\
        Disk images:     kiln img --help",
    after_help = "Exit status of `kiln run`: 0 the guest powered off, 3 the guest rebooted, \
        1 an error (message on stderr), 2 bad usage, 128+N stopped by signal N."
)]
struct Cli {
    /// Log level on stderr: error, warn, info, debug (also KILN_LOG).
    #[arg(long, global = true, value_name = "LEVEL", value_parser = parse_level)]
    log_level: Option<log::LevelFilter>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until the guest powers off.
    #[command(
        long_about = "Boot a VM and run it until the guest powers off.\n\n\
            The kernel is an ELF vmlinux (PVH or 64-bit entry) or a bzImage. A bzImage's \
            compressed payload (gzip, lz4, zstd, xz, lzma) is unpacked by kiln, so the guest \
            skips its own decompressor.\n\n\
            Settings come from flags and/or --config FILE (TOML or JSON, keys named like the \
            flags: kernel, initrd, cmdline, cpus, memory, serial, entry); flags win.\n\n\
            With --serial stdio on a terminal, the terminal is in raw mode: Ctrl-A x quits, \
            Ctrl-A Ctrl-A sends Ctrl-A.",
        after_help = "Examples:\n  kiln run --kernel vmlinux --memory 512M\n  \
            kiln run --kernel bzImage --initrd initrd.img --cmdline \"console=ttyS0 root=/dev/ram0\" --cpus 4\n  \
            kiln run --config vm.toml --cpus 8\n\n\
            Exit status: 0 the guest powered off, 3 the guest rebooted, 1 an error, 2 bad usage, \
            128+N stopped by signal N."
    )]
    Run(Box<RunArgs>),
    /// Create, inspect and convert disk images (qemu-img compatible).
    #[command(disable_help_flag = true)]
    Img {
        /// Arguments, as for qemu-img.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Config file (TOML, or JSON); flags override its settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel image: ELF vmlinux or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: console=ttyS0].
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Number of vCPUs, 1 up to what KVM allows [default: 1].
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Guest RAM, e.g. 512M, 8G, 4T (a plain number means MiB) [default: 256M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<MemorySize>,
    /// First serial port (COM1): stdio, file:PATH or none [default: stdio].
    #[arg(long, value_name = "WHERE", value_parser = parse_serial)]
    serial: Option<SerialConfig>,
    /// Kernel entry point: auto (PVH if the ELF has the note), pvh or linux64 [default: auto].
    #[arg(long, value_name = "ENTRY", value_parser = parse_entry)]
    entry: Option<BootEntry>,
    /// A virtio-blk disk (repeatable): path=FILE[,readonly=on][,serial=ID][,direct=on]
    /// [,queues=N][,format=raw|qcow2][,transport=pci|mmio][,poll_us=N].
    #[arg(long, value_name = "SPEC", value_parser = parse_disk)]
    disk: Vec<DiskConfig>,
    /// A virtio-net interface on a host tap (repeatable): tap=NAME[,mac=MAC][,queues=N]
    /// [,transport=pci|mmio].
    #[arg(long, value_name = "SPEC", value_parser = parse_net)]
    net: Vec<NetConfig>,
    /// Give the guest a virtio-rng device (entropy from the host's getrandom); options:
    /// transport=pci|mmio, as in `--rng transport=mmio`.
    #[arg(
        long,
        value_name = "OPTIONS",
        num_args = 0..=1,
        default_missing_value = "",
        value_parser = parse_rng
    )]
    rng: Option<RngConfig>,
    /// A virtio console: stdio, file:PATH or socket:PATH[,transport=pci|mmio].
    #[arg(long, value_name = "WHERE", value_parser = parse_console)]
    console: Option<ConsoleConfig>,
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| "expected off, error, warn, info, debug or trace".to_string())
}

fn parse_size(s: &str) -> Result<MemorySize, String> {
    s.parse()
}

fn parse_serial(s: &str) -> Result<SerialConfig, String> {
    s.parse()
}

fn parse_entry(s: &str) -> Result<BootEntry, String> {
    s.parse()
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    s.parse()
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    s.parse()
}

fn parse_rng(s: &str) -> Result<RngConfig, String> {
    s.parse()
}

fn parse_console(s: &str) -> Result<ConsoleConfig, String> {
    s.parse()
}

/// A logger that writes `kiln: level: message` lines to stderr.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            if log::max_level() >= log::LevelFilter::Debug {
                let t = START.get().map_or(0.0, |s| s.elapsed().as_secs_f64() * 1e3);
                eprintln!(
                    "kiln: [{t:9.3} ms] {}: {}",
                    r.level().as_str().to_lowercase(),
                    r.args()
                );
            } else {
                eprintln!("kiln: {}: {}", r.level().as_str().to_lowercase(), r.args());
            }
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;
static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn init_logging(level: Option<log::LevelFilter>) {
    let level = level
        .or_else(|| std::env::var("KILN_LOG").ok().and_then(|v| v.parse().ok()))
        .unwrap_or(log::LevelFilter::Warn);
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

fn run(args: RunArgs) -> ExitCode {
    let flags = PartialConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory: args.memory,
        serial: args.serial,
        entry: args.entry,
        disk: (!args.disk.is_empty()).then_some(args.disk),
        net: (!args.net.is_empty()).then_some(args.net),
        rng: args.rng.map(RngSetting::With),
        console: args.console,
    };
    let file = match &args.config {
        Some(path) => match PartialConfig::from_file(path) {
            Ok(f) => f,
            Err(e) => return usage_error(&e),
        },
        None => PartialConfig::default(),
    };
    let cfg = match VmConfig::try_from(flags.merge(file)) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    match kiln_vmm::run(&cfg) {
        Ok(VmOutcome::PowerOff) | Ok(VmOutcome::Quit) => ExitCode::from(EXIT_POWEROFF),
        Ok(VmOutcome::Reset) => {
            log::info!("the guest rebooted");
            ExitCode::from(EXIT_REBOOT)
        }
        Ok(VmOutcome::Signal(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(EXIT_ERROR)),
        Err(e) => {
            eprintln!(
                "kiln: error: {}",
                anyhow::Error::new(e)
                    .chain()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(": ")
            );
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn usage_error(e: &dyn std::error::Error) -> ExitCode {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    eprintln!("kiln: error: {msg}");
    ExitCode::from(EXIT_USAGE)
}

fn main() -> ExitCode {
    START.get_or_init(std::time::Instant::now);
    let args: Vec<OsString> = std::env::args_os().collect();
    // `kiln img` takes qemu-img's syntax, which clap should not touch.
    if args.get(1).is_some_and(|a| a == "img") {
        let status = kiln_img::main(&args[2..]);
        return ExitCode::from(u8::try_from(status).unwrap_or(EXIT_ERROR));
    }
    let cli = Cli::parse();
    init_logging(cli.log_level);
    match cli.command {
        Command::Run(a) => run(*a),
        Command::Img { args } => {
            ExitCode::from(u8::try_from(kiln_img::main(&args)).unwrap_or(EXIT_ERROR))
        }
    }
}
