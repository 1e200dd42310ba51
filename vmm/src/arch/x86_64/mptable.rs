//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its vCPUs,
//! its IOAPIC and its interrupt routing. Built as bytes (no packed structs), written at the EBDA.

use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_DEFAULT_PHYS_BASE, EBDA_START, IOAPIC_ADDR};

/// Most vCPUs an MP table can describe: APIC ids are 8 bits and the IOAPIC takes the next one.
pub use shoal_vmm_config::limits::MAX_VCPUS;
/// IOAPIC pins routed 1:1 from ISA IRQs.
const IRQ_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4) | 3; // family 6
const CPU_FEATURES: u32 = 0x201; // FPU | APIC
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in an MP table (at most {max})", max = MAX_VCPUS)]
    TooManyCpus(u8),
    #[error("cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The byte that makes `bytes` sum to zero (MP and ACPI tables both use it).
pub(super) fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// The whole table (floating pointer followed by the configuration table) for `num_cpus`
/// vCPUs, as it must appear at guest address `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let config_addr = base + 16;

    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        entries.extend_from_slice(&[
            ENTRY_PROCESSOR,
            cpu,
            APIC_VERSION,
            CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 },
        ]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for irq in 0..IRQ_PINS {
        // type, irq type, flags (conforming), source bus, source irq, dest IOAPIC, dest pin
        entries.extend_from_slice(&[ENTRY_INTSRC, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(num_cpus) + 1 + 1 + u16::from(IRQ_PINS) + 2;

    let mut config = Vec::with_capacity(44 + entries.len());
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    config.push(4); // spec revision 1.4
    config.push(0); // checksum, below
    config.extend_from_slice(b"SHOAL   ");
    config.extend_from_slice(b"MICROVM     ");
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&entry_count.to_le_bytes());
    config.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    config.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(config_addr as u32).to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 bytes, rev 1.4, checksum, features
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&config);
    Ok(mpf)
}

/// Writes the MP table for `num_cpus` vCPUs at the EBDA.
pub fn write(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MpTableError> {
    let table = build(num_cpus, EBDA_START)?;
    mem.write_slice(&table, GuestAddress(EBDA_START)).map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn table_checksums_and_counts_are_right() {
        for cpus in [1u8, 2, 4, 32, MAX_VCPUS] {
            let t = build(cpus, EBDA_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(u64::from(ptr), EBDA_START + 16);
            let cfg = &t[16..];
            let len = usize::from(u16::from_le_bytes([cfg[4], cfg[5]]));
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0, "config table checksum");
            let count = u16::from_le_bytes([cfg[34], cfg[35]]);
            assert_eq!(count, u16::from(cpus) + 28);
        }
    }

    #[test]
    fn processors_have_sequential_apic_ids_and_one_bsp() {
        let t = build(4, EBDA_START).unwrap();
        let cfg = &t[16 + 44..];
        let mut ids = vec![];
        let mut bsps = 0;
        for i in 0..4 {
            let e = &cfg[i * 20..i * 20 + 20];
            assert_eq!(e[0], ENTRY_PROCESSOR);
            ids.push(e[1]);
            if e[3] & CPU_BSP != 0 {
                bsps += 1;
            }
        }
        assert_eq!(ids, vec![0, 1, 2, 3]);
        assert_eq!(bsps, 1);
        // Bus, then the IOAPIC with the first free APIC id.
        let io = &cfg[80 + 8..80 + 16];
        assert_eq!((io[0], io[1]), (ENTRY_IOAPIC, 4));
        assert_eq!(u32::from_le_bytes(io[4..8].try_into().unwrap()), IOAPIC_ADDR);
    }

    #[test]
    fn zero_or_too_many_cpus_are_refused() {
        assert!(build(0, EBDA_START).is_err());
        assert!(matches!(build(255, EBDA_START), Err(MpTableError::TooManyCpus(255))));
    }
}
