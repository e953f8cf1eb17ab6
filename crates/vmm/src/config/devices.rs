//! Device settings: `--disk`, `--net`, `--rng`, `--console`, given as `key=value,key=value`
//! on the command line or in the config file (tables `[[disk]]`, `[[net]]`, `[rng]`; the
//! console as the same string as its flag).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Most queues a multi-queue device may have.
pub const MAX_QUEUES: u16 = 16;
/// virtio-blk serial numbers are at most this many bytes (VIRTIO_BLK_ID_BYTES).
pub const MAX_SERIAL_LEN: usize = 20;
/// Longest busy-poll budget a disk may ask for, in microseconds.
pub const MAX_POLL_US: u32 = 1000;

/// How a virtio device reaches the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// virtio-pci (modern), found by PCI enumeration.
    #[default]
    Pci,
    /// virtio-mmio, announced on the kernel command line.
    Mmio,
}

/// Disk image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Raw bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

/// One `--disk`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Image file or block device.
    pub path: PathBuf,
    /// The guest may not write.
    #[serde(default)]
    pub readonly: bool,
    /// Serial number the guest reads (at most 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
    /// Bypass the host page cache (O_DIRECT).
    #[serde(default)]
    pub direct: bool,
    /// Number of request queues.
    #[serde(default = "one")]
    pub queues: u16,
    /// Image format; probed from the file when absent.
    #[serde(default)]
    pub format: Option<DiskFormat>,
    /// Transport.
    #[serde(default)]
    pub transport: Transport,
    /// How long each I/O thread may keep polling for completions and new requests after its
    /// last work while the disk has requests in flight, in microseconds (0: never poll; the
    /// thread adapts its window below this); when absent, 200 for `direct` disks and 0 for
    /// disks in the page cache.
    #[serde(default)]
    pub poll_us: Option<u32>,
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "MAC address {s:?} must be six hex bytes like 52:54:00:12:34:56"
            ));
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(format!("MAC address {s:?}: {p:?} is not two hex digits"));
            }
            *b = u8::from_str_radix(p, 16)
                .map_err(|_| format!("MAC address {s:?}: {p:?} is not hex"))?;
        }
        if mac[0] & 1 != 0 {
            return Err(format!("MAC address {s:?} is a multicast address"));
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One `--net`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Host tap interface (created if it does not exist).
    pub tap: String,
    /// Guest MAC address; a locally administered one is made up when absent.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Number of queue pairs.
    #[serde(default = "one")]
    pub queues: u16,
    /// Transport.
    #[serde(default)]
    pub transport: Transport,
}

/// One `--rng`: `--rng` alone, or `--rng transport=mmio`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Transport.
    #[serde(default)]
    pub transport: Transport,
}

impl FromStr for RngConfig {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let mut r = RngConfig::default();
        for (k, v) in pairs(spec)? {
            match k {
                "transport" => r.transport = transport(v)?,
                _ => return Err(format!("unknown option {k:?} (options: transport)")),
            }
        }
        Ok(r)
    }
}

/// `rng` in a config file: `rng = true` (or `false`), or a table of options
/// (`[rng]` with `transport = "mmio"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum RngSetting {
    /// On with defaults, or off.
    Enabled(bool),
    /// On, with these options.
    With(RngConfig),
}

impl RngSetting {
    /// The device this asks for, if any.
    pub fn device(self) -> Option<RngConfig> {
        match self {
            RngSetting::Enabled(true) => Some(RngConfig::default()),
            RngSetting::Enabled(false) => None,
            RngSetting::With(r) => Some(r),
        }
    }
}

impl<'de> Deserialize<'de> for RngSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Setting;
        impl<'de> serde::de::Visitor<'de> for Setting {
            type Value = RngSetting;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false or a table such as { transport = \"mmio\" }")
            }

            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<RngSetting, E> {
                Ok(RngSetting::Enabled(on))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RngSetting, A::Error> {
                RngConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RngSetting::With)
            }
        }
        d.deserialize_any(Setting)
    }
}

