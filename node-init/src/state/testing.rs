//! Helpers for tests over the state machine: a state that applies commands in order with a
//! clock and a term the test controls.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use super::command::{Command, LogEntry, BINARY_FORMAT};
use super::objects::{DeploymentSpec, Instance, InstanceState, Resources, Template, TenantSpec};
use super::{ApplyOutcome, NodeRecord, State};

pub fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

pub fn template(vcpus: u32, mem_mib: u64) -> Template {
    let mut t: Template = serde_json::from_str(&format!(r#"{{"kernel": "{}"}}"#, digest('a'))).unwrap();
    t.vcpus = vcpus;
    t.mem_mib = mem_mib;
    t
}

pub fn spec(replicas: u32, vcpus: u32, mem_mib: u64) -> DeploymentSpec {
    DeploymentSpec {
        replicas,
        labels: BTreeMap::new(),
        template: template(vcpus, mem_mib),
        placement: Default::default(),
        egress: true,
        ports: Vec::new(),
    }
}

/// A state driven by a test.
#[derive(Debug)]
pub struct Sim {
    pub state: State,
    pub now: u64,
    pub term: u64,
}

impl Sim {
    /// A cluster with `nodes` nodes (ids 1..=n) of the given capacity, tenant "t" and image 'a'.
    pub fn new(nodes: u64, vcpus: u64, mem_mib: u64) -> Sim {
        let mut sim = Sim { state: State::new("test"), now: 1_000, term: 1 };
        sim.ok(Command::PutTenant { name: "t".into(), spec: TenantSpec::default(), prev_revision: None });
        for id in 1..=nodes {
            sim.add_node(id, vcpus, mem_mib, &[]);
        }
        sim
    }

    pub fn add_node(&mut self, id: u64, vcpus: u64, mem_mib: u64, labels: &[(&str, &str)]) {
        let rec = NodeRecord {
            id,
            raft_addr: format!("10.0.0.{id}:7401"),
            api_addr: format!("10.0.0.{id}:7400"),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            capacity: Resources { vcpus, mem_mib },
        };
        self.state.admit_node(&rec, self.now);
        // The first node holds the image every test template boots.
        if self.state.images.is_empty() {
            self.ok(Command::ImageStored { digest: digest('a'), size: 10, node: id, tenant: None });
        }
    }

    pub fn apply(&mut self, command: Command) -> ApplyOutcome {
        self.now += 10;
        let entry = LogEntry { format: BINARY_FORMAT, origin: 1, boot: 1, seq: 1, at_ms: self.now, command };
        self.state.apply(&entry, self.term).0
    }

    pub fn ok(&mut self, command: Command) -> u64 {
        match self.apply(command.clone()) {
            ApplyOutcome::Applied { revision } => revision,
            other => panic!("{command:?} was not applied: {other:?}"),
        }
    }

    pub fn deploy(&mut self, name: &str, spec: DeploymentSpec) -> ApplyOutcome {
        self.apply(Command::PutDeployment { tenant: "t".into(), name: name.into(), spec, prev_revision: None })
    }

    pub fn instances(&self, deployment: &str) -> Vec<Instance> {
        self.state.instances.values().filter(|i| i.deployment == deployment).cloned().collect()
    }

    /// Runs the scheduler with every node alive and applies its decision.
    pub fn schedule(&mut self) {
        let alive = self.state.nodes.keys().copied().collect();
        self.schedule_with(&alive);
    }

    pub fn schedule_with(&mut self, alive: &std::collections::BTreeSet<u64>) {
        if let Some(s) = crate::scheduler::schedule(&self.state, alive, self.term) {
            self.ok(Command::Schedule(s));
        }
    }

    /// Every assigned instance of `deployment` reports running on its node.
    pub fn run_all(&mut self, deployment: &str) {
        for i in self.instances(deployment) {
            if let (Some(node), true) = (i.node, i.state != InstanceState::Lost) {
                self.report(&i, node, InstanceState::Running, 0, None);
            }
        }
    }

    pub fn report(
        &mut self,
        i: &Instance,
        node: u64,
        state: InstanceState,
        restarts: u32,
        code: Option<i32>,
    ) -> ApplyOutcome {
        self.apply(Command::InstanceReport(super::command::InstanceReport {
            node,
            tenant: i.tenant.clone(),
            id: i.id.clone(),
            state,
            restarts,
            last_exit_code: code,
            reason: String::new(),
            started_at: None,
            finished_at: None,
        }))
    }

    /// Nodes stop every instance they were told to stop.
    pub fn stop_retired(&mut self) {
        let retired: Vec<Instance> =
            self.state.instances.values().filter(|i| i.desired == super::objects::Desired::Stopped).cloned().collect();
        for i in retired {
            if let Some(node) = i.node {
                self.ok(Command::InstanceStopped { node, tenant: i.tenant.clone(), id: i.id.clone() });
            }
        }
    }

    /// Schedules, runs what was placed and stops what was retired, until nothing changes.
    pub fn settle(&mut self) {
        for _ in 0..200 {
            let before = self.state.revision;
            self.schedule();
            self.run_all_deployments();
            self.stop_retired();
            if self.state.revision == before {
                return;
            }
        }
        panic!("the state does not settle");
    }

    /// Every assigned, active instance reports running.
    pub fn run_all_deployments(&mut self) {
        let placed: Vec<Instance> = self
            .state
            .instances
            .values()
            .filter(|i| i.node.is_some() && i.is_active() && i.state != InstanceState::Running)
            .cloned()
            .collect();
        for i in placed {
            let node = i.node.unwrap();
            self.report(&i, node, InstanceState::Running, 0, None);
        }
    }

    /// Instances of `deployment` per value of node label `key` (active, placed ones).
    pub fn per_domain(&self, deployment: &str, key: &str) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for i in self.instances(deployment) {
            if let Some(n) = i.holds_node() {
                let labels = self.state.nodes[&n].effective_labels();
                let d = if key == "node" { n.to_string() } else { labels.get(key).cloned().unwrap_or_default() };
                *out.entry(d).or_default() += 1;
            }
        }
        out
    }

    pub fn set_node(&mut self, node: u64, spec: super::objects::NodeSpec) {
        self.ok(Command::SetNodeSpec { node, spec });
    }

    /// Instances of `deployment` per node (active ones).
    pub fn spread(&self, deployment: &str) -> BTreeMap<u64, usize> {
        let mut out = BTreeMap::new();
        for i in self.instances(deployment) {
            if let Some(n) = i.holds_node() {
                *out.entry(n).or_default() += 1;
            }
        }
        out
    }
}
