//! CPUID the guest sees: what KVM supports, filtered (no PMU, no power management leaves, no
//! MONITOR/MWAIT) and normalised per vCPU so that every vCPU reports its own APIC id and one
//! consistent topology: `count` cores of one thread each, in one package.
//!
//! The TSC-deadline timer is offered when KVM emulates it (KVM_CAP_TSC_DEADLINE_TIMER; KVM
//! leaves the bit out of its supported list because it depends on the in-kernel LAPIC), as
//! Firecracker does: with it a Linux guest skips calibrating and verifying the LAPIC timer
//! against the PIT at boot, which cost the project's guest about 0.3 s in the emulated server
//! and there ended with "APIC timer disabled due to verification failure".

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_INTEL: u32 = 0x4;
const LEAF_POWER: u32 = 0x6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_MONITOR: u32 = 1 << 3;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EXT_ECX_CMP_LEGACY: u32 = 1 << 1;

/// The CPU vendor, which decides which topology leaves apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// Reads the vendor from leaf 0.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(e) = entries.iter().find(|e| e.function == LEAF_VENDOR) else {
        return Vendor::Other;
    };
    let mut v = [0u8; 12];
    v[0..4].copy_from_slice(&e.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&e.edx.to_le_bytes());
    v[8..12].copy_from_slice(&e.ecx.to_le_bytes());
    match &v {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to number `count` items (x2APIC id shift).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Normalises `entries` (KVM_GET_SUPPORTED_CPUID's list) for vCPU `index` of `count`;
/// `tsc_deadline`: KVM emulates the TSC-deadline timer.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8, tsc_deadline: bool) {
    let vendor = vendor(entries);
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count.min(255) << 16);
                e.ecx = (e.ecx | ECX_HYPERVISOR) & !ECX_MONITOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_INTEL if vendor == Vendor::Intel => {
                let cache_level = (e.eax >> 5) & 0x7;
                if e.eax & 0x1f != 0 {
                    // Cores per package - 1 in 31:26; threads sharing this cache - 1 in 25:14.
                    let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                    e.eax = (e.eax & 0x0000_3fff) | ((count - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
                }
            }
            LEAF_POWER | LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        // Core level: all vCPUs are cores of one package.
                        e.eax = id_bits(count);
                        e.ebx = count;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_HYPERVISOR => {
                // Announce every hypervisor leaf KVM gave us (at least 0x4000_0001).
                e.eax = e.eax.max(LEAF_HYPERVISOR + 1);
            }
            LEAF_EXT_FEATURES if vendor == Vendor::Amd => {
                if count > 1 {
                    e.ecx |= EXT_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT_ECX_CMP_LEGACY;
                }
            }
            LEAF_EXT_SIZES if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | (count - 1);
            }
            LEAF_EXT_APIC_ID if vendor == Vendor::Amd => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // compute unit id; one thread per unit
                e.ecx = 0; // one node
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn vendor_leaf(name: &[u8; 12]) -> kvm_cpuid_entry2 {
        let w = |i: usize| u32::from_le_bytes([name[i], name[i + 1], name[i + 2], name[i + 3]]);
        entry(0, 0, 0x1f, w(0), w(8), w(4))
    }

    fn find(entries: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *entries.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn the_tsc_deadline_timer_is_offered_only_where_kvm_emulates_it() {
        let base = vec![vendor_leaf(b"AuthenticAMD"), entry(1, 0, 0x800f12, 0, ECX_MONITOR, 0)];
        let mut with = base.clone();
        normalize(&mut with, 0, 1, true);
        assert_eq!(find(&with, 1, 0).ecx & ECX_TSC_DEADLINE, ECX_TSC_DEADLINE);
        assert_eq!(find(&with, 1, 0).ecx & ECX_MONITOR, 0);
        let mut without = base;
        normalize(&mut without, 0, 1, false);
        assert_eq!(find(&without, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn each_vcpu_reports_its_own_apic_id_and_the_count() {
        let base = vec![
            vendor_leaf(b"GenuineIntel"),
            entry(1, 0, 0x906ea, 0x0010_0800 | (7 << 24), ECX_MONITOR, 0),
            entry(0xb, 0, 1, 2, 0x100, 9),
            entry(0xb, 1, 4, 16, 0x201, 9),
            entry(0xb, 2, 0, 0, 2, 9),
        ];
        for idx in 0..4u8 {
            let mut e = base.clone();
            normalize(&mut e, idx, 4, false);
            let l1 = find(&e, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(idx));
            assert_eq!((l1.ebx >> 16) & 0xff, 4);
            assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_eq!(l1.ecx & ECX_MONITOR, 0);
            assert_ne!(l1.edx & EDX_HTT, 0);
            let smt = find(&e, 0xb, 0);
            let core = find(&e, 0xb, 1);
            let end = find(&e, 0xb, 2);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, u32::from(idx)));
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, u32::from(idx)));
            assert_eq!((end.ebx, end.ecx >> 8), (0, 0), "level 2 ends the list");
        }
    }

    #[test]
    fn single_vcpu_has_no_htt_and_pmu_is_hidden() {
        let mut e =
            vec![vendor_leaf(b"GenuineIntel"), entry(1, 0, 0, 0, 0, EDX_HTT), entry(0xa, 0, 0x0703_0402, 0, 0, 0x603)];
        normalize(&mut e, 0, 1, false);
        assert_eq!(find(&e, 1, 0).edx & EDX_HTT, 0);
        let pmu = find(&e, 0xa, 0);
        assert_eq!((pmu.eax, pmu.edx), (0, 0));
    }

    #[test]
    fn intel_cache_leaf_reports_cores_and_sharing() {
        // L1d (type 1, level 1) and L3 (type 3, level 3).
        let mut e = vec![
            vendor_leaf(b"GenuineIntel"),
            entry(4, 0, 0x21 | (1 << 14), 0, 0, 0),
            entry(4, 3, 0x63 | (15 << 14), 0, 0, 0),
        ];
        normalize(&mut e, 1, 8, false);
        let l1 = find(&e, 4, 0);
        let l3 = find(&e, 4, 3);
        assert_eq!((l1.eax >> 26, (l1.eax >> 14) & 0xfff, l1.eax & 0xff), (7, 0, 0x21));
        assert_eq!((l3.eax >> 26, (l3.eax >> 14) & 0xfff), (7, 7));
    }

    #[test]
    fn amd_leaves_follow_the_same_topology() {
        let mut e = vec![
            vendor_leaf(b"AuthenticAMD"),
            entry(0x8000_0001, 0, 0, 0, 0, 0),
            entry(0x8000_0008, 0, 0x3030, 0, 0x7007, 0),
            entry(0x8000_001e, 0, 0, 0, 0, 0),
        ];
        normalize(&mut e, 2, 3, false);
        assert_ne!(find(&e, 0x8000_0001, 0).ecx & EXT_ECX_CMP_LEGACY, 0);
        let sizes = find(&e, 0x8000_0008, 0);
        assert_eq!((sizes.ecx & 0xff, (sizes.ecx >> 12) & 0xf), (2, 2));
        assert_eq!(find(&e, 0x8000_001e, 0).eax, 2);
        assert_eq!(vendor(&e), Vendor::Amd);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
