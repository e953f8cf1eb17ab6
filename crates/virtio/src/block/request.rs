//! Parsing and checking one virtio-blk request (virtio 1.2, section 5.2.6).
//!
//! A request is a chain: device-readable bytes (a 16-byte header, then data for writes or
//! segment descriptors for discard/write-zeroes), then device-writable bytes (data for reads
//! or the serial for GET_ID) ending with one status byte. The framing across descriptors is
//! free, so both parts are treated as byte streams.
//!
//! Requests that can be answered get a status (IOERR, UNSUPP); a chain without a writable
//! status byte in guest RAM cannot be, and is a [`Malformed`] error that puts the device in
//! NEEDS_RESET.

use kiln_devices::virtio::GuestMemory;
use virtio_bindings::virtio_blk as vb;
use vm_memory::{Bytes, GuestAddress};

use crate::common::chain::{read_stream, Desc};

/// Sector size of the virtio-blk protocol.
pub(crate) const SECTOR: u64 = 512;
/// Size of the request header.
const HEADER_BYTES: usize = 16;
const HEADER_LEN: u64 = HEADER_BYTES as u64;
/// Size of one discard/write-zeroes segment descriptor.
const SEGMENT_BYTES: usize = 16;
const SEGMENT_LEN: u64 = SEGMENT_BYTES as u64;
/// Serial number length (VIRTIO_BLK_ID_BYTES).
pub(crate) const ID_BYTES: usize = 20;

/// Request status values.
pub(crate) mod status {
    /// Success (VIRTIO_BLK_S_OK).
    pub const OK: u8 = 0;
    /// Failed (VIRTIO_BLK_S_IOERR).
    pub const IOERR: u8 = 1;
    /// Not supported (VIRTIO_BLK_S_UNSUPP).
    pub const UNSUPP: u8 = 2;
}

/// The write-zeroes segment flag allowing storage to be freed.
const FLAG_UNMAP: u32 = 1;

/// What the request checks need to know about the disk.
#[derive(Debug, Clone)]
pub(crate) struct DiskLimits {
    /// Capacity in sectors.
    pub capacity: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// Most segments in a discard or write-zeroes request.
    pub max_segments: u32,
    /// Largest discard or write-zeroes segment, in sectors.
    pub max_zero_sectors: u32,
    /// The serial, NUL-padded.
    pub serial: [u8; ID_BYTES],
}

/// One range of the disk, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    /// Start.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// What a request asks for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Read `len` bytes at `offset` into the writable data (all writable bytes but the status).
    Read { offset: u64, len: u64 },
    /// Write the readable data (after the header), `len` bytes, at `offset`.
    Write { offset: u64, len: u64 },
    /// Make completed writes durable.
    Flush,
    /// Write `len` bytes of the serial into the writable data.
    GetId { len: usize },
    /// Discard these ranges.
    Discard(Vec<Range>),
    /// Zero these ranges; `unmap` lets the storage be freed.
    WriteZeroes(Vec<Range>, bool),
    /// Nothing to do but answer this status.
    Answer(u8),
}

/// A request that cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The chain has no device-writable last byte for the status.
    #[error("request at head {0} has no writable status byte")]
    NoStatus(u16),
    /// The status byte is not in guest RAM.
    #[error("request at head {0}: status byte outside guest RAM")]
    StatusOutsideRam(u16),
}

/// A checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    /// Head descriptor index.
    pub head: u16,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// What to do.
    pub action: Action,
    /// Bytes written to the chain on success (data read, serial, status).
    pub used_len: u32,
}

