//! The i8042 keyboard controller, with just enough of it for two jobs: a guest writing 0xFE (pulse
//! reset line) to port 0x64 asks for a reset, which stops the microVM (the process then exits 0);
//! and the host can press Ctrl+Alt+Del (`SendCtrlAltDel`), which a Linux guest with the i8042 and
//! AT keyboard drivers answers by rebooting. The keyboard acknowledges every command (0xFA),
//! identifies as an MF2 keyboard and only ever sends that one key sequence (scan code set 2,
//! untranslated). The controller answers the self-tests Linux runs at probe time at once and
//! reports no AUX (mouse) port, so the driver's probe costs no timeouts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::Trigger;

use crate::devices::bus::BusDevice;
use crate::devices::EventFdTrigger;

pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
/// The keyboard's interrupt line.
pub const I8042_KBD_IRQ: u32 = 1;

const OFS_DATA: u64 = 0;
const OFS_STATUS: u64 = 4;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
/// "Pulse the reset line".
const CMD_RESET_CPU: u8 = 0xfe;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
/// AUX interface test result: clock line stuck low, i.e. no mouse port.
const AUX_TEST_NO_PORT: u8 = 0x01;

// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
/// The controller expects the parameter of a command on port 0x60.
const SB_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

// Control register bits.
const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;
const CB_KBD_DISABLED: u8 = 0x10;
const CB_AUX_DISABLED: u8 = 0x20;

/// Keyboard acknowledgement of a command byte.
const KBD_ACK: u8 = 0xfa;
const KBD_CMD_GET_ID: u8 = 0xf2;
const KBD_CMD_RESET: u8 = 0xff;
const KBD_CMD_ECHO: u8 = 0xee;
/// What an MF2 keyboard answers to Get ID.
const KBD_ID: [u8; 2] = [0xab, 0x83];
/// Basic assurance test passed (after a reset).
const KBD_BAT_OK: u8 = 0xaa;
/// Ctrl, Alt, Del make codes in scan code set 2 (Del is an extended key).
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

const BUF_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum I8042Error {
    #[error("the keyboard buffer is full (the guest is not reading its keyboard)")]
    BufferFull,
}

/// The controller at ports 0x60 (data) and 0x64 (command/status).
pub struct I8042 {
    reset: EventFdTrigger,
    kbd_irq: Option<EventFdTrigger>,
    /// Set on a reset request, so the vCPU that made it stops at once instead of running the
    /// guest further (it would only halt and wait to be killed).
    reset_requested: Arc<AtomicBool>,
    status: u8,
    control: u8,
    outp: u8,
    /// The command whose parameter byte is expected on port 0x60.
    cmd: u8,
    buf: std::collections::VecDeque<u8>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").field("status", &self.status).field("control", &self.control).finish()
    }
}

impl I8042 {
    pub fn new(reset: EventFdTrigger, reset_requested: Arc<AtomicBool>) -> Self {
        I8042 {
            reset,
            kbd_irq: None,
            reset_requested,
            status: SB_KBD_ENABLED,
            control: CB_POST_OK | CB_KBD_INT,
            outp: 0,
            cmd: 0,
            buf: std::collections::VecDeque::with_capacity(BUF_LEN),
        }
    }

    /// Wires the keyboard interrupt (IRQ 1).
    pub fn with_kbd_irq(mut self, irq: EventFdTrigger) -> Self {
        self.kbd_irq = Some(irq);
        self
    }

