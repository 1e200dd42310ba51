//! The state machine as the cluster sees it: keyed store revisions and watch history, typed
//! objects, the deployment controller, scheduling decisions checked on apply, lost nodes,
//! snapshots and the format gate.
#![allow(clippy::unwrap_used)]

use super::command::{Command, InstanceReport, LogEntry, Schedule};
use super::objects::{Desired, InstanceState, Quota, RestartPolicy, TenantSpec};
use super::testing::{digest, spec, template, Sim};
use super::*;

fn put(key: &str, value: &str) -> Command {
    Command::Kv(Op::Put { key: key.into(), value: value.into(), prev_revision: None })
}

fn apply_kv(s: &mut State, op: Op) -> ApplyOutcome {
    let entry = LogEntry { format: 1, origin: 1, boot: 0, seq: 1, at_ms: 1, command: Command::Kv(op) };
    s.apply(&entry, 1).0
}

#[test]
fn revisions_count_every_change_and_versions_count_writes_per_key() {
    let mut s = State::new("c");
    let p = |k: &str, v: &str| Op::Put { key: k.into(), value: v.into(), prev_revision: None };
    assert_eq!(apply_kv(&mut s, p("a", "1")), ApplyOutcome::Applied { revision: 1 });
    assert_eq!(apply_kv(&mut s, p("b", "1")), ApplyOutcome::Applied { revision: 2 });
    assert_eq!(apply_kv(&mut s, p("a", "2")), ApplyOutcome::Applied { revision: 3 });
    let a = s.get("a").unwrap();
    assert_eq!((a.value.as_str(), a.create_revision, a.mod_revision, a.version), ("2", 1, 3, 2));
    assert_eq!(
        apply_kv(&mut s, Op::Delete { key: "a".into(), prev_revision: None }),
        ApplyOutcome::Applied { revision: 4 }
    );
    assert!(s.get("a").is_none());
    assert_eq!(apply_kv(&mut s, Op::Delete { key: "a".into(), prev_revision: None }), ApplyOutcome::NotFound);
    assert_eq!(s.revision, 4);
}

#[test]
fn conditional_writes_apply_only_when_the_revision_matches() {
    let mut s = State::new("c");
    let create = Op::Put { key: "k".into(), value: "v".into(), prev_revision: Some(0) };
    assert_eq!(apply_kv(&mut s, create.clone()), ApplyOutcome::Applied { revision: 1 });
    assert_eq!(apply_kv(&mut s, create), ApplyOutcome::Conflict { current_revision: Some(1) });
    let swap = Op::Put { key: "k".into(), value: "w".into(), prev_revision: Some(1) };
    assert_eq!(apply_kv(&mut s, swap), ApplyOutcome::Applied { revision: 2 });
    let stale_delete = Op::Delete { key: "k".into(), prev_revision: Some(1) };
    assert_eq!(apply_kv(&mut s, stale_delete), ApplyOutcome::Conflict { current_revision: Some(2) });
    assert_eq!(s.get("k").unwrap().value, "w");
}

#[test]
fn changes_after_a_revision_come_in_order_and_compacted_history_is_an_error() {
    let mut s = State::new("c");
    for i in 0..(HISTORY_LEN + 10) {
        apply_kv(&mut s, Op::Put { key: format!("k{}", i % 7), value: i.to_string(), prev_revision: None });
    }
    let last = s.revision;
    let tail = s.changes_after(last - 3).unwrap();
    assert_eq!(tail.iter().map(|e| e.revision).collect::<Vec<_>>(), vec![last - 2, last - 1, last]);
    assert!(s.changes_after(last).unwrap().is_empty());
    assert_eq!(s.changes_after(3), Err(StateError::Compacted { requested: 4, oldest: 11 }));
    assert_eq!(s.changes_after(10).unwrap().len(), HISTORY_LEN);
}

