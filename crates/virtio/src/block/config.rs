//! virtio-blk feature bits and configuration space (virtio 1.2, section 5.2.4).

use virtio_bindings::virtio_blk as vb;

/// The mask of feature bit `n`.
const fn bit(n: u32) -> u64 {
    1 << n
}

/// Largest single segment (SIZE_MAX).
pub(crate) const F_SIZE_MAX: u64 = bit(vb::VIRTIO_BLK_F_SIZE_MAX);
/// Most segments per request (SEG_MAX).
pub(crate) const F_SEG_MAX: u64 = bit(vb::VIRTIO_BLK_F_SEG_MAX);
/// Read-only disk.
pub(crate) const F_RO: u64 = bit(vb::VIRTIO_BLK_F_RO);
/// Block size in `blk_size`.
pub(crate) const F_BLK_SIZE: u64 = bit(vb::VIRTIO_BLK_F_BLK_SIZE);
/// FLUSH requests.
pub(crate) const F_FLUSH: u64 = bit(vb::VIRTIO_BLK_F_FLUSH);
/// I/O topology (physical block size, optimal sizes).
pub(crate) const F_TOPOLOGY: u64 = bit(vb::VIRTIO_BLK_F_TOPOLOGY);
/// Several request queues.
pub(crate) const F_MQ: u64 = bit(vb::VIRTIO_BLK_F_MQ);
/// DISCARD requests.
pub(crate) const F_DISCARD: u64 = bit(vb::VIRTIO_BLK_F_DISCARD);
/// WRITE_ZEROES requests.
pub(crate) const F_WRITE_ZEROES: u64 = bit(vb::VIRTIO_BLK_F_WRITE_ZEROES);

/// Bytes of configuration space served (up to and including `write_zeroes_may_unmap` and its
/// padding; later fields belong to features kiln does not offer).
pub(crate) const CONFIG_LEN: usize = 60;

/// The device configuration, in host terms.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment in bytes.
    pub size_max: u32,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest discard, in sectors.
    pub max_discard_sectors: u32,
    /// Most segments in one discard request.
    pub max_discard_seg: u32,
    /// Discard alignment, in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes, in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes with UNMAP may free storage.
    pub write_zeroes_may_unmap: bool,
}

impl BlockConfig {
    /// The little-endian configuration space.
    pub(crate) fn bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &self.capacity.to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // 16..20: geometry (not offered).
        put(20, &self.blk_size.to_le_bytes());
        put(24, &[self.physical_block_exp, 0]);
        // min_io_size (u16 at 26): one logical block, in logical blocks.
        put(26, &1u16.to_le_bytes());
        // opt_io_size (u32 at 28): no preference.
        // 32: writeback, 33: unused.
        put(34, &self.num_queues.to_le_bytes());
        put(36, &self.max_discard_sectors.to_le_bytes());
        put(40, &self.max_discard_seg.to_le_bytes());
        put(44, &self.discard_sector_alignment.to_le_bytes());
        put(48, &self.max_write_zeroes_sectors.to_le_bytes());
        put(52, &self.max_write_zeroes_seg.to_le_bytes());
        put(56, &[u8::from(self.write_zeroes_may_unmap)]);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::read_config_space as read_space;

    fn config() -> BlockConfig {
        BlockConfig {
            capacity: 0x1122_3344_5566_7788,
            size_max: 1 << 20,
            seg_max: 254,
            blk_size: 4096,
            physical_block_exp: 0,
            num_queues: 4,
            max_discard_sectors: 0x3fff_ffff,
            max_discard_seg: 1,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 0x3fff_ffff,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: true,
        }
    }

    #[test]
    fn config_space_fields_sit_at_their_spec_offsets() {
        let b = config().bytes();
        assert_eq!(&b[0..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[8..12], &(1u32 << 20).to_le_bytes());
        assert_eq!(&b[12..16], &254u32.to_le_bytes());
        assert_eq!(&b[20..24], &4096u32.to_le_bytes());
        assert_eq!(&b[34..36], &4u16.to_le_bytes());
        assert_eq!(&b[44..48], &8u32.to_le_bytes());
        assert_eq!(b[56], 1);
    }

    #[test]
    fn reads_past_the_end_are_zero_and_partial_reads_work() {
        let b = config().bytes();
        let mut d = [0xffu8; 4];
        read_space(&b, 58, &mut d);
        assert_eq!(d, [0, 0, 0, 0]);
        read_space(&b, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
        let mut cap_hi = [0u8; 4];
        read_space(&b, 4, &mut cap_hi);
        assert_eq!(cap_hi, 0x1122_3344u32.to_le_bytes());
    }
}
