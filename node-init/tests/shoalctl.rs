//! `shoalctl` driven as a user would, against a real node in a network namespace running probe
//! guests: contexts, apply (with an image given as a file), rollout status, get as tables, JSON
//! and names, logs and logs -f, get -w, scale, tokens, delete, and errors as one line with a
//! non-zero exit. Needs root and /dev/kvm, and shoalctl built beside shoal-node (make build).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{agreed_status, wait_for, Net};

fn shoalctl_binary() -> PathBuf {
    std::env::var_os("SHOALCTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_BIN_EXE_shoal-node")).with_file_name("shoalctl"))
}

struct Ctl {
    config: PathBuf,
}

impl Ctl {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(shoalctl_binary());
        c.args(args).env("SHOAL_CONFIG", &self.config).env_remove("SHOAL_TOKEN").env_remove("SHOAL_ENDPOINT");
        c.stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "shoalctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects failure with one line on stderr; returns it.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "shoalctl {args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "one line: {err:?}");
        assert!(err.starts_with("shoalctl: "), "{err}");
        err
    }

    fn spawn(&self, args: &[&str]) -> (Child, std::sync::mpsc::Receiver<String>) {
        let mut child = self.cmd(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        (child, rx)
    }
}

/// Waits for a line that `pred` accepts from a spawned shoalctl.
fn wait_line(rx: &std::sync::mpsc::Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if pred(&line) {
                return line;
            }
            seen.push(line);
        }
    }
    panic!("no line with {what}; saw {seen:#?}");
}

