//! 16550A UART (COM1) on top of `vm-superio`, with its state as plain data.

use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::{warn_ratelimited, BusDevice, IrqLine};

/// Tells the VMM when the guest has drained the receive FIFO, so it can feed more input.
#[derive(Clone, Debug)]
pub struct InputDrained(Option<Arc<EventFd>>);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(evt) = &self.0 {
            let _ = evt.write(1);
        }
    }
}

/// The serial port's registers, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialPortState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialPortState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialPortState> for SerialState {
    fn from(s: &SerialPortState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Where guest output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// Errors restoring a serial port.
#[derive(Debug, thiserror::Error)]
#[error("invalid serial port state: {0}")]
pub struct SerialStateError(String);

/// A 16550A UART.
pub struct SerialPort {
    uart: Serial<IrqLine, InputDrained, SerialOut>,
}

impl SerialPort {
    /// A port in its reset state writing guest output to `out`. `drained`, when given, is
    /// signalled each time the guest empties the receive FIFO.
    pub fn new(irq: IrqLine, drained: Option<Arc<EventFd>>, out: SerialOut) -> Self {
        Self {
            uart: Serial::with_events(irq, InputDrained(drained), out),
        }
    }

    /// A port rebuilt from `state`.
    pub fn from_state(
        state: &SerialPortState,
        irq: IrqLine,
        drained: Option<Arc<EventFd>>,
        out: SerialOut,
    ) -> Result<Self, SerialStateError> {
        Serial::from_state(&state.into(), irq, InputDrained(drained), out)
            .map(|uart| Self { uart })
            .map_err(|e| SerialStateError(format!("{e:?}")))
    }

    /// The port's state.
    pub fn state(&self) -> SerialPortState {
        self.uart.state().into()
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                warn_ratelimited!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, b) in (offset..).zip(data.iter_mut()) {
            *b = u8::try_from(i).map_or(0xff, |off| self.uart.read(off));
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        for (i, b) in (offset..).zip(data) {
            let Ok(off) = u8::try_from(i) else { return };
            if let Err(e) = self.uart.write(off, *b) {
                warn_ratelimited!("serial: write to register {off} failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn port(out: Capture) -> SerialPort {
        SerialPort::new(IrqLine::new(EventFd::new(0).unwrap()), None, Box::new(out))
    }

    #[test]
    fn guest_bytes_reach_the_output() {
        let out = Capture::default();
        let mut p = port(out.clone());
        for b in b"hi\n" {
            p.write(0x3f8, 0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_is_read_back_and_capacity_is_bounded() {
        let mut p = port(Capture::default());
        let cap = p.input_capacity();
        assert_eq!(p.enqueue_input(&vec![b'x'; cap + 10]), cap);
        assert_eq!(p.enqueue_input(b"y"), 0);
        let mut b = [0u8];
        p.read(0x3f8, 0, &mut b);
        assert_eq!(b[0], b'x');
    }

    #[test]
    fn state_round_trips() {
        let mut p = port(Capture::default());
        p.write(0x3f8, 3, &[0x83]); // DLAB + 8N1
        p.write(0x3f8, 0, &[0x01]);
        p.write(0x3f8, 7, &[0x5a]);
        p.enqueue_input(b"abc");
        let s = p.state();
        let q = SerialPort::from_state(
            &s,
            IrqLine::new(EventFd::new(0).unwrap()),
            None,
            Box::new(Capture::default()),
        )
        .unwrap();
        assert_eq!(q.state(), s);
        assert_eq!(s.scratch, 0x5a);
        assert_eq!(s.in_buffer, b"abc");
    }
}
