//! What the firmware tables say about the PCI host bridge: where ECAM is (the
//! MCFG table, or the root bridge's `_CBA` in the DSDT) and which address
//! windows the bridge decodes (its `_CRS` resource template).
//!
//! The AML side is a scan, not an interpreter: it finds the root bridge by its
//! `_HID`/`_CID` (PNP0A08 or PNP0A03, as a string or an EISA id), then the
//! first `_CRS` buffer after it that holds a bus-number range (the bridge's own
//! `_CRS`; link devices and `RES0` children have none), and `_CBA`. That covers
//! the tables QEMU and kiln generate; anything fancier (a `_CRS` method that
//! computes its buffer) is reported as "no windows" rather than misread.

use crate::reason;
use crate::util::Reason;

/// Where the ECAM base came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EcamSource {
    Mcfg,
    Cba,
}

impl EcamSource {
    pub fn name(self) -> &'static str {
        match self {
            EcamSource::Mcfg => "mcfg",
            EcamSource::Cba => "dsdt",
        }
    }
}

/// An ECAM region: configuration space of buses `bus_start..=bus_end`;
/// `base` is the address of bus 0 (as in MCFG), whatever `bus_start` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ecam {
    pub base: u64,
    pub bus_start: u8,
    pub bus_end: u8,
    pub source: EcamSource,
}

impl Ecam {
    /// The address range `[start, end)` this ECAM region occupies.
    pub fn range(&self) -> (u64, u64) {
        let start = self.base + (u64::from(self.bus_start) << 20);
        (start, self.base + ((u64::from(self.bus_end) + 1) << 20))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowKind {
    Mem,
    Io,
    Bus,
}

/// A range the host bridge decodes, `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub kind: WindowKind,
    pub start: u64,
    pub end: u64,
}

const MAX_WINDOWS: usize = 16;

/// The root bridge as the DSDT describes it.
#[derive(Clone, Copy, Debug)]
pub struct HostBridge {
    windows: [Window; MAX_WINDOWS],
    nwindows: usize,
    /// `_CBA`: the ECAM base, when the DSDT gives it.
    pub cba: Option<u64>,
}

impl HostBridge {
    pub fn windows(&self) -> &[Window] {
        &self.windows[..self.nwindows]
    }

    /// The bus range from the bridge's `_CRS` (inclusive).
    pub fn buses(&self) -> Option<(u8, u8)> {
        self.windows().iter().find(|w| w.kind == WindowKind::Bus).map(|w| {
            let clamp = |v: u64| u8::try_from(v.min(255)).unwrap_or(u8::MAX);
            (clamp(w.start), clamp(w.end.saturating_sub(1)))
        })
    }

    fn push(&mut self, w: Window) {
        if self.nwindows < MAX_WINDOWS && w.end > w.start {
            self.windows[self.nwindows] = w;
            self.nwindows += 1;
        }
    }
}

fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |v, &x| (v << 8) | u64::from(x))
}

/// The first ECAM entry of segment 0 in an MCFG table (the whole table,
/// header included). `Ok(None)` if the table lists no segment-0 region.
pub fn parse_mcfg(table: &[u8]) -> Result<Option<Ecam>, Reason> {
    if table.len() < 44 {
        return Err(reason!("MCFG too short ({} bytes)", table.len()));
    }
    if !(table.len() - 44).is_multiple_of(16) {
        return Err(reason!("MCFG length {} is not 44 + 16 * n", table.len()));
    }
    for e in table[44..].chunks_exact(16) {
        let (base, segment, start, end) = (le(&e[0..8]), le(&e[8..10]), e[10], e[11]);
        if segment != 0 {
            continue;
        }
        if end < start {
            return Err(reason!("MCFG bus range {}-{} is reversed", start, end));
        }
        if base == 0 || base % (1 << 20) != 0 {
            return Err(reason!("MCFG base {:#x} is not 1 MiB aligned", base));
        }
        return Ok(Some(Ecam { base, bus_start: start, bus_end: end, source: EcamSource::Mcfg }));
    }
    Ok(None)
}

/// Decodes an AML integer constant at `b[0]`: (value, bytes used).
fn aml_int(b: &[u8]) -> Option<(u64, usize)> {
    let n = match *b.first()? {
        0x00 => return Some((0, 1)),
        0x01 => return Some((1, 1)),
        0xff => return Some((u64::MAX, 1)),
        0x0a => 1,
        0x0b => 2,
        0x0c => 4,
        0x0e => 8,
        _ => return None,
    };
    Some((le(b.get(1..1 + n)?), 1 + n))
}

