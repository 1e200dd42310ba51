//! The cluster core with real `shoal-node` processes, each in its own network namespace: formation
//! from one seed, joins, the cluster secret, leader failure and voter replacement, partitions,
//! full restarts, a linearizability check under faults, and the watch stream. Needs root.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::linearizability::{self, Kind, Operation};
use support::{agreed_status, logs, sorted, wait_for, Net, Node};

const FORM: Duration = Duration::from_secs(30);

/// Waits until the nodes agree on a leader and three voters; returns that status.
fn three_voters(nodes: &[&Node]) -> serde_json::Value {
    wait_for(FORM, "3 voters", || agreed_status(nodes).filter(|s| s["voters"].as_array().map(|v| v.len()) == Some(3)))
}

/// Opens `/v1/watch?from_revision=FROM` on `node` and collects each event's data in a thread;
/// returns once the stream is open.
fn watch(net: &Net, node: &Node, from: u64) -> Arc<Mutex<Vec<serde_json::Value>>> {
    let url = node.url(&format!("/v1/watch?from_revision={from}"));
    let http = node.agent();
    let token = node.token().to_string();
    let events: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = events.clone();
    let hub = net.hub().to_string();
    let (connected, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        support::enter_netns(&hub);
        let resp = http.get(&url).set("Authorization", &format!("Bearer {token}")).call().unwrap();
        let _ = connected.send(());
        use std::io::BufRead;
        for line in std::io::BufReader::new(resp.into_reader()).lines() {
            let Ok(line) = line else { return };
            if let Some(data) = line.strip_prefix("data:") {
                sink.lock().unwrap().push(serde_json::from_str(data.trim()).unwrap());
            }
        }
    });
    ready.recv_timeout(Duration::from_secs(10)).unwrap();
    events
}

fn leader_index(nodes: &[&Node], status: &serde_json::Value) -> usize {
    let leader = status["leader_id"].as_str().unwrap();
    nodes.iter().position(|n| n.id() == leader).expect("the leader is one of the nodes")
}

/// Servers booted from one PXE script get no seed: they find each other by authenticated
/// broadcast on their LAN segment and form one cluster; a node of another secret on the same
/// segment hears the broadcasts but never joins, and a node added later still finds the cluster.
#[test]
fn nodes_with_no_seed_find_each_other_on_the_lan_and_form_one_cluster() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("d");
    let started = Instant::now();
    let n: Vec<Node> = (0..3).map(|i| net.node_discovering(i, support::SECRET, &[])).collect();
    let refs: Vec<&Node> = n.iter().collect();
    let st = three_voters(&refs);
    println!("lan_discovery_formation_s={:.2}", started.elapsed().as_secs_f64());
    let bootstraps = n.iter().filter(|x| x.log().contains("bootstrapped a new cluster")).count();
    assert_eq!(bootstraps, 1, "{}", logs(&refs));
    for x in &n {
        assert!(x.log().contains("found a node on the LAN"), "node {} found nobody:\n{}", x.i, x.log());
    }
    // Another cluster's node on the same segment: its broadcasts and ours fail the tag.
    let stranger = net.node_discovering(3, "some-other-secret", &["--min-voters", "1"]);
    // A fourth node of ours, started after the cluster formed, finds it too.
    let late = net.node_discovering(4, support::SECRET, &[]);
    let ours: Vec<&Node> = n.iter().chain([&late]).collect();
    let joined = wait_for(FORM, "the late node in the cluster", || {
        agreed_status(&ours).filter(|s| s["members"].as_array().map(Vec::len) == Some(4))
    });
    assert_eq!(joined["cluster_id"], st["cluster_id"]);
    let ids: Vec<&str> = joined["members"].as_array().unwrap().iter().filter_map(|m| m["id_hex"].as_str()).collect();
    assert!(!ids.contains(&stranger.id().as_str()), "the stranger joined: {ids:?}");
    let own = wait_for(FORM, "the stranger's own one-node cluster", || {
        stranger.status().filter(|s| s["leader_id"].is_string())
    });
    assert_ne!(own["cluster_id"], st["cluster_id"], "the stranger is in our cluster");
    assert!(!stranger.log().contains("found a node on the LAN"), "{}", stranger.log());
}

