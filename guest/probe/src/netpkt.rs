//! Just enough Ethernet, ARP, IPv4, ICMP and UDP for the `net` check: answer
//! ARP requests for our address and ICMP echo requests to it, ask for a
//! neighbour's MAC, and build UDP frames for the throughput source. Anything
//! malformed is ignored, never trusted.

pub const ETH_HDR: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_LEN: usize = 28;
const MIN_FRAME: usize = 60;
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// What a received frame was, as far as the responder cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An ARP request for our address (answered).
    ArpRequest,
    /// An ICMP echo request to our address (answered).
    Echo,
    /// Anything else (ignored).
    Other,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(out: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    out[..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    put16(out, 12, ethertype);
}

/// An ARP packet (request `op` 1 or reply 2) in `out`; returns the frame length.
pub fn arp(
    out: &mut [u8],
    op: u16,
    mac: [u8; 6],
    ip: [u8; 4],
    dst_mac: [u8; 6],
    target_mac: [u8; 6],
    target_ip: [u8; 4],
) -> usize {
    out[..MIN_FRAME].fill(0);
    eth(out, dst_mac, mac, ETHERTYPE_ARP);
    let a = &mut out[ETH_HDR..ETH_HDR + ARP_LEN];
    a[..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 0]);
    put16(a, 6, op);
    a[8..14].copy_from_slice(&mac);
    a[14..18].copy_from_slice(&ip);
    a[18..24].copy_from_slice(&target_mac);
    a[24..28].copy_from_slice(&target_ip);
    MIN_FRAME
}

/// The ARP fields that matter: (op, sender mac, sender ip, target ip).
type ArpFields = (u16, [u8; 6], [u8; 4], [u8; 4]);

