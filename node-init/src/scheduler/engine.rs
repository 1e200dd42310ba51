//! One scheduling round (see the module above for the rules). Everything that depends only on
//! the state is computed once per round and kept up to date as the round places instances:
//! nodes with their free resources, static feasibility per rule set, domain ids per label key,
//! instance counts per domain for each selector in use, and for each hard spread rule the
//! minimum over its eligible domains (counts only grow within a round, so the minimum moves
//! forward cheaply). A decision then costs a walk over a sample of the feasible nodes.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use super::Options;
use crate::state::command::{Assignment, PendingReason, Preemption, Schedule};
use crate::state::objects::{
    tolerated, Deployment, Desired, Instance, Node, Placement, Resources, Strategy, NODE_DOMAIN,
};
use crate::state::{InstanceKey, State};

type NodeIdx = usize;
type DomainId = u32;
type KeyId = usize;
type SelId = usize;

/// Why a node was ruled out for an instance: the first rule it fails.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Explain {
    NotAlive,
    Cordoned,
    Labels(String),
    Constraint(String),
    Tainted(String),
    Vcpus(u64),
    Memory(u64),
    Addresses,
    MissingKey(String),
    Spread { key: String, max_skew: u32 },
    MaxPerDomain { key: String, max: u32 },
    AntiAffinity { selector: String, key: String },
    Affinity { selector: String, key: String },
}

impl Explain {
    fn text(&self) -> String {
        match self {
            Explain::NotAlive => "not alive".into(),
            Explain::Cordoned => "cordoned".into(),
            Explain::Labels(l) => format!("without the labels {l}"),
            Explain::Constraint(c) => format!("failing the constraint {c}"),
            Explain::Tainted(t) => format!("tainted {t}"),
            Explain::Vcpus(n) => format!("without {n} vCPUs free"),
            Explain::Memory(m) => format!("without {m} MiB free"),
            Explain::Addresses => "without a free address in its subnet".into(),
            Explain::MissingKey(k) => format!("without the label {k}"),
            Explain::Spread { key, max_skew } => format!("{key} spread (max_skew {max_skew})"),
            Explain::MaxPerDomain { key, max } => format!("at {key} max_per_domain {max}"),
            Explain::AntiAffinity { selector, key } => format!("anti-affinity to {selector} on {key}"),
            Explain::Affinity { selector, key } => format!("affinity to {selector} on {key}"),
        }
    }
}

/// The reason an instance stays pending, from the rules that ruled the nodes out.
pub fn explain(checked: usize, ruled_out: &BTreeMap<Explain, usize>) -> String {
    if checked == 0 {
        return "no node has joined the cluster".into();
    }
    let nodes = if checked == 1 { "node" } else { "nodes" };
    if let [(only, _)] = ruled_out.iter().collect::<Vec<_>>()[..] {
        let head = match only {
            Explain::Vcpus(n) => Some(format!("no node has {n} vCPUs free")),
            Explain::Memory(m) => Some(format!("no node has {m} MiB free")),
            Explain::Addresses => Some("no node has a free address in its subnet".to_string()),
            Explain::NotAlive => Some("no node is alive".to_string()),
            Explain::Cordoned => Some("every node is cordoned".to_string()),
            Explain::Labels(l) => Some(format!("no node has the labels {l}")),
            _ => None,
        };
        if let Some(head) = head {
            return format!("{head}: {checked} {nodes} checked");
        }
    }
    let parts: Vec<String> = ruled_out.iter().map(|(why, n)| format!("{n} {}", why.text())).collect();
    format!("no node fits: {checked} {nodes} checked: {}", parts.join(", "))
}

fn labels_text(l: &BTreeMap<String, String>) -> String {
    l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

struct NodeView<'a> {
    node: &'a Node,
    labels: Cow<'a, BTreeMap<String, String>>,
    alive: bool,
    allocated: Resources,
    /// Instances it still has addresses for (None: instances get no networks).
    addresses: Option<u64>,
}

/// The nodes that pass an instance's static rules, and why the others do not.
struct Feasible {
    nodes: Vec<NodeIdx>,
    ruled_out: BTreeMap<Explain, usize>,
}

/// The domain ids of every node for one label key (`node`: each node its own).
struct KeyDomains {
    of_node: Vec<Option<DomainId>>,
    count: usize,
}

/// Whose instances a rule counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Selector {
    /// The deployment's own instances.
    Own(InstanceKey),
    /// Deployments with these labels, of these tenants (None: all).
    Labels { tenants: Option<Vec<String>>, labels: Vec<(String, String)> },
}

