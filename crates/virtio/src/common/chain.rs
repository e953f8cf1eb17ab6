//! Taking descriptor chains off a queue and checking their structure.
//!
//! `virtio-queue` stops iterating a chain quietly when something is wrong (a loop longer than
//! the table, an index past the table, a descriptor outside RAM, a bad indirect table), so
//! the last descriptor it yields still says NEXT. [`collect`] turns that into an error, so a
//! device can tell a malformed chain from a short one.

use kiln_devices::virtio::GuestMemory;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::GuestAddress;

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
    let next = {
        let mut it = queue.iter(mem).map_err(|e| ChainError::AvailRing {
            queue: index,
            reason: e.to_string(),
        })?;
        it.next()
    };
    match next {
        Some(c) => Ok(Some(c)),
        // The iterator also ends when it cannot read the ring entry itself.
        None if super::has_avail(queue, mem) => Err(ChainError::AvailRing {
            queue: index,
            reason: "an available-ring entry is outside guest RAM".into(),
        }),
        None => Ok(None),
    }
}

/// Collects the descriptors of `chain` into `out` (cleared first), checking that the chain
/// ends and has at most `max` descriptors. Returns the head index.
pub(crate) fn collect(
    chain: DescriptorChain<&GuestMemory>,
    max: usize,
    queue: u16,
    out: &mut Vec<Desc>,
) -> Result<u16, ChainError> {
    let head = chain.head_index();
    out.clear();
    let mut ended = false;
    for d in chain {
        if out.len() >= max {
            return Err(ChainError::TooLong { queue, head, max });
        }
        out.push(Desc {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        });
        ended = !d.has_next();
    }
    if out.is_empty() {
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
