//! Legacy PC devices on port I/O: the COM1 UART and the i8042 controller (for guest reset).

pub mod i8042;
pub mod serial;

pub use i8042::I8042;
pub use serial::{SerialConsole, SerialSaved, COM1_BASE, COM1_IRQ, COM1_LEN};
