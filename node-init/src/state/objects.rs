//! The typed objects of the replicated state — nodes, tenants, images, deployments, instances —
//! and the specs users send for them, with their validation. Plain data: no I/O, no clocks
//! (timestamps come from the log entry that made the change).
//!
//! The object model maps onto Kubernetes without renaming: a tenant is a Namespace, a
//! deployment a Deployment, an instance a Pod, a node a Node. JSON field names here are the
//! API's contract: extend them, do not rename them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
pub use shoal_netstack::ipam::Ipv4Cidr;

/// Milliseconds since the Unix epoch, as the proposing node's clock read it.
pub type Millis = u64;

/// Most replicas one deployment may ask for.
pub const MAX_REPLICAS: u32 = 1000;
/// Most vCPUs one instance may have (shoal-vmm's own limit is 254).
pub const MAX_VCPUS: u32 = 64;
/// Smallest and largest guest memory of one instance.
pub const MIN_MEM_MIB: u64 = 16;
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Longest kernel command line (shoal-vmm refuses longer ones).
pub const MAX_CMDLINE: usize = 2047;
/// Longest deployment name: instance ids append `-` and 5 characters and stay under 64.
pub const MAX_DEPLOYMENT_NAME: usize = 52;
/// Most labels on one object, and the longest key and value.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_LEN: usize = 63;
/// Longest a guest may take to stop after Ctrl+Alt+Del before it is killed.
pub const MAX_STOP_TIMEOUT_S: u32 = 600;

/// Resources a node offers or an instance takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub vcpus: u64,
    pub mem_mib: u64,
}

impl Resources {
    pub fn add(&mut self, other: Resources) {
        self.vcpus = self.vcpus.saturating_add(other.vcpus);
        self.mem_mib = self.mem_mib.saturating_add(other.mem_mib);
    }

    pub fn sub(&mut self, other: Resources) {
        self.vcpus = self.vcpus.saturating_sub(other.vcpus);
        self.mem_mib = self.mem_mib.saturating_sub(other.mem_mib);
    }

    /// Whether `need` fits in what is left of `self` after `used`.
    pub fn fits(&self, used: Resources, need: Resources) -> bool {
        used.vcpus.saturating_add(need.vcpus) <= self.vcpus && used.mem_mib.saturating_add(need.mem_mib) <= self.mem_mib
    }
}

/// Revisions and creation time, as every object carries them (Kubernetes' resourceVersion and
/// creationTimestamp).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Revision at which the object was created.
    pub create_revision: u64,
    /// Revision of its last change.
    pub mod_revision: u64,
    #[serde(with = "crate::state::time::rfc3339")]
    pub created_at: Millis,
}

/// Node ids are 64-bit numbers shown as 16 hex digits.
pub mod hex_id {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{id:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        u64::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(id: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match id {
                Some(id) => s.serialize_str(&format!("{id:016x}")),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            let s: Option<String> = Option::deserialize(d)?;
            s.map(|s| u64::from_str_radix(&s, 16).map_err(serde::de::Error::custom)).transpose()
        }
    }

