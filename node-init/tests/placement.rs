//! Placement rules in a real cluster: six `shoal-node` processes in network namespaces, labeled in
//! three zones, running probe guests: a deployment spread over zones, a second kept off the
//! first's nodes by hard anti-affinity, a zone that dies; a drain that moves instances one at a
//! time within a disruption budget; taints; a plan that changes nothing. Needs root and /dev/kvm.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{agreed_status, wait_for, Net, Node};

const ZONES: [&str; 6] = ["a", "a", "b", "b", "c", "c"];

fn cluster(net: &mut Net, n: usize) -> Vec<Node> {
    let nodes: Vec<Node> = (0..n)
        .map(|i| {
            let labels = format!("zone={}", ZONES[i % ZONES.len()]);
            net.node(i, &["--capacity", "vcpus=4,mem-mib=1024", "--labels", &labels])
        })
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(Duration::from_secs(60), "the cluster to form", || {
        agreed_status(&refs).filter(|s| s["voters"].as_array().map(|v| v.len()) == Some(3))
    });
    wait_for(Duration::from_secs(60), "every node's record", || {
        let v = nodes[0].get_ok("/v1/nodes");
        (v["nodes"].as_array().map(|a| a.len()) == Some(n)).then_some(())
    });
    nodes
}

fn instances(node: &Node, dep: &str) -> Vec<Value> {
    node.get_ok(&format!("/v1/tenants/acme/instances?deployment={dep}"))["instances"].as_array().unwrap().clone()
}

fn running(list: &[Value]) -> Vec<&Value> {
    list.iter().filter(|i| i["state"] == "running" && i["desired"] == "running").collect()
}

/// Node id -> zone, from the cluster's node list.
fn zones(node: &Node) -> BTreeMap<String, String> {
    node.get_ok("/v1/nodes")["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap().to_string(), n["labels"]["zone"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn per_zone(list: &[&Value], zones: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for i in list {
        *out.entry(zones[i["node"].as_str().unwrap()].clone()).or_default() += 1;
    }
    out
}

fn nodes_of(list: &[&Value]) -> BTreeSet<String> {
    list.iter().map(|i| i["node"].as_str().unwrap().to_string()).collect()
}

#[test]
fn six_nodes_in_three_zones_spread_keep_apart_and_survive_a_dead_zone() {
    if !support::can_run_vms() {
        return;
    }
    let mut net = Net::new("p");
    let mut nodes = cluster(&mut net, 6);
    nodes[0].send("PUT", "/v1/cluster/settings/node_grace_seconds", &json!(3));
    nodes[0].send("PUT", "/v1/tenants/acme", &json!({}));
    let kernel = nodes[0].upload(shoal_probe_guest::path("workload").unwrap());
    let a = json!({"replicas": 6, "labels": {"app": "a"}, "template": {"kernel": kernel, "mem_mib": 64},
        "placement": {"strategy": "binpack", "spread": [{"key": "zone", "max_skew": 1, "hard": true}]}});
    assert_eq!(nodes[0].send("PUT", "/v1/tenants/acme/deployments/a", &a).0, 201);
    let z = zones(&nodes[0]);
    let a_list = wait_for(Duration::from_secs(60), "a's 6 instances running", || {
        let l = instances(&nodes[0], "a");
        (running(&l).len() == 6).then_some(l)
    });
    let a_running = running(&a_list);
    assert_eq!(per_zone(&a_running, &z).values().copied().collect::<Vec<_>>(), vec![2, 2, 2], "{a_running:?}");
    let a_nodes = nodes_of(&a_running);
    assert_eq!(a_nodes.len(), 3, "binpack puts each zone's two on one node: {a_nodes:?}");

    let b = json!({"replicas": 3, "labels": {"app": "b"}, "template": {"kernel": kernel, "mem_mib": 64},
        "placement": {"anti_affinity": [{"selector": {"app": "a"}, "key": "node", "hard": true}]}});
    nodes[0].send("PUT", "/v1/tenants/acme/deployments/b", &b);
    let b_list = wait_for(Duration::from_secs(60), "b's 3 instances running", || {
        let l = instances(&nodes[0], "b");
        (running(&l).len() == 3).then_some(l)
    });
    let b_nodes = nodes_of(&running(&b_list));
    assert!(b_nodes.is_disjoint(&a_nodes), "b only on nodes without a: a {a_nodes:?}, b {b_nodes:?}");

    // Zone c dies: its instances come back within the rules (zone c is no longer an eligible
    // domain), or wait with the reason.
    let dead: Vec<String> = (0..6).filter(|i| ZONES[*i] == "c").map(|i| nodes[i].id()).collect();
    for i in (0..6).filter(|i| ZONES[*i] == "c") {
        nodes[i].kill_node();
    }
    let settled = wait_for(Duration::from_secs(90), "zone c's instances replaced or explained", || {
        let (a, b) = (instances(&nodes[0], "a"), instances(&nodes[0], "b"));
        let active = |l: &[Value]| {
            l.iter().filter(|i| i["state"] != "lost" && i["desired"] == "running").cloned().collect::<Vec<_>>()
        };
        let (a, b) = (active(&a), active(&b));
        let placed_or_explained = a.iter().chain(&b).all(|i| {
            (i["state"] == "running" && !dead.contains(&i["node"].as_str().unwrap_or("").to_string()))
                || (i["state"] == "pending" && i["reason"].as_str().is_some_and(|r| r.starts_with("no node")))
        });
        (a.len() == 6 && b.len() == 3 && placed_or_explained).then_some((a, b))
    });
    let (a_after, b_after) = settled;
    let a_run: Vec<&Value> = a_after.iter().filter(|i| i["state"] == "running").collect();
    let b_run: Vec<&Value> = b_after.iter().filter(|i| i["state"] == "running").collect();
    let counts = per_zone(&a_run, &z);
    assert!(!counts.contains_key("c"));
    let (lo, hi) = (counts.values().min().copied().unwrap_or(0), counts.values().max().copied().unwrap_or(0));
    assert!(hi - lo <= 1, "a stays within max_skew over the live zones: {counts:?}");
    assert!(nodes_of(&b_run).is_disjoint(&nodes_of(&a_run)), "b still keeps off a's nodes");
    let pending = a_after.len() + b_after.len() - a_run.len() - b_run.len();
    eprintln!("after zone c died: a {counts:?}, b on {:?}, pending {pending}", nodes_of(&b_run));
}

