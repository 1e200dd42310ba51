//! Workloads end to end with real `shoal-node` processes in network namespaces running probe
//! guests on this machine's KVM: a deployment spread over three nodes, scaled up and down, its
//! consoles read through any node; a node that dies and comes back; a node that shuts down in
//! order (its instances and leadership handed over first); an agent restarted under
//! its running microVMs; a crash loop; refusals that explain themselves; hostile requests.
//! Needs root (namespaces, jails) and /dev/kvm.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{agreed_status, logs, wait_for, Net, Node};

const FORM: Duration = Duration::from_secs(40);
/// Each test node offers this much to the scheduler.
const CAPACITY: &str = "vcpus=4,mem-mib=1024";

fn can_run() -> bool {
    support::can_run_vms()
}

fn probe(name: &str) -> &'static std::path::Path {
    shoal_probe_guest::path(name).unwrap()
}

/// `n` nodes that agree on a leader (and on 3 voters when there are 3 or more).
fn cluster(net: &mut Net, n: usize, extra: &[&str]) -> Vec<Node> {
    let min = if n >= 3 { "3" } else { "1" };
    let mut args = vec!["--capacity", CAPACITY, "--min-voters", min];
    args.extend_from_slice(extra);
    let nodes: Vec<Node> = (0..n).map(|i| net.node(i, &args)).collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    let voters = n.min(3);
    wait_for(FORM, "the cluster to form", || {
        agreed_status(&refs).filter(|s| s["voters"].as_array().map(|v| v.len()) == Some(voters))
    });
    // Every node's record (with its capacity) is in the state.
    wait_for(FORM, "every node's record", || {
        let v = nodes[0].get_ok("/v1/nodes");
        (v["nodes"].as_array().map(|a| a.len()) == Some(n)).then_some(())
    });
    nodes
}

fn deployment(kernel: &str, replicas: u32, cmdline: &str) -> Value {
    json!({"replicas": replicas, "labels": {"app": "web"}, "template": {"kernel": kernel, "cmdline": cmdline, "vcpus": 1, "mem_mib": 64}})
}

fn instances(node: &Node, tenant: &str, deployment: &str) -> Vec<Value> {
    node.get_ok(&format!("/v1/tenants/{tenant}/instances?deployment={deployment}"))["instances"]
        .as_array()
        .unwrap()
        .clone()
}