    pub mod set {
        use std::collections::BTreeSet;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(ids: &BTreeSet<u64>, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(ids.iter().map(|id| format!("{id:016x}")))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<u64>, D::Error> {
            let v: Vec<String> = Vec::deserialize(d)?;
            v.iter().map(|s| u64::from_str_radix(s, 16).map_err(serde::de::Error::custom)).collect()
        }
    }
}

/// A host that runs instances (Kubernetes' Node). Admitted when Raft admits it; its labels and
/// capacity are what the node said when it last updated its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    #[serde(with = "hex_id")]
    pub id: u64,
    pub raft_addr: String,
    pub api_addr: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub capacity: Resources,
    /// A cordoned node gets no new instances; the ones it runs stay.
    #[serde(default)]
    pub cordoned: bool,
    /// Labels the operator set through the API (`PUT /v1/nodes/{id}`); they win over the
    /// node's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub api_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
    /// Being drained: cordoned, its instances moved off within their disruption budgets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<Drain>,
    /// Its subnet of the cluster network (`cluster_cidr`), given through Raft when the first
    /// instance is placed on it; its instances' addresses come from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<Ipv4Cidr>,
    #[serde(flatten)]
    pub meta: Meta,
}

impl Node {
    /// The labels placement sees: the node's own, with the operator's over them.
    pub fn effective_labels(&self) -> BTreeMap<String, String> {
        let mut l = self.labels.clone();
        l.extend(self.api_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        l
    }
}

/// A drain's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    #[serde(with = "crate::state::time::rfc3339")]
    pub started_at: Millis,
    /// When the last instance left (the drain is done).
    #[serde(with = "crate::state::time::rfc3339::option", default)]
    pub finished_at: Option<Millis>,
    /// Instances moved off so far.
    #[serde(default)]
    pub moved: u32,
}

/// The body of `PUT /v1/nodes/{id}`: the operator's labels and the node's taints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub taints: Vec<Taint>,
}

impl NodeSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        check_labels("labels", &self.labels)?;
        if self.taints.len() > MAX_RULES {
            return Err(bad(format!("taints: at most {MAX_RULES}")));
        }
        for t in &self.taints {
            let mut m = BTreeMap::new();
            m.insert(t.key.clone(), t.value.clone());
            check_labels("taints", &m)?;
        }
        Ok(())
    }
}

/// Limits on what a tenant's instances may take together; an absent field is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u64>,
}

/// What a tenant's instances take now (those not lost and not finished for good).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub vcpus: u64,
    pub mem_mib: u64,
    pub instances: u64,
}

impl Usage {
    pub fn add(&mut self, r: Resources) {
        self.vcpus = self.vcpus.saturating_add(r.vcpus);
        self.mem_mib = self.mem_mib.saturating_add(r.mem_mib);
        self.instances = self.instances.saturating_add(1);
    }

    pub fn sub(&mut self, r: Resources) {
        self.vcpus = self.vcpus.saturating_sub(r.vcpus);
        self.mem_mib = self.mem_mib.saturating_sub(r.mem_mib);
        self.instances = self.instances.saturating_sub(1);
    }
}

impl Quota {
    /// Why `usage` plus `more` (instances of `each`) would break this quota, if it would.
    pub fn exceeded_by(&self, usage: Usage, more: u64, each: Resources) -> Option<String> {
        let checks = [
            ("vCPUs", self.vcpus, usage.vcpus, each.vcpus.saturating_mul(more)),
            ("MiB of memory", self.mem_mib, usage.mem_mib, each.mem_mib.saturating_mul(more)),
            ("instances", self.instances, usage.instances, more),
        ];
        for (what, limit, used, add) in checks {
            if let Some(limit) = limit {
                if used.saturating_add(add) > limit {
                    return Some(format!(
                        "over the tenant's quota of {limit} {what}: {used} in use, {add} more asked for"
                    ));
                }
            }
        }
        None
    }
}

/// The body of `PUT /v1/tenants/{tenant}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    #[serde(default)]
    pub quota: Quota,
}

/// A tenant-scoped API token: only its SHA-256 is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub sha256: String,
    #[serde(with = "crate::state::time::rfc3339")]
    pub created_at: Millis,
}

/// A tenant (Kubernetes' Namespace): owns deployments and instances, bounded by its quota.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub name: String,
    pub quota: Quota,
    #[serde(default)]
    pub tokens: Vec<TokenRecord>,
    /// Its overlay network's VXLAN identifier, given when its first instance is placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    #[serde(flatten)]
    pub meta: Meta,
}

/// A content-addressed blob (kernel, initrd or disk image) and the nodes that hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub digest: String,
    pub size: u64,
    #[serde(with = "hex_id::set", default)]
    pub nodes: BTreeSet<u64>,
    /// Tenants that pushed it (they list it even before a deployment uses it).
    #[serde(default)]
    pub tenants: BTreeSet<String>,
    /// Since when no deployment or instance has referred to it (garbage collection).
    #[serde(with = "crate::state::time::rfc3339::option", default)]
    pub unreferenced_since: Option<Millis>,
    #[serde(flatten)]
    pub meta: Meta,
}