struct SelectorCounts {
    deps: BTreeSet<InstanceKey>,
    /// Instances per domain, by key (None: not asked for yet).
    per_key: Vec<Option<Vec<u32>>>,
    total: u64,
}

/// The minimum count over a spread rule's eligible domains; counts only grow within a round.
struct MinTracker {
    eligible: Vec<bool>,
    min: u32,
    at_min: usize,
}

/// One deployment's hard anti-affinity rule, indexed for the reverse check.
#[derive(Clone)]
struct AntiEntry {
    owner: InstanceKey,
    tenants: Option<Vec<String>>,
    selector: BTreeMap<String, String>,
    key: String,
}

/// A deployment's rules, resolved against this round's caches.
struct DepRules {
    feasible: Rc<Feasible>,
    own: SelId,
    spread: Vec<(KeyId, SelId, usize, u32, bool)>,
    caps: Vec<(KeyId, u32)>,
    affinity: Vec<(KeyId, SelId, bool, u32, String)>,
    anti: Vec<(KeyId, SelId, bool, u32, String)>,
    /// Hard anti-affinity of other deployments that this one's labels match: their instances'
    /// domains are closed to it (required anti-affinity holds both ways).
    blocked_by: Vec<(KeyId, SelId, String)>,
    strategy: Strategy,
    soft: bool,
}

/// Why a node failed a dynamic rule, without allocating (resolved to words only when needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Why {
    Vcpus(u64),
    Memory(u64),
    Addresses,
    MissingKey(KeyId),
    Spread(KeyId, u32),
    Cap(KeyId, u32),
    Anti(usize),
    Blocked(usize),
    Affinity(usize),
}

enum Outcome {
    Placed(NodeIdx),
    Preempt(NodeIdx, Vec<InstanceKey>),
    Pending(String),
}

pub(super) struct Round<'a> {
    state: &'a State,
    options: Options,
    nodes: Vec<NodeView<'a>>,
    index: HashMap<u64, NodeIdx>,
    keys: Vec<KeyDomains>,
    key_ids: HashMap<String, KeyId>,
    key_names: Vec<String>,
    feasible: HashMap<String, Rc<Feasible>>,
    deps: HashMap<InstanceKey, Rc<DepRules>>,
    selectors: Vec<SelectorCounts>,
    selector_ids: HashMap<Selector, SelId>,
    dep_selectors: HashMap<InstanceKey, Vec<SelId>>,
    trackers: Vec<MinTracker>,
    tracker_ids: HashMap<(SelId, KeyId, usize), usize>,
    sel_trackers: HashMap<(SelId, KeyId), Vec<usize>>,
    /// Placements of this round per deployment and node.
    placed: HashMap<InstanceKey, HashMap<NodeIdx, u32>>,
    /// Deployments by label, for selectors.
    by_label: Option<HashMap<(String, String), Vec<InstanceKey>>>,
    /// Hard anti-affinity rules of every deployment, by one label of their selector.
    anti_index: Option<HashMap<(String, String), Vec<AntiEntry>>>,
    /// Instances already chosen to be preempted in this round, and how many per deployment.
    preempted: BTreeSet<InstanceKey>,
    preempted_per_dep: HashMap<InstanceKey, usize>,
    /// How long each decision took, when measured.
    pub timings: Option<Vec<std::time::Duration>>,
}

