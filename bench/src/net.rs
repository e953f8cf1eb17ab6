//! The network benchmark (issue 4): the probe's ring-3 polling virtio-net driver under kiln
//! and under QEMU microvm (virtio-net-pci on a tap, vhost=off), on a tap this benchmark
//! creates and removes.
//!
//! Rows: guest → host and host → guest, with full-size (1514-byte) frames for Mbit/s and
//! minimum-size (60-byte) frames for frames/s. Guest → host: the probe sources UDP frames
//! addressed to a MAC that is not the host's, so the host kernel drops each one as soon as
//! the tap hands it over, and counts it (the tap's rx_packets, checked against what the
//! probe says it sent). Host → guest: a thread here blasts frames into the tap through a
//! packet socket (sendmmsg, 64 at a time) for as long as the VM runs, and the probe counts
//! what reaches it. Runs are interleaved and the median of each cell is printed.

use std::ffi::CString;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::proc::{median, qemu_microvm, result_line, run_sampling, IoThread};

const HOST_IP: [u8; 4] = [10, 214, 0, 1];
const GUEST_IP: [u8; 4] = [10, 214, 0, 2];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6b, 0x69, 0x6c];
/// Where guest → host frames go: not the tap's MAC, so the host drops them on arrival.
const SINK_MAC: &str = "02:00:00:00:00:01";
const BATCH: usize = 64;

/// Command-line options.
pub struct Options {
    runs: usize,
    secs: u64,
    kiln: PathBuf,
    qemu: PathBuf,
    probe: PathBuf,
    /// Only the rows whose name contains this.
    only: Option<String>,
}

impl Options {
    /// Parses `--runs N --secs N --kiln P --qemu P --probe P --only TEXT`.
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let mut o = Options {
            runs: 3,
            secs: 3,
            kiln: PathBuf::from("target/x86_64-unknown-linux-gnu/release/kiln"),
            qemu: PathBuf::from("qemu-system-x86_64"),
            probe: PathBuf::from("guest/probe/target/x86_64-unknown-linux-gnu/release/probe"),
            only: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
            let num = |v: String| v.parse::<u64>().map_err(|_| format!("{a} needs a number"));
            match a.as_str() {
                "--runs" => o.runs = usize::try_from(num(val()?)?).map_err(|_| "--runs")?,
                "--secs" => o.secs = num(val()?)?,
                "--kiln" => o.kiln = val()?.into(),
                "--qemu" => o.qemu = val()?.into(),
                "--probe" => o.probe = val()?.into(),
                "--only" => o.only = Some(val()?),
                _ => return Err(format!("unknown option {a}")),
            }
        }
        if o.runs == 0 || o.secs == 0 {
            return Err("--runs >= 1, --secs >= 1".into());
        }
        Ok(o)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    GuestToHost,
    HostToGuest,
}

#[derive(Clone, Copy)]
struct Row {
    name: &'static str,
    dir: Dir,
    size: usize,
}

const ROWS: [Row; 4] = [
    Row {
        name: "guest->host 1514 B",
        dir: Dir::GuestToHost,
        size: 1514,
    },
    Row {
        name: "guest->host 60 B",
        dir: Dir::GuestToHost,
        size: 60,
    },
    Row {
        name: "host->guest 1514 B",
        dir: Dir::HostToGuest,
        size: 1514,
    },
    Row {
        name: "host->guest 60 B",
        dir: Dir::HostToGuest,
        size: 60,
    },
];

/// One measurement: frames per second and Mbit/s of Ethernet frames; host → guest also
/// the share of the sender's frames that the tap dropped because nobody read them in time
/// (counted over the VM's whole run, boot and power-off included).
#[derive(Clone, Copy)]
struct Rate {
    fps: f64,
    mbps: f64,
    dropped: f64,
    /// The VMM's network thread: CPU seconds per frame, and the share of a core it had,
    /// sampled over the middle of the run (NaN when the thread was not found).
    io_per_frame: f64,
    io_busy: f64,
}

/// A tap interface with the host's address, removed on drop.
struct Tap {
    name: String,
    index: i32,
}

