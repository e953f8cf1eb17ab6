//! ACPI fixed-hardware power management block: PM1a event (status, enable), PM1a control,
//! and the FADT reset register. Writing SLP_TYP=S5 with SLP_EN powers the VM off; writing the
//! reset value to the reset register resets it.

use serde::{Deserialize, Serialize};

use crate::{warn_ratelimited, BusDevice, ExitRequest, SharedExitHandle};

const OFS_STATUS: u64 = 0;
const OFS_ENABLE: u64 = 2;
const OFS_CONTROL: u64 = 4;
const OFS_RESET: u64 = 8;

const CNT_SCI_EN: u16 = 1 << 0;
const CNT_SLP_EN: u16 = 1 << 13;
const CNT_SLP_TYP_SHIFT: u16 = 10;

/// Register values, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    /// PM1 status.
    pub status: u16,
    /// PM1 enable.
    pub enable: u16,
    /// PM1 control (SLP_EN is write-only and never stored).
    pub control: u16,
}

/// The PM block at `layout::acpi_ports::BLOCK_START`.
pub struct AcpiPm {
    state: AcpiPmState,
    slp_typ_s5: u8,
    reset_value: u8,
    exit: SharedExitHandle,
}

impl AcpiPm {
    /// A block whose `\_S5` sleep type is `slp_typ_s5` and whose reset register takes
    /// `reset_value`.
    pub fn new(exit: SharedExitHandle, slp_typ_s5: u8, reset_value: u8) -> Self {
        let state = AcpiPmState {
            control: CNT_SCI_EN,
            ..Default::default()
        };
        Self::from_state(&state, exit, slp_typ_s5, reset_value)
    }

    /// A block rebuilt from `state`.
    pub fn from_state(
        state: &AcpiPmState,
        exit: SharedExitHandle,
        slp_typ_s5: u8,
        reset_value: u8,
    ) -> Self {
        Self {
            state: state.clone(),
            slp_typ_s5,
            reset_value,
            exit,
        }
    }

    /// The block's state.
    pub fn state(&self) -> AcpiPmState {
        self.state.clone()
    }

    fn write_control(&mut self, v: u16) {
        self.state.control = v & !CNT_SLP_EN;
        if v & CNT_SLP_EN == 0 {
            return;
        }
        let typ = (v >> CNT_SLP_TYP_SHIFT) & 0x7;
        if typ == u16::from(self.slp_typ_s5) {
            self.exit.request(ExitRequest::PowerOff);
        } else {
            warn_ratelimited!(
                "ACPI: guest asked for sleep type {typ}; only S5 (soft-off) is supported"
            );
        }
    }

    fn reg16(&self, offset: u64) -> u16 {
        match offset & !1 {
            OFS_STATUS => self.state.status,
            OFS_ENABLE => self.state.enable,
            OFS_CONTROL => self.state.control,
            _ => 0,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (off, b) in (offset..).zip(data.iter_mut()) {
            let bytes = self.reg16(off).to_le_bytes();
            *b = bytes[usize::from(off & 1 == 1)];
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        // Gather the write into whole 16-bit registers so a word write to PM1_CNT is seen as
        // one value, and a byte write updates only its half.
        let mut off = offset;
        let mut rest = data;
        while let Some((&first, tail)) = rest.split_first() {
            if off == OFS_RESET {
                if first == self.reset_value {
                    self.exit.request(ExitRequest::Reset);
                }
                off += 1;
                rest = tail;
                continue;
            }
            let reg = off & !1;
            let mut bytes = self.reg16(reg).to_le_bytes();
            let mut used = 0;
            for (i, b) in rest.iter().enumerate().take(2) {
                let pos = off + i as u64;
                if pos & !1 != reg {
                    break;
                }
                bytes[usize::from(pos & 1 == 1)] = *b;
                used += 1;
            }
            let v = u16::from_le_bytes(bytes);
            match reg {
                // Status bits are write-one-to-clear.
                OFS_STATUS => self.state.status &= !v,
                OFS_ENABLE => self.state.enable = v,
                OFS_CONTROL => self.write_control(v),
                _ => {}
            }
            off += used as u64;
            rest = &rest[used..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::test_util::Exits;

    fn dev() -> (AcpiPm, Arc<Exits>) {
        let e = Arc::new(Exits::default());
        (AcpiPm::new(e.clone(), 5, 1), e)
    }

    #[test]
    fn s5_word_write_powers_off() {
        let (mut d, e) = dev();
        d.write(
            0x600,
            OFS_CONTROL,
            &((5u16 << 10) | CNT_SLP_EN).to_le_bytes(),
        );
        assert_eq!(*e.0.lock().unwrap(), vec![ExitRequest::PowerOff]);
    }

    #[test]
    fn s5_as_two_byte_writes_powers_off_on_the_high_byte() {
        let (mut d, e) = dev();
        let v = ((5u16 << 10) | CNT_SLP_EN | CNT_SCI_EN).to_le_bytes();
        d.write(0x600, OFS_CONTROL, &v[..1]);
        assert!(e.0.lock().unwrap().is_empty());
        d.write(0x600, OFS_CONTROL + 1, &v[1..]);
        assert_eq!(*e.0.lock().unwrap(), vec![ExitRequest::PowerOff]);
    }

    #[test]
    fn other_sleep_states_do_nothing() {
        let (mut d, e) = dev();
        d.write(
            0x600,
            OFS_CONTROL,
            &((3u16 << 10) | CNT_SLP_EN).to_le_bytes(),
        );
        assert!(e.0.lock().unwrap().is_empty());
        let mut b = [0u8; 2];
        d.read(0x600, OFS_CONTROL, &mut b);
        assert_eq!(
            u16::from_le_bytes(b) & CNT_SLP_EN,
            0,
            "SLP_EN reads as zero"
        );
    }

    #[test]
    fn reset_register_and_status_w1c() {
        let (mut d, e) = dev();
        d.write(0x600, OFS_RESET, &[0]);
        assert!(e.0.lock().unwrap().is_empty());
        d.write(0x600, OFS_RESET, &[1]);
        assert_eq!(*e.0.lock().unwrap(), vec![ExitRequest::Reset]);
        let mut s = AcpiPmState {
            status: 0x0101,
            ..Default::default()
        };
        let mut d = AcpiPm::from_state(&s, e, 5, 1);
        d.write(0x600, OFS_STATUS, &[0x01, 0x00]);
        s.status = 0x0100;
        assert_eq!(d.state(), s);
    }

    #[test]
    fn dword_read_spans_status_and_enable() {
        let (mut d, e) = dev();
        let _ = e;
        d.write(0x600, OFS_ENABLE, &[0x21, 0x01]);
        let mut b = [0u8; 4];
        d.read(0x600, OFS_STATUS, &mut b);
        assert_eq!(b, [0, 0, 0x21, 0x01]);
    }
}