#[test]
fn three_nodes_form_one_cluster_more_join_and_a_wrong_secret_is_refused() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("f");
    let n: Vec<Node> = (0..3).map(|i| net.node(i, &[])).collect();
    let refs: Vec<&Node> = n.iter().collect();
    let st = wait_for(FORM, "3 nodes to agree on a leader and 3 voters", || {
        agreed_status(&refs).filter(|s| s["voters"].as_array().map(|v| v.len()) == Some(3))
    });
    let cluster_id = st["cluster_id"].as_str().unwrap().to_string();
    assert_eq!(sorted(&st["voters"]), {
        let mut ids: Vec<String> = n.iter().map(|x| x.id()).collect();
        ids.sort();
        ids
    });
    assert!(sorted(&st["learners"]).is_empty());
    // Exactly one node bootstrapped.
    let bootstraps = n.iter().filter(|x| x.log().contains("bootstrapped a new cluster")).count();
    assert_eq!(bootstraps, 1, "{}", logs(&refs));

    // A 4th and 5th node join; with 5 nodes the rule keeps 3 voters, so they are learners.
    let n3 = net.node(3, &[]);
    let n4 = net.node(4, &[]);
    let all: Vec<&Node> = n.iter().chain([&n3, &n4]).collect();
    let st = wait_for(FORM, "5 nodes in one cluster", || {
        agreed_status(&all).filter(|s| s["learners"].as_array().map(|v| v.len()) == Some(2))
    });
    assert_eq!(st["cluster_id"], cluster_id.as_str());
    assert_eq!(st["voters"].as_array().unwrap().len(), 3);
    let members = st["members"].as_array().unwrap();
    assert_eq!(members.len(), 5);
    assert!(members.iter().all(|m| m["state"] == "alive"));

    // A node with the wrong secret hears nobody and is heard by nobody.
    let stranger = net.node_with_secret(5, "some-other-secret", &[]);
    std::thread::sleep(Duration::from_secs(4));
    let st = n[0].status().unwrap();
    let ids: Vec<String> =
        st["members"].as_array().unwrap().iter().map(|m| m["id_hex"].as_str().unwrap().to_string()).collect();
    assert!(!ids.contains(&stranger.id()), "the stranger appears in the cluster: {ids:?}");
    assert_eq!(ids.len(), 5);
    let own = stranger.status().unwrap();
    assert_eq!(own["cluster_id"], "", "the stranger must not join: {own}");
    assert!(own["leader_id"].is_null());
    // Every member holds a certificate of one cluster CA naming its own id; the stranger has none.
    let ca = std::fs::read_to_string(n[0].ca_file()).unwrap();
    for x in n.iter().chain([&n3, &n4]) {
        assert_eq!(std::fs::read_to_string(x.ca_file()).unwrap(), ca, "node {} has another CA", x.i);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(x.data_dir.join("shoalctl.yaml")).unwrap()).unwrap();
        assert_eq!(cfg["contexts"][0]["ca"], ca.as_str());
        assert_eq!(cfg["contexts"][0]["endpoint"], format!("https://{}", x.addr()).as_str());
    }
    assert!(!stranger.ca_file().exists(), "the stranger was issued a certificate");
    // Plain HTTP gets no answer from a TLS API.
    let plain = ureq::AgentBuilder::new().timeout(Duration::from_secs(3)).build();
    let answered = plain.get(&format!("http://{}/v1/cluster/status", n[0].addr())).call();
    assert!(matches!(answered, Err(ureq::Error::Transport(_))), "plain HTTP was answered: {answered:?}");
    // The seed it contacted dropped its gossip and said so.
    assert!(n[0].log().contains("without a valid cluster-secret tag"), "{}", n[0].log());
    // The API wants the cluster's token: the stranger's is refused, as is none.
    let (code, body) = n[0].call("GET", "/v1/cluster/status", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let with_wrong_token = n[0]
        .agent()
        .get(&n[0].url("/v1/cluster/status"))
        .set("Authorization", &format!("Bearer {}", stranger.token()))
        .call();
    assert!(matches!(with_wrong_token, Err(ureq::Error::Status(401, _))));
    let without = n[0].agent().get(&n[0].url("/v1/kv/x")).call();
    assert!(matches!(without, Err(ureq::Error::Status(401, _))));
}

#[test]
fn killing_the_leader_elects_another_and_its_seat_goes_to_a_learner() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("k");
    let mut n: Vec<Node> = (0..4).map(|i| net.node(i, &[])).collect();
    let st = {
        let refs: Vec<&Node> = n.iter().collect();
        wait_for(FORM, "4 nodes: 3 voters and a learner", || {
            agreed_status(&refs).filter(|s| s["learners"].as_array().map(|v| v.len()) == Some(1))
        })
    };
    let old_leader = st["leader_id"].as_str().unwrap().to_string();
    let learner = sorted(&st["learners"])[0].clone();
    let li = leader_index(&n.iter().collect::<Vec<_>>(), &st);
    n[0].put("before", "1").or_else(|_| n[1].put("before", "1")).expect("a write before the kill");
    n[li].kill9();

    let survivors: Vec<&Node> = n.iter().filter(|x| x.is_running()).collect();
    let st = wait_for(Duration::from_secs(20), "a new leader among the survivors", || {
        agreed_status(&survivors).filter(|s| s["leader_id"] != old_leader.as_str())
    });
    let rev = wait_for(Duration::from_secs(10), "a write after the failover", || survivors[0].put("after", "2").ok());
    assert!(rev > 0);
    assert_eq!(survivors[1].read("before").unwrap().as_deref(), Some("1"));
    assert_ne!(st["leader_id"], old_leader.as_str());

    // The dead voter's seat goes to the learner once it has been dead past the timeout (3 s).
    let st = wait_for(Duration::from_secs(30), "the learner to replace the dead voter", || {
        agreed_status(&survivors).filter(|s| {
            let v = sorted(&s["voters"]);
            v.len() == 3 && v.contains(&learner) && !v.contains(&old_leader)
        })
    });
    let dead = st["members"].as_array().unwrap().iter().find(|m| m["id_hex"] == old_leader.as_str()).cloned();
    if let Some(d) = dead {
        assert_eq!(d["state"], "dead");
    }
}

