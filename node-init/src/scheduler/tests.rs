#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use super::*;
use crate::state::testing::{spec, Sim};

fn reason_of(sim: &Sim, deployment: &str) -> String {
    sim.instances(deployment).into_iter().find(|i| i.node.is_none()).map(|i| i.reason).unwrap_or_default()
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
    sim.ok(crate::state::Command::Cordon { node: 2, cordoned: true });
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
