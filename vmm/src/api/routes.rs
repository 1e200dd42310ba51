//! The control API's resources, with Firecracker's paths, field names, status codes and error
//! body, for what Shoal implements so far: instance info, machine configuration, boot source,
//! and starting the instance. Pure request handling over `ApiState`; the server thread does
//! the I/O and hands a start to the VMM thread.

use serde::{Deserialize, Serialize};

use super::http::{Request, Response};
use super::VmConfig;

const NOT_AFTER_START: &str = "The requested operation is not supported after starting the microVM.";

/// `PUT/GET /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig { vcpu_count: 1, mem_size_mib: 128, smt: false, track_dirty_pages: false }
    }
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    pub action_type: ActionType,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateRequest {
    pub state: VmStateName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmStateName {
    Paused,
    Resumed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// Where the instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    NotStarted,
    Running,
    Paused,
}

impl InstanceState {
    fn as_str(self) -> &'static str {
        match self {
            InstanceState::NotStarted => "Not started",
            InstanceState::Running => "Running",
            InstanceState::Paused => "Paused",
        }
    }
}

/// What the API knows: the configuration being assembled, and the instance state.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub id: String,
    pub machine: MachineConfig,
    pub boot: Option<BootSource>,
    pub state: InstanceState,
}

impl Default for ApiState {
    fn default() -> Self {
        ApiState { id: "anonymous-instance".into(), machine: MachineConfig::default(), boot: None, state: InstanceState::NotStarted }
    }
}

/// What the server must do after answering.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send this response.
    Reply(Response),
    /// Ask the VMM thread to build and start this configuration; reply 204 if it does, else
    /// 400 with its error.
    Start(VmConfig),
    /// Ask the VMM thread to pause (true) or resume (false) the running microVM.
    SetPaused(bool),
}

fn parse_body<T: for<'de> Deserialize<'de>>(req: &Request) -> Result<T, Response> {
    serde_json::from_slice(&req.body).map_err(|e| Response::fault(400, format!("Invalid request body: {e}")))
}

impl ApiState {
    /// The configuration the instance would start with now.
    pub fn vm_config(&self) -> Result<VmConfig, Response> {
        let boot = self.boot.as_ref().ok_or_else(|| Response::fault(400, "Cannot start microvm without kernel configuration."))?;
        let mut config = VmConfig::new(&boot.kernel_image_path);
        config.initrd = boot.initrd_path.as_ref().map(Into::into);
        if let Some(args) = &boot.boot_args {
            config.cmdline = args.clone();
        }
        config.vcpus = self.machine.vcpu_count;
        config.mem_mib = self.machine.mem_size_mib;
        config.validate().map_err(|e| Response::fault(400, super::error_chain(&e)))?;
        Ok(config)
    }