/// A node the operator removes (`DELETE /v1/nodes/{id}`) is revoked: it loses its seat, and
/// started again with its old data directory and certificate it is refused by every member and
/// never readmitted. A node the leader only dropped for staying dead comes back by itself.
#[test]
fn a_removed_node_cannot_rejoin_with_its_old_certificate() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("r");
    let mut n: Vec<Node> = (0..4).map(|i| net.node(i, &[])).collect();
    let st = {
        let refs: Vec<&Node> = n.iter().collect();
        wait_for(FORM, "3 voters and a learner", || {
            agreed_status(&refs).filter(|s| s["learners"].as_array().map(|v| v.len()) == Some(1))
        })
    };
    let member = |s: &serde_json::Value, id: &str| {
        sorted(&s["voters"]).contains(&id.to_string()) || sorted(&s["learners"]).contains(&id.to_string())
    };
    // The learner stays dead past the timeout (3 s): dropped from Raft, then back on its own.
    let lr = (0..4).find(|&i| sorted(&st["learners"]).contains(&n[i].id())).unwrap();
    let learner = n[lr].id();
    n[lr].kill9();
    let others: Vec<usize> = (0..4).filter(|&i| i != lr).collect();
    wait_for(Duration::from_secs(30), "the dead learner to be dropped", || {
        let refs: Vec<&Node> = others.iter().map(|&i| &n[i]).collect();
        agreed_status(&refs).filter(|s| !member(s, &learner))
    });
    n[lr].start();
    wait_for(Duration::from_secs(30), "the learner to be readmitted", || {
        let refs: Vec<&Node> = n.iter().collect();
        agreed_status(&refs).filter(|s| member(s, &learner))
    });

    // The operator removes a voter that is not the leader; the leader itself is refused.
    let st = {
        let refs: Vec<&Node> = n.iter().collect();
        wait_for(FORM, "the cluster to agree", || agreed_status(&refs))
    };
    let li = leader_index(&n.iter().collect::<Vec<_>>(), &st);
    let (code, body) = n[li].call("DELETE", &format!("/v1/nodes/{}", n[li].id()), None).unwrap();
    assert_eq!(code, 409, "{body}");
    let vi = (0..4).find(|&i| i != li && sorted(&st["voters"]).contains(&n[i].id())).unwrap();
    let gone = n[vi].id();
    let (code, body) = n[li].call("DELETE", &format!("/v1/nodes/{gone}"), None).unwrap();
    assert_eq!((code, body["revoked"].as_bool()), (200, Some(true)), "{body}");
    let survivors: Vec<usize> = (0..4).filter(|&i| i != vi).collect();
    wait_for(Duration::from_secs(30), "the revoked voter to lose its seat", || {
        let refs: Vec<&Node> = survivors.iter().map(|&i| &n[i]).collect();
        agreed_status(&refs).filter(|s| !member(s, &gone))
    });
    n[vi].kill9();
    n[vi].start();
    std::thread::sleep(Duration::from_secs(8));
    let refs: Vec<&Node> = survivors.iter().map(|&i| &n[i]).collect();
    let st = agreed_status(&refs).expect("the survivors agree");
    assert!(!member(&st, &gone), "{st}");
    // Its certificate opens no Raft connection: a member closes it after the handshake.
    let id = u64::from_str_radix(&gone, 16).unwrap();
    let identity = shoal_node::cluster::pki::Identity::load(&n[vi].data_dir.join("tls"), id).unwrap().unwrap();
    let configs = shoal_node::cluster::tls::Configs::new(identity).unwrap();
    let target = survivors[0];
    let to = u64::from_str_radix(&n[target].id(), 16).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let closed = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(format!("10.88.0.{}:7401", target + 1)).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(configs.client.clone());
        let Ok(mut s) = connector.connect(shoal_node::cluster::tls::peer_name(to), tcp).await else { return true };
        let heartbeat = raft::eraftpb::Message { from: id, to, term: 99, ..Default::default() };
        let payload = protobuf::Message::write_to_bytes(&heartbeat).unwrap();
        let mut frame = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        frame.push(0);
        frame.extend_from_slice(&payload);
        let _ = s.write_all(&frame).await;
        let _ = s.flush().await;
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
    });
    assert!(closed, "a member took a Raft connection with the removed node's certificate");
    assert!(n[target].log().contains("the node was removed from the cluster"), "{}", n[target].log());
    wait_for(Duration::from_secs(10), "a write", || n[survivors[0]].put("after", "1").ok());
}

#[test]
fn a_partitioned_minority_cannot_commit_and_catches_up_after_healing() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("p");
    let n: Vec<Node> = (0..3).map(|i| net.node(i, &[])).collect();
    let refs: Vec<&Node> = n.iter().collect();
    let st = three_voters(&refs);
    for i in 0..10 {
        n[i % 3].put(&format!("k{i}"), &format!("v{i}")).expect("writes before the partition");
    }
    // Cut the leader off: it is the minority.
    let li = leader_index(&refs, &st);
    let others: Vec<usize> = (0..3).filter(|&j| j != li).collect();
    net.partition(li, &others, true);
    let minority = &n[li];
    let majority: Vec<&Node> = n.iter().filter(|x| x.i != li).collect();
    let minority_write = minority.put("from-minority", "lost");
    assert!(matches!(minority_write, Err((503, _))), "the minority must refuse the write: {minority_write:?}");
    let minority_read = minority.read("k1");
    assert!(matches!(minority_read, Err((503, _))), "the minority served a linearizable read: {minority_read:?}");
    // A stale read is still served from the minority's local state.
    let (code, stale) = minority.get("/v1/kv/k1?stale=true").unwrap();
    assert_eq!((code, stale["kv"]["value"].as_str()), (200, Some("v1")));

    wait_for(Duration::from_secs(20), "a leader in the majority", || {
        agreed_status(&majority).filter(|s| s["leader_id"].as_str().is_some_and(|l| l != minority.id()))
    });
    for i in 10..20 {
        wait_for(Duration::from_secs(10), "majority writes", || {
            majority[i % 2].put(&format!("k{i}"), &format!("v{i}")).ok()
        });
    }
    net.partition(li, &others, false);
    wait_for(Duration::from_secs(20), "the minority to catch up", || {
        (minority.read("k19").ok()? == Some("v19".into())).then_some(())
    });
    for i in 0..20 {
        assert_eq!(minority.read(&format!("k{i}")).unwrap(), Some(format!("v{i}")), "key k{i} after healing");
        assert_eq!(majority[0].read(&format!("k{i}")).unwrap(), Some(format!("v{i}")));
    }
    assert_eq!(majority[0].read("from-minority").unwrap(), None, "the minority's write must not surface");
    agreed_status(&refs).expect("all three agree after healing");
}

