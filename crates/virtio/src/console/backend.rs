//! Where the console's bytes go and come from: stdio, a file (output only), or a unix socket
//! kiln listens on (one client at a time; output waiting for a client is kept, up to a
//! limit, and delivered when one connects).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Output kept for a socket client that is not there (or not reading), at most.
pub(crate) const PENDING_MAX: usize = 64 * 1024;

/// Where a console is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleBackend {
    /// kiln's standard input and output.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A unix socket kiln listens on.
    Socket(PathBuf),
}

/// Console backend errors; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The output file cannot be opened.
    #[error("console file {path}: cannot open it for appending")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socket cannot be created.
    #[error("console socket {path}: cannot listen on it")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Something that is not a socket exists at the path.
    #[error(
        "console socket {0}: the path exists and is not a socket; remove it or choose another"
    )]
    NotASocket(PathBuf),
    /// Another process listens on the socket.
    #[error("console socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    /// Standard input or output cannot be duplicated.
    #[error("console stdio: cannot use standard input/output")]
    Stdio(#[source] io::Error),
}

/// The opened backend.
pub(crate) enum Backend {
    /// Input and output descriptors (stdio, or pipes in tests).
    Fds { input: Option<File>, output: File },
    /// An output file.
    File(File),
    /// A listening socket and its current client.
    Socket {
        listener: UnixListener,
        path: PathBuf,
        client: Option<UnixStream>,
        pending: VecDeque<u8>,
        /// Counts clients, so a new client reusing a closed one's fd number is noticed.
        clients: u64,
    },
}