impl Tap {
    fn create() -> Result<Tap, String> {
        let name = format!("kbn{}", std::process::id() % 100_000);
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]).map_err(|e| {
            format!("{e} (creating a tap needs CAP_NET_ADMIN: run the benchmark as root)")
        })?;
        let mut tap = Tap { name, index: 0 };
        let addr = format!(
            "{}.{}.{}.{}/24",
            HOST_IP[0], HOST_IP[1], HOST_IP[2], HOST_IP[3]
        );
        ip(&["addr", "add", &addr, "dev", &tap.name])?;
        ip(&["link", "set", &tap.name, "up"])?;
        let c = CString::new(tap.name.clone()).map_err(|e| e.to_string())?;
        // SAFETY: a valid NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        tap.index = i32::try_from(index)
            .ok()
            .filter(|&i| i > 0)
            .ok_or(format!("no interface index for {}", tap.name))?;
        Ok(tap)
    }

    /// A counter from /sys/class/net/<tap>/statistics.
    fn stat(&self, name: &str) -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{}/statistics/{name}", self.name))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn rx_packets(&self) -> u64 {
        self.stat("rx_packets")
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e} (Debian package iproute2)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip_str(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

fn cmdline(row: Row, secs: u64) -> String {
    let bench = match row.dir {
        Dir::GuestToHost => format!(
            "source,secs={secs},size={},dst={},dst_mac={SINK_MAC}",
            row.size,
            ip_str(HOST_IP)
        ),
        Dir::HostToGuest => format!("sink,secs={secs}"),
    };
    format!(
        "probe.checks=net probe.net_ip={}/24 probe.net_bench={bench}",
        ip_str(GUEST_IP)
    )
}

/// A UDP frame of `size` bytes (Ethernet header included) from the host to the guest.
fn frame(size: usize) -> Vec<u8> {
    let mut f = vec![0u8; size.max(60)];
    f[0..6].copy_from_slice(&GUEST_MAC);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = u16::try_from(f.len() - 14).unwrap_or(u16::MAX);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&HOST_IP);
    ip[16..20].copy_from_slice(&GUEST_IP);
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !u16::try_from((sum & 0xffff) + (sum >> 16)).unwrap_or(0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp_len = ip_len - 20;
    f[34..36].copy_from_slice(&9000u16.to_be_bytes());
    f[36..38].copy_from_slice(&9u16.to_be_bytes());
    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
    f
}

/// Sends `size`-byte frames into the tap until `stop`; returns the frames the tap queued.
/// A frame the tap drops (its queue is full, or no reader is attached) is not among them:
/// the tap counts it in `tx_dropped` and `sendmmsg` stops at it with ENOBUFS. What was
/// offered is therefore the returned count plus the rise in `tx_dropped`.
fn blast(index: i32, size: usize, stop: &AtomicBool) -> Result<u64, String> {
    let proto = u16::try_from(libc::ETH_P_ALL).unwrap_or(0).to_be();
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        return Err(format!(
            "packet socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd was just created and is closed only by this OwnedFd.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(0);
    sll.sll_protocol = proto;
    sll.sll_ifindex = index;
    let sll_len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(0);
    // SAFETY: sll is a valid sockaddr_ll of the given length that outlives the call.
    let rc = unsafe { libc::bind(raw, std::ptr::addr_of!(sll).cast(), sll_len) };
    if rc != 0 {
        return Err(format!(
            "bind to the tap: {}",
            std::io::Error::last_os_error()
        ));
    }
    // Straight to the tap's queue, skipping the qdisc: the cheaper the sender, the more of
    // the shared core is left to the VMM under test.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a pointer that outlives the call.
    unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            std::ptr::addr_of!(one).cast(),
            u32::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    let mut f = frame(size);
    let mut iov = libc::iovec {
        iov_base: f.as_mut_ptr().cast(),
        iov_len: f.len(),
    };
    // SAFETY: mmsghdr is plain data; every entry is filled in below.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: msgs point at one iovec over `f`; both outlive the call.
        let n =
            unsafe { libc::sendmmsg(raw, msgs.as_mut_ptr(), u32::try_from(BATCH).unwrap_or(1), 0) };
        if n > 0 {
            sent += u64::try_from(n).unwrap_or(0);
        } else {
            std::thread::yield_now();
        }
    }
    Ok(sent)
}

fn rate(line: &str) -> Option<Rate> {
    let get = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some(Rate {
        fps: get("fps")?,
        mbps: get("mbps")?,
        dropped: 0.0,
        io_per_frame: f64::NAN,
        io_busy: f64::NAN,
    })
}

/// Runs one VM command for `row` (the probe measuring for `secs`); returns its rate, with
/// the CPU time of its network thread `io` sampled from 0.5 s to `secs` s after the start.
fn run_vm(
    cmd: Command,
    row: Row,
    tap: &Tap,
    who: &str,
    secs: u64,
    io: IoThread,
) -> Result<Rate, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let sender = (row.dir == Dir::HostToGuest).then(|| {
        let (stop, index, size) = (stop.clone(), tap.index, row.size);
        std::thread::spawn(move || blast(index, size, &stop))
    });
    let rx0 = tap.rx_packets();
    let dropped0 = tap.stat("tx_dropped");
    let out = run_sampling(cmd, secs, io);
    stop.store(true, Ordering::Relaxed);
    let mut queued = None;
    if let Some(s) = sender {
        queued = Some(
            s.join()
                .map_err(|_| "the frame sender panicked".to_string())??,
        );
    }
    let dropped = tap.stat("tx_dropped").saturating_sub(dropped0);
    let (out, io_busy) = out.map_err(|e| format!("{who}: {e}"))?;
    let line = result_line(&out, "net_bench", who)?;
    let mut r = rate(&line).ok_or_else(|| format!("{who}: unreadable {line}"))?;
    if let Some(busy) = io_busy {
        r.io_busy = busy;
        r.io_per_frame = busy / r.fps.max(1.0);
    }
    if let Some(queued) = queued {
        // Counters, far below 2^52: exact as f64.
        #[allow(clippy::cast_precision_loss)]
        {
            r.dropped = dropped as f64 / (queued + dropped).max(1) as f64;
        }
    }
    if row.dir == Dir::GuestToHost {
        // Everything the guest sent must have reached the host.
        let sent = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("frames="))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let got = tap.rx_packets().saturating_sub(rx0);
        if got < sent {
            return Err(format!(
                "{who}: the guest sent {sent} frames but the host received {got}"
            ));
        }
    }
    Ok(r)
}