#[test]
fn a_drain_moves_instances_one_at_a_time_and_taints_and_plans_work() {
    if !support::can_run_vms() {
        return;
    }
    let mut net = Net::new("q");
    let nodes = cluster(&mut net, 3);
    let n = &nodes[0];
    n.send("PUT", "/v1/tenants/acme", &json!({}));
    let kernel = n.upload(shoal_probe_guest::path("workload").unwrap());
    let web = json!({"replicas": 6, "template": {"kernel": kernel, "mem_mib": 64},
        "placement": {"disruption_budget": {"max_unavailable": 1}}});
    n.send("PUT", "/v1/tenants/acme/deployments/web", &web);
    wait_for(Duration::from_secs(60), "6 running", || (running(&instances(n, "web")).len() == 6).then_some(()));
    let target = nodes[2].id();
    let on = |l: &[Value]| running(l).iter().filter(|i| i["node"] == target.as_str()).count();
    let before = on(&instances(n, "web"));
    assert_eq!(before, 2);

    // A plan of a bigger deployment says where it would go and changes nothing.
    let rev = n.get_ok("/v1/cluster/status")["revision"].as_u64().unwrap();
    let bigger = json!({"replicas": 12, "template": {"kernel": kernel, "mem_mib": 64}});
    let (code, plan) = n.send("POST", "/v1/tenants/acme/deployments/web/plan", &bigger);
    assert_eq!(code, 200, "{plan}");
    let placed: u64 = plan["placements"].as_array().unwrap().iter().map(|p| p["count"].as_u64().unwrap()).sum();
    assert_eq!(placed, 12, "{plan}");
    let too_many = json!({"replicas": 20, "template": {"kernel": kernel, "mem_mib": 64}});
    let (_, plan) = n.send("POST", "/v1/tenants/acme/deployments/web/plan", &too_many);
    assert_eq!(plan["pending"][0]["count"], 8, "three nodes of 4 vCPUs take 12: {plan}");
    assert_eq!(plan["pending"][0]["reason"], "no node has 1 vCPUs free: 3 nodes checked");
    assert_eq!(n.get_ok("/v1/cluster/status")["revision"].as_u64().unwrap(), rev, "planning changed nothing");

    // Drain: at most one instance unavailable at any moment, the node's two move off one by one.
    let (code, body) = n.send("POST", &format!("/v1/nodes/{target}/drain"), &json!(null));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["node"]["cordoned"], true);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen: Vec<usize> = vec![before];
    loop {
        let l = instances(n, "web");
        let up = running(&l).len();
        assert!(up >= 5, "more than one instance down during the drain: {l:#?}");
        let here = on(&l);
        if seen.last() != Some(&here) {
            seen.push(here);
        }
        let node = n.get_ok(&format!("/v1/nodes/{target}"));
        if here == 0 && up == 6 && node["drain"]["done"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "the drain did not finish: {node}; seen {seen:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seen, vec![2, 1, 0], "one at a time");
    let node = n.get_ok(&format!("/v1/nodes/{target}"));
    assert_eq!(node["drain"]["moved"], 2, "{node}");

    // Taints: no_schedule keeps a new deployment off; no_execute moves what runs.
    let tainted = nodes[1].id();
    let spec =
        json!({"labels": {"pool": "special"}, "taints": [{"key": "gpu", "value": "true", "effect": "no_schedule"}]});
    let (code, body) = n.send("PUT", &format!("/v1/nodes/{tainted}"), &spec);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["node"]["labels"]["pool"], "special");
    n.send("DELETE", &format!("/v1/nodes/{target}/cordon"), &json!(null));
    let other = json!({"replicas": 2, "template": {"kernel": kernel, "mem_mib": 64}});
    n.send("PUT", "/v1/tenants/acme/deployments/other", &other);
    let l = wait_for(Duration::from_secs(60), "other running", || {
        let l = instances(n, "other");
        (running(&l).len() == 2).then_some(l)
    });
    assert!(running(&l).iter().all(|i| i["node"] != tainted.as_str()), "{l:?}");
    let evict = json!({"taints": [{"key": "maintenance", "value": "", "effect": "no_execute"}]});
    n.send("PUT", &format!("/v1/nodes/{tainted}"), &evict);
    wait_for(Duration::from_secs(90), "nothing left on the no_execute node", || {
        let all: Vec<Value> = ["web", "other"].iter().flat_map(|d| instances(n, d)).collect();
        let here = all.iter().filter(|i| i["node"] == tainted.as_str() && i["state"] != "lost").count();
        (here == 0 && running(&all).len() == 8).then_some(())
    });
    assert!(nodes[1].vm_pids().is_empty(), "its microVMs stopped");
}
