//! i8042 keyboard controller: enough of it for a kernel to probe it and to reset the
//! machine through it (command 0xFE, or clearing bit 0 of the output port). No keyboard
//! input is generated; keyboard commands are acknowledged so drivers do not wait.
//!
//! `vm-superio` has an i8042, but it cannot report its state for snapshots; this one can.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::{BusDevice, ExitRequest, IrqLine, SharedExitHandle};

const OFS_DATA: u64 = 0;
const OFS_STATUS: u64 = 4;

const SB_OUT_FULL: u8 = 0x01;
const SB_SYS: u8 = 0x04;
const SB_CMD: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT: u8 = 0xc0;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;

const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
const OUTP_RESET_LINE: u8 = 0x01;
const MAX_QUEUED: usize = 16;

/// The controller's registers, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Status register.
    pub status: u8,
    /// Controller configuration byte.
    pub control: u8,
    /// Output port.
    pub outp: u8,
    /// Command waiting for its data byte (0x60, 0xd1 or a keyboard command).
    pub pending: Option<u8>,
    /// Bytes waiting to be read from the data port.
    pub queue: Vec<u8>,
}

impl Default for I8042State {
    fn default() -> Self {
        Self {
            status: SB_SYS | SB_KBD_ENABLED,
            control: CTR_KBD_INT | CTR_SYS | CTR_XLATE,
            outp: OUTP_RESET_LINE,
            pending: None,
            queue: Vec::new(),
        }
    }
}

/// The i8042 controller at ports 0x60 (data) and 0x64 (command/status).
pub struct I8042 {
    state: I8042State,
    queue: VecDeque<u8>,
    irq: Option<IrqLine>,
    exit: SharedExitHandle,
}

impl I8042 {
    /// A controller after power-on self test. `irq` is IRQ 1 when interrupts are wired.
    pub fn new(exit: SharedExitHandle, irq: Option<IrqLine>) -> Self {
        Self::from_state(&I8042State::default(), exit, irq)
    }

    /// A controller rebuilt from `state` (extra queued bytes beyond its capacity are dropped).
    pub fn from_state(state: &I8042State, exit: SharedExitHandle, irq: Option<IrqLine>) -> Self {
        let queue = state.queue.iter().copied().take(MAX_QUEUED).collect();
        Self {
            state: I8042State {
                queue: Vec::new(),
                ..state.clone()
            },
            queue,
            irq,
            exit,
        }
    }

    /// The controller's state.
    pub fn state(&self) -> I8042State {
        I8042State {
            queue: self.queue.iter().copied().collect(),
            ..self.state.clone()
        }
    }

    fn push(&mut self, byte: u8) {
        if self.queue.len() < MAX_QUEUED {
            self.queue.push_back(byte);
        }
        self.state.status |= SB_OUT_FULL;
        if self.state.control & CTR_KBD_INT != 0 {
            if let Some(irq) = &self.irq {
                let _ = vm_superio::Trigger::trigger(irq);
            }
        }
    }

    fn pop(&mut self) -> u8 {
        let byte = self.queue.pop_front().unwrap_or(0);
        if self.queue.is_empty() {
            self.state.status &= !SB_OUT_FULL;
        }
        byte
    }

