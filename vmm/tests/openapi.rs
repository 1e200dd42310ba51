//! The OpenAPI document (vmm/api/openapi.json) and the server agree: every documented operation
//! is answered with a documented status and a body matching its schema, every example request
//! body is accepted as documented, and Firecracker operations the document leaves out are
//! refused as unknown, so the document cannot claim more or less than the server does.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use serde_json::Value;
use shoal_vmm::api::http::Request;
use shoal_vmm::api::request::VmmAction;
use shoal_vmm::api::routes::{ApiState, BootSource, InstanceState, Outcome};
use shoal_vmm::devices::virtio::balloon::BalloonConfig;
use shoal_vmm::metrics::MetricsSnapshot;

const DOC: &str = include_str!("../api/openapi.json");

fn doc() -> Value {
    serde_json::from_str(DOC).unwrap()
}

fn schema<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let name = reference.strip_prefix("#/components/schemas/").unwrap();
    &doc["components"]["schemas"][name]
}

/// Checks `value` against an object schema: required fields present, no others, enums kept.
fn conforms(schema: &Value, value: &Value) -> Result<(), String> {
    let obj = value.as_object().ok_or("not an object")?;
    if schema["additionalProperties"] == Value::Bool(true) {
        return Ok(()); // free-form (the MMDS document)
    }
    for r in schema["required"].as_array().unwrap() {
        if !obj.contains_key(r.as_str().unwrap()) {
            return Err(format!("missing required {r}"));
        }
    }
    let props = schema["properties"].as_object().unwrap();
    for (k, v) in obj {
        let p = props.get(k).ok_or(format!("undocumented field {k}"))?;
        if let Some(allowed) = p["enum"].as_array() {
            if !allowed.contains(v) {
                return Err(format!("{k}={v} not in {allowed:?}"));
            }
        }
    }
    Ok(())
}

fn ready_state() -> ApiState {
    ApiState {
        boot: Some(BootSource { kernel_image_path: "/k".into(), boot_args: None, initrd_path: None }),
        ..ApiState::default()
    }
}

#[test]
fn every_documented_operation_is_served_as_documented() {
    let doc = doc();
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            let body = op["requestBody"]["content"]["application/json"]["example"].to_string();
            let body = if op.get("requestBody").is_some() { body } else { String::new() };
            // Path parameters take the example body's value of the same name.
            let example = &op["requestBody"]["content"]["application/json"]["example"];
            let mut concrete = path.clone();
            if let (Some(open), Some(close)) = (path.find('{'), path.find('}')) {
                let name = &path[open + 1..close];
                concrete = format!("{}{}{}", &path[..open], example[name].as_str().unwrap(), &path[close + 1..]);
            }
            let req = Request { method: method.to_uppercase(), path: concrete, body: body.into_bytes(), close: false };
            // PATCH /vm applies to a running microVM; the rest are tried before start.
            let mut state = ready_state();
            if path == "/vm" || method == "patch" || (path == "/balloon/statistics" && method == "get") {
                state.state = InstanceState::Running;
            }
            if path == "/mmds/config" {
                let eth0 = r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#;
                state.nets.push(serde_json::from_str(eth0).unwrap());
                if method == "get" {
                    state.mmds_config = serde_json::from_str(r#"{"network_interfaces": ["eth0"]}"#).unwrap();
                }
            }
            if path.starts_with("/balloon") && method != "put" {
                state.balloon =
                    Some(BalloonConfig { amount_mib: 16, deflate_on_oom: false, stats_polling_interval_s: 1 });
            }
            if path == "/snapshot/create" {
                state.state = InstanceState::Paused;
            }
            let response = match state.handle(&req) {
                Outcome::Reply(r) => r,
                // Handed to the VMM thread, which answers 204 when it succeeds.
                Outcome::Ask(
                    VmmAction::SetPaused(_)
                    | VmmAction::CreateSnapshot { .. }
                    | VmmAction::LoadSnapshot(_)
                    | VmmAction::MetricsFile(_)
                    | VmmAction::FlushMetrics
                    | VmmAction::SendCtrlAltDel
                    | VmmAction::PatchDevice(_)
                    | VmmAction::Logger { .. },
                ) => shoal_vmm::api::http::Response::no_content(),
                Outcome::Ask(VmmAction::Metrics { prometheus: true }) => {
                    shoal_vmm::api::http::Response::prometheus(MetricsSnapshot::default().to_prometheus())
                }
                Outcome::Ask(VmmAction::Metrics { prometheus: false }) => {
                    shoal_vmm::api::http::Response::json(200, MetricsSnapshot::default().to_json())
                }
                Outcome::Ask(VmmAction::BalloonStats) => shoal_vmm::api::http::Response::json(
                    200,
                    r#"{"target_pages": 4096, "actual_pages": 0, "target_mib": 16, "actual_mib": 0, "free_memory": 1}"#
                        .into(),
                ),
                Outcome::Ask(VmmAction::Start(_)) => panic!("the examples do not start the VM"),
            };
            let documented = &op["responses"][response.status.to_string()];
            assert!(
                documented.is_object(),
                "{method} {path}: status {} is not documented ({:?})",
                response.status,
                response.body
            );
            assert!(response.status < 400, "{method} {path}: its example is refused: {:?}", response.body);
            if let Some(reference) = documented["content"]["application/json"]["schema"]["$ref"].as_str() {
                let value: Value = serde_json::from_str(response.body.as_deref().unwrap()).unwrap();
                conforms(schema(&doc, reference), &value).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            }
            if let Some(reference) = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].as_str() {
                let example = &op["requestBody"]["content"]["application/json"]["example"];
                conforms(schema(&doc, reference), example).unwrap_or_else(|e| panic!("{method} {path} example: {e}"));
            }
        }
    }
    assert_eq!(operations, 30, "every operation in the document was tried");
}