#[test]
fn a_deployment_gets_its_replicas_spread_across_nodes() {
    let mut sim = Sim::new(3, 8, 4096);
    assert!(matches!(sim.deploy("web", spec(6, 1, 128)), ApplyOutcome::Applied { .. }));
    let pending = sim.instances("web");
    assert_eq!(pending.len(), 6);
    assert!(pending.iter().all(|i| i.state == InstanceState::Pending && i.node.is_none()));
    assert!(pending.iter().all(|i| i.id.starts_with("web-") && i.id.len() == 9), "{pending:?}");
    sim.schedule();
    assert_eq!(sim.spread("web").values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
    sim.run_all("web");
    let d = &sim.state.deployments[&("t".to_string(), "web".to_string())];
    assert_eq!((d.status.running, d.status.updated, d.status.pending), (6, 6, 0));
    assert_eq!(sim.state.allocated(1), objects::Resources { vcpus: 2, mem_mib: 256 });
    assert_eq!(sim.state.usage("t").instances, 6);
    // Nothing left to do: the scheduler proposes nothing.
    let alive = sim.state.nodes.keys().copied().collect();
    assert_eq!(crate::scheduler::schedule(&sim.state, &alive, 1), None);
}

#[test]
fn scaling_down_stops_instances_from_the_fullest_node_and_removes_them_once_stopped() {
    let mut sim = Sim::new(3, 8, 4096);
    sim.deploy("web", spec(9, 1, 64));
    sim.schedule();
    sim.run_all("web");
    assert_eq!(sim.spread("web").values().copied().collect::<Vec<_>>(), vec![3, 3, 3]);
    sim.deploy("web", spec(3, 1, 64));
    let stopping = sim.instances("web").iter().filter(|i| i.desired == Desired::Stopped).count();
    assert_eq!(stopping, 6);
    // Still on their nodes (holding resources) until the nodes say they stopped.
    assert_eq!(sim.instances("web").len(), 9);
    sim.stop_retired();
    assert_eq!(sim.instances("web").len(), 3);
    assert_eq!(sim.spread("web").values().copied().collect::<Vec<_>>(), vec![1, 1, 1]);
    assert_eq!(sim.state.usage("t").instances, 3);
}

#[test]
fn refusals_say_why_and_change_nothing() {
    let mut sim = Sim::new(2, 4, 2048);
    let before = sim.state.clone();
    let refused = |o: ApplyOutcome, kind: RejectKind, text: &str| match o {
        ApplyOutcome::Rejected { kind: k, reason } => {
            assert_eq!(k, kind, "{reason}");
            assert!(reason.contains(text), "{reason:?} should mention {text:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
    let mut s = spec(1, 1, 128);
    s.template.kernel = digest('b');
    refused(sim.deploy("web", s), RejectKind::Unprocessable, "is unknown");
    refused(sim.deploy("web", spec(1, 8, 128)), RejectKind::Unprocessable, "no node could ever fit it");
    refused(sim.deploy("Web", spec(1, 1, 128)), RejectKind::Invalid, "DNS label");
    refused(sim.deploy("web", spec(5000, 1, 128)), RejectKind::Invalid, "replicas");
    refused(
        sim.apply(Command::PutDeployment {
            tenant: "nobody".into(),
            name: "web".into(),
            spec: spec(1, 1, 128),
            prev_revision: None,
        }),
        RejectKind::NotFound,
        "does not exist",
    );
    sim.ok(Command::PutTenant {
        name: "t".into(),
        spec: TenantSpec { quota: Quota { vcpus: Some(4), mem_mib: Some(1024), instances: None } },
        prev_revision: None,
    });
    let after_quota = sim.state.clone();
    refused(sim.deploy("web", spec(5, 1, 128)), RejectKind::Unprocessable, "quota of 4 vCPUs");
    assert_eq!(sim.state.revision, after_quota.revision);
    assert_eq!(sim.state.deployments, before.deployments);
    assert!(sim.state.instances.is_empty());
    // Within the quota it is accepted; a second deployment may not push past it.
    assert!(matches!(sim.deploy("web", spec(3, 1, 128)), ApplyOutcome::Applied { .. }));
    refused(sim.deploy("db", spec(2, 1, 128)), RejectKind::Unprocessable, "quota of 4 vCPUs");
    // The tenant cannot go while it has deployments.
    refused(sim.apply(Command::DeleteTenant { name: "t".into() }), RejectKind::Conflict, "delete them first");
}

#[test]
fn a_decision_from_a_deposed_leader_fails_and_no_node_is_double_booked() {
    let mut sim = Sim::new(2, 2, 4096);
    sim.deploy("web", spec(2, 2, 128));
    let alive = sim.state.nodes.keys().copied().collect();
    let old = crate::scheduler::schedule(&sim.state, &alive, 1).unwrap();
    // A new leader is elected (term 2) and commits its first entry, then places the instances.
    sim.term = 2;
    sim.state.observe_term(2);
    let new = crate::scheduler::schedule(&sim.state, &alive, 2).unwrap();
    sim.ok(Command::Schedule(new));
    let placed = sim.spread("web");
    assert_eq!(placed.values().sum::<usize>(), 2);
    // The old leader's decision arrives late: refused whole.
    match sim.apply(Command::Schedule(old.clone())) {
        ApplyOutcome::Rejected { kind: RejectKind::Stale, .. } => {}
        other => panic!("{other:?}"),
    }
    // Even in the current term, assignments of already placed instances or onto full nodes are skipped.
    let replay = Schedule { term: 2, ..old };
    sim.ok(Command::Schedule(replay));
    assert_eq!(sim.spread("web"), placed);
    for id in [1, 2] {
        assert!(sim.state.allocated(id).vcpus <= 2);
    }
    // A second deployment that does not fit stays pending with the reason.
    sim.deploy("db", spec(1, 1, 128));
    sim.schedule();
    let db = &sim.instances("db")[0];
    assert_eq!(db.node, None);
    assert_eq!(db.reason, "no node has 1 vCPUs free: 2 nodes checked");
}

#[test]
fn a_lost_node_s_instances_are_replaced_elsewhere_and_it_cannot_take_them_back() {
    let mut sim = Sim::new(3, 8, 4096);
    sim.deploy("web", spec(6, 1, 128));
    sim.schedule();
    sim.run_all("web");
    let on_3: Vec<_> = sim.instances("web").into_iter().filter(|i| i.node == Some(3)).collect();
    assert_eq!(on_3.len(), 2);
    sim.ok(Command::NodeLost { node: 3, term: 1, reason: "node 3 was unreachable for 30 s".into() });
    let all = sim.instances("web");
    assert_eq!(all.iter().filter(|i| i.state == InstanceState::Lost).count(), 2);
    assert_eq!(all.iter().filter(|i| i.state == InstanceState::Pending).count(), 2, "replacements");
    assert_eq!(sim.state.allocated(3), objects::Resources::default(), "lost instances hold nothing");
    let alive = [1, 2].into_iter().collect();
    sim.schedule_with(&alive);
    sim.run_all("web");
    assert_eq!(sim.spread("web").values().copied().collect::<Vec<_>>(), vec![3, 3]);
    // The node comes back: its reports are refused; it stops the instances and they go.
    let lost = &on_3[0];
    assert!(matches!(
        sim.report(lost, 3, InstanceState::Running, 0, None),
        ApplyOutcome::Rejected { kind: RejectKind::Conflict, .. }
    ));
    for i in &on_3 {
        sim.ok(Command::InstanceStopped { node: 3, tenant: "t".into(), id: i.id.clone() });
    }
    assert_eq!(sim.instances("web").len(), 6);
    assert!(sim.instances("web").iter().all(|i| i.state == InstanceState::Running));
}

#[test]
fn a_template_change_replaces_instances_one_at_a_time() {
    let mut sim = Sim::new(3, 8, 4096);
    sim.deploy("web", spec(3, 1, 128));
    sim.schedule();
    sim.run_all("web");
    let mut changed = spec(3, 1, 128);
    changed.template.cmdline = "v2".into();
    sim.deploy("web", changed);
    let gen = sim.state.deployments[&("t".into(), "web".into())].generation;
    assert_eq!(gen, 2);
    for round in 0..3 {
        let all = sim.instances("web");
        let running_old = all.iter().filter(|i| i.generation == 1 && i.desired == Desired::Running).count();
        let new = all.iter().filter(|i| i.generation == 2).count();
        assert_eq!(new, round + 1, "one new instance per step");
        assert_eq!(running_old, 3 - round, "no old instance stops before its replacement runs");
        assert!(all.iter().filter(|i| i.desired == Desired::Running).count() <= 4, "at most one extra");
        sim.schedule();
        sim.run_all("web");
        sim.stop_retired();
    }
    let all = sim.instances("web");
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|i| i.generation == 2 && i.template.cmdline == "v2" && i.state == InstanceState::Running));
}

#[test]
fn restart_policies_decide_what_counts_as_done() {
    let mut sim = Sim::new(1, 8, 4096);
    let mut s = spec(1, 1, 128);
    s.template.restart = RestartPolicy::Never;
    sim.deploy("job", s);
    sim.schedule();
    let i = sim.instances("job").remove(0);
    sim.report(&i, 1, InstanceState::Failed, 0, Some(2));
    let after = sim.instances("job");
    assert_eq!(after.len(), 1, "a finished instance is not replaced");
    assert!(after[0].is_final());
    assert_eq!(after[0].last_exit_code, Some(2));
    assert_eq!(sim.state.allocated(1), objects::Resources::default());
    // With `always` a failure is a restart in waiting: still holding its node.
    sim.deploy("svc", spec(1, 1, 128));
    sim.schedule();
    let i = sim.instances("svc").remove(0);
    sim.report(&i, 1, InstanceState::Failed, 3, Some(2));
    assert_eq!(sim.state.allocated(1).vcpus, 1);
    assert_eq!(sim.instances("svc")[0].restarts, 3);
}

#[test]
fn deleting_a_deployment_stops_its_instances_then_removes_it() {
    let mut sim = Sim::new(2, 8, 4096);
    sim.deploy("web", spec(3, 1, 128));
    sim.schedule();
    sim.ok(Command::DeleteDeployment { tenant: "t".into(), name: "web".into() });
    assert!(sim.instances("web").iter().all(|i| i.desired == Desired::Stopped));
    assert!(sim.state.deployments[&("t".into(), "web".into())].deleting);
    sim.stop_retired();
    assert!(sim.instances("web").is_empty());
    assert!(!sim.state.deployments.contains_key(&("t".into(), "web".into())));
}

#[test]
fn cordoned_nodes_get_nothing_new() {
    let mut sim = Sim::new(2, 8, 4096);
    sim.ok(Command::Cordon { node: 2, cordoned: true });
    sim.deploy("web", spec(4, 1, 128));
    // A decision naming the cordoned node is not honoured on apply either.
    let forced = Schedule {
        term: 1,
        revision: sim.state.revision,
        assignments: sim
            .instances("web")
            .iter()
            .map(|i| command::Assignment { tenant: "t".into(), id: i.id.clone(), node: 2 })
            .collect(),
        pending: vec![],
        preemptions: vec![],
    };
    sim.ok(Command::Schedule(forced));
    assert!(sim.spread("web").is_empty());
    sim.schedule();
    assert_eq!(sim.spread("web").into_iter().collect::<Vec<_>>(), vec![(1, 4)]);
}

#[test]
fn images_are_refused_while_used_and_know_since_when_they_are_unreferenced() {
    let mut sim = Sim::new(1, 8, 4096);
    let img = |sim: &Sim| sim.state.images[&digest('a')].clone();
    assert!(img(&sim).unreferenced_since.is_some());
    sim.deploy("web", spec(1, 1, 128));
    assert_eq!(img(&sim).unreferenced_since, None);
    assert!(matches!(
        sim.apply(Command::DeleteImage { digest: digest('a') }),
        ApplyOutcome::Rejected { kind: RejectKind::Conflict, .. }
    ));
    sim.ok(Command::DeleteDeployment { tenant: "t".into(), name: "web".into() });
    assert!(img(&sim).unreferenced_since.is_some(), "the pending instance was removed with its deployment");
    sim.ok(Command::DeleteImage { digest: digest('a') });
    assert!(sim.state.images.is_empty());
    // A copy of a different size is a damaged copy.
    sim.ok(Command::ImageStored { digest: digest('c'), size: 5, node: 1, tenant: Some("t".into()) });
    assert!(matches!(
        sim.apply(Command::ImageStored { digest: digest('c'), size: 6, node: 1, tenant: None }),
        ApplyOutcome::Rejected { kind: RejectKind::Conflict, .. }
    ));
    assert!(sim.state.images_of_tenant("t").contains(&digest('c')));
    assert!(sim.state.images_of_tenant("other").is_empty());
}

#[test]
fn reports_only_from_the_assigned_node_and_only_changes_bump_the_revision() {
    let mut sim = Sim::new(2, 8, 4096);
    sim.deploy("web", spec(1, 1, 128));
    sim.schedule();
    let i = sim.instances("web").remove(0);
    let node = i.node.unwrap();
    let other = if node == 1 { 2 } else { 1 };
    assert!(matches!(
        sim.report(&i, other, InstanceState::Running, 0, None),
        ApplyOutcome::Rejected { kind: RejectKind::Conflict, .. }
    ));
    sim.report(&i, node, InstanceState::Running, 0, None);
    let rev = sim.state.revision;
    sim.report(&i, node, InstanceState::Running, 0, None);
    assert_eq!(sim.state.revision, rev, "an unchanged report changes nothing");
    assert!(matches!(
        sim.apply(Command::InstanceReport(InstanceReport {
            node,
            tenant: "t".into(),
            id: i.id.clone(),
            state: InstanceState::Lost,
            restarts: 0,
            last_exit_code: None,
            reason: String::new(),
            started_at: None,
            finished_at: None
        })),
        ApplyOutcome::Rejected { kind: RejectKind::Invalid, .. }
    ));
}

#[test]
fn snapshots_round_trip_and_rebuild_the_indexes() {
    let mut sim = Sim::new(3, 8, 4096);
    sim.ok(put("user/key", "v"));
    sim.deploy("web", spec(5, 1, 128));
    sim.schedule();
    sim.run_all("web");
    sim.ok(Command::AddTenantToken { tenant: "t".into(), id: "k1".into(), sha256: "ab".repeat(32) });
    let back = State::from_bytes(&sim.state.to_bytes()).unwrap();
    assert_eq!(back, sim.state);
    assert_eq!(back.index, sim.state.index);
    assert_eq!(back.tenant_of_token(&"ab".repeat(32)), Some("t"));
    assert!(matches!(State::from_bytes(b"{not json"), Err(StateError::BadSnapshot(_))));
    assert!(matches!(State::from_bytes(br#"{"layout": 9}"#), Err(StateError::BadSnapshot(_))));
}

#[test]
fn a_first_release_snapshot_loads_with_its_nodes_and_the_first_format() {
    let rec = NodeRecord {
        id: 5,
        raft_addr: "a:1".into(),
        api_addr: "a:0".into(),
        labels: Default::default(),
        capacity: Default::default(),
    };
    let legacy = serde_json::json!({
        "cluster_id": "old",
        "revision": 2,
        "data": {
            "shoal/nodes/0000000000000005": {"key": "shoal/nodes/0000000000000005", "value": serde_json::to_string(&rec).unwrap(), "create_revision": 1, "mod_revision": 1, "version": 1},
            "mine": {"key": "mine", "value": "x", "create_revision": 2, "mod_revision": 2, "version": 1}
        },
        "history": []
    });
    let s = State::from_bytes(legacy.to_string().as_bytes()).unwrap();
    assert_eq!((s.cluster_id.as_str(), s.revision, s.format), ("old", 2, command::FORMAT_KV));
    assert_eq!(s.nodes[&5].api_addr, "a:0");
    assert_eq!(s.get("mine").unwrap().version, 1);
    assert!(s.get("shoal/nodes/0000000000000005").is_none());
}

#[test]
fn new_commands_wait_for_the_cluster_format() {
    let mut sim = Sim::new(1, 8, 4096);
    sim.state.format = command::FORMAT_KV;
    let before = sim.state.clone();
    match sim.apply(Command::PutTenant { name: "u".into(), spec: TenantSpec::default(), prev_revision: None }) {
        ApplyOutcome::Rejected { kind: RejectKind::Unsupported, reason } => {
            assert!(reason.contains("every voter"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.state.tenants, before.tenants);
    assert!(matches!(sim.apply(put("k", "v")), ApplyOutcome::Applied { .. }), "the keyed store still works");
    sim.ok(Command::SetFormat { format: 2 });
    assert_eq!(sim.state.format, 2);
    sim.ok(Command::PutTenant { name: "u".into(), spec: TenantSpec::default(), prev_revision: None });
}

#[test]
fn the_same_log_gives_the_same_state() {
    let run = || {
        let mut sim = Sim::new(4, 4, 1024);
        sim.deploy("a", spec(7, 1, 256));
        sim.deploy("b", spec(3, 2, 128));
        sim.schedule();
        sim.run_all("a");
        sim.ok(Command::NodeLost { node: 2, term: 1, reason: "gone".into() });
        sim.schedule();
        sim.deploy("a", spec(2, 1, 256));
        sim.state
    };
    assert_eq!(run(), run());
}

#[test]
fn every_object_change_is_one_watch_event() {
    let mut sim = Sim::new(1, 8, 4096);
    let from = sim.state.revision;
    sim.deploy("web", spec(2, 1, 128));
    let events = sim.state.changes_after(from).unwrap();
    let revisions: Vec<u64> = events.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, ((from + 1)..=sim.state.revision).collect::<Vec<_>>());
    assert!(events.iter().any(|e| e.key == "shoal/deployments/t/web"));
    assert_eq!(events.iter().filter(|e| e.key.starts_with("shoal/instances/t/web-")).count(), 2);
    let inst: objects::Instance =
        serde_json::from_str(&events.iter().find(|e| e.key.starts_with("shoal/instances/")).unwrap().value).unwrap();
    assert_eq!(inst.template, template(1, 128));
}

#[test]
fn an_identity_is_registered_once_per_node_and_never_again_after_removal() {
    let mut sim = Sim::new(2, 8, 4096);
    let (a, b) = ("a".repeat(64), "b".repeat(64));
    sim.ok(Command::RegisterIdentity { node: 7, key: a.clone() });
    // The same key again is a retried join: it succeeds and changes nothing.
    sim.ok(Command::RegisterIdentity { node: 7, key: a.clone() });
    let other = sim.apply(Command::RegisterIdentity { node: 7, key: b.clone() });
    assert!(matches!(other, ApplyOutcome::Rejected { kind: RejectKind::Conflict, .. }), "{other:?}");
    assert!(sim.state.pki.admits(7, &a) && !sim.state.pki.admits(7, &b));
    let bad = sim.apply(Command::RegisterIdentity { node: 8, key: "xyz".into() });
    assert!(matches!(bad, ApplyOutcome::Rejected { kind: RejectKind::Invalid, .. }), "{bad:?}");
    // Dropped from Raft (dead too long), node 1 keeps its identity; revoked, it loses it and
    // its id is never reissued.
    sim.ok(Command::RegisterIdentity { node: 1, key: a.clone() });
    sim.state.remove_node(1, 0);
    assert!(sim.state.pki.admits(1, &a));
    sim.ok(Command::RevokeNode { node: 1 });
    assert!(!sim.state.pki.admits(1, &a));
    assert_eq!(sim.apply(Command::RevokeNode { node: 99 }), ApplyOutcome::NotFound);
    let again = sim.apply(Command::RegisterIdentity { node: 1, key: b });
    assert!(
        matches!(&again, ApplyOutcome::Rejected { kind: RejectKind::Conflict, reason } if reason.contains("fresh data directory")),
        "{again:?}"
    );
    // All of it survives a snapshot.
    let restored = State::from_bytes(&sim.state.to_bytes()).unwrap();
    assert_eq!(restored.pki, sim.state.pki);
}

#[test]
fn placed_instances_get_distinct_addresses_from_their_node_s_subnet_and_finished_ones_give_them_back() {
    let mut sim = Sim::new(2, 64, 1 << 20);
    sim.ok(Command::PutTenant { name: "u".into(), spec: TenantSpec::default(), prev_revision: None });
    assert_eq!(sim.deploy("web", spec(6, 1, 64)), ApplyOutcome::Applied { revision: sim.state.revision });
    sim.settle();
    let subnets: BTreeMap<u64, objects::Ipv4Cidr> =
        sim.state.nodes.values().map(|n| (n.id, n.subnet.expect("a node with instances has a subnet"))).collect();
    assert_eq!(subnets.len(), 2);
    let (a, b) = (subnets[&1], subnets[&2]);
    assert!(!a.overlaps(&b), "{a} and {b}");
    let cluster: objects::Ipv4Cidr = network::DEFAULT_CIDR.parse().unwrap();
    assert!(cluster.contains(a.network()) && cluster.contains(b.network()));
    let insts = sim.instances("web");
    let mut seen = BTreeSet::new();
    for i in &insts {
        let ip = i.address.expect("a placed instance has an address");
        assert!(subnets[&i.node.unwrap()].contains(ip), "{ip} in its node's subnet");
        assert!(seen.insert(ip), "{ip} given twice");
        assert_ne!(ip, shoal_netstack::ipam::gateway(&subnets[&i.node.unwrap()]), "not the gateway");
        let mac = shoal_netstack::ipam::format_mac(&shoal_netstack::ipam::mac_for(&i.uid));
        assert_eq!(i.mac.as_deref(), Some(mac.as_str()));
    }
    let vni = sim.state.tenants["t"].vni.expect("a tenant with instances has a VNI");
    assert!(sim.state.tenants["u"].vni.is_none(), "no instances, no VNI yet");

    // A second tenant's instances get another VNI and addresses no live instance holds.
    sim.apply(Command::PutDeployment {
        tenant: "u".into(),
        name: "db".into(),
        spec: spec(2, 1, 64),
        prev_revision: None,
    });
    sim.settle();
    assert_ne!(sim.state.tenants["u"].vni, Some(vni));
    let all: Vec<_> = sim.state.instances.values().filter_map(|i| i.address).collect();
    assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 8, "{all:?}");

    // An instance finished for good gives its address back; the next one placed may take it.
    let mut once = spec(1, 1, 64);
    once.template.restart = RestartPolicy::Never;
    sim.deploy("job", once);
    sim.settle();
    let job = sim.instances("job").pop().unwrap();
    let ip = job.address.unwrap();
    sim.report(&job, job.node.unwrap(), InstanceState::Exited, 0, Some(0));
    assert_eq!(sim.instances("job")[0].address, None, "released when it ended for good");
    let taken: BTreeSet<_> = sim.state.instances.values().filter_map(|i| i.address).collect();
    assert!(!taken.contains(&ip));
}

#[test]
fn an_unusable_cluster_network_keeps_instances_pending_and_says_why() {
    let mut sim = Sim::new(1, 64, 1 << 20);
    // The nodes of Sim live on 10.0.0.0/24.
    sim.ok(put(&format!("{SETTINGS_PREFIX}{}", network::CIDR_SETTING), "10.0.0.0/16"));
    sim.deploy("web", spec(1, 1, 64));
    sim.schedule();
    let i = sim.instances("web").pop().unwrap();
    assert_eq!((i.node, i.address), (None, None));
    assert!(i.reason.contains("holds node 0000000000000001's own address 10.0.0.1"), "{}", i.reason);
    // Fixed: it is placed.
    sim.ok(put(&format!("{SETTINGS_PREFIX}{}", network::CIDR_SETTING), "10.64.0.0/20"));
    sim.settle();
    let i = sim.instances("web").pop().unwrap();
    assert_eq!(sim.state.nodes[&1].subnet.unwrap().to_string(), "10.64.0.0/24");
    assert_eq!(i.address, Some("10.64.0.2".parse().unwrap()));

    // A full subnet: the instance past it waits.
    let mut sim = Sim::new(1, 1024, 1 << 30);
    sim.ok(put(&format!("{SETTINGS_PREFIX}{}", network::NODE_PREFIX_SETTING), "28"));
    sim.deploy("web", spec(14, 1, 64));
    sim.settle();
    let placed = sim.instances("web").iter().filter(|i| i.address.is_some()).count();
    assert_eq!(placed, 13, "a /28 holds 13 instances besides its network, gateway and broadcast");
    let waiting: Vec<_> = sim.instances("web").into_iter().filter(|i| i.node.is_none()).collect();
    assert_eq!(waiting.len(), 1);
    assert!(waiting[0].reason.contains("no node has a free address in its subnet"), "{}", waiting[0].reason);

    // The scheduler counts addresses: a node with room for the vCPUs and memory but none for
    // the address is passed over (node 1 is the less loaded one, its subnet is full).
    sim.add_node(2, 16, 1 << 20, &[]);
    sim.deploy("web", spec(13, 1, 64));
    sim.deploy("api", spec(3, 1, 64));
    sim.settle();
    let api = sim.instances("api");
    assert!(api.iter().all(|i| i.node == Some(2) && i.address.is_some()), "{api:#?}");
    sim.deploy("more", spec(12, 1, 64));
    sim.settle();
    let more = sim.instances("more");
    assert_eq!(more.iter().filter(|i| i.address.is_some()).count(), 10, "node 2's /28 holds 13: 3 for api, 10 more");
    assert!(more.iter().filter(|i| i.node.is_none()).all(|i| i.reason.contains("no node has a free address")));
}

#[test]
fn a_cluster_below_the_network_format_gives_no_addresses() {
    let mut sim = Sim::new(1, 64, 1 << 20);
    sim.state.format = command::FORMAT_IDENTITY;
    sim.deploy("web", spec(2, 1, 64));
    sim.settle();
    assert!(sim.instances("web").iter().all(|i| i.node.is_some() && i.address.is_none()));
    assert!(sim.state.nodes[&1].subnet.is_none());
}

#[test]
fn a_node_without_instance_networking_gets_no_subnet_and_its_instances_no_addresses() {
    let mut sim = Sim::new(0, 64, 1 << 20);
    sim.add_node(1, 64, 1 << 20, &[network::NO_NETWORK_LABEL]);
    // A /28 subnet holds 13 addresses: a node with networking would stop there.
    sim.ok(put(&format!("{SETTINGS_PREFIX}{}", network::NODE_PREFIX_SETTING), "28"));
    sim.deploy("web", spec(16, 1, 64));
    sim.settle();
    let web = sim.instances("web");
    assert!(web.iter().all(|i| i.node == Some(1) && i.address.is_none() && i.mac.is_none()), "{web:#?}");
    assert!(sim.state.nodes[&1].subnet.is_none());
    // A node with networking beside it gets addresses for what lands there.
    sim.add_node(2, 64, 1 << 20, &[]);
    sim.deploy("api", spec(1, 1, 64));
    sim.settle();
    let api = sim.instances("api").pop().unwrap();
    assert_eq!(api.node, Some(2), "the less loaded node: {}", api.reason);
    assert!(api.address.is_some() && sim.state.nodes[&2].subnet.is_some());
}

#[test]
fn a_node_port_is_published_by_one_deployment_and_only_in_its_range() {
    use super::objects::{DeploymentSpec, PortProtocol, PublishedPort};
    let mut sim = Sim::new(2, 4, 2048);
    let with = |node_port: u16, protocol: PortProtocol| {
        let mut s = spec(1, 1, 128);
        s.ports = vec![PublishedPort { port: 80, node_port, protocol }];
        s
    };
    let refused = |o: ApplyOutcome, kind: RejectKind, text: &str| match o {
        ApplyOutcome::Rejected { kind: k, reason } => {
            assert_eq!(k, kind, "{reason}");
            assert!(reason.contains(text), "{reason:?} should mention {text:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(matches!(sim.deploy("web", with(30080, PortProtocol::Tcp)), ApplyOutcome::Applied { .. }));
    // The same deployment may keep its own port; another may not take it (UDP is another port).
    assert!(matches!(sim.deploy("web", with(30080, PortProtocol::Tcp)), ApplyOutcome::Applied { .. }));
    refused(sim.deploy("api", with(30080, PortProtocol::Tcp)), RejectKind::Conflict, "published by t/web");
    assert!(matches!(sim.deploy("dns", with(30080, PortProtocol::Udp)), ApplyOutcome::Applied { .. }));
    refused(sim.deploy("api", with(80, PortProtocol::Tcp)), RejectKind::Invalid, "outside 30000-32767");
    let mut twice = with(30081, PortProtocol::Tcp);
    twice.ports.push(twice.ports[0].clone());
    refused(sim.deploy("api", twice), RejectKind::Invalid, "given twice");
    // A spec without ports or egress reads as published nothing, egress allowed.
    let s: DeploymentSpec =
        serde_json::from_str(&format!(r#"{{"replicas": 1, "template": {{"kernel": "{}"}}}}"#, digest('a'))).unwrap();
    assert!(s.egress && s.ports.is_empty());
    let s: DeploymentSpec = serde_json::from_str(&format!(
        r#"{{"replicas": 1, "egress": false, "ports": [{{"port": 53, "node_port": 30053, "protocol": "udp"}}], "template": {{"kernel": "{}"}}}}"#,
        digest('a')
    ))
    .unwrap();
    assert!(!s.egress && s.ports[0].protocol == PortProtocol::Udp);
}