#[test]
fn shoalctl_applies_gets_follows_scales_and_deletes_as_a_user_would() {
    if !support::can_run_vms() {
        return;
    }
    assert!(shoalctl_binary().is_file(), "{} is missing: build it (make build)", shoalctl_binary().display());
    let mut net = Net::new("s");
    let node = net.node(0, &["--min-voters", "1", "--capacity", "vcpus=4,mem-mib=1024"]);
    wait_for(Duration::from_secs(30), "a one-node cluster", || agreed_status(&[&node]));
    let dir = tempfile::tempdir().unwrap();
    let ctl = Ctl { config: dir.path().join("config") };

    // A context, as a kubeconfig holds one.
    let token_file = node.data_dir.join("api-token");
    let set = ctl.ok(&[
        "config",
        "set-context",
        "test",
        "--endpoint",
        &node.addr(),
        "--token-file",
        token_file.to_str().unwrap(),
        "--tenant",
        "acme",
        "--ca",
        node.ca_file().to_str().unwrap(),
    ]);
    assert!(set.contains("context test set"), "{set}");
    let view = ctl.ok(&["config", "view"]);
    assert!(
        view.contains("current-context: test") && view.contains("token: (set)") && !view.contains(node.token()),
        "{view}"
    );

    // apply: a tenant and a deployment whose kernel is a file next to the manifest.
    std::fs::copy(shoal_probe_guest::path("workload").unwrap(), dir.path().join("workload.elf")).unwrap();
    let manifest = dir.path().join("app.yaml");
    std::fs::write(
        &manifest,
        "kind: Tenant\nname: acme\nquota: {vcpus: 4, mem_mib: 1024}\n---\nkind: Deployment\nname: web\nreplicas: 2\nlabels: {app: web}\ntemplate:\n  kernel: ./workload.elf\n  cmdline: from-shoalctl\n  mem_mib: 64\n",
    )
    .unwrap();
    let applied = ctl.run(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    let stdout = String::from_utf8_lossy(&applied.stdout);
    assert_eq!(stdout.lines().collect::<Vec<_>>(), ["tenant/acme created", "deployment/web (tenant acme) created"]);
    assert!(String::from_utf8_lossy(&applied.stderr).contains("pushed as sha256:"));
    let rolled = ctl.ok(&["rollout", "status", "web"]);
    assert!(rolled.ends_with("deployment/web rolled out\n"), "{rolled}");

    // get: a table for people, JSON and names for scripts.
    let table = ctl.ok(&["get", "instances"]);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert_eq!(
        rows[0].split_whitespace().collect::<Vec<_>>(),
        ["ID", "DEPLOYMENT", "NODE", "STATE", "ADDRESS", "RESTARTS", "EXIT", "AGE", "REASON"]
    );
    assert!(rows[1..].iter().all(|r| r.contains(" running ") && r.starts_with("web-")), "{table}");
    let json: Value = serde_json::from_str(&ctl.ok(&["get", "instances", "-o", "json"])).unwrap();
    assert_eq!(json["instances"].as_array().unwrap().len(), 2);
    let names = ctl.ok(&["get", "instances", "-o", "name"]);
    let ids: Vec<&str> = names.lines().collect();
    assert_eq!(ids.len(), 2);
    let one = ctl.ok(&["get", "instances", ids[0], "-o", "json"]);
    assert_eq!(serde_json::from_str::<Value>(&one).unwrap()["id"], ids[0]);
    for (kind, header) in [("nodes", "ID"), ("tenants", "NAME"), ("deployments", "NAME"), ("images", "DIGEST")] {
        let out = ctl.ok(&["get", kind]);
        assert!(out.lines().count() >= 2 && out.starts_with(header), "get {kind}: {out}");
    }
    assert!(ctl.ok(&["get", "deployments"]).lines().nth(1).unwrap().split_whitespace().take(3).eq(["web", "2", "2"]));

    // logs, and logs -f that keeps printing as the guest does.
    let logs = ctl.ok(&["logs", ids[0]]);
    assert!(logs.starts_with("SHOAL-PROBE workload: start cmdline=from-shoalctl"), "{logs}");
    let last_tick =
        logs.lines().filter_map(|l| l.strip_prefix("tick=")).filter_map(|n| n.parse::<u64>().ok()).max().unwrap_or(0);
    let (mut follow, lines) = ctl.spawn(&["logs", "-f", ids[0]]);
    wait_line(&lines, "a newer tick", |l| {
        l.strip_prefix("tick=").and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > last_tick + 1)
    });
    let _ = follow.kill();
    let _ = follow.wait();

    // attach: what is typed goes to the guest's console (the probe echoes a typed line back).
    let mut attach = ctl
        .cmd(&["attach", ids[0]])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = attach.stdout.take().unwrap();
    let (tx, typed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    {
        use std::io::Write;
        attach.stdin.as_mut().unwrap().write_all(b"hello from attach\n").unwrap();
    }
    wait_line(&typed, "the guest echoing the typed line", |l| l == "typed: hello from attach");
    let _ = attach.kill();
    let _ = attach.wait();

    // get -w shows the instances a scale-up adds, as they change.
    let (mut watch, events) = ctl.spawn(&["get", "instances", "-w"]);
    wait_line(&events, "the header", |l| l.starts_with("ID"));
    let scaled = ctl.ok(&["scale", "web", "3"]);
    assert_eq!(scaled.trim(), "deployment/web scaled to 3");
    let new_row = wait_line(&events, "a new instance's row", |l| {
        l.starts_with("web-") && !ids.iter().any(|id| l.starts_with(id))
    });
    assert!(new_row.contains("web"), "{new_row}");
    let _ = watch.kill();
    let _ = watch.wait();
    ctl.ok(&["rollout", "status", "web"]);
    assert_eq!(ctl.ok(&["get", "instances", "-o", "name"]).lines().count(), 3);

    // plan: what a bigger deployment would do, changing nothing.
    let bigger = dir.path().join("bigger.yaml");
    std::fs::write(
        &bigger,
        "kind: Deployment\nname: web\nreplicas: 4\ntemplate:\n  kernel: ./workload.elf\n  mem_mib: 64\n",
    )
    .unwrap();
    let planned = ctl.ok(&["plan", "-f", bigger.to_str().unwrap()]);
    assert!(planned.starts_with("deployment/web (tenant acme): 4 placed, 0 pending, 0 preempted"), "{planned}");
    assert!(planned.contains(&format!("node {}  4", node.id())), "{planned}");
    std::fs::write(&bigger, "kind: Deployment\nname: web\nreplicas: 5\ntemplate:\n  kernel: ./workload.elf\n").unwrap();
    assert!(
        ctl.fails(&["plan", "-f", bigger.to_str().unwrap()]).contains("quota of 4 vCPUs"),
        "a plan refuses as apply would"
    );
    assert_eq!(ctl.ok(&["get", "instances", "-o", "name"]).lines().count(), 3, "planning changed nothing");
    // Node labels and taints, as kubectl label / taint edit them.
    let node_id = node.id();
    assert_eq!(ctl.ok(&["label", &node_id, "pool=web", "disk=ssd"]).trim(), format!("node/{node_id} labeled"));
    assert_eq!(ctl.ok(&["taint", &node_id, "gpu=true:no_schedule"]).trim(), format!("node/{node_id} tainted"));
    let nodes = ctl.ok(&["get", "nodes"]);
    assert!(nodes.contains("pool=web") && nodes.contains("gpu=true:no_schedule"), "{nodes}");
    ctl.ok(&["taint", &node_id, "gpu-"]);
    ctl.ok(&["label", &node_id, "disk-"]);
    let json: Value = serde_json::from_str(&ctl.ok(&["get", "nodes", &node_id, "-o", "json"])).unwrap();
    assert_eq!(
        (json["taints"].as_array().map(|t| t.len()), json["api_labels"]["pool"].as_str()),
        (Some(0), Some("web"))
    );

    // A tenant token sees its tenant and nothing else.
    let token = ctl.ok(&["token", "create", "acme"]).trim().to_string();
    assert!(token.starts_with("shoal-t-"), "{token}");
    assert_eq!(ctl.ok(&["--token", &token, "get", "instances", "-o", "name"]).lines().count(), 3);
    let refused = ctl.fails(&["--token", &token, "get", "nodes"]);
    assert!(refused.contains("(403)"), "{refused}");

    // Errors: one clear line, exit status 1.
    let missing = ctl.fails(&["delete", "deployment", "nope"]);
    assert!(missing.contains("does not exist") && missing.contains("(404)"), "{missing}");
    let bad_token = ctl.fails(&["--token", "wrong", "get", "nodes"]);
    assert!(bad_token.contains("(401)"), "{bad_token}");
    let bad_file = dir.path().join("bad.yaml");
    std::fs::write(&bad_file, "kind: Pod\nname: x\n").unwrap();
    let bad = ctl.fails(&["apply", "-f", bad_file.to_str().unwrap()]);
    assert!(bad.contains("unknown kind"), "{bad}");
    let over = dir.path().join("over.yaml");
    std::fs::write(
        &over,
        format!(
            "kind: Deployment\nname: big\nreplicas: 9\ntemplate: {{kernel: {}}}\n",
            serde_json::from_str::<Value>(&one).unwrap()["template"]["kernel"]
        ),
    )
    .unwrap();
    let refused = ctl.fails(&["apply", "-f", over.to_str().unwrap()]);
    assert!(refused.contains("quota") && refused.contains("(422)"), "{refused}");

    // image push prints the digest of the bytes.
    let digest = ctl.ok(&["image", "push", "-q", dir.path().join("workload.elf").to_str().unwrap()]);
    assert_eq!(digest.trim(), serde_json::from_str::<Value>(&one).unwrap()["template"]["kernel"]);

    // delete: the deployment goes, its instances with it; then the objects of a file.
    assert_eq!(ctl.ok(&["delete", "deployment", "web"]).trim(), "deployment/web deleted");
    wait_for(Duration::from_secs(30), "the instances to go", || {
        ctl.ok(&["get", "instances", "-o", "name"]).trim().is_empty().then_some(())
    });
    assert!(node.vm_pids().is_empty(), "no microVM is left running");
    let tenant_file = dir.path().join("tenant.json");
    std::fs::write(&tenant_file, r#"{"kind": "Tenant", "name": "acme"}"#).unwrap();
    assert_eq!(ctl.ok(&["delete", "-f", tenant_file.to_str().unwrap()]).trim(), "tenant/acme deleted");
    assert_eq!(ctl.ok(&["get", "tenants", "-o", "name"]).trim(), "");
}

/// The API is TLS: the shoalctl config a node writes (with the cluster CA) and curl with
/// `--cacert DATA_DIR/tls/ca.crt` reach it; a client that does not trust the CA is refused.
#[test]
fn the_node_written_config_and_its_ca_reach_the_api_and_nothing_else_verifies() {
    if !support::can_run() {
        return;
    }
    assert!(shoalctl_binary().is_file(), "{} is missing: build it (make build)", shoalctl_binary().display());
    let mut net = Net::new("t");
    let node = net.node(0, &["--min-voters", "1"]);
    wait_for(Duration::from_secs(30), "a one-node cluster", || agreed_status(&[&node]));
    let written = Ctl { config: node.data_dir.join("shoalctl.yaml") };
    wait_for(Duration::from_secs(5), "the node to write its shoalctl config", || written.config.exists().then_some(()));
    let names = written.ok(&["get", "nodes", "-o", "name"]);
    assert!(names.contains(&node.id()), "{names}");

    let dir = tempfile::tempdir().unwrap();
    let bare = Ctl { config: dir.path().join("config") };
    let token_file = node.data_dir.join("api-token");
    let args = ["--endpoint", &node.addr(), "--token-file", token_file.to_str().unwrap(), "get", "nodes"];
    let err = bare.fails(&args);
    assert!(err.contains("certificate") || err.contains("UnknownIssuer"), "{err}");

    // A client that connects and never starts its handshake holds up nobody.
    let _silent = std::net::TcpStream::connect(node.addr()).unwrap();
    let curl = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "5", "--cacert", node.ca_file().to_str().unwrap(), "-H"])
        .arg(format!("Authorization: Bearer {}", node.token()))
        .arg(format!("https://{}/v1/cluster/status", node.addr()))
        .output()
        .expect("curl runs");
    assert!(curl.status.success(), "{}", String::from_utf8_lossy(&curl.stderr));
    let status: serde_json::Value = serde_json::from_slice(&curl.stdout).unwrap();
    assert!(status["cluster_id"].as_str().is_some_and(|c| !c.is_empty()), "{status}");
    let insecure = Command::new("curl")
        .args(["-sS", "--fail", "-H"])
        .arg(format!("Authorization: Bearer {}", node.token()))
        .arg(format!("https://{}/v1/cluster/status", node.addr()))
        .output()
        .unwrap();
    assert!(!insecure.status.success(), "curl trusted the node without its CA");
}

