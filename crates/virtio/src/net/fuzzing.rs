//! The virtio-net queues as a fuzzing entry point: one synchronous pass of a queue pair's
//! thread (receive, transmit and control queues) over guest memory, queue sizes, features and
//! frames waiting in the "tap" that the fuzzer chooses. The tap is one end of a datagram
//! socket pair whose other end holds the frames to receive and takes what the guest sends.
//! The same code serves a real guest; only the thread is the caller's, and the pass ends
//! once the queues have nothing more to do.
//!
//! Used by `fuzz/fuzz_targets/virtio_net_queues.rs` and by a unit test that runs it on
//! pseudo-random inputs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::AtomicU16;
use std::sync::Arc;

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::tap::{Tap, VNET_HDR_LEN};
use super::worker::{self, NetPair, NetQueue, NetStats, Shared};
use crate::common::fuzzing::{guest_image, packed_layout, queue, Recorder};
use crate::common::worker::StopSignal;

/// Bytes of input before the guest memory image.
pub const HEADER_LEN: usize = 8;
/// Guest memory the pass runs on.
pub const MEMORY_LEN: usize = 64 << 10;
/// Where the queues start: receive, transmit, control (each fits 256 entries).
const QUEUE_BASES: [u64; 3] = [0, 8 << 10, 16 << 10];
/// Most frames waiting in the tap at the start of a pass.
const MAX_FRAMES: usize = 8;

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The queue layout was accepted (as a transport would accept it).
    pub ran: bool,
    /// Each queue's available index when the pass started (receive, transmit, control).
    /// Not a bound on what the device may take: guest buffers may overlap the rings, so
    /// what the device writes can make more chains available during the pass.
    pub offered: [u16; 3],
    /// Chains the device took from each available ring.
    pub taken: [u16; 3],
    /// Chains the device put in each used ring: never more than it took.
    pub used: [u16; 3],
    /// Frames that reached the host end of the tap.
    pub sent: u64,
    /// The device asked for a reset.
    pub needs_reset: bool,
}

/// Runs one pass over `input`, read as:
///
/// - byte 0: log2 of every queue's size (mod 9: 1 to 256 entries);
/// - byte 1: bit 0 negotiates EVENT_IDX, bit 1 MRG_RXBUF, bit 2 the big-frame offloads
///   (GUEST_TSO), bit 3 MQ (the control queue is always there);
/// - byte 2: frames waiting in the tap (mod 9);
/// - bytes 3-4: the first frame's length behind its virtio-net header (little endian, mod
///   70000); each next one is 1000 bytes shorter (at least 14);
/// - bytes 5-7: unused;
/// - the rest: guest memory from address 0 ([`MEMORY_LEN`] bytes, zero past the input), the
///   queues packed at 0, 8 KiB and 16 KiB. The frames' bytes are taken from the same image.
///
/// Every guest-supplied address, length and index goes through the device's checks.
pub fn pass(input: &[u8]) -> Outcome {
    let mut out = Outcome {
        ran: false,
        offered: [0; 3],
        taken: [0; 3],
        used: [0; 3],
        sent: 0,
        needs_reset: false,
    };
    let Some(header) = input.get(..HEADER_LEN) else {
        return out;
    };
    let size = 1u16 << (header[0] % 9);
    let event_idx = header[1] & 1 != 0;
    let image = &input[HEADER_LEN..];
    let Some(mem) = guest_image(image, MEMORY_LEN) else {
        return out;
    };
    let mut queues = Vec::new();
    for (i, base) in QUEUE_BASES.into_iter().enumerate() {
        let (desc, avail, used) = packed_layout(base, size);
        let Some(q) = queue(size, desc, avail, used, event_idx, &mem) else {
            return out;
        };
        out.offered[i] = q
            .avail_idx(&mem, std::sync::atomic::Ordering::Acquire)
            .map_or(0, |w| w.0);
        let Ok(notify) = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) else {
            return out;
        };
        queues.push(NetQueue {
            index: u16::try_from(i).unwrap_or(0),
            queue: q,
            notify,
        });
    }
    let Some((device_end, host_end)) = socket_pair() else {
        return out;
    };
    let frames = usize::from(header[2]) % (MAX_FRAMES + 1);
    let first = usize::from(u16::from_le_bytes([header[3], header[4]])) % 70_000;
    for i in 0..frames {
        let len = first.saturating_sub(1000 * i).max(14) + VNET_HDR_LEN;
        let mut frame = vec![0u8; len];
        let n = len.min(image.len());
        frame[..n].copy_from_slice(&image[..n]);
        // A full socket refuses the rest: fewer frames wait, which is another input.
        // SAFETY: send reads `frame`, which lives across the call.
        let _ = unsafe {
            libc::send(
                host_end.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
    }
    let Ok(stop) = StopSignal::raised() else {
        return out;
    };
    let recorder = Arc::new(Recorder::default());
    let stats = Arc::new(NetStats::default());
    let shared = Arc::new(Shared {
        mem,
        interrupt: recorder.clone(),
        taps: vec![Arc::new(Tap::from_file(device_end, "fuzz0"))],
        mrg_rxbuf: header[1] & 2 != 0,
        big_frames: header[1] & 4 != 0,
        mq: header[1] & 8 != 0,
        active_pairs: Arc::new(AtomicU16::new(1)),
        stats,
    });
    let mut queues = queues.into_iter();
    let pair = NetPair {
        pair: 0,
        rx: queues.next(),
        tx: queues.next(),
        ctrl: queues.next(),
        broken: false,
    };
    // A raised stop signal: the worker serves what is available once and returns.
    let p = worker::run(pair, shared, &stop);
    out.ran = true;
    for (i, q) in [&p.rx, &p.tx, &p.ctrl].into_iter().enumerate() {
        out.taken[i] = q.as_ref().map_or(0, |q| q.queue.next_avail());
        out.used[i] = q.as_ref().map_or(0, |q| q.queue.next_used());
    }
    out.needs_reset = p.broken || recorder.reset_requested();
    out.sent = drain(&host_end);
    out
}

/// A nonblocking datagram socket pair: the device's end as a file, and the host end.
pub(crate) fn socket_pair() -> Option<(std::fs::File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array, which lives across the call.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: both descriptors were just created and each is owned by one value alone.
    let ends = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        )
    };
    Some(ends)
}