/// Where the virtio console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// Standard input and output.
    Stdio,
    /// Output appended to a file.
    File(PathBuf),
    /// A unix socket kiln listens on; one client at a time.
    Socket(PathBuf),
}

/// One `--console`: `stdio`, `file:PATH` or `socket:PATH`, then options
/// (`,transport=pci|mmio`). The config file takes the same string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct ConsoleConfig {
    /// Where the console goes.
    pub target: ConsoleTarget,
    /// Transport.
    pub transport: Transport,
}

impl FromStr for ConsoleConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        // Options are the trailing `,key=value` parts; a comma in a path stays in the path
        // (`file:/a,b`) unless what follows it looks like an option.
        let mut target = s;
        let mut options = Vec::new();
        while let Some((head, tail)) = target.rsplit_once(',') {
            if !tail.contains('=') {
                break;
            }
            options.push(tail);
            target = head;
        }
        let path = |p: &str, kind: &str| {
            if p.is_empty() {
                Err(format!("{kind}: needs a path, as in {kind}:/tmp/console"))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        let target = if target == "stdio" {
            ConsoleTarget::Stdio
        } else if let Some(p) = target.strip_prefix("file:") {
            ConsoleTarget::File(path(p, "file")?)
        } else if let Some(p) = target.strip_prefix("socket:") {
            ConsoleTarget::Socket(path(p, "socket")?)
        } else {
            return Err(
                "expected stdio, file:PATH or socket:PATH, then options such as \
                 ,transport=mmio"
                    .into(),
            );
        };
        let mut c = ConsoleConfig {
            target,
            transport: Transport::Pci,
        };
        for o in options.iter().rev() {
            for (k, v) in pairs(o)? {
                match k {
                    "transport" => c.transport = transport(v)?,
                    _ => return Err(format!("unknown option {k:?} (options: transport)")),
                }
            }
        }
        Ok(c)
    }
}

impl From<ConsoleConfig> for String {
    fn from(c: ConsoleConfig) -> String {
        let target = match c.target {
            ConsoleTarget::Stdio => "stdio".into(),
            ConsoleTarget::File(p) => format!("file:{}", p.display()),
            ConsoleTarget::Socket(p) => format!("socket:{}", p.display()),
        };
        match c.transport {
            Transport::Pci => target,
            Transport::Mmio => format!("{target},transport=mmio"),
        }
    }
}

impl<'de> Deserialize<'de> for ConsoleConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

fn one() -> u16 {
    1
}

/// Splits `key=value,key=value`; values may not contain commas.
fn pairs(spec: &str) -> Result<Vec<(&str, &str)>, String> {
    spec.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .ok_or_else(|| format!("{p:?} is not key=value"))
        })
        .collect()
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

fn queues(v: &str) -> Result<u16, String> {
    match v.parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUES).contains(&n) => Ok(n),
        _ => Err(format!("queues={v}: expected 1 to {MAX_QUEUES}")),
    }
}

fn transport(v: &str) -> Result<Transport, String> {
    match v {
        "pci" => Ok(Transport::Pci),
        "mmio" => Ok(Transport::Mmio),
        _ => Err(format!("transport={v}: expected pci or mmio")),
    }
}

