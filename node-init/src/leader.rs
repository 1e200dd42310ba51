//! What only the leader does for workloads, in one loop: raise the cluster format once every
//! voter knows it, declare nodes lost when gossip has called them dead past the grace period
//! (their instances are then replaced elsewhere), move instances off nodes that are draining or
//! carry a `no_execute` taint they do not tolerate, run a scheduling round when instances wait
//! for a node, and delete images nothing has used for the garbage-collection grace period.
//!
//! Every decision is a pure function of the state and gossip's view (tested without sockets);
//! the loop only feeds them and proposes what they return, one command at a time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::local::LocalNode;
use crate::state::command::{Command, BINARY_FORMAT};
use crate::state::objects::Millis;
use crate::state::{ApplyOutcome, State};

/// Setting: seconds gossip must call a node dead before its instances are declared lost.
pub const NODE_GRACE_SETTING: &str = "node_grace_seconds";
pub const NODE_GRACE_DEFAULT: Duration = Duration::from_secs(30);
/// Setting: seconds an image must go unreferenced before it is deleted.
pub const IMAGE_GC_SETTING: &str = "image_gc_seconds";
pub const IMAGE_GC_DEFAULT: Duration = Duration::from_secs(3600);

const PASS: Duration = Duration::from_millis(200);

/// A duration setting in seconds, or the default when unset or not a number.
pub fn seconds_setting(state: &State, name: &str, default: Duration) -> Duration {
    state
        .setting(name)
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(default)
}

/// Nodes shutting down (gossip says so) with instances still counted as running there: their
/// instances are declared lost at once, with no grace, so replacements start elsewhere while
/// the node stops its microVMs.
pub fn stopping_nodes(state: &State, stopping: &BTreeSet<u64>) -> Vec<u64> {
    let now: BTreeMap<u64, Duration> = stopping.iter().map(|id| (*id, Duration::MAX)).collect();
    lost_nodes(state, &now, Duration::ZERO)
}

/// The format to raise the cluster to: the highest every voter advertises, if above the current.
pub fn format_to_raise(current: u32, voters: &[u64], advertised: &BTreeMap<u64, u32>) -> Option<u32> {
    let lowest = voters.iter().map(|v| advertised.get(v).copied().unwrap_or(1)).min()?;
    let target = lowest.min(BINARY_FORMAT);
    (target > current).then_some(target)
}

/// Nodes with instances still counted as running there that gossip has called dead for longer
/// than `grace`.
pub fn lost_nodes(state: &State, dead_for: &BTreeMap<u64, Duration>, grace: Duration) -> Vec<u64> {
    state
        .nodes
        .keys()
        .filter(|id| dead_for.get(id).is_some_and(|d| *d > grace))
        .filter(|id| {
            state.instances_on(**id).any(|i| {
                i.state != crate::state::objects::InstanceState::Lost
                    && (i.is_active() || i.desired == crate::state::objects::Desired::Stopped)
            })
        })
        .copied()
        .collect()
}

/// The next instance to move off its node: one a `no_execute` taint there does not let stay
/// (at once), else one of a draining node whose deployment's disruption budget allows it.
pub fn next_eviction(state: &State, term: u64) -> Option<Command> {
    use crate::state::objects::{tolerated, TaintEffect};
    for node in state.nodes.values() {
        let execute: Vec<_> = node.taints.iter().filter(|t| t.effect == TaintEffect::NoExecute).collect();
        if execute.is_empty() {
            continue;
        }
        for i in state.instances_on(node.id) {
            if i.desired != crate::state::objects::Desired::Running || !i.is_active() {
                continue;
            }
            let tolerations = state
                .deployments
                .get(&(i.tenant.clone(), i.deployment.clone()))
                .map(|d| d.spec.placement.tolerations.clone())
                .unwrap_or_default();
            if let Err(t) = tolerated(execute.iter().copied(), &tolerations) {
                return Some(Command::Evict {
                    tenant: i.tenant.clone(),
                    id: i.id.clone(),
                    node: node.id,
                    reason: format!("evicted: node {:016x} is tainted {}", node.id, t.describe()),
                    budget: false,
                    term,
                });
            }
        }
    }
    for node in state.nodes.values().filter(|n| n.drain.as_ref().is_some_and(|d| d.finished_at.is_none())) {
        for i in state.instances_on(node.id) {
            if i.desired != crate::state::objects::Desired::Running || !i.is_active() {
                continue;
            }
            if state.budget_allows(&(i.tenant.clone(), i.deployment.clone()), 1) {
                return Some(Command::Evict {
                    tenant: i.tenant.clone(),
                    id: i.id.clone(),
                    node: node.id,
                    reason: format!("moved off node {:016x}, which is draining", node.id),
                    budget: true,
                    term,
                });
            }
        }
    }
    None
}