/// Reads and counts what reached the host end.
fn drain(fd: &OwnedFd) -> u64 {
    let mut buf = vec![0u8; 70_000];
    let mut n = 0;
    loop {
        // SAFETY: recv writes at most buf.len() bytes into `buf`, which lives across the call.
        let got = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if got < 0 {
            return n;
        }
        n += 1;
    }
}

/// An input whose pass does a little of everything, the seed fuzzers start from: eight
/// 2 KiB receive buffers and three frames waiting in the tap; two frames to send (header and
/// frame in two descriptors, then in one); one control command (MQ: one queue pair). Queues
/// of 16 entries; EVENT_IDX, MRG_RXBUF and MQ negotiated.
pub fn example_input() -> Vec<u8> {
    const SIZE: u16 = 16;
    let mut mem = vec![0u8; 0xa000];
    let (next, write) = (1u16, 2u16);
    let mut desc = |queue: usize, i: usize, addr: u64, len: u32, flags: u16, link: u16| {
        let at = usize::try_from(QUEUE_BASES[queue]).unwrap_or(0) + i * 16;
        let d = &mut mem[at..at + 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&link.to_le_bytes());
    };
    for i in 0..8u16 {
        desc(
            0,
            usize::from(i),
            0x6000 + 0x800 * u64::from(i),
            0x800,
            write,
            0,
        );
    }
    desc(1, 0, 0x5000, 12, next, 1);
    desc(1, 1, 0x5100, 60, 0, 0);
    desc(1, 2, 0x5200, 72, 0, 0);
    desc(2, 0, 0x5400, 2, next, 1);
    desc(2, 1, 0x5410, 2, next, 2);
    desc(2, 2, 0x5420, 1, write, 0);
    let mut avail = |queue: usize, heads: &[u16]| {
        let (_, at, _) = packed_layout(QUEUE_BASES[queue], SIZE);
        let at = usize::try_from(at).unwrap_or(0);
        let count = u16::try_from(heads.len()).unwrap_or(0);
        mem[at + 2..at + 4].copy_from_slice(&count.to_le_bytes());
        for (k, h) in heads.iter().enumerate() {
            mem[at + 4 + 2 * k..at + 6 + 2 * k].copy_from_slice(&h.to_le_bytes());
        }
    };
    avail(0, &[0, 1, 2, 3, 4, 5, 6, 7]);
    avail(1, &[0, 2]);
    avail(2, &[0]);
    // Frames to send: broadcast, 60 bytes behind a zero header.
    mem[0x5100..0x5106].fill(0xff);
    mem[0x5200 + 12..0x5200 + 18].fill(0xff);
    // VIRTIO_NET_CTRL_MQ, VQ_PAIRS_SET, one pair.
    mem[0x5400] = 4;
    mem[0x5410] = 1;
    let mut input = vec![4u8, 1 | 2 | 8, 3, 100, 0, 0, 0, 0];
    input.extend_from_slice(&mem);
    input
}
