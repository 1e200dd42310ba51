//! `make bench-cluster`: cluster figures from real `shoal-node` processes in network namespaces
//! (root needed), printed as `name=value` lines: formation of 3 and of 20 nodes, leader failover
//! over 20 kills, gossip detection of a dead node, write latency and throughput, TLS handshake
//! cost, the transfer of a snapshot of about 500 MiB to a new node, and the catch-up of a learner
//! that was down for 100,000 writes.
#![allow(clippy::unwrap_used)] // a bench fails loudly by design

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{agreed_status, wait_for, Net, Node};

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx.min(samples.len() - 1)]
}

fn report(name: &str, unit: &str, samples: &mut [f64]) {
    println!("{name}_p50_{unit}={:.1}", percentile(samples, 0.5));
    println!("{name}_p99_{unit}={:.1}", percentile(samples, 0.99));
    println!("{name}_max_{unit}={:.1}", percentile(samples, 1.0));
    println!("{name}_samples={}", samples.len());
}

fn voters(s: &serde_json::Value) -> usize {
    s["voters"].as_array().map(|v| v.len()).unwrap_or(0)
}

fn members_in_conf(s: &serde_json::Value) -> usize {
    voters(s) + s["learners"].as_array().map(|v| v.len()).unwrap_or(0)
}

fn formation(tag: &str, count: usize) -> f64 {
    let mut net = Net::new(tag);
    let t0 = Instant::now();
    let nodes: Vec<Node> = (0..count).map(|i| net.node(i, &[])).collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(Duration::from_secs(120), "formation", || {
        agreed_status(&refs).filter(|s| members_in_conf(s) == count && voters(s) == support_target(count))
    });
    t0.elapsed().as_secs_f64() * 1000.0
}

