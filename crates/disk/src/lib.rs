//! Disk image formats for kiln: raw and qcow2 behind one small trait.
//!
//! This crate knows nothing about KVM or virtio; `virtio-blk` and `kiln img` both use it.
//!
//! * [`BlockDevice`] is the trait every format implements. Its methods take `&self` and lock
//!   internally, so one opened image can be shared (`Arc<dyn BlockDevice>`) by several
//!   virtio queues or worker threads.
//! * [`open`] probes the format (or takes the one given), opens backing chains read-only and
//!   returns the image behind the trait. [`qcow2::Qcow2Image`] and [`raw::RawImage`] can also
//!   be used directly for format-specific operations (snapshots, check, compressed writes).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod aio;
pub mod crypto;
mod fileio;
pub mod qcow2;
pub mod raw;
pub mod testing;

pub use qcow2::{Qcow2Error, Qcow2Image};
pub use raw::RawImage;

/// The image formats this crate understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A plain file or block device: guest offset = file offset.
    Raw,
    /// QEMU copy-on-write version 2 or 3.
    Qcow2,
}

impl ImageFormat {
    /// The name qemu-img uses for this format.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Parses a qemu-img format name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

/// What a range of the virtual disk is backed by, as reported by [`BlockDevice::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data stored in this layer (at `host_offset` when the format can say).
    Data,
    /// Reads as zeroes, described by this layer (zero flag, hole, or past the backing file).
    Zero,
    /// Not described by this layer: reads come from the backing file (or are zero without one).
    Unallocated,
}

/// One extent of the virtual disk as seen by a single layer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes; at least 1 for any status request inside the disk.
    pub len: u64,
    /// What backs the range.
    pub kind: ExtentKind,
    /// Where the data lies in the image file, when it is stored there uncompressed.
    pub host_offset: Option<u64>,
    /// The range is stored compressed.
    pub compressed: bool,
    /// For `Data` stored at `host_offset`: the image file has a hole there (or ends
    /// before it), so the range reads as zeroes although storage is allocated to it. Only
    /// looked up where qemu looks too (qcow2 images with preallocated metadata), so that
    /// `map` and `convert` see what qemu-img sees.
    pub zero_in_file: bool,
}

/// Errors common to all formats.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An I/O error on the image file.
    #[error("{op} failed on {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A request reaches past the end of the virtual disk.
    #[error("request at offset {offset} length {len} is past the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// A write to an image opened read-only.
    #[error("image is opened read-only")]
    ReadOnly,
    /// The qcow2 driver failed.
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
    /// The format name is not one this crate knows.
    #[error("unknown image format '{0}'")]
    UnknownFormat(String),
    /// A backing chain names a file twice.
    #[error("backing chain loop: {0} is its own backing file")]
    BackingLoop(PathBuf),
    /// A backing chain is deeper than the limit.
    #[error("backing chain is deeper than {0} images")]
    ChainTooDeep(usize),
    /// Opening an image in the chain failed.
    #[error("could not open backing file {path}")]
    Backing {
        /// The backing file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<DiskError>,
    },
}

/// A virtual disk: what virtio-blk and `kiln img` read and write.
///
/// All methods take `&self`; implementations lock internally so that an image can be shared
/// between queues. Offsets and lengths are in bytes and need no particular alignment.
pub trait BlockDevice: Send + Sync {
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from the disk at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Writes `buf` to the disk at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DiskError>;
    /// Makes every write acknowledged so far durable (data and metadata).
    fn flush(&self) -> Result<(), DiskError>;
    /// Makes a range read as zeroes; `unmap` allows freeing the storage behind it.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError>;
    /// Tells the image the guest no longer needs a range. Contents afterwards are zero where
    /// the format can express it, else unchanged; whole clusters only for qcow2.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// Describes the extent starting at `offset` (at most `len` bytes) in this layer only.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, DiskError>;
    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;
    /// The on-disk format.
    fn format(&self) -> ImageFormat;
    /// The backing image, if this layer has one.
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }
    /// Bytes the image occupies on the host.
    fn allocated_size(&self) -> Result<u64, DiskError>;
    /// Changes the virtual size. Shrinking discards what lies beyond the new end.
    fn resize(&self, new_size: u64) -> Result<(), DiskError>;
}

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open without write access (backing files always are).
    pub read_only: bool,
    /// The format; probed from the file's first bytes when `None`.
    pub format: Option<ImageFormat>,
    /// Passphrase for encrypted qcow2 images.
    pub key: Option<Vec<u8>>,
    /// Do not open the backing file (qemu-img's `-u` style operations).
    pub no_backing: bool,
    /// Skip the dirty-image refcount repair (used by `check`, which reports instead).
    pub no_repair: bool,
    /// Open an image whose corrupt bit is set (read-only or for repair).
    pub allow_corrupt: bool,
    /// Never sync to stable storage (qemu's cache=unsafe): for images a tool writes in one
    /// go, such as a conversion target. Write ordering is kept; durability is not.
    pub no_sync: bool,
}

/// The deepest backing chain [`open`] follows.
pub const MAX_CHAIN_DEPTH: usize = 256;

/// Guesses the format of an open file from its first bytes: qcow2 by magic, else raw.
pub fn probe_file(file: &File) -> Result<ImageFormat, io::Error> {
    let mut magic = [0u8; 4];
    let n = fileio::read_up_to(file, 0, &mut magic)?;
    if n == 4 && magic == qcow2::MAGIC {
        Ok(ImageFormat::Qcow2)
    } else {
        Ok(ImageFormat::Raw)
    }
}

/// Guesses the format of the file at `path`.
pub fn probe(path: &Path) -> Result<ImageFormat, DiskError> {
    let file = File::open(path).map_err(|source| DiskError::Io {
        op: "open",
        path: path.to_owned(),
        source,
    })?;
    probe_file(&file).map_err(|source| DiskError::Io {
        op: "read",
        path: path.to_owned(),
        source,
    })
}

/// Opens an image and its backing chain (read-only, formats probed unless recorded).
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Arc<dyn BlockDevice>, DiskError> {
    let mut seen = Vec::new();
    open_chained(path, opts, &mut seen)
}

/// Opens one layer; `seen` holds the canonical paths of the layers above, for loop detection.
pub(crate) fn open_chained(
    path: &Path,
    opts: &OpenOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<Arc<dyn BlockDevice>, DiskError> {
    let canonical = std::fs::canonicalize(path).map_err(|source| DiskError::Io {
        op: "open",
        path: path.to_owned(),
        source,
    })?;
    if seen.contains(&canonical) {
        return Err(DiskError::BackingLoop(path.to_owned()));
    }
    if seen.len() >= MAX_CHAIN_DEPTH {
        return Err(DiskError::ChainTooDeep(MAX_CHAIN_DEPTH));
    }
    seen.push(canonical);
    let format = match opts.format {
        Some(f) => f,
        None => probe(path)?,
    };
    let dev: Arc<dyn BlockDevice> = match format {
        ImageFormat::Raw => {
            let mut raw = RawImage::open(path, opts.read_only)?;
            raw.set_no_sync(opts.no_sync);
            Arc::new(raw)
        }
        ImageFormat::Qcow2 => Arc::new(Qcow2Image::open_with_chain(path, opts, seen)?),
    };
    Ok(dev)
}

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}