    /// Presses Ctrl+Alt+Del: queues the key sequence and raises the keyboard interrupt.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if BUF_LEN - self.buf.len() < CTRL_ALT_DEL.len() {
            return Err(I8042Error::BufferFull);
        }
        for b in CTRL_ALT_DEL {
            self.push(b);
        }
        self.interrupt();
        Ok(())
    }

    fn push(&mut self, byte: u8) {
        if self.buf.len() < BUF_LEN {
            self.buf.push_back(byte);
        }
        self.status |= SB_OUT_FULL;
    }

    fn pop(&mut self) -> u8 {
        let b = self.buf.pop_front().unwrap_or(0);
        if self.buf.is_empty() {
            self.status &= !SB_OUT_FULL;
        }
        b
    }

    /// Replaces whatever is queued with one reply byte (controller replies come alone).
    fn reply(&mut self, byte: u8) {
        self.buf.clear();
        self.push(byte);
    }

    fn interrupt(&self) {
        if self.control & CB_KBD_INT == 0 {
            return; // The guest masked the keyboard interrupt; it polls instead.
        }
        if let Some(irq) = &self.kbd_irq {
            if let Err(e) = irq.trigger() {
                tracing::error!(error = %e, "i8042 keyboard interrupt failed");
            }
        }
    }

    fn write_command(&mut self, cmd: u8) {
        match cmd {
            CMD_RESET_CPU => {
                self.reset_requested.store(true, Ordering::SeqCst);
                // The only error is a failed eventfd write; the vCPU still stops on the flag.
                if let Err(e) = self.reset.trigger() {
                    tracing::error!(error = %e, "i8042 reset signal failed");
                }
            }
            CMD_READ_CTR => self.reply(self.control),
            CMD_READ_OUTP => self.reply(self.outp),
            CMD_SELF_TEST => self.reply(0x55),
            CMD_KBD_TEST => self.reply(0x00),
            CMD_AUX_TEST => self.reply(AUX_TEST_NO_PORT),
            CMD_AUX_DISABLE => self.control |= CB_AUX_DISABLED,
            CMD_AUX_ENABLE => self.control &= !CB_AUX_DISABLED,
            CMD_KBD_DISABLE => self.control |= CB_KBD_DISABLED,
            CMD_KBD_ENABLE => self.control &= !CB_KBD_DISABLED,
            CMD_WRITE_CTR | CMD_WRITE_OUTP => {
                self.buf.clear();
                self.status &= !SB_OUT_FULL;
                self.status |= SB_CMD_DATA;
                self.cmd = cmd;
            }
            _ => {}
        }
    }

    fn write_data(&mut self, byte: u8) {
        if self.status & SB_CMD_DATA != 0 {
            match self.cmd {
                CMD_WRITE_CTR => self.control = byte,
                CMD_WRITE_OUTP => self.outp = byte,
                _ => {}
            }
            self.status &= !SB_CMD_DATA;
            return;
        }
        // A byte for the keyboard itself (a command or a command's parameter).
        match byte {
            KBD_CMD_ECHO => self.reply(KBD_CMD_ECHO),
            KBD_CMD_GET_ID => {
                self.reply(KBD_ACK);
                KBD_ID.iter().for_each(|b| self.push(*b));
            }
            KBD_CMD_RESET => {
                self.reply(KBD_ACK);
                self.push(KBD_BAT_OK);
            }
            _ => self.reply(KBD_ACK),
        }
        self.interrupt();
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0);
            return;
        }
        data[0] = match offset {
            OFS_STATUS => self.status,
            OFS_DATA => {
                let b = self.pop();
                // More bytes queued: interrupt again so the guest reads the next one.
                if self.status & SB_OUT_FULL != 0 {
                    self.interrupt();
                }
                b
            }
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            OFS_STATUS => self.write_command(data[0]),
            OFS_DATA => self.write_data(data[0]),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn device() -> (I8042, EventFd, EventFd, Arc<AtomicBool>) {
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let dev = I8042::new(EventFdTrigger(reset.try_clone().unwrap()), flag.clone())
            .with_kbd_irq(EventFdTrigger(irq.try_clone().unwrap()));
        (dev, reset, irq, flag)
    }

    fn inb(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0xaa];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_and_other_writes_do_not() {
        let (mut dev, reset, _, flag) = device();
        dev.write(0, &[0xfe]); // data port: a keyboard command, acknowledged
        dev.write(4, &[0xaa]);
        assert!(reset.read().is_err(), "no reset yet");
        assert!(!flag.load(Ordering::SeqCst));
        dev.write(4, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
        assert!(flag.load(Ordering::SeqCst));
    }

    #[test]
    fn ctrl_alt_del_arrives_as_set_2_make_codes_with_an_interrupt_per_byte() {
        let (mut dev, _, irq, _) = device();
        assert_eq!(inb(&mut dev, 4) & SB_OUT_FULL, 0);
        dev.send_ctrl_alt_del().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let mut got = Vec::new();
        while inb(&mut dev, 4) & SB_OUT_FULL != 0 {
            got.push(inb(&mut dev, 0));
        }
        assert_eq!(got, CTRL_ALT_DEL);
        // One interrupt per byte still queued after a read.
        assert_eq!(irq.read().unwrap(), 3);
        assert_eq!(inb(&mut dev, 0), 0, "an empty buffer reads 0");
    }

    #[test]
    fn a_guest_that_never_reads_fills_the_buffer_and_the_request_fails_cleanly() {
        let (mut dev, _, _, _) = device();
        for _ in 0..4 {
            dev.send_ctrl_alt_del().unwrap();
        }
        assert_eq!(dev.send_ctrl_alt_del(), Err(I8042Error::BufferFull));
        assert_eq!(dev.buf.len(), BUF_LEN);
    }

    #[test]
    fn control_register_and_output_port_round_trip_and_masking_the_interrupt_silences_it() {
        let (mut dev, _, irq, _) = device();
        dev.write(4, &[CMD_READ_CTR]);
        assert_eq!(inb(&mut dev, 0), CB_POST_OK | CB_KBD_INT);
        dev.write(4, &[CMD_WRITE_CTR]);
        assert_ne!(inb(&mut dev, 4) & SB_CMD_DATA, 0);
        dev.write(0, &[CB_POST_OK]);
        dev.write(4, &[CMD_READ_CTR]);
        assert_eq!(inb(&mut dev, 0), CB_POST_OK);
        dev.write(4, &[CMD_WRITE_OUTP]);
        dev.write(0, &[0x5a]);
        dev.write(4, &[CMD_READ_OUTP]);
        assert_eq!(inb(&mut dev, 0), 0x5a);
        // Interrupt masked: keys are queued for polling, no interrupt.
        dev.send_ctrl_alt_del().unwrap();
        assert!(irq.read().is_err());
        assert_eq!(inb(&mut dev, 0), 0x14);
        // Keyboard commands are acknowledged.
        dev.write(4, &[CMD_WRITE_CTR]);
        dev.write(0, &[CB_POST_OK | CB_KBD_INT]);
        dev.write(0, &[0xf4]);
        assert_eq!(inb(&mut dev, 0), KBD_ACK);
        assert_eq!(irq.read().unwrap(), 1);
        // Get ID answers as an MF2 keyboard, reset passes its self-test.
        dev.write(0, &[KBD_CMD_GET_ID]);
        assert_eq!([inb(&mut dev, 0), inb(&mut dev, 0), inb(&mut dev, 0)], [KBD_ACK, 0xab, 0x83]);
        dev.write(0, &[KBD_CMD_RESET]);
        assert_eq!([inb(&mut dev, 0), inb(&mut dev, 0)], [KBD_ACK, KBD_BAT_OK]);
        // Linux's probe: the controller self-test passes and there is no AUX port.
        dev.write(4, &[CMD_SELF_TEST]);
        assert_eq!(inb(&mut dev, 0), 0x55);
        dev.write(4, &[CMD_AUX_TEST]);
        assert_eq!(inb(&mut dev, 0), AUX_TEST_NO_PORT);
        dev.write(4, &[CMD_AUX_DISABLE]);
        dev.write(4, &[CMD_READ_CTR]);
        assert_ne!(inb(&mut dev, 0) & CB_AUX_DISABLED, 0);
        // Wide accesses are ignored.
        let mut two = [1, 2];
        dev.read(0, &mut two);
        assert_eq!(two, [0, 0]);
    }
}