#[test]
fn errors_have_the_documented_shape() {
    let doc = doc();
    let req = Request { method: "PUT".into(), path: "/machine-config".into(), body: b"{}".to_vec(), close: false };
    let Outcome::Reply(r) = ApiState::default().handle(&req) else { panic!() };
    assert_eq!(r.status, 400);
    let value: Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
    conforms(schema(&doc, "#/components/schemas/Error"), &value).unwrap();
}

#[test]
fn undocumented_firecracker_operations_are_refused_as_unknown() {
    let doc = doc();
    let candidates = [
        ("PATCH", "/vm"),
        ("GET", "/vm"),
        ("PUT", "/snapshot/create"),
        ("PUT", "/snapshot/load"),
        ("PUT", "/drives/rootfs"),
        ("PUT", "/network-interfaces/eth0"),
        ("PUT", "/vsock"),
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PATCH", "/machine-config"),
        ("GET", "/boot-source"),
        ("GET", "/vm/config"),
        ("GET", "/version"),
        ("PATCH", "/drives/rootfs"),
        ("PATCH", "/network-interfaces/eth0"),
        ("PUT", "/mmds"),
        ("PUT", "/mmds/config"),
        ("PUT", "/balloon"),
        ("GET", "/balloon/statistics"),
    ];
    for (method, path) in candidates {
        // A documented path template (`/drives/{drive_id}`) covers the concrete path.
        let documented = doc["paths"].as_object().unwrap().iter().any(|(template, item)| {
            let matches = match template.find('{') {
                Some(open) => path.starts_with(&template[..open]) && path.len() > open,
                None => template == path,
            };
            matches && item[method.to_lowercase()].is_object()
        });
        let req = Request { method: method.into(), path: path.into(), body: b"{}".to_vec(), close: false };
        let r = match ready_state().handle(&req) {
            Outcome::Reply(r) => r,
            // Handed to the VMM thread: a known operation.
            _ => shoal_vmm::api::http::Response::no_content(),
        };
        let unknown = r.status == 400 && r.body.as_deref().unwrap_or("").contains("Invalid request method and/or path");
        assert_eq!(documented, !unknown, "{method} {path}: documented={documented}, server says {:?}", r.body);
    }
}