/// What the node does when a microVM exits by itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

/// How each instance of a deployment is booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Digest of the kernel image (`sha256:<hex>`).
    pub kernel: String,
    #[serde(default)]
    pub initrd: Option<String>,
    /// A disk image copied for each instance as its first virtio disk (`/dev/vda`), writable.
    #[serde(default)]
    pub rootfs: Option<String>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Seconds the guest gets to stop after Ctrl+Alt+Del before it is killed.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_s: u32,
}

fn default_cmdline() -> String {
    "console=ttyS0 reboot=k panic=1".into()
}
fn default_vcpus() -> u32 {
    1
}
fn default_mem_mib() -> u64 {
    128
}
fn default_stop_timeout() -> u32 {
    10
}

impl Template {
    pub fn resources(&self) -> Resources {
        Resources { vcpus: u64::from(self.vcpus), mem_mib: self.mem_mib }
    }

    /// Every image digest the template names.
    pub fn images(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.kernel.as_str()).chain(self.initrd.as_deref()).chain(self.rootfs.as_deref())
    }
}

/// Where a deployment's instances may run and how they are placed. Every rule is optional; the
/// field names are the API's (Kubernetes' topologySpreadConstraints, Nomad's distinct_property and
/// affinities, taints and tolerations).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Only nodes carrying all of these labels.
    #[serde(default)]
    pub node_labels: BTreeMap<String, String>,
    /// Conditions on node labels, all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    /// How evenly instances spread over the domains of a node label (`node`: each node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spread: Vec<SpreadRule>,
    /// A hard cap of this deployment's instances per domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub max_per_domain: Vec<DomainCap>,
    /// Toward instances of other deployments (hard, or weighted preferences).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinity: Vec<AffinityRule>,
    /// Away from instances of other deployments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anti_affinity: Vec<AffinityRule>,
    /// Node taints these instances tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// When nothing fits, instances may preempt instances of lower priority.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// Pack nodes full, or spread over the emptiest (default: the `scheduler_strategy` setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// How many instances may be down at once for drains and preemptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption_budget: Option<DisruptionBudget>,
    /// How a template change replaces instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateStrategy>,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConstraintOp {
    In,
    NotIn,
    Exists,
    NotExists,
    /// Numeric comparisons: the label's value and the single value given, as numbers.
    Gt,
    Lt,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraint {
    pub key: String,
    pub op: ConstraintOp,
    #[serde(default)]
    pub values: Vec<String>,
}

impl Constraint {
    pub fn holds(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.key);
        let num = |s: &str| s.trim().parse::<f64>().ok();
        match self.op {
            ConstraintOp::In => v.is_some_and(|v| self.values.contains(v)),
            ConstraintOp::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            ConstraintOp::Exists => v.is_some(),
            ConstraintOp::NotExists => v.is_none(),
            ConstraintOp::Gt | ConstraintOp::Lt => {
                let (Some(have), Some(want)) = (v.and_then(|v| num(v)), self.values.first().and_then(|w| num(w)))
                else {
                    return false;
                };
                if self.op == ConstraintOp::Gt {
                    have > want
                } else {
                    have < want
                }
            }
        }
    }

    pub fn describe(&self) -> String {
        let op = match self.op {
            ConstraintOp::In => "in",
            ConstraintOp::NotIn => "not in",
            ConstraintOp::Exists => "exists",
            ConstraintOp::NotExists => "does not exist",
            ConstraintOp::Gt => ">",
            ConstraintOp::Lt => "<",
        };
        match self.op {
            ConstraintOp::Exists | ConstraintOp::NotExists => format!("{} {op}", self.key),
            _ => format!("{} {op} {}", self.key, self.values.join(",")),
        }
    }
}

