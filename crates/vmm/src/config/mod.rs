//! `VmConfig`: the one description of a VM. CLI flags and config files (JSON or TOML, one
//! schema) both produce a [`PartialConfig`]; [`PartialConfig::merge`] lays flags over the
//! file and [`VmConfig::try_from`] validates once, naming the flag and the value at fault.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod devices;

pub use devices::{
    ConsoleConfig, ConsoleTarget, DiskConfig, DiskFormat, MacAddr, NetConfig, RngConfig,
    RngSetting, Transport,
};

/// Most vCPUs a config may ask for; KVM's own limit is checked when the VM is built.
pub const MAX_CPUS: u32 = 4096;
/// Smallest guest RAM.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest RAM kiln accepts in a config; the host's physical address width is checked
/// when the VM is built.
pub const MAX_MEMORY: u64 = 64 << 40;
/// RAM when none is given.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Command line when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

/// Configuration errors. Each names the setting (as its flag) and the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is out of range or malformed.
    #[error("{flag} {value}: {reason}")]
    Invalid {
        /// The flag (`--cpus`), which is also the config key without the dashes.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required setting is missing.
    #[error("{flag} is required (or `{key}` in the config file)")]
    Missing {
        /// The flag.
        flag: &'static str,
        /// The config file key.
        key: &'static str,
    },
    /// The config file cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file does not parse (syntax, unknown key, wrong type).
    #[error("config file {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// The parser's message, which names the key.
        message: String,
    },
}

fn invalid(flag: &'static str, value: impl fmt::Display, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// A memory size: bytes, written as `512M`, `8G`, `4T`, `1024K` or `8GiB`; a plain number
/// means MiB, as with QEMU's `-m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct MemorySize(pub u64);

impl FromStr for MemorySize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits);
        if num.is_empty() {
            return Err("expected a size such as 512M, 8G or 4T".into());
        }
        let n: u64 = num.parse().map_err(|_| "number too large".to_string())?;
        let shift = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "M" | "MB" | "MIB" => 20,
            "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            _ => return Err(format!("unknown unit {unit:?}: use K, M, G or T")),
        };
        n.checked_mul(1 << shift)
            .map(MemorySize)
            .ok_or_else(|| "size too large".to_string())
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b == 0 {
            return write!(f, "0");
        }
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if b.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}B")
    }
}

impl From<MemorySize> for String {
    fn from(m: MemorySize) -> String {
        m.to_string()
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Mib(u64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
            Raw::Mib(n) => n
                .checked_mul(1 << 20)
                .map(MemorySize)
                .ok_or_else(|| serde::de::Error::custom("size too large")),
        }
    }
}

/// Where the guest's first serial port goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum SerialConfig {
    /// Standard input and output (raw mode when stdin is a terminal).
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Discarded.
    None,
}

impl FromStr for SerialConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some("") => Err("file: needs a path, as in file:/tmp/console.log".into()),
                Some(p) => Ok(Self::File(PathBuf::from(p))),
                None => Err("expected stdio, file:PATH or none".into()),
            },
        }
    }
}

impl From<SerialConfig> for String {
    fn from(s: SerialConfig) -> String {
        match s {
            SerialConfig::Stdio => "stdio".into(),
            SerialConfig::None => "none".into(),
            SerialConfig::File(p) => format!("file:{}", p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for SerialConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Which kernel entry point to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootEntry {
    /// PVH when the ELF kernel has a PVH note, else the Linux 64-bit entry.
    #[default]
    Auto,
    /// The PVH entry (the kernel must have the PVH note).
    Pvh,
    /// The Linux 64-bit boot protocol entry.
    Linux64,
}

impl FromStr for BootEntry {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "pvh" => Ok(Self::Pvh),
            "linux64" => Ok(Self::Linux64),
            _ => Err("expected auto, pvh or linux64".into()),
        }
    }
}

/// Settings as given, before validation: every field optional. The config file has exactly
/// these keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialConfig {
    /// Kernel image: ELF vmlinux or bzImage.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    pub cpus: Option<u32>,
    /// Guest RAM.
    pub memory: Option<MemorySize>,
    /// First serial port.
    pub serial: Option<SerialConfig>,
    /// Kernel entry point.
    pub entry: Option<BootEntry>,
    /// virtio-blk disks.
    pub disk: Option<Vec<DiskConfig>>,
    /// virtio-net interfaces.
    pub net: Option<Vec<NetConfig>>,
    /// A virtio-rng device: `true`, `false` or a table of options.
    pub rng: Option<RngSetting>,
    /// A virtio-console device.
    pub console: Option<ConsoleConfig>,
}

impl PartialConfig {
    /// Reads a config file: TOML, or JSON when the name ends in `.json` or the text starts
    /// with `{`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let json =
            path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
        let parse_err = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        if json {
            serde_json::from_str(&text).map_err(|e| parse_err(e.to_string()))
        } else {
            toml::from_str(&text).map_err(|e| parse_err(e.message().to_string()))
        }
    }