/// A user who has only the cluster secret (a node booted from the host image keeps its CA on
/// the node): `config set-context --secret-file` derives the token and takes the CA the node
/// proves with the secret; a wrong secret gets no context.
#[test]
fn a_context_made_from_the_secret_alone_trusts_the_cluster_ca_and_a_wrong_secret_is_refused() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("k");
    let node = net.node(0, &["--min-voters", "1"]);
    wait_for(Duration::from_secs(30), "a one-node cluster", || agreed_status(&[&node]));
    let dir = tempfile::tempdir().unwrap();
    let ctl = Ctl { config: dir.path().join("config") };
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{}\n", support::SECRET)).unwrap();
    let out = ctl.ok(&[
        "config",
        "set-context",
        "rack",
        "--endpoint",
        &node.addr(),
        "--secret-file",
        secret.to_str().unwrap(),
    ]);
    assert!(out.contains("context rack set"), "{out}");
    ctl.ok(&["config", "use-context", "rack"]);
    // Verified with the CA it fetched (without one, the node's certificate fails: see above).
    let names = ctl.ok(&["get", "nodes", "-o", "name"]);
    assert!(names.contains(&node.id()), "{names}");

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-secret").unwrap();
    let other = Ctl { config: dir.path().join("other") };
    let err = other.fails(&[
        "config",
        "set-context",
        "x",
        "--endpoint",
        &node.addr(),
        "--secret-file",
        wrong.to_str().unwrap(),
    ]);
    assert!(err.contains("could not prove that it holds the cluster secret"), "{err}");
    assert!(!other.config.exists(), "a context was saved for a node that proved nothing");
}