/// The label key that names each node as its own domain.
pub const NODE_DOMAIN: &str = "node";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpreadRule {
    /// A node label, or `node`.
    pub key: String,
    /// After placing, (instances in a domain) - (minimum over eligible domains) <= max_skew.
    #[serde(default = "one")]
    pub max_skew: u32,
    /// A hard rule filters nodes; a soft one only scores them.
    #[serde(default)]
    pub hard: bool,
    /// Which instances count: those of deployments (of the same tenant) with these labels
    /// (default: this deployment's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainCap {
    pub key: String,
    pub max: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffinityRule {
    /// Deployments whose instances this rule is about (a label match).
    pub selector: BTreeMap<String, String>,
    /// The domain: a node label, or `node`.
    #[serde(default = "node_key")]
    pub key: String,
    #[serde(default)]
    pub hard: bool,
    /// For a soft rule, how much it counts (1 to 100).
    #[serde(default = "fifty")]
    pub weight: u32,
    /// Whose deployments: the same tenant's (default), these tenants', or `["*"]` for all
    /// (the cluster operator's cross-tenant rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<Vec<String>>,
}

fn node_key() -> String {
    NODE_DOMAIN.to_string()
}
fn fifty() -> u32 {
    50
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaintEffect {
    /// No new instances that do not tolerate it.
    NoSchedule,
    /// Also evicts the instances there that do not tolerate it.
    NoExecute,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Taint {
    pub key: String,
    #[serde(default)]
    pub value: String,
    pub effect: TaintEffect,
}

impl Taint {
    pub fn describe(&self) -> String {
        let effect = match self.effect {
            TaintEffect::NoSchedule => "no_schedule",
            TaintEffect::NoExecute => "no_execute",
        };
        format!("{}={}:{effect}", self.key, self.value)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TolerationOp {
    /// The taint's value must equal the toleration's.
    #[default]
    Equal,
    /// Any value of the key.
    Exists,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Toleration {
    /// The taint's key (empty with `exists`: every taint).
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub operator: TolerationOp,
    #[serde(default)]
    pub value: String,
    /// Only taints of this effect (default: both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
}

impl Toleration {
    pub fn tolerates(&self, t: &Taint) -> bool {
        let key = (self.key.is_empty() && self.operator == TolerationOp::Exists) || self.key == t.key;
        let value = self.operator == TolerationOp::Exists || self.value == t.value;
        key && value && self.effect.is_none_or(|e| e == t.effect)
    }
}

/// Whether `tolerations` tolerate every taint in `taints` of the given effects.
pub fn tolerated<'a>(taints: impl IntoIterator<Item = &'a Taint>, tolerations: &[Toleration]) -> Result<(), &'a Taint> {
    for t in taints {
        if !tolerations.iter().any(|tol| tol.tolerates(t)) {
            return Err(t);
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Fill the fullest nodes that fit first (fewer, busier nodes).
    Binpack,
    /// Prefer the emptiest nodes (the default).
    #[default]
    Spread,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisruptionBudget {
    /// Instances of the deployment that may be unavailable at once (drains, preemptions).
    pub max_unavailable: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateStrategy {
    /// Old instances that may stop before their replacements run (default: the disruption
    /// budget's, else 0).
    #[serde(default)]
    pub max_unavailable: Option<u32>,
    /// New instances that may run beside the old ones (default 1).
    #[serde(default)]
    pub max_surge: Option<u32>,
}

/// The most rules of each kind in one placement.
pub const MAX_RULES: usize = 16;

impl Placement {
    pub fn validate(&self) -> Result<(), SpecError> {
        check_labels("placement.node_labels", &self.node_labels)?;
        let counts = [
            ("constraints", self.constraints.len()),
            ("spread", self.spread.len()),
            ("max_per_domain", self.max_per_domain.len()),
            ("affinity", self.affinity.len()),
            ("anti_affinity", self.anti_affinity.len()),
            ("tolerations", self.tolerations.len()),
        ];
        for (what, n) in counts {
            if n > MAX_RULES {
                return Err(bad(format!("placement.{what}: at most {MAX_RULES} rules")));
            }
        }
        let key_ok = |what: &str, k: &str| -> Result<(), SpecError> {
            let mut m = BTreeMap::new();
            m.insert(k.to_string(), String::new());
            check_labels(what, &m)
        };
        for c in &self.constraints {
            key_ok("placement.constraints", &c.key)?;
            if c.values.len() > MAX_LABELS {
                return Err(bad(format!("placement.constraints: at most {MAX_LABELS} values")));
            }
            match c.op {
                ConstraintOp::In | ConstraintOp::NotIn if c.values.is_empty() => {
                    return Err(bad(format!("placement.constraints: {:?} on {:?} needs values", c.op, c.key)))
                }
                ConstraintOp::Gt | ConstraintOp::Lt
                    if c.values.len() != 1 || c.values[0].trim().parse::<f64>().is_err() =>
                {
                    return Err(bad(format!("placement.constraints: {:?} on {:?} needs one number", c.op, c.key)))
                }
                _ => {}
            }
        }
        for s in &self.spread {
            key_ok("placement.spread", &s.key)?;
            if s.max_skew == 0 {
                return Err(bad("placement.spread: max_skew must be at least 1"));
            }
            if let Some(sel) = &s.selector {
                check_labels("placement.spread.selector", sel)?;
            }
        }
        for m in &self.max_per_domain {
            key_ok("placement.max_per_domain", &m.key)?;
            if m.max == 0 {
                return Err(bad("placement.max_per_domain: max must be at least 1"));
            }
        }
        for a in self.affinity.iter().chain(&self.anti_affinity) {
            key_ok("placement.affinity", &a.key)?;
            if a.selector.is_empty() {
                return Err(bad("placement.affinity: a selector names at least one label"));
            }
            check_labels("placement.affinity.selector", &a.selector)?;
            if !(1..=100).contains(&a.weight) {
                return Err(bad("placement.affinity: weight must be 1 to 100"));
            }
            for t in a.tenants.iter().flatten() {
                if t != "*" {
                    check_tenant_name(t)?;
                }
            }
        }
        for t in &self.tolerations {
            if !t.key.is_empty() {
                key_ok("placement.tolerations", &t.key)?;
            } else if t.operator != TolerationOp::Exists {
                return Err(bad("placement.tolerations: an empty key needs operator exists"));
            }
        }
        if !(-1000..=1000).contains(&self.priority) {
            return Err(bad("placement.priority must be -1000 to 1000"));
        }
        Ok(())
    }

    /// Old instances a rollout may stop before their replacements run, and extra new ones.
    pub fn rollout(&self) -> (usize, usize) {
        let budget = self.disruption_budget.map(|b| b.max_unavailable).unwrap_or(0);
        let unavailable = self.update.and_then(|u| u.max_unavailable).unwrap_or(budget) as usize;
        let surge = self.update.and_then(|u| u.max_surge).unwrap_or(1) as usize;
        // Neither would never make progress.
        if unavailable == 0 && surge == 0 {
            (0, 1)
        } else {
            (unavailable, surge)
        }
    }
}

/// The body of `PUT /v1/tenants/{tenant}/deployments/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    pub replicas: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub template: Template,
    #[serde(default)]
    pub placement: Placement,
    /// Whether its instances may reach outside the cluster network (through the node's
    /// address, masqueraded). Applied to running instances as it changes, no rollout.
    #[serde(default = "yes")]
    pub egress: bool,
    /// Ports every node forwards to this deployment's running instances (Kubernetes'
    /// NodePort service): `node_port` on each node's address, spread over the instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PublishedPort>,
}

/// One published port of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    /// The instances' port.
    pub port: u16,
    /// The port on every node, in Kubernetes' NodePort range.
    pub node_port: u16,
    #[serde(default)]
    pub protocol: PortProtocol,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    #[default]
    Tcp,
    Udp,
}

/// Kubernetes' default NodePort range: clear of the agent's own ports and of ephemeral ones.
pub const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;
/// At most this many published ports per deployment.
pub const MAX_PORTS: usize = 16;

fn yes() -> bool {
    true
}

/// How far a deployment is from what it asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentStatus {
    /// Instances of the current template that are running.
    pub running: u32,
    /// Instances of the current template (in any state but lost).
    pub updated: u32,
    /// Instances waiting for a node or to start.
    pub pending: u32,
    /// Why the deployment cannot make progress, when it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A deployment (Kubernetes' Deployment): keeps `replicas` instances of its template running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub tenant: String,
    pub name: String,
    #[serde(flatten)]
    pub spec: DeploymentSpec,
    /// Bumped on every template change; instances record the generation they were made from.
    pub generation: u64,
    /// Being deleted: its instances are stopping; it goes once they are gone.
    #[serde(default)]
    pub deleting: bool,
    #[serde(default)]
    pub status: DeploymentStatus,
    #[serde(flatten)]
    pub meta: Meta,
}

/// Where an instance is in its life (Kubernetes' pod phase, with `lost` for a dead node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Waiting for a node, or assigned and not yet started there.
    Pending,
    /// Its node is fetching images and booting it.
    Starting,
    Running,
    /// The microVM exited with status 0.
    Exited,
    /// The microVM exited with an error or could not be started.
    Failed,
    /// Its node was unreachable past the grace period; a replacement runs elsewhere.
    Lost,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Starting => "starting",
            InstanceState::Running => "running",
            InstanceState::Exited => "exited",
            InstanceState::Failed => "failed",
            InstanceState::Lost => "lost",
        }
    }
}

/// What the cluster wants of an instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    #[default]
    Running,
    /// Scaled down, replaced or its deployment deleted: its node stops it, then it is removed.
    Stopped,
}

/// One microVM of a deployment (Kubernetes' Pod).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    /// Unique over the cluster's life (ids may be reused after deletion): names the node's
    /// instance directory and jail.
    pub uid: String,
    pub tenant: String,
    pub deployment: String,
    /// The deployment generation (template) it was made from.
    pub generation: u64,
    pub template: Template,
    #[serde(with = "hex_id::option", default)]
    pub node: Option<u64>,
    /// Its deployment's placement priority (higher is placed first and may preempt).
    #[serde(default)]
    pub priority: i32,
    /// The node where lower-priority instances are being stopped to make room for it.
    #[serde(with = "hex_id::option", default, skip_serializing_if = "Option::is_none")]
    pub nominated_node: Option<u64>,
    pub state: InstanceState,
    #[serde(default)]
    pub desired: Desired,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub last_exit_code: Option<i32>,
    /// Why it is pending, failed or lost (empty otherwise).
    #[serde(default)]
    pub reason: String,
    #[serde(with = "crate::state::time::rfc3339::option", default)]
    pub scheduled_at: Option<Millis>,
    #[serde(with = "crate::state::time::rfc3339::option", default)]
    pub started_at: Option<Millis>,
    #[serde(with = "crate::state::time::rfc3339::option", default)]
    pub finished_at: Option<Millis>,
    /// Its address on its tenant's network, from its node's subnet: given when it is placed,
    /// held while it may run (lost included: its node may still run it), released when it is
    /// finished for good or removed. Never held by two live instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    /// Its interface's MAC, derived from its uid (the same on every node and every restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(flatten)]
    pub meta: Meta,
}