/// An asymmetric partition: a follower whose packets are dropped on their way out (it hears the
/// others; they hear nothing from it) for 13 s. The others go on committing, and once the path
/// heals the follower has the writes within seconds (about 0.25 s here): its half-dead Raft
/// connections do not hold it back.
#[test]
fn a_follower_cut_off_one_way_catches_up_soon_after_the_path_heals() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("o");
    let n: Vec<Node> = (0..3).map(|i| net.node(i, &[])).collect();
    let refs: Vec<&Node> = n.iter().collect();
    let st = three_voters(&refs);
    let li = leader_index(&refs, &st);
    let fi = (li + 1) % 3;
    n[li].put("before", "1").expect("a write before the cut");
    wait_for(Duration::from_secs(10), "the follower to apply it", || {
        let (code, v) = n[fi].get("/v1/kv/before?stale=true").ok()?;
        (code == 200 && v["kv"]["value"] == "1").then_some(())
    });
    for j in (0..3).filter(|&j| j != fi) {
        net.cut_one_way(fi, j, true);
    }
    // The two others are a majority: writes go on.
    for i in 0..20 {
        wait_for(Duration::from_secs(10), "writes during the one-way cut", || n[li].put(&format!("k{i}"), "v").ok());
    }
    std::thread::sleep(Duration::from_secs(13));
    for j in (0..3).filter(|&j| j != fi) {
        net.cut_one_way(fi, j, false);
    }
    let healed = Instant::now();
    let after = wait_for(Duration::from_secs(10), "a write after the heal", || {
        let leader = agreed_status(&[&n[li], &n[(li + 2) % 3]])?;
        let l = leader_index(&refs, &leader);
        n[l].put("after", "2").ok()
    });
    assert!(after > 0);
    wait_for(Duration::from_secs(60), "the follower to apply the writes", || {
        let (code, v) = n[fi].get("/v1/kv/after?stale=true").ok()?;
        (code == 200 && v["kv"]["value"] == "2").then_some(())
    });
    let took = healed.elapsed();
    eprintln!("one-way: follower caught up {took:?} after the heal");
    assert!(
        took < Duration::from_secs(6),
        "the follower had the writes {took:?} after the heal (TCP back-off instead of a new connection?)\n{}",
        logs(&refs)
    );
    let (_, k19) = n[fi].get("/v1/kv/k19?stale=true").unwrap();
    assert_eq!(k19["kv"]["value"], "v", "a write made during the cut");
}

/// A node whose Raft log is gone (a disk that lost it, as an unsynced power cut does) must not
/// found a new cluster under the same secret beside its old one: it says why and waits.
#[test]
fn a_node_whose_raft_log_is_gone_does_not_found_a_new_cluster() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("g");
    let mut n = net.node(0, &["--min-voters", "1"]);
    let st = wait_for(FORM, "a one-node cluster", || n.status().filter(|s| s["leader_id"].is_string()));
    let cluster = st["cluster_id"].as_str().unwrap().to_string();
    n.put("k", "v").expect("a write");
    // The node records its cluster within a control round of having one.
    let mark = n.data_dir.join("cluster-id");
    wait_for(Duration::from_secs(10), "the cluster recorded", || {
        (std::fs::read_to_string(&mark).ok()?.trim() == cluster).then_some(())
    });
    n.stop();
    std::fs::remove_dir_all(n.data_dir.join("raft")).unwrap();
    n.start();
    std::thread::sleep(Duration::from_secs(6));
    let st = n.status().expect("the node answers");
    assert_eq!(st["cluster_id"].as_str().unwrap_or_default(), "", "it founded a new cluster: {st}");
    let log = n.log();
    assert!(
        log.contains(&format!("was part of cluster {cluster}")) && log.contains("will not found a new cluster"),
        "{log}"
    );
}

#[test]
fn a_node_started_with_another_secret_than_its_cluster_stops_with_a_clear_error_and_keeps_its_data() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("w");
    let mut n = net.node(0, &["--min-voters", "1"]);
    let st = wait_for(FORM, "a one-node cluster", || n.status().filter(|s| s["leader_id"].is_string()));
    n.put("k", "kept").expect("a write");
    n.stop();
    let token = std::fs::read(n.data_dir.join("api-token")).unwrap();
    // The same data directory, started with another secret (a server booted with the wrong
    // shoal.secret=): the agent says so and stops, writing nothing under the wrong secret.
    let secret_file = n.data_dir.join("test-secret");
    // A secret short enough to guess is refused outright.
    std::fs::write(&secret_file, "guessable").unwrap();
    n.start();
    assert_eq!(wait_for(Duration::from_secs(20), "the agent to stop", || n.try_wait()), Some(1));
    assert!(n.log().contains("has 9 characters, fewer than 16"), "{}", n.log());
    std::fs::write(&secret_file, "a-different-cluster-secret").unwrap();
    n.start();
    let code = wait_for(Duration::from_secs(20), "the agent to stop", || n.try_wait());
    assert_eq!(code, Some(1), "{}", n.log());
    let log = n.log();
    assert!(
        log.contains("wrong cluster secret") && log.contains("belongs to a cluster formed with another secret"),
        "{log}"
    );
    assert_eq!(std::fs::read(n.data_dir.join("api-token")).unwrap(), token, "the API token was rewritten");
    // With its own secret again, it is the same node of the same cluster, with its data.
    std::fs::write(&secret_file, support::SECRET).unwrap();
    n.start();
    let again = wait_for(FORM, "the node back as leader", || n.status().filter(|s| s["leader_id"].is_string()));
    assert_eq!(again["cluster_id"], st["cluster_id"]);
    assert_eq!(again["node_id"], st["node_id"]);
    assert_eq!(n.read("k").unwrap(), Some("kept".to_string()));
}