fn running_per_node(list: &[Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for i in list.iter().filter(|i| i["state"] == "running" && i["desired"] == "running") {
        *out.entry(i["node"].as_str().unwrap_or("").to_string()).or_default() += 1;
    }
    out
}

/// Waits until exactly `n` instances of the deployment run, each node running `per_node`.
fn wait_running(
    node: &Node,
    nodes: &[&Node],
    tenant: &str,
    dep: &str,
    n: usize,
    per_node: Option<usize>,
) -> Vec<Value> {
    let limit = Duration::from_secs(60);
    let deadline = Instant::now() + limit;
    loop {
        let list = instances(node, tenant, dep);
        let spread = running_per_node(&list);
        let total: usize = spread.values().sum();
        let even = per_node.is_none_or(|k| spread.len() * k == n && spread.values().all(|c| *c == k));
        if total == n && list.len() == n && even {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "{n} running instances of {dep} within {limit:?}; have {spread:?} of {list:#?}\n{}",
            logs(nodes)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn total_vms(nodes: &[&Node]) -> usize {
    nodes.iter().map(|n| n.vm_pids().len()).sum()
}

#[test]
fn a_deployment_runs_spread_over_three_nodes_scales_and_shows_its_consoles_through_any_node() {
    if !can_run() {
        return;
    }
    let mut net = Net::new("w");
    let nodes = cluster(&mut net, 3, &[]);
    let refs: Vec<&Node> = nodes.iter().collect();
    assert_eq!(nodes[0].send("PUT", "/v1/tenants/acme", &json!({})).0, 201);
    let kernel = nodes[0].upload(probe("workload"));
    let (code, body) = nodes[1].send("PUT", "/v1/tenants/acme/deployments/web", &deployment(&kernel, 6, "app=web"));
    assert_eq!(code, 201, "{body}");

    let list = wait_running(&nodes[2], &refs, "acme", "web", 6, Some(2));
    assert_eq!(total_vms(&refs), 6, "one jailed shoal-vmm per instance");
    // Each node fetched the image from the one it was pushed to, and says so.
    let images = nodes[0].get_ok("/v1/images");
    let holders = images["images"][0]["nodes"].as_array().unwrap().len();
    assert_eq!(holders, 3, "{images}");
    // Every console, through every node.
    for inst in &list {
        let id = inst["id"].as_str().unwrap();
        for n in &nodes {
            let text = wait_for(Duration::from_secs(20), "the guest's console output", || {
                let (code, text) = n.get_text(&format!("/v1/tenants/acme/instances/{id}/console")).ok()?;
                (code == 200 && text.contains("tick=")).then_some(text)
            });
            assert!(text.starts_with("SHOAL-PROBE workload: start cmdline=app=web"), "{id} via node {}: {text}", n.i);
        }
    }
    let d = nodes[0].get_ok("/v1/tenants/acme/deployments/web");
    assert_eq!((d["status"]["running"].as_u64(), d["replicas"].as_u64()), (Some(6), Some(6)), "{d}");

    // Scale to 9, then back to 3.
    nodes[0].send("PUT", "/v1/tenants/acme/deployments/web", &deployment(&kernel, 9, "app=web"));
    wait_running(&nodes[0], &refs, "acme", "web", 9, Some(3));
    assert_eq!(total_vms(&refs), 9);
    nodes[2].send("PUT", "/v1/tenants/acme/deployments/web", &deployment(&kernel, 3, "app=web"));
    wait_running(&nodes[1], &refs, "acme", "web", 3, Some(1));
    wait_for(Duration::from_secs(30), "the stopped microVMs' processes to end", || {
        (total_vms(&refs) == 3).then_some(())
    });
    // Stopped through Ctrl+Alt+Del: the guests said goodbye, nothing was killed.
    let metrics: u64 = nodes
        .iter()
        .map(|n| {
            let (_, text) = n.get_text("/metrics").unwrap();
            text.lines().find_map(|l| l.strip_prefix("shoal_instance_stops_total ")).unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(metrics, 6);

    // Deleting the deployment stops the rest; then the tenant can go.
    assert_eq!(nodes[0].send("DELETE", "/v1/tenants/acme/deployments/web", &json!(null)).0, 200);
    wait_for(Duration::from_secs(30), "the deployment to go", || {
        let (code, _) = nodes[0].get("/v1/tenants/acme/deployments/web").ok()?;
        (code == 404 && total_vms(&refs) == 0).then_some(())
    });
    assert_eq!(nodes[1].send("DELETE", "/v1/tenants/acme", &json!(null)).0, 200);
}

#[test]
fn a_dead_node_s_instances_run_elsewhere_and_it_runs_none_of_them_when_it_comes_back() {
    if !can_run() {
        return;
    }
    let mut net = Net::new("d");
    let mut nodes = cluster(&mut net, 3, &[]);
    let grace = 3;
    assert_eq!(nodes[0].send("PUT", "/v1/cluster/settings/node_grace_seconds", &json!(grace)).0, 200);
    nodes[0].send("PUT", "/v1/tenants/acme", &json!({}));
    let kernel = nodes[0].upload(probe("workload"));
    nodes[0].send("PUT", "/v1/tenants/acme/deployments/web", &deployment(&kernel, 6, "app=web"));
    {
        let refs: Vec<&Node> = nodes.iter().collect();
        wait_running(&nodes[0], &refs, "acme", "web", 6, Some(2));
    }
    let victim = nodes[1].id();
    let on_victim: Vec<String> = instances(&nodes[0], "acme", "web")
        .iter()
        .filter(|i| i["node"] == victim.as_str())
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(on_victim.len(), 2);

    let killed = Instant::now();
    nodes[1].kill_node();
    let survivors: Vec<&Node> = vec![&nodes[0], &nodes[2]];
    let list = wait_for(Duration::from_secs(60), "the lost instances to run elsewhere", || {
        let list = instances(survivors[0], "acme", "web");
        let lost = list.iter().filter(|i| i["state"] == "lost").count();
        let running_elsewhere = list.iter().filter(|i| i["state"] == "running" && i["node"] != victim.as_str()).count();
        (lost == 2 && running_elsewhere == 6).then_some(list)
    });
    let took = killed.elapsed();
    eprintln!("replaced after {took:?} (grace {grace} s)");
    for id in &on_victim {
        let i = list.iter().find(|i| i["id"] == id.as_str()).unwrap();
        assert_eq!(i["state"], "lost");
        assert!(i["reason"].as_str().unwrap().contains("unreachable"), "{i}");
    }
    assert_eq!(total_vms(&survivors), 6);

    // It comes back: before anything else it stops what it no longer owns; it runs none of them.
    nodes[1].start();
    let all: Vec<&Node> = nodes.iter().collect();
    wait_for(Duration::from_secs(60), "the lost instances to be gone", || {
        let list = instances(&nodes[0], "acme", "web");
        (list.len() == 6 && list.iter().all(|i| i["state"] == "running")).then_some(())
    });
    assert!(nodes[1].vm_pids().is_empty(), "the node that came back runs nothing: {:?}", nodes[1].vm_pids());
    assert_eq!(total_vms(&all), 6);
    assert!(nodes[1].log().contains("no longer owns"), "{}", logs(&all));
    let dirs = std::fs::read_dir(nodes[1].data_dir.join("instances")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(dirs, 0, "its old instance directories are removed");
}

#[test]
fn a_node_shutting_down_hands_its_instances_and_leadership_over_before_its_agent_exits() {
    if !can_run() {
        return;
    }
    let mut net = Net::new("h");
    let mut nodes = cluster(&mut net, 3, &[]);
    // Far longer than the test waits: only the hand-over can move the instances in time.
    assert_eq!(nodes[0].send("PUT", "/v1/cluster/settings/node_grace_seconds", &json!(600)).0, 200);
    nodes[0].send("PUT", "/v1/tenants/acme", &json!({}));
    let kernel = nodes[0].upload(probe("workload"));
    nodes[0].send("PUT", "/v1/tenants/acme/deployments/web", &deployment(&kernel, 6, "app=web"));
    {
        let refs: Vec<&Node> = nodes.iter().collect();
        wait_running(&nodes[0], &refs, "acme", "web", 6, Some(2));
    }
    // The leader goes down, so leadership has to move too.
    let leader = nodes[0].get_ok("/v1/cluster/status")["leader_id"].as_str().unwrap().to_string();
    let v = nodes.iter().position(|n| n.id() == leader).unwrap();
    let on_victim: Vec<String> = instances(&nodes[0], "acme", "web")
        .iter()
        .filter(|i| i["node"] == leader.as_str())
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(on_victim.len(), 2);
    assert_eq!(nodes[v].vm_pids().len(), 2);

    let asked = Instant::now();
    // SAFETY: signalling the test's own child by pid.
    unsafe { libc::kill(nodes[v].pid().unwrap() as i32, libc::SIGUSR1) };
    let code = wait_for(Duration::from_secs(30), "the agent to hand over and exit by itself", || nodes[v].try_wait());
    let took = asked.elapsed();
    eprintln!("handed over and exited after {took:?}");
    assert_eq!(code, Some(0), "{}", nodes[v].log());
    assert!(nodes[v].vm_pids().is_empty(), "it stopped its microVMs: {:?}", nodes[v].vm_pids());
    let survivors: Vec<&Node> = nodes.iter().enumerate().filter(|(i, _)| *i != v).map(|(_, n)| n).collect();
    // It handed leadership over (and everything else) before it left.
    let log = nodes[v].log();
    assert!(log.contains("runs no microVM and does not lead"), "{log}");
    assert!(!log.contains("before everything was handed over"), "{log}");
    wait_for(Duration::from_secs(5), "the others to know the new leader", || {
        let s = survivors[0].status()?;
        (s["leader_id"].is_string() && s["leader_id"] != leader.as_str()).then_some(())
    });
    // Its instances run elsewhere (long before the 600 s grace), and nothing is placed on it.
    let list = wait_for(Duration::from_secs(30), "its instances to run elsewhere", || {
        let list = instances(survivors[0], "acme", "web");
        let running_elsewhere = list.iter().filter(|i| i["state"] == "running" && i["node"] != leader.as_str()).count();
        (running_elsewhere == 6).then_some(list)
    });
    assert!(list.iter().all(|i| i["node"] != leader.as_str() || i["state"] == "lost"), "{list:#?}");
    assert_eq!(total_vms(&survivors), 6);
    // The leader (itself, before it handed over, or the next) said why it moved them.
    let all: Vec<&Node> = nodes.iter().collect();
    let said =
        logs(&all).lines().any(|l| l.contains("declared a node's instances lost") && l.contains("is shutting down"));
    assert!(said, "{}", logs(&all));
}

#[test]
fn an_agent_restarted_with_sigterm_keeps_its_microvms_running_and_adopts_them() {
    if !can_run() {
        return;
    }
    let mut net = Net::new("r");
    let mut nodes = cluster(&mut net, 1, &[]);
    nodes[0].send("PUT", "/v1/tenants/acme", &json!({}));
    let kernel = nodes[0].upload(probe("workload"));
    nodes[0].send("PUT", "/v1/tenants/acme/deployments/web", &deployment(&kernel, 2, "app=web"));
    let before = {
        let refs: Vec<&Node> = nodes.iter().collect();
        wait_running(&nodes[0], &refs, "acme", "web", 2, None)
    };
    let pids = nodes[0].vm_pids();
    assert_eq!(pids.len(), 2);
    let agent = nodes[0].pid().unwrap();
    nodes[0].stop();
    // The microVMs outlive their agent.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(nodes[0].vm_pids(), pids, "the microVMs keep running without their agent");
    nodes[0].start();
    assert_ne!(nodes[0].pid().unwrap(), agent);
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(Duration::from_secs(30), "the agent to re-adopt its microVMs", || {
        let (_, m) = nodes[0].get_text("/metrics").ok()?;
        m.contains("shoal_instance_adoptions_total 2").then_some(())
    });
    let after = wait_running(&nodes[0], &refs, "acme", "web", 2, None);
    assert_eq!(nodes[0].vm_pids(), pids, "the same processes");
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (b["id"].clone(), b["restarts"].clone(), b["started_at"].clone()),
            (a["id"].clone(), a["restarts"].clone(), a["started_at"].clone())
        );
    }
    let (_, m) = nodes[0].get_text("/metrics").unwrap();
    assert!(m.contains("shoal_instance_starts_total 0"), "nothing was started again: {m}");
    // Their consoles kept going while the agent was away.
    let id = after[0]["id"].as_str().unwrap();
    let ticks = |t: &str| t.lines().filter(|l| l.starts_with("tick=")).count();
    let first = ticks(&nodes[0].get_text(&format!("/v1/tenants/acme/instances/{id}/console")).unwrap().1);
    wait_for(Duration::from_secs(20), "more console output", || {
        let now = ticks(&nodes[0].get_text(&format!("/v1/tenants/acme/instances/{id}/console")).ok()?.1);
        (now > first).then_some(())
    });
}

#[test]
fn a_guest_that_fails_at_once_is_restarted_with_growing_delays() {
    if !can_run() {
        return;
    }
    let mut net = Net::new("c");
    let nodes = cluster(&mut net, 1, &[]);
    nodes[0].send("PUT", "/v1/tenants/acme", &json!({}));
    let kernel = nodes[0].upload(probe("panic"));
    let spec = json!({"replicas": 1, "template": {"kernel": kernel, "mem_mib": 64, "restart": "always"}});
    nodes[0].send("PUT", "/v1/tenants/acme/deployments/crash", &spec);
    let once = json!({"replicas": 1, "template": {"kernel": kernel, "mem_mib": 64, "restart": "never"}});
    nodes[0].send("PUT", "/v1/tenants/acme/deployments/once", &once);
    // Record when each restart was booted.
    let mut starts: Vec<(u64, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let last = loop {
        let list = instances(&nodes[0], "acme", "crash");
        assert_eq!(list.len(), 1, "a crash-looping instance is restarted, not replaced");
        let i = list[0].clone();
        let r = i["restarts"].as_u64().unwrap_or(0);
        if let Some(at) = i["started_at"].as_str() {
            if starts.last().is_none_or(|(n, t)| *n != r && t != at) {
                starts.push((r, at.to_string()));
            }
        }
        if r >= 4 && i["state"] == "failed" {
            break i;
        }
        assert!(Instant::now() < deadline, "restarts: {starts:?}; {i}\n{}", logs(&[&nodes[0]]));
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(last["last_exit_code"], 2, "{last}");
    let reason = last["reason"].as_str().unwrap();
    assert!(reason.contains("panicked") || reason.contains("back-off"), "{last}");
    let ms = |t: &str| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).unwrap();
    let gaps: Vec<Duration> = starts.windows(2).map(|w| ms(&w[1].1).duration_since(ms(&w[0].1)).unwrap()).collect();
    assert!(gaps.len() >= 3, "{starts:?}");
    // The back-off doubles from one second: restart k waits at least 2^(k-1) s.
    for (k, gap) in gaps.iter().enumerate() {
        assert!(*gap >= Duration::from_secs(1 << k), "restart {} came after {gap:?}: {gaps:?}", k + 1);
    }
    assert!(gaps[gaps.len() - 1] > gaps[0] * 2, "the delays grow: {gaps:?}");
    // With `never` it fails once and stays failed, holding nothing.
    let once = instances(&nodes[0], "acme", "once");
    assert_eq!(once.len(), 1);
    assert_eq!(
        (once[0]["state"].as_str(), once[0]["restarts"].as_u64(), once[0]["last_exit_code"].as_i64()),
        (Some("failed"), Some(0), Some(2)),
        "{once:?}"
    );
    let (_, m) = nodes[0].get_text("/metrics").unwrap();
    let restarts: u64 =
        m.lines().find_map(|l| l.strip_prefix("shoal_instance_restarts_total ")).unwrap().parse().unwrap();
    assert!(restarts >= 4, "{m}");
}

#[test]
fn refusals_explain_themselves_and_tenant_tokens_see_only_their_tenant() {
    if !can_run() {
        return;
    }
    let mut net = Net::new("q");
    let nodes = cluster(&mut net, 3, &[]);
    let n = &nodes[0];
    n.send("PUT", "/v1/tenants/acme", &json!({"quota": {"vcpus": 2, "mem_mib": 4096, "instances": 10}}));
    n.send("PUT", "/v1/tenants/other", &json!({}));
    let kernel = n.upload(probe("workload"));

    // Over quota: 422 with the reason, and nothing created.
    let (code, body) = n.send("PUT", "/v1/tenants/acme/deployments/big", &deployment(&kernel, 3, ""));
    assert_eq!(code, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("quota of 2 vCPUs"), "{body}");
    assert_eq!(n.get_ok("/v1/tenants/acme/deployments")["deployments"], json!([]));
    // An image nobody pushed.
    let unknown = format!("sha256:{}", "e".repeat(64));
    let (code, body) = n.send("PUT", "/v1/tenants/acme/deployments/x", &deployment(&unknown, 1, ""));
    assert_eq!(code, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("unknown"), "{body}");
    // A template no node could ever fit.
    let huge = json!({"replicas": 1, "template": {"kernel": kernel, "mem_mib": 8192}});
    let (code, body) = n.send("PUT", "/v1/tenants/other/deployments/huge", &huge);
    assert_eq!(code, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no node could ever fit it"), "{body}");
    // One that fits no node now: pending, with the reason counted per rule.
    let zoned = json!({"replicas": 1, "template": {"kernel": kernel, "mem_mib": 64}, "placement": {"node_labels": {"zone": "z"}}});
    assert_eq!(n.send("PUT", "/v1/tenants/other/deployments/zoned", &zoned).0, 201);
    let pending = wait_for(Duration::from_secs(20), "a pending reason", || {
        let i = instances(n, "other", "zoned").pop()?;
        (i["reason"].as_str()? != "waiting for the scheduler").then_some(i)
    });
    assert_eq!(pending["state"], "pending");
    assert_eq!(pending["reason"], "no node has the labels zone=z: 3 nodes checked");

    // A cordoned node gets nothing new.
    let cordoned = nodes[2].id();
    let (code, body) = n.send("PUT", &format!("/v1/nodes/{cordoned}/cordon"), &json!(null));
    assert_eq!((code, body["node"]["cordoned"].as_bool()), (200, Some(true)), "{body}");
    n.send("PUT", "/v1/tenants/other/deployments/spread", &deployment(&kernel, 4, ""));
    let refs: Vec<&Node> = nodes.iter().collect();
    let list = wait_running(n, &refs, "other", "spread", 4, None);
    assert!(list.iter().all(|i| i["node"] != cordoned.as_str()), "{list:?}");

    // Tenant tokens: their own tenant only.
    let (code, tok) = n.send("POST", "/v1/tenants/acme/tokens", &json!(null));
    assert_eq!(code, 201, "{tok}");
    let token = tok["token"].as_str().unwrap().to_string();
    let as_tenant = |method: &str, path: &str, body: Option<&str>| -> u16 {
        let req = n.agent().request(method, &n.url(path)).set("Authorization", &format!("Bearer {token}"));
        let r = match body {
            Some(b) => req.send_string(b),
            None => req.call(),
        };
        match r {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(c, _)) => c,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(
        as_tenant("PUT", "/v1/tenants/acme/deployments/small", Some(&deployment(&kernel, 1, "").to_string())),
        201
    );
    assert_eq!(as_tenant("GET", "/v1/tenants/acme/instances", None), 200);
    assert_eq!(as_tenant("GET", "/v1/tenants/other/instances", None), 403);
    assert_eq!(as_tenant("GET", "/v1/tenants/other/deployments/spread", None), 403);
    assert_eq!(as_tenant("PUT", "/v1/tenants/acme", Some("{}")), 403, "a tenant cannot change its own quota");
    assert_eq!(as_tenant("GET", "/v1/nodes", None), 403);
    assert_eq!(as_tenant("GET", "/v1/kv/x", None), 403);
    let listed = n.agent().get(&n.url("/v1/tenants")).set("Authorization", &format!("Bearer {token}")).call().unwrap();
    let listed: Value = listed.into_json().unwrap();
    let names: Vec<&str> = listed["tenants"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["acme"]);
    // Images are shared by digest, but a tenant lists only those its deployments use.
    let other_kernel = n.upload(probe("counter"));
    let imgs = n.agent().get(&n.url("/v1/images")).set("Authorization", &format!("Bearer {token}")).call().unwrap();
    let imgs: Value = imgs.into_json().unwrap();
    let digests: Vec<&str> = imgs["images"].as_array().unwrap().iter().map(|i| i["digest"].as_str().unwrap()).collect();
    assert_eq!(digests, [kernel.as_str()], "not {other_kernel}");
    let bad = n.agent().get(&n.url("/v1/tenants/acme")).set("Authorization", "Bearer nope").call();
    assert!(matches!(bad, Err(ureq::Error::Status(401, _))));
}

#[test]
fn malformed_and_hostile_requests_get_4xx_and_change_nothing() {
    if !can_run() {
        return;
    }
    let mut net = Net::new("h");
    let nodes = cluster(&mut net, 1, &[]);
    let n = &nodes[0];
    n.send("PUT", "/v1/tenants/acme", &json!({}));
    let kernel = n.upload(probe("workload"));
    let revision = || n.get_ok("/v1/cluster/status")["revision"].as_u64().unwrap();
    let before = revision();
    let valid = deployment(&kernel, 1, "");
    let mut unknown_field = valid.clone();
    unknown_field["template"]["kernal"] = json!("x");
    let mut huge = valid.clone();
    huge["replicas"] = json!(1_000_000_000_000u64);
    let mut many = valid.clone();
    many["replicas"] = json!(5000);
    let mut negative = valid.clone();
    negative["template"]["vcpus"] = json!(-1);
    let mut bad_digest = valid.clone();
    bad_digest["template"]["kernel"] = json!("sha256:../../etc/passwd");
    let mut long_cmdline = valid.clone();
    long_cmdline["template"]["cmdline"] = json!("x".repeat(5000));
    let cases: Vec<(&str, String, String, u16)> = vec![
        ("PUT", "/v1/tenants/acme/deployments/web".into(), "{not json".into(), 400),
        ("PUT", "/v1/tenants/acme/deployments/web".into(), unknown_field.to_string(), 400),
        ("PUT", "/v1/tenants/acme/deployments/web".into(), huge.to_string(), 400),
        ("PUT", "/v1/tenants/acme/deployments/web".into(), many.to_string(), 400),
        ("PUT", "/v1/tenants/acme/deployments/web".into(), negative.to_string(), 400),
        ("PUT", "/v1/tenants/acme/deployments/web".into(), bad_digest.to_string(), 400),
        ("PUT", "/v1/tenants/acme/deployments/web".into(), long_cmdline.to_string(), 400),
        ("PUT", "/v1/tenants/acme/deployments/web".into(), "[]".into(), 400),
        ("PUT", "/v1/tenants/acme/deployments/..%2F..%2Fx".into(), valid.to_string(), 400),
        ("PUT", "/v1/tenants/..%2Fother/deployments/web".into(), valid.to_string(), 400),
        ("PUT", "/v1/tenants/Acme/deployments/web".into(), valid.to_string(), 400),
        ("PUT", format!("/v1/tenants/acme/deployments/{}", "w".repeat(60)), valid.to_string(), 400),
        ("PUT", "/v1/tenants/nobody/deployments/web".into(), valid.to_string(), 404),
        ("PUT", "/v1/tenants/a%00b".into(), "{}".into(), 400),
        ("PUT", "/v1/tenants/acme".into(), r#"{"quota": {"vcpus": "lots"}}"#.into(), 400),
        ("PUT", "/v1/tenants/acme".into(), r#"{"quota": {}, "owner": "me"}"#.into(), 400),
        (
            "PUT",
            "/v1/tenants/acme/deployments/web".into(),
            format!("{{\"replicas\": 1, \"pad\": \"{}\"}}", "x".repeat(2 << 20)),
            413,
        ),
        ("DELETE", "/v1/tenants/acme/deployments/nope".into(), String::new(), 404),
        ("GET", "/v1/tenants/acme/instances/nope/console".into(), String::new(), 404),
        ("GET", "/v1/tenants/acme/instances?from_revision=abc&watch=true".into(), String::new(), 400),
        ("PUT", "/v1/nodes/xyz/cordon".into(), String::new(), 400),
        ("PUT", "/v1/nodes/0000000000000001/cordon".into(), String::new(), 404),
        ("GET", "/v1/images/sha256:nothex".into(), String::new(), 400),
        ("POST", "/v1/tenants/acme/deployments/web".into(), valid.to_string(), 405),
        ("POST", "/v1/images".into(), String::new(), 400),
    ];
    for (method, path, body, want) in &cases {
        let (code, reply) = match n.call(method, path, Some(body)) {
            Ok(r) => r,
            // An oversized body may be refused while the client is still sending it.
            Err(e) if *want == 413 && (e.contains("Broken pipe") || e.contains("reset")) => continue,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        assert_eq!(code, *want, "{method} {path}: {reply}");
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()), "{method} {path}: errors are JSON: {reply}");
    }
    assert_eq!(revision(), before, "no refused request changed the state");
    assert_eq!(n.get_ok("/v1/tenants/acme/deployments")["deployments"], json!([]));
    // The node still serves.
    assert_eq!(n.send("PUT", "/v1/tenants/acme/deployments/web", &valid).0, 201);
}

#[test]
fn the_api_document_covers_every_operation_and_the_node_answers_as_it_says() {
    if !can_run() {
        return;
    }
    let doc = support::openapi::document();
    let ops = support::openapi::operations(&doc);
    let wanted = [
        ("PUT", "/v1/tenants/{tenant}"),
        ("GET", "/v1/tenants/{tenant}"),
        ("DELETE", "/v1/tenants/{tenant}"),
        ("GET", "/v1/tenants"),
        ("POST", "/v1/tenants/{tenant}/tokens"),
        ("POST", "/v1/images"),
        ("GET", "/v1/images"),
        ("PUT", "/v1/tenants/{tenant}/deployments/{name}"),
        ("GET", "/v1/tenants/{tenant}/deployments/{name}"),
        ("DELETE", "/v1/tenants/{tenant}/deployments/{name}"),
        ("GET", "/v1/tenants/{tenant}/deployments"),
        ("GET", "/v1/tenants/{tenant}/instances"),
        ("GET", "/v1/tenants/{tenant}/instances/{id}/console"),
        ("POST", "/v1/tenants/{tenant}/instances/{id}/console"),
        ("GET", "/v1/nodes"),
        ("PUT", "/v1/nodes/{id}/cordon"),
        ("PUT", "/v1/nodes/{id}"),
        ("POST", "/v1/nodes/{id}/drain"),
        ("POST", "/v1/tenants/{tenant}/deployments/{name}/plan"),
        ("GET", "/metrics"),
    ];
    for (m, p) in wanted {
        assert!(ops.contains(&(m.to_string(), p.to_string())), "{m} {p} is not documented");
    }
    let mut net = Net::new("o");
    let nodes = cluster(&mut net, 1, &[]);
    let n = &nodes[0];
    n.send("PUT", "/v1/tenants/acme", &json!({}));
    let kernel = n.upload(probe("workload"));
    n.send("PUT", "/v1/tenants/acme/deployments/web", &deployment(&kernel, 1, "app=web"));
    let refs: Vec<&Node> = nodes.iter().collect();
    let inst = wait_running(n, &refs, "acme", "web", 1, None).remove(0);
    let id = inst["id"].as_str().unwrap().to_string();
    let node_id = n.id();
    let subst = [
        ("tenant", "acme"),
        ("name", "doc-check"),
        ("id", id.as_str()),
        ("digest", kernel.as_str()),
        ("key", "doc/check"),
        ("node_id", node_id.as_str()),
    ];
    // Node paths take the node's id as {id}, settings a setting name as {name}: a second pass.
    let second = |p: &str| p.starts_with("/v1/nodes/{id}") || p == "/v1/cluster/settings/{name}";
    let mut skip: Vec<&str> = ops.iter().map(|(_, p)| p.as_str()).filter(|p| second(p)).collect();
    skip.push("/v1/watch");
    let checked_instances = support::openapi::check(n, &subst, &skip);
    let node_subst = [("id", node_id.as_str()), ("name", "doc.check")];
    let only_nodes: Vec<&str> = ops.iter().map(|(_, p)| p.as_str()).filter(|p| !second(p)).collect();
    let checked_nodes = support::openapi::check(n, &node_subst, &only_nodes);
    let streams = 1; // GET /v1/watch
    assert_eq!(checked_instances + checked_nodes + streams, ops.len(), "every documented operation was checked");
}
