//! virtio-mmio devices announced on the kernel command line
//! (`virtio_mmio.device=<size>@<base>:<irq>[:<id>]`, as Linux reads them).

use crate::bootinfo::E820Entry;
use crate::devopts::parse_size;
use crate::emit;
use crate::paging;
use crate::ranges::Reserved;

use super::transport::{mmio_identify, Regs};
use super::{type_name, Dev, DevId, Devs};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// Parses one `virtio_mmio.device=` value.
pub fn parse_spec(v: &[u8]) -> Option<Spec> {
    let at = v.iter().position(|&b| b == b'@')?;
    let size = parse_size(&v[..at])?;
    let mut rest = v[at + 1..].split(|&b| b == b':');
    let base = parse_size(rest.next()?)?;
    let irq = u32::try_from(crate::cmdline::parse_u64(rest.next()?)?).ok()?;
    (size >= 0x200 && base % 4 == 0 && base.checked_add(size).is_some()).then_some(Spec { base, size, irq })
}

/// Every `virtio_mmio.device=` word of the command line (malformed ones as `None`).
pub fn specs(cmdline: &[u8]) -> impl Iterator<Item = (&[u8], Option<Spec>)> {
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter_map(|w| w.strip_prefix(b"virtio_mmio.device="))
        .map(|v| (v, parse_spec(v)))
}

/// Adds the command line's virtio-mmio devices, mapping their registers if
/// they lie above the identity map; prints one `PROBE info virtio-mmio` line each.
pub fn add_from_cmdline(devs: &mut Devs, cmdline: &[u8], e820: &[E820Entry], reserved: &mut Reserved) {
    for (raw, spec) in specs(cmdline) {
        let Some(s) = spec else {
            emit!("PROBE info virtio-mmio error=malformed virtio_mmio.device={}", crate::util::Printable(raw));
            continue;
        };
        if !paging::is_mapped(s.base) {
            if let Err(r) = paging::map_range(s.base, s.base + s.size, e820, reserved) {
                emit!("PROBE info virtio-mmio base={:#x} size={:#x} irq={} error={}", s.base, s.size, s.irq, r);
                continue;
            }
        }
        match mmio_identify(s.base) {
            Ok(Some(t)) => {
                emit!(
                    "PROBE info virtio-mmio base={:#x} size={:#x} irq={} type={}",
                    s.base,
                    s.size,
                    s.irq,
                    type_name(t)
                );
                devs.push(Dev {
                    id: DevId::Mmio(s.base),
                    dev_type: t,
                    regs: Ok(Regs::Mmio { base: s.base, size: s.size }),
                });
            }
            Ok(None) => emit!("PROBE info virtio-mmio base={:#x} size={:#x} irq={} type=none", s.base, s.size, s.irq),
            Err(r) => emit!("PROBE info virtio-mmio base={:#x} size={:#x} irq={} error={}", s.base, s.size, s.irq, r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_linux_style_device_words() {
        assert_eq!(parse_spec(b"4K@0xf0000000:5"), Some(Spec { base: 0xf000_0000, size: 4096, irq: 5 }));
        assert_eq!(parse_spec(b"0x200@0xd0000000:12:3"), Some(Spec { base: 0xd000_0000, size: 0x200, irq: 12 }));
        assert_eq!(parse_spec(b"4K@0xf0000000"), None);
        assert_eq!(parse_spec(b"4K@0xf0000100:5"), Some(Spec { base: 0xf000_0100, size: 4096, irq: 5 }));
        assert_eq!(parse_spec(b"4K@0xf0000002:5"), None);
        assert_eq!(parse_spec(b"0x100@0xf0000000:5"), None);
        assert_eq!(parse_spec(b"@0xf0000000:5"), None);
        let words: Vec<_> =
            specs(b"console=ttyS0 virtio_mmio.device=4K@0xf0000000:5 probe.checks=blk virtio_mmio.device=x").collect();
        assert_eq!(words.len(), 2);
        assert!(words[0].1.is_some() && words[1].1.is_none());
    }
}