#[test]
fn stopping_every_node_and_starting_again_keeps_state_and_identity() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("r");
    // Snapshots every 20 entries, so the restart replays a compacted log.
    let mut n: Vec<Node> = (0..3).map(|i| net.node(i, &["--snapshot-every", "20"])).collect();
    let before = {
        let refs: Vec<&Node> = n.iter().collect();
        three_voters(&refs)
    };
    for i in 0..60 {
        wait_for(Duration::from_secs(10), "a write", || n[i % 3].put(&format!("key{i}"), &format!("value{i}")).ok());
    }
    assert!(n.iter().any(|x| x.log().contains("log compacted")), "no node compacted its log");
    for (i, x) in n.iter_mut().enumerate() {
        if i == 0 {
            x.kill9();
        } else {
            x.stop();
        }
    }
    for x in n.iter_mut() {
        x.start();
    }
    let refs: Vec<&Node> = n.iter().collect();
    let after = wait_for(FORM, "the restarted cluster to elect a leader", || agreed_status(&refs));
    assert_eq!(after["cluster_id"], before["cluster_id"]);
    assert_eq!(sorted(&after["voters"]), sorted(&before["voters"]));
    for i in 0..60 {
        assert_eq!(n[(i + 1) % 3].read(&format!("key{i}")).unwrap(), Some(format!("value{i}")));
    }
    assert!(after["revision"].as_u64().unwrap() >= 60);
    assert!(n
        .iter()
        .all(|x| !x.log().contains("bootstrapped a new cluster") || x.log().matches("bootstrapped").count() == 1));
    n[0].put("after-restart", "yes").expect("writes after the restart");
}

#[test]
fn a_watch_from_a_revision_sees_every_later_change_in_order_across_a_leader_change() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("w");
    let mut n: Vec<Node> = (0..3).map(|i| net.node(i, &[])).collect();
    let st = {
        let refs: Vec<&Node> = n.iter().collect();
        three_voters(&refs)
    };
    let li = leader_index(&n.iter().collect::<Vec<_>>(), &st);
    let watched = (li + 1) % 3;
    let writer = (li + 2) % 3;
    let start_rev = n[writer].put("w0", "0").unwrap();

    // Watch from start_rev on a follower; collect events in a thread.
    let events = watch(&net, &n[watched], start_rev);
    let mut written = Vec::new();
    for i in 1..=20 {
        let rev = n[writer].put(&format!("w{i}"), &i.to_string()).unwrap();
        written.push((rev, format!("w{i}")));
    }
    n[li].kill9();
    for i in 21..=40 {
        let key = format!("w{i}");
        let rev = wait_for(Duration::from_secs(20), "writes after the leader change", || {
            n[writer].put(&key, &i.to_string()).ok()
        });
        written.push((rev, key));
    }
    let last_rev = written.last().unwrap().0;
    let got = wait_for(Duration::from_secs(20), "the watcher to receive every change", || {
        let ev = events.lock().unwrap().clone();
        ev.iter().any(|e| e["revision"].as_u64() == Some(last_rev)).then_some(ev)
    });
    let revisions: Vec<u64> = got.iter().map(|e| e["revision"].as_u64().unwrap()).collect();
    assert!(revisions.windows(2).all(|w| w[1] == w[0] + 1), "gaps or disorder: {revisions:?}");
    assert_eq!(revisions.first().copied(), Some(start_rev + 1));
    let by_rev: BTreeMap<u64, String> =
        got.iter().map(|e| (e["revision"].as_u64().unwrap(), e["key"].as_str().unwrap().to_string())).collect();
    for (rev, key) in &written {
        assert_eq!(by_rev.get(rev), Some(key), "change at revision {rev}");
    }
}

