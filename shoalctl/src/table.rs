//! Human-readable tables of the API's objects (kubectl's plain style: no borders, one row per
//! object), and the small formatting they need (ages, sizes, short ids).

use std::time::{Duration, SystemTime};

use comfy_table::{presets, ContentArrangement, Table};
use serde_json::Value;

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled).set_header(header.to_vec());
    t
}

/// The table as text: rows flush left, no trailing blanks.
fn finish(t: Table) -> String {
    t.to_string().lines().map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end()).collect::<Vec<_>>().join("\n")
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `5s`, `3m`, `2h`, `4d` since an RFC 3339 time.
pub fn age(at: &Value, now: SystemTime) -> String {
    let Some(t) = at.as_str().and_then(|s| humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).ok()) else {
        return "-".into();
    };
    let d = now.duration_since(t).unwrap_or(Duration::ZERO).as_secs();
    match d {
        d if d < 120 => format!("{d}s"),
        d if d < 7200 => format!("{}m", d / 60),
        d if d < 172_800 => format!("{}h", d / 3600),
        d => format!("{}d", d / 86_400),
    }
}

pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn labels(v: &Value) -> String {
    let s: Vec<String> =
        v.as_object().into_iter().flatten().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect();
    if s.is_empty() {
        "-".into()
    } else {
        s.join(",")
    }
}

fn items<'a>(list: &'a Value, key: &str) -> Vec<&'a Value> {
    match list.get(key).and_then(Value::as_array) {
        Some(a) => a.iter().collect(),
        None => vec![list],
    }
}

pub fn nodes(list: &Value, now: SystemTime) -> String {
    let mut t =
        table(&["ID", "ADDRESS", "ALIVE", "CORDONED", "VCPUS", "MEM MIB", "INSTANCES", "LABELS", "TAINTS", "AGE"]);
    for n in items(list, "nodes") {
        let used =
            |k: &str| format!("{}/{}", n["allocated"][k].as_u64().unwrap_or(0), n["capacity"][k].as_u64().unwrap_or(0));
        let cordoned = match (&n["drain"], n["cordoned"].as_bool()) {
            (Value::Object(d), _) if d.get("done") == Some(&Value::Bool(true)) => "drained".to_string(),
            (Value::Object(d), _) => {
                format!("draining ({} left)", d.get("remaining").and_then(Value::as_u64).unwrap_or(0))
            }
            (_, Some(c)) => c.to_string(),
            _ => "-".into(),
        };
        let taints: Vec<String> = n["taints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let field = |k: &str| t[k].as_str().unwrap_or("").to_string();
                format!("{}={}:{}", field("key"), field("value"), field("effect"))
            })
            .collect();
        t.add_row(vec![
            text(&n["id"]),
            text(&n["api_addr"]),
            // A node shutting down in order is alive but going.
            if n["stopping"] == true { "stopping".to_string() } else { text(&n["alive"]) },
            cordoned,
            used("vcpus"),
            used("mem_mib"),
            text(&n["instances"]),
            labels(&n["labels"]),
            if taints.is_empty() { "-".into() } else { taints.join(",") },
            age(&n["created_at"], now),
        ]);
    }
    finish(t)
}

pub fn tenants(list: &Value, now: SystemTime) -> String {
    let mut t = table(&["NAME", "VCPUS", "MEM MIB", "INSTANCES", "AGE"]);
    for x in items(list, "tenants") {
        let q = |k: &str| {
            let limit = x["quota"][k].as_u64().map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            format!("{}/{limit}", x["usage"][k].as_u64().unwrap_or(0))
        };
        t.add_row(vec![text(&x["name"]), q("vcpus"), q("mem_mib"), q("instances"), age(&x["created_at"], now)]);
    }
    finish(t)
}

