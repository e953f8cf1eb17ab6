//! MSI-X: the vector table and pending-bit array a device exposes in a BAR, the capability
//! that enables them, and delivery through one irqfd per vector with KVM MSI routes.
//!
//! A vector is live when MSI-X is enabled, the function is not masked and the vector's own
//! mask bit is clear. Its route is (re)programmed when it becomes live with a new message,
//! so a driver that writes an entry while masked and then unmasks it costs one routing
//! update. Triggering a vector that is not live sets its pending bit; the interrupt is
//! delivered when it becomes live.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::PciError;
use crate::hooks::{MsiMessage, MsiRouter};
use crate::warn_ratelimited;

/// PCI capability ID of MSI-X.
pub const CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;
/// Largest table the capability can describe.
pub const MAX_VECTORS: u16 = 2048;

/// One table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    /// The message.
    pub msg: MsiMessage,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        // Vectors come out of reset masked.
        MsixEntry {
            msg: MsiMessage::default(),
            control: VECTOR_MASKED,
        }
    }
}

/// MSI-X state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// The table.
    pub table: Vec<MsixEntry>,
    /// Pending bits, one per vector.
    pub pending: Vec<bool>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_masked: bool,
}

struct Vector {
    irqfd: EventFd,
    gsi: u32,
    /// The message routed to `gsi` now.
    routed: Option<MsiMessage>,
}

/// A device's MSI-X vectors.
pub struct Msix {
    table: Vec<MsixEntry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    vectors: Vec<Vector>,
    router: Arc<dyn MsiRouter>,
}

impl Msix {
    /// `count` vectors, each with an irqfd and a GSI from `router`.
    pub fn new(count: u16, router: Arc<dyn MsiRouter>) -> Result<Self, PciError> {
        if count == 0 || count > MAX_VECTORS {
            return Err(PciError::Msix {
                what: "vector count",
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        let mut vectors = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let irqfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
                PciError::Msix {
                    what: "cannot create an irqfd",
                    source,
                }
            })?;
            let gsi = router.add_vector(&irqfd).map_err(|source| PciError::Msix {
                what: "cannot register an irqfd",
                source,
            })?;
            vectors.push(Vector {
                irqfd,
                gsi,
                routed: None,
            });
        }
        Ok(Msix {
            table: vec![MsixEntry::default(); usize::from(count)],
            pending: vec![false; usize::from(count)],
            enabled: false,
            function_masked: false,
            vectors,
            router,
        })
    }

    /// Number of vectors.
    pub fn count(&self) -> u16 {
        u16::try_from(self.table.len()).unwrap_or(MAX_VECTORS)
    }

