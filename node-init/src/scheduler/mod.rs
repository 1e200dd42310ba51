//! Placement: which node runs each pending instance. A pure function of the replicated state and
//! gossip's view of which nodes are alive: no I/O, no clock, deterministic (same input, same
//! decision), tested without sockets. The leader runs it and proposes its [`Schedule`]; the state
//! machine checks every assignment again when it applies it.
//!
//! The rule: a node is eligible when it is alive, not cordoned, carries the deployment's
//! `node_labels`, and its unallocated vCPUs and memory (what the instances assigned to it hold,
//! not what gossip guesses) fit the instance. Among eligible nodes the one with the fewest
//! instances of the same deployment wins (replicas spread across nodes), then the least loaded,
//! then the lowest id. An instance no node can take stays pending with the reason, counted per
//! rule.

use std::collections::{BTreeMap, BTreeSet};

use crate::state::command::{Assignment, PendingReason, Schedule};
use crate::state::objects::{Instance, Node, Resources};
use crate::state::State;

/// Most assignments one decision carries (the rest wait for the next round).
pub const MAX_PER_ROUND: usize = 1000;

/// Why a node was ruled out for an instance (the first rule it fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RuledOut {
    NotAlive,
    Cordoned,
    Labels,
    Vcpus,
    Memory,
}

/// One round of placement over every unassigned instance (oldest first). `None` when there is
/// nothing to assign and no pending reason to change.
pub fn schedule(state: &State, alive: &BTreeSet<u64>, term: u64) -> Option<Schedule> {
    let mut allocated: BTreeMap<u64, Resources> = state.nodes.keys().map(|id| (*id, state.allocated(*id))).collect();
    // Instances of each deployment per node, including this round's assignments.
    let mut spread: BTreeMap<(String, String), BTreeMap<u64, usize>> = BTreeMap::new();
    let mut assignments = Vec::new();
    let mut pending = Vec::new();
    for inst in state.unassigned().take(MAX_PER_ROUND) {
        let Some(dep) = state.deployments.get(&(inst.tenant.clone(), inst.deployment.clone())) else { continue };
        let key = (inst.tenant.clone(), inst.deployment.clone());
        let counts = spread.entry(key).or_insert_with(|| per_node(state, inst));
        let need = inst.template.resources();
        let mut ruled_out: BTreeMap<RuledOut, usize> = BTreeMap::new();
        let mut best: Option<((usize, u64, u64, u64), u64)> = None;
        for node in state.nodes.values() {
            let used = allocated.get(&node.id).copied().unwrap_or_default();
            if let Some(why) = rule_out(node, alive, &dep.spec.placement.node_labels, used, need) {
                *ruled_out.entry(why).or_default() += 1;
                continue;
            }
            let score = (
                counts.get(&node.id).copied().unwrap_or(0),
                permille(used.mem_mib + need.mem_mib, node.capacity.mem_mib),
                permille(used.vcpus + need.vcpus, node.capacity.vcpus),
                node.id,
            );
            if best.is_none_or(|(b, _)| score < b) {
                best = Some((score, node.id));
            }
        }
        match best {
            Some((_, node)) => {
                allocated.entry(node).or_default().add(need);
                *counts.entry(node).or_default() += 1;
                assignments.push(Assignment { tenant: inst.tenant.clone(), id: inst.id.clone(), node });
            }
            None => {
                let reason = explain(state.nodes.len(), &ruled_out, &dep.spec.placement.node_labels, need);
                if reason != inst.reason {
                    pending.push(PendingReason { tenant: inst.tenant.clone(), id: inst.id.clone(), reason });
                }
            }
        }
    }
    if assignments.is_empty() && pending.is_empty() {
        return None;
    }
    Some(Schedule { term, revision: state.revision, assignments, pending })
}

fn per_node(state: &State, inst: &Instance) -> BTreeMap<u64, usize> {
    let mut out = BTreeMap::new();
    let key = (inst.tenant.clone(), inst.deployment.clone());
    for id in state.index.deployment_instances.get(&key).into_iter().flatten() {
        if let Some(node) = state.instances.get(&(inst.tenant.clone(), id.clone())).and_then(Instance::holds_node) {
            *out.entry(node).or_default() += 1;
        }
    }
    out
}

fn permille(used: u64, capacity: u64) -> u64 {
    used.saturating_mul(1000).checked_div(capacity).unwrap_or(u64::MAX)
}

fn rule_out(
    node: &Node,
    alive: &BTreeSet<u64>,
    labels: &BTreeMap<String, String>,
    used: Resources,
    need: Resources,
) -> Option<RuledOut> {
    if !alive.contains(&node.id) {
        return Some(RuledOut::NotAlive);
    }
    if node.cordoned {
        return Some(RuledOut::Cordoned);
    }
    if !labels.iter().all(|(k, v)| node.labels.get(k) == Some(v)) {
        return Some(RuledOut::Labels);
    }
    if used.vcpus.saturating_add(need.vcpus) > node.capacity.vcpus {
        return Some(RuledOut::Vcpus);
    }
    if used.mem_mib.saturating_add(need.mem_mib) > node.capacity.mem_mib {
        return Some(RuledOut::Memory);
    }
    None
}

/// "no node has 4096 MiB free: 3 nodes checked", or every rule with its count.
fn explain(
    checked: usize,
    ruled_out: &BTreeMap<RuledOut, usize>,
    labels: &BTreeMap<String, String>,
    need: Resources,
) -> String {
    if checked == 0 {
        return "no node has joined the cluster".into();
    }
    let plural = |n: usize| if n == 1 { "node" } else { "nodes" };
    let describe = |why: RuledOut| match why {
        RuledOut::NotAlive => "not alive".to_string(),
        RuledOut::Cordoned => "cordoned".to_string(),
        RuledOut::Labels => {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("without the labels {}", l.join(","))
        }
        RuledOut::Vcpus => format!("without {} vCPUs free", need.vcpus),
        RuledOut::Memory => format!("without {} MiB free", need.mem_mib),
    };
    if let [(only, _)] = ruled_out.iter().collect::<Vec<_>>()[..] {
        let head = match only {
            RuledOut::Vcpus => format!("no node has {} vCPUs free", need.vcpus),
            RuledOut::Memory => format!("no node has {} MiB free", need.mem_mib),
            RuledOut::NotAlive => "no node is alive".to_string(),
            RuledOut::Cordoned => "every node is cordoned".to_string(),
            RuledOut::Labels => format!("no node has {}", describe(RuledOut::Labels).trim_start_matches("without ")),
        };
        return format!("{head}: {checked} {} checked", plural(checked));
    }
    let parts: Vec<String> = ruled_out.iter().map(|(why, n)| format!("{n} {}", describe(*why))).collect();
    format!("no node fits: {checked} {} checked: {}", plural(checked), parts.join(", "))
}

#[cfg(test)]
mod tests;