impl Instance {
    /// It will not run again by itself: it ended and its restart policy does not restart it.
    pub fn is_final(&self) -> bool {
        matches!(
            (self.state, self.template.restart),
            (InstanceState::Exited, RestartPolicy::Never | RestartPolicy::OnFailure)
                | (InstanceState::Failed, RestartPolicy::Never)
        )
    }

    /// It holds (or may soon hold) resources: not lost and not finished for good.
    pub fn is_active(&self) -> bool {
        self.state != InstanceState::Lost && !self.is_final()
    }

    /// It holds resources on its node: assigned and active.
    pub fn holds_node(&self) -> Option<u64> {
        self.node.filter(|_| self.is_active())
    }
}

/// Why a name or spec is refused (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn bad(msg: impl Into<String>) -> SpecError {
    SpecError(msg.into())
}

/// A DNS label (RFC 1123): 1 to `max` of `[a-z0-9-]`, starting and ending with a letter or digit.
pub fn check_dns_label(what: &str, name: &str, max: usize) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "{what} {:?} is not a DNS label (1 to {max} of a-z, 0-9 and '-', not starting or ending with '-')",
            name.chars().take(80).collect::<String>()
        )))
    }
}

pub fn check_tenant_name(name: &str) -> Result<(), SpecError> {
    check_dns_label("tenant name", name, 63)
}

