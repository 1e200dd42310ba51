#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::state::command::Command;
use crate::state::objects::*;
use crate::state::testing::{spec, Sim};

fn reason_of(sim: &Sim, deployment: &str) -> String {
    sim.instances(deployment).into_iter().find(|i| i.node.is_none()).map(|i| i.reason).unwrap_or_default()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// `zones` zones of `per_zone` nodes (ids from 1), each in its own rack `zone-N`.
fn fleet(zones: &[&str], per_zone: u64, vcpus: u64, mem_mib: u64) -> Sim {
    let mut sim = Sim::new(0, 0, 0);
    let mut id = 1;
    for z in zones {
        for n in 0..per_zone {
            let rack = format!("{z}-{}", n / 2);
            sim.add_node(id, vcpus, mem_mib, &[("zone", z), ("rack", &rack)]);
            id += 1;
        }
    }
    sim
}

fn all_alive(sim: &Sim) -> BTreeSet<u64> {
    sim.state.nodes.keys().copied().collect()
}

fn no_violations(sim: &Sim) {
    let v = check::violations(&sim.state, &all_alive(sim));
    assert!(v.is_empty(), "{v:#?}");
}

#[test]
fn replicas_spread_before_packing_and_the_least_loaded_node_wins_ties() {
    let mut sim = Sim::new(3, 8, 8192);
    // Node 1 already runs a big instance of another deployment.
    sim.deploy("big", spec(1, 4, 4096));
    sim.schedule();
    assert_eq!(sim.spread("big").keys().copied().collect::<Vec<_>>(), vec![1]);
    sim.deploy("web", spec(2, 1, 128));
    sim.schedule();
    assert_eq!(sim.spread("web").keys().copied().collect::<Vec<_>>(), vec![2, 3], "the loaded node is passed over");
    sim.deploy("web", spec(3, 1, 128));
    sim.schedule();
    assert_eq!(sim.spread("web").keys().copied().collect::<Vec<_>>(), vec![1, 2, 3], "then spread wins over load");
}

#[test]
fn pending_reasons_count_each_rule() {
    let mut sim = Sim::new(3, 4, 2048);
    sim.deploy("huge", spec(1, 1, 2048));
    sim.deploy("fill", spec(3, 1, 1024));
    sim.schedule();
    sim.deploy("more", spec(1, 1, 2048));
    sim.schedule();
    assert_eq!(reason_of(&sim, "more"), "no node has 2048 MiB free: 3 nodes checked");

    let mut sim = Sim::new(3, 4, 4096);
    sim.add_node(4, 4, 4096, &[("zone", "b")]);
    sim.ok(Command::Cordon { node: 2, cordoned: true });
    let mut s = spec(1, 1, 128);
    s.placement.node_labels.insert("zone".into(), "b".into());
    sim.deploy("zoned", s);
    let alive: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    sim.schedule_with(&alive);
    assert_eq!(
        reason_of(&sim, "zoned"),
        "no node fits: 4 nodes checked: 1 not alive, 1 cordoned, 2 without the labels zone=b"
    );
    // The node comes alive: it gets the instance and the reason goes.
    sim.schedule();
    let i = &sim.instances("zoned")[0];
    assert_eq!((i.node, i.reason.as_str()), (Some(4), ""));
}

#[test]
fn five_nodes_explain_memory_spread_and_taints_at_once() {
    let mut sim = Sim::new(0, 0, 0);
    for (id, zone, mem) in [(1, "a", 1024), (2, "a", 1024), (3, "b", 8192), (4, "b", 8192), (5, "c", 8192)] {
        sim.add_node(id, 8, mem, &[("zone", zone)]);
    }
    sim.set_node(
        5,
        NodeSpec {
            labels: BTreeMap::new(),
            taints: vec![Taint { key: "gpu".into(), value: "true".into(), effect: TaintEffect::NoSchedule }],
        },
    );
    let mut s = spec(4, 1, 2048);
    s.placement.spread.push(SpreadRule { key: "zone".into(), max_skew: 1, hard: true, selector: None });
    sim.deploy("web", s);
    sim.schedule();
    // Zone b takes one; a cannot (memory), c only through a tainted node; b may not take two
    // more while a and c hold none.
    assert_eq!(sim.per_domain("web", "zone"), [("b".to_string(), 1)].into_iter().collect());
    assert_eq!(
        reason_of(&sim, "web"),
        "no node fits: 5 nodes checked: 1 tainted gpu=true:no_schedule, 2 without 2048 MiB free, 2 zone spread (max_skew 1)"
    );
}

#[test]
fn constraints_filter_by_each_operator() {
    let mut sim = Sim::new(0, 0, 0);
    sim.add_node(1, 100, 65536, &[("disk", "ssd"), ("gen", "3")]);
    sim.add_node(2, 100, 65536, &[("disk", "hdd"), ("gen", "5")]);
    sim.add_node(3, 100, 65536, &[("gen", "1")]);
    let cases: [(ConstraintOp, &[&str], &[u64]); 6] = [
        (ConstraintOp::In, &["ssd"], &[1]),
        (ConstraintOp::NotIn, &["ssd"], &[2, 3]),
        (ConstraintOp::Exists, &[], &[1, 2]),
        (ConstraintOp::NotExists, &[], &[3]),
        (ConstraintOp::Gt, &["2"], &[1, 2]),
        (ConstraintOp::Lt, &["4"], &[1, 3]),
    ];
    for (i, (op, values, want)) in cases.iter().enumerate() {
        let key = if matches!(op, ConstraintOp::Gt | ConstraintOp::Lt) { "gen" } else { "disk" };
        let mut s = spec(6, 1, 64);
        s.placement.constraints.push(Constraint {
            key: key.into(),
            op: *op,
            values: values.iter().map(|v| v.to_string()).collect(),
        });
        let name = format!("c{i}");
        sim.deploy(&name, s);
        sim.schedule();
        let got: Vec<u64> = sim.spread(&name).keys().copied().collect();
        assert_eq!(&got, want, "{op:?} {values:?}");
    }
    // gt/lt need one number; in needs values.
    let mut bad = spec(1, 1, 64);
    bad.placement.constraints.push(Constraint { key: "gen".into(), op: ConstraintOp::Gt, values: vec!["x".into()] });
    assert!(bad.validate().is_err());
}

#[test]
fn hard_zone_spread_keeps_max_skew_and_binpack_still_obeys_it() {
    let mut sim = fleet(&["a", "b", "c"], 2, 16, 16384);
    let mut s = spec(7, 1, 64);
    s.placement.strategy = Some(Strategy::Binpack);
    s.placement.spread.push(SpreadRule { key: "zone".into(), max_skew: 1, hard: true, selector: None });
    sim.deploy("web", s);
    sim.schedule();
    let mut zones: Vec<usize> = sim.per_domain("web", "zone").values().copied().collect();
    zones.sort();
    assert_eq!(zones, vec![2, 2, 3]);
    // Binpack packs each zone's share onto one node.
    assert_eq!(sim.spread("web").len(), 3);
    no_violations(&sim);
}

#[test]
fn fewer_domains_than_max_skew_still_places_everything() {
    let mut sim = fleet(&["a", "b"], 1, 16, 16384);
    let mut s = spec(5, 1, 64);
    s.placement.spread.push(SpreadRule { key: "zone".into(), max_skew: 3, hard: true, selector: None });
    sim.deploy("web", s);
    sim.schedule();
    assert_eq!(sim.spread("web").values().sum::<usize>(), 5);
    let z: Vec<usize> = sim.per_domain("web", "zone").values().copied().collect();
    assert!(z.iter().max().unwrap() - z.iter().min().unwrap() <= 3, "{z:?}");
    no_violations(&sim);
}

#[test]
fn nodes_without_the_spread_key_are_neither_counted_nor_eligible_for_a_hard_rule() {
    let mut sim = fleet(&["a", "b"], 1, 16, 16384);
    sim.add_node(10, 64, 65536, &[]); // A big node with no zone label.
    let mut hard = spec(4, 1, 64);
    hard.placement.spread.push(SpreadRule { key: "zone".into(), max_skew: 1, hard: true, selector: None });
    sim.deploy("hard", hard);
    sim.schedule();
    assert!(!sim.spread("hard").contains_key(&10), "a hard rule keeps off nodes without the key");
    assert_eq!(sim.per_domain("hard", "zone").values().copied().collect::<Vec<_>>(), vec![2, 2]);
    let mut soft = spec(3, 1, 64);
    soft.placement.spread.push(SpreadRule { key: "zone".into(), max_skew: 1, hard: false, selector: None });
    sim.deploy("soft", soft);
    sim.schedule();
    assert_eq!(sim.spread("soft").values().sum::<usize>(), 3, "a soft rule only scores");
    no_violations(&sim);
}

#[test]
fn a_spread_selector_counts_instances_of_several_deployments() {
    let mut sim = fleet(&["a", "b", "c"], 1, 16, 16384);
    let mut first = spec(2, 1, 64);
    first.labels = labels(&[("tier", "front")]);
    first.placement.node_labels = labels(&[("zone", "a")]);
    sim.deploy("first", first);
    sim.schedule();
    // The second deployment evens the whole tier (its own and the first's instances).
    let mut second = spec(4, 1, 64);
    second.labels = labels(&[("tier", "front")]);
    second.placement.spread.push(SpreadRule {
        key: "zone".into(),
        max_skew: 1,
        hard: true,
        selector: Some(labels(&[("tier", "front")])),
    });
    sim.deploy("second", second);
    sim.schedule();
    let z = sim.per_domain("second", "zone");
    assert_eq!(z.get("a"), None, "zone a already has two of the tier: {z:?}");
    assert_eq!((z.get("b"), z.get("c")), (Some(&2), Some(&2)));
}

#[test]
fn max_per_domain_caps_each_rack() {
    let mut sim = fleet(&["a"], 6, 16, 16384); // racks a-0, a-1, a-2 of two nodes
    let mut s = spec(8, 1, 64);
    s.placement.max_per_domain.push(DomainCap { key: "rack".into(), max: 2 });
    sim.deploy("web", s);
    sim.schedule();
    let racks = sim.per_domain("web", "rack");
    assert_eq!(racks.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
    assert!(reason_of(&sim, "web").contains("6 at rack max_per_domain 2"), "{}", reason_of(&sim, "web"));
    no_violations(&sim);
}

#[test]
fn hard_anti_affinity_holds_both_ways_and_weighted_only_prefers() {
    let mut sim = Sim::new(4, 16, 16384);
    let mut db = spec(2, 1, 64);
    db.labels = labels(&[("app", "db")]);
    db.placement.anti_affinity.push(AffinityRule {
        selector: labels(&[("app", "web")]),
        key: NODE_DOMAIN.into(),
        hard: true,
        weight: 50,
        tenants: None,
    });
    sim.deploy("db", db);
    sim.schedule();
    let db_nodes: BTreeSet<u64> = sim.spread("db").keys().copied().collect();
    // web has no rule of its own, yet keeps off db's nodes: db's rule holds both ways.
    let mut web = spec(4, 1, 64);
    web.labels = labels(&[("app", "web")]);
    sim.deploy("web", web);
    sim.schedule();
    let web_nodes: BTreeSet<u64> = sim.spread("web").keys().copied().collect();
    assert!(db_nodes.is_disjoint(&web_nodes), "db {db_nodes:?}, web {web_nodes:?}");
    assert_eq!(sim.spread("web").values().sum::<usize>(), 4);
    no_violations(&sim);
    // A weighted preference away from db still uses db's nodes when nothing else fits.
    let mut sim = Sim::new(2, 16, 16384);
    let mut db = spec(1, 1, 64);
    db.labels = labels(&[("app", "db")]);
    sim.deploy("db", db);
    sim.schedule();
    let mut cache = spec(2, 1, 64);
    cache.placement.anti_affinity.push(AffinityRule {
        selector: labels(&[("app", "db")]),
        key: NODE_DOMAIN.into(),
        hard: false,
        weight: 100,
        tenants: None,
    });
    sim.deploy("cache", cache);
    sim.schedule();
    assert_eq!(sim.spread("cache").values().sum::<usize>(), 2, "soft rules never block");
}

#[test]
fn hard_affinity_follows_its_target_and_a_self_attracting_group_starts_anywhere() {
    let mut sim = fleet(&["a", "b", "c"], 1, 16, 16384);
    let mut app = spec(3, 1, 64);
    app.placement.affinity.push(AffinityRule {
        selector: labels(&[("app", "db")]),
        key: "zone".into(),
        hard: true,
        weight: 50,
        tenants: None,
    });
    sim.deploy("app", app);
    sim.schedule();
    assert!(reason_of(&sim, "app").contains("affinity to app=db on zone"), "{}", reason_of(&sim, "app"));
    let mut db = spec(1, 1, 64);
    db.labels = labels(&[("app", "db")]);
    db.placement.node_labels = labels(&[("zone", "b")]);
    sim.deploy("db", db);
    sim.schedule();
    sim.schedule();
    assert_eq!(sim.per_domain("app", "zone"), [("b".to_string(), 3)].into_iter().collect());
    // A group that attracts itself: the first goes anywhere, the rest follow it.
    let mut pack = spec(3, 1, 64);
    pack.labels = labels(&[("app", "pack")]);
    pack.placement.affinity.push(AffinityRule {
        selector: labels(&[("app", "pack")]),
        key: "zone".into(),
        hard: true,
        weight: 1,
        tenants: None,
    });
    sim.deploy("pack", pack);
    sim.schedule();
    assert_eq!(sim.per_domain("pack", "zone").len(), 1);
    assert_eq!(sim.spread("pack").values().sum::<usize>(), 3);
    no_violations(&sim);
}

#[test]
fn rules_about_other_tenants_need_them_named() {
    let mut sim = Sim::new(2, 16, 16384);
    sim.ok(Command::PutTenant { name: "u".into(), spec: TenantSpec::default(), prev_revision: None });
    let mut theirs = spec(1, 1, 64);
    theirs.labels = labels(&[("app", "noisy")]);
    sim.apply(Command::PutDeployment { tenant: "u".into(), name: "noisy".into(), spec: theirs, prev_revision: None });
    sim.schedule();
    let noisy_node = sim.state.instances.values().find(|i| i.deployment == "noisy").unwrap().node.unwrap();
    let rule = |tenants| AffinityRule {
        selector: labels(&[("app", "noisy")]),
        key: NODE_DOMAIN.into(),
        hard: true,
        weight: 50,
        tenants,
    };
    // Same tenant by default: tenant u's deployment is not seen.
    let mut mine = spec(2, 1, 64);
    mine.placement.anti_affinity.push(rule(None));
    sim.deploy("mine", mine);
    sim.schedule();
    assert_eq!(sim.spread("mine").len(), 2, "spread on both nodes, noisy's included");
    let mut careful = spec(1, 1, 64);
    careful.placement.anti_affinity.push(rule(Some(vec!["*".into()])));
    sim.deploy("careful", careful);
    sim.schedule();
    assert!(!sim.spread("careful").contains_key(&noisy_node));
}

#[test]
fn taints_keep_off_what_does_not_tolerate_them_and_no_execute_evicts() {
    let mut sim = Sim::new(2, 16, 16384);
    sim.deploy("web", spec(4, 1, 64));
    sim.settle();
    assert_eq!(sim.spread("web").len(), 2);
    let gpu = Taint { key: "gpu".into(), value: "true".into(), effect: TaintEffect::NoSchedule };
    sim.set_node(2, NodeSpec { labels: BTreeMap::new(), taints: vec![gpu] });
    sim.deploy("new", spec(2, 1, 64));
    sim.schedule();
    assert_eq!(sim.spread("new").keys().copied().collect::<Vec<_>>(), vec![1], "no_schedule keeps new ones off");
    assert_eq!(sim.spread("web").get(&2), Some(&2), "no_schedule leaves what runs");
    let mut tolerant = spec(2, 1, 64);
    tolerant.placement.tolerations.push(Toleration {
        key: "gpu".into(),
        operator: TolerationOp::Exists,
        value: String::new(),
        effect: None,
    });
    sim.deploy("tolerant", tolerant);
    sim.schedule();
    assert_eq!(sim.spread("tolerant").len(), 2);
    // no_execute: the leader evicts what does not tolerate it, one command at a time.
    let evict = Taint { key: "maintenance".into(), value: String::new(), effect: TaintEffect::NoExecute };
    sim.set_node(2, NodeSpec { labels: BTreeMap::new(), taints: vec![evict] });
    while let Some(cmd) = crate::leader::next_eviction(&sim.state, 1) {
        sim.ok(cmd);
        sim.settle();
    }
    assert!(sim.state.instances_on(2).all(|i| !i.is_active()), "nothing runs on the no_execute node");
    assert_eq!(sim.spread("web").values().sum::<usize>(), 4, "web's instances run elsewhere");
}

#[test]
fn higher_priority_places_first_and_preempts_the_fewest_lowest() {
    let mut sim = Sim::new(2, 4, 8192);
    let mut low = spec(4, 1, 64);
    low.placement.priority = -10;
    sim.deploy("low", low);
    let mut mid = spec(4, 1, 64);
    mid.placement.priority = 0;
    sim.deploy("mid", mid);
    sim.settle();
    assert_eq!(sim.spread("low").values().sum::<usize>() + sim.spread("mid").values().sum::<usize>(), 8, "full");
    let mut high = spec(1, 2, 64);
    high.placement.priority = 100;
    sim.deploy("high", high);
    sim.schedule();
    // Two lowest-priority instances (of `low`) on one node make room.
    let stopping: Vec<Instance> =
        sim.state.instances.values().filter(|i| i.desired == Desired::Stopped).cloned().collect();
    assert_eq!(stopping.len(), 2, "{stopping:#?}");
    assert!(stopping.iter().all(|i| i.deployment == "low" && i.reason.contains("preempted by")));
    let nominated = sim.instances("high")[0].nominated_node;
    assert_eq!(nominated, stopping[0].node);
    sim.settle();
    let high = &sim.instances("high")[0];
    assert_eq!(high.node, nominated, "placed where room was made");
    assert_eq!(high.state, InstanceState::Running);
    no_violations(&sim);
}

#[test]
fn preemption_never_breaks_a_disruption_budget() {
    let mut sim = Sim::new(1, 2, 8192);
    let mut low = spec(2, 1, 64);
    low.placement.priority = -1;
    low.placement.disruption_budget = Some(DisruptionBudget { max_unavailable: 0 });
    sim.deploy("low", low);
    sim.settle();
    let mut high = spec(1, 1, 64);
    high.placement.priority = 10;
    sim.deploy("high", high);
    sim.schedule();
    assert!(sim.state.instances.values().all(|i| i.desired == Desired::Running), "nothing preempted");
    assert_eq!(sim.instances("high")[0].reason, "no node has 1 vCPUs free: 1 node checked");
    // A budget of one lets one go.
    let mut low = spec(2, 1, 64);
    low.placement.priority = -1;
    low.placement.disruption_budget = Some(DisruptionBudget { max_unavailable: 1 });
    sim.deploy("low", low);
    sim.schedule();
    assert_eq!(sim.state.instances.values().filter(|i| i.desired == Desired::Stopped).count(), 1);
}

#[test]
fn a_drain_with_a_budget_of_one_moves_one_instance_at_a_time() {
    let mut sim = Sim::new(3, 16, 16384);
    let mut s = spec(6, 1, 64);
    s.placement.disruption_budget = Some(DisruptionBudget { max_unavailable: 1 });
    sim.deploy("web", s);
    sim.settle();
    let on_1 = sim.spread("web").get(&1).copied().unwrap_or(0);
    assert_eq!(on_1, 2);
    sim.ok(Command::Drain { node: 1, drain: true });
    assert!(sim.state.nodes[&1].cordoned);
    let mut moves = 0;
    while let Some(cmd) = crate::leader::next_eviction(&sim.state, 1) {
        sim.ok(cmd);
        // With one instance down, the next eviction waits for its replacement to run.
        assert!(crate::leader::next_eviction(&sim.state, 1).is_none(), "one at a time");
        assert_eq!(sim.state.unavailable(&("t".into(), "web".into())), 1);
        sim.settle();
        moves += 1;
    }
    assert_eq!(moves, 2);
    assert!(sim.state.nodes[&1].drain.as_ref().unwrap().finished_at.is_some(), "the drain is done");
    assert_eq!(sim.spread("web").get(&1), None);
    assert_eq!(sim.spread("web").values().sum::<usize>(), 6);
}

#[test]
fn binpack_fills_nodes_and_spread_empties_them() {
    let mut sim = Sim::new(3, 8, 8192);
    let mut packed = spec(6, 1, 64);
    packed.placement.strategy = Some(Strategy::Binpack);
    sim.deploy("packed", packed);
    sim.schedule();
    assert_eq!(sim.spread("packed").values().copied().collect::<Vec<_>>(), vec![6]);
    sim.deploy("even", spec(6, 1, 64));
    sim.schedule();
    assert_eq!(sim.spread("even").values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
}

#[test]
fn every_node_scored_decides_the_same_on_the_same_input() {
    let build = || {
        let mut sim = fleet(&["a", "b", "c"], 4, 8, 8192);
        let mut s = spec(9, 1, 512);
        s.placement.spread.push(SpreadRule { key: "zone".into(), max_skew: 1, hard: false, selector: None });
        sim.deploy("a", s);
        sim
    };
    let alive = all_alive(&build());
    let all = Options { sample: Some(usize::MAX), ..Options::default() };
    let one = schedule_with(&build().state, &alive, 1, &all).unwrap();
    let two = schedule_with(&build().state, &alive, 1, &all).unwrap();
    assert_eq!(one, two);
}

#[test]
fn a_plan_says_what_would_happen_and_changes_nothing() {
    let mut sim = fleet(&["a", "b"], 1, 4, 4096);
    sim.deploy("web", spec(2, 1, 64));
    sim.settle();
    let before = sim.state.clone();
    let alive = all_alive(&sim);
    let mut bigger = spec(10, 1, 64);
    bigger.placement.spread.push(SpreadRule { key: "zone".into(), max_skew: 1, hard: true, selector: None });
    let plan = plan::plan(&sim.state, &alive, "t", "web", &bigger, &Options::default(), 5_000).unwrap();
    assert_eq!(sim.state, before, "planning changes nothing");
    assert_eq!(plan.placements.iter().map(|p| p.count).sum::<usize>(), 8, "{plan:?}");
    assert_eq!(plan.pending.iter().map(|p| p.count).sum::<usize>(), 2);
    assert_eq!(plan.pending[0].reason, "no node has 1 vCPUs free: 2 nodes checked");
    assert_eq!(plan.current, 2);
    // A plan of what cannot be honoured answers as the real change would.
    let err = plan::plan(&sim.state, &alive, "t", "web", &spec(1, 64, 64), &Options::default(), 5_000).unwrap_err();
    assert_eq!(err.0, crate::state::RejectKind::Unprocessable);
    // Preemptions show.
    let mut high = spec(2, 4, 64);
    high.placement.priority = 5;
    let plan = plan::plan(&sim.state, &alive, "t", "high", &high, &Options::default(), 5_000).unwrap();
    assert_eq!(plan.placements.iter().map(|p| p.count).sum::<usize>(), 2, "{plan:?}");
    assert_eq!(plan.preemptions.len(), 2);
}

#[test]
fn a_rollout_stops_old_instances_as_its_budget_allows() {
    let mut sim = Sim::new(2, 16, 16384);
    let mut s = spec(4, 1, 64);
    s.placement.update = Some(UpdateStrategy { max_unavailable: Some(2), max_surge: Some(0) });
    sim.deploy("web", s.clone());
    sim.settle();
    s.template.cmdline = "v2".into();
    sim.deploy("web", s);
    let stopping = sim.instances("web").iter().filter(|i| i.desired == Desired::Stopped).count();
    assert_eq!(stopping, 2, "two old ones stop at once, no extra new one");
    assert!(sim.instances("web").iter().filter(|i| i.desired == Desired::Running).count() <= 4);
    sim.settle();
    assert!(sim.instances("web").iter().all(|i| i.template.cmdline == "v2" && i.state == InstanceState::Running));
    assert_eq!(sim.instances("web").len(), 4);
}

#[test]
fn an_unchanged_reason_is_not_proposed_again() {
    let mut sim = Sim::new(1, 1, 512);
    sim.deploy("a", spec(2, 1, 128));
    sim.schedule();
    let alive: BTreeSet<u64> = [1].into_iter().collect();
    assert!(schedule(&sim.state, &alive, 1).is_none(), "the second replica's reason is already recorded");
    assert_eq!(reason_of(&sim, "a"), "no node has 1 vCPUs free: 1 node checked");
}

#[test]
fn the_same_state_gives_the_same_decision() {
    let build = || {
        let mut sim = Sim::new(5, 4, 4096);
        sim.deploy("a", spec(9, 1, 512));
        sim.deploy("b", spec(4, 2, 1024));
        sim
    };
    let alive: BTreeSet<u64> = (1..=5).collect();
    let one = schedule(&build().state, &alive, 3).unwrap();
    let two = schedule(&build().state, &alive, 3).unwrap();
    assert_eq!(one, two);
    assert_eq!(one.term, 3);
    // Every assignment fits its node when applied together.
    let mut sim = build();
    sim.ok(crate::state::Command::Schedule(one));
    for n in 1..=5 {
        let a = sim.state.allocated(n);
        assert!(a.vcpus <= 4 && a.mem_mib <= 4096, "node {n} over-committed: {a:?}");
    }
}

mod properties {
    //! Random fleets and deployments: whatever the scheduler decides, no hard rule is broken,
    //! no node is over-committed, and the same input always gives the same decisions.
    use super::*;
    use crate::state::objects::Strategy as Packing;
    use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest, ProptestConfig, Strategy};

    #[derive(Debug, Clone)]
    struct FleetNode {
        zone: Option<u8>,
        rack: u8,
        vcpus: u64,
        mem_gib: u64,
        taint: bool,
    }

    #[derive(Debug, Clone)]
    struct Dep {
        replicas: u32,
        vcpus: u32,
        mem: u64,
        zone_spread: Option<(u32, bool)>,
        rack_cap: Option<u32>,
        anti_to: Option<(usize, bool, bool)>,
        tolerate: bool,
        priority: i32,
        binpack: bool,
    }

    fn fleet_node() -> impl Strategy<Value = FleetNode> {
        (prop::option::weighted(0.9, 0u8..3), 0u8..4, 1u64..16, 1u64..16, prop::bool::weighted(0.2))
            .prop_map(|(zone, rack, vcpus, mem_gib, taint)| FleetNode { zone, rack, vcpus, mem_gib, taint })
    }

    fn dep() -> impl Strategy<Value = Dep> {
        (
            1u32..12,
            1u32..4,
            prop::sample::select(vec![64u64, 256, 1024, 2048]),
            prop::option::of((1u32..3, any::<bool>())),
            prop::option::of(1u32..4),
            prop::option::of((0usize..6, any::<bool>(), any::<bool>())),
            any::<bool>(),
            -2i32..3,
            any::<bool>(),
        )
            .prop_map(|(replicas, vcpus, mem, zone_spread, rack_cap, anti_to, tolerate, priority, binpack)| {
                Dep { replicas, vcpus, mem, zone_spread, rack_cap, anti_to, tolerate, priority, binpack }
            })
    }

    fn build(nodes: &[FleetNode], deps: &[Dep]) -> Sim {
        let mut sim = Sim::new(0, 0, 0);
        for (i, n) in nodes.iter().enumerate() {
            let id = i as u64 + 1;
            let zone = n.zone.map(|z| format!("z{z}"));
            let rack = format!("r{}", n.rack);
            let mut l: Vec<(&str, &str)> = vec![("rack", &rack)];
            if let Some(z) = &zone {
                l.push(("zone", z));
            }
            sim.add_node(id, n.vcpus, n.mem_gib * 1024, &l);
            if n.taint {
                let t = Taint { key: "special".into(), value: "yes".into(), effect: TaintEffect::NoSchedule };
                sim.set_node(id, NodeSpec { labels: BTreeMap::new(), taints: vec![t] });
            }
        }
        for (i, d) in deps.iter().enumerate() {
            let mut s = spec(d.replicas, d.vcpus, d.mem);
            s.labels = labels(&[("app", &format!("d{i}"))]);
            let p = &mut s.placement;
            if let Some((skew, hard)) = d.zone_spread {
                p.spread.push(SpreadRule { key: "zone".into(), max_skew: skew, hard, selector: None });
            }
            if let Some(max) = d.rack_cap {
                p.max_per_domain.push(DomainCap { key: "rack".into(), max });
            }
            if let Some((other, hard, by_node)) = d.anti_to {
                p.anti_affinity.push(AffinityRule {
                    selector: labels(&[("app", &format!("d{other}"))]),
                    key: if by_node { NODE_DOMAIN.into() } else { "zone".into() },
                    hard,
                    weight: 40,
                    tenants: None,
                });
            }
            if d.tolerate {
                p.tolerations.push(Toleration {
                    key: "special".into(),
                    operator: TolerationOp::Exists,
                    value: String::new(),
                    effect: None,
                });
            }
            p.priority = d.priority;
            if d.binpack {
                p.strategy = Some(Packing::Binpack);
            }
            sim.deploy(&format!("d{i}"), s);
        }
        sim
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
        #[test]
        fn hard_rules_hold_nothing_is_overcommitted_and_decisions_repeat(
            nodes in prop::collection::vec(fleet_node(), 1..14),
            deps in prop::collection::vec(dep(), 1..7),
        ) {
            let mut sim = build(&nodes, &deps);
            sim.settle();
            let alive = all_alive(&sim);
            let v = check::violations(&sim.state, &alive);
            prop_assert!(v.is_empty(), "{:#?}", v);
            // The same input, the same decisions, down to every instance's node.
            let mut again = build(&nodes, &deps);
            again.settle();
            prop_assert_eq!(&sim.state.instances, &again.state.instances);
        }
    }
}
