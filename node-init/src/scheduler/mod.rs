//! Placement: which node runs each pending instance. A pure function of the replicated state and
//! gossip's view of which nodes are alive: no I/O, no clock, deterministic (the same input gives
//! the same decision), tested without sockets. The leader runs it and proposes its [`Schedule`];
//! the state machine checks every assignment again when it applies it.
//!
//! One round takes the pending instances in order (highest priority first, then oldest) and, for
//! each, runs a chain of filters, then scores a sample of the nodes that pass (Nomad's shape):
//!
//! 1. static filters, per node and cached per rule set: alive, not cordoned, `node_labels`,
//!    `constraints`, taints the instance does not tolerate;
//! 2. dynamic filters, against counts kept up to date within the round: free vCPUs and memory
//!    (from what is assigned, not from gossip), hard `spread` (Kubernetes' max_skew over the
//!    eligible domains), `max_per_domain`, hard `affinity` and `anti_affinity`;
//! 3. scoring of up to `sample` passing nodes (from an offset derived from the instance, so
//!    different instances look at different nodes): under the spread strategy fewer replicas of
//!    the same deployment on one node first, then the emptiest node; under binpack the fullest
//!    that fits; then soft spread and weighted affinities; ties go to the lower node id.
//!
//! Required anti-affinity holds both ways: an instance does not go where instances of a
//! deployment whose hard anti-affinity matches it run.
//!
//! An instance no node can take stays pending with the reason, counted per rule ("no node fits:
//! 5 nodes checked: 2 without 4096 MiB free, 2 zone spread (max_skew 1), 1 tainted
//! gpu=true:no_schedule"), unless it may preempt: then the node where the fewest, lowest-priority
//! instances (within their disruption budgets) make room is nominated and those instances stop.

pub mod check;
mod engine;
pub mod plan;

use std::collections::BTreeSet;

use crate::state::command::Schedule;
use crate::state::objects::Strategy;
use crate::state::State;

pub use engine::{explain, Explain};

/// Setting: the default strategy (`spread` or `binpack`).
pub const STRATEGY_SETTING: &str = "scheduler_strategy";
/// Setting: how many passing nodes are scored per decision (`all` scores every one).
pub const SAMPLE_SETTING: &str = "scheduler_sample";

/// How a round runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Most assignments one decision carries (the rest wait for the next round).
    pub max_per_round: usize,
    /// Passing nodes scored per instance; `None`: max(4, log2 of the feasible nodes), at least
    /// 32 when soft rules score; `Some(usize::MAX)`: every node.
    pub sample: Option<usize>,
    /// The strategy of deployments that name none.
    pub strategy: Strategy,
}

impl Default for Options {
    fn default() -> Self {
        Options { max_per_round: 1000, sample: None, strategy: Strategy::Spread }
    }
}

impl Options {
    /// The options the cluster settings ask for.
    pub fn from_settings(state: &State) -> Options {
        let mut o = Options::default();
        if state.setting(STRATEGY_SETTING).is_some_and(|s| s.trim() == "binpack") {
            o.strategy = Strategy::Binpack;
        }
        match state.setting(SAMPLE_SETTING).map(str::trim) {
            Some("all") => o.sample = Some(usize::MAX),
            Some(n) => o.sample = n.parse::<usize>().ok().filter(|n| *n > 0),
            None => {}
        }
        o
    }
}

/// One round of placement with the default options.
pub fn schedule(state: &State, alive: &BTreeSet<u64>, term: u64) -> Option<Schedule> {
    schedule_with(state, alive, term, &Options::default())
}

/// One round, with how long each decision took (for the benchmark).
pub fn schedule_timed(
    state: &State,
    alive: &BTreeSet<u64>,
    term: u64,
    options: &Options,
) -> (Schedule, Vec<std::time::Duration>) {
    let mut round = engine::Round::new(state, alive, options);
    round.timings = Some(Vec::new());
    let schedule = round.run(term);
    (schedule, round.timings.take().unwrap_or_default())
}

/// One round of placement over the pending instances. `None` when there is nothing to assign,
/// preempt, or explain anew.
pub fn schedule_with(state: &State, alive: &BTreeSet<u64>, term: u64, options: &Options) -> Option<Schedule> {
    let mut round = engine::Round::new(state, alive, options);
    let schedule = round.run(term);
    (!schedule.assignments.is_empty() || !schedule.pending.is_empty() || !schedule.preemptions.is_empty())
        .then_some(schedule)
}

#[cfg(test)]
mod tests;
