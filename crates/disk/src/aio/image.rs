//! Opening a disk for asynchronous I/O: lock, format, engine choice.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::lock::{open_error, ImageLock, LockMode};
use super::uring::FileKind;
use super::{AioError, AsyncIo, PoolEngine, UringEngine};
use crate::{BlockDevice, ImageFormat, RawImage};

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;
/// `_IO(0x12, 123)`: physical block size of a block device.
const BLKPBSZGET: libc::Ioctl = 0x127b;

/// Threads per queue for formats that run on the thread pool.
const DEFAULT_POOL_THREADS: usize = 2;

/// Which engine runs the I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring for raw images where the kernel allows it, else threads.
    #[default]
    Auto,
    /// io_uring for raw images (an error where unavailable); formats other than raw use
    /// threads whatever is asked.
    IoUring,
    /// This many threads per queue (at least 1).
    Threads(usize),
    /// Synchronous, inside the I/O thread's submit.
    Sync,
}

/// How to open a disk.
#[derive(Debug, Clone, Default)]
pub struct AioOptions {
    /// Refuse writes, take a shared lock instead of an exclusive one.
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT); raw images only.
    pub direct: bool,
    /// The format; probed from the file when `None`.
    pub format: Option<ImageFormat>,
    /// The engine.
    pub engine: EngineKind,
    /// Passphrase of an encrypted qcow2 image.
    pub key: Option<Vec<u8>>,
}

enum Backend {
    /// A raw file or block device driven by io_uring.
    Uring {
        /// The file takes non-blocking I/O (see [`DiskImage::completes_in_kernel`]).
        nowait: bool,
        file: Arc<File>,
        align: Option<usize>,
    },
    /// Any format on the thread pool (threads; 0 = synchronous).
    Pool {
        dev: Arc<dyn BlockDevice>,
        threads: usize,
    },
}

/// An opened, locked disk image from which per-queue engines are made.
pub struct DiskImage {
    path: PathBuf,
    format: ImageFormat,
    read_only: bool,
    direct: bool,
    size: u64,
    kind: FileKind,
    logical_block_size: u32,
    physical_block_size: u32,
    backend: Backend,
    _lock: ImageLock,
}

impl std::fmt::Debug for DiskImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskImage")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("read_only", &self.read_only)
            .field("direct", &self.direct)
            .field("size", &self.size)
            .field("engine", &self.engine_name())
            .finish()
    }
}

