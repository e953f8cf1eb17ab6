//! Image locking with open file description (OFD) locks.
//!
//! A disk the guest may write takes an exclusive lock on the whole image; a read-only disk
//! takes a shared one. OFD locks belong to an open file description, not to a process, so
//! they conflict between two opens in the same process as well as between two VMMs, and
//! closing some other descriptor of the same file does not drop them (unlike POSIX locks).
//! QEMU locks single bytes of the same file with OFD locks, so the two VMMs also refuse
//! each other's images.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::AioError;

/// Which lock to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Several readers may hold it; no writer.
    Shared,
    /// One holder, reader or writer.
    Exclusive,
}

/// A held lock on an image; dropped, it releases the lock.
#[derive(Debug)]
pub struct ImageLock {
    /// Holds the lock: it lives as long as this open file description.
    _file: File,
    path: PathBuf,
    mode: LockMode,
}

impl ImageLock {
    /// Locks the whole file at `path`; fails with [`AioError::Locked`] when another open file
    /// description holds a conflicting lock.
    pub fn acquire(path: &Path, mode: LockMode) -> Result<Self, AioError> {
        let file = OpenOptions::new()
            .read(true)
            // F_WRLCK needs a descriptor open for writing.
            .write(mode == LockMode::Exclusive)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| open_error(path, source))?;
        set_lock(&file, mode).map_err(|source| match source.raw_os_error() {
            Some(libc::EAGAIN | libc::EACCES) => AioError::Locked {
                path: path.to_owned(),
            },
            _ => AioError::Lock {
                path: path.to_owned(),
                source,
            },
        })?;
        Ok(Self {
            _file: file,
            path: path.to_owned(),
            mode,
        })
    }

    /// The lock held.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The locked file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The error for a failed open of `path`.
pub(crate) fn open_error(path: &Path, source: io::Error) -> AioError {
    if source.kind() == io::ErrorKind::NotFound {
        AioError::NotFound(path.to_owned())
    } else {
        AioError::Open {
            path: path.to_owned(),
            source,
        }
    }
}

fn set_lock(file: &File, mode: LockMode) -> io::Result<()> {
    let lock_type = match mode {
        LockMode::Shared => libc::F_RDLCK,
        LockMode::Exclusive => libc::F_WRLCK,
    };
    // SAFETY: flock is plain data; all-zero is a valid value (whole file from offset 0,
    // l_pid 0 as OFD locks require).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    // F_RDLCK/F_WRLCK are small constants that fit the c_short field.
    #[allow(clippy::cast_possible_truncation)]
    {
        fl.l_type = lock_type as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
    }
    // SAFETY: fcntl(F_OFD_SETLK) reads the flock we pass, which lives across the call; the fd
    // is valid while `file` lives.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        (dir, p)
    }

    #[test]
    fn second_exclusive_lock_is_refused_with_a_clear_error() {
        let (_d, p) = image();
        let _first = ImageLock::acquire(&p, LockMode::Exclusive).unwrap();
        let err = ImageLock::acquire(&p, LockMode::Exclusive).unwrap_err();
        assert!(matches!(err, AioError::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains("in use by another process"));
        assert!(err.to_string().contains(&p.display().to_string()));
    }

    #[test]
    fn shared_locks_coexist_but_exclude_a_writer() {
        let (_d, p) = image();
        let a = ImageLock::acquire(&p, LockMode::Shared).unwrap();
        let _b = ImageLock::acquire(&p, LockMode::Shared).unwrap();
        assert!(matches!(
            ImageLock::acquire(&p, LockMode::Exclusive),
            Err(AioError::Locked { .. })
        ));
        assert_eq!(a.mode(), LockMode::Shared);
    }

    #[test]
    fn a_writer_excludes_readers_and_dropping_releases() {
        let (_d, p) = image();
        let w = ImageLock::acquire(&p, LockMode::Exclusive).unwrap();
        assert!(matches!(
            ImageLock::acquire(&p, LockMode::Shared),
            Err(AioError::Locked { .. })
        ));
        drop(w);
        ImageLock::acquire(&p, LockMode::Shared).unwrap();
    }

    #[test]
    fn missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope.raw");
        let err = ImageLock::acquire(&p, LockMode::Shared).unwrap_err();
        assert!(matches!(err, AioError::NotFound(_)));
        assert!(err.to_string().contains("nope.raw"));
    }
}