/// The ARP fields of an Ethernet/IPv4 ARP frame.
fn parse_arp(frame: &[u8]) -> Option<ArpFields> {
    let a = frame.get(ETH_HDR..ETH_HDR + ARP_LEN)?;
    if be16(frame, 12) != ETHERTYPE_ARP || a[..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    Some((be16(a, 6), a[8..14].try_into().ok()?, a[14..18].try_into().ok()?, a[24..28].try_into().ok()?))
}

/// The MAC of `ip` if `frame` is an ARP reply (or request) from it.
pub fn arp_sender_mac(frame: &[u8], ip: [u8; 4]) -> Option<[u8; 6]> {
    let (_, mac, sender_ip, _) = parse_arp(frame)?;
    (sender_ip == ip).then_some(mac)
}

/// Classifies `frame` and, for an ARP request or echo request to `ip`,
/// writes the answer into `out`. Returns the kind and the answer's length.
pub fn answer(frame: &[u8], mac: [u8; 6], ip: [u8; 4], out: &mut [u8]) -> (Kind, usize) {
    if let Some((op, sender_mac, sender_ip, target_ip)) = parse_arp(frame) {
        if op == 1 && target_ip == ip && out.len() >= MIN_FRAME {
            return (Kind::ArpRequest, arp(out, 2, mac, ip, sender_mac, sender_mac, sender_ip));
        }
        return (Kind::Other, 0);
    }
    match echo_reply(frame, mac, ip, out) {
        Some(n) => (Kind::Echo, n),
        None => (Kind::Other, 0),
    }
}

/// The reply to an ICMP echo request to `ip`, if `frame` is a well-formed one.
fn echo_reply(frame: &[u8], mac: [u8; 6], ip: [u8; 4], out: &mut [u8]) -> Option<usize> {
    if frame.len() < ETH_HDR + 20 || be16(frame, 12) != ETHERTYPE_IPV4 {
        return None;
    }
    let iph = &frame[ETH_HDR..];
    let ihl = usize::from(iph[0] & 0xf) * 4;
    let total = usize::from(be16(iph, 2));
    let fragmented = be16(iph, 6) & 0x3fff != 0;
    if iph[0] >> 4 != 4 || ihl < 20 || total < ihl + 8 || total > iph.len() || fragmented || iph[9] != 1 {
        return None;
    }
    if iph[16..20] != ip || checksum(&iph[..ihl]) != 0 {
        return None;
    }
    let icmp = &iph[ihl..total];
    if icmp[0] != 8 || icmp[1] != 0 || checksum(icmp) != 0 {
        return None;
    }
    let len = ETH_HDR + total;
    if out.len() < len.max(MIN_FRAME) {
        return None;
    }
    out[..len.max(MIN_FRAME)].fill(0);
    eth(out, frame[6..12].try_into().ok()?, mac, ETHERTYPE_IPV4);
    let o = &mut out[ETH_HDR..len];
    o[..ihl].copy_from_slice(&iph[..ihl]);
    o[8] = 64;
    o[10..12].fill(0);
    o[12..16].copy_from_slice(&ip);
    o[16..20].copy_from_slice(&iph[12..16]);
    let c = checksum(&o[..ihl]);
    put16(o, 10, c);
    o[ihl..].copy_from_slice(icmp);
    o[ihl] = 0;
    o[ihl + 2..ihl + 4].fill(0);
    let c = checksum(&o[ihl..]);
    put16(o, ihl + 2, c);
    Some(len.max(MIN_FRAME))
}

/// A UDP/IPv4 frame of `size` bytes (Ethernet header included, at least 60)
/// whose payload starts with `seq`; returns its length. UDP checksum 0 (none).
#[allow(clippy::too_many_arguments)]
pub fn udp(
    out: &mut [u8],
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    port: u16,
    size: usize,
    seq: u64,
) -> usize {
    let size = size.clamp(MIN_FRAME, out.len());
    out[..size].fill(0);
    eth(out, dst_mac, src_mac, ETHERTYPE_IPV4);
    let ip_len = size - ETH_HDR;
    let o = &mut out[ETH_HDR..size];
    o[0] = 0x45;
    put16(o, 2, u16::try_from(ip_len).unwrap_or(u16::MAX));
    o[8] = 64;
    o[9] = 17;
    o[12..16].copy_from_slice(&src);
    o[16..20].copy_from_slice(&dst);
    let c = checksum(&o[..20]);
    put16(o, 10, c);
    put16(o, 20, port);
    put16(o, 22, port);
    put16(o, 24, u16::try_from(ip_len - 20).unwrap_or(u16::MAX));
    set_udp_seq(&mut out[..size], seq);
    size
}

/// Rewrites the sequence number at the start of a [`udp`] frame's payload.
pub fn set_udp_seq(frame: &mut [u8], seq: u64) {
    if let Some(p) = frame.get_mut(ETH_HDR + 28..ETH_HDR + 36) {
        p.copy_from_slice(&seq.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const IP: [u8; 4] = [10, 0, 2, 15];
    const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const HOST_IP: [u8; 4] = [10, 0, 2, 1];

    fn echo_request(dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HDR + 28 + payload.len()];
        eth(&mut f, MAC, HOST_MAC, ETHERTYPE_IPV4);
        let total = 28 + payload.len();
        let ip = &mut f[ETH_HDR..];
        ip[0] = 0x45;
        put16(ip, 2, total as u16);
        put16(ip, 6, 0x4000); // DF is fine
        ip[8] = 64;
        ip[9] = 1;
        ip[12..16].copy_from_slice(&HOST_IP);
        ip[16..20].copy_from_slice(&dst);
        let c = checksum(&ip[..20]);
        put16(ip, 10, c);
        ip[20] = 8;
        put16(ip, 24, 0x1234);
        put16(ip, 26, 7);
        ip[28..].copy_from_slice(payload);
        let c = checksum(&ip[20..]);
        put16(ip, 22, c);
        f
    }

    #[test]
    fn answers_arp_requests_for_our_address_only() {
        let mut req = [0u8; 64];
        arp(&mut req, 1, HOST_MAC, HOST_IP, BROADCAST, [0; 6], IP);
        let mut out = [0u8; 128];
        let (kind, n) = answer(&req, MAC, IP, &mut out);
        assert_eq!((kind, n), (Kind::ArpRequest, 60));
        assert_eq!(&out[..6], &HOST_MAC);
        assert_eq!(parse_arp(&out[..n]), Some((2, MAC, IP, HOST_IP)));
        assert_eq!(arp_sender_mac(&out[..n], IP), Some(MAC));
        arp(&mut req, 1, HOST_MAC, HOST_IP, BROADCAST, [0; 6], [10, 0, 2, 16]);
        assert_eq!(answer(&req, MAC, IP, &mut out).0, Kind::Other);
    }

    #[test]
    fn answers_echo_requests_with_valid_checksums() {
        let req = echo_request(IP, b"hello probe");
        let mut out = [0u8; 256];
        let (kind, n) = answer(&req, MAC, IP, &mut out);
        assert_eq!(kind, Kind::Echo);
        assert_eq!(n, 60.max(req.len()));
        let ip = &out[ETH_HDR..req.len()];
        assert_eq!(&out[..6], &HOST_MAC);
        assert_eq!(checksum(&ip[..20]), 0);
        assert_eq!((&ip[12..16], &ip[16..20]), (&IP[..], &HOST_IP[..]));
        assert_eq!(ip[20], 0, "echo reply");
        assert_eq!(checksum(&ip[20..]), 0);
        assert_eq!(&ip[24..28], &req[ETH_HDR + 24..ETH_HDR + 28], "id and sequence kept");
        assert_eq!(&ip[28..], b"hello probe");
    }

    #[test]
    fn ignores_malformed_or_foreign_packets() {
        let mut out = [0u8; 256];
        let good = echo_request(IP, b"x");
        assert_eq!(answer(&echo_request([10, 0, 2, 99], b"x"), MAC, IP, &mut out).0, Kind::Other);
        let mut bad_ip_sum = good.clone();
        bad_ip_sum[ETH_HDR + 10] ^= 1;
        assert_eq!(answer(&bad_ip_sum, MAC, IP, &mut out).0, Kind::Other);
        let mut bad_icmp_sum = good.clone();
        bad_icmp_sum[ETH_HDR + 28] ^= 1;
        assert_eq!(answer(&bad_icmp_sum, MAC, IP, &mut out).0, Kind::Other);
        let mut too_long = good.clone();
        put16(&mut too_long[ETH_HDR..], 2, 1000);
        assert_eq!(answer(&too_long, MAC, IP, &mut out).0, Kind::Other);
        for n in 0..good.len() {
            assert_eq!(answer(&good[..n], MAC, IP, &mut out).0, Kind::Other, "truncated to {n}");
        }
        let mut fragment = good.clone();
        put16(&mut fragment[ETH_HDR..], 6, 0x2000);
        assert_eq!(answer(&fragment, MAC, IP, &mut out).0, Kind::Other);
    }

    #[test]
    fn builds_udp_frames_with_a_valid_ip_header() {
        let mut out = [0u8; 2048];
        let n = udp(&mut out, MAC, HOST_MAC, IP, HOST_IP, 9, 1514, 42);
        assert_eq!(n, 1514);
        assert_eq!(checksum(&out[ETH_HDR..ETH_HDR + 20]), 0);
        assert_eq!(be16(&out, ETH_HDR + 2), 1500);
        assert_eq!(be16(&out, ETH_HDR + 24), 1480);
        assert_eq!(&out[ETH_HDR + 28..ETH_HDR + 36], &42u64.to_be_bytes());
        assert_eq!(udp(&mut out, MAC, HOST_MAC, IP, HOST_IP, 9, 10, 0), 60);
    }

    #[test]
    fn checksum_of_odd_lengths() {
        assert_eq!(checksum(&[0x45, 0x00, 0x01]), !0x4600);
        assert_eq!(checksum(&[]), 0xffff);
    }
}