    fn command(&mut self, cmd: u8) {
        self.state.status |= SB_CMD;
        match cmd {
            CMD_READ_CTR => self.push(self.state.control),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.state.pending = Some(cmd),
            CMD_AUX_DISABLE => self.state.control |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.state.control &= !CTR_AUX_DISABLE,
            // No auxiliary device: report a clock line stuck low.
            CMD_AUX_TEST => self.push(0x01),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            CMD_KBD_DISABLE => self.state.control |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.state.control &= !CTR_KBD_DISABLE,
            CMD_READ_INPUT => self.push(0x00),
            CMD_READ_OUTP => self.push(self.state.outp),
            CMD_PULSE_RESET => self.exit.request(ExitRequest::Reset),
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.state.status &= !SB_CMD;
        match self.state.pending.take() {
            Some(CMD_WRITE_CTR) => {
                self.state.control = byte;
                self.state.status = (self.state.status & !SB_SYS) | (byte & CTR_SYS);
            }
            Some(CMD_WRITE_OUTP) => {
                self.state.outp = byte;
                if byte & OUTP_RESET_LINE == 0 {
                    self.exit.request(ExitRequest::Reset);
                }
            }
            // Second byte of a two-byte keyboard command (LEDs, typematic rate, scan set).
            Some(_) => self.push(KBD_ACK),
            None => self.keyboard(byte),
        }
    }

    fn keyboard(&mut self, cmd: u8) {
        match cmd {
            // Set LEDs, set typematic rate, scan code set: ACK now and after the argument.
            0xed | 0xf3 | 0xf0 => {
                self.push(KBD_ACK);
                self.state.pending = Some(cmd);
            }
            // Identify: a standard MF2 keyboard.
            0xf2 => {
                self.push(KBD_ACK);
                self.push(0xab);
                self.push(0x83);
            }
            // Reset: ACK, then basic assurance test passed.
            0xff => {
                self.push(KBD_ACK);
                self.push(KBD_BAT_OK);
            }
            _ => self.push(KBD_ACK),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = match offset {
            OFS_DATA => self.pop(),
            OFS_STATUS => self.state.status,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            OFS_DATA => self.data(byte),
            OFS_STATUS => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::test_util::Exits;

    fn dev() -> (I8042, Arc<Exits>) {
        let exits = Arc::new(Exits::default());
        (I8042::new(exits.clone(), None), exits)
    }

    fn rd(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(0x60, off, &mut b);
        b[0]
    }

    #[test]
    fn pulse_reset_requests_a_reset() {
        let (mut d, exits) = dev();
        d.write(0x60, OFS_STATUS, &[CMD_PULSE_RESET]);
        assert_eq!(*exits.0.lock().unwrap(), vec![ExitRequest::Reset]);
    }

    #[test]
    fn clearing_the_reset_line_requests_a_reset() {
        let (mut d, exits) = dev();
        d.write(0x60, OFS_STATUS, &[CMD_WRITE_OUTP]);
        d.write(0x60, OFS_DATA, &[0x02]);
        assert_eq!(*exits.0.lock().unwrap(), vec![ExitRequest::Reset]);
    }

    #[test]
    fn self_test_and_control_byte_round_trip() {
        let (mut d, _) = dev();
        d.write(0x60, OFS_STATUS, &[CMD_SELF_TEST]);
        assert_ne!(rd(&mut d, OFS_STATUS) & SB_OUT_FULL, 0);
        assert_eq!(rd(&mut d, OFS_DATA), 0x55);
        assert_eq!(rd(&mut d, OFS_STATUS) & SB_OUT_FULL, 0);
        d.write(0x60, OFS_STATUS, &[CMD_WRITE_CTR]);
        d.write(0x60, OFS_DATA, &[0x45]);
        d.write(0x60, OFS_STATUS, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, OFS_DATA), 0x45);
    }

    #[test]
    fn keyboard_identify_and_state_round_trip() {
        let (mut d, exits) = dev();
        d.write(0x60, OFS_DATA, &[0xf2]);
        let s = d.state();
        assert_eq!(s.queue, vec![KBD_ACK, 0xab, 0x83]);
        let mut e = I8042::from_state(&s, exits, None);
        assert_eq!(e.state(), s);
        assert_eq!(
            [rd(&mut e, 0), rd(&mut e, 0), rd(&mut e, 0)],
            [KBD_ACK, 0xab, 0x83]
        );
    }

    #[test]
    fn flooding_commands_does_not_grow_the_queue() {
        let (mut d, _) = dev();
        for _ in 0..10_000 {
            d.write(0x60, OFS_DATA, &[0xf2]);
        }
        assert!(d.state().queue.len() <= MAX_QUEUED);
    }
}
