//! Host tap interfaces: one file descriptor per queue pair, frames prefixed with the 12-byte
//! virtio-net header (IFF_VNET_HDR, TUNSETVNETHDRSZ), offloads set with TUNSETOFFLOAD.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Length of the virtio-net header kiln uses with the tap (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

/// Tap errors; each names the tap and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is not a valid interface name.
    #[error("tap name {0:?} is not valid: 1 to 15 bytes, without '/', ':' or whitespace")]
    BadName(String),
    /// /dev/net/tun cannot be opened.
    #[error("tap {name}: cannot open /dev/net/tun (is the tun module loaded?)")]
    OpenTun {
        /// The tap.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Not allowed to create or attach to the tap.
    #[error(
        "tap {name}: permission denied; creating a tap needs CAP_NET_ADMIN (run kiln as root \
         or with that capability), or create it beforehand for this user: \
         `ip tuntap add dev {name} mode tap user {uid}{mq}`"
    )]
    Permission {
        /// The tap.
        name: String,
        /// The current user id.
        uid: u32,
        /// `" multi_queue"` when more than one queue pair is asked for.
        mq: &'static str,
    },
    /// The tap exists with a different multi-queue setting.
    #[error(
        "tap {name} exists {was} multi_queue, but queues={queues} needs it {need}: delete it \
         (`ip link del {name}`) or ask for {other}"
    )]
    MultiQueue {
        /// The tap.
        name: String,
        /// Asked queue pairs.
        queues: u16,
        /// "with" or "without".
        was: &'static str,
        /// "with" or "without".
        need: &'static str,
        /// What to ask for instead.
        other: &'static str,
    },
    /// Another process holds the (single-queue) tap.
    #[error("tap {name} is in use by another process")]
    Busy {
        /// The tap.
        name: String,
    },
    /// Another ioctl failed.
    #[error("tap {name}: {op} failed")]
    Ioctl {
        /// The tap.
        name: String,
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// One queue of a tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// Writes can be refused for want of send-buffer room (see
    /// [`Tap::send_buffer_limited`]); read once when the queue is opened, since only its
    /// holder (kiln) could change it, and kiln leaves it as the kernel made it.
    send_buffer_limited: std::sync::atomic::AtomicBool,
}

impl Tap {
    /// Opens `queues` queues of the tap called `name`, creating it when it does not exist
    /// (and then bringing it up). Each queue reads and writes frames with a 12-byte virtio-net
    /// header; the descriptors are non-blocking.
    pub fn open_queues(name: &str, queues: u16) -> Result<Vec<Tap>, TapError> {
        check_name(name)?;
        let existed = Path::new("/sys/class/net").join(name).exists();
        let multi = queues > 1;
        let mut taps = Vec::with_capacity(usize::from(queues));
        for _ in 0..queues.max(1) {
            taps.push(Self::open_one(name, multi, queues)?);
        }
        if !existed {
            if let Err(e) = set_up(name) {
                log::warn!("{e}");
            }
        }
        Ok(taps)
    }