/// Clients write, compare-and-swap and read three keys through random nodes while a fault thread
/// kills the leader (and restarts it), cuts a node off both ways, or one way (it hears the
/// others, they do not hear it), and heals, 20 rounds; each key's history must be linearizable.
#[test]
fn histories_under_leader_kills_and_partitions_are_linearizable() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("l");
    let n: Vec<Node> = (0..3).map(|i| net.node(i, &[])).collect();
    {
        let refs: Vec<&Node> = n.iter().collect();
        three_voters(&refs);
    }
    let addrs: Vec<String> = n.iter().map(|x| x.url("")).collect();
    let token = n[0].token().to_string();
    let http = n[0].agent();
    let nodes = Arc::new(Mutex::new(n));
    let stop = Arc::new(AtomicBool::new(false));
    let origin = Instant::now();
    let history: Arc<Mutex<Vec<(String, Operation)>>> = Arc::default();
    let hub = net.hub().to_string();
    let keys = ["x", "y", "z"];
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, history, addrs, token, hub, http) =
                (stop.clone(), history.clone(), addrs.clone(), token.clone(), hub.clone(), http.clone());
            std::thread::spawn(move || {
                support::enter_netns(&hub);
                let mut seq = 0u64;
                // What this client last read of each key, with its mod_revision: what its next
                // compare-and-swap on the key expects.
                let mut last: BTreeMap<&str, (Option<String>, u64)> = BTreeMap::new();
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    // In threes on one key: write (swap on z), read, then swap what was read.
                    // (Blind writes and swaps on different keys keep the checker's search small.)
                    let key = keys[((seq / 3) as usize * 7 + c) % 3];
                    let addr = &addrs[(seq as usize + c) % addrs.len()];
                    let url = format!("{addr}/v1/kv/{key}");
                    let auth = format!("Bearer {token}");
                    let invoked = origin.elapsed().as_nanos();
                    let op = |kind, completed| Some(Operation { client: c, kind, invoked, completed });
                    let op = match seq % 3 {
                        0 | 2 if key != "z" => {
                            let value = format!("c{c}-{seq}");
                            let res = http.put(&url).set("Authorization", &auth).send_string(&value);
                            let completed = origin.elapsed().as_nanos();
                            // 409 cannot happen (no condition); any error leaves the outcome unknown.
                            op(Kind::Write(value), res.is_ok().then_some(completed))
                        }
                        0 | 2 => {
                            let (expect, rev) = last.get(key).cloned().unwrap_or((None, 0));
                            let new = format!("c{c}-{seq}");
                            let res = http
                                .put(&format!("{url}?prev_revision={rev}"))
                                .set("Authorization", &auth)
                                .send_string(&new);
                            let completed = origin.elapsed().as_nanos();
                            match res {
                                Ok(_) => op(Kind::Cas { expect, new, swapped: true }, Some(completed)),
                                Err(ureq::Error::Status(409, _)) => {
                                    op(Kind::Cas { expect, new, swapped: false }, Some(completed))
                                }
                                Err(_) => op(Kind::Cas { expect, new, swapped: true }, None),
                            }
                        }
                        _ => {
                            let res = http.get(&url).set("Authorization", &auth).call();
                            let completed = origin.elapsed().as_nanos();
                            match res {
                                Ok(r) => {
                                    let v: serde_json::Value = r.into_json().unwrap();
                                    let value = v["kv"]["value"].as_str().map(str::to_string);
                                    let rev = v["kv"]["mod_revision"].as_u64().unwrap_or(0);
                                    last.insert(key, (value.clone(), rev));
                                    op(Kind::Read(value), Some(completed))
                                }
                                Err(ureq::Error::Status(404, _)) => {
                                    last.insert(key, (None, 0));
                                    op(Kind::Read(None), Some(completed))
                                }
                                Err(_) => None,
                            }
                        }
                    };
                    if let Some(op) = op {
                        history.lock().unwrap().push((key.to_string(), op));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        })
        .collect();

    for round in 0..20 {
        std::thread::sleep(Duration::from_millis(700));
        let mut n = nodes.lock().unwrap();
        let refs: Vec<&Node> = n.iter().collect();
        let st = wait_for(Duration::from_secs(30), "a leader before the fault", || agreed_status(&refs));
        let li = leader_index(&refs, &st);
        if round % 2 == 0 {
            n[li].kill9();
            std::thread::sleep(Duration::from_millis(1500));
            n[li].start();
        } else if round % 4 == 1 {
            let victim = (li + round) % 3;
            let others: Vec<usize> = (0..3).filter(|&j| j != victim).collect();
            net.partition(victim, &others, true);
            std::thread::sleep(Duration::from_millis(1500));
            net.partition(victim, &others, false);
        } else {
            // One way: the victim (the leader, every other time) hears the others; they do not
            // hear it.
            let victim = (li + round / 4) % 3;
            let others: Vec<usize> = (0..3).filter(|&j| j != victim).collect();
            for &j in &others {
                net.cut_one_way(victim, j, true);
            }
            std::thread::sleep(Duration::from_millis(1500));
            for &j in &others {
                net.cut_one_way(victim, j, false);
            }
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let history = history.lock().unwrap();
    let completed_writes =
        history.iter().filter(|(_, o)| matches!(o.kind, Kind::Write(_)) && o.completed.is_some()).count();
    let reads = history.iter().filter(|(_, o)| matches!(o.kind, Kind::Read(_))).count();
    let swaps = |swapped| {
        history
            .iter()
            .filter(|(_, o)| o.completed.is_some() && matches!(o.kind, Kind::Cas { swapped: s, .. } if s == swapped))
            .count()
    };
    let (swapped, refused) = (swaps(true), swaps(false));
    assert!(
        completed_writes > 30 && reads > 30 && swapped > 10 && refused > 0,
        "too little traffic to judge: {completed_writes} writes, {reads} reads, {swapped} swaps, {refused} refused swaps"
    );
    for key in keys {
        let ops: Vec<Operation> = history.iter().filter(|(k, _)| k == key).map(|(_, o)| o.clone()).collect();
        if let Err(e) = linearizability::check(&ops) {
            panic!("key {key}: {e}\n{}", logs(&nodes.lock().unwrap().iter().collect::<Vec<_>>()));
        }
    }
    eprintln!(
        "linearizable: {completed_writes} acknowledged writes, {reads} reads, {swapped} swaps and {refused} refused swaps, 20 fault rounds (10 kills, 5 partitions, 5 one-way cuts)"
    );
}

#[test]
fn leadership_settles_on_the_voter_with_the_most_free_memory() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("c");
    let n: Vec<Node> = [1024, 16384, 2048]
        .iter()
        .enumerate()
        .map(|(i, mem)| net.node(i, &["--capacity", &format!("vcpus=2,mem-mib={mem}")]))
        .collect();
    let refs: Vec<&Node> = n.iter().collect();
    let roomiest = n[1].id();
    wait_for(FORM, "the leader to be the node with 16 GiB free", || {
        agreed_status(&refs)
            .filter(|s| s["voters"].as_array().map(|v| v.len()) == Some(3) && s["leader_id"] == roomiest.as_str())
    });
    // It stays there.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agreed_status(&refs).unwrap()["leader_id"], roomiest.as_str());
}

/// The API on a one-node dev cluster: every bad request is a clear 4xx and changes nothing.
#[test]
fn api_requests_are_checked_and_conditional_writes_and_settings_work() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("a");
    let n = net.node(0, &["--min-voters", "1"]);
    wait_for(FORM, "a one-node cluster", || agreed_status(&[&n]));
    let rev = n.put("app/config", "v1").unwrap();
    // Conditional writes: create-only and compare-and-swap.
    let (code, body) = n.call("PUT", "/v1/kv/app/config?prev_revision=0", Some("v2")).unwrap();
    assert_eq!((code, body["current_revision"].as_u64()), (409, Some(rev)));
    let (code, _) = n.call("PUT", &format!("/v1/kv/app/config?prev_revision={rev}"), Some("v2")).unwrap();
    assert_eq!(code, 200);
    assert_eq!(n.read("app/config").unwrap().as_deref(), Some("v2"));
    let (code, body) = n.get("/v1/kv?prefix=app/").unwrap();
    assert_eq!((code, body["kvs"].as_array().unwrap().len()), (200, 1));
    // Bad requests.
    assert_eq!(n.call("PUT", "/v1/kv/shoal/nodes/x", Some("forged")).unwrap().0, 403);
    assert_eq!(n.call("PUT", "/v1/kv/app/x?prev_revision=minus-one", Some("v")).unwrap().0, 400);
    assert_eq!(n.call("PUT", &format!("/v1/kv/{}", "k".repeat(2000)), Some("v")).unwrap().0, 400);
    let huge = "x".repeat(2 << 20);
    // Refused with 413, or the connection closed while the client was still sending.
    let res = n.call("PUT", "/v1/kv/app/huge", Some(&huge));
    assert!(
        matches!(res, Ok((413, _))) || matches!(&res, Err(e) if e.contains("Broken pipe") || e.contains("reset")),
        "{res:?}"
    );
    assert_eq!(n.call("GET", "/v1/kv/app/missing", None).unwrap().0, 404);
    assert_eq!(n.call("DELETE", "/v1/kv/app/missing", None).unwrap().0, 404);
    assert_eq!(n.call("GET", "/v1/watch?from_revision=abc", None).unwrap().0, 400);
    assert_eq!(n.call("POST", "/v1/kv/app/config", Some("v")).unwrap().0, 405);
    assert_eq!(n.read("app/huge").unwrap(), None);
    // Settings: replicated keys of their own.
    assert_eq!(n.call("PUT", "/v1/cluster/settings/scheduler.spread", Some("zone")).unwrap().0, 200);
    assert_eq!(n.call("PUT", "/v1/cluster/settings/Bad Name", Some("x")).unwrap().0, 400);
    let (code, body) = n.get("/v1/cluster/settings").unwrap();
    assert_eq!((code, body["settings"]["scheduler.spread"].as_str()), (200, Some("zone")));
    let (code, body) = n.get("/v1/kv?prefix=shoal/settings/").unwrap();
    assert_eq!((code, body["kvs"][0]["value"].as_str()), (200, Some("zone")));
    // The node is alive and consistent after all that.
    assert_eq!(n.read("app/config").unwrap().as_deref(), Some("v2"));
    // (tests/workloads.rs checks every operation of the API document against a node.)
}

