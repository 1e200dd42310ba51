//! Counters of a running microVM, per vCPU and per device, read on demand into a
//! `MetricsSnapshot` and rendered as JSON (Firecracker's metrics file takes one JSON object per
//! flush) or as Prometheus text (`GET /shoal/metrics`). Rendering is pure; the VMM thread
//! collects.

use serde::Serialize;

/// One vCPU's exits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VcpuMetrics {
    pub exits: u64,
    pub io_in: u64,
    pub io_out: u64,
    pub mmio: u64,
}

/// One virtio device's work.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceMetrics {
    pub name: String,
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    pub spurious: u64,
    pub throttled: u64,
}

/// Everything at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    /// Milliseconds since the Unix epoch when collected.
    pub utc_timestamp_ms: u64,
    pub vcpus: Vec<VcpuMetrics>,
    pub devices: Vec<DeviceMetrics>,
    /// Console writes that failed and input bytes dropped.
    pub serial_errors: u64,
    /// Guest accesses to ports and MMIO addresses no device claims.
    pub pio_unclaimed: u64,
    pub mmio_unclaimed: u64,
}

impl MetricsSnapshot {
    pub fn now_ms() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let mut family = |name: &str, help: &str, samples: Vec<(String, u64)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for (labels, v) in samples {
                out.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        let per_vcpu = |f: fn(&VcpuMetrics) -> u64| {
            self.vcpus.iter().enumerate().map(|(i, v)| (format!("{{vcpu=\"{i}\"}}"), f(v))).collect()
        };
        family("shoal_vcpu_exits_total", "VM exits per vCPU.", per_vcpu(|v| v.exits));
        family("shoal_vcpu_io_in_total", "Port reads handled per vCPU.", per_vcpu(|v| v.io_in));
        family("shoal_vcpu_io_out_total", "Port writes handled per vCPU.", per_vcpu(|v| v.io_out));
        family("shoal_vcpu_mmio_total", "MMIO accesses handled per vCPU.", per_vcpu(|v| v.mmio));
        let per_dev = |f: fn(&DeviceMetrics) -> u64| {
            self.devices
                .iter()
                .enumerate()
                .map(|(i, d)| (format!("{{device=\"{i}\",name=\"{}\"}}", escape(&d.name)), f(d)))
                .collect()
        };
        family(
            "shoal_device_requests_total",
            "Requests (descriptor chains) served per device.",
            per_dev(|d| d.requests),
        );
        family("shoal_device_bytes_total", "Payload bytes moved per device.", per_dev(|d| d.bytes));
        family("shoal_device_errors_total", "Malformed or failed requests per device.", per_dev(|d| d.errors));
        family(
            "shoal_device_spurious_total",
            "Notifications before activation or for unknown queues.",
            per_dev(|d| d.spurious),
        );
        family("shoal_device_throttled_total", "Times the rate limiter held requests back.", per_dev(|d| d.throttled));
        family(
            "shoal_serial_errors_total",
            "Console writes that failed and input bytes dropped.",
            vec![(String::new(), self.serial_errors)],
        );
        family(
            "shoal_pio_unclaimed_total",
            "Guest port accesses no device claims.",
            vec![(String::new(), self.pio_unclaimed)],
        );
        family(
            "shoal_mmio_unclaimed_total",
            "Guest MMIO accesses no device claims.",
            vec![(String::new(), self.mmio_unclaimed)],
        );
        out
    }
}

/// Escapes a label value (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_carry_every_counter() {
        let m = MetricsSnapshot {
            utc_timestamp_ms: 1,
            vcpus: vec![VcpuMetrics { exits: 10, io_in: 2, io_out: 7, mmio: 1 }],
            devices: vec![DeviceMetrics {
                name: "block \"root\"".into(),
                requests: 5,
                bytes: 2560,
                errors: 1,
                spurious: 0,
                throttled: 3,
            }],
            serial_errors: 0,
            pio_unclaimed: 4,
            mmio_unclaimed: 0,
        };
        let text = m.to_prometheus();
        assert!(text.contains("shoal_vcpu_exits_total{vcpu=\"0\"} 10\n"), "{text}");
        assert!(text.contains("shoal_device_bytes_total{device=\"0\",name=\"block \\\"root\\\"\"} 2560\n"), "{text}");
        assert!(text.contains("shoal_device_throttled_total{device=\"0\",name=\"block \\\"root\\\"\"} 3\n"));
        assert!(text.contains("# TYPE shoal_pio_unclaimed_total counter\nshoal_pio_unclaimed_total 4\n"));
        let json: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(json["vcpus"][0]["io_out"], 7);
        assert_eq!(json["devices"][0]["errors"], 1);
    }
}