/// Images no deployment or instance has named for longer than `grace`.
pub fn collectable_images(state: &State, now: Millis, grace: Duration) -> Vec<String> {
    let grace_ms = grace.as_millis() as u64;
    state
        .images
        .values()
        .filter(|i| i.unreferenced_since.is_some_and(|t| now.saturating_sub(t) > grace_ms))
        .filter(|i| !state.index.image_refs.contains_key(&i.digest))
        .map(|i| i.digest.clone())
        .collect()
}

pub async fn run(node: Arc<LocalNode>) {
    let started = Instant::now();
    let mut last_seen: HashMap<u64, Instant> = HashMap::new();
    let mut events = node.agent.shared.events.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PASS) => {}
            r = events.recv() => {
                if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    return;
                }
            }
        }
        let status = node.agent.shared.status();
        let peers = node.agent.peers();
        let now = Instant::now();
        let mut alive: BTreeSet<u64> = peers.iter().filter(|(_, live)| *live).map(|(p, _)| p.id).collect();
        alive.insert(node.id());
        for id in &alive {
            last_seen.insert(*id, now);
        }
        // Nodes shutting down are alive but take nothing new.
        let stopping = node.agent.stopping_nodes();
        let placeable: BTreeSet<u64> = alive.difference(&stopping).copied().collect();
        if status.role != "leader" {
            continue;
        }
        let command = {
            let state = node.agent.shared.state();
            let advertised: BTreeMap<u64, u32> =
                peers.iter().map(|(p, _)| (p.id, p.format)).chain([(node.id(), BINARY_FORMAT)]).collect();
            let dead_for: BTreeMap<u64, Duration> = state
                .nodes
                .keys()
                .filter(|id| !alive.contains(id))
                .map(|id| (*id, now - *last_seen.get(id).unwrap_or(&started)))
                .collect();
            let grace = seconds_setting(&state, NODE_GRACE_SETTING, NODE_GRACE_DEFAULT);
            if let Some(format) = format_to_raise(state.format, &status.voters, &advertised) {
                Some(Command::SetFormat { format })
            } else if let Some(lost) = stopping_nodes(&state, &stopping).first() {
                Some(Command::NodeLost {
                    node: *lost,
                    term: status.term,
                    reason: format!("node {lost:016x} is shutting down"),
                })
            } else if let Some(lost) = lost_nodes(&state, &dead_for, grace).first() {
                let secs = dead_for.get(lost).map(|d| d.as_secs()).unwrap_or(0);
                Some(Command::NodeLost {
                    node: *lost,
                    term: status.term,
                    reason: format!("node {lost:016x} has been unreachable for {secs} s"),
                })
            } else if let Some(evict) = next_eviction(&state, status.term) {
                Some(evict)
            } else if let Some(s) = crate::scheduler::schedule_with(
                &state,
                &placeable,
                status.term,
                &crate::scheduler::Options::from_settings(&state),
            ) {
                Some(Command::Schedule(s))
            } else {
                let gc = seconds_setting(&state, IMAGE_GC_SETTING, IMAGE_GC_DEFAULT);
                collectable_images(&state, crate::state::time::now_ms(), gc)
                    .into_iter()
                    .next()
                    .map(|digest| Command::DeleteImage { digest })
            }
        };
        let Some(command) = command else { continue };
        let name = command.name();
        match node.propose(command.clone()).await {
            Ok(ApplyOutcome::Applied { .. }) => {
                if let Command::NodeLost { reason, .. } = &command {
                    info!(%reason, "declared a node's instances lost; replacing them elsewhere");
                } else if let Command::Evict { id, reason, .. } = &command {
                    info!(instance = %id, %reason, "moving an instance off its node");
                } else if let Command::SetFormat { format } = &command {
                    info!(format, "raised the cluster format");
                }
            }
            Ok(other) => warn!(command = name, outcome = ?other, "leader decision not applied"),
            Err(e) => {
                tracing::debug!(command = name, error = %e, "leader decision not proposed");
                tokio::time::sleep(PASS).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::objects::InstanceState;
    use crate::state::testing::{spec, Sim};

    #[test]
    fn the_format_rises_only_when_every_voter_knows_it() {
        let voters = [1, 2, 3];
        let mut adv: BTreeMap<u64, u32> = [(1, 2), (2, 2)].into_iter().collect();
        assert_eq!(format_to_raise(1, &voters, &adv), None, "voter 3 runs an old binary (no format advertised)");
        adv.insert(3, 2);
        assert_eq!(format_to_raise(1, &voters, &adv), Some(2));
        assert_eq!(format_to_raise(2, &voters, &adv), None);
        adv.insert(3, 9);
        adv.insert(1, 9);
        adv.insert(2, 9);
        assert_eq!(format_to_raise(2, &voters, &adv), Some(BINARY_FORMAT), "never beyond what this binary writes");
        assert_eq!(format_to_raise(BINARY_FORMAT, &voters, &adv), None);
    }

    #[test]
    fn a_node_is_lost_only_past_the_grace_and_only_once() {
        let mut sim = Sim::new(3, 8, 4096);
        sim.deploy("web", spec(3, 1, 128));
        sim.schedule();
        sim.run_all("web");
        let grace = Duration::from_secs(30);
        let dead: BTreeMap<u64, Duration> = [(2, Duration::from_secs(10))].into_iter().collect();
        assert!(lost_nodes(&sim.state, &dead, grace).is_empty());
        let dead: BTreeMap<u64, Duration> = [(2, Duration::from_secs(31))].into_iter().collect();
        assert_eq!(lost_nodes(&sim.state, &dead, grace), vec![2]);
        sim.ok(Command::NodeLost { node: 2, term: 1, reason: "gone".into() });
        assert!(sim.instances("web").iter().any(|i| i.state == InstanceState::Lost));
        assert!(lost_nodes(&sim.state, &dead, grace).is_empty(), "nothing left to declare lost there");
    }

    #[test]
    fn a_node_shutting_down_is_lost_at_once_and_its_instances_are_placed_elsewhere() {
        let mut sim = Sim::new(3, 8, 4096);
        sim.deploy("web", spec(3, 1, 128));
        sim.schedule();
        sim.run_all("web");
        let stopping: BTreeSet<u64> = [2].into_iter().collect();
        assert_eq!(stopping_nodes(&sim.state, &stopping), vec![2], "no grace for a node that says it is going");
        assert!(stopping_nodes(&sim.state, &BTreeSet::new()).is_empty());
        sim.ok(Command::NodeLost { node: 2, term: 1, reason: "node 2 is shutting down".into() });
        assert!(stopping_nodes(&sim.state, &stopping).is_empty(), "declared once");
        let placeable: BTreeSet<u64> = [1, 3].into_iter().collect();
        for _ in 0..5 {
            sim.schedule_with(&placeable);
        }
        let active: Vec<_> = sim.instances("web").into_iter().filter(|i| i.is_active()).collect();
        assert_eq!(active.len(), 3, "{active:#?}");
        assert!(active.iter().all(|i| i.node.is_some_and(|n| n != 2)), "{active:#?}");
    }

    #[test]
    fn images_are_collected_after_the_grace() {
        let mut sim = Sim::new(1, 8, 4096);
        let since = sim.state.images.values().next().unwrap().unreferenced_since.unwrap();
        let grace = Duration::from_secs(3600);
        assert!(collectable_images(&sim.state, since + 1000, grace).is_empty());
        assert_eq!(collectable_images(&sim.state, since + 3_601_000, grace).len(), 1);
        sim.deploy("web", spec(1, 1, 128));
        assert!(collectable_images(&sim.state, since + 3_601_000, grace).is_empty());
    }
}