/// A committed entry this binary cannot apply (here: of a newer format, as a newer binary on
/// another node would write) stops the node with a clear error instead of being skipped, which
/// would leave its state silently different from the other nodes'.
#[test]
fn a_committed_entry_of_a_newer_format_stops_the_node_with_a_clear_error() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("v");
    let mut n = net.node(0, &["--min-voters", "1"]);
    wait_for(FORM, "a one-node cluster", || agreed_status(&[&n]));
    n.put("before", "1").unwrap();
    n.stop();
    {
        use raft::Storage as _;
        let store = shoal_node::cluster::storage::RaftStore::open(&n.data_dir.join("raft")).unwrap();
        let mut hs = store.hard_state();
        let index = store.last_index().unwrap() + 1;
        let newer = br#"{"format":99,"origin":1,"seq":1,"at_ms":0,"command":{"teleport":{"to":"mars"}}}"#;
        let e = raft::eraftpb::Entry { index, term: hs.term, data: newer.to_vec().into(), ..Default::default() };
        hs.commit = index;
        store.append(&[e], Some(&hs)).unwrap();
    }
    n.start();
    let exited = wait_for(Duration::from_secs(20), "the node to stop", || n.try_wait());
    assert_eq!(exited, Some(65), "{}", n.log());
    let log = n.log();
    let known = shoal_node::state::command::BINARY_FORMAT;
    assert!(
        log.contains(&format!(
            "has format 99, newer than this binary knows ({known}): upgrade shoal-node on this node"
        )) && log.contains("stopping so as not to diverge"),
        "{log}"
    );
}

/// Plain HTTP carries the API's tokens in the clear: it is refused unless the API listens on
/// loopback only. (Needs no root: the node stops before it binds anything.)
#[test]
fn plain_http_is_refused_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal-node"))
        .args(["agent", "--data-dir", dir.path().to_str().unwrap(), "--listen", "192.0.2.1:7400", "--plain-http"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--plain-http is only allowed on a loopback --listen address"), "{err}");
}

/// Three voters started with `args`; the leader's index and a follower's.
fn three_in_step(net: &mut Net, args: &[&str]) -> (Vec<Node>, usize, usize) {
    let n: Vec<Node> = (0..3).map(|i| net.node(i, args)).collect();
    let refs: Vec<&Node> = n.iter().collect();
    let st = three_voters(&refs);
    let li = leader_index(&refs, &st);
    (n, li, (li + 1) % 3)
}

/// Waits until `node` has applied `key` = `value`.
fn wait_applied(node: &Node, key: &str, value: &str) {
    wait_for(Duration::from_secs(10), "the node to apply the write", || {
        (node.read(key).ok()? == Some(value.into())).then_some(())
    });
}

/// Takes `follower` off the bridge while the leader writes `{prefix}1` to `{prefix}400` — more
/// than the leader keeps in flight to one follower (256 messages), the logs compacted meanwhile
/// (`--snapshot-every 20`) — then puts it back. Returns each write's revision and key.
fn writes_while_cut_off(net: &Net, n: &[Node], li: usize, follower: usize, prefix: &str) -> Vec<(u64, String)> {
    net.set_link(follower, false);
    let mut written = Vec::new();
    for i in 1..=400 {
        let key = format!("{prefix}{i}");
        let rev = wait_for(Duration::from_secs(20), "a write to the majority", || n[li].put(&key, "v").ok());
        written.push((rev, key));
    }
    assert!(n[li].log().contains("log compacted"), "the leader did not compact its log");
    net.set_link(follower, true);
    written
}

/// A node cut off while the others write (and compact their logs) catches up by installing a
/// snapshot: a watch open on it still sees every change, in order, with no gap.
#[test]
fn a_watch_on_a_node_that_installs_a_snapshot_sees_every_change() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("i");
    // No log tail: what the cut-off node lacks is in a snapshot only.
    let (n, li, watched) = three_in_step(&mut net, &["--snapshot-every", "20", "--log-tail", "0"]);
    let start_rev = n[li].put("s0", "0").unwrap();
    wait_applied(&n[watched], "s0", "0");
    let events = watch(&net, &n[watched], start_rev);
    let installs_before = n[watched].log().matches("installed snapshot").count();
    // Off the bridge, the watch's connection stalls (TCP keeps it) until the link is back.
    let mut written = writes_while_cut_off(&net, &n, li, watched, "s");
    wait_for(Duration::from_secs(30), "the cut-off node to install a snapshot", || {
        (n[watched].log().matches("installed snapshot").count() > installs_before).then_some(())
    });
    let last = wait_for(Duration::from_secs(20), "a write after healing", || n[li].put("s-after", "v").ok());
    written.push((last, "s-after".into()));

    let got = wait_for(Duration::from_secs(20), "the watcher to reach the last change", || {
        let ev = events.lock().unwrap().clone();
        ev.iter().any(|e| e["revision"].as_u64() == Some(last) || e["type"] == "compacted").then_some(ev)
    });
    assert!(got.iter().all(|e| e["type"] != "compacted"), "the history covers the gap; no resync was needed: {got:?}");
    let revisions: Vec<u64> = got.iter().map(|e| e["revision"].as_u64().unwrap()).collect();
    assert_eq!(revisions.first().copied(), Some(start_rev + 1));
    assert!(revisions.windows(2).all(|w| w[1] == w[0] + 1), "gaps or disorder across the snapshot: {revisions:?}");
    let keys: BTreeMap<u64, String> =
        got.iter().map(|e| (e["revision"].as_u64().unwrap(), e["key"].as_str().unwrap().to_string())).collect();
    for (rev, key) in &written {
        assert_eq!(keys.get(rev), Some(key), "change at revision {rev}");
    }
}