    fn open_one(name: &str, multi: bool, queues: u16) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => permission(name, multi),
                _ => TapError::OpenTun {
                    name: name.to_owned(),
                    source,
                },
            })?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut req = ifreq(name);
        // Interface flags are a C short; these bits fit.
        #[allow(clippy::cast_possible_truncation)]
        {
            req.ifr_ifru.ifru_flags = flags as libc::c_short;
        }
        // SAFETY: TUNSETIFF reads and writes an ifreq, which lives across the call; the fd is
        // valid while `file` lives.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc != 0 {
            return Err(setiff_error(
                name,
                multi,
                queues,
                io::Error::last_os_error(),
            ));
        }
        let tap = Tap::with_file(file, name);
        let hdr = libc::c_int::try_from(VNET_HDR_LEN).unwrap_or(12);
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which lives across the call.
        let rc = unsafe { libc::ioctl(tap.fd(), libc::TUNSETVNETHDRSZ, &hdr) };
        tap.check(rc, "TUNSETVNETHDRSZ")?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Any file standing in for a tap queue (tests and the fuzzing entry drive the worker
    /// through a socket that they fill and drain themselves).
    pub(crate) fn from_file(file: File, name: &str) -> Tap {
        Tap::with_file(file, name)
    }

    fn with_file(file: File, name: &str) -> Tap {
        let mut bytes: libc::c_int = 0;
        // SAFETY: TUNGETSNDBUF writes one int through the pointer, which lives across the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETSNDBUF, &mut bytes) };
        Tap {
            file,
            name: name.to_owned(),
            send_buffer_limited: (rc != 0 || bytes < libc::c_int::MAX).into(),
        }
    }

    /// Limits the queue's send buffer to `bytes` (TUNSETSNDBUF): tests make a tap refuse
    /// frames with it.
    #[cfg(test)]
    pub(crate) fn set_send_buffer(&self, bytes: libc::c_int) {
        // SAFETY: TUNSETSNDBUF reads one int through the pointer, which lives across the call.
        let rc = unsafe { libc::ioctl(self.fd(), libc::TUNSETSNDBUF, &bytes) };
        assert_eq!(rc, 0, "TUNSETSNDBUF: {}", io::Error::last_os_error());
        self.send_buffer_limited.store(
            bytes < libc::c_int::MAX,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's file descriptor.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn check(&self, rc: libc::c_int, op: &'static str) -> Result<(), TapError> {
        if rc == 0 {
            Ok(())
        } else {
            Err(TapError::Ioctl {
                name: self.name.clone(),
                op,
                source: io::Error::last_os_error(),
            })
        }
    }

    /// Whether writes to the tap can be refused for want of send-buffer room (EAGAIN): its
    /// send buffer is limited (TUNSETSNDBUF; a tap starts unlimited), or this is not a tap
    /// and nobody can say.
    pub fn send_buffer_limited(&self) -> bool {
        self.send_buffer_limited
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tells the tap which offloads the guest accepts on receive (`TUN_F_*`).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is valid.
        let rc = unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        self.check(rc, "TUNSETOFFLOAD")
    }

    /// Attaches (frames flow) or detaches (none arrive) this queue of a multi-queue tap.
    pub fn set_queue_enabled(&self, enabled: bool) -> Result<(), TapError> {
        let mut req = ifreq("");
        let flag = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        // These bits fit a C short.
        #[allow(clippy::cast_possible_truncation)]
        {
            req.ifr_ifru.ifru_flags = flag as libc::c_short;
        }
        // SAFETY: TUNSETQUEUE reads an ifreq, which lives across the call.
        let rc = unsafe { libc::ioctl(self.fd(), libc::TUNSETQUEUE, &mut req) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // Attaching an attached queue or detaching a detached one is EINVAL: no change.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                op: "TUNSETQUEUE",
                source: e,
            });
        }
        Ok(())
    }

    /// Reads one frame (header first) into `iovecs`; `Ok(None)` when none is waiting.
    pub fn read_frame(&self, iovecs: &[libc::iovec]) -> io::Result<Option<usize>> {
        let n = i32::try_from(iovecs.len()).unwrap_or(i32::MAX);
        // SAFETY: the caller's iovecs describe writable memory (guest buffers valid for the
        // worker's lifetime); readv writes at most their total length.
        let r = unsafe { libc::readv(self.fd(), iovecs.as_ptr(), n) };
        nonblocking(r)
    }

    /// Writes one frame (header first) from `iovecs`; `Ok(None)` when the tap cannot take it
    /// now.
    pub fn write_frame(&self, iovecs: &[libc::iovec]) -> io::Result<Option<usize>> {
        let n = i32::try_from(iovecs.len()).unwrap_or(i32::MAX);
        // SAFETY: the caller's iovecs describe readable memory; writev only reads them.
        let r = unsafe { libc::writev(self.fd(), iovecs.as_ptr(), n) };
        nonblocking(r)
    }
}

fn nonblocking(r: isize) -> io::Result<Option<usize>> {
    match usize::try_from(r) {
        Ok(n) => Ok(Some(n)),
        Err(_) => {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                _ => Err(e),
            }
        }
    }
}

fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_owned()))
    }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data (arrays and a union of plain data); all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &b) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = libc::c_char::from_ne_bytes([b]);
    }
    req
}

fn permission(name: &str, multi: bool) -> TapError {
    TapError::Permission {
        name: name.to_owned(),
        // SAFETY: getuid has no preconditions.
        uid: unsafe { libc::getuid() },
        mq: if multi { " multi_queue" } else { "" },
    }
}

/// The error for a failed TUNSETIFF.
fn setiff_error(name: &str, multi: bool, queues: u16, source: io::Error) -> TapError {
    match source.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => permission(name, multi),
        Some(libc::EBUSY) => TapError::Busy {
            name: name.to_owned(),
        },
        // An existing tap whose multi-queue flag differs from what was asked.
        Some(libc::EINVAL) if Path::new("/sys/class/net").join(name).exists() => {
            let (was, need, other) = if multi {
                ("without", "with", "queues=1")
            } else {
                ("with", "without", "more queues")
            };
            TapError::MultiQueue {
                name: name.to_owned(),
                queues,
                was,
                need,
                other,
            }
        }
        _ => TapError::Ioctl {
            name: name.to_owned(),
            op: "TUNSETIFF",
            source,
        },
    }
}

