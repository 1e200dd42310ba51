//! Taps through `/dev/net/tun`: created persistent and owned by the jail's uid, so the jailed
//! VMM (which never creates taps) can open it by name after it dropped its privileges.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

use crate::names::IFNAMSIZ_MAX;

/// `struct ifreq` as the tun ioctls read it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the persistent tap `name` owned by `uid` and `gid` (or takes it over if it is there:
/// an agent restarted mid-way finds its taps and keeps them), with the flags the VMM opens it
/// with (a virtio-net header before each frame, no packet information).
pub fn create(name: &str, uid: u32, gid: u32) -> io::Result<()> {
    if name.is_empty() || name.len() > IFNAMSIZ_MAX || name.bytes().any(|b| b == 0 || b == b'/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not an interface name")));
    }
    let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let mut req =
        IfReq { name: [0; 16], flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as _, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let fd = tun.as_raw_fd();
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; req is laid out as one and outlives
    // the call.
    if unsafe { libc::ioctl(fd, libc::TUNSETIFF as _, &mut req as *mut IfReq) } < 0 {
        return Err(with_context(io::Error::last_os_error(), name, "TUNSETIFF"));
    }
    for (request, value, what) in [
        (libc::TUNSETOWNER, uid as libc::c_ulong, "TUNSETOWNER"),
        (libc::TUNSETGROUP, gid as libc::c_ulong, "TUNSETGROUP"),
        (libc::TUNSETPERSIST, 1, "TUNSETPERSIST"),
    ] {
        // SAFETY: these ioctls take their argument by value and touch no memory of ours.
        if unsafe { libc::ioctl(fd, request as _, value) } < 0 {
            return Err(with_context(io::Error::last_os_error(), name, what));
        }
    }
    Ok(())
}

fn with_context(e: io::Error, name: &str, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("tap {name}: {what}: {e}"))
}

/// Opens the existing tap `name` as the VMM does (for tests that stand in for a guest).
pub fn open(name: &str) -> io::Result<std::fs::File> {
    let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let mut req = IfReq { name: [0; 16], flags: (libc::IFF_TAP | libc::IFF_NO_PI) as _, _pad: [0; 22] };
    if name.len() > IFNAMSIZ_MAX {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: as in `create`.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &mut req as *mut IfReq) } < 0 {
        return Err(with_context(io::Error::last_os_error(), name, "TUNSETIFF"));
    }
    Ok(tun)
}
