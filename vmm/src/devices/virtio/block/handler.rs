//! virtio-blk request handling (virtio 1.2, 5.2.6): one descriptor chain in, one status byte
//! out, against a `DiskBackend`. No event loop and no KVM: tests drive it with plain memory
//! and an in-memory disk.
//!
//! A chain is: a 16-byte header (type, reserved, sector) the device reads, the data (read for
//! writes, written for reads), and a status byte the device writes last. Every length and
//! address comes from the guest and is checked; data moves in bounded chunks, so a chain that
//! claims gigabytes costs no more memory than one that claims a sector.

use std::io::{Read, Write};

use crate::vstate::memory::GuestMemoryMmap;

pub const SECTOR_SIZE: u64 = 512;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Length of the serial id GET_ID returns.
pub const ID_LEN: usize = 20;
/// Data moves through a buffer of at most this size.
const CHUNK: usize = 256 << 10;
/// Most discard/write-zeroes segments per request (advertised as max_discard_seg).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Most data segments in one request (advertised as seg_max): a chain holds them plus the
/// header and the status byte.
pub const SEG_MAX: u32 = 254;
/// Largest data segment (advertised as size_max). Linux merges pages into segments up to it.
pub const SIZE_MAX: u32 = 32 << 10;
/// Most data bytes one request moves: seg_max × size_max (7.9 MiB). A chain that claims more
/// is refused whole, so one request keeps the event loop for milliseconds, not minutes.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;

/// What the device reads and writes: a raw disk image.
pub trait DiskBackend: Send {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;
    /// Frees the range (reads back as zeros); Unsupported if the backend cannot.
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Makes the range read back as zeros.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()>;
}

/// A disk image file.
#[derive(Debug)]
pub struct FileDisk {
    file: std::fs::File,
    len: u64,
}

impl FileDisk {
    pub fn new(file: std::fs::File) -> std::io::Result<FileDisk> {
        let len = file.metadata()?.len();
        Ok(FileDisk { file, len })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let (off, l) = (libc::off_t::try_from(offset), libc::off_t::try_from(len));
        let (Ok(off), Ok(l)) = (off, l) else { return Err(std::io::ErrorKind::InvalidInput.into()) };
        // SAFETY: fallocate on our own file descriptor; no memory is passed.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl DiskBackend for FileDisk {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        // Punching a hole reads back as zeros; where the filesystem cannot, write them.
        if self.discard(offset, len).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; CHUNK];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(CHUNK as u64) as usize;
            self.write_at(&zeros[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// An in-memory disk (tests, fuzzing).
#[derive(Debug, Clone, Default)]
pub struct MemDisk {
    pub data: Vec<u8>,
    pub flushes: u32,
}

impl DiskBackend for MemDisk {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.data.get(start..end))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let dst = start
            .checked_add(buf.len())
            .and_then(|end| self.data.get_mut(start..end))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        dst.copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.flushes += 1;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let len = usize::try_from(len).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let dst = start
            .checked_add(len)
            .and_then(|end| self.data.get_mut(start..end))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        dst.fill(0);
        Ok(())
    }
}

/// What the request handler needs to know about the disk.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    pub read_only: bool,
    /// GET_ID answer, zero-padded.
    pub id: [u8; ID_LEN],
}

/// How one chain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes written into the chain (data + status byte), for the used ring.
    pub used_len: u32,
    /// Status written, or None when the chain had no room for one (dropped).
    pub status: Option<u8>,
    /// Payload bytes moved (for the counters and rate limiter).
    pub bytes: u64,
}

/// The header of every request.
#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
struct RequestHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}
// SAFETY: plain integers, no padding (4 + 4 + 8 bytes), any bit pattern is valid.
unsafe impl vm_memory::ByteValued for RequestHeader {}

#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
struct DiscardSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain integers, no padding (8 + 4 + 4 bytes), any bit pattern is valid.
unsafe impl vm_memory::ByteValued for DiscardSegment {}

/// Byte range of `sectors` sectors from `sector`, if it lies within a disk of `disk_len` bytes.
fn range(sector: u64, bytes: u64, disk_len: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    (offset.checked_add(bytes)? <= disk_len).then_some(offset)
}

