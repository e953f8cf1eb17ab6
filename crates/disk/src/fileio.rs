//! Positioned file I/O helpers shared by the formats.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Reads as many bytes as the file has at `offset`, up to `buf.len()`; returns the count.
/// Stops early only at end of file.
pub(crate) fn read_up_to(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let pos = offset
            .checked_add(done as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        match file.read_at(&mut buf[done..], pos) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads `buf.len()` bytes at `offset`, treating bytes past end of file as zeroes (as a sparse
/// file would read).
pub(crate) fn read_zero_padded(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let n = read_up_to(file, offset, buf)?;
    buf[n..].fill(0);
    Ok(())
}

/// Writes all of `buf` at `offset`.
pub(crate) fn write_all(file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
    file.write_all_at(buf, offset)
}

/// Flushes file data (and the metadata needed to read it back) to stable storage.
pub(crate) fn sync_data(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// Deallocates a byte range of a file, leaving a hole that reads as zeroes; falls back to
/// writing zeroes where the file system cannot punch holes.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is valid while `file` lives.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        write_zeroes(file, offset, len)
    } else {
        Err(err)
    }
}

/// Writes `len` zero bytes at `offset`.
pub(crate) fn write_zeroes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK))];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        // n <= CHUNK, so it fits usize.
        let n_us = usize::try_from(n).unwrap_or(CHUNK);
        file.write_all_at(&zeros[..n_us], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Finds the next data or hole at or after `offset` with `lseek(SEEK_DATA/SEEK_HOLE)`.
/// Returns `None` when the file system cannot say.
pub(crate) fn seek_data_hole(file: &File, offset: u64, data: bool) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let off = i64::try_from(offset).ok()?;
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    // SAFETY: lseek on a valid fd with integer arguments; it does not touch memory.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    u64::try_from(r).ok()
}

/// Host bytes allocated to the file (st_blocks * 512).
pub(crate) fn allocated_bytes(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512)
}