    /// Handles one request.
    pub fn handle(&mut self, req: &Request) -> Outcome {
        let started = self.state != InstanceState::NotStarted;
        let reply = match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/") => {
                let info = serde_json::json!({
                    "id": self.id,
                    "state": self.state.as_str(),
                    "vmm_version": env!("CARGO_PKG_VERSION"),
                    "app_name": "shoal-vmm",
                });
                Response::json(200, info.to_string())
            }
            ("GET", "/machine-config") => Response::json(200, serde_json::to_string(&self.machine).unwrap_or_default()),
            ("PUT", "/machine-config") if started => Response::fault(400, NOT_AFTER_START),
            ("PUT", "/machine-config") => match parse_body::<MachineConfig>(req) {
                Ok(m) if m.vcpu_count == 0 || m.vcpu_count > 254 => Response::fault(400, format!("Invalid vCPU count: {} (1 to 254)", m.vcpu_count)),
                Ok(m) if m.mem_size_mib == 0 => Response::fault(400, "Invalid memory size: 0 MiB"),
                Ok(m) if m.smt => Response::fault(400, "Simultaneous multithreading is not supported by shoal-vmm."),
                Ok(m) => {
                    self.machine = m;
                    Response::no_content()
                }
                Err(r) => r,
            },
            ("PUT", "/boot-source") if started => Response::fault(400, NOT_AFTER_START),
            ("PUT", "/boot-source") => match parse_body::<BootSource>(req) {
                Ok(b) => match b.boot_args.as_deref().map(crate::arch::x86_64::boot::check_cmdline) {
                    Some(Err(e)) => Response::fault(400, format!("Invalid boot arguments: {e}")),
                    _ => {
                        self.boot = Some(b);
                        Response::no_content()
                    }
                },
                Err(r) => r,
            },
            ("PUT", "/actions") => match parse_body::<InstanceAction>(req) {
                Ok(InstanceAction { action_type: ActionType::InstanceStart }) if started => {
                    Response::fault(400, "The microVM is already running.")
                }
                Ok(InstanceAction { action_type: ActionType::InstanceStart }) => match self.vm_config() {
                    Ok(config) => return Outcome::Start(config),
                    Err(r) => r,
                },
                Ok(InstanceAction { action_type: ActionType::FlushMetrics }) => Response::no_content(),
                Ok(InstanceAction { action_type: ActionType::SendCtrlAltDel }) => {
                    Response::fault(400, "SendCtrlAltDel is not supported by shoal-vmm yet.")
                }
                Err(r) => r,
            },
            ("PATCH", "/vm") => match parse_body::<VmStateRequest>(req) {
                Ok(_) if !started => Response::fault(400, "The microVM is not running."),
                Ok(VmStateRequest { state: VmStateName::Paused }) => return Outcome::SetPaused(true),
                Ok(VmStateRequest { state: VmStateName::Resumed }) => return Outcome::SetPaused(false),
                Err(r) => r,
            },
            (_, "/" | "/machine-config" | "/boot-source" | "/actions") => {
                Response::fault(400, format!("Invalid request method and/or path: {} {}.", req.method, req.path))
            }
            _ => Response::fault(400, format!("Invalid request method and/or path: {} {}.", req.method, req.path)),
        };
        Outcome::Reply(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request { method: method.into(), path: path.into(), body: body.as_bytes().to_vec(), close: false }
    }

    fn reply(state: &mut ApiState, method: &str, path: &str, body: &str) -> Response {
        match state.handle(&req(method, path, body)) {
            Outcome::Reply(r) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn fault(r: &Response) -> String {
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        v["fault_message"].as_str().unwrap().to_string()
    }

    #[test]
    fn firecracker_getting_started_sequence_starts_the_instance() {
        let mut s = ApiState::default();
        let info = reply(&mut s, "GET", "/", "");
        assert!(info.body.unwrap().contains("\"state\":\"Not started\""));
        let r = reply(&mut s, "PUT", "/boot-source", r#"{"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}"#);
        assert_eq!(r.status, 204);
        assert_eq!(reply(&mut s, "PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 1024, "smt": false}"#).status, 204);
        match s.handle(&req("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#)) {
            Outcome::Start(c) => {
                assert_eq!((c.vcpus, c.mem_mib, c.cmdline.as_str()), (2, 1024, "console=ttyS0 reboot=k panic=1 pci=off"));
                assert_eq!(c.kernel.to_str(), Some("/k/vmlinux"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_bodies_get_400_with_a_fault_message() {
        let mut s = ApiState::default();
        let cases = [
            ("PUT", "/machine-config", "{not json"),
            ("PUT", "/machine-config", r#"{"vcpu_count": 2}"#),
            ("PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 64, "bogus": 1}"#),
            ("PUT", "/machine-config", r#"{"vcpu_count": 0, "mem_size_mib": 64}"#),
            ("PUT", "/machine-config", r#"{"vcpu_count": -1, "mem_size_mib": 64}"#),
            ("PUT", "/machine-config", r#"{"vcpu_count": 300, "mem_size_mib": 64}"#),
            ("PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 0}"#),
            ("PUT", "/boot-source", r#"{"boot_args": "x"}"#),
            ("PUT", "/actions", r#"{"action_type": "Explode"}"#),
            ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
            ("DELETE", "/machine-config", ""),
            ("GET", "/nope", ""),
        ];
        for (m, p, b) in cases {
            let r = reply(&mut s, m, p, b);
            assert_eq!(r.status, 400, "{m} {p} {b}");
            assert!(!fault(&r).is_empty());
        }
        let long = format!(r#"{{"kernel_image_path": "/k", "boot_args": "{}"}}"#, "a".repeat(3000));
        assert!(fault(&reply(&mut s, "PUT", "/boot-source", &long)).contains("at most 2047"));
        assert_eq!(s.machine, MachineConfig::default(), "refused requests change nothing");
        assert!(s.boot.is_none());
    }

    #[test]
    fn after_start_configuration_is_frozen_and_start_is_refused() {
        let mut s = ApiState { state: InstanceState::Running, ..ApiState::default() };
        for (p, b) in [("/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 64}"#), ("/boot-source", r#"{"kernel_image_path": "/k"}"#)] {
            let r = reply(&mut s, "PUT", p, b);
            assert_eq!((r.status, fault(&r).as_str()), (400, NOT_AFTER_START));
        }
        let r = reply(&mut s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
        assert_eq!(r.status, 400);
        assert!(reply(&mut s, "GET", "/", "").body.unwrap().contains("\"state\":\"Running\""));
        assert_eq!(s.handle(&req("PATCH", "/vm", r#"{"state": "Paused"}"#)), Outcome::SetPaused(true));
        assert_eq!(s.handle(&req("PATCH", "/vm", r#"{"state": "Resumed"}"#)), Outcome::SetPaused(false));
        assert_eq!(reply(&mut s, "PATCH", "/vm", r#"{"state": "Frozen"}"#).status, 400);
    }

    #[test]
    fn pause_before_start_is_refused() {
        let mut s = ApiState::default();
        let r = reply(&mut s, "PATCH", "/vm", r#"{"state": "Paused"}"#);
        assert_eq!((r.status, fault(&r).as_str()), (400, "The microVM is not running."));
    }
}