/// FNV-1a: a stable hash (the same on every platform and release), enough to spread offsets.
fn hash64(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl<'a> Round<'a> {
    pub(super) fn new(state: &'a State, alive: &BTreeSet<u64>, options: &Options) -> Round<'a> {
        let nodes: Vec<NodeView<'a>> = state
            .nodes
            .values()
            .map(|n| NodeView {
                node: n,
                labels: if n.api_labels.is_empty() {
                    Cow::Borrowed(&n.labels)
                } else {
                    Cow::Owned(n.effective_labels())
                },
                alive: alive.contains(&n.id),
                allocated: state.allocated(n.id),
                addresses: state.free_addresses(n.id),
            })
            .collect();
        let index = nodes.iter().enumerate().map(|(i, n)| (n.node.id, i)).collect();
        Round {
            state,
            options: *options,
            nodes,
            index,
            keys: Vec::new(),
            key_ids: HashMap::new(),
            key_names: Vec::new(),
            feasible: HashMap::new(),
            deps: HashMap::new(),
            selectors: Vec::new(),
            selector_ids: HashMap::new(),
            dep_selectors: HashMap::new(),
            trackers: Vec::new(),
            tracker_ids: HashMap::new(),
            sel_trackers: HashMap::new(),
            placed: HashMap::new(),
            by_label: None,
            anti_index: None,
            preempted: BTreeSet::new(),
            preempted_per_dep: HashMap::new(),
            timings: None,
        }
    }

    pub(super) fn run(&mut self, term: u64) -> Schedule {
        let state = self.state;
        let mut out = Schedule {
            term,
            revision: state.revision,
            assignments: Vec::new(),
            pending: Vec::new(),
            preemptions: Vec::new(),
        };
        // Pending instances of one deployment come one after another: its rules are kept at hand.
        let mut last: Option<(InstanceKey, Rc<DepRules>)> = None;
        for inst in state.unassigned().take(self.options.max_per_round) {
            let started = self.timings.is_some().then(std::time::Instant::now);
            let same = last.as_ref().is_some_and(|(k, _)| k.0 == inst.tenant && k.1 == inst.deployment);
            if !same {
                let key = (inst.tenant.clone(), inst.deployment.clone());
                let Some(dep) = state.deployments.get(&key) else { continue };
                let rules = self.rules(dep);
                last = Some((key, rules));
            }
            let Some((key, rules)) = last.clone() else { continue };
            match self.place(inst, &key, &rules) {
                Outcome::Placed(n) => {
                    out.assignments.push(Assignment {
                        tenant: inst.tenant.clone(),
                        id: inst.id.clone(),
                        node: self.nodes[n].node.id,
                    });
                    self.commit(&key, n, inst.template.resources());
                }
                Outcome::Preempt(n, victims) => {
                    let node = self.nodes[n].node.id;
                    for v in victims {
                        if let Some(vi) = state.instances.get(&v) {
                            *self.preempted_per_dep.entry((vi.tenant.clone(), vi.deployment.clone())).or_default() += 1;
                        }
                        out.preemptions.push(Preemption {
                            tenant: v.0.clone(),
                            id: v.1.clone(),
                            node,
                            for_tenant: inst.tenant.clone(),
                            for_id: inst.id.clone(),
                        });
                        self.preempted.insert(v);
                    }
                }
                Outcome::Pending(reason) => {
                    if reason != inst.reason && inst.nominated_node.is_none() {
                        out.pending.push(PendingReason { tenant: inst.tenant.clone(), id: inst.id.clone(), reason });
                    }
                }
            }
            if let (Some(t), Some(s)) = (self.timings.as_mut(), started) {
                t.push(s.elapsed());
            }
        }
        out
    }

    // ---- caches ---------------------------------------------------------------------------------

    fn key(&mut self, name: &str) -> KeyId {
        if let Some(k) = self.key_ids.get(name) {
            return *k;
        }
        let mut values: HashMap<&str, DomainId> = HashMap::new();
        let of_node: Vec<Option<DomainId>> = if name == NODE_DOMAIN {
            (0..self.nodes.len()).map(|i| Some(i as DomainId)).collect()
        } else {
            self.nodes
                .iter()
                .map(|n| {
                    n.labels.get(name).map(|v| {
                        let next = values.len() as DomainId;
                        *values.entry(v.as_str()).or_insert(next)
                    })
                })
                .collect()
        };
        let count = if name == NODE_DOMAIN { self.nodes.len() } else { values.len() };
        let id = self.keys.len();
        self.keys.push(KeyDomains { of_node, count });
        self.key_ids.insert(name.to_string(), id);
        self.key_names.push(name.to_string());
        id
    }

    fn domain(&self, key: KeyId, node: NodeIdx) -> Option<DomainId> {
        self.keys[key].of_node[node]
    }

    fn static_feasible(&mut self, p: &Placement) -> Rc<Feasible> {
        let sig = serde_json::to_string(&(&p.node_labels, &p.constraints, &p.tolerations)).unwrap_or_default();
        if let Some(f) = self.feasible.get(&sig) {
            return f.clone();
        }
        let mut nodes = Vec::new();
        let mut ruled_out: BTreeMap<Explain, usize> = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let why = if !n.alive {
                Some(Explain::NotAlive)
            } else if n.node.cordoned {
                Some(Explain::Cordoned)
            } else if !p.node_labels.iter().all(|(k, v)| n.labels.get(k) == Some(v)) {
                Some(Explain::Labels(labels_text(&p.node_labels)))
            } else if let Some(c) = p.constraints.iter().find(|c| !c.holds(&n.labels)) {
                Some(Explain::Constraint(c.describe()))
            } else {
                tolerated(&n.node.taints, &p.tolerations).err().map(|t| Explain::Tainted(t.describe()))
            };
            match why {
                Some(w) => *ruled_out.entry(w).or_default() += 1,
                None => nodes.push(i),
            }
        }
        let f = Rc::new(Feasible { nodes, ruled_out });
        self.feasible.insert(sig, f.clone());
        f
    }

    fn deployments_with(&mut self, labels: &[(String, String)]) -> Vec<InstanceKey> {
        let state = self.state;
        let index = self.by_label.get_or_insert_with(|| {
            let mut m: HashMap<(String, String), Vec<InstanceKey>> = HashMap::new();
            for (k, d) in &state.deployments {
                for (lk, lv) in &d.spec.labels {
                    m.entry((lk.clone(), lv.clone())).or_default().push(k.clone());
                }
            }
            m
        });
        let Some(smallest) = labels.iter().filter_map(|l| index.get(l)).min_by_key(|v| v.len()) else {
            return Vec::new();
        };
        if labels.iter().any(|l| !index.contains_key(l)) {
            return Vec::new();
        }
        smallest
            .iter()
            .filter(|k| {
                state
                    .deployments
                    .get(*k)
                    .is_some_and(|d| labels.iter().all(|(lk, lv)| d.spec.labels.get(lk) == Some(lv)))
            })
            .cloned()
            .collect()
    }

    /// Other deployments' hard anti-affinity rules whose selector matches `dep`.
    fn anti_against(&mut self, dep: &Deployment) -> Vec<AntiEntry> {
        let state = self.state;
        let index = self.anti_index.get_or_insert_with(|| {
            let mut m: HashMap<(String, String), Vec<AntiEntry>> = HashMap::new();
            for (k, d) in &state.deployments {
                for a in d.spec.placement.anti_affinity.iter().filter(|a| a.hard) {
                    let tenants = match &a.tenants {
                        None => Some(vec![k.0.clone()]),
                        Some(t) if t.iter().any(|x| x == "*") => None,
                        Some(t) => Some(t.clone()),
                    };
                    let entry =
                        AntiEntry { owner: k.clone(), tenants, selector: a.selector.clone(), key: a.key.clone() };
                    if let Some((lk, lv)) = a.selector.iter().next() {
                        m.entry((lk.clone(), lv.clone())).or_default().push(entry);
                    }
                }
            }
            m
        });
        let me = (dep.tenant.clone(), dep.name.clone());
        let mut out = Vec::new();
        for (lk, lv) in &dep.spec.labels {
            for e in index.get(&(lk.clone(), lv.clone())).into_iter().flatten() {
                let matches = e.selector.iter().all(|(k, v)| dep.spec.labels.get(k) == Some(v))
                    && e.tenants.as_ref().is_none_or(|t| t.contains(&dep.tenant));
                // Its own rule about itself is the forward check already.
                if matches && e.owner != me {
                    out.push(e.clone());
                }
            }
        }
        out
    }

    fn selector(&mut self, sel: Selector) -> SelId {
        if let Some(id) = self.selector_ids.get(&sel) {
            return *id;
        }
        let deps: BTreeSet<InstanceKey> = match &sel {
            Selector::Own(k) => [k.clone()].into_iter().collect(),
            Selector::Labels { tenants, labels } => self
                .deployments_with(labels)
                .into_iter()
                .filter(|(t, _)| tenants.as_ref().is_none_or(|ts| ts.contains(t)))
                .collect(),
        };
        let id = self.selectors.len();
        for d in &deps {
            self.dep_selectors.entry(d.clone()).or_default().push(id);
        }
        let total = deps.iter().map(|d| self.count_of(d)).sum();
        self.selectors.push(SelectorCounts { deps, per_key: Vec::new(), total });
        self.selector_ids.insert(sel, id);
        id
    }

    /// A deployment's instances on each node: those the state holds and this round's.
    fn per_node(&self, dep: &InstanceKey) -> Vec<(NodeIdx, u32)> {
        let mut out: Vec<(NodeIdx, u32)> = self
            .state
            .index
            .deployment_nodes
            .get(dep)
            .into_iter()
            .flatten()
            .filter_map(|(id, n)| self.index.get(id).map(|i| (*i, *n)))
            .collect();
        if let Some(extra) = self.placed.get(dep) {
            out.extend(extra.iter().map(|(i, n)| (*i, *n)));
        }
        out
    }

    fn count_of(&self, dep: &InstanceKey) -> u64 {
        self.per_node(dep).iter().map(|(_, n)| u64::from(*n)).sum()
    }

    /// Counts per domain of `key` for the selector (computed on first use, then kept).
    fn counts(&mut self, sel: SelId, key: KeyId) -> &Vec<u32> {
        let missing = self.selectors[sel].per_key.get(key).is_none_or(|c| c.is_none());
        if missing {
            let mut counts = vec![0u32; self.keys[key].count];
            let deps: Vec<InstanceKey> = self.selectors[sel].deps.iter().cloned().collect();
            for d in &deps {
                for (node, n) in self.per_node(d) {
                    if let Some(dom) = self.domain(key, node) {
                        counts[dom as usize] += n;
                    }
                }
            }
            let per_key = &mut self.selectors[sel].per_key;
            if per_key.len() <= key {
                per_key.resize(key + 1, None);
            }
            per_key[key] = Some(counts);
        }
        self.selectors[sel].per_key[key].as_ref().expect("just filled")
    }

    fn count_at(&mut self, sel: SelId, key: KeyId, node: NodeIdx) -> Option<u32> {
        let d = self.domain(key, node)?;
        if let Some(Some(c)) = self.selectors[sel].per_key.get(key) {
            return Some(c[d as usize]);
        }
        Some(self.counts(sel, key)[d as usize])
    }

    /// The minimum over the eligible domains (those of the feasible nodes) of a spread rule.
    fn tracker(&mut self, sel: SelId, key: KeyId, feasible: &Feasible, sig: usize) -> usize {
        if let Some(t) = self.tracker_ids.get(&(sel, key, sig)) {
            return *t;
        }
        let mut eligible = vec![false; self.keys[key].count];
        for n in &feasible.nodes {
            if let Some(d) = self.domain(key, *n) {
                eligible[d as usize] = true;
            }
        }
        let counts = self.counts(sel, key).clone();
        let (min, at_min) = min_over(&counts, &eligible);
        let id = self.trackers.len();
        self.trackers.push(MinTracker { eligible, min, at_min });
        self.tracker_ids.insert((sel, key, sig), id);
        self.sel_trackers.entry((sel, key)).or_default().push(id);
        id
    }

    fn rules(&mut self, dep: &Deployment) -> Rc<DepRules> {
        let key = (dep.tenant.clone(), dep.name.clone());
        if let Some(r) = self.deps.get(&key) {
            return r.clone();
        }
        let p = &dep.spec.placement;
        let feasible = self.static_feasible(p);
        let sig = Rc::as_ptr(&feasible) as usize;
        let own = self.selector(Selector::Own(key.clone()));
        let same_tenant = |tenants: &Option<Vec<String>>| -> Option<Vec<String>> {
            match tenants {
                None => Some(vec![dep.tenant.clone()]),
                Some(t) if t.iter().any(|x| x == "*") => None,
                Some(t) => Some(t.clone()),
            }
        };
        let mut spread = Vec::new();
        for r in &p.spread {
            let k = self.key(&r.key);
            let sel = match &r.selector {
                None => own,
                Some(l) => self.selector(Selector::Labels {
                    tenants: Some(vec![dep.tenant.clone()]),
                    labels: l.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
                }),
            };
            let t = self.tracker(sel, k, &feasible, sig);
            spread.push((k, sel, t, r.max_skew, r.hard));
        }
        let caps = p.max_per_domain.iter().map(|c| (self.key(&c.key), c.max)).collect::<Vec<_>>();
        let mut resolve = |rules: &[crate::state::objects::AffinityRule]| {
            rules
                .iter()
                .map(|a| {
                    let k = self.key(&a.key);
                    let labels: Vec<(String, String)> =
                        a.selector.iter().map(|(x, y)| (x.clone(), y.clone())).collect();
                    let sel = self.selector(Selector::Labels { tenants: same_tenant(&a.tenants), labels });
                    (k, sel, a.hard, a.weight, labels_text(&a.selector))
                })
                .collect::<Vec<_>>()
        };
        let affinity = resolve(&p.affinity);
        let anti = resolve(&p.anti_affinity);
        let mut blocked_by = Vec::new();
        for e in self.anti_against(dep) {
            let k = self.key(&e.key);
            let sel = self.selector(Selector::Own(e.owner.clone()));
            blocked_by.push((k, sel, format!("{} (its anti-affinity)", e.owner.1)));
        }
        let soft = p.spread.iter().any(|s| !s.hard) || p.affinity.iter().chain(&p.anti_affinity).any(|a| !a.hard);
        let rules = Rc::new(DepRules {
            feasible,
            own,
            spread,
            caps,
            affinity,
            anti,
            blocked_by,
            strategy: p.strategy.unwrap_or(self.options.strategy),
            soft,
        });
        self.deps.insert(key, rules.clone());
        rules
    }

    // ---- one decision -------------------------------------------------------------------------

    /// The first dynamic rule `node` fails for an instance, if any.
    fn check(&mut self, r: &DepRules, node: NodeIdx, need: Resources, dep: &InstanceKey) -> Option<Why> {
        let n = &self.nodes[node];
        let cap = n.node.capacity;
        if n.allocated.vcpus.saturating_add(need.vcpus) > cap.vcpus {
            return Some(Why::Vcpus(need.vcpus));
        }
        if n.allocated.mem_mib.saturating_add(need.mem_mib) > cap.mem_mib {
            return Some(Why::Memory(need.mem_mib));
        }
        if n.addresses == Some(0) {
            return Some(Why::Addresses);
        }
        for (k, sel, t, max_skew, hard) in &r.spread {
            if !hard {
                continue;
            }
            let Some(c) = self.count_at(*sel, *k, node) else { return Some(Why::MissingKey(*k)) };
            if c + 1 > self.trackers[*t].min + max_skew {
                return Some(Why::Spread(*k, *max_skew));
            }
        }
        for (k, max) in &r.caps {
            let Some(c) = self.count_at(r.own, *k, node) else { return Some(Why::MissingKey(*k)) };
            if c + 1 > *max {
                return Some(Why::Cap(*k, *max));
            }
        }
        for (i, (k, sel, hard, _, _)) in r.anti.iter().enumerate() {
            if *hard && self.count_at(*sel, *k, node).is_some_and(|c| c > 0) {
                return Some(Why::Anti(i));
            }
        }
        for (i, (k, sel, _)) in r.blocked_by.iter().enumerate() {
            if self.count_at(*sel, *k, node).is_some_and(|c| c > 0) {
                return Some(Why::Blocked(i));
            }
        }
        for (i, (k, sel, hard, _, _)) in r.affinity.iter().enumerate() {
            if !*hard {
                continue;
            }
            let present = self.count_at(*sel, *k, node).is_some_and(|c| c > 0);
            // The first instance of a group that attracts itself may go anywhere (Kubernetes' rule).
            let first = self.selectors[*sel].total == 0 && self.selectors[*sel].deps.contains(dep);
            if !present && !first {
                return Some(Why::Affinity(i));
            }
        }
        None
    }

    fn key_name(&self, k: KeyId) -> String {
        self.key_names[k].clone()
    }

    /// A dynamic reason in words.
    fn why_text(&self, r: &DepRules, why: Why) -> Explain {
        match why {
            Why::Vcpus(n) => Explain::Vcpus(n),
            Why::Memory(m) => Explain::Memory(m),
            Why::Addresses => Explain::Addresses,
            Why::MissingKey(k) => Explain::MissingKey(self.key_name(k)),
            Why::Spread(k, max_skew) => Explain::Spread { key: self.key_name(k), max_skew },
            Why::Cap(k, max) => Explain::MaxPerDomain { key: self.key_name(k), max },
            Why::Anti(i) => Explain::AntiAffinity { selector: r.anti[i].4.clone(), key: self.key_name(r.anti[i].0) },
            Why::Blocked(i) => {
                Explain::AntiAffinity { selector: r.blocked_by[i].2.clone(), key: self.key_name(r.blocked_by[i].0) }
            }
            Why::Affinity(i) => {
                Explain::Affinity { selector: r.affinity[i].4.clone(), key: self.key_name(r.affinity[i].0) }
            }
        }
    }

    fn score(&mut self, r: &DepRules, node: NodeIdx, need: Resources, preferred: Option<u64>) -> i64 {
        let n = &self.nodes[node];
        let permille = |used: u64, cap: u64| used.saturating_mul(1000).checked_div(cap).unwrap_or(1000) as i64;
        let load = permille(n.allocated.vcpus + need.vcpus, n.node.capacity.vcpus)
            .max(permille(n.allocated.mem_mib + need.mem_mib, n.node.capacity.mem_mib));
        let mut score = match r.strategy {
            Strategy::Spread => 1000 - load,
            Strategy::Binpack => load,
        };
        if preferred == Some(n.node.id) {
            score += 1_000_000;
        }
        if r.strategy == Strategy::Spread {
            let per_node = self.node_key();
            let own_here = self.count_at(r.own, per_node, node).unwrap_or(0);
            score -= 2000 * i64::from(own_here);
        }
        for (k, sel, t, _, hard) in &r.spread {
            if *hard {
                continue;
            }
            if let Some(c) = self.count_at(*sel, *k, node) {
                let skew = i64::from(c + 1) - i64::from(self.trackers[*t].min);
                score -= 100 * skew;
            }
        }
        for (k, sel, hard, weight, _) in &r.affinity {
            if !*hard && self.count_at(*sel, *k, node).is_some_and(|c| c > 0) {
                score += 10 * i64::from(*weight);
            }
        }
        for (k, sel, hard, weight, _) in &r.anti {
            if !*hard && self.count_at(*sel, *k, node).is_some_and(|c| c > 0) {
                score -= 10 * i64::from(*weight);
            }
        }
        score
    }

    fn node_key(&mut self) -> KeyId {
        self.key(NODE_DOMAIN)
    }

    fn sample_size(&self, r: &DepRules) -> usize {
        match self.options.sample {
            Some(n) => n,
            None => {
                let n = r.feasible.nodes.len().max(1);
                let log = usize::BITS as usize - n.leading_zeros() as usize;
                let base = log.max(4);
                if r.soft {
                    base.max(32)
                } else {
                    base
                }
            }
        }
    }

    fn place(&mut self, inst: &Instance, dep: &InstanceKey, r: &DepRules) -> Outcome {
        let need = inst.template.resources();
        let feasible = r.feasible.clone();
        let total = self.nodes.len();
        if feasible.nodes.is_empty() {
            return Outcome::Pending(explain(total, &feasible.ruled_out));
        }
        let limit = self.sample_size(r);
        let offset = (hash64(&inst.uid) % feasible.nodes.len() as u64) as usize;
        // A nominated node (room is being made there) is looked at first.
        let nominated =
            inst.nominated_node.and_then(|id| self.index.get(&id).copied()).filter(|n| feasible.nodes.contains(n));
        let walk = (0..feasible.nodes.len()).map(|i| feasible.nodes[(offset + i) % feasible.nodes.len()]);
        let order = nominated.into_iter().chain(walk.filter(|n| Some(*n) != nominated));
        let mut best: Option<(i64, std::cmp::Reverse<u64>, NodeIdx)> = None;
        let mut found = 0;
        let mut ruled_out: Vec<(Why, usize)> = Vec::new();
        for node in order {
            match self.check(r, node, need, dep) {
                Some(why) => match ruled_out.iter_mut().find(|(w, _)| *w == why) {
                    Some((_, n)) => *n += 1,
                    None => ruled_out.push((why, 1)),
                },
                None => {
                    let s = (
                        self.score(r, node, need, inst.nominated_node),
                        std::cmp::Reverse(self.nodes[node].node.id),
                        node,
                    );
                    if best.is_none_or(|b| s > b) {
                        best = Some(s);
                    }
                    found += 1;
                    if found >= limit {
                        break;
                    }
                }
            }
        }
        if let Some((_, _, node)) = best {
            return Outcome::Placed(node);
        }
        if nominated.is_some() {
            // Its room is being made: the nominated node's victims are still stopping.
            return Outcome::Pending(String::new());
        }
        if let Some((node, victims)) = self.preemption(inst, r, dep) {
            return Outcome::Preempt(node, victims);
        }
        let mut all = feasible.ruled_out.clone();
        for (why, n) in ruled_out {
            *all.entry(self.why_text(r, why)).or_default() += n;
        }
        Outcome::Pending(explain(total, &all))
    }

    /// The node where the fewest, lowest-priority instances (each within its deployment's
    /// disruption budget) make room for `inst`, if stopping them makes it fit.
    fn preemption(&mut self, inst: &Instance, r: &DepRules, dep: &InstanceKey) -> Option<(NodeIdx, Vec<InstanceKey>)> {
        let state = self.state;
        // Nothing runs at a lower priority: nothing to preempt (the common case, checked first).
        state.index.priorities.range(..inst.priority).next()?;
        let need = inst.template.resources();
        // (worst victim priority, victims, node id): the smallest wins.
        type Choice = ((i32, usize, u64), NodeIdx, Vec<InstanceKey>);
        let mut best: Option<Choice> = None;
        for &node in &r.feasible.nodes.clone() {
            let id = self.nodes[node].node.id;
            let mut candidates: Vec<&Instance> = state
                .instances_on(id)
                .filter(|v| v.is_active() && v.desired == Desired::Running && v.priority < inst.priority)
                .filter(|v| !self.preempted.contains(&(v.tenant.clone(), v.id.clone())))
                .collect();
            if candidates.is_empty() {
                continue;
            }
            candidates.sort_by_key(|v| (v.priority, std::cmp::Reverse(v.template.mem_mib), v.meta.create_revision));
            let mut freed = Resources::default();
            let mut victims = Vec::new();
            let mut per_dep: HashMap<InstanceKey, usize> = HashMap::new();
            let fits = |freed: Resources, this: &Round| {
                let n = &this.nodes[node];
                let mut used = n.allocated;
                used.sub(freed);
                n.node.capacity.fits(used, need)
            };
            for v in candidates {
                if fits(freed, self) {
                    break;
                }
                let vdep = (v.tenant.clone(), v.deployment.clone());
                let already =
                    self.preempted_per_dep.get(&vdep).copied().unwrap_or(0) + per_dep.get(&vdep).copied().unwrap_or(0);
                let allowed = match state.deployments.get(&vdep).and_then(|d| d.spec.placement.disruption_budget) {
                    Some(b) => state.unavailable(&vdep) + already < b.max_unavailable as usize,
                    None => true,
                };
                if !allowed {
                    continue;
                }
                freed.add(v.template.resources());
                *per_dep.entry(vdep).or_default() += 1;
                victims.push((v.tenant.clone(), v.id.clone(), v.priority));
            }
            if !fits(freed, self) {
                continue;
            }
            // The other rules must hold there too (victims' counts aside).
            let mut probe = self.nodes[node].allocated;
            probe.sub(freed);
            let saved = std::mem::replace(&mut self.nodes[node].allocated, probe);
            let ok = self.check(r, node, need, dep).is_none();
            self.nodes[node].allocated = saved;
            if !ok {
                continue;
            }
            let worst = victims.iter().map(|v| v.2).max().unwrap_or(i32::MIN);
            let rank = (worst, victims.len(), id);
            if best.as_ref().is_none_or(|(b, _, _)| rank < *b) {
                best = Some((rank, node, victims.into_iter().map(|(t, i, _)| (t, i)).collect()));
            }
        }
        best.map(|(_, n, v)| (n, v))
    }

    /// Records a placement in every count the round keeps.
    fn commit(&mut self, dep: &InstanceKey, node: NodeIdx, need: Resources) {
        self.nodes[node].allocated.add(need);
        if let Some(a) = &mut self.nodes[node].addresses {
            *a = a.saturating_sub(1);
        }
        *self.placed.entry(dep.clone()).or_default().entry(node).or_default() += 1;
        let sels = self.dep_selectors.get(dep).cloned().unwrap_or_default();
        for sel in sels {
            self.selectors[sel].total += 1;
            for k in 0..self.selectors[sel].per_key.len() {
                let Some(d) = self.keys[k].of_node[node] else { continue };
                let Some(counts) = self.selectors[sel].per_key[k].as_mut() else { continue };
                let before = counts[d as usize];
                counts[d as usize] += 1;
                let Some(trackers) = self.sel_trackers.get(&(sel, k)) else { continue };
                for &t in trackers {
                    let tr = &mut self.trackers[t];
                    if tr.eligible[d as usize] && before == tr.min {
                        tr.at_min -= 1;
                        if tr.at_min == 0 {
                            let counts = self.selectors[sel].per_key[k].as_ref().expect("counts exist");
                            let (m, n) = min_over(counts, &tr.eligible);
                            tr.min = m;
                            tr.at_min = n;
                        }
                    }
                }
            }
        }
    }
}

/// The minimum over the eligible entries and how many are at it.
fn min_over(counts: &[u32], eligible: &[bool]) -> (u32, usize) {
    let min = counts.iter().zip(eligible).filter(|(_, e)| **e).map(|(c, _)| *c).min().unwrap_or(0);
    let at = counts.iter().zip(eligible).filter(|(c, e)| **e && **c == min).count();
    (min, at)
}
