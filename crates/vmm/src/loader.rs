//! Loading the kernel and initrd into guest memory.
//!
//! - ELF vmlinux: segments at their physical addresses (`linux-loader`); PVH entry when the
//!   ELF has the PVH note, else the 64-bit entry.
//! - bzImage: the payload is unpacked on the host when kiln knows its compression, and the
//!   resulting vmlinux is loaded like an ELF kernel, keeping the bzImage's setup header for
//!   the zero page. Otherwise the bzImage is loaded as is and entered at its 64-bit entry,
//!   and the guest decompresses itself.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kiln_arch::boot::Initrd;
use kiln_arch::layout::HIMEM_START;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile,
    VolatileSlice,
};

use crate::decompress::{self, DecompressError};
use crate::memory::GuestMemory;

/// Loader errors.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The file cannot be opened or read.
    #[error("cannot read {what} {path}")]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        /// File.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" at offset 0x202)")]
    UnknownFormat {
        /// File.
        path: PathBuf,
    },
    /// `linux-loader` rejected the image.
    #[error("cannot load kernel {path}: {message}")]
    Load {
        /// File.
        path: PathBuf,
        /// What the loader said.
        message: String,
    },
    /// The bzImage header is inconsistent.
    #[error("kernel {path}: bad bzImage header: {reason}")]
    BadBzImage {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// PVH was asked for but the kernel has no PVH note.
    #[error("kernel {path} has no PVH entry point (no XEN_ELFNOTE_PHYS32_ENTRY note); use --entry linux64")]
    NoPvh {
        /// File.
        path: PathBuf,
    },
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM between the kernel (ends {kernel_end:#x}) and {limit:#x}")]
    InitrdTooLarge {
        /// File.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// End of the kernel.
        kernel_end: u64,
        /// Highest address allowed.
        limit: u64,
    },
}

/// How the kernel was loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// An ELF vmlinux.
    Elf,
    /// A bzImage whose payload kiln unpacked.
    BzImageUnpacked(decompress::Format),
    /// A bzImage loaded compressed.
    BzImage,
}

/// A kernel in guest memory.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    /// How it was loaded.
    pub kind: KernelKind,
    /// 64-bit entry address.
    pub entry64: u64,
    /// PVH entry, when the kernel has one.
    pub pvh_entry: Option<u64>,
    /// First byte after the kernel.
    pub kernel_end: u64,
    /// The bzImage setup header, for the zero page.
    pub setup_header: Option<setup_header>,
    /// Highest address an initrd may end at.
    pub initrd_addr_max: u64,
}

/// Reads a byte slice like a file, for loading an unpacked vmlinux.
struct SliceReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Read for SliceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (&self.data[self.pos.min(self.data.len())..]).read(buf)?;
        self.pos += n;
        Ok(n)
    }
}

impl Seek for SliceReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let len = self.data.len() as u64;
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => len.checked_add_signed(d),
            SeekFrom::Current(d) => (self.pos as u64).checked_add_signed(d),
        }
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek out of range")
        })?;
        self.pos = usize::try_from(new).unwrap_or(usize::MAX);
        Ok(new)
    }
}

impl ReadVolatile for SliceReader<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        let mut rest = &self.data[self.pos.min(self.data.len())..];
        let n = rest.read_volatile(buf)?;
        self.pos += n;
        Ok(n)
    }
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LoaderError + 'a {
    move |source| LoaderError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Address of the end of the last RAM below the 32-bit hole, for initrd placement.
fn low_ram_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .filter(|&end| end <= 1 << 32)
        .max()
        .unwrap_or(0)
}

