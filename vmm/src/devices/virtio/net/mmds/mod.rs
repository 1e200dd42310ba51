//! MMDS, the microVM metadata service: a JSON document the operator sets through the API
//! (`PUT/PATCH/GET /mmds`), served to the guest over HTTP at a link-local address (by default
//! 169.254.169.254) on the network interfaces `PUT /mmds/config` names, from inside the VMM:
//! the guest's frames for that address never reach the host's network. `store` holds the
//! document and the HTTP semantics (V1, and V2 with session tokens); `stack` is the small
//! ARP/IPv4/TCP endpoint; `MmdsBackend` puts the endpoint in front of an interface's tap.

pub mod stack;
pub mod store;

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use super::tap::NetBackend;
use stack::MmdsStack;
use store::MmdsStore;

/// The data store shared by the API thread (which sets it) and the devices (which serve it).
pub type SharedStore = Arc<Mutex<MmdsStore>>;

/// A tap with the MMDS endpoint in front: frames for MMDS are answered, the rest pass.
pub struct MmdsBackend {
    inner: Box<dyn NetBackend>,
    stack: MmdsStack,
}

impl std::fmt::Debug for MmdsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmdsBackend").field("stack", &self.stack).finish()
    }
}

impl MmdsBackend {
    pub fn new(inner: Box<dyn NetBackend>, ip: [u8; 4], store: SharedStore) -> MmdsBackend {
        MmdsBackend { inner, stack: MmdsStack::new(ip, store) }
    }
}

impl NetBackend for MmdsBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(frame) = self.stack.next_frame() {
            let n = frame.len().min(buf.len());
            buf[..n].copy_from_slice(&frame[..n]);
            return Ok(n);
        }
        self.inner.read_frame(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        if self.stack.intercept(frame) {
            return Ok(());
        }
        self.inner.write_frame(frame)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        self.inner.raw_fd()
    }

    fn set_offloads(&mut self, flags: u32) -> std::io::Result<()> {
        self.inner.set_offloads(flags)
    }

    fn has_local_frames(&self) -> bool {
        self.stack.has_frames()
    }

    fn mtu(&self) -> Option<u16> {
        self.inner.mtu()
    }
}