/// Checks the chain `descs` (head `head`) against `limits`.
pub(crate) fn parse(
    mem: &GuestMemory,
    descs: &[Desc],
    head: u16,
    limits: &DiskLimits,
) -> Result<Request, Malformed> {
    let last = descs.last().ok_or(Malformed::NoStatus(head))?;
    if !last.writable || last.len == 0 {
        return Err(Malformed::NoStatus(head));
    }
    let status = last
        .addr
        .0
        .checked_add(u64::from(last.len) - 1)
        .map(GuestAddress)
        .filter(|&a| mem.read_obj::<u8>(a).is_ok())
        .ok_or(Malformed::StatusOutsideRam(head))?;
    let (readable, writable, ordered) = crate::common::chain::split_sizes(descs);
    // The status byte is the last writable byte; the rest of the writable part is data.
    let data_in = writable - 1;
    let answer = |s| Request {
        head,
        status,
        action: Action::Answer(s),
        used_len: 1,
    };
    if !ordered || readable < HEADER_LEN {
        return Ok(answer(status::IOERR));
    }
    let mut hdr = [0u8; HEADER_BYTES];
    if read_stream(mem, descs, 0, &mut hdr).is_err() {
        return Ok(answer(status::IOERR));
    }
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let data_out = readable - HEADER_LEN;
    let action = match kind {
        vb::VIRTIO_BLK_T_IN => match check_range(sector, data_in, limits) {
            Some(offset) => Action::Read {
                offset,
                len: data_in,
            },
            None => Action::Answer(status::IOERR),
        },
        vb::VIRTIO_BLK_T_OUT if limits.read_only => Action::Answer(status::IOERR),
        vb::VIRTIO_BLK_T_OUT => match check_range(sector, data_out, limits) {
            Some(offset) => Action::Write {
                offset,
                len: data_out,
            },
            None => Action::Answer(status::IOERR),
        },
        vb::VIRTIO_BLK_T_FLUSH => Action::Flush,
        vb::VIRTIO_BLK_T_GET_ID => Action::GetId {
            len: usize::try_from(data_in).map_or(ID_BYTES, |n| n.min(ID_BYTES)),
        },
        vb::VIRTIO_BLK_T_DISCARD | vb::VIRTIO_BLK_T_WRITE_ZEROES if limits.read_only => {
            Action::Answer(status::UNSUPP)
        }
        vb::VIRTIO_BLK_T_DISCARD | vb::VIRTIO_BLK_T_WRITE_ZEROES => zero_action(
            mem,
            descs,
            kind == vb::VIRTIO_BLK_T_DISCARD,
            data_out,
            limits,
        ),
        _ => Action::Answer(status::UNSUPP),
    };
    let used_len = match &action {
        Action::Read { len, .. } => u32::try_from(len + 1).unwrap_or(u32::MAX),
        // ID_BYTES + 1 fits.
        Action::GetId { len } => u32::try_from(len + 1).unwrap_or(1),
        _ => 1,
    };
    Ok(Request {
        head,
        status,
        action,
        used_len,
    })
}

/// The byte offset of `len` bytes at `sector`, if the range is whole sectors on the disk.
fn check_range(sector: u64, len: u64, limits: &DiskLimits) -> Option<u64> {
    if !len.is_multiple_of(SECTOR) {
        return None;
    }
    let end = sector.checked_add(len / SECTOR)?;
    (end <= limits.capacity).then(|| sector * SECTOR)
}

/// Parses the segments of a discard or write-zeroes request.
fn zero_action(
    mem: &GuestMemory,
    descs: &[Desc],
    discard: bool,
    data_len: u64,
    limits: &DiskLimits,
) -> Action {
    let count = data_len / SEGMENT_LEN;
    if !data_len.is_multiple_of(SEGMENT_LEN) || count == 0 || count > u64::from(limits.max_segments)
    {
        return Action::Answer(status::IOERR);
    }
    let mut ranges = Vec::new();
    let mut unmap = true;
    for i in 0..count {
        let mut seg = [0u8; SEGMENT_BYTES];
        if read_stream(mem, descs, HEADER_LEN + i * SEGMENT_LEN, &mut seg).is_err() {
            return Action::Answer(status::IOERR);
        }
        let sector = u64::from_le_bytes([
            seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
        ]);
        let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        // Discard has no flags; write-zeroes knows only UNMAP.
        let known = if discard { 0 } else { FLAG_UNMAP };
        if flags & !known != 0 {
            return Action::Answer(status::UNSUPP);
        }
        unmap &= flags & FLAG_UNMAP != 0;
        if sectors > limits.max_zero_sectors {
            return Action::Answer(status::IOERR);
        }
        let len = u64::from(sectors) * SECTOR;
        match check_range(sector, len, limits) {
            Some(offset) => ranges.push(Range { offset, len }),
            None => return Action::Answer(status::IOERR),
        }
    }
    if discard {
        Action::Discard(ranges)
    } else {
        Action::WriteZeroes(ranges, unmap)
    }
}