    /// Bytes of the table.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * ENTRY_SIZE
    }

    /// Bytes of the pending-bit array (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.table.len().div_ceil(64) as u64 * 8
    }

    /// The capability body (after ID and next pointer) and its writable bits, for a table at
    /// `table_offset` and a PBA at `pba_offset`, both in BAR `bar`.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        body[..2].copy_from_slice(&(self.count() - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar & 7)).to_le_bytes());
        let mut writable = [0u8; 10];
        writable[..2].copy_from_slice(&(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes());
        (body, writable)
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn live(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && self.table[v].control & VECTOR_MASKED == 0
    }

    /// The driver wrote the capability's message control.
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        for v in 0..self.table.len() {
            self.update(v);
        }
    }

    /// Routes vector `v` if it is live and fires what it has pending.
    fn update(&mut self, v: usize) {
        if !self.live(v) {
            return;
        }
        let msg = self.table[v].msg;
        let vec = &mut self.vectors[v];
        if vec.routed != Some(msg) {
            match self.router.set_route(vec.gsi, msg) {
                Ok(()) => vec.routed = Some(msg),
                Err(e) => {
                    warn_ratelimited!("msix: cannot route vector {v} (GSI {}): {e}", vec.gsi);
                    return;
                }
            }
        }
        if std::mem::take(&mut self.pending[v]) {
            let _ = vec.irqfd.write(1);
        }
    }

    /// A read of the table; `offset` is from the table's start.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some((v, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = &self.table[v];
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&e.msg.addr_lo.to_le_bytes());
        raw[4..8].copy_from_slice(&e.msg.addr_hi.to_le_bytes());
        raw[8..12].copy_from_slice(&e.msg.data.to_le_bytes());
        raw[12..16].copy_from_slice(&e.control.to_le_bytes());
        data.copy_from_slice(&raw[field..field + data.len()]);
    }

    /// A write of the table.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((v, field)) = self.locate(offset, data.len()) else {
            warn_ratelimited!(
                "msix: ignoring a {}-byte table write at {offset:#x}",
                data.len()
            );
            return;
        };
        let e = &mut self.table[v];
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&e.msg.addr_lo.to_le_bytes());
        raw[4..8].copy_from_slice(&e.msg.addr_hi.to_le_bytes());
        raw[8..12].copy_from_slice(&e.msg.data.to_le_bytes());
        raw[12..16].copy_from_slice(&e.control.to_le_bytes());
        raw[field..field + data.len()].copy_from_slice(data);
        let word = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        e.msg = MsiMessage {
            addr_lo: word(0),
            addr_hi: word(4),
            data: word(8),
        };
        // Only the mask bit of vector control is defined.
        e.control = word(12) & VECTOR_MASKED;
        self.update(v);
    }

    /// (vector, byte within the entry) for a 4- or 8-byte aligned access.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        let v = usize::try_from(offset / ENTRY_SIZE).ok()?;
        (v < self.table.len()).then_some((v, usize::try_from(offset % ENTRY_SIZE).ok()?))
    }

    /// A read of the pending-bit array; writes to it are ignored.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            data.fill(0xff);
            return;
        }
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        for (i, byte) in data.iter_mut().enumerate() {
            for bit in 0..8 {
                let v = (start + i) * 8 + bit;
                if self.pending.get(v).copied().unwrap_or(false) {
                    *byte |= 1 << bit;
                }
            }
        }
    }

    /// Delivers vector `v`, or marks it pending while it is masked. Returns false when MSI-X
    /// is disabled (the caller may use another interrupt path).
    pub fn trigger(&mut self, v: u16) -> bool {
        let v = usize::from(v);
        if !self.enabled {
            return false;
        }
        if v >= self.table.len() {
            return true;
        }
        if self.live(v) && self.vectors[v].routed.is_some() {
            if let Err(e) = self.vectors[v].irqfd.write(1) {
                warn_ratelimited!("msix: cannot signal vector {v}: {e}");
            }
        } else {
            self.pending[v] = true;
        }
        true
    }

    /// The state.
    pub fn state(&self) -> MsixState {
        MsixState {
            table: self.table.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Restores [`Msix::state`] and routes the live vectors.
    pub fn restore(&mut self, s: &MsixState) -> Result<(), PciError> {
        if s.table.len() != self.table.len() || s.pending.len() != self.pending.len() {
            return Err(PciError::BadState(format!(
                "{} MSI-X vectors saved, the device has {}",
                s.table.len(),
                self.table.len()
            )));
        }
        self.table.clone_from(&s.table);
        self.pending.clone_from(&s.pending);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        for v in 0..self.table.len() {
            self.update(v);
        }
        Ok(())
    }

    /// The irqfd of vector `v` (tests and diagnostics).
    pub fn irqfd(&self, v: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(v)).map(|x| &x.irqfd)
    }
}