pub fn check_deployment_name(name: &str) -> Result<(), SpecError> {
    check_dns_label("deployment name", name, MAX_DEPLOYMENT_NAME)
}

/// `sha256:` and 64 lower-case hex digits.
pub fn check_digest(what: &str, d: &str) -> Result<(), SpecError> {
    let ok = d
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "{what} {:?} is not an image digest (sha256:<64 hex digits>)",
            d.chars().take(80).collect::<String>()
        )))
    }
}

pub fn check_labels(what: &str, labels: &BTreeMap<String, String>) -> Result<(), SpecError> {
    if labels.len() > MAX_LABELS {
        return Err(bad(format!("{what}: at most {MAX_LABELS} labels")));
    }
    let ok_key = |k: &str| {
        !k.is_empty()
            && k.len() <= MAX_LABEL_LEN
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    };
    let ok_value =
        |v: &str| v.len() <= MAX_LABEL_LEN && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    for (k, v) in labels {
        if !ok_key(k) || !ok_value(v) {
            return Err(bad(format!(
                "{what}: label {:?}={:?} is not valid (keys 1 to {MAX_LABEL_LEN} of [A-Za-z0-9-_./], values up to {MAX_LABEL_LEN} of [A-Za-z0-9-_.])",
                k.chars().take(80).collect::<String>(),
                v.chars().take(80).collect::<String>()
            )));
        }
    }
    Ok(())
}