fn load_elf<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemory,
    path: &Path,
    image: &mut F,
) -> Result<KernelLoaderResult, LoaderError> {
    Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START))).map_err(|e| LoaderError::Load {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn pvh(r: &KernelLoaderResult) -> Option<u64> {
    match r.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
        _ => None,
    }
}

/// Default `initrd_addr_max` of the Linux boot protocol.
const INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Loads the kernel at `path`; `unpack` allows host-side decompression of bzImages.
pub fn load_kernel(
    mem: &GuestMemory,
    path: &Path,
    unpack: bool,
) -> Result<LoadedKernel, LoaderError> {
    let mut file = File::open(path).map_err(io_err("kernel", path))?;
    let mut head = [0u8; 0x400];
    let n = read_up_to(&mut file, &mut head).map_err(io_err("kernel", path))?;
    let head = &head[..n];
    if head.starts_with(b"\x7fELF") {
        let r = load_elf(mem, path, &mut file)?;
        return Ok(LoadedKernel {
            kind: KernelKind::Elf,
            entry64: r.kernel_load.0,
            pvh_entry: pvh(&r),
            kernel_end: r.kernel_end,
            setup_header: None,
            initrd_addr_max: INITRD_ADDR_MAX,
        });
    }
    if head.get(0x202..0x206) != Some(b"HdrS") {
        return Err(LoaderError::UnknownFormat {
            path: path.to_owned(),
        });
    }
    let hdr = setup_header::from_slice(&head[0x1f1..0x1f1 + std::mem::size_of::<setup_header>()])
        .copied()
        .ok_or_else(|| LoaderError::BadBzImage {
            path: path.to_owned(),
            reason: "short header".into(),
        })?;
    let initrd_addr_max = if hdr.version >= 0x203 && hdr.initrd_addr_max != 0 {
        u64::from(hdr.initrd_addr_max)
    } else {
        INITRD_ADDR_MAX
    };
    if unpack {
        match unpack_bzimage(mem, path, &mut file, &hdr) {
            Ok(k) => {
                return Ok(LoadedKernel {
                    initrd_addr_max,
                    ..k
                })
            }
            Err(UnpackError::Skip(reason)) => {
                log::info!("booting {} compressed: {reason}", path.display());
            }
            Err(UnpackError::Fatal(e)) => return Err(e),
        }
    }
    let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        LoaderError::Load {
            path: path.to_owned(),
            message: e.to_string(),
        }
    })?;
    Ok(LoadedKernel {
        kind: KernelKind::BzImage,
        // The 64-bit entry of a bzImage is 0x200 past the start of the protected-mode code.
        entry64: r.kernel_load.0 + 0x200,
        pvh_entry: None,
        kernel_end: r.kernel_end,
        setup_header: r.setup_header,
        initrd_addr_max,
    })
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

enum UnpackError {
    /// Not unpackable; boot it compressed.
    Skip(String),
    /// The image is broken.
    Fatal(LoaderError),
}

fn unpack_bzimage(
    mem: &GuestMemory,
    path: &Path,
    file: &mut File,
    hdr: &setup_header,
) -> Result<LoadedKernel, UnpackError> {
    let bad = |reason: String| {
        UnpackError::Fatal(LoaderError::BadBzImage {
            path: path.to_owned(),
            reason,
        })
    };
    if hdr.version < 0x208 {
        let version = hdr.version;
        return Err(UnpackError::Skip(format!(
            "boot protocol {version:#x} has no payload fields"
        )));
    }
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        u64::from(hdr.setup_sects)
    };
    let payload_start = (setup_sects + 1) * 512 + u64::from(hdr.payload_offset);
    let payload_len = usize::try_from(hdr.payload_length).unwrap_or(usize::MAX);
    let file_len = file
        .metadata()
        .map_err(|e| UnpackError::Fatal(io_err("kernel", path)(e)))?
        .len();
    if payload_len < 8 || payload_start.saturating_add(payload_len as u64) > file_len {
        return Err(bad(format!(
            "payload {payload_start:#x}+{payload_len:#x} lies outside the {file_len}-byte file"
        )));
    }
    let mut payload = vec![0u8; payload_len];
    file.seek(SeekFrom::Start(payload_start))
        .and_then(|_| file.read_exact(&mut payload))
        .map_err(|e| UnpackError::Fatal(io_err("kernel", path)(e)))?;
    let format = decompress::Format::detect(&payload)
        .ok_or_else(|| UnpackError::Skip("unknown compression".into()))?;
    let vmlinux = match decompress::decompress(&payload) {
        Ok(v) => v,
        Err(e @ (DecompressError::Unsupported(_) | DecompressError::Unknown)) => {
            return Err(UnpackError::Skip(e.to_string()))
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    drop(payload);
    if !vmlinux.starts_with(b"\x7fELF") {
        return Err(bad("payload is not an ELF image".into()));
    }
    let r = load_elf(
        mem,
        path,
        &mut SliceReader {
            data: &vmlinux,
            pos: 0,
        },
    )
    .map_err(UnpackError::Fatal)?;
    Ok(LoadedKernel {
        kind: KernelKind::BzImageUnpacked(format),
        entry64: r.kernel_load.0,
        pvh_entry: pvh(&r),
        kernel_end: r.kernel_end,
        setup_header: Some(*hdr),
        initrd_addr_max: INITRD_ADDR_MAX,
    })
}

/// Loads the initrd at the highest page-aligned address that keeps it below both the end of
/// low RAM and the kernel's `initrd_addr_max`, and above the kernel.
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<Initrd, LoaderError> {
    let mut file = File::open(path).map_err(io_err("initrd", path))?;
    let size = file.metadata().map_err(io_err("initrd", path))?.len();
    let limit = low_ram_end(mem).min(kernel.initrd_addr_max.saturating_add(1));
    let too_large = || LoaderError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        kernel_end: kernel.kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel.kernel_end.next_multiple_of(0x1000) {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| LoaderError::Io {
            what: "initrd",
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?;
    Ok(Initrd { addr, size })
}