/// Executes one request chain against `disk`.
pub fn handle_chain<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    disk: &mut dyn DiskBackend,
    info: &DiskInfo,
) -> Outcome
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    let dropped = Outcome { used_len: 0, status: None, bytes: 0 };
    let descriptors = chain.clone().count();
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else { return dropped };
    let room = writer.available_bytes();
    if room == 0 {
        return dropped;
    }
    // The status byte is the last writable byte; everything writable before it is data.
    let Ok(mut status_writer) = writer.split_at(room - 1) else { return dropped };
    // Header, data and status fit in seg_max + 2 descriptors, and the data in
    // MAX_REQUEST_BYTES; a driver that ignores what the device offered gets an error.
    let oversized = descriptors > SEG_MAX as usize + 2
        || (writer.available_bytes() as u64).saturating_add(reader.available_bytes() as u64)
            > MAX_REQUEST_BYTES + std::mem::size_of::<RequestHeader>() as u64;
    let (status, bytes) = match reader.read_obj::<RequestHeader>() {
        Err(_) => (S_IOERR, 0),
        Ok(_) if oversized => (S_IOERR, 0),
        Ok(h) => execute(h, &mut reader, &mut writer, disk, info),
    };
    let data_written = writer.bytes_written();
    if status_writer.write_all(&[status]).is_err() {
        return dropped;
    }
    // At most MAX_REQUEST_BYTES + 1: always fits.
    let used_len = u32::try_from(data_written + 1).unwrap_or(u32::MAX);
    Outcome { used_len, status: Some(status), bytes }
}

fn execute<B: vm_memory::bitmap::BitmapSlice>(
    h: RequestHeader,
    reader: &mut virtio_queue::Reader<'_, B>,
    writer: &mut virtio_queue::Writer<'_, B>,
    disk: &mut dyn DiskBackend,
    info: &DiskInfo,
) -> (u8, u64) {
    let mut buf = Vec::new();
    match h.kind {
        T_IN => {
            let len = writer.available_bytes() as u64;
            if len % SECTOR_SIZE != 0 {
                return (S_IOERR, 0);
            }
            let Some(offset) = range(h.sector, len, disk.len()) else { return (S_IOERR, 0) };
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                buf.resize(n, 0);
                if disk.read_at(&mut buf, offset + done).is_err() || writer.write_all(&buf).is_err() {
                    return (S_IOERR, done);
                }
                done += n as u64;
            }
            (S_OK, len)
        }
        T_OUT => {
            if info.read_only {
                return (S_IOERR, 0);
            }
            let len = reader.available_bytes() as u64;
            if len % SECTOR_SIZE != 0 {
                return (S_IOERR, 0);
            }
            let Some(offset) = range(h.sector, len, disk.len()) else { return (S_IOERR, 0) };
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                buf.resize(n, 0);
                if reader.read_exact(&mut buf).is_err() || disk.write_at(&buf, offset + done).is_err() {
                    return (S_IOERR, done);
                }
                done += n as u64;
            }
            (S_OK, len)
        }
        T_FLUSH => (if disk.flush().is_ok() { S_OK } else { S_IOERR }, 0),
        T_GET_ID => {
            let n = writer.available_bytes().min(ID_LEN);
            match writer.write_all(&info.id[..n]) {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            }
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if info.read_only {
                return (S_IOERR, 0);
            }
            let segments = reader.available_bytes() / std::mem::size_of::<DiscardSegment>();
            if segments == 0 || segments > MAX_DISCARD_SEGMENTS as usize {
                return (S_IOERR, 0);
            }
            // Check every segment before changing anything.
            let mut ranges = Vec::with_capacity(segments);
            for _ in 0..segments {
                let Ok(s) = reader.read_obj::<DiscardSegment>() else { return (S_IOERR, 0) };
                let bytes = u64::from(s.num_sectors) * SECTOR_SIZE;
                let Some(offset) = range(s.sector, bytes, disk.len()) else { return (S_IOERR, 0) };
                ranges.push((offset, bytes));
            }
            for (offset, bytes) in ranges {
                let r =
                    if h.kind == T_DISCARD { disk.discard(offset, bytes) } else { disk.write_zeroes(offset, bytes) };
                match r {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Unsupported && h.kind == T_DISCARD => {
                        return (S_UNSUPP, 0)
                    }
                    Err(_) => return (S_IOERR, 0),
                }
            }
            (S_OK, 0)
        }
        _ => (S_UNSUPP, 0),
    }
}
