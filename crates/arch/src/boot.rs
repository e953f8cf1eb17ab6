//! Boot information handed to the kernel: the Linux zero page, the PVH start info, and the
//! command line.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::e820::E820Entry;
use crate::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, ZERO_PAGE_ADDR,
};

/// Errors writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootInfoError {
    /// The command line does not fit.
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong {
        /// Length given.
        len: usize,
        /// Largest allowed.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Too many e820 entries for the structure.
    #[error("{0} e820 entries do not fit the boot structure")]
    TooManyE820(usize),
    /// Guest memory write failed.
    #[error("cannot write the {what} into guest memory")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// An initial ramdisk already loaded into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initrd {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: plain C struct of integers; any bit pattern is valid.
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: plain C struct of integers; any bit pattern is valid.
unsafe impl ByteValued for MemmapEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: plain C struct of integers; any bit pattern is valid.
unsafe impl ByteValued for ModlistEntry {}

fn write<M: GuestMemoryBackend, T: ByteValued>(
    mem: &M,
    what: &'static str,
    addr: u64,
    val: T,
) -> Result<(), BootInfoError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| BootInfoError::Write { what, source })
}

/// Writes the NUL-terminated command line at [`CMDLINE_ADDR`]; returns its length without
/// the NUL.
pub fn write_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &str,
) -> Result<usize, BootInfoError> {
    let bytes = cmdline.as_bytes();
    if bytes.len() >= CMDLINE_MAX_SIZE {
        return Err(BootInfoError::CmdlineTooLong {
            len: bytes.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if bytes.contains(&0) {
        return Err(BootInfoError::CmdlineNul);
    }
    let mut buf = Vec::with_capacity(bytes.len() + 1);
    buf.extend_from_slice(bytes);
    buf.push(0);
    mem.write_slice(&buf, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| BootInfoError::Write {
            what: "command line",
            source,
        })?;
    Ok(bytes.len())
}

/// What both boot protocols tell the kernel.
#[derive(Clone, Debug)]
pub struct BootInfo<'a> {
    /// The memory map.
    pub e820: &'a [E820Entry],
    /// Command line length (written by [`write_cmdline`]).
    pub cmdline_len: usize,
    /// Address of the ACPI RSDP.
    pub rsdp: u64,
    /// Initial ramdisk, if any.
    pub initrd: Option<Initrd>,
}

/// Writes the Linux zero page at [`ZERO_PAGE_ADDR`]. `header` is the bzImage's setup header
/// when there is one; for an ELF kernel kiln makes a minimal one.
pub fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    info: &BootInfo,
    header: Option<setup_header>,
) -> Result<u64, BootInfoError> {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
    const CAN_USE_HEAP: u8 = 0x80;

    let mut params = boot_params::default();
    let p = &mut params;
    if let Some(h) = header {
        p.hdr = h;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    if p.hdr.kernel_alignment == 0 {
        p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    p.hdr.loadflags |= CAN_USE_HEAP;
    p.hdr.heap_end_ptr = 0xfe00;
    p.hdr.vid_mode = 0xffff;
    p.hdr.cmd_line_ptr = u32::try_from(CMDLINE_ADDR).unwrap_or_default();
    p.hdr.cmdline_size = u32::try_from(info.cmdline_len).unwrap_or(u32::MAX);
    if let Some(initrd) = info.initrd {
        p.hdr.ramdisk_image = (initrd.addr & 0xffff_ffff) as u32;
        p.hdr.ramdisk_size = (initrd.size & 0xffff_ffff) as u32;
        p.ext_ramdisk_image = (initrd.addr >> 32) as u32;
        p.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    p.acpi_rsdp_addr = info.rsdp;
    if info.e820.len() > p.e820_table.len() {
        return Err(BootInfoError::TooManyE820(info.e820.len()));
    }
    for (slot, e) in p.e820_table.iter_mut().zip(info.e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    p.e820_entries =
        u8::try_from(info.e820.len()).map_err(|_| BootInfoError::TooManyE820(info.e820.len()))?;
    write(mem, "zero page", ZERO_PAGE_ADDR, params)?;
    Ok(ZERO_PAGE_ADDR)
}

/// Writes the PVH `hvm_start_info` (with memory map and ramdisk module) at
/// [`PVH_INFO_ADDR`].
pub fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    info: &BootInfo,
) -> Result<u64, BootInfoError> {
    const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
    const MAX_MEMMAP: usize = 128;
    const MODLIST_ADDR: u64 = PVH_MEMMAP_ADDR + (MAX_MEMMAP as u64) * 24;

    if info.e820.len() > MAX_MEMMAP {
        return Err(BootInfoError::TooManyE820(info.e820.len()));
    }
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    for (i, e) in (0u64..).zip(info.e820) {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        write(
            mem,
            "PVH memory map",
            PVH_MEMMAP_ADDR + i * entry_size,
            MemmapEntry(entry),
        )?;
    }
    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: info.rsdp,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: u32::try_from(info.e820.len()).unwrap_or_default(),
        ..Default::default()
    };
    if let Some(initrd) = info.initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        write(mem, "PVH module list", MODLIST_ADDR, ModlistEntry(module))?;
        start.nr_modules = 1;
        start.modlist_paddr = MODLIST_ADDR;
    }
    write(mem, "PVH start info", PVH_INFO_ADDR, StartInfo(start))?;
    Ok(PVH_INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e820::e820_map;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn zero_page_carries_e820_cmdline_and_rsdp() {
        let m = mem();
        let e820 = e820_map(1 << 30);
        let len = write_cmdline(&m, "console=ttyS0").unwrap();
        let info = BootInfo {
            e820: &e820,
            cmdline_len: len,
            rsdp: 0xe0000,
            initrd: None,
        };
        let addr = write_zero_page(&m, &info, None).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(p.e820_entries as usize, e820.len());
        let (cmd_line_ptr, cmdline_size, rsdp) =
            (p.hdr.cmd_line_ptr, p.hdr.cmdline_size, p.acpi_rsdp_addr);
        assert_eq!((cmd_line_ptr, cmdline_size, rsdp), (0x20000, 13, 0xe0000));
        let mut s = [0u8; 14];
        m.read_slice(&mut s, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&s, b"console=ttyS0\0");
    }

    #[test]
    fn pvh_start_info_lists_memory_and_initrd() {
        let m = mem();
        let e820 = e820_map(8 << 30);
        let info = BootInfo {
            e820: &e820,
            cmdline_len: 0,
            rsdp: 0xe0000,
            initrd: Some(Initrd {
                addr: 0x800_0000,
                size: 4096,
            }),
        };
        let addr = write_pvh_start_info(&m, &info).unwrap();
        let si: StartInfo = m.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(si.0.magic, 0x336e_c578);
        assert_eq!(si.0.memmap_entries as usize, e820.len());
        assert_eq!(si.0.nr_modules, 1);
        let last: MemmapEntry = m
            .read_obj(GuestAddress(
                si.0.memmap_paddr + 24 * (e820.len() as u64 - 1),
            ))
            .unwrap();
        assert_eq!(last.0.addr, 1 << 32);
    }

    #[test]
    fn rejects_oversized_or_nul_cmdline() {
        let m = mem();
        assert!(matches!(
            write_cmdline(&m, &"x".repeat(CMDLINE_MAX_SIZE)),
            Err(BootInfoError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            write_cmdline(&m, "a\0b"),
            Err(BootInfoError::CmdlineNul)
        ));
    }
}
