//! The port-I/O bus: guest port ranges mapped to devices. A vCPU exit looks the port up here.
//! Ports nobody claims read as zero and ignore writes (as on Firecracker), and are counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on the bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while building the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Port ranges to devices.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
    /// Accesses to ports no device claims.
    pub unclaimed: AtomicU64,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.devices.iter().map(|(b, e)| (*b, e.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `[base, base + len)` for `device`.
    pub fn insert(&mut self, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::BadRange { base, len })?;
        if let Some((b, e)) = self.devices.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, entry))
    }

    /// Reads from the device at `addr`; returns false (data zeroed) if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, entry)) => {
                // A poisoned lock means a device panicked on another vCPU; keep serving.
                let mut dev = entry.device.lock().unwrap_or_else(|p| p.into_inner());
                dev.read(offset, data);
                true
            }
            None => {
                data.fill(0);
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, entry)) => {
                let mut dev = entry.device.lock().unwrap_or_else(|p| p.into_inner());
                dev.write(offset, data);
                true
            }
            None => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 0x10);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 0x15);
        assert!(bus.write(0x3f8, b"x"));
        assert_eq!(dev.lock().unwrap().last, Some((0, vec![b'x'])));
    }

    #[test]
    fn unclaimed_ports_read_zero_and_are_counted() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x60, 5).unwrap();
        let mut b = [0xaau8; 2];
        assert!(!bus.read(0x65, &mut b));
        assert_eq!(b, [0, 0]);
        assert!(!bus.write(0x5f, &[1]));
        assert_eq!(bus.unclaimed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn overlapping_or_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x60, 5).unwrap();
        assert!(matches!(
            bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x64, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x5c, 5),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x65, 1).is_ok());
        assert!(matches!(
            bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(Arc::new(Mutex::new(Recorder::default())), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
    }
}