fn support_target(nodes: usize) -> usize {
    match nodes {
        n if n >= 7 => 5,
        n if n >= 3 => 3,
        _ => 1,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test --benches lists benches; nothing to list.
    }
    if !support::can_run() {
        return;
    }
    // Formation of 3 nodes, 5 times.
    let mut form3: Vec<f64> = (0..5).map(|i| formation(&format!("f{i}"), 3)).collect();
    report("formation_3_nodes", "ms", &mut form3);
    let form20 = formation("t", 20);
    println!("formation_20_nodes_ms={form20:.0}");

    let mut net = Net::new("b");
    let mut n: Vec<Node> = (0..3).map(|i| net.node(i, &[])).collect();
    let full = |n: &[Node]| {
        let refs: Vec<&Node> = n.iter().collect();
        wait_for(Duration::from_secs(60), "3 agreeing voters", || agreed_status(&refs).filter(|s| voters(s) == 3))
    };
    let st = full(&n);

    // Write latency (sequential, to the leader and through a follower, over one kept-alive TLS
    // connection as clients hold one) and throughput; then the same writes each on a new
    // connection: the difference is what a TLS handshake (P-256, TLS 1.3) costs a client.
    let li = n.iter().position(|x| x.id() == st["leader_id"].as_str().unwrap()).unwrap();
    let timed = |node: &Node, http: &ureq::Agent, count: usize, read: bool| -> Vec<f64> {
        let auth = format!("Bearer {}", node.token());
        (0..count)
            .map(|i| {
                let url = node.url(&format!("/v1/kv/lat{}", i % 50));
                let t = Instant::now();
                if read {
                    http.get(&url).set("Authorization", &auth).call().unwrap();
                } else {
                    http.put(&url).set("Authorization", &auth).send_string("v").unwrap();
                }
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect()
    };
    let kept = n[li].agent();
    report("write_latency_leader", "ms", &mut timed(&n[li], &kept, 500, false));
    let fi = (li + 1) % 3;
    let kept_f = n[fi].agent();
    report("write_latency_via_follower", "ms", &mut timed(&n[fi], &kept_f, 200, false));
    report("linearizable_read_latency_follower", "ms", &mut timed(&n[fi], &kept_f, 200, true));
    let fresh = support::agent_without_reuse(&n[li]);
    let mut new_conn = timed(&n[li], &fresh, 200, false);
    let mut kept_again = timed(&n[li], &kept, 200, false);
    report("write_latency_leader_new_tls_connection", "ms", &mut new_conn);
    println!("tls_handshake_cost_p50_ms={:.2}", percentile(&mut new_conn, 0.5) - percentile(&mut kept_again, 0.5));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let base = n[li].url("");
    let token = n[li].token().to_string();
    let hub = net.hub().to_string();
    let agent = n[li].agent();
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let (done, stop, base, token, hub, http) =
                (done.clone(), stop.clone(), base.clone(), token.clone(), hub.clone(), agent.clone());
            std::thread::spawn(move || {
                support::enter_netns(&hub);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let url = format!("{base}/v1/kv/tp{w}-{}", i % 100);
                    if http.put(&url).set("Authorization", &format!("Bearer {token}")).send_string("value").is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    println!(
        "write_throughput_16_clients_per_s={:.0}",
        done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
    );

    // Gossip detection of a dead node: kill a follower, watch another node's member list.
    let mut detect = Vec::new();
    for round in 0..10 {
        let st = full(&n);
        let li = n.iter().position(|x| x.id() == st["leader_id"].as_str().unwrap()).unwrap();
        let victim = (li + 1 + round % 2) % 3;
        let observer = 3 - li - victim;
        let victim_id = n[victim].id();
        n[victim].kill9();
        let t = Instant::now();
        wait_for(Duration::from_secs(30), "gossip to report the node dead", || {
            let s = n[observer].status()?;
            s["members"]
                .as_array()?
                .iter()
                .any(|m| m["id_hex"] == victim_id.as_str() && m["state"] == "dead")
                .then_some(())
        });
        detect.push(t.elapsed().as_secs_f64() * 1000.0);
        n[victim].start();
    }
    report("gossip_dead_detection", "ms", &mut detect);

    // Leader failover over 20 kills: from the kill to a new leader all survivors agree on.
    let mut failover = Vec::new();
    for _ in 0..20 {
        let st = full(&n);
        // Let the restarted node catch up before the next kill.
        std::thread::sleep(Duration::from_millis(500));
        let old = st["leader_id"].as_str().unwrap().to_string();
        let li = n.iter().position(|x| x.id() == old).unwrap();
        n[li].kill9();
        let t = Instant::now();
        let survivors: Vec<&Node> = n.iter().filter(|x| x.is_running()).collect();
        wait_for(Duration::from_secs(30), "a new leader", || {
            let mut leaders = survivors.iter().map(|x| x.status().map(|s| s["leader_id"].clone()));
            let first = leaders.next()??;
            (first.as_str().is_some_and(|l| l != old) && leaders.all(|l| l.as_ref() == Some(&first))).then_some(())
        });
        failover.push(t.elapsed().as_secs_f64() * 1000.0);
        n[li].start();
    }
    report("leader_failover", "ms", &mut failover);

    drop(n);
    drop(net);
    learner_catch_up();
    big_snapshot();
}

fn applied(node: &Node) -> u64 {
    node.status().and_then(|s| s["applied_index"].as_u64()).unwrap_or(0)
}

/// Writes `count` small keys from 16 clients to `node`.
fn write_many(net: &Net, node: &Node, count: u64) {
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (next, base, token, hub, http) =
                (next.clone(), node.url(""), node.token().to_string(), net.hub().to_string(), node.agent());
            std::thread::spawn(move || {
                support::enter_netns(&hub);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let url = format!("{base}/v1/kv/cu{}", i % 1000);
                    while http.put(&url).set("Authorization", &format!("Bearer {token}")).send_string("value").is_err()
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

/// A learner down while the others take 100,000 writes: from its restart until it has applied
/// everything committed before it.
fn learner_catch_up() {
    let mut net = Net::new("c");
    let mut n: Vec<Node> = (0..4).map(|i| net.node(i, &[])).collect();
    let st = {
        let refs: Vec<&Node> = n.iter().collect();
        wait_for(Duration::from_secs(60), "3 voters and a learner", || {
            agreed_status(&refs).filter(|s| s["learners"].as_array().map(|l| l.len()) == Some(1))
        })
    };
    let learner_id = st["learners"][0].as_str().unwrap().to_string();
    let li = n.iter().position(|x| x.id() == st["leader_id"].as_str().unwrap()).unwrap();
    let lr = n.iter().position(|x| x.id() == learner_id).unwrap();
    n[lr].kill9();
    let t = Instant::now();
    write_many(&net, &n[li], 100_000);
    println!("writes_100000_16_clients_s={:.1}", t.elapsed().as_secs_f64());
    let target = applied(&n[li]);
    let installs = n[lr].log().matches("installed snapshot").count();
    let t = Instant::now();
    n[lr].start();
    wait_for(Duration::from_secs(300), "the learner to catch up", || (applied(&n[lr]) >= target).then_some(()));
    println!("learner_catch_up_after_100000_writes_ms={:.0}", t.elapsed().as_secs_f64() * 1000.0);
    println!("learner_catch_up_installed_snapshot={}", n[lr].log().matches("installed snapshot").count() > installs);
}

/// A state of about 500 MiB (270 values of 1 MB; the kept history holds them again),
/// then a new node: from its start until it has installed the snapshot and applied what was
/// committed; throughput is the snapshot's bytes over that time.
fn big_snapshot() {
    let mut net = Net::new("z");
    let n: Vec<Node> = (0..3).map(|i| net.node(i, &["--snapshot-every", "100"])).collect();
    let st = {
        let refs: Vec<&Node> = n.iter().collect();
        wait_for(Duration::from_secs(60), "3 voters", || agreed_status(&refs).filter(|s| voters(s) == 3))
    };
    let li = n.iter().position(|x| x.id() == st["leader_id"].as_str().unwrap()).unwrap();
    let value: String = (0..1_000_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let http = n[li].agent();
    let auth = format!("Bearer {}", n[li].token());
    let t = Instant::now();
    for i in 0..270 {
        let url = n[li].url(&format!("/v1/kv/big{i}"));
        wait_for(Duration::from_secs(60), "a 1 MB write", || {
            http.put(&url).set("Authorization", &auth).send_string(&value).ok()
        });
    }
    println!("writes_270_values_of_1mb_s={:.1}", t.elapsed().as_secs_f64());
    let target = applied(&n[li]);
    let t = Instant::now();
    let newcomer = net.node(3, &["--snapshot-every", "100"]);
    wait_for(Duration::from_secs(600), "the new node to install the snapshot and catch up", || {
        (newcomer.log().contains("installed snapshot") && applied(&newcomer) >= target).then_some(())
    });
    let secs = t.elapsed().as_secs_f64();
    let log = newcomer.log();
    let bytes: f64 = log
        .lines()
        .filter(|l| l.contains("installed snapshot"))
        .filter_map(|l| l.split("bytes=").nth(1)?.split_whitespace().next()?.parse().ok())
        .fold(0.0, f64::max);
    println!("snapshot_bytes={bytes:.0}");
    println!("snapshot_new_node_caught_up_ms={:.0}", secs * 1000.0);
    println!("snapshot_transfer_mib_per_s={:.1}", bytes / (1 << 20) as f64 / secs);
}
