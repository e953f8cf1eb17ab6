//! Taking descriptor chains off a queue and checking their structure.
//!
//! `virtio-queue` stops iterating a chain quietly when something is wrong (a loop longer than
//! the table, an index past the table, a descriptor outside RAM, a bad indirect table), so
//! the last descriptor it yields still says NEXT. [`collect`] turns that into an error, so a
//! device can tell a malformed chain from a short one.

use kiln_devices::virtio::GuestMemory;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::{push_iovecs, BadGuestRange};

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Desc {
    /// Guest address of the buffer.
    pub addr: GuestAddress,
    /// Its length.
    pub len: u32,
    /// The device writes it (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// A chain or queue the device cannot serve: the driver broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The available ring could not be read, or its index moved more than a ring ahead.
    #[error("queue {queue}: available ring unusable ({reason})")]
    AvailRing {
        /// Queue index.
        queue: u16,
        /// What virtio-queue reported.
        reason: String,
    },
    /// No descriptor could be read at the head.
    #[error("queue {queue}: descriptor chain at head {head} is empty or unreadable")]
    Empty {
        /// Queue index.
        queue: u16,
        /// Head index.
        head: u16,
    },
    /// The chain does not end: a loop, a next index past the table, a descriptor outside
    /// RAM, an invalid indirect table, or more than 4 GiB in total.
    #[error("queue {queue}: descriptor chain at head {head} does not end properly")]
    Unterminated {
        /// Queue index.
        queue: u16,
        /// Head index.
        head: u16,
    },
    /// More descriptors than the device accepts.
    #[error("queue {queue}: descriptor chain at head {head} has more than {max} descriptors")]
    TooLong {
        /// Queue index.
        queue: u16,
        /// Head index.
        head: u16,
        /// The limit.
        max: usize,
    },
}

/// Takes the next available chain, if any.
pub(crate) fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    index: u16,
) -> Result<Option<DescriptorChain<&'m GuestMemory>>, ChainError> {
    // Checked first: the iterator below also ends when it cannot read a ring entry, and the
    // driver may publish more between its snapshot of the index and any later look.
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| ChainError::AvailRing {
            queue: index,
            reason: e.to_string(),
        })?;
    if avail.0 == queue.next_avail() {
        return Ok(None);
    }
    let next = {
        let mut it = queue.iter(mem).map_err(|e| ChainError::AvailRing {
            queue: index,
            reason: e.to_string(),
        })?;
        it.next()
    };
    next.map(Some).ok_or_else(|| ChainError::AvailRing {
        queue: index,
        reason: "an available-ring entry is outside guest RAM".into(),
    })
}

/// One chain taken by [`pop_batch`]: its head index and where its descriptors lie in the
/// batch's descriptor list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Taken {
    /// Head index (for the used ring).
    pub head: u16,
    /// Its descriptors in the batch's list.
    pub descs: std::ops::Range<usize>,
}

/// Takes up to `max` available chains in one pass over the available ring: `descs` and
/// `taken` are cleared, then receive every chain's descriptors (checked as by [`collect`],
/// at most `max_descs` each) and one entry per chain. Returns how many chains it took.
///
/// Reading the ring index once and walking it with one iterator costs less per chain than
/// [`pop`] while the driver keeps the queue busy.
pub(crate) fn pop_batch(
    queue: &mut Queue,
    mem: &GuestMemory,
    index: u16,
    max: usize,
    max_descs: usize,
    descs: &mut Vec<Desc>,
    taken: &mut Vec<Taken>,
) -> Result<usize, ChainError> {
    descs.clear();
    taken.clear();
    let ring_err = |reason: String| ChainError::AvailRing {
        queue: index,
        reason,
    };
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| ring_err(e.to_string()))?;
    let pending = usize::from(avail.0.wrapping_sub(queue.next_avail()));
    if pending == 0 || max == 0 {
        return Ok(0);
    }
    let want = pending.min(max);
    // The iterator checks that the index is at most a ring ahead.
    let mut it = queue.iter(mem).map_err(|e| ring_err(e.to_string()))?;
    for _ in 0..want {
        let c = it
            .next()
            .ok_or_else(|| ring_err("an available-ring entry is outside guest RAM".into()))?;
        let start = descs.len();
        let head = collect_into(c, max_descs, index, descs)?;
        taken.push(Taken {
            head,
            descs: start..descs.len(),
        });
    }
    Ok(want)
}

