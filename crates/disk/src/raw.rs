//! Raw images: the virtual disk is the file, byte for byte.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fileio;
use crate::{check_range, BlockDevice, DiskError, Extent, ExtentKind, ImageFormat};

/// A raw image file or block device.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    path: PathBuf,
    read_only: bool,
    no_sync: bool,
    size: std::sync::atomic::AtomicU64,
}

impl RawImage {
    /// Opens an existing raw image.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Io {
                op: "open",
                path: path.to_owned(),
                source,
            })?;
        Self::from_file(file, path, read_only)
    }

    /// Wraps an open file.
    pub fn from_file(file: File, path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let size = file_size(&file).map_err(|source| DiskError::Io {
            op: "stat",
            path: path.to_owned(),
            source,
        })?;
        Ok(RawImage {
            file,
            path: path.to_owned(),
            read_only,
            no_sync: false,
            size: std::sync::atomic::AtomicU64::new(size),
        })
    }

    /// Creates (or truncates) a raw image of `size` bytes. `falloc` reserves the space.
    pub fn create(path: &Path, size: u64, prealloc: RawPrealloc) -> Result<(), DiskError> {
        let io = |op, source| DiskError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io("create", e))?;
        file.set_len(size).map_err(|e| io("truncate", e))?;
        match prealloc {
            RawPrealloc::Off => {}
            RawPrealloc::Falloc => {
                use std::os::fd::AsRawFd;
                let len = i64::try_from(size).map_err(|_| {
                    io(
                        "fallocate",
                        std::io::Error::from(std::io::ErrorKind::InvalidInput),
                    )
                })?;
                // SAFETY: fallocate with integer arguments on a valid fd.
                let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
                if rc != 0 {
                    return Err(io("fallocate", std::io::Error::last_os_error()));
                }
            }
            RawPrealloc::Full => {
                fileio::write_zeroes(&file, 0, size).map_err(|e| io("write", e))?;
            }
        }
        Ok(())
    }

    /// Makes `flush` a no-op (qemu's cache=unsafe).
    pub fn set_no_sync(&mut self, no_sync: bool) {
        self.no_sync = no_sync;
    }

    fn io_err(&self, op: &'static str, source: std::io::Error) -> DiskError {
        DiskError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    fn cur_size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Preallocation modes for raw images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawPrealloc {
    /// Sparse file.
    Off,
    /// fallocate the whole file.
    Falloc,
    /// Write zeroes over the whole file.
    Full,
}

fn file_size(file: &File) -> std::io::Result<u64> {
    use std::io::Seek;
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // Block devices report 0 in st_size; seek to the end instead.
    let mut f = file;
    f.seek(std::io::SeekFrom::End(0))
}

impl BlockDevice for RawImage {
    fn size(&self) -> u64 {
        self.cur_size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.cur_size())?;
        fileio::read_zero_padded(&self.file, offset, buf).map_err(|e| self.io_err("read", e))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.cur_size())?;
        fileio::write_all(&self.file, offset, buf).map_err(|e| self.io_err("write", e))
    }

    fn flush(&self) -> Result<(), DiskError> {
        if self.read_only || self.no_sync {
            return Ok(());
        }
        fileio::sync_data(&self.file).map_err(|e| self.io_err("fsync", e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.cur_size())?;
        let r = if unmap {
            fileio::punch_hole(&self.file, offset, len)
        } else {
            fileio::write_zeroes(&self.file, offset, len)
        };
        r.map_err(|e| self.io_err("write zeroes", e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len, true)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, DiskError> {
        let size = self.cur_size();
        check_range(offset, len, size)?;
        let end = offset + len;
        let data_at = fileio::seek_data_hole(&self.file, offset, true);
        let (kind, run_end) = match data_at {
            // No data from here to EOF: a hole.
            None => (ExtentKind::Zero, end),
            Some(d) if d > offset => (ExtentKind::Zero, d.min(end)),
            Some(_) => {
                let hole = fileio::seek_data_hole(&self.file, offset, false).unwrap_or(size);
                (
                    ExtentKind::Data,
                    hole.clamp(offset + 1, end.max(offset + 1)).min(end),
                )
            }
        };
        let len = (run_end - offset).max(1).min(len.max(1));
        Ok(Extent {
            len,
            kind,
            host_offset: (kind == ExtentKind::Data).then_some(offset),
            compressed: false,
            zero_in_file: false,
        })
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }

    fn allocated_size(&self) -> Result<u64, DiskError> {
        fileio::allocated_bytes(&self.file).map_err(|e| self.io_err("stat", e))
    }

    fn resize(&self, new_size: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.file
            .set_len(new_size)
            .map_err(|e| self.io_err("truncate", e))?;
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn raw_round_trips_data_and_reports_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.raw");
        RawImage::create(&p, 4 << 20, RawPrealloc::Off).unwrap();
        let img = RawImage::open(&p, false).unwrap();
        img.write_at(1 << 20, &[7u8; 4096]).unwrap();
        let mut buf = [0u8; 4096];
        img.read_at(1 << 20, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 4096]);
        let first = img.block_status(0, 4 << 20).unwrap();
        assert_eq!(first.kind, ExtentKind::Zero);
        assert_eq!(first.len, 1 << 20);
        let second = img.block_status(1 << 20, 3 << 20).unwrap();
        assert_eq!(second.kind, ExtentKind::Data);
    }

    #[test]
    fn raw_rejects_reads_past_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.raw");
        RawImage::create(&p, 4096, RawPrealloc::Off).unwrap();
        let img = RawImage::open(&p, true).unwrap();
        let mut buf = [0u8; 2];
        assert!(matches!(
            img.read_at(4095, &mut buf),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(img.write_at(0, &buf), Err(DiskError::ReadOnly)));
    }
}