impl DiskImage {
    /// Opens the image at `path`: checks it exists, locks it (exclusive when writable,
    /// shared when read-only), probes the format and chooses the engine.
    pub fn open(path: &Path, opts: &AioOptions) -> Result<Self, AioError> {
        let meta = std::fs::metadata(path).map_err(|e| open_error(path, e))?;
        let kind = if meta.file_type().is_block_device() {
            FileKind::BlockDevice
        } else if meta.is_file() {
            FileKind::Regular
        } else {
            return Err(AioError::Open {
                path: path.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a regular file or a block device",
                ),
            });
        };
        // Lock before anything reads or repairs the image.
        let mode = if opts.read_only {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        };
        let lock = ImageLock::acquire(path, mode)?;
        let disk_err = |source| AioError::Disk {
            path: path.to_owned(),
            source,
        };
        let format = match opts.format {
            Some(f) => f,
            None => crate::probe(path).map_err(disk_err)?,
        };
        match format {
            ImageFormat::Raw => Self::open_raw(path, opts, kind, lock),
            ImageFormat::Qcow2 => {
                if opts.direct {
                    log::warn!(
                        "{}: direct=on is only honoured for raw images; qcow2 uses the page cache",
                        path.display()
                    );
                }
                let dev = crate::open(
                    path,
                    &crate::OpenOptions {
                        read_only: opts.read_only,
                        format: Some(ImageFormat::Qcow2),
                        key: opts.key.clone(),
                        ..Default::default()
                    },
                )
                .map_err(disk_err)?;
                let threads = match opts.engine {
                    EngineKind::Threads(n) => n.max(1),
                    EngineKind::Sync => 0,
                    EngineKind::Auto | EngineKind::IoUring => DEFAULT_POOL_THREADS,
                };
                Ok(DiskImage {
                    path: path.to_owned(),
                    format,
                    read_only: opts.read_only,
                    direct: false,
                    size: dev.size(),
                    kind,
                    logical_block_size: 512,
                    physical_block_size: 512,
                    backend: Backend::Pool { dev, threads },
                    _lock: lock,
                })
            }
        }
    }

    fn open_raw(
        path: &Path,
        opts: &AioOptions,
        kind: FileKind,
        lock: ImageLock,
    ) -> Result<Self, AioError> {
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| {
                if opts.direct && e.raw_os_error() == Some(libc::EINVAL) {
                    AioError::DirectUnsupported {
                        path: path.to_owned(),
                    }
                } else {
                    open_error(path, e)
                }
            })?;
        let io_err = |source| AioError::Open {
            path: path.to_owned(),
            source,
        };
        let (size, logical, physical) = match kind {
            FileKind::BlockDevice => (
                ioctl_u64(&file, BLKGETSIZE64).map_err(io_err)?,
                ioctl_u32(&file, libc::BLKSSZGET).unwrap_or(512),
                ioctl_u32(&file, BLKPBSZGET).unwrap_or(512),
            ),
            FileKind::Regular => {
                let len = file.metadata().map_err(io_err)?.len();
                let (mem, off) = if opts.direct {
                    dio_align(&file).unwrap_or((512, 512))
                } else {
                    (512, 512)
                };
                (len, off.max(mem).max(512), 4096)
            }
        };
        let align = opts
            .direct
            .then(|| usize::try_from(logical).unwrap_or(4096));
        let threads = match opts.engine {
            EngineKind::Auto if UringEngine::available() => None,
            EngineKind::Auto => {
                log::warn!("io_uring is unavailable; disk I/O runs on threads");
                Some(DEFAULT_POOL_THREADS)
            }
            EngineKind::IoUring => {
                if let Err(e) = io_uring::IoUring::new(2) {
                    return Err(AioError::Uring(e));
                }
                None
            }
            EngineKind::Threads(n) => Some(n.max(1)),
            EngineKind::Sync => Some(0),
        };
        let backend = match threads {
            None => Backend::Uring {
                nowait: super::uring::takes_nowait(&file, align),
                file: Arc::new(file),
                align,
            },
            Some(threads) => {
                let raw = RawImage::from_file(file, path, opts.read_only).map_err(|source| {
                    AioError::Disk {
                        path: path.to_owned(),
                        source,
                    }
                })?;
                Backend::Pool {
                    dev: Arc::new(raw),
                    threads,
                }
            }
        };
        Ok(DiskImage {
            path: path.to_owned(),
            format: ImageFormat::Raw,
            read_only: opts.read_only,
            direct: opts.direct,
            size,
            kind,
            logical_block_size: logical,
            physical_block_size: physical.max(logical),
            backend,
            _lock: lock,
        })
    }

    /// A new engine (one per queue) with room for `depth` requests in flight.
    pub fn engine(&self, depth: usize) -> Result<Box<dyn AsyncIo>, AioError> {
        Ok(match &self.backend {
            Backend::Uring { file, align, .. } => {
                Box::new(UringEngine::new(file.clone(), self.kind, *align, depth)?)
            }
            Backend::Pool { dev, threads } => {
                Box::new(PoolEngine::new(dev.clone(), *threads, depth)?)
            }
        })
    }

    /// Makes every completed write durable, synchronously (used when pausing).
    pub fn flush(&self) -> Result<(), AioError> {
        if self.read_only {
            return Ok(());
        }
        match &self.backend {
            Backend::Uring { file, .. } => file.sync_data().map_err(|source| AioError::Open {
                path: self.path.clone(),
                source,
            }),
            Backend::Pool { dev, .. } => dev.flush().map_err(|source| AioError::Disk {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The format.
    pub fn format(&self) -> ImageFormat {
        self.format
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the host page cache is bypassed.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Whether the image is a host block device.
    pub fn is_block_device(&self) -> bool {
        self.kind == FileKind::BlockDevice
    }

    /// Smallest unit the backing store can address without read-modify-write (what the
    /// guest should use as its block size).
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// The backing store's physical block size (at least the logical one).
    pub fn physical_block_size(&self) -> u32 {
        self.physical_block_size
    }

    /// Whether requests finish in the kernel without a worker thread: io_uring on a file
    /// that takes non-blocking I/O (block devices, ext4, XFS, btrfs). Otherwise each request
    /// runs on a thread (io_uring's workers where the file system refuses `RWF_NOWAIT`, as
    /// tmpfs does, or the thread pool), which needs CPU time that a thread polling for
    /// completions would take from it.
    pub fn completes_in_kernel(&self) -> bool {
        matches!(self.backend, Backend::Uring { nowait: true, .. })
    }

    /// `"io_uring"`, `"threads"` or `"sync"`.
    pub fn engine_name(&self) -> &'static str {
        match &self.backend {
            Backend::Uring { .. } => "io_uring",
            Backend::Pool { threads: 0, .. } => "sync",
            Backend::Pool { .. } => "threads",
        }
    }
}

fn ioctl_u64(file: &File, req: libc::Ioctl) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: the ioctl writes one u64 through the pointer, which lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v) };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn ioctl_u32(file: &File, req: libc::Ioctl) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the ioctl writes one int through the pointer, which lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v) };
    if rc == 0 {
        u32::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// O_DIRECT memory and offset alignment of an open file (statx STATX_DIOALIGN).
fn dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx writes into `st`, which lives across the call; the path is an empty
    // NUL-terminated string used with AT_EMPTY_PATH on a valid fd.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if rc != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
        return None;
    }
    Some((st.stx_dio_mem_align, st.stx_dio_offset_align))
}
