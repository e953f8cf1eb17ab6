//! virtio-net feature bits, configuration space (virtio 1.2, section 5.1.4) and the tap
//! offloads that follow from negotiated features.

use virtio_bindings::virtio_net as vn;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// The device handles packets with partial checksums (guest → host).
pub(crate) const F_CSUM: u64 = bit(vn::VIRTIO_NET_F_CSUM);
/// The driver handles packets with partial checksums (host → guest).
pub(crate) const F_GUEST_CSUM: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
/// MAC address in the configuration space.
pub(crate) const F_MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
/// The driver takes TSO over IPv4.
pub(crate) const F_GUEST_TSO4: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
/// The driver takes TSO over IPv6.
pub(crate) const F_GUEST_TSO6: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
/// The driver takes TSO with ECN.
pub(crate) const F_GUEST_ECN: u64 = bit(vn::VIRTIO_NET_F_GUEST_ECN);
/// The device takes TSO over IPv4.
pub(crate) const F_HOST_TSO4: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO4);
/// The device takes TSO over IPv6.
pub(crate) const F_HOST_TSO6: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO6);
/// The device takes TSO with ECN.
pub(crate) const F_HOST_ECN: u64 = bit(vn::VIRTIO_NET_F_HOST_ECN);
/// Received frames may span several buffers.
pub(crate) const F_MRG_RXBUF: u64 = bit(vn::VIRTIO_NET_F_MRG_RXBUF);
/// Link status in the configuration space.
pub(crate) const F_STATUS: u64 = bit(vn::VIRTIO_NET_F_STATUS);
/// A control queue.
pub(crate) const F_CTRL_VQ: u64 = bit(vn::VIRTIO_NET_F_CTRL_VQ);
/// Several queue pairs.
pub(crate) const F_MQ: u64 = bit(vn::VIRTIO_NET_F_MQ);

/// Bytes of configuration space served: mac, status, max_virtqueue_pairs.
pub(crate) const CONFIG_LEN: usize = 10;

/// The configuration space.
pub(crate) fn config_bytes(mac: [u8; 6], pairs: u16) -> [u8; CONFIG_LEN] {
    let mut b = [0u8; CONFIG_LEN];
    b[..6].copy_from_slice(&mac);
    // The link is always up: the tap is there for the device's whole life.
    b[6..8].copy_from_slice(&1u16.to_le_bytes());
    b[8..10].copy_from_slice(&pairs.to_le_bytes());
    b
}

/// The `TUN_F_*` offloads the tap may use towards a driver that accepted `features`.
pub(crate) fn tap_offloads(features: u64) -> u32 {
    if features & F_GUEST_CSUM == 0 {
        // Without checksum offload nothing else applies: the kernel completes every packet.
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    if features & F_GUEST_TSO4 != 0 {
        f |= libc::TUN_F_TSO4;
    }
    if features & F_GUEST_TSO6 != 0 {
        f |= libc::TUN_F_TSO6;
    }
    if features & F_GUEST_ECN != 0 && features & (F_GUEST_TSO4 | F_GUEST_TSO6) != 0 {
        f |= libc::TUN_F_TSO_ECN;
    }
    f
}

/// Whether the driver can receive TSO frames (which need 64 KiB of buffers).
pub(crate) fn guest_takes_big_frames(features: u64) -> bool {
    features & (F_GUEST_TSO4 | F_GUEST_TSO6) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_the_guest_features() {
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(tap_offloads(F_GUEST_TSO4), 0, "TSO needs checksum offload");
        assert_eq!(tap_offloads(F_GUEST_CSUM), libc::TUN_F_CSUM);
        assert_eq!(
            tap_offloads(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
    }

    #[test]
    fn config_space_has_mac_link_and_pairs() {
        let b = config_bytes([2, 0, 0, 1, 2, 3], 4);
        assert_eq!(&b[..6], &[2, 0, 0, 1, 2, 3]);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), 1);
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), 4);
    }
}