impl Backend {
    /// Opens `b`.
    pub fn open(b: &ConsoleBackend) -> Result<Self, BackendError> {
        match b {
            ConsoleBackend::Stdio => Self::fds(0, 1).map_err(BackendError::Stdio),
            ConsoleBackend::File(path) => OpenOptions::new()
                .append(true)
                .create(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map(Backend::File)
                .map_err(|source| BackendError::File {
                    path: path.clone(),
                    source,
                }),
            ConsoleBackend::Socket(path) => listen(path),
        }
    }

    /// Input from a duplicate of `input`, output to a duplicate of `output`.
    pub fn fds(input: RawFd, output: RawFd) -> io::Result<Self> {
        Ok(Backend::Fds {
            input: Some(File::from(dup(input)?)),
            output: File::from(dup(output)?),
        })
    }

    /// The descriptor to watch for input and hang-ups, if any.
    pub fn input_fd(&self) -> Option<RawFd> {
        match self {
            Backend::Fds { input, .. } => input.as_ref().map(AsRawFd::as_raw_fd),
            Backend::File(_) => None,
            Backend::Socket { client, .. } => client.as_ref().map(AsRawFd::as_raw_fd),
        }
    }

    /// Changes whenever the input descriptor changes (a new socket client).
    pub fn input_generation(&self) -> u64 {
        match self {
            Backend::Socket { clients, .. } => *clients,
            _ => 0,
        }
    }

    /// The listening socket, if any.
    pub fn listener_fd(&self) -> Option<RawFd> {
        match self {
            Backend::Socket { listener, .. } => Some(listener.as_raw_fd()),
            _ => None,
        }
    }

    /// Whether output waits for the client to read.
    pub fn output_blocked(&self) -> bool {
        matches!(self, Backend::Socket { client: Some(_), pending, .. } if !pending.is_empty())
    }

    /// Whether more output may be accepted now (false: the client is not reading and the
    /// pending buffer is full).
    pub fn can_take_output(&self) -> bool {
        match self {
            Backend::Socket {
                client: Some(_),
                pending,
                ..
            } => pending.len() < PENDING_MAX,
            _ => true,
        }
    }

    /// Writes guest output. Stdio and files write through; the socket sends what the client
    /// takes and keeps the rest (without a client the oldest bytes past the limit go).
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Backend::Fds { output, .. } => output.write_all(data),
            Backend::File(f) => f.write_all(data),
            Backend::Socket {
                client, pending, ..
            } => {
                pending.extend(data);
                if client.is_some() {
                    Self::flush_pending(client, pending);
                }
                // Without a client keep the newest PENDING_MAX bytes; with one that does not
                // read, the worker stops taking output at PENDING_MAX, and only emergency
                // writes can go past it, up to twice that.
                let limit = if client.is_some() {
                    2 * PENDING_MAX
                } else {
                    PENDING_MAX
                };
                let excess = pending.len().saturating_sub(limit);
                pending.drain(..excess);
                Ok(())
            }
        }
    }

    /// Sends pending output to the client (after it became writable).
    pub fn flush(&mut self) {
        if let Backend::Socket {
            client, pending, ..
        } = self
        {
            Self::flush_pending(client, pending);
        }
    }

    fn flush_pending(client: &mut Option<UnixStream>, pending: &mut VecDeque<u8>) {
        let Some(c) = client else {
            return;
        };
        while !pending.is_empty() {
            let (a, _) = pending.as_slices();
            match c.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The client went away; the next one gets what is left.
                    *client = None;
                    break;
                }
            }
        }
    }

    /// Reads input into `buf`: `Ok(Some(n))` bytes, `Ok(None)` nothing now; input that ended
    /// (EOF, a client leaving) is dropped and reported as `Ok(None)`.
    pub fn read(&mut self, buf: &mut [u8]) -> Option<usize> {
        let r = match self {
            Backend::Fds { input: Some(i), .. } => i.read(buf),
            Backend::Socket {
                client: Some(c), ..
            } => c.read(buf),
            _ => return None,
        };
        match r {
            Ok(0) => {
                self.drop_input();
                None
            }
            Ok(n) => Some(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                None
            }
            Err(_) => {
                self.drop_input();
                None
            }
        }
    }

    /// The input ended: stdin is no longer read; a socket client is dropped.
    pub fn drop_input(&mut self) {
        match self {
            Backend::Fds { input, .. } => *input = None,
            Backend::Socket { client, .. } => *client = None,
            Backend::File(_) => {}
        }
    }

    /// Accepts a waiting client if there is none (a second one is turned away).
    pub fn accept(&mut self) {
        let Backend::Socket {
            listener,
            client,
            pending,
            clients,
            ..
        } = self
        else {
            return;
        };
        while let Ok((stream, _)) = listener.accept() {
            if client.is_some() {
                // One client at a time: the newcomer is closed at once.
                drop(stream);
                continue;
            }
            if stream.set_nonblocking(true).is_ok() {
                *client = Some(stream);
                *clients += 1;
                Self::flush_pending(client, pending);
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Socket { path, .. } = self {
            // Best effort: the socket file is ours.
            let _ = std::fs::remove_file(path);
        }
    }
}

fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an fd number; the kernel checks it is open.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Listens on `path`, replacing a stale socket nobody listens on.
fn listen(path: &Path) -> Result<Backend, BackendError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BackendError::NotASocket(path.to_owned()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(BackendError::SocketInUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    let err = |source| BackendError::Socket {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(Backend::Socket {
        listener,
        path: path.to_owned(),
        client: None,
        pending: VecDeque::new(),
        clients: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_in_use_stale_and_foreign_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sock");
        let first = Backend::open(&ConsoleBackend::Socket(p.clone())).unwrap();
        assert!(matches!(
            Backend::open(&ConsoleBackend::Socket(p.clone())),
            Err(BackendError::SocketInUse(_))
        ));
        drop(first);
        assert!(!p.exists(), "the socket file is removed with the backend");
        // A stale socket (nobody listening) is replaced.
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        Backend::open(&ConsoleBackend::Socket(stale)).unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let e = Backend::open(&ConsoleBackend::Socket(file.clone()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"x", "never removed");
    }

    #[test]
    fn output_without_a_client_is_kept_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sock");
        let mut b = Backend::open(&ConsoleBackend::Socket(p.clone())).unwrap();
        b.write(&vec![b'a'; PENDING_MAX]).unwrap();
        b.write(b"tail").unwrap();
        let mut c = UnixStream::connect(&p).unwrap();
        b.accept();
        let mut got = vec![0u8; PENDING_MAX];
        c.read_exact(&mut got).unwrap();
        assert!(got.ends_with(b"tail"));
        assert_eq!(got.len(), PENDING_MAX);
    }

    #[test]
    fn file_backend_appends() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.log");
        std::fs::write(&p, b"old\n").unwrap();
        let mut b = Backend::open(&ConsoleBackend::File(p.clone())).unwrap();
        b.write(b"new\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"old\nnew\n");
        assert!(b.input_fd().is_none());
        let e = Backend::open(&ConsoleBackend::File(dir.path().join("no/such/dir")))
            .err()
            .unwrap();
        assert!(e.to_string().contains("no/such/dir"));
    }
}