/// Decodes an AML PkgLength at `b[0]`: (length, bytes used by the encoding).
fn pkg_length(b: &[u8]) -> Option<(usize, usize)> {
    let lead = *b.first()?;
    let extra = usize::from(lead >> 6);
    if extra == 0 {
        return Some((usize::from(lead & 0x3f), 1));
    }
    let mut len = usize::from(lead & 0x0f);
    for i in 0..extra {
        len |= usize::from(*b.get(1 + i)?) << (4 + 8 * i);
    }
    Some((len, 1 + extra))
}

/// The bytes of a `Buffer` whose BufferOp (0x11) is at `b[0]`.
fn aml_buffer(b: &[u8]) -> Option<&[u8]> {
    if *b.first()? != 0x11 {
        return None;
    }
    let (pkg, used) = pkg_length(&b[1..])?;
    let body = b.get(1 + used..1 + pkg)?;
    let (size, isize) = aml_int(body)?;
    let data = &body[isize..];
    let size = usize::try_from(size).ok()?.min(data.len());
    Some(&data[..size])
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

/// Positions of root-bridge ids (PNP0A08 or PNP0A03 as a string or EISA id).
fn bridge_ids(aml: &[u8], from: usize) -> Option<usize> {
    const IDS: [&[u8]; 4] =
        [b"\x0dPNP0A08\x00", b"\x0dPNP0A03\x00", &[0x0c, 0x41, 0xd0, 0x0a, 0x08], &[0x0c, 0x41, 0xd0, 0x0a, 0x03]];
    IDS.iter().filter_map(|id| find(aml, id, from)).min()
}

/// The value of the object whose NameSeg is at `aml[at..at + 4]`: for
/// `Name (X, value)` (NameOp 0x08 right before the name) the bytes after the
/// name; for `Method (X) { Return (value) }` the bytes after the method
/// flags and the ReturnOp (0xa4).
fn object_value(aml: &[u8], at: usize) -> Option<&[u8]> {
    let after = aml.get(at + 4..)?;
    if at > 0 && aml[at - 1] == 0x08 {
        Some(after)
    } else if after.get(1) == Some(&0xa4) {
        after.get(2..)
    } else {
        None
    }
}

/// Parses a resource template into the bridge's windows. Returns whether it
/// held a bus-number range (what marks the bridge's own `_CRS`).
fn parse_resources(buf: &[u8], hb: &mut HostBridge) -> bool {
    let mut found_bus = false;
    let mut i = 0;
    while i < buf.len() {
        let tag = buf[i];
        if tag & 0x80 == 0 {
            let len = usize::from(tag & 7);
            if tag & 0x78 == 0x78 {
                break; // end tag
            }
            // I/O port descriptor: min u16, max u16, align, length.
            if tag & 0x78 == 0x40 && len >= 7 {
                if let Some(d) = buf.get(i + 1..i + 8) {
                    let (min, max, size) = (le(&d[1..3]), le(&d[3..5]), u64::from(d[6]));
                    hb.push(Window { kind: WindowKind::Io, start: min, end: max + size });
                }
            }
            i += 1 + len;
            continue;
        }
        let Some(len) = buf.get(i + 1..i + 3).map(le) else { break };
        let Some(body) = buf.get(i + 3..i + 3 + len as usize) else { break };
        // Word (0x88), DWord (0x87) and QWord (0x8a) address space descriptors:
        // type, general flags, type flags, then granularity, min, max, translation, length.
        let width = match tag {
            0x88 => 2,
            0x87 => 4,
            0x8a => 8,
            _ => 0,
        };
        if width > 0 && body.len() >= 3 + 5 * width {
            let field = |k: usize| le(&body[3 + k * width..3 + (k + 1) * width]);
            let (min, max) = (field(1), field(2));
            let kind = match body[0] {
                0 => Some(WindowKind::Mem),
                1 => Some(WindowKind::Io),
                2 => Some(WindowKind::Bus),
                _ => None,
            };
            if let Some(kind) = kind {
                found_bus |= kind == WindowKind::Bus;
                if max >= min {
                    hb.push(Window { kind, start: min, end: max.saturating_add(1) });
                }
            }
        }
        i += 3 + len as usize;
    }
    found_bus
}

/// Finds the PCI root bridge in the DSDT's AML (the table body, after the
/// 36-byte header) and what it describes.
pub fn parse_host_bridge(aml: &[u8]) -> Option<HostBridge> {
    let start = bridge_ids(aml, 0)?;
    // The bridge's own objects end where the next bridge starts (the _CID right
    // after the _HID does not count).
    let end = bridge_ids(aml, start + 16).unwrap_or(aml.len());
    let region = &aml[start..end];
    let mut hb = HostBridge {
        windows: [Window { kind: WindowKind::Mem, start: 0, end: 0 }; MAX_WINDOWS],
        nwindows: 0,
        cba: None,
    };
    let mut at = 0;
    while let Some(p) = find(region, b"_CRS", at) {
        at = p + 4;
        if let Some(buf) = object_value(region, p).and_then(aml_buffer) {
            let mut candidate = hb;
            if parse_resources(buf, &mut candidate) {
                hb = candidate;
                break;
            }
        }
    }
    if let Some(p) = find(region, b"_CBA", 0) {
        hb.cba = object_value(region, p).and_then(aml_int).map(|(v, _)| v);
    }
    Some(hb)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mcfg(entries: &[(u64, u16, u8, u8)]) -> Vec<u8> {
        let mut t = vec![0u8; 44];
        t[..4].copy_from_slice(b"MCFG");
        for &(base, seg, s, e) in entries {
            t.extend_from_slice(&base.to_le_bytes());
            t.extend_from_slice(&seg.to_le_bytes());
            t.extend_from_slice(&[s, e, 0, 0, 0, 0]);
        }
        t
    }

    #[test]
    fn mcfg_gives_the_segment_0_region() {
        let t = mcfg(&[(0x1_0000_0000, 1, 0, 255), (0xe000_0000, 0, 0, 15)]);
        let e = parse_mcfg(&t).unwrap().unwrap();
        assert_eq!((e.base, e.bus_start, e.bus_end, e.source), (0xe000_0000, 0, 15, EcamSource::Mcfg));
        assert_eq!(e.range(), (0xe000_0000, 0xe100_0000));
    }

    #[test]
    fn mcfg_rejects_bad_entries() {
        assert!(parse_mcfg(&mcfg(&[(0xe000_0000, 0, 5, 2)])).is_err());
        assert!(parse_mcfg(&mcfg(&[(0xe000_1000, 0, 0, 2)])).is_err());
        assert!(parse_mcfg(&mcfg(&[(0xe000_0000, 0, 0, 2)])[..50]).is_err());
        assert_eq!(parse_mcfg(&mcfg(&[])).unwrap(), None);
    }

    /// A resource template: WordBusNumber 0-255, DWordMemory, DWordIO, QWordMemory, end.
    fn crs() -> Vec<u8> {
        let mut r = vec![0x88, 13, 0, 2, 0, 0];
        for v in [0u16, 0, 255, 0, 256] {
            r.extend_from_slice(&v.to_le_bytes());
        }
        r.extend_from_slice(&[0x87, 23, 0, 0, 0, 0]);
        for v in [0u32, 0xc000_0000, 0xdfff_ffff, 0, 0x2000_0000] {
            r.extend_from_slice(&v.to_le_bytes());
        }
        r.extend_from_slice(&[0x87, 23, 0, 1, 0, 0]);
        for v in [0u32, 0x1000, 0xffff, 0, 0xf000] {
            r.extend_from_slice(&v.to_le_bytes());
        }
        r.extend_from_slice(&[0x8a, 43, 0, 0, 0, 0]);
        for v in [0u64, 0x80_0000_0000, 0xff_ffff_ffff, 0, 0x80_0000_0000] {
            r.extend_from_slice(&v.to_le_bytes());
        }
        r.extend_from_slice(&[0x79, 0]);
        r
    }

    /// Name (_CRS, Buffer () { <r> }) in AML.
    fn name_crs(r: &[u8]) -> Vec<u8> {
        let mut body = vec![0x0b];
        body.extend_from_slice(&u16::try_from(r.len()).unwrap().to_le_bytes());
        body.extend_from_slice(r);
        let len = body.len() + 2; // two-byte PkgLength counts itself
        let mut v = b"\x08_CRS\x11".to_vec();
        v.push(0x40 | u8::try_from(len & 0xf).unwrap());
        v.push(u8::try_from(len >> 4).unwrap());
        v.extend_from_slice(&body);
        v
    }

    #[test]
    fn finds_the_bridge_crs_after_link_device_crs() {
        let mut aml = b"\x08_HID\x0dPNP0A08\x00\x08_CID\x0dPNP0A03\x00".to_vec();
        // A link device's _CRS (an Interrupt descriptor, no bus range) comes first.
        aml.extend_from_slice(&name_crs(&[0x89, 6, 0, 1, 1, 0x10, 0, 0, 0, 0x79, 0]));
        aml.extend_from_slice(b"\x14\x0a_CBA\x00\xa4\x0c\x00\x00\x00\xe0");
        aml.extend_from_slice(&name_crs(&crs()));
        let hb = parse_host_bridge(&aml).unwrap();
        assert_eq!(hb.cba, Some(0xe000_0000));
        assert_eq!(hb.buses(), Some((0, 255)));
        let w = hb.windows();
        assert_eq!(w.len(), 4);
        assert_eq!(w[1], Window { kind: WindowKind::Mem, start: 0xc000_0000, end: 0xe000_0000 });
        assert_eq!(w[2], Window { kind: WindowKind::Io, start: 0x1000, end: 0x1_0000 });
        assert_eq!(w[3], Window { kind: WindowKind::Mem, start: 0x80_0000_0000, end: 0x100_0000_0000 });
    }

    #[test]
    fn accepts_an_eisa_id_and_io_port_descriptors() {
        let mut aml = vec![0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x08];
        let mut r = crs();
        r.splice(0..0, [0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]);
        aml.extend_from_slice(&name_crs(&r));
        let hb = parse_host_bridge(&aml).unwrap();
        assert_eq!(hb.windows()[0], Window { kind: WindowKind::Io, start: 0xcf8, end: 0xd00 });
        assert_eq!(hb.cba, None);
        aml.extend_from_slice(b"\x08_CBA\x0e\x00\x00\x00\x00\x01\x00\x00\x00");
        assert_eq!(parse_host_bridge(&aml).unwrap().cba, Some(1 << 32));
    }

    #[test]
    fn no_bridge_or_truncated_aml_yields_nothing_usable() {
        assert!(parse_host_bridge(b"\x08_HID\x0dPNP0501\x00").is_none());
        let mut aml = b"\x08_HID\x0dPNP0A08\x00".to_vec();
        let c = name_crs(&crs());
        aml.extend_from_slice(&c[..c.len() - 30]);
        let hb = parse_host_bridge(&aml).unwrap();
        assert!(hb.buses().is_none() || hb.windows().len() < 4);
    }

    #[test]
    fn reads_qemu_microvm_dsdt() {
        // The DSDT QEMU 7.2 gives `-M microvm,pcie=on` (dumped by the probe).
        let dsdt = include_bytes!("../testdata/qemu-7.2-microvm-pcie-dsdt.bin");
        assert_eq!(&dsdt[..4], b"DSDT");
        let hb = parse_host_bridge(&dsdt[36..]).unwrap();
        assert_eq!(hb.cba, Some(0xe000_0000));
        assert_eq!(hb.buses(), Some((0, 255)));
        let mem: Vec<_> = hb.windows().iter().filter(|w| w.kind == WindowKind::Mem).map(|w| (w.start, w.end)).collect();
        assert_eq!(mem, vec![(0xc000_0000, 0xe000_0000), (0xc000_0000_0000, 0x1_0000_0000_0000)]);
    }

    #[test]
    fn decodes_pkg_lengths_and_integers() {
        assert_eq!(pkg_length(&[0x3f]), Some((0x3f, 1)));
        assert_eq!(pkg_length(&[0x41, 0x02]), Some((0x21, 2)));
        assert_eq!(pkg_length(&[0x81, 0x02, 0x01]), Some((0x1021, 3)));
        assert_eq!(pkg_length(&[0x81, 0x02]), None);
        assert_eq!(aml_int(&[0x0b, 0x34, 0x12]), Some((0x1234, 3)));
        assert_eq!(aml_int(&[0x0e, 1, 0, 0, 0, 0, 0, 0, 0x80]), Some((0x8000_0000_0000_0001, 9)));
        assert_eq!(aml_int(&[0x0c, 1, 2]), None);
        assert_eq!(aml_int(&[0x5b]), None);
    }
}
