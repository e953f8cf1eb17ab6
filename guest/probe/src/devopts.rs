//! Command-line options of the PCI/virtio checks (see README.md):
//!
//! - `probe.blk_seed=N`: seed of the host's pattern (default 0)
//! - `probe.blk_read=START:LEN`: bytes to verify against the host's pattern
//! - `probe.blk_write=START:LEN`: bytes to fill with the probe's pattern
//! - `probe.blk_bench=MODE[,qd=N][,bs=N][,secs=N|ms=N][,start=N][,span=N]`
//! - `probe.net_ip=A.B.C.D[/P]`, `probe.net_secs=N`, `probe.net_min_echo=N`
//! - `probe.net_bench=sink|source[,secs=N|ms=N][,size=N][,dst=A.B.C.D][,dst_mac=M][,port=N]`
//! - `probe.console_wait_ms=N`
//! - `probe.hostile=rng|blk|net|console`, `probe.hostile_cases=loop,oob_addr,...`
//! - `probe.virtio_qsize=N`: the largest queue the drivers set up (default 256)
//! - `probe.pci_high=0|1`: move every 64-bit BAR above 4 GiB first
//!
//! Sizes are decimal or 0x-hex with an optional K, M or G (binary) suffix.

use crate::cmdline::show;
use crate::reason;
use crate::util::Reason;