    /// `self` (e.g. flags) laid over `base` (e.g. the config file).
    pub fn merge(self, base: PartialConfig) -> PartialConfig {
        PartialConfig {
            kernel: self.kernel.or(base.kernel),
            initrd: self.initrd.or(base.initrd),
            cmdline: self.cmdline.or(base.cmdline),
            cpus: self.cpus.or(base.cpus),
            memory: self.memory.or(base.memory),
            serial: self.serial.or(base.serial),
            entry: self.entry.or(base.entry),
            disk: self.disk.or(base.disk),
            net: self.net.or(base.net),
            rng: self.rng.or(base.rng),
            console: self.console.or(base.console),
        }
    }
}

/// A validated VM description.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// First serial port.
    pub serial: SerialConfig,
    /// Kernel entry point.
    pub entry: BootEntry,
    /// virtio-blk disks.
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces.
    pub nets: Vec<NetConfig>,
    /// The virtio-rng device, if any.
    pub rng: Option<RngConfig>,
    /// The virtio console, if any.
    pub console: Option<ConsoleConfig>,
}

impl TryFrom<PartialConfig> for VmConfig {
    type Error = ConfigError;

    fn try_from(p: PartialConfig) -> Result<Self, ConfigError> {
        let kernel = p.kernel.ok_or(ConfigError::Missing {
            flag: "--kernel",
            key: "kernel",
        })?;
        let cpus = p.cpus.unwrap_or(1);
        if cpus == 0 {
            return Err(invalid("--cpus", cpus, "a VM needs at least 1 vCPU"));
        }
        if cpus > MAX_CPUS {
            return Err(invalid(
                "--cpus",
                cpus,
                format!("at most {MAX_CPUS} vCPUs are supported"),
            ));
        }
        let memory = p.memory.map_or(DEFAULT_MEMORY, |m| m.0);
        if memory < MIN_MEMORY {
            return Err(invalid(
                "--memory",
                MemorySize(memory),
                "a VM needs at least 16M of RAM",
            ));
        }
        if memory > MAX_MEMORY {
            return Err(invalid(
                "--memory",
                MemorySize(memory),
                "at most 64T of RAM is supported",
            ));
        }
        if !memory.is_multiple_of(4096) {
            return Err(invalid(
                "--memory",
                MemorySize(memory),
                "must be a multiple of 4K",
            ));
        }
        let cmdline = p.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        if cmdline.len() >= kiln_arch::layout::CMDLINE_MAX_SIZE {
            return Err(invalid(
                "--cmdline",
                format!("{}...", cmdline.chars().take(20).collect::<String>()),
                format!(
                    "longer than {} bytes",
                    kiln_arch::layout::CMDLINE_MAX_SIZE - 1
                ),
            ));
        }
        for d in p.disk.iter().flatten() {
            d.validate()
                .map_err(|reason| invalid("--disk", d.path.display(), reason))?;
        }
        for n in p.net.iter().flatten() {
            n.validate()
                .map_err(|reason| invalid("--net", &n.tap, reason))?;
        }
        if p.console
            .as_ref()
            .is_some_and(|c| c.target == ConsoleTarget::Stdio)
            && matches!(p.serial, None | Some(SerialConfig::Stdio))
        {
            return Err(invalid(
                "--console",
                "stdio",
                "the serial port already uses stdio; give it --serial file:PATH or none",
            ));
        }
        if cmdline.contains('\0') {
            return Err(invalid("--cmdline", &cmdline, "contains a NUL byte"));
        }
        Ok(VmConfig {
            kernel,
            initrd: p.initrd,
            cmdline,
            cpus,
            memory,
            serial: p.serial.unwrap_or_default(),
            entry: p.entry.unwrap_or_default(),
            disks: p.disk.unwrap_or_default(),
            nets: p.net.unwrap_or_default(),
            rng: p.rng.and_then(RngSetting::device),
            console: p.console,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> PartialConfig {
        PartialConfig {
            kernel: Some("vmlinux".into()),
            ..Default::default()
        }
    }

    #[test]
    fn parses_memory_sizes() {
        assert_eq!("512M".parse::<MemorySize>(), Ok(MemorySize(512 << 20)));
        assert_eq!("8G".parse::<MemorySize>(), Ok(MemorySize(8 << 30)));
        assert_eq!("4TiB".parse::<MemorySize>(), Ok(MemorySize(4 << 40)));
        assert_eq!("256".parse::<MemorySize>(), Ok(MemorySize(256 << 20)));
        assert_eq!("1024k".parse::<MemorySize>(), Ok(MemorySize(1 << 20)));
        assert!("lots".parse::<MemorySize>().is_err());
        assert!("12X".parse::<MemorySize>().is_err());
        assert!("99999999999999999999G".parse::<MemorySize>().is_err());
        assert!("99999999999T".parse::<MemorySize>().is_err());
        assert_eq!(MemorySize(8 << 30).to_string(), "8G");
    }

    #[test]
    fn defaults_fill_in() {
        let c = VmConfig::try_from(base()).unwrap();
        assert_eq!(
            (c.cpus, c.memory, c.cmdline.as_str()),
            (1, 256 << 20, DEFAULT_CMDLINE)
        );
        assert_eq!(c.serial, SerialConfig::Stdio);
    }

    #[test]
    fn rejects_bad_values_naming_the_flag() {
        let cases = [
            (
                PartialConfig {
                    cpus: Some(0),
                    ..base()
                },
                "--cpus",
            ),
            (
                PartialConfig {
                    cpus: Some(100_000),
                    ..base()
                },
                "--cpus",
            ),
            (
                PartialConfig {
                    memory: Some(MemorySize(0)),
                    ..base()
                },
                "--memory",
            ),
            (
                PartialConfig {
                    memory: Some(MemorySize(1 << 50)),
                    ..base()
                },
                "--memory",
            ),
            (
                PartialConfig {
                    memory: Some(MemorySize((64 << 20) + 1)),
                    ..base()
                },
                "--memory",
            ),
            (
                PartialConfig {
                    kernel: None,
                    ..base()
                },
                "--kernel",
            ),
        ];
        for (p, flag) in cases {
            let e = VmConfig::try_from(p).unwrap_err().to_string();
            assert!(e.starts_with(flag), "{e}");
        }
    }

    #[test]
    fn flags_override_file() {
        let file = PartialConfig {
            cpus: Some(4),
            memory: Some(MemorySize(1 << 30)),
            ..base()
        };
        let flags = PartialConfig {
            cpus: Some(2),
            ..Default::default()
        };
        let c = VmConfig::try_from(flags.merge(file)).unwrap();
        assert_eq!((c.cpus, c.memory), (2, 1 << 30));
    }

    #[test]
    fn toml_and_json_share_one_schema() {
        let dir = std::env::temp_dir().join(format!("kiln-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = dir.join("vm.toml");
        std::fs::write(
            &t,
            "kernel = \"/k\"\ncpus = 2\nmemory = \"1G\"\nserial = \"file:/tmp/x\"\n",
        )
        .unwrap();
        let j = dir.join("vm.json");
        std::fs::write(
            &j,
            r#"{"kernel": "/k", "cpus": 2, "memory": 1024, "serial": "file:/tmp/x"}"#,
        )
        .unwrap();
        let a = PartialConfig::from_file(&t).unwrap();
        let b = PartialConfig::from_file(&j).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.memory, Some(MemorySize(1 << 30)));
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "kernel = \"/k\"\ncpu = 2\n").unwrap();
        let e = PartialConfig::from_file(&bad).unwrap_err().to_string();
        assert!(e.contains("cpu"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rng_and_console_take_a_transport_in_both_file_forms() {
        let dir = std::env::temp_dir().join(format!("kiln-config-rng-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let parse = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            PartialConfig::from_file(&p)
        };
        let vm = |p: PartialConfig| VmConfig::try_from(p.merge(base())).unwrap();
        // The old forms still work.
        let c = vm(parse("a.toml", "rng = true\nconsole = \"socket:/tmp/c\"\n").unwrap());
        assert_eq!(c.rng, Some(RngConfig::default()));
        assert_eq!(c.console.unwrap().transport, Transport::Pci);
        assert_eq!(vm(parse("b.toml", "rng = false\n").unwrap()).rng, None);
        // Tables and options.
        let t = "console = \"file:/tmp/l,transport=mmio\"\n[rng]\ntransport = \"mmio\"\n";
        let c = vm(parse("c.toml", t).unwrap());
        assert_eq!(c.rng.map(|r| r.transport), Some(Transport::Mmio));
        assert_eq!(c.console.unwrap().transport, Transport::Mmio);
        let j = r#"{"rng": {"transport": "mmio"}, "console": "stdio,transport=mmio"}"#;
        let p = parse("d.json", j).unwrap();
        assert_eq!(
            p.rng,
            Some(RngSetting::With(RngConfig {
                transport: Transport::Mmio
            }))
        );
        // Mistakes name what was wrong.
        for (name, text, want) in [
            ("e.toml", "[rng]\ntransport = \"usb\"\n", "usb"),
            ("f.toml", "[rng]\nrate = 1\n", "rate"),
            ("g.toml", "rng = \"yes\"\n", "true, false or a table"),
            (
                "h.toml",
                "console = \"stdio,transport=isa\"\n",
                "transport=isa",
            ),
        ] {
            let e = parse(name, text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn serial_spec_parses() {
        assert_eq!("stdio".parse::<SerialConfig>(), Ok(SerialConfig::Stdio));
        assert_eq!(
            "file:/a b".parse::<SerialConfig>(),
            Ok(SerialConfig::File("/a b".into()))
        );
        assert!("file:".parse::<SerialConfig>().is_err());
        assert!("tcp:1".parse::<SerialConfig>().is_err());
    }
}