impl Template {
    pub fn validate(&self) -> Result<(), SpecError> {
        check_digest("template.kernel", &self.kernel)?;
        if let Some(d) = &self.initrd {
            check_digest("template.initrd", d)?;
        }
        if let Some(d) = &self.rootfs {
            check_digest("template.rootfs", d)?;
        }
        if self.cmdline.len() > MAX_CMDLINE || self.cmdline.bytes().any(|b| b == 0 || b == b'\n') {
            return Err(bad(format!("template.cmdline must be at most {MAX_CMDLINE} bytes on one line")));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(bad(format!("template.vcpus must be 1 to {MAX_VCPUS}")));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(bad(format!("template.mem_mib must be {MIN_MEM_MIB} to {MAX_MEM_MIB}")));
        }
        if self.stop_timeout_s > MAX_STOP_TIMEOUT_S {
            return Err(bad(format!("template.stop_timeout_s must be at most {MAX_STOP_TIMEOUT_S}")));
        }
        Ok(())
    }
}

impl DeploymentSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.replicas > MAX_REPLICAS {
            return Err(bad(format!("replicas must be 0 to {MAX_REPLICAS}")));
        }
        check_labels("labels", &self.labels)?;
        if self.ports.len() > MAX_PORTS {
            return Err(bad(format!("at most {MAX_PORTS} ports")));
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.ports {
            if p.port == 0 {
                return Err(bad("ports: port must be 1 to 65535"));
            }
            if !NODE_PORTS.contains(&p.node_port) {
                return Err(bad(format!(
                    "ports: node_port {} is outside {}-{}",
                    p.node_port,
                    NODE_PORTS.start(),
                    NODE_PORTS.end()
                )));
            }
            if !seen.insert((p.node_port, p.protocol)) {
                return Err(bad(format!("ports: node_port {} is given twice", p.node_port)));
            }
        }
        self.placement.validate()?;
        self.template.validate()
    }
}