impl FromStr for DiskConfig {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let mut d = DiskConfig {
            path: PathBuf::new(),
            readonly: false,
            serial: None,
            direct: false,
            queues: 1,
            format: None,
            transport: Transport::Pci,
            poll_us: None,
        };
        let mut have_path = false;
        for (k, v) in pairs(spec)? {
            match k {
                "path" => {
                    d.path = PathBuf::from(v);
                    have_path = !v.is_empty();
                }
                "readonly" => d.readonly = on_off(k, v)?,
                "serial" => d.serial = Some(v.to_string()),
                "direct" => d.direct = on_off(k, v)?,
                "queues" => d.queues = queues(v)?,
                "format" => {
                    d.format = Some(match v {
                        "raw" => DiskFormat::Raw,
                        "qcow2" => DiskFormat::Qcow2,
                        _ => return Err(format!("format={v}: expected raw or qcow2")),
                    })
                }
                "transport" => d.transport = transport(v)?,
                "poll_us" => {
                    d.poll_us = Some(
                        v.parse()
                            .map_err(|_| format!("poll_us={v}: expected 0 to {MAX_POLL_US}"))?,
                    )
                }
                _ => {
                    return Err(format!(
                        "unknown option {k:?} (options: path, readonly, serial, direct, queues, format, transport, poll_us)"
                    ))
                }
            }
        }
        if !have_path {
            return Err("path=FILE is required".into());
        }
        d.validate()?;
        Ok(d)
    }
}

impl DiskConfig {
    /// Checks values that the file form can also get wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.path.as_os_str().is_empty() {
            return Err("path is empty".into());
        }
        if let Some(s) = &self.serial {
            if s.len() > MAX_SERIAL_LEN {
                return Err(format!("serial={s}: at most {MAX_SERIAL_LEN} bytes"));
            }
        }
        if !(1..=MAX_QUEUES).contains(&self.queues) {
            return Err(format!(
                "queues={}: expected 1 to {MAX_QUEUES}",
                self.queues
            ));
        }
        if let Some(us) = self.poll_us.filter(|&us| us > MAX_POLL_US) {
            return Err(format!("poll_us={us}: expected 0 to {MAX_POLL_US}"));
        }
        Ok(())
    }
}

impl FromStr for NetConfig {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let mut n = NetConfig {
            tap: String::new(),
            mac: None,
            queues: 1,
            transport: Transport::Pci,
        };
        for (k, v) in pairs(spec)? {
            match k {
                "tap" => n.tap = v.to_string(),
                "mac" => n.mac = Some(v.parse()?),
                "queues" => n.queues = queues(v)?,
                "transport" => n.transport = transport(v)?,
                _ => {
                    return Err(format!(
                        "unknown option {k:?} (options: tap, mac, queues, transport)"
                    ))
                }
            }
        }
        n.validate()?;
        Ok(n)
    }
}