/// Brings interface `name` up.
fn set_up(name: &str) -> Result<(), TapError> {
    let err = |op, source| TapError::Ioctl {
        name: name.to_owned(),
        op,
        source,
    };
    // SAFETY: socket() has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err("socket", io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFFLAGS writes the flags into the ifreq, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(err("SIOCGIFFLAGS", io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    // IFF_UP is bit 0 of a short.
    #[allow(clippy::cast_possible_truncation)]
    {
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(err("SIOCSIFFLAGS", io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tap name unique to this process and test.
    pub(crate) fn test_tap_name(tag: &str) -> String {
        format!("kt{}{tag}", std::process::id() % 1_000_000)
    }

    /// Fails loudly without CAP_NET_ADMIN: these tests must not silently skip.
    pub(crate) fn require_net_admin() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        const CAP_NET_ADMIN: u32 = 12;
        assert!(
            cap_eff & (1 << CAP_NET_ADMIN) != 0,
            "this test creates tap interfaces and needs CAP_NET_ADMIN (run as root)"
        );
        assert!(
            Path::new("/dev/net/tun").exists(),
            "this test needs /dev/net/tun"
        );
    }

    #[test]
    fn creates_a_tap_that_disappears_with_its_last_queue() {
        require_net_admin();
        let name = test_tap_name("c");
        let taps = Tap::open_queues(&name, 1).unwrap();
        assert_eq!(taps[0].name(), name);
        let sys = Path::new("/sys/class/net").join(&name);
        assert!(sys.exists());
        let flags = std::fs::read_to_string(sys.join("flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_eq!(flags & 1, 1, "created taps are brought up");
        // A single-queue tap has one user at a time.
        assert!(matches!(
            Tap::open_queues(&name, 1),
            Err(TapError::Busy { .. })
        ));
        // Asking for queues it was not created with names the fix.
        let e = Tap::open_queues(&name, 2).unwrap_err();
        assert!(matches!(e, TapError::MultiQueue { .. }), "{e}");
        assert!(e.to_string().contains("ip link del"), "{e}");
        drop(taps);
        assert!(!sys.exists());
    }

    #[test]
    fn multiqueue_tap_opens_one_descriptor_per_pair_and_detaches_queues() {
        require_net_admin();
        let name = test_tap_name("m");
        let taps = Tap::open_queues(&name, 3).unwrap();
        assert_eq!(taps.len(), 3);
        taps[2].set_queue_enabled(false).unwrap();
        taps[2].set_queue_enabled(false).unwrap();
        taps[2].set_queue_enabled(true).unwrap();
        taps[0]
            .set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
            .unwrap();
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for n in ["", "a/b", "x y", "0123456789abcdef", "..", "a:b"] {
            assert!(
                matches!(Tap::open_queues(n, 1), Err(TapError::BadName(_))),
                "{n:?}"
            );
        }
    }

    #[test]
    fn permission_errors_name_the_tap_and_the_fix() {
        let e = setiff_error("tap7", true, 2, io::Error::from_raw_os_error(libc::EPERM));
        let msg = e.to_string();
        assert!(msg.contains("tap tap7: permission denied"), "{msg}");
        assert!(msg.contains("CAP_NET_ADMIN"), "{msg}");
        assert!(
            msg.contains("ip tuntap add dev tap7 mode tap user"),
            "{msg}"
        );
        assert!(msg.ends_with("multi_queue`"), "{msg}");
    }

    /// Runs as an unprivileged user in a child process (see the test below).
    #[test]
    #[ignore = "helper: run by unprivileged_user_gets_the_permission_error"]
    fn unprivileged_open_helper() {
        let name = std::env::var("KILN_TAP_HELPER_NAME").unwrap();
        match Tap::open_queues(&name, 1) {
            Ok(_) => println!("HELPER opened"),
            Err(e) => println!("HELPER error: {e}"),
        }
    }

    #[test]
    fn unprivileged_user_gets_the_permission_error() {
        require_net_admin();
        use std::os::unix::process::CommandExt;
        let name = test_tap_name("p");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "net::tap::tests::unprivileged_open_helper",
                "--include-ignored",
                "--nocapture",
            ])
            .env("KILN_TAP_HELPER_NAME", &name)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("HELPER error: tap {name}: permission denied")),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("CAP_NET_ADMIN"));
    }
}