impl TenantSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let q = &self.quota;
        for (what, v, max) in
            [("vcpus", q.vcpus, 1 << 20), ("mem_mib", q.mem_mib, 1 << 40), ("instances", q.instances, 1 << 20)]
        {
            if v.is_some_and(|v| v > max) {
                return Err(bad(format!("quota.{what} must be at most {max}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Template {
        serde_json::from_str(&format!(r#"{{"kernel": "sha256:{}"}}"#, "a".repeat(64))).unwrap()
    }

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "web-1", "0abc", &"x".repeat(63)] {
            assert!(check_tenant_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "../x", "a/b", "a%2fb", &"x".repeat(64), "é"] {
            assert!(check_tenant_name(bad).is_err(), "{bad}");
        }
        assert!(check_deployment_name(&"x".repeat(53)).is_err());
    }

    #[test]
    fn templates_take_defaults_and_refuse_nonsense() {
        let t = template();
        assert_eq!((t.vcpus, t.mem_mib, t.restart, t.stop_timeout_s), (1, 128, RestartPolicy::Always, 10));
        assert!(t.validate().is_ok());
        let bad_templates = [
            Template { kernel: "sha256:abc".into(), ..template() },
            Template { kernel: format!("sha256:{}", "A".repeat(64)), ..template() },
            Template { initrd: Some("md5:x".into()), ..template() },
            Template { vcpus: 0, ..template() },
            Template { vcpus: 1000, ..template() },
            Template { mem_mib: 1, ..template() },
            Template { cmdline: "x".repeat(3000), ..template() },
            Template { cmdline: "a\nb".into(), ..template() },
        ];
        for t in bad_templates {
            assert!(t.validate().is_err(), "{t:?}");
        }
        let unknown = format!(r#"{{"kernel": "sha256:{}", "kernal": "x"}}"#, "a".repeat(64));
        assert!(serde_json::from_str::<Template>(&unknown).is_err(), "unknown fields are refused");
    }

    #[test]
    fn restart_policies_use_the_api_spelling() {
        for (s, p) in [
            ("always", RestartPolicy::Always),
            ("on-failure", RestartPolicy::OnFailure),
            ("never", RestartPolicy::Never),
        ] {
            assert_eq!(serde_json::from_str::<RestartPolicy>(&format!("\"{s}\"")).unwrap(), p);
        }
    }

    #[test]
    fn quotas_say_which_limit_is_exceeded() {
        let q = Quota { vcpus: Some(4), mem_mib: None, instances: Some(3) };
        let used = Usage { vcpus: 2, mem_mib: 100, instances: 2 };
        let each = Resources { vcpus: 1, mem_mib: 1 << 30 };
        assert_eq!(q.exceeded_by(used, 1, each), None);
        assert!(q.exceeded_by(used, 2, each).unwrap().contains("quota of 3 instances"));
        assert!(q.exceeded_by(used, 3, each).unwrap().contains("quota of 4 vCPUs"));
    }

    #[test]
    fn final_and_active_follow_the_restart_policy() {
        let mut i = Instance {
            id: "web-a".into(),
            uid: "u".into(),
            tenant: "t".into(),
            deployment: "web".into(),
            generation: 1,
            template: template(),
            node: Some(7),
            priority: 0,
            nominated_node: None,
            state: InstanceState::Exited,
            desired: Desired::Running,
            restarts: 0,
            last_exit_code: Some(0),
            reason: String::new(),
            scheduled_at: None,
            started_at: None,
            finished_at: None,
            address: None,
            mac: None,
            meta: Meta::default(),
        };
        assert!(!i.is_final(), "always restarts");
        i.template.restart = RestartPolicy::OnFailure;
        assert!(i.is_final());
        i.state = InstanceState::Failed;
        assert!(!i.is_final());
        i.template.restart = RestartPolicy::Never;
        assert!(i.is_final() && !i.is_active() && i.holds_node().is_none());
        i.state = InstanceState::Lost;
        assert!(!i.is_active());
        i.state = InstanceState::Running;
        assert_eq!(i.holds_node(), Some(7));
    }
}