fn kiln(o: &Options, tap: &Tap, row: Row) -> Result<Rate, String> {
    let mut c = Command::new(&o.kiln);
    c.args([
        "run",
        "--cpus",
        "1",
        "--memory",
        "512M",
        "--net",
        &format!("tap={},mac={}", tap.name, mac_str(GUEST_MAC)),
        "--cmdline",
        &cmdline(row, o.secs),
        "--kernel",
    ])
    .arg(&o.probe);
    run_vm(c, row, tap, "kiln", o.secs, IoThread::Named("net-q0"))
}

fn qemu(o: &Options, tap: &Tap, row: Row) -> Result<Rate, String> {
    let netdev = format!(
        "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
        tap.name
    );
    let device = format!("virtio-net-pci,netdev=n0,mac={}", mac_str(GUEST_MAC));
    let c = qemu_microvm(
        &o.qemu,
        &o.probe,
        &cmdline(row, o.secs),
        &["-netdev", &netdev, "-device", &device],
    );
    run_vm(c, row, tap, "qemu", o.secs, IoThread::Main)
}

/// Runs the benchmark; returns whether kiln reached 1.2 × QEMU on every row.
pub fn run(o: &Options) -> Result<bool, String> {
    for p in [&o.kiln, &o.probe] {
        if !p.exists() {
            return Err(format!(
                "{} not found (build it first: see README.md)",
                p.display()
            ));
        }
    }
    let tap = Tap::create()?;
    println!(
        "network benchmark: probe's polling virtio-net driver on tap {}, {} s per run, {} runs each (medians)",
        tap.name, o.secs, o.runs
    );
    println!(
        "{:<20} {:>12} {:>10} {:>12} {:>10} {:>8}",
        "", "kiln fps", "kiln Mb/s", "qemu fps", "qemu Mb/s", "ratio"
    );
    let mut ok = true;
    for row in ROWS {
        if o.only
            .as_ref()
            .is_some_and(|t| !row.name.contains(t.as_str()))
        {
            continue;
        }
        let (mut kf, mut km, mut qf, mut qm) = (vec![], vec![], vec![], vec![]);
        let (mut kd, mut qd) = (vec![], vec![]);
        let (mut kio, mut qio, mut kbusy, mut qbusy) = (vec![], vec![], vec![], vec![]);
        for _ in 0..o.runs {
            let k = kiln(o, &tap, row)?;
            let q = qemu(o, &tap, row)?;
            kf.push(k.fps);
            km.push(k.mbps);
            qf.push(q.fps);
            qm.push(q.mbps);
            kd.push(k.dropped);
            qd.push(q.dropped);
            kio.push(k.io_per_frame);
            qio.push(q.io_per_frame);
            kbusy.push(k.io_busy);
            qbusy.push(q.io_busy);
        }
        let (kf, km, qf, qm) = (
            median(&mut kf),
            median(&mut km),
            median(&mut qf),
            median(&mut qm),
        );
        let ratio = if qf > 0.0 { kf / qf } else { f64::INFINITY };
        println!(
            "{:<20} {kf:>12.0} {km:>10.0} {qf:>12.0} {qm:>10.0} {ratio:>8.2}",
            row.name
        );
        if row.dir == Dir::HostToGuest {
            println!(
                "{:<20} tap drops: {:.0} % (kiln), {:.0} % (qemu) of the frames sent while the VM ran (boot included)",
                "",
                100.0 * median(&mut kd),
                100.0 * median(&mut qd)
            );
        }
        println!(
            "{:<20} network thread: {:.2} µs CPU per frame, {:.0} % busy (kiln net-q0); {:.2} µs, {:.0} % (qemu main loop)",
            "",
            1e6 * median(&mut kio),
            100.0 * median(&mut kbusy),
            1e6 * median(&mut qio),
            100.0 * median(&mut qbusy)
        );
        ok &= ratio >= 1.2;
    }
    println!("target: kiln >= 1.2 x QEMU (vhost=off) on every row");
    println!("all targets met: {}", if ok { "yes" } else { "NO" });
    Ok(ok)
}

