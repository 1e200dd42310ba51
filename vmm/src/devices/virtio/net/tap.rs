//! The host side of virtio-net: a tap opened by name. The VMM never creates taps (netstack or
//! the operator does); opening a name that does not exist is an error, not a new interface.
//! The tap carries a 12-byte virtio-net header before each frame (IFF_VNET_HDR), the same
//! header the guest's driver uses, so frames pass through unchanged.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
pub const VNET_HDR_LEN: usize = 12;

// TUNSETOFFLOAD flags: what the kernel may hand us (and so the guest) in the virtio-net header.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// Where frames go and come from (a tap in the VMM; a queue of frames in tests).
pub trait NetBackend: Send {
    /// Reads one frame (with its virtio-net header); WouldBlock when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Sends one frame (with its virtio-net header).
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// The descriptor the event loop watches for incoming frames.
    fn raw_fd(&self) -> Option<RawFd>;
    /// Which offloads (TUN_F_*) the frames read from the backend may carry.
    fn set_offloads(&mut self, _flags: u32) -> std::io::Result<()> {
        Ok(())
    }
    /// Frames made inside the VMM (MMDS answers) wait for the guest: the device's receive
    /// path runs after transmitting, without waiting for the tap to become readable.
    fn has_local_frames(&self) -> bool {
        false
    }
    /// The MTU of the host side (the tap's), which the guest is told (VIRTIO_NET_F_MTU).
    fn mtu(&self) -> Option<u16> {
        None
    }
}

/// A tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    /// The tap's MTU when it was opened (a tap on an overlay has less than Ethernet's 1500).
    mtu: Option<u16>,
}

impl Tap {
    /// Opens the existing tap `name`.
    pub fn open(name: &str) -> std::io::Result<Tap> {
        use std::os::unix::fs::OpenOptionsExt;
        if name.is_empty() || name.len() > 15 || name.contains('/') {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("invalid tap name `{name}`")));
        }
        // Asked of the kernel, not of /sys: a jailed VMM has no /sys, and the tap lives in the
        // VMM's network namespace, which may not be the one /sys shows.
        let c_name = std::ffi::CString::new(name)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("invalid tap name `{name}`")))?;
        // SAFETY: c_name is a NUL-terminated string.
        if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("tap {name} does not exist (shoal-vmm opens taps, it does not create them)"),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // struct ifreq: the name (16 bytes), then the flags (a short), padded to 40 bytes.
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which ifr is large enough to hold.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, ifr.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer given.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &size) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Tap { file, mtu: link_mtu(name) })
    }
}

/// The MTU of the link `name` in this network namespace (SIOCGIFMTU on a throwaway socket);
/// None if it cannot be read or does not fit virtio-net's 16 bits.
fn link_mtu(name: &str) -> Option<u16> {
    // SAFETY: socket has no memory preconditions; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a socket just opened and owned by nothing else.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // struct ifreq: the name (16 bytes), then ifr_mtu (an int), padded to 40 bytes.
    let mut ifr = [0u8; 40];
    ifr[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    // SAFETY: SIOCGIFMTU reads the name from and writes an int into a struct ifreq, which ifr
    // is large enough to hold.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU as _, ifr.as_mut_ptr()) } < 0 {
        return None;
    }
    let mtu = i32::from_ne_bytes([ifr[16], ifr[17], ifr[18], ifr[19]]);
    u16::try_from(mtu).ok().filter(|m| *m >= 68)
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write(frame).map(|_| ())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn mtu(&self) -> Option<u16> {
        self.mtu
    }

    fn set_offloads(&mut self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is our tap.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD as _, flags as libc::c_ulong) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