/// With a log tail kept past each compaction, a follower cut off for a few hundred writes (the
/// log compacted every 20 meanwhile) catches up from the log, not from a whole snapshot.
#[test]
fn a_briefly_lagging_follower_catches_up_from_the_log_tail_without_a_snapshot() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("l");
    let (n, li, lagging) = three_in_step(&mut net, &["--snapshot-every", "20", "--log-tail", "1000"]);
    n[li].put("t0", "0").unwrap();
    wait_applied(&n[lagging], "t0", "0");
    let installs_before = n[lagging].log().matches("installed snapshot").count();
    writes_while_cut_off(&net, &n, li, lagging, "t");
    wait_for(Duration::from_secs(30), "the follower to catch up", || {
        (n[lagging].read("t400").ok()? == Some("v".into())).then_some(())
    });
    assert_eq!(
        n[lagging].log().matches("installed snapshot").count(),
        installs_before,
        "the follower needed a snapshot: {}",
        n[lagging].log()
    );
}

/// A server started on a copy of another node's data directory (one Raft id, two processes)
/// is noticed through gossip: the copy stops with an error that says so, and the node it was
/// copied from and the cluster carry on.
#[test]
fn a_copied_data_directory_is_refused_and_the_original_keeps_running() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("d");
    let mut n: Vec<Node> = (0..3).map(|i| net.node(i, &[])).collect();
    let st = {
        let refs: Vec<&Node> = n.iter().collect();
        three_voters(&refs)
    };
    let mut copy = net.node(3, &[]);
    copy.kill9();
    // The fourth server gets node 1's identity and log, as if its disk had been cloned.
    let _ = std::fs::remove_dir_all(copy.data_dir.join("raft"));
    std::fs::copy(n[1].data_dir.join("node-id"), copy.data_dir.join("node-id")).unwrap();
    let status = std::process::Command::new("cp")
        .args(["-a", n[1].data_dir.join("raft").to_str().unwrap(), copy.data_dir.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    copy.start();
    let code = wait_for(Duration::from_secs(30), "the copy to stop", || copy.try_wait());
    assert_eq!(code, Some(67), "log:\n{}", copy.log());
    assert!(copy.log().contains("is a copy of that node's"), "{}", copy.log());
    assert!(n[1].is_running() && n[1].try_wait().is_none(), "the original stopped");
    n[1].put("after-copy", "yes").expect("the cluster still takes writes");
    let refs: Vec<&Node> = n.iter().collect();
    let after = wait_for(Duration::from_secs(10), "the cluster to agree", || agreed_status(&refs));
    assert_eq!(after["cluster_id"], st["cluster_id"]);
}

/// Linearizable reads on a follower while the leader dies: each waits out the election (the
/// node asks the new leader again) instead of answering 503, and sees the last write.
#[test]
fn reads_during_a_leader_election_wait_for_the_new_leader_instead_of_failing() {
    if !support::can_run() {
        return;
    }
    let mut net = Net::new("e");
    let mut n: Vec<Node> = (0..3).map(|i| net.node(i, &[])).collect();
    let st = {
        let refs: Vec<&Node> = n.iter().collect();
        three_voters(&refs)
    };
    let li = leader_index(&n.iter().collect::<Vec<_>>(), &st);
    let reader = (li + 1) % 3;
    n[li].put("before", "1").unwrap();
    n[li].kill9();
    let started = Instant::now();
    let mut refused = Vec::new();
    for _ in 0..15 {
        match n[reader].read("before") {
            Ok(v) => assert_eq!(v.as_deref(), Some("1")),
            Err((status, body)) => refused.push((status, body, started.elapsed())),
        }
    }
    assert!(refused.is_empty(), "reads refused during the election: {refused:?}");
    // With no quorum left a read fails after its deadline, saying nothing was applied (safe to
    // retry as is), unlike a write whose outcome is unknown.
    let other = (li + 2) % 3;
    n[other].kill9();
    let (status, body) = n[reader].get("/v1/kv/before").unwrap();
    assert_eq!((status, body["outcome"].as_str()), (503, Some("not_applied")), "{body}");
}
