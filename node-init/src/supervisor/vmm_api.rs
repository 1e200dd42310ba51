//! The supervisor's side of shoal-vmm's Firecracker-compatible API on the instance's Unix socket:
//! one request per connection (`Connection: close`), JSON bodies, the VMM's
//! `{"fault_message": ...}` turned into an error.
//!
//! The bodies are the VMM's own request types (`shoal-vmm-config`, the leaf crate the VMM parses
//! them with), so a renamed or retyped field fails to compile here; node-init does not link
//! the VMM.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use shoal_vmm_config::{ActionType, BootSource, FirecrackerDrive, FirecrackerNet, InstanceAction, MachineConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::network::Iface;
use crate::state::objects::Template;

/// Longest a single VMM API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response read.
const MAX_RESPONSE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VmmApiError {
    #[error("cannot reach the VMM's API socket")]
    Connect(#[source] std::io::Error),
    #[error("the VMM's API did not answer in time")]
    Timeout,
    #[error("the VMM's API answered something that is not HTTP")]
    Garbled,
    #[error("{method} {path}: {status}: {message}")]
    Refused { method: String, path: String, status: u16, message: String },
}

async fn connect(socket: &Path) -> Result<tokio::net::UnixStream, VmmApiError> {
    connect_unix(socket).await.map_err(VmmApiError::Connect)
}

/// Connects to a Unix socket, even one whose path is longer than the 107 bytes `connect` takes.
pub async fn connect_unix(socket: &Path) -> std::io::Result<tokio::net::UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    // Unix socket paths are limited to 107 bytes; a longer one is reached through its directory.
    if socket.as_os_str().as_bytes().len() < 100 {
        return tokio::net::UnixStream::connect(socket).await;
    }
    let dir = socket.parent().unwrap_or(Path::new("/"));
    let name = socket.file_name().unwrap_or_default();
    let handle = std::fs::File::open(dir)?;
    let short = format!("/proc/self/fd/{}/{}", std::os::fd::AsRawFd::as_raw_fd(&handle), name.to_string_lossy());
    let stream = tokio::net::UnixStream::connect(&short).await;
    drop(handle);
    stream
}

/// One request: the status and the parsed body (Null when empty).
pub async fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), VmmApiError> {
    let work = async {
        let mut s = connect(socket).await?;
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            payload.len()
        );
        s.write_all(head.as_bytes()).await.map_err(VmmApiError::Connect)?;
        s.write_all(payload.as_bytes()).await.map_err(VmmApiError::Connect)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.map_err(VmmApiError::Connect)?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_RESPONSE {
                return Err(VmmApiError::Garbled);
            }
            if let Some(done) = complete_response(&buf) {
                buf.truncate(done);
                break;
            }
        }
        parse_response(&buf)
    };
    match tokio::time::timeout(CALL_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(VmmApiError::Timeout),
    }
}

/// The length of a complete response in `buf` (head and Content-Length body), if there is one.
fn complete_response(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let len = head
        .lines()
        .find_map(|l| {
            l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")).map(|(_, v)| v.trim())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + len).then_some(head_end + len)
}

fn parse_response(buf: &[u8]) -> Result<(u16, Value), VmmApiError> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or(VmmApiError::Garbled)?;
    let status_line =
        std::str::from_utf8(&buf[..head_end]).map_err(|_| VmmApiError::Garbled)?.lines().next().unwrap_or("");
    let status: u16 = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(VmmApiError::Garbled)?;
    let body = &buf[head_end + 4..];
    let value = if body.is_empty() { Value::Null } else { serde_json::from_slice(body).unwrap_or(Value::Null) };
    Ok((status, value))
}

/// A request that must succeed (2xx).
pub async fn expect_ok(socket: &Path, method: &str, path: &str, body: &impl Serialize) -> Result<(), VmmApiError> {
    let body = serde_json::to_value(body).map_err(|_| VmmApiError::Garbled)?;
    let (status, reply) = call(socket, method, path, Some(&body)).await?;
    if (200..300).contains(&status) {
        return Ok(());
    }
    let message = reply["fault_message"].as_str().unwrap_or("no message").to_string();
    Err(VmmApiError::Refused { method: method.into(), path: path.into(), status, message })
}

/// The paths inside the jail where the instance's files are put.
pub const KERNEL: &str = "/kernel";
pub const INITRD: &str = "/initrd";
pub const ROOTFS: &str = "/rootfs.img";

/// Configures a fresh VMM for `template` (with its network interface, if it has one) and
/// boots it.
pub async fn boot(socket: &Path, template: &Template, iface: Option<&Iface>) -> Result<(), VmmApiError> {
    let machine =
        MachineConfig { vcpu_count: template.vcpus, mem_size_mib: template.mem_mib, ..MachineConfig::default() };
    expect_ok(socket, "PUT", "/machine-config", &machine).await?;
    let mut cmdline = template.cmdline.clone();
    if let Some(i) = iface {
        // The guest's address, gateway and netmask, as Linux's ip= reads them.
        cmdline = format!("{} {}", cmdline.trim_end(), i.ip_arg).trim_start().to_string();
    }
    let boot = BootSource {
        kernel_image_path: KERNEL.into(),
        boot_args: Some(cmdline),
        initrd_path: template.initrd.is_some().then(|| INITRD.into()),
    };
    expect_ok(socket, "PUT", "/boot-source", &boot).await?;
    if template.rootfs.is_some() {
        let drive = FirecrackerDrive {
            drive_id: "rootfs".into(),
            path_on_host: ROOTFS.into(),
            is_root_device: true,
            is_read_only: false,
            rate_limiter: None,
            cache_type: None,
            io_engine: None,
            partuuid: None,
        };
        expect_ok(socket, "PUT", "/drives/rootfs", &drive).await?;
    }
    if let Some(i) = iface {
        let net = FirecrackerNet {
            iface_id: "eth0".into(),
            host_dev_name: i.tap.clone(),
            guest_mac: Some(i.mac.clone()),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        expect_ok(socket, "PUT", "/network-interfaces/eth0", &net).await?;
    }
    expect_ok(socket, "PUT", "/actions", &InstanceAction { action_type: ActionType::InstanceStart }).await
}

/// Whether the VMM answers and runs a guest.
pub async fn is_running(socket: &Path) -> bool {
    matches!(call(socket, "GET", "/", None).await, Ok((200, v)) if v["state"] == "Running")
}

/// Presses Ctrl+Alt+Del on the guest's keyboard.
pub async fn ctrl_alt_del(socket: &Path) -> Result<(), VmmApiError> {
    expect_ok(socket, "PUT", "/actions", &InstanceAction { action_type: ActionType::SendCtrlAltDel }).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_complete_only_with_their_whole_body() {
        let r = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 27\r\n\r\n{\"fault_message\": \"nope\"}";
        assert_eq!(complete_response(r), None, "two bytes short");
        let r = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 25\r\n\r\n{\"fault_message\": \"nope\"}";
        assert_eq!(complete_response(r), Some(r.len()));
        let (status, v) = parse_response(r).unwrap();
        assert_eq!((status, v["fault_message"].as_str()), (400, Some("nope")));
        assert_eq!(parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap(), (204, Value::Null));
        assert!(parse_response(b"garbage").is_err());
    }
}
