//! COM1 (8250 UART) wrapped around vm-superio's `Serial`: guest output goes to a writer
//! (stdout for the CLI) flushed after every byte so a partial line such as a shell prompt
//! appears at once; host input is queued into the receive FIFO.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use crate::devices::bus::BusDevice;
use crate::devices::EventFdTrigger;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// A writer that flushes after every write.
#[derive(Debug)]
pub struct Flushing<W: Write>(pub W);

impl<W: Write> Write for Flushing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// What Linux prints when it panics (kernel/panic.c), whatever it does next.
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";
/// Longest console line kept for matching; longer lines are matched on their first bytes.
const MAX_LINE: usize = 256;

/// Passes console bytes through and notices a Linux panic line. A panicking Linux with `panic=N`
/// resets the machine, which alone would look like a clean reboot.
#[derive(Debug)]
pub struct PanicWatch<W: Write> {
    inner: W,
    line: Vec<u8>,
    seen: Arc<AtomicBool>,
}

impl<W: Write> PanicWatch<W> {
    pub fn new(inner: W, seen: Arc<AtomicBool>) -> Self {
        PanicWatch { inner, line: Vec::with_capacity(MAX_LINE), seen }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' {
                self.line.clear();
                continue;
            }
            if self.line.len() < MAX_LINE {
                self.line.push(b);
                if self.line.ends_with(PANIC_MARKER) {
                    self.seen.store(true, Ordering::SeqCst);
                }
            }
        }
    }
}

impl<W: Write> Write for PanicWatch<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.scan(buf);
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The UART's registers and receive FIFO, as a snapshot keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSaved {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The guest's serial console.
pub struct SerialConsole {
    serial: Serial<EventFdTrigger, NoEvents, Flushing<PanicWatch<Box<dyn Write + Send>>>>,
    /// Writes the guest made that failed (host side gone) or input bytes dropped (FIFO full).
    pub errors: AtomicU64,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").field("errors", &self.errors).finish()
    }
}

impl SerialConsole {
    /// A console writing to `out`; `panic_seen` is set when the guest prints a kernel panic.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>, panic_seen: Arc<AtomicBool>) -> Self {
        SerialConsole {
            serial: Serial::new(irq, Flushing(PanicWatch::new(out, panic_seen))),
            errors: AtomicU64::new(0),
        }
    }

    /// A console continuing from `saved`; an invalid state (FIFO over its size) is an error.
    pub fn restore(
        irq: EventFdTrigger,
        out: Box<dyn Write + Send>,
        panic_seen: Arc<AtomicBool>,
        saved: &SerialSaved,
    ) -> Result<Self, String> {
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, irq, NoEvents, Flushing(PanicWatch::new(out, panic_seen)))
            .map_err(|e| format!("invalid serial port state: {e:?}"))?;
        Ok(SerialConsole { serial, errors: AtomicU64::new(0) })
    }

    /// The UART state to put in a snapshot.
    pub fn save(&self) -> SerialSaved {
        let s = self.serial.state();
        SerialSaved {
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

    /// Queues host input for the guest; bytes beyond the FIFO's room are dropped and counted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity();
        let n = bytes.len().min(room);
        if n < bytes.len() {
            self.errors.fetch_add((bytes.len() - n) as u64, Ordering::Relaxed);
        }
        if n == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&bytes[..n]) {
            Ok(q) => q,
            Err(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                0
            }
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= COM1_LEN {
            data.fill(0);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= COM1_LEN {
            return;
        }
        if self.serial.write(offset as u8, data[0]).is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_bytes_reach_the_writer_and_input_raises_the_irq() {
        let out = Shared::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = SerialConsole::new(EventFdTrigger(irq.try_clone().unwrap()), Box::new(out.clone()), Arc::default());
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        // Enable the received-data interrupt (IER bit 0), then send input.
        s.write(1, &[1]);
        assert_eq!(s.enqueue_input(b"ls\n"), 3);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'l');
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let out = Shared::default();
        let mut s = SerialConsole::new(EventFdTrigger(EventFd::new(0).unwrap()), Box::new(out.clone()), Arc::default());
        s.write(0, b"ab");
        let mut d = [0xffu8; 2];
        s.read(0, &mut d);
        assert_eq!(d, [0, 0]);
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn a_kernel_panic_line_is_noticed_and_plain_output_is_not() {
        let seen = Arc::new(AtomicBool::new(false));
        let mut s =
            SerialConsole::new(EventFdTrigger(EventFd::new(0).unwrap()), Box::new(Shared::default()), seen.clone());
        let mut say = |text: &[u8]| text.iter().for_each(|b| s.write(0, &[*b]));
        say(b"[    1.0] Kernel command line: panic=1\nKernel panic - not\nsyncing\n");
        assert!(!seen.load(Ordering::SeqCst), "split across lines is not a panic line");
        say(b"[    2.1] Kernel panic - not syncing: No working init found.\n");
        assert!(seen.load(Ordering::SeqCst));
    }

    #[test]
    fn state_round_trips_and_a_bad_fifo_is_refused() {
        let mut s =
            SerialConsole::new(EventFdTrigger(EventFd::new(0).unwrap()), Box::new(Shared::default()), Arc::default());
        s.write(3, &[0x83]); // LCR with DLAB
        s.write(7, &[0x5a]); // scratch
        s.enqueue_input(b"ab");
        let saved = s.save();
        assert_eq!((saved.line_control, saved.scratch, saved.in_buffer.as_slice()), (0x83, 0x5a, &b"ab"[..]));
        let back = SerialConsole::restore(
            EventFdTrigger(EventFd::new(0).unwrap()),
            Box::new(Shared::default()),
            Arc::default(),
            &saved,
        )
        .unwrap();
        assert_eq!(back.save(), saved);
        let bad = SerialSaved { in_buffer: vec![0; 100_000], ..saved };
        assert!(SerialConsole::restore(
            EventFdTrigger(EventFd::new(0).unwrap()),
            Box::new(Shared::default()),
            Arc::default(),
            &bad
        )
        .is_err());
    }

    #[test]
    fn input_beyond_the_fifo_is_dropped_and_counted() {
        let mut s =
            SerialConsole::new(EventFdTrigger(EventFd::new(0).unwrap()), Box::new(Shared::default()), Arc::default());
        let big = vec![b'x'; 1000];
        let n = s.enqueue_input(&big);
        assert!(n < 1000);
        assert_eq!(s.errors.load(Ordering::Relaxed), (1000 - n) as u64);
    }
}
