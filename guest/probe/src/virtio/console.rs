//! The `console` check on the first virtio-console device (port 0, no
//! MULTIPORT): write a line, and with `probe.console_wait_ms` wait that long
//! for a line from the host and write it back.

use crate::clock::Clock;
use crate::dma::Dma;
use crate::util::{Printable, Reason};
use crate::{emit, reason};

use super::queue::MAX_QSIZE;
use super::{open, request, Dev, Devs, Seg, TYPE_CONSOLE};

/// What the probe writes first.
pub const HELLO: &[u8] = b"kiln-probe console hello\n";
/// Prefix of the line written back after a line was read.
pub const ECHO: &[u8] = b"kiln-probe console echo ";
const RX_BUFS: u16 = 8;
const RX_LEN: u32 = 256;
const LINE_MAX: usize = 200;

fn copy_to(dst: u64, src: &[u8]) {
    // SAFETY: `dst` is a DMA buffer at least `src.len()` bytes long that the
    // device does not own right now.
    unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
}

pub fn run(f: &Dev, wait_ms: u64, qsize: u16, dma: &mut Dma, clock: &Clock) -> Result<(), Reason> {
    let mut d = open::<2>(f, 0, qsize, dma, clock)?;
    let rx = dma.alloc(u64::from(RX_BUFS) * u64::from(RX_LEN), 64).ok_or_else(|| reason!("out of DMA memory"))?;
    let tx = dma.alloc(512, 64).ok_or_else(|| reason!("out of DMA memory"))?;
    let mut slot = [0u16; MAX_QSIZE as usize];
    for k in 0..RX_BUFS.min(d.queues[0].size) {
        let head = d.queues[0].add(&[Seg::inp(rx + u64::from(k) * u64::from(RX_LEN), RX_LEN)]);
        slot[usize::from(head.ok_or_else(|| reason!("receive queue full"))?)] = k;
    }
    d.queues[0].kick();
    copy_to(tx, HELLO);
    let n = request(&d.t, &mut d.queues[1], &[Seg::out(tx, HELLO.len() as u32)], clock, 2000)?;
    let _ = n; // a transmit buffer is device-readable: nothing is written back.

    let mut line = [0u8; LINE_MAX];
    let mut len = 0;
    let mut complete = false;
    if wait_ms > 0 {
        let deadline = clock.deadline_ms(wait_ms);
        while !complete && !deadline.expired() {
            let Some((head, got)) = d.queues[0].poll()? else {
                core::hint::spin_loop();
                continue;
            };
            if got > RX_LEN {
                return Err(reason!("{}: receive completion of {} bytes in a {} byte buffer", f.id, got, RX_LEN));
            }
            let k = slot[usize::from(head)];
            let addr = rx + u64::from(k) * u64::from(RX_LEN);
            // SAFETY: buffer k of the receive array; the device completed it.
            let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, got as usize) };
            for &b in bytes {
                if b == b'\n' {
                    complete = true;
                    break;
                }
                if len < LINE_MAX && b != b'\r' {
                    line[len] = b;
                    len += 1;
                }
            }
            let head = d.queues[0].add(&[Seg::inp(addr, RX_LEN)]).ok_or_else(|| reason!("receive queue full"))?;
            slot[usize::from(head)] = k;
            d.queues[0].kick();
        }
    }
    if complete {
        let mut out = [0u8; 512];
        let n = ECHO.len() + len + 1;
        out[..ECHO.len()].copy_from_slice(ECHO);
        out[ECHO.len()..n - 1].copy_from_slice(&line[..len]);
        out[n - 1] = b'\n';
        copy_to(tx, &out[..n]);
        request(&d.t, &mut d.queues[1], &[Seg::out(tx, n as u32)], clock, 2000)?;
        emit!("PROBE console ok dev={} wrote={} read={}", f.id, HELLO.len(), Printable(&line[..len]));
    } else if wait_ms > 0 {
        emit!("PROBE console ok dev={} wrote={} read=none", f.id, HELLO.len());
    } else {
        emit!("PROBE console ok dev={} wrote={} read=skipped", f.id, HELLO.len());
    }
    d.t.reset(clock)
}

pub fn check(devs: &Devs, wait_ms: u64, qsize: u16, dma: &mut Dma, clock: &Clock) -> bool {
    let Some(f) = devs.of_type(TYPE_CONSOLE).next() else {
        emit!("PROBE console fail no virtio-console device");
        return false;
    };
    match run(f, wait_ms, qsize, dma, clock) {
        Ok(()) => true,
        Err(r) => {
            emit!("PROBE console fail {}", r);
            false
        }
    }
}
