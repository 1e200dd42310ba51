//! What a deployment change would do, without doing it (`nomad job plan` for Shoal): the change
//! is applied to a copy of the state, and scheduling rounds run on the copy until nothing moves,
//! the copy's nodes taking every instance it is given (running at once, stopping at once), so a
//! rolling update runs to its end. Pure, like the rest of the scheduler.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{schedule_with, Options};
use crate::state::command::{Command, InstanceReport, LogEntry, BINARY_FORMAT};
use crate::state::objects::{DeploymentSpec, Desired, InstanceState, Millis};
use crate::state::{ApplyOutcome, RejectKind, State};

/// Rounds a plan runs at most.
const MAX_ROUNDS: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeCount {
    #[serde(with = "crate::state::objects::hex_id")]
    pub node: u64,
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingCount {
    pub count: usize,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedPreemption {
    pub tenant: String,
    pub instance: String,
    #[serde(with = "crate::state::objects::hex_id")]
    pub node: u64,
    /// The instance it makes room for.
    pub for_instance: String,
}

/// What the change would lead to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Where the deployment's instances would run, per node.
    pub placements: Vec<NodeCount>,
    /// Instances that would wait, grouped by why.
    pub pending: Vec<PendingCount>,
    /// Instances of other deployments that would be stopped to make room.
    pub preemptions: Vec<PlannedPreemption>,
    /// Instances of the deployment now, and running ones that would be replaced or stopped.
    pub current: usize,
    pub stopped: usize,
    /// The state revision the plan was made at.
    pub revision: u64,
}

fn entry(command: Command, at: Millis) -> LogEntry {
    LogEntry { format: BINARY_FORMAT, origin: 0, boot: 0, seq: 0, at_ms: at, command }
}

/// Plans `spec` for deployment `tenant/name` on `state`, with the nodes `alive`.
pub fn plan(
    state: &State,
    alive: &BTreeSet<u64>,
    tenant: &str,
    name: &str,
    spec: &DeploymentSpec,
    options: &Options,
    now: Millis,
) -> Result<Plan, (RejectKind, String)> {
    let key = (tenant.to_string(), name.to_string());
    let before: BTreeSet<String> = state
        .index
        .deployment_instances
        .get(&key)
        .into_iter()
        .flatten()
        .filter(|id| {
            state.instances.get(&(tenant.to_string(), (*id).clone())).is_some_and(|i| i.desired == Desired::Running)
        })
        .cloned()
        .collect();
    let mut sim = state.clone();
    let term = sim.max_term;
    let put =
        Command::PutDeployment { tenant: tenant.into(), name: name.into(), spec: spec.clone(), prev_revision: None };
    match sim.apply(&entry(put, now), term).0 {
        ApplyOutcome::Applied { .. } => {}
        ApplyOutcome::Rejected { kind, reason } => return Err((kind, reason)),
        ApplyOutcome::Conflict { .. } => return Err((RejectKind::Conflict, "revision condition failed".into())),
        ApplyOutcome::NotFound => return Err((RejectKind::NotFound, "not found".into())),
    }
    let mut preemptions = Vec::new();
    for _ in 0..MAX_ROUNDS {
        let mut moved = false;
        if let Some(s) = schedule_with(&sim, alive, term, options) {
            moved |= !s.assignments.is_empty() || !s.preemptions.is_empty();
            for p in &s.preemptions {
                preemptions.push(PlannedPreemption {
                    tenant: p.tenant.clone(),
                    instance: p.id.clone(),
                    node: p.node,
                    for_instance: p.for_id.clone(),
                });
            }
            sim.apply(&entry(Command::Schedule(s), now), term);
        }
        // The copy's nodes do at once what they are told: start what they were given, stop
        // what should stop.
        let todo: Vec<(String, String, u64, bool)> = sim
            .instances
            .values()
            .filter_map(|i| i.node.map(|n| (i, n)))
            .filter(|(i, _)| (i.desired == Desired::Stopped) || (i.state != InstanceState::Running && i.is_active()))
            .map(|(i, n)| (i.tenant.clone(), i.id.clone(), n, i.desired == Desired::Stopped))
            .collect();
        for (t, id, node, stop) in todo {
            moved = true;
            let cmd = if stop {
                Command::InstanceStopped { node, tenant: t, id }
            } else {
                Command::InstanceReport(InstanceReport {
                    node,
                    tenant: t,
                    id,
                    state: InstanceState::Running,
                    restarts: 0,
                    last_exit_code: None,
                    reason: String::new(),
                    started_at: Some(now),
                    finished_at: None,
                })
            };
            sim.apply(&entry(cmd, now), term);
        }
        if !moved {
            break;
        }
    }
    let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
    let mut pending: BTreeMap<String, usize> = BTreeMap::new();
    for id in sim.index.deployment_instances.get(&key).into_iter().flatten() {
        let Some(i) = sim.instances.get(&(tenant.to_string(), id.clone())) else { continue };
        if i.desired != Desired::Running || !i.is_active() {
            continue;
        }
        match i.node {
            Some(n) => *per_node.entry(n).or_default() += 1,
            None => *pending.entry(i.reason.clone()).or_default() += 1,
        }
    }
    let stopped = before.iter().filter(|id| !sim.instances.contains_key(&(tenant.to_string(), (*id).clone()))).count();
    Ok(Plan {
        placements: per_node.into_iter().map(|(node, count)| NodeCount { node, count }).collect(),
        pending: pending.into_iter().map(|(reason, count)| PendingCount { count, reason }).collect(),
        preemptions,
        current: before.len(),
        stopped,
        revision: state.revision,
    })
}