impl Drop for Msix {
    fn drop(&mut self) {
        for v in &self.vectors {
            let _ = self.router.remove_vector(v.gsi, &v.irqfd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::testing::Recorder;

    fn msix(n: u16) -> (Msix, Arc<Recorder>) {
        let r = Arc::new(Recorder::default());
        (Msix::new(n, r.clone()).unwrap(), r)
    }

    fn fired(m: &Msix, v: u16) -> bool {
        m.irqfd(v).unwrap().read().is_ok()
    }

    fn program(m: &mut Msix, v: u64, data: u32, masked: bool) {
        m.write_table(v * 16, &0xfee0_0000u32.to_le_bytes());
        m.write_table(v * 16 + 4, &0u32.to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
        m.write_table(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn vectors_start_masked_and_disabled() {
        let (mut m, _) = msix(3);
        let mut b = [0u8; 4];
        m.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        assert!(!m.trigger(0), "disabled: the caller falls back");
    }

    #[test]
    fn masked_vector_is_pending_and_fires_on_unmask() {
        let (mut m, r) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 1, 0x41, true);
        assert_eq!(*r.route_calls.lock().unwrap(), 0, "no route while masked");
        assert!(m.trigger(1));
        assert!(!fired(&m, 1));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert!(fired(&m, 1), "pending vector fires when unmasked");
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert_eq!(
            r.routes.lock().unwrap()[&25],
            Some(MsiMessage {
                addr_lo: 0xfee0_0000,
                addr_hi: 0,
                data: 0x41
            })
        );
        assert!(m.trigger(1));
        assert!(fired(&m, 1));
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let (mut m, _) = msix(2);
        program(&mut m, 0, 0x30, false);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(m.trigger(0));
        assert!(!fired(&m, 0));
        m.set_control(CONTROL_ENABLE);
        assert!(fired(&m, 0));
    }

    fn pba(m: &Msix) -> u8 {
        let mut b = [0u8; 8];
        m.read_pba(0, &mut b);
        b[0]
    }

    #[test]
    fn function_mask_sets_the_pba_and_coalesces_until_cleared() {
        let (mut m, _) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 1, 0x43, false);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(m.trigger(1));
        assert!(!fired(&m, 1), "routed, but the function is masked");
        assert_eq!(pba(&m), 0b10);
        assert!(m.trigger(1));
        assert_eq!(pba(&m), 0b10, "a second message stays pending");
        let mut c = [0u8; 4];
        m.read_table(16 + 12, &mut c);
        assert_eq!(
            u32::from_le_bytes(c),
            0,
            "the vector's own mask bit is untouched"
        );
        m.set_control(CONTROL_ENABLE);
        assert_eq!(
            m.irqfd(1).unwrap().read().unwrap(),
            1,
            "one message for both: MSI-X coalesces per vector"
        );
        assert_eq!(pba(&m), 0);
        assert!(!fired(&m, 0), "vector 0 had nothing pending");
    }

    #[test]
    fn clearing_the_function_mask_leaves_masked_vectors_pending() {
        let (mut m, _) = msix(1);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut m, 0, 0x44, true);
        assert!(m.trigger(0));
        m.set_control(CONTROL_ENABLE);
        assert!(!fired(&m, 0));
        assert_eq!(pba(&m), 1);
        m.write_table(12, &0u32.to_le_bytes());
        assert!(fired(&m, 0));
        assert_eq!(pba(&m), 0);
    }

    #[test]
    fn a_new_message_on_a_live_vector_is_rerouted_once() {
        let (mut m, r) = msix(1);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0x30, false);
        let calls = *r.route_calls.lock().unwrap();
        m.write_table(8, &0x31u32.to_le_bytes());
        assert_eq!(*r.route_calls.lock().unwrap(), calls + 1);
        m.write_table(8, &0x31u32.to_le_bytes());
        assert_eq!(
            *r.route_calls.lock().unwrap(),
            calls + 1,
            "same message, no ioctl"
        );
    }

    #[test]
    fn garbage_table_accesses_are_ignored() {
        let (mut m, _) = msix(2);
        m.write_table(1, &[1, 2, 3, 4]);
        m.write_table(4, &[1, 2]);
        m.write_table(32, &[0; 4]);
        m.write_table(u64::MAX - 3, &[0; 4]);
        let mut b = [0u8; 2];
        m.read_table(0, &mut b);
        assert_eq!(b, [0xff; 2]);
        let mut q = [0u8; 8];
        m.read_table(8, &mut q);
        assert_eq!(
            q,
            [0, 0, 0, 0, 1, 0, 0, 0],
            "qword read of data and control"
        );
        assert!(
            m.trigger(7) || !m.enabled(),
            "a vector past the table is dropped"
        );
        // Reserved vector-control bits do not stick.
        m.write_table(12, &0xffff_fffeu32.to_le_bytes());
        let mut c = [0u8; 4];
        m.read_table(12, &mut c);
        assert_eq!(u32::from_le_bytes(c), 0);
    }

    #[test]
    fn state_round_trips_and_routes_live_vectors() {
        let (mut m, _) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0x50, false);
        program(&mut m, 1, 0x51, true);
        m.trigger(1);
        let json = serde_json::to_string(&m.state()).unwrap();
        let s: MsixState = serde_json::from_str(&json).unwrap();
        assert_eq!(s, m.state());

        let (mut n, r) = msix(2);
        n.restore(&s).unwrap();
        assert_eq!(n.state(), s);
        assert_eq!(r.routes.lock().unwrap()[&24].unwrap().data, 0x50);
        assert_eq!(
            r.routes.lock().unwrap()[&25],
            None,
            "masked: not routed yet"
        );
        let (mut small, _) = msix(1);
        assert!(small.restore(&s).is_err());
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let (m, _) = msix(3);
        let (body, wmask) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 2);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x5000);
        assert_eq!(u16::from_le_bytes([wmask[0], wmask[1]]), 0xc000);
        assert_eq!(m.pba_size(), 8);
    }
}