impl NetConfig {
    /// Checks values that the file form can also get wrong.
    pub fn validate(&self) -> Result<(), String> {
        // IFNAMSIZ is 16 including the NUL.
        if self.tap.is_empty() || self.tap.len() > 15 || self.tap.contains(['/', ' ', '\0']) {
            return Err(format!(
                "tap={:?}: a tap name is 1 to 15 characters, without '/' or spaces",
                self.tap
            ));
        }
        if !(1..=MAX_QUEUES).contains(&self.queues) {
            return Err(format!(
                "queues={}: expected 1 to {MAX_QUEUES}",
                self.queues
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_spec_parses_every_option() {
        let d: DiskConfig =
            "path=/img/a.raw,readonly=on,serial=abc,direct=on,queues=4,format=qcow2,transport=mmio,poll_us=0"
                .parse()
                .unwrap();
        assert_eq!(d.poll_us, Some(0));
        assert_eq!(d.path, PathBuf::from("/img/a.raw"));
        assert!(d.readonly && d.direct);
        assert_eq!((d.queues, d.serial.as_deref()), (4, Some("abc")));
        assert_eq!(
            (d.format, d.transport),
            (Some(DiskFormat::Qcow2), Transport::Mmio)
        );
    }

    #[test]
    fn disk_spec_errors_name_the_problem() {
        let cases = [
            ("readonly=on", "path=FILE is required"),
            ("path=/a,bogus=1", "unknown option \"bogus\""),
            ("path=/a,readonly=maybe", "readonly=maybe"),
            ("path=/a,queues=0", "queues=0"),
            ("path=/a,queues=99", "queues=99"),
            ("path=/a,serial=012345678901234567890", "at most 20 bytes"),
            ("path=/a,format=vmdk", "format=vmdk"),
            ("path=/a,poll_us=fast", "poll_us=fast: expected 0 to 1000"),
            ("path=/a,poll_us=1001", "poll_us=1001: expected 0 to 1000"),
            ("/just/a/path", "is not key=value"),
        ];
        for (spec, want) in cases {
            let e = spec.parse::<DiskConfig>().unwrap_err();
            assert!(e.contains(want), "{spec}: {e}");
        }
    }

    #[test]
    fn net_spec_and_mac() {
        let n: NetConfig = "tap=kiln0,mac=52:54:00:12:34:56,queues=2".parse().unwrap();
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:12:34:56");
        assert_eq!(n.queues, 2);
        assert!("tap=".parse::<NetConfig>().unwrap_err().contains("tap"));
        assert!("tap=a/b".parse::<NetConfig>().is_err());
        assert!("tap=t,mac=01:00:00:00:00:00"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("multicast"));
        assert!("tap=t,mac=zz:00:00:00:00:00"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("not hex"));
        assert!("mac=52:54:00:12:34:56".parse::<NetConfig>().is_err());
    }

    #[test]
    fn console_spec() {
        assert_eq!(
            "socket:/tmp/c".parse::<ConsoleConfig>(),
            Ok(ConsoleConfig {
                target: ConsoleTarget::Socket("/tmp/c".into()),
                transport: Transport::Pci
            })
        );
        let mmio: ConsoleConfig = "file:/tmp/log,transport=mmio".parse().unwrap();
        assert_eq!(
            (mmio.target.clone(), mmio.transport),
            (ConsoleTarget::File("/tmp/log".into()), Transport::Mmio)
        );
        assert_eq!(String::from(mmio), "file:/tmp/log,transport=mmio");
        // A comma in a path stays in the path.
        assert_eq!(
            "socket:/run/a,b".parse::<ConsoleConfig>().map(|c| c.target),
            Ok(ConsoleTarget::Socket("/run/a,b".into()))
        );
        assert_eq!(
            "stdio,transport=pci"
                .parse::<ConsoleConfig>()
                .map(String::from),
            Ok("stdio".to_string())
        );
        for (spec, want) in [
            ("socket:", "needs a path"),
            ("tcp:1", "expected stdio, file:PATH or socket:PATH"),
            ("stdio,transport=usb", "transport=usb: expected pci or mmio"),
            (
                "stdio,speed=9600",
                "unknown option \"speed\" (options: transport)",
            ),
            ("stdio,mmio", "expected stdio, file:PATH or socket:PATH"),
        ] {
            let e = spec.parse::<ConsoleConfig>().unwrap_err();
            assert!(e.contains(want), "{spec}: {e}");
        }
    }

    #[test]
    fn rng_spec() {
        assert_eq!("".parse::<RngConfig>(), Ok(RngConfig::default()));
        assert_eq!(
            "transport=mmio".parse::<RngConfig>().map(|r| r.transport),
            Ok(Transport::Mmio)
        );
        let e = "transport=isa".parse::<RngConfig>().unwrap_err();
        assert!(e.contains("transport=isa: expected pci or mmio"), "{e}");
        let e = "rate=10".parse::<RngConfig>().unwrap_err();
        assert!(
            e.contains("unknown option \"rate\" (options: transport)"),
            "{e}"
        );
    }

    #[test]
    fn file_form_uses_the_same_schema() {
        let d: DiskConfig = toml::from_str("path = \"/a\"\nreadonly = true\nqueues = 2\n").unwrap();
        assert_eq!(
            (d.readonly, d.queues, d.transport),
            (true, 2, Transport::Pci)
        );
        assert!(toml::from_str::<DiskConfig>("path = \"/a\"\nro = true\n").is_err());
        let n: NetConfig =
            serde_json::from_str(r#"{"tap": "t0", "mac": "52:54:00:00:00:01"}"#).unwrap();
        assert_eq!(n.mac, Some(MacAddr([0x52, 0x54, 0, 0, 0, 1])));
    }
}
