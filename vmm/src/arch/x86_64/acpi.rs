//! ACPI tables for guests whose machine config asks for them (`acpi`): hardware-reduced ACPI,
//! as microVMs describe themselves (no PM registers, no legacy PIC). RSDP -> XSDT -> FADT
//! (-> DSDT) and MADT, written into the BIOS area below 1 MiB, where Linux also scans for the
//! RSDP. The DSDT describes COM1, the i8042 keyboard controller, every virtio-mmio device
//! (such a guest finds them there, not on its command line), a VM Generation ID (a 16-byte
//! value in guest memory that changes on every restore) and a Generic Event Device whose
//! interrupt tells the guest to read it again: Linux then reseeds its random number
//! generator, so that clones of one snapshot do not share random state.
//!
//! Only what these tables need of AML is encoded here (names, strings, integers, packages,
//! buffers, devices, one method with an `If`, `Notify`).

use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemoryMmap;

use super::layout::{APIC_DEFAULT_PHYS_BASE, IOAPIC_ADDR, VIRTIO_FIRST_IRQ, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use super::mptable::checksum;

/// Where the RSDP goes (Linux scans 0xe0000..0x100000 for it).
pub const RSDP_ADDR: u64 = 0xe_0000;
/// The other tables follow the RSDP.
const TABLES_ADDR: u64 = RSDP_ADDR + 0x40;
/// The VM Generation ID: 16 bytes, in a page of their own below the BIOS area's end.
pub const VMGENID_ADDR: u64 = 0xe_f000;
pub const VMGENID_LEN: usize = 16;
/// The Generic Event Device's interrupt (the IOAPIC's last line; virtio devices use 5..=22).
pub const GED_IRQ: u32 = 23;

const OEM_ID: &[u8; 6] = b"SHOAL ";
const CREATOR_ID: &[u8; 4] = b"SHOL";

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({0} bytes) do not fit below the VM generation ID")]
    TooLarge(u64),
    #[error("cannot write the ACPI tables or the VM generation ID into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// What the tables describe.
#[derive(Debug, Clone, Copy)]
pub struct AcpiLayout {
    pub vcpus: u8,
    pub virtio_devices: usize,
}

/// Writes every table into guest memory (the RSDP at `RSDP_ADDR`).
pub fn write_tables(mem: &GuestMemoryMmap, layout: &AcpiLayout) -> Result<(), AcpiError> {
    let dsdt_addr = TABLES_ADDR;
    let dsdt = dsdt(layout.virtio_devices);
    let fadt_addr = align8(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align8(fadt_addr + fadt.len() as u64);
    let madt = madt(layout.vcpus);
    let xsdt_addr = align8(madt_addr + madt.len() as u64);
    let xsdt = table(b"XSDT", 1, b"SHOALXSD", &[fadt_addr.to_le_bytes(), madt_addr.to_le_bytes()].concat());
    let end = xsdt_addr + xsdt.len() as u64;
    if end > VMGENID_ADDR {
        return Err(AcpiError::TooLarge(end - RSDP_ADDR));
    }
    for (addr, bytes) in [(dsdt_addr, &dsdt), (fadt_addr, &fadt), (madt_addr, &madt), (xsdt_addr, &xsdt)] {
        mem.write_slice(bytes, GuestAddress(addr)).map_err(AcpiError::Write)?;
    }
    mem.write_slice(&rsdp(xsdt_addr), GuestAddress(RSDP_ADDR)).map_err(AcpiError::Write)
}

/// Writes a new VM Generation ID.
pub fn write_vmgenid(mem: &GuestMemoryMmap, id: &[u8; VMGENID_LEN]) -> Result<(), AcpiError> {
    mem.write_slice(id, GuestAddress(VMGENID_ADDR)).map_err(AcpiError::Write)
}

fn align8(a: u64) -> u64 {
    (a + 7) & !7
}

/// A table: the 36-byte system description header, then `body`.
fn table(signature: &[u8; 4], revision: u8, oem_table_id: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let len = 36 + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(oem_table_id);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// The ACPI 2.0 root pointer (36 bytes) to the XSDT.
fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.push(0); // extended checksum
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

// FADT flags and IA-PC boot architecture flags (ACPI 6.5, 5.2.9).
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;

/// FADT revision 6 (276 bytes): hardware-reduced, no power or sleep button, an i8042, no VGA,
/// no MSI, the DSDT at `dsdt_addr`.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut body = vec![0u8; 276 - 36];
    let mut put = |offset: usize, bytes: &[u8]| body[offset - 36..offset - 36 + bytes.len()].copy_from_slice(bytes);
    put(40, &(dsdt_addr as u32).to_le_bytes());
    put(109, &(IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED).to_le_bytes());
    put(112, &(FADT_HW_REDUCED_ACPI | FADT_PWR_BUTTON | FADT_SLP_BUTTON).to_le_bytes());
    put(131, &[5]); // FADT minor version: ACPI 6.5
    put(140, &dsdt_addr.to_le_bytes());
    put(268, b"SHOALVMM"); // hypervisor vendor identity
    table(b"FACP", 6, b"SHOALFAC", &body)
}

/// MADT: the LAPIC base, no dual 8259, one enabled local APIC per vCPU (APIC id = index) and
/// the IOAPIC with GSIs from 0.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    for i in 0..vcpus {
        body.extend_from_slice(&[0, 8, i, i]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    body.extend_from_slice(&[1, 12, 0, 0]);
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    table(b"APIC", 5, b"SHOALMAD", &body)
}

/// DSDT: the devices under \_SB.
fn dsdt(virtio_devices: usize) -> Vec<u8> {
    let mut sb = Vec::new();
    sb.extend(device(
        "COM1",
        &[
            name("_HID", &string("PNP0501")),
            name("_UID", &int(1)),
            name("_CRS", &resources(&[io_port(0x3f8, 8), irq_isa(4)])),
        ]
        .concat(),
    ));
    sb.extend(device(
        "PS2K",
        &[
            name("_HID", &string("PNP0303")),
            name("_CRS", &resources(&[io_port(0x60, 1), io_port(0x64, 1), irq_isa(1)])),
        ]
        .concat(),
    ));
    for i in 0..virtio_devices {
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        let crs =
            resources(&[memory32_fixed(base as u32, VIRTIO_MMIO_SIZE as u32), interrupt(VIRTIO_FIRST_IRQ + i as u32)]);
        sb.extend(device(
            &format!("V{i:03}"),
            &[name("_HID", &string("LNRO0005")), name("_UID", &int(i as u64)), name("_CRS", &crs)].concat(),
        ));
    }
    let addr = package(&[int(VMGENID_ADDR & 0xffff_ffff), int(VMGENID_ADDR >> 32)]);
    sb.extend(device(
        "VGEN",
        &[
            name("_HID", &string("VMGENCTR")),
            name("_CID", &string("VM_Gen_Counter")),
            name("_DDN", &string("VM_Gen_Counter")),
            name("ADDR", &addr),
        ]
        .concat(),
    ));
    // _EVT(gsi): the generation ID changed.
    let evt =
        method("_EVT", 1, &if_(&[&[0x93, 0x68][..], &int(u64::from(GED_IRQ))].concat(), &notify("\\_SB_VGEN", 0x80)));
    sb.extend(device(
        "GED_",
        &[
            name("_HID", &string("ACPI0013")),
            name("_UID", &int(0)),
            name("_CRS", &resources(&[interrupt(GED_IRQ)])),
            evt,
        ]
        .concat(),
    ));
    let mut aml = vec![0x10];
    aml.extend(pkg_length(name_path("\\_SB_").len() + sb.len()));
    aml.extend(name_path("\\_SB_"));
    aml.extend(sb);
    table(b"DSDT", 2, b"SHOALDSD", &aml)
}

/// PkgLength: the length of what follows *including* its own bytes (ACPI 6.5, 20.2.4).
fn pkg_length(content: usize) -> Vec<u8> {
    if content + 1 < 0x40 {
        return vec![(content + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = content + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut v = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    panic!("AML package of {content} bytes");
}

/// A name segment: four characters, padded with `_`.
fn name_seg(s: &str) -> [u8; 4] {
    let mut seg = [b'_'; 4];
    for (d, c) in seg.iter_mut().zip(s.bytes()) {
        *d = c;
    }
    seg
}

/// `\SEG1SEG2...` (absolute) or `SEG` (relative), segments of four characters.
fn name_path(path: &str) -> Vec<u8> {
    let (root, rest) = match path.strip_prefix('\\') {
        Some(r) => (true, r),
        None => (false, path),
    };
    let segs: Vec<[u8; 4]> =
        rest.as_bytes().chunks(4).map(|c| name_seg(std::str::from_utf8(c).unwrap_or("____"))).collect();
    let mut v = Vec::new();
    if root {
        v.push(b'\\');
    }
    match segs.len() {
        0 => v.push(0),
        1 => {}
        2 => v.push(0x2e),
        n => {
            v.push(0x2f);
            v.push(n as u8);
        }
    }
    for s in segs {
        v.extend_from_slice(&s);
    }
    v
}

fn name(n: &str, value: &[u8]) -> Vec<u8> {
    [&[0x08][..], &name_seg(n), value].concat()
}

fn string(s: &str) -> Vec<u8> {
    [&[0x0d][..], s.as_bytes(), &[0]].concat()
}

fn int(v: u64) -> Vec<u8> {
    match v {
        0 => vec![0x00],
        1 => vec![0x01],
        2..=0xff => vec![0x0a, v as u8],
        0x100..=0xffff => [&[0x0b][..], &(v as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[0x0c][..], &(v as u32).to_le_bytes()].concat(),
        _ => [&[0x0e][..], &v.to_le_bytes()].concat(),
    }
}

fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let content: Vec<u8> = [&[elements.len() as u8][..], &elements.concat()].concat();
    [&[0x12][..], &pkg_length(content.len()), &content].concat()
}

fn buffer(bytes: &[u8]) -> Vec<u8> {
    let content = [&int(bytes.len() as u64)[..], bytes].concat();
    [&[0x11][..], &pkg_length(content.len()), &content].concat()
}

fn device(n: &str, body: &[u8]) -> Vec<u8> {
    let content = [&name_seg(n)[..], body].concat();
    [&[0x5b, 0x82][..], &pkg_length(content.len()), &content].concat()
}

fn method(n: &str, args: u8, body: &[u8]) -> Vec<u8> {
    let content = [&name_seg(n)[..], &[args & 7], body].concat();
    [&[0x14][..], &pkg_length(content.len()), &content].concat()
}

fn if_(predicate: &[u8], body: &[u8]) -> Vec<u8> {
    let content = [predicate, body].concat();
    [&[0xa0][..], &pkg_length(content.len()), &content].concat()
}

fn notify(target: &str, value: u8) -> Vec<u8> {
    [&[0x86][..], &name_path(target), &int(u64::from(value))].concat()
}

/// A resource template (a buffer of descriptors and the end tag).
fn resources(descriptors: &[Vec<u8>]) -> Vec<u8> {
    buffer(&[&descriptors.concat()[..], &[0x79, 0]].concat())
}

/// I/O port range, 16-bit decode, fixed at `base`.
fn io_port(base: u16, len: u8) -> Vec<u8> {
    let b = base.to_le_bytes();
    vec![0x47, 1, b[0], b[1], b[0], b[1], 1, len]
}

/// ISA IRQ (edge, active high).
fn irq_isa(irq: u8) -> Vec<u8> {
    let mask = (1u16 << irq).to_le_bytes();
    vec![0x22, mask[0], mask[1]]
}

/// Extended interrupt: consumer, edge-triggered, active high, exclusive, one GSI.
fn interrupt(gsi: u32) -> Vec<u8> {
    [&[0x89, 6, 0, 0b0000_0011, 1][..], &gsi.to_le_bytes()].concat()
}

/// 32-bit fixed memory range, read/write.
fn memory32_fixed(base: u32, len: u32) -> Vec<u8> {
    [&[0x86, 9, 0, 1][..], &base.to_le_bytes(), &len.to_le_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn pkg_length_counts_its_own_bytes() {
        assert_eq!(pkg_length(10), [11]);
        assert_eq!(pkg_length(62), [63]);
        // 63 bytes of content: 2 length bytes, total 65 = 0x41.
        assert_eq!(pkg_length(63), [0x41, 0x04]);
        assert_eq!(pkg_length(0x1000), [0x83, 0x00, 0x01]);
    }

    #[test]
    fn names_and_integers_encode_as_aml() {
        assert_eq!(name_path("\\_SB_"), b"\\_SB_");
        assert_eq!(name_path("\\_SB_VGEN"), [&b"\\"[..], &[0x2e], b"_SB_VGEN"].concat());
        assert_eq!(name_seg("GED"), *b"GED_");
        assert_eq!(int(0), [0]);
        assert_eq!(int(23), [0x0a, 23]);
        assert_eq!(int(0xe_f000), [0x0c, 0x00, 0xf0, 0x0e, 0x00]);
        assert_eq!(string("PNP0501"), b"\x0dPNP0501\x00");
    }

    #[test]
    fn tables_have_valid_checksums_and_point_at_each_other() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_tables(&mem, &AcpiLayout { vcpus: 2, virtio_devices: 3 }).unwrap();
        let rsdp_at = RSDP_ADDR;
        let read = |addr: u64, len: usize| {
            let mut b = vec![0u8; len];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b
        };
        let rsdp = read(rsdp_at, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(&rsdp));
        let sdt = |addr: u64| {
            let len = u32::from_le_bytes(read(addr + 4, 4).try_into().unwrap()) as usize;
            let t = read(addr, len);
            assert!(sums_to_zero(&t), "{:?} checksum", String::from_utf8_lossy(&t[..4]));
            t
        };
        let xsdt = sdt(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        let fadt = sdt(entries[0]);
        let madt = sdt(entries[1]);
        assert_eq!((&fadt[..4], fadt.len()), (&b"FACP"[..], 276));
        assert_eq!(u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & FADT_HW_REDUCED_ACPI, FADT_HW_REDUCED_ACPI);
        let dsdt = sdt(u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(&dsdt[..4], b"DSDT");
        // Two local APICs and one IOAPIC after the 8 bytes of LAPIC base and flags.
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(madt.len(), 36 + 8 + 2 * 8 + 12);
        // The DSDT names every device, and the whole \_SB scope's length is right.
        for want in [&b"COM1"[..], b"PS2K", b"V000", b"V002", b"VGEN", b"GED_", b"LNRO0005", b"VMGENCTR", b"ACPI0013"] {
            assert!(dsdt.windows(want.len()).any(|w| w == want), "{}", String::from_utf8_lossy(want));
        }
        assert!(!dsdt.windows(4).any(|w| w == b"V003"));
        // Tables that would run into the generation ID are an error, not a panic or overlap.
        assert!(matches!(
            write_tables(&mem, &AcpiLayout { vcpus: 1, virtio_devices: 1000 }),
            Err(AcpiError::TooLarge(_))
        ));
        assert_eq!(dsdt[36], 0x10);
        let scope_len = pkg_length(dsdt.len() - 37 - 1).len();
        assert_eq!(pkg_length(dsdt.len() - 37 - scope_len), dsdt[37..37 + scope_len]);
    }
}