/// Collects the descriptors of `chain` into `out` (cleared first), checking that the chain
/// ends and has at most `max` descriptors. Returns the head index.
pub(crate) fn collect(
    chain: DescriptorChain<&GuestMemory>,
    max: usize,
    queue: u16,
    out: &mut Vec<Desc>,
) -> Result<u16, ChainError> {
    out.clear();
    collect_into(chain, max, queue, out)
}

/// [`collect`], appending to `out`.
fn collect_into(
    chain: DescriptorChain<&GuestMemory>,
    max: usize,
    queue: u16,
    out: &mut Vec<Desc>,
) -> Result<u16, ChainError> {
    let head = chain.head_index();
    let start = out.len();
    let mut ended = false;
    for d in chain {
        if out.len() - start >= max {
            return Err(ChainError::TooLong { queue, head, max });
        }
        out.push(Desc {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        });
        ended = !d.has_next();
    }
    if out.len() == start {
        return Err(ChainError::Empty { queue, head });
    }
    if !ended {
        return Err(ChainError::Unterminated { queue, head });
    }
    Ok(head)
}

/// Device-readable and device-writable byte counts of `descs`, and whether every readable
/// descriptor comes before every writable one (as the specification requires).
pub(crate) fn split_sizes(descs: &[Desc]) -> (u64, u64, bool) {
    let mut readable = 0u64;
    let mut writable = 0u64;
    let mut ordered = true;
    for d in descs {
        if d.writable {
            writable += u64::from(d.len);
        } else {
            if writable > 0 {
                ordered = false;
            }
            readable += u64::from(d.len);
        }
    }
    (readable, writable, ordered)
}

/// Reads `buf.len()` bytes of the chain's readable stream, starting `skip` bytes in.
pub(crate) fn read_stream(
    mem: &GuestMemory,
    descs: &[Desc],
    mut skip: u64,
    buf: &mut [u8],
) -> Result<(), BadGuestRange> {
    let mut done = 0usize;
    for d in descs.iter().filter(|d| !d.writable) {
        if done == buf.len() {
            break;
        }
        let len = u64::from(d.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        // skip < len <= u32::MAX, so the remainder fits usize.
        let avail = usize::try_from(len - skip).unwrap_or(usize::MAX);
        let n = avail.min(buf.len() - done);
        let addr = d.addr.checked_add(skip).ok_or(BadGuestRange {
            addr: d.addr.0,
            len: n,
        })?;
        mem.read_slice(&mut buf[done..done + n], GuestAddress(addr.0))
            .map_err(|_| BadGuestRange {
                addr: addr.0,
                len: n,
            })?;
        done += n;
        skip = 0;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(BadGuestRange {
            addr: 0,
            len: buf.len(),
        })
    }
}

/// Appends iovecs for `len` bytes of the chain's readable (`writable == false`) or writable
/// stream, starting `skip` bytes in.
pub(crate) fn stream_iovecs(
    mem: &GuestMemory,
    descs: &[Desc],
    writable: bool,
    mut skip: u64,
    len: u64,
    out: &mut Vec<libc::iovec>,
) -> Result<(), BadGuestRange> {
    let mut left = len;
    for d in descs.iter().filter(|d| d.writable == writable) {
        if left == 0 {
            break;
        }
        let dlen = u64::from(d.len);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let n = (dlen - skip).min(left);
        let addr = d.addr.checked_add(skip).ok_or(BadGuestRange {
            addr: d.addr.0,
            len: 0,
        })?;
        // n <= u32::MAX.
        let n_us = usize::try_from(n).unwrap_or(usize::MAX);
        push_iovecs(mem, GuestAddress(addr.0), n_us, out)?;
        left -= n;
        skip = 0;
    }
    if left == 0 {
        Ok(())
    } else {
        Err(BadGuestRange { addr: 0, len: 0 })
    }
}

/// Writes `data` into the chain's writable stream from its start.
pub(crate) fn write_stream(
    mem: &GuestMemory,
    descs: &[Desc],
    data: &[u8],
) -> Result<(), BadGuestRange> {
    let mut done = 0usize;
    for d in descs.iter().filter(|d| d.writable) {
        if done == data.len() {
            break;
        }
        let n = usize::try_from(d.len)
            .unwrap_or(usize::MAX)
            .min(data.len() - done);
        mem.write_slice(&data[done..done + n], d.addr)
            .map_err(|_| BadGuestRange {
                addr: d.addr.0,
                len: n,
            })?;
        done += n;
    }
    Ok(())
}