/// `kiln-bench net-floor`: what reading frames from a tap costs by itself. The same sender
/// as the host → guest rows blasts frames into a tap, and a thread here does nothing but
/// read them (plain read(2) into one buffer, as QEMU does, without anything after it).
/// Frames/s and that thread's CPU time per frame bound what any userspace backend can do:
/// a VMM's receive thread on a busy core cannot beat QEMU's by much when the read itself is
/// most of both. The CPU time includes reads that found the tap empty and the polls after
/// them: with no drops the reader kept up with the sender, and the figure is an upper bound.
pub fn floor(secs: u64) -> Result<bool, String> {
    let tap = Tap::create()?;
    println!(
        "tap read floor: a thread that only reads the tap, {secs} s per size, sender as in `net`"
    );
    println!(
        "{:<10} {:>12} {:>10} {:>14} {:>8}",
        "size", "frames/s", "cpu %", "µs/frame", "drops"
    );
    for size in [1514usize, 60] {
        let fd = open_tap(&tap.name)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let (stop, index) = (stop.clone(), tap.index);
            std::thread::spawn(move || blast(index, size, &stop))
        };
        let dropped0 = tap.stat("tx_dropped");
        let reader = {
            let stop = stop.clone();
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            std::thread::spawn(move || read_all(raw, &stop))
        };
        std::thread::sleep(std::time::Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
        let (frames, cpu) = reader
            .join()
            .map_err(|_| "the reader panicked".to_string())?;
        let queued = sender
            .join()
            .map_err(|_| "the frame sender panicked".to_string())??;
        let dropped = tap.stat("tx_dropped").saturating_sub(dropped0);
        let offered = queued + dropped;
        // Counters and seconds, far below 2^52: exact enough as f64.
        #[allow(clippy::cast_precision_loss)]
        {
            let fps = frames as f64 / secs as f64;
            println!(
                "{:<10} {fps:>12.0} {:>10.0} {:>14.3} {:>7.0}%",
                format!("{size} B"),
                100.0 * cpu / secs as f64,
                1e6 * cpu / frames.max(1) as f64,
                100.0 * dropped as f64 / offered.max(1) as f64
            );
        }
    }
    Ok(true)
}

/// Attaches to the tap `name` as a VMM would (vnet header, nonblocking).
fn open_tap(name: &str) -> Result<std::os::fd::OwnedFd, String> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI).unwrap_or(0) | IFF_VNET_HDR;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: TUNSETIFF reads an ifreq that outlives the call.
    if unsafe { libc::ioctl(raw, TUNSETIFF, &mut ifr) } != 0 {
        return Err(format!(
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let hdr: libc::c_int = 12;
    // SAFETY: TUNSETVNETHDRSZ reads an int that outlives the call.
    if unsafe { libc::ioctl(raw, TUNSETVNETHDRSZ, &hdr) } != 0 {
        return Err(format!(
            "TUNSETVNETHDRSZ: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(f.into())
}

/// Reads frames from `fd` until `stop`; returns (frames, this thread's CPU seconds).
fn read_all(fd: std::os::fd::RawFd, stop: &AtomicBool) -> (u64, f64) {
    let cpu = || {
        // SAFETY: rusage is plain data; getrusage fills it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: ru outlives the call.
        unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        secs(ru.ru_utime) + secs(ru.ru_stime)
    };
    let start = cpu();
    let mut buf = [0u8; 2048];
    let mut frames = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: buf is writable for its length and outlives the call.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            frames += 1;
        } else {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd that outlives the call.
            unsafe { libc::poll(&mut p, 1, 100) };
        }
    }
    (frames, cpu() - start)
}

/// Parses `net-floor`'s `--secs N` (default 3).
pub fn floor_secs(args: &[String]) -> Result<u64, String> {
    match args {
        [] => Ok(3),
        [k, v] if k == "--secs" => v
            .parse::<u64>()
            .ok()
            .filter(|&s| s > 0)
            .ok_or("--secs needs a number >= 1".into()),
        _ => Err(format!("unknown options {}", args.join(" "))),
    }
}
