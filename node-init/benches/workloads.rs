//! `make bench-workloads`: workload figures from real `shoal-node` processes in network
//! namespaces running probe guests on this machine's KVM (root needed), printed as `name=value`
//! lines: from `PUT` of a 30-replica deployment on 3 nodes to all 30 running; from a node's death
//! (agent and microVMs killed) to its instances running elsewhere, with the grace period set to
//! 3 s; and image copy throughput between nodes (a node fetching a 256 MiB disk image it needs).
#![allow(clippy::unwrap_used)] // a bench fails loudly by design

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{agreed_status, wait_for, Net, Node};

const ROUNDS: usize = 3;
const GRACE_S: u64 = 3;

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

fn report(name: &str, samples: &mut [f64]) {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(0.0, f64::max);
    println!("{name}_median={:.2}", median(samples));
    println!("{name}_min={min:.2}");
    println!("{name}_max={max:.2}");
}

fn running(node: &Node, dep: &str) -> Vec<Value> {
    let v = node.get_ok(&format!("/v1/tenants/bench/instances?deployment={dep}"));
    v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "running" && i["desired"] == "running")
        .cloned()
        .collect()
}

fn main() {
    if !support::can_run_vms() {
        return;
    }
    let mut net = Net::new("b");
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| net.node(i, &["--capacity", "vcpus=32,mem-mib=8192", "--labels", &format!("idx={i}")]))
        .collect();
    {
        let refs: Vec<&Node> = nodes.iter().collect();
        wait_for(Duration::from_secs(60), "3 voters", || {
            agreed_status(&refs).filter(|s| s["voters"].as_array().map(|v| v.len()) == Some(3))
        });
    }
    nodes[0].send("PUT", "/v1/cluster/settings/node_grace_seconds", &json!(GRACE_S));
    nodes[0].send("PUT", "/v1/tenants/bench", &json!({}));
    let kernel = nodes[0].upload(shoal_probe_guest::path("workload").unwrap());
    let spec = |replicas: u32| json!({"replicas": replicas, "template": {"kernel": kernel, "mem_mib": 32}});

    // 1. PUT deployment → 30 running, on 3 nodes.
    let mut deploy = Vec::new();
    for round in 0..ROUNDS {
        let name = format!("web{round}");
        let t0 = Instant::now();
        let (code, body) = nodes[0].send("PUT", &format!("/v1/tenants/bench/deployments/{name}"), &spec(30));
        assert_eq!(code, 201, "{body}");
        wait_for(Duration::from_secs(120), "30 running", || (running(&nodes[0], &name).len() == 30).then_some(()));
        deploy.push(t0.elapsed().as_secs_f64());
        nodes[0].send("DELETE", &format!("/v1/tenants/bench/deployments/{name}"), &json!(null));
        wait_for(Duration::from_secs(120), "the deployment to go", || {
            (nodes[0].get(&format!("/v1/tenants/bench/deployments/{name}")).ok()?.0 == 404).then_some(())
        });
    }
    report("deploy_30_replicas_on_3_nodes_s", &mut deploy);

    // 2. A node dies with its microVMs: time until its instances run elsewhere.
    nodes[0].send("PUT", "/v1/tenants/bench/deployments/steady", &spec(6));
    wait_for(Duration::from_secs(60), "6 running", || (running(&nodes[0], "steady").len() == 6).then_some(()));
    let mut failover = Vec::new();
    for round in 0..ROUNDS {
        let victim = 1 + round % 2;
        let victim_id = nodes[victim].id();
        let observer = if victim == 1 { 2 } else { 1 };
        let lost_here = running(&nodes[0], "steady").iter().filter(|i| i["node"] == victim_id.as_str()).count();
        let t0 = Instant::now();
        nodes[victim].kill_node();
        wait_for(Duration::from_secs(120), "replacements running", || {
            let r = running(&nodes[observer], "steady");
            (r.len() == 6 && r.iter().all(|i| i["node"] != victim_id.as_str())).then_some(())
        });
        failover.push(t0.elapsed().as_secs_f64());
        eprintln!(
            "round {round}: {lost_here} instances of node {victim} running elsewhere after {:.2} s",
            t0.elapsed().as_secs_f64()
        );
        nodes[victim].start();
        wait_for(Duration::from_secs(60), "the node back with nothing lost left", || {
            let v = nodes[0].get_ok("/v1/tenants/bench/instances?deployment=steady");
            (v["instances"].as_array()?.iter().all(|i| i["state"] == "running")).then_some(())
        });
        // Rebalance for the next round: scale down and up so every node runs some again.
        nodes[0].send("PUT", "/v1/tenants/bench/deployments/steady", &spec(0));
        wait_for(Duration::from_secs(60), "scaled to 0", || {
            let v = nodes[0].get_ok("/v1/tenants/bench/instances?deployment=steady");
            v["instances"].as_array()?.is_empty().then_some(())
        });
        nodes[0].send("PUT", "/v1/tenants/bench/deployments/steady", &spec(6));
        wait_for(Duration::from_secs(60), "6 running", || (running(&nodes[0], "steady").len() == 6).then_some(()));
    }
    println!("node_grace_s={GRACE_S}");
    report("dead_node_to_replaced_s", &mut failover);
    let mut after_grace: Vec<f64> = failover.iter().map(|f| f - GRACE_S as f64).collect();
    report("dead_node_to_replaced_beyond_grace_s", &mut after_grace);

    // 3. Image copies between nodes: a 256 MiB disk image pushed to node 0 and needed on node 1.
    let mut throughput = Vec::new();
    for round in 0..ROUNDS {
        let file = net.dir.path().join(format!("disk{round}.img"));
        let mut bytes = vec![0u8; 256 << 20];
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&((i as u64) ^ (round as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
        }
        std::fs::write(&file, &bytes).unwrap();
        drop(bytes);
        let disk = nodes[0].upload(&file);
        let target = nodes[1].id();
        let name = format!("disk{round}");
        let pinned = json!({"replicas": 1, "template": {"kernel": kernel, "rootfs": disk, "mem_mib": 32}, "placement": {"node_labels": {"idx": "1"}}});
        let t0 = Instant::now();
        nodes[0].send("PUT", &format!("/v1/tenants/bench/deployments/{name}"), &pinned);
        wait_for(Duration::from_secs(300), "the copy on node 1", || {
            let img = nodes[0].get_ok(&format!("/v1/images/{disk}"));
            img["nodes"].as_array()?.iter().any(|n| n == target.as_str()).then_some(())
        });
        let secs = t0.elapsed().as_secs_f64();
        throughput.push(256.0 / secs);
        nodes[0].send("DELETE", &format!("/v1/tenants/bench/deployments/{name}"), &json!(null));
    }
    println!("image_copy_mib=256");
    report("image_fetch_mib_per_s", &mut throughput);
    let (_, m) = nodes[1].get_text("/metrics").unwrap();
    let bytes = m.lines().find_map(|l| l.strip_prefix("shoal_image_fetch_bytes_total ")).unwrap_or("0");
    println!("node1_image_fetch_bytes_total={bytes}");
}
