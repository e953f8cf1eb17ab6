//! The `rng` check: read entropy twice from every virtio-rng device; the two
//! reads must both return bytes, differ, and not be all zero.

use crate::clock::Clock;
use crate::dma::Dma;
use crate::util::Reason;
use crate::{emit, reason};

use super::{open, request, Dev, Devs, Seg, TYPE_RNG};

const READ: u32 = 64;

/// Reads up to `READ` bytes twice; returns how many each read gave.
pub fn exercise(f: &Dev, qsize: u16, dma: &mut Dma, clock: &Clock) -> Result<(u32, u32), Reason> {
    let mut d = open::<1>(f, 0, qsize, dma, clock)?;
    let bufs = dma.alloc(2 * u64::from(READ), 64).ok_or_else(|| reason!("out of DMA memory"))?;
    let mut got = [0u32; 2];
    for (i, g) in got.iter_mut().enumerate() {
        let buf = bufs + i as u64 * u64::from(READ);
        *g = request(&d.t, &mut d.queues[0], &[Seg::inp(buf, READ)], clock, 2000)?;
        if *g == 0 || *g > READ {
            return Err(reason!("{}: read {} returned {} bytes (asked {})", f.id, i, g, READ));
        }
    }
    // SAFETY: both buffers are in the DMA arena and the device is done with them.
    let (a, b) = unsafe {
        (
            core::slice::from_raw_parts(bufs as *const u8, got[0] as usize),
            core::slice::from_raw_parts((bufs + u64::from(READ)) as *const u8, got[1] as usize),
        )
    };
    let n = a.len().min(b.len());
    if a[..n] == b[..n] {
        return Err(reason!("{}: two reads returned the same {} bytes", f.id, n));
    }
    if a.iter().chain(b).all(|&x| x == 0) {
        return Err(reason!("{}: reads returned only zeros", f.id));
    }
    d.t.reset(clock)?;
    Ok((got[0], got[1]))
}

pub fn check(devs: &Devs, qsize: u16, dma: &mut Dma, clock: &Clock) -> bool {
    let mut any = false;
    let mut ok = true;
    for f in devs.of_type(TYPE_RNG) {
        any = true;
        match exercise(f, qsize, dma, clock) {
            Ok((a, b)) => emit!("PROBE rng ok dev={} bytes={},{}", f.id, a, b),
            Err(r) => {
                emit!("PROBE rng fail {}", r);
                ok = false;
            }
        }
    }
    if !any {
        emit!("PROBE rng fail no virtio-rng device");
    }
    any && ok
}