/// A byte range of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub len: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkMode {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl BlkMode {
    pub fn name(self) -> &'static str {
        match self {
            BlkMode::RandRead => "randread",
            BlkMode::RandWrite => "randwrite",
            BlkMode::SeqRead => "seqread",
            BlkMode::SeqWrite => "seqwrite",
        }
    }

    pub fn writes(self) -> bool {
        matches!(self, BlkMode::RandWrite | BlkMode::SeqWrite)
    }

    pub fn random(self) -> bool {
        matches!(self, BlkMode::RandRead | BlkMode::RandWrite)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkBench {
    pub mode: BlkMode,
    /// Requests in flight.
    pub qd: u16,
    /// Bytes per request.
    pub bs: u32,
    pub ms: u64,
    /// Byte range the requests fall in; `span == 0`: to the end of the disk.
    pub start: u64,
    pub span: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetMode {
    Sink,
    Source,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetBench {
    pub mode: NetMode,
    pub ms: u64,
    /// Frame size without the virtio header (60..=1514).
    pub size: u16,
    /// Source mode: destination IP (default: the .1 of our subnet) and MAC
    /// (default: resolved with ARP).
    pub dst_ip: Option<[u8; 4]>,
    pub dst_mac: Option<[u8; 6]>,
    pub port: u16,
}

/// Malformed-queue cases of the `hostile` check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostileCase {
    /// Two descriptors chained to each other.
    Loop,
    /// A buffer far outside guest RAM.
    OobAddr,
    /// A buffer of almost 4 GiB.
    HugeLen,
    /// avail.idx moved more than the queue size past the last seen.
    AvailIdx,
    /// An avail ring entry naming a descriptor past the table.
    BadHead,
    /// A descriptor whose `next` is past the table.
    BadNext,
    /// A queue size that is not a power of two.
    BadSize,
    /// Descriptor table address outside guest RAM.
    RingOob,
}

impl HostileCase {
    pub const ALL: [HostileCase; 8] = [
        HostileCase::Loop,
        HostileCase::OobAddr,
        HostileCase::HugeLen,
        HostileCase::AvailIdx,
        HostileCase::BadHead,
        HostileCase::BadNext,
        HostileCase::BadSize,
        HostileCase::RingOob,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HostileCase::Loop => "loop",
            HostileCase::OobAddr => "oob_addr",
            HostileCase::HugeLen => "huge_len",
            HostileCase::AvailIdx => "avail_idx",
            HostileCase::BadHead => "bad_head",
            HostileCase::BadNext => "bad_next",
            HostileCase::BadSize => "bad_size",
            HostileCase::RingOob => "ring_oob",
        }
    }

    pub fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct DevOptions {
    pub blk_seed: u64,
    pub blk_read: Option<Region>,
    pub blk_write: Option<Region>,
    pub blk_bench: Option<BlkBench>,
    pub net_ip: Option<[u8; 4]>,
    pub net_prefix: u8,
    pub net_secs: u64,
    pub net_min_echo: u64,
    pub net_bench: Option<NetBench>,
    pub console_wait_ms: u64,
    /// virtio device type the hostile check targets.
    pub hostile_target: u16,
    pub hostile_cases: u32,
    pub qsize: u16,
    /// Move every 64-bit BAR above 4 GiB before the checks.
    pub pci_high: bool,
    /// The `msix` check enables MSI-X (else it checks that no vector arrives).
    pub msix_enable: bool,
}

impl Default for DevOptions {
    fn default() -> Self {
        DevOptions {
            blk_seed: 0,
            blk_read: None,
            blk_write: None,
            blk_bench: None,
            net_ip: None,
            net_prefix: 24,
            net_secs: 0,
            net_min_echo: 0,
            net_bench: None,
            console_wait_ms: 0,
            hostile_target: crate::virtio::TYPE_RNG,
            hostile_cases: HostileCase::ALL.iter().fold(0, |m, c| m | c.bit()),
            qsize: 256,
            pci_high: false,
            msix_enable: true,
        }
    }
}

impl DevOptions {
    /// DMA arena size: rings and small buffers, plus the benchmark's buffers
    /// (capped: beyond 64 MiB the bench reuses buffers).
    pub fn dma_bytes(&self) -> u64 {
        let bench = self.blk_bench.map_or(0, |b| (u64::from(b.qd) * u64::from(b.bs)).min(64 << 20));
        (16 << 20) + bench
    }
}

/// Parses a size: decimal or 0x-hex, optional K/M/G suffix (powers of 1024).
pub fn parse_size(v: &[u8]) -> Option<u64> {
    let (num, shift) = match v.last()? {
        b'K' | b'k' => (&v[..v.len() - 1], 10),
        b'M' | b'm' => (&v[..v.len() - 1], 20),
        b'G' | b'g' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    let n = match num.strip_prefix(b"0x") {
        Some(hex) if !hex.is_empty() && hex.len() <= 16 => {
            hex.iter().try_fold(0u64, |n, &b| Some((n << 4) | u64::from(char::from(b).to_digit(16)?)))?
        }
        Some(_) => return None,
        None => crate::cmdline::parse_u64(num)?,
    };
    n.checked_mul(1 << shift)
}

fn parse_region(v: &[u8]) -> Option<Region> {
    let i = v.iter().position(|&b| b == b':')?;
    let r = Region { start: parse_size(&v[..i])?, len: parse_size(&v[i + 1..])? };
    (r.len > 0 && r.start.is_multiple_of(512) && r.len.is_multiple_of(512) && r.start.checked_add(r.len).is_some())
        .then_some(r)
}

pub fn parse_ip(v: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = v.split(|&b| b == b'.');
    for b in ip.iter_mut() {
        *b = u8::try_from(crate::cmdline::parse_u64(parts.next()?)?).ok()?;
    }
    parts.next().is_none().then_some(ip)
}

pub fn parse_mac(v: &[u8]) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = v.split(|&b| b == b':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *b = p.iter().try_fold(0u8, |n, &c| Some((n << 4) | u8::try_from(char::from(c).to_digit(16)?).ok()?))?;
    }
    parts.next().is_none().then_some(mac)
}

/// Splits `a=b` into (a, b).
fn kv(item: &[u8]) -> (&[u8], &[u8]) {
    match item.iter().position(|&b| b == b'=') {
        Some(i) => (&item[..i], &item[i + 1..]),
        None => (item, &[]),
    }
}

/// `secs=N` or `ms=N` into milliseconds.
fn duration(k: &[u8], v: &[u8]) -> Option<Option<u64>> {
    match k {
        b"secs" => Some(crate::cmdline::parse_u64(v).and_then(|s| s.checked_mul(1000))),
        b"ms" => Some(crate::cmdline::parse_u64(v)),
        _ => None,
    }
}

fn parse_blk_bench(v: &[u8]) -> Result<BlkBench, Reason> {
    let mut items = v.split(|&b| b == b',');
    let mode = match items.next().unwrap_or_default() {
        b"randread" => BlkMode::RandRead,
        b"randwrite" => BlkMode::RandWrite,
        b"seqread" => BlkMode::SeqRead,
        b"seqwrite" => BlkMode::SeqWrite,
        m => return Err(reason!("bad mode in probe.blk_bench: {}", show(m))),
    };
    let mut b = BlkBench { mode, qd: 32, bs: 4096, ms: 5000, start: 0, span: 0 };
    for item in items {
        let (k, val) = kv(item);
        let bad = || reason!("bad item in probe.blk_bench: {}", show(item));
        if let Some(ms) = duration(k, val) {
            b.ms = ms.filter(|&m| m > 0).ok_or_else(bad)?;
            continue;
        }
        match k {
            b"qd" => b.qd = parse_size(val).and_then(|n| u16::try_from(n).ok()).filter(|&n| n > 0).ok_or_else(bad)?,
            b"bs" => {
                b.bs = parse_size(val)
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|&n| n >= 512 && n % 512 == 0 && n <= 4 << 20)
                    .ok_or_else(bad)?
            }
            b"start" => b.start = parse_size(val).filter(|n| n % 512 == 0).ok_or_else(bad)?,
            b"span" => b.span = parse_size(val).filter(|n| n % 512 == 0).ok_or_else(bad)?,
            _ => return Err(bad()),
        }
    }
    Ok(b)
}

fn parse_net_bench(v: &[u8]) -> Result<NetBench, Reason> {
    let mut items = v.split(|&b| b == b',');
    let mode = match items.next().unwrap_or_default() {
        b"sink" => NetMode::Sink,
        b"source" => NetMode::Source,
        m => return Err(reason!("bad mode in probe.net_bench: {}", show(m))),
    };
    let mut n = NetBench { mode, ms: 5000, size: 1514, dst_ip: None, dst_mac: None, port: 9 };
    for item in items {
        let (k, val) = kv(item);
        let bad = || reason!("bad item in probe.net_bench: {}", show(item));
        if let Some(ms) = duration(k, val) {
            n.ms = ms.filter(|&m| m > 0).ok_or_else(bad)?;
            continue;
        }
        match k {
            b"size" => {
                n.size = parse_size(val)
                    .and_then(|s| u16::try_from(s).ok())
                    .filter(|s| (60..=1514).contains(s))
                    .ok_or_else(bad)?
            }
            b"dst" => n.dst_ip = Some(parse_ip(val).ok_or_else(bad)?),
            b"dst_mac" => n.dst_mac = Some(parse_mac(val).ok_or_else(bad)?),
            b"port" => n.port = parse_size(val).and_then(|p| u16::try_from(p).ok()).ok_or_else(bad)?,
            _ => return Err(bad()),
        }
    }
    Ok(n)
}

impl DevOptions {
    /// Applies `probe.<key>=<v>` if the key is a device option: `Ok(false)` if
    /// it is not one, `Err` for a bad value.
    pub fn apply(&mut self, key: &[u8], v: &[u8]) -> Result<bool, Reason> {
        let bad = || reason!("bad value for probe.{}: {}", show(key), show(v));
        match key {
            b"blk_seed" => self.blk_seed = parse_size(v).ok_or_else(bad)?,
            b"blk_read" => self.blk_read = Some(parse_region(v).ok_or_else(bad)?),
            b"blk_write" => self.blk_write = Some(parse_region(v).ok_or_else(bad)?),
            b"blk_bench" => self.blk_bench = Some(parse_blk_bench(v)?),
            b"net_ip" => {
                let (ip, prefix) = match v.iter().position(|&b| b == b'/') {
                    Some(i) => (&v[..i], crate::cmdline::parse_u64(&v[i + 1..]).filter(|&p| (1..=32).contains(&p))),
                    None => (v, Some(24)),
                };
                self.net_ip = Some(parse_ip(ip).ok_or_else(bad)?);
                self.net_prefix = prefix.and_then(|p| u8::try_from(p).ok()).ok_or_else(bad)?;
            }
            b"net_secs" => self.net_secs = crate::cmdline::parse_u64(v).ok_or_else(bad)?,
            b"net_min_echo" => self.net_min_echo = crate::cmdline::parse_u64(v).ok_or_else(bad)?,
            b"net_bench" => self.net_bench = Some(parse_net_bench(v)?),
            b"console_wait_ms" => self.console_wait_ms = crate::cmdline::parse_u64(v).ok_or_else(bad)?,
            b"hostile" => {
                self.hostile_target = match v {
                    b"rng" => crate::virtio::TYPE_RNG,
                    b"blk" => crate::virtio::TYPE_BLOCK,
                    b"net" => crate::virtio::TYPE_NET,
                    b"console" => crate::virtio::TYPE_CONSOLE,
                    _ => return Err(bad()),
                }
            }
            b"hostile_cases" => {
                let mut mask = 0;
                for name in v.split(|&b| b == b',').filter(|n| !n.is_empty()) {
                    let c = HostileCase::ALL.iter().find(|c| c.name().as_bytes() == name);
                    mask |= c.ok_or_else(|| reason!("unknown case in probe.hostile_cases: {}", show(name)))?.bit();
                }
                self.hostile_cases = mask;
            }
            b"pci_high" => {
                self.pci_high = match v {
                    b"0" => false,
                    b"1" => true,
                    _ => return Err(bad()),
                }
            }
            b"msix_enable" => {
                self.msix_enable = match v {
                    b"0" => false,
                    b"1" => true,
                    _ => return Err(bad()),
                }
            }
            b"virtio_qsize" => {
                self.qsize = parse_size(v)
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| n.is_power_of_two() && (2..=crate::virtio::queue::MAX_QSIZE).contains(n))
                    .ok_or_else(bad)?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(key: &str, v: &str) -> Result<DevOptions, String> {
        let mut o = DevOptions::default();
        match o.apply(key.as_bytes(), v.as_bytes()) {
            Ok(true) => Ok(o),
            Ok(false) => Err("unknown".into()),
            Err(r) => Err(r.as_str().into()),
        }
    }

    #[test]
    fn parses_sizes_with_suffixes_and_hex() {
        assert_eq!(parse_size(b"4K"), Some(4096));
        assert_eq!(parse_size(b"0x200"), Some(512));
        assert_eq!(parse_size(b"2G"), Some(2 << 30));
        assert_eq!(parse_size(b"0x"), None);
        assert_eq!(parse_size(b"x1"), None);
        assert_eq!(parse_size(b"99999999999G"), None);
    }

    #[test]
    fn parses_blk_regions_seed_and_bench() {
        let o = apply("blk_read", "1M:64K").unwrap();
        assert_eq!(o.blk_read, Some(Region { start: 1 << 20, len: 64 << 10 }));
        assert!(apply("blk_write", "100:512").is_err());
        assert!(apply("blk_write", "0:0").is_err());
        assert_eq!(apply("blk_seed", "0x1234").unwrap().blk_seed, 0x1234);
        let b = apply("blk_bench", "randwrite,qd=64,bs=4K,ms=1500,span=64M").unwrap().blk_bench.unwrap();
        assert_eq!(b, BlkBench { mode: BlkMode::RandWrite, qd: 64, bs: 4096, ms: 1500, start: 0, span: 64 << 20 });
        assert_eq!(apply("blk_bench", "seqread").unwrap().blk_bench.unwrap().qd, 32);
        assert!(apply("blk_bench", "randread,qd=0").is_err());
        assert!(apply("blk_bench", "randread,bs=100").is_err());
        assert!(apply("blk_bench", "scan").is_err());
    }

    #[test]
    fn parses_net_options() {
        let o = apply("net_ip", "10.0.2.15/24").unwrap();
        assert_eq!((o.net_ip, o.net_prefix), (Some([10, 0, 2, 15]), 24));
        assert!(apply("net_ip", "10.0.2/24").is_err());
        assert!(apply("net_ip", "10.0.2.300").is_err());
        assert!(apply("net_ip", "10.0.2.1/33").is_err());
        let n = apply("net_bench", "source,dst=10.0.2.1,dst_mac=52:54:0:ab:cd:ef,size=1000,secs=2").unwrap();
        let n = n.net_bench.unwrap();
        assert_eq!(n.dst_mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!((n.mode, n.size, n.ms, n.dst_ip), (NetMode::Source, 1000, 2000, Some([10, 0, 2, 1])));
        assert!(apply("net_bench", "sink,size=20").is_err());
        assert!(apply("net_bench", "source,dst_mac=1:2:3").is_err());
    }

    #[test]
    fn parses_hostile_and_queue_options() {
        let o = apply("hostile", "blk").unwrap();
        assert_eq!(o.hostile_target, crate::virtio::TYPE_BLOCK);
        let o = apply("hostile_cases", "loop,ring_oob").unwrap();
        assert_eq!(o.hostile_cases, HostileCase::Loop.bit() | HostileCase::RingOob.bit());
        assert!(apply("hostile_cases", "loop,nope").is_err());
        assert!(apply("virtio_qsize", "100").is_err());
        assert_eq!(apply("virtio_qsize", "64").unwrap().qsize, 64);
        assert_eq!(apply("nope", "1").unwrap_err(), "unknown");
        assert!(DevOptions::default().msix_enable);
        assert!(!apply("msix_enable", "0").unwrap().msix_enable);
        assert!(apply("msix_enable", "off").is_err());
    }
}