pub fn deployments(list: &Value, now: SystemTime) -> String {
    let mut t = table(&["NAME", "REPLICAS", "RUNNING", "UPDATED", "PENDING", "GENERATION", "AGE", "MESSAGE"]);
    for d in items(list, "deployments") {
        let replicas = if d["deleting"] == true { "deleting".to_string() } else { text(&d["replicas"]) };
        t.add_row(vec![
            text(&d["name"]),
            replicas,
            text(&d["status"]["running"]),
            text(&d["status"]["updated"]),
            text(&d["status"]["pending"]),
            text(&d["generation"]),
            age(&d["created_at"], now),
            text(&d["status"]["message"]),
        ]);
    }
    finish(t)
}

pub fn instances(list: &Value, now: SystemTime) -> String {
    let mut t = table(&["ID", "DEPLOYMENT", "NODE", "STATE", "ADDRESS", "RESTARTS", "EXIT", "AGE", "REASON"]);
    for i in items(list, "instances") {
        let state = match (i["state"].as_str(), i["desired"].as_str()) {
            (Some(s), Some("stopped")) => format!("{s} (stopping)"),
            (Some(s), _) => s.to_string(),
            _ => "-".into(),
        };
        t.add_row(vec![
            text(&i["id"]),
            text(&i["deployment"]),
            text(&i["node"]),
            state,
            text(&i["address"]),
            text(&i["restarts"]),
            text(&i["last_exit_code"]),
            age(&i["created_at"], now),
            text(&i["reason"]),
        ]);
    }
    finish(t)
}

pub fn images(list: &Value, now: SystemTime) -> String {
    let mut t = table(&["DIGEST", "SIZE", "NODES", "AGE"]);
    for i in items(list, "images") {
        let nodes = i["nodes"].as_array().map(|a| a.len()).unwrap_or(0);
        t.add_row(vec![
            text(&i["digest"]),
            size(i["size"].as_u64().unwrap_or(0)),
            nodes.to_string(),
            age(&i["created_at"], now),
        ]);
    }
    finish(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ages_and_sizes_read_like_kubectl() {
        let now = humantime::parse_rfc3339("2026-12-01T12:00:00Z").unwrap();
        assert_eq!(age(&json!("2026-12-01T11:59:30.000Z"), now), "30s");
        assert_eq!(age(&json!("2026-12-01T11:00:00Z"), now), "60m");
        assert_eq!(age(&json!("2026-11-28T12:00:00Z"), now), "3d");
        assert_eq!(age(&json!(null), now), "-");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(7 << 20), "7.0 MiB");
    }

    #[test]
    fn an_instance_table_has_a_row_per_instance() {
        let now = SystemTime::now();
        let list = json!({"instances": [
            {"id": "web-a", "deployment": "web", "node": "01", "state": "running", "desired": "running", "address": "10.200.0.2", "restarts": 0, "last_exit_code": null, "reason": ""},
            {"id": "web-b", "deployment": "web", "node": null, "state": "pending", "desired": "running", "restarts": 0, "reason": "no node has 64 MiB free: 1 node checked"}
        ]});
        let out = instances(&list, now);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].split_whitespace().collect::<Vec<_>>().starts_with(&["ID", "DEPLOYMENT", "NODE", "STATE"]));
        assert!(lines[1].split_whitespace().nth(4) == Some("10.200.0.2"), "the address column: {out}");
        assert!(lines[2].contains("pending") && lines[2].contains("no node has 64 MiB free"), "{out}");
    }

    #[test]
    fn a_node_shutting_down_reads_stopping_in_the_alive_column() {
        let node = |id: &str, stopping: bool| {
            json!({"id": id, "api_addr": "10.0.0.1:7400", "alive": true, "stopping": stopping, "cordoned": false,
                   "capacity": {"vcpus": 4, "mem_mib": 1024}, "allocated": {"vcpus": 0, "mem_mib": 0},
                   "instances": 0, "labels": {}, "taints": []})
        };
        let out = nodes(&json!({"nodes": [node("aa", false), node("bb", true)]}), SystemTime::now());
        let alive = |line: &str| line.split_whitespace().nth(2).map(str::to_string);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(alive(lines[1]).as_deref(), Some("true"), "{out}");
        assert_eq!(alive(lines[2]).as_deref(), Some("stopping"), "{out}");
    }
}
