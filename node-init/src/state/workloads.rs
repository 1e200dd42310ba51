//! The typed tables' commands: how each one is validated and applied, the indexes kept in step
//! with every instance and deployment write, and the deployment controller that runs inside
//! apply (so every node derives the same instances from the same log): it creates instances for
//! missing replicas, stops the excess, replaces a changed template one instance at a time
//! (one extra instance at most, no running instance stopped before its replacement runs), and
//! replaces instances of lost nodes.

use std::collections::BTreeSet;

use sha2::{Digest as _, Sha256};

use super::command::{Command, InstanceReport, Preemption, Schedule};
use super::objects::{
    check_deployment_name, check_digest, check_tenant_name, tolerated, Deployment, DeploymentSpec, DeploymentStatus,
    Desired, Drain, Image, Instance, InstanceState, Meta, Millis, Node, Resources, Tenant, TokenRecord, Usage,
};
use super::{
    node_from_record, reject, ApplyOutcome, InstanceKey, NodeRecord, RejectKind, State, WatchEvent, DEPLOYMENTS_PREFIX,
    IMAGES_PREFIX, INSTANCES_PREFIX, NODES_PREFIX, TENANTS_PREFIX,
};

/// Most tokens one tenant may hold.
pub const MAX_TOKENS: usize = 64;

/// Objects with revisions and a key in the watch stream.
trait Object: serde::Serialize {
    fn meta_mut(&mut self) -> &mut Meta;
    fn key(&self) -> String;
}

impl Object for Node {
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
    fn key(&self) -> String {
        node_key(self.id)
    }
}
impl Object for Tenant {
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
    fn key(&self) -> String {
        format!("{TENANTS_PREFIX}{}", self.name)
    }
}
impl Object for Image {
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
    fn key(&self) -> String {
        format!("{IMAGES_PREFIX}{}", self.digest)
    }
}
impl Object for Deployment {
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
    fn key(&self) -> String {
        format!("{DEPLOYMENTS_PREFIX}{}/{}", self.tenant, self.name)
    }
}
impl Object for Instance {
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
    fn key(&self) -> String {
        format!("{INSTANCES_PREFIX}{}/{}", self.tenant, self.id)
    }
}

pub fn node_key(id: u64) -> String {
    format!("{NODES_PREFIX}{id:016x}")
}

fn applied(s: &State) -> ApplyOutcome {
    ApplyOutcome::Applied { revision: s.revision }
}

/// Lower-case base-36 text of the first bytes of a SHA-256 over `parts`.
fn hashed(parts: &[&str], len: usize, base36: bool) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    if !base36 {
        return hex::encode(digest)[..len].to_string();
    }
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    digest.iter().take(len).map(|b| ALPHABET[usize::from(*b) % 36] as char).collect()
}

impl State {
    /// Stamps revisions on an object and records its change; returns the new revision.
    fn stamp<T: Object>(&mut self, obj: &mut T, at: Millis) -> u64 {
        let revision = self.revision + 1;
        let meta = obj.meta_mut();
        if meta.create_revision == 0 {
            meta.create_revision = revision;
            meta.created_at = at;
        }
        meta.mod_revision = revision;
        let value = serde_json::to_string(obj).unwrap_or_default();
        self.emit_put(obj.key(), value)
    }

    // ---- indexes -------------------------------------------------------------------------

    fn index_instance(&mut self, i: &Instance, add: bool) {
        let key = (i.tenant.clone(), i.id.clone());
        let res = i.template.resources();
        let ix = &mut self.index;
        if let Some(node) = i.node {
            let set = ix.node_instances.entry(node).or_default();
            if add {
                set.insert(key.clone());
            } else {
                set.remove(&key);
                if set.is_empty() {
                    ix.node_instances.remove(&node);
                }
            }
        }
        if let Some(node) = i.holds_node() {
            let r = ix.node_allocated.entry(node).or_default();
            if add {
                r.add(res)
            } else {
                r.sub(res)
            }
            let by_priority = ix.priorities.entry(i.priority).or_default();
            if add {
                *by_priority += 1;
            } else {
                *by_priority = by_priority.saturating_sub(1);
                if *by_priority == 0 {
                    ix.priorities.remove(&i.priority);
                }
            }
            let dep = (i.tenant.clone(), i.deployment.clone());
            let per_node = ix.deployment_nodes.entry(dep.clone()).or_default();
            let n = per_node.entry(node).or_default();
            if add {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_node.remove(&node);
                    if per_node.is_empty() {
                        ix.deployment_nodes.remove(&dep);
                    }
                }
            }
        }
        if i.is_active() {
            let u = ix.tenant_usage.entry(i.tenant.clone()).or_default();
            if add {
                u.add(res)
            } else {
                u.sub(res)
            }
            if i.node.is_none() && i.desired == Desired::Running {
                let k = (std::cmp::Reverse(i.priority), i.meta.create_revision, (i.tenant.clone(), i.id.clone()));
                if add {
                    ix.unassigned.insert(k);
                } else {
                    ix.unassigned.remove(&k);
                }
            }
        }
        let dep = ix.deployment_instances.entry((i.tenant.clone(), i.deployment.clone())).or_default();
        if add {
            dep.insert(i.id.clone());
        } else {
            dep.remove(&i.id);
            if dep.is_empty() {
                ix.deployment_instances.remove(&(i.tenant.clone(), i.deployment.clone()));
            }
        }
        for d in i.template.images() {
            self.count_image_ref(d, add);
        }
    }

    fn index_deployment(&mut self, d: &Deployment, add: bool) {
        if d.deleting {
            return;
        }
        for img in d.spec.template.images() {
            self.count_image_ref(img, add);
        }
    }

    fn count_image_ref(&mut self, digest: &str, add: bool) {
        let n = self.index.image_refs.entry(digest.to_string()).or_default();
        if add {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
        }
        if *n == 0 {
            self.index.image_refs.remove(digest);
        }
        self.dirty_images.insert(digest.to_string());
    }

    pub(super) fn rebuild_indexes(&mut self) {
        self.index = Default::default();
        let deployments: Vec<Deployment> = self.deployments.values().cloned().collect();
        for d in &deployments {
            self.index_deployment(d, true);
        }
        let instances: Vec<Instance> = self.instances.values().cloned().collect();
        for i in &instances {
            self.index_instance(i, true);
        }
        for t in self.tenants.values() {
            for tok in &t.tokens {
                self.index.tokens.insert(tok.sha256.clone(), t.name.clone());
            }
        }
        self.dirty_images.clear();
    }

    // ---- writes that keep the indexes ------------------------------------------------------

    pub(super) fn write_instance(&mut self, mut inst: Instance, at: Millis) {
        if inst.is_final() {
            // Finished for good: its address may go to the next instance.
            inst.address = None;
        }
        let key = (inst.tenant.clone(), inst.id.clone());
        if let Some(old) = self.instances.get(&key).cloned() {
            self.index_instance(&old, false);
        }
        self.stamp(&mut inst, at);
        self.index_instance(&inst, true);
        self.dirty_deployments.insert((inst.tenant.clone(), inst.deployment.clone()));
        self.instances.insert(key, inst);
    }

    fn delete_instance(&mut self, key: &InstanceKey) {
        if let Some(old) = self.instances.remove(key) {
            self.index_instance(&old, false);
            self.dirty_deployments.insert((old.tenant.clone(), old.deployment.clone()));
            self.emit_delete(old.key());
        }
    }

    fn write_deployment(&mut self, mut dep: Deployment, at: Millis) {
        let key = (dep.tenant.clone(), dep.name.clone());
        if let Some(old) = self.deployments.get(&key).cloned() {
            self.index_deployment(&old, false);
        }
        self.stamp(&mut dep, at);
        self.index_deployment(&dep, true);
        self.dirty_deployments.insert(key.clone());
        self.deployments.insert(key, dep);
    }

    fn write_image(&mut self, mut img: Image, at: Millis) {
        self.stamp(&mut img, at);
        self.images.insert(img.digest.clone(), img);
    }

    pub(super) fn write_node(&mut self, mut node: Node, at: Millis) {
        self.stamp(&mut node, at);
        self.nodes.insert(node.id, node);
    }

    pub(super) fn write_tenant(&mut self, mut t: Tenant, at: Millis) {
        self.stamp(&mut t, at);
        self.tenants.insert(t.name.clone(), t);
    }

    // ---- membership (from Raft configuration changes) -------------------------------------

    /// Adds (or refreshes) the record of a node Raft admitted.
    pub fn admit_node(&mut self, rec: &NodeRecord, at: Millis) -> Vec<WatchEvent> {
        self.events.clear();
        let node = match self.nodes.get(&rec.id) {
            Some(n) => Node {
                raft_addr: rec.raft_addr.clone(),
                api_addr: rec.api_addr.clone(),
                labels: rec.labels.clone(),
                capacity: rec.capacity,
                ..n.clone()
            },
            None => node_from_record(rec, Meta::default()),
        };
        if self.nodes.get(&rec.id) != Some(&node) {
            self.write_node(node, at);
        }
        std::mem::take(&mut self.events)
    }

    /// Removes a node Raft removed: what it ran is lost, what it was stopping is gone.
    pub fn remove_node(&mut self, id: u64, at: Millis) -> Vec<WatchEvent> {
        self.events.clear();
        if self.nodes.remove(&id).is_some() {
            self.lose_instances_of(id, "its node was removed from the cluster", at, true);
            let holding: Vec<String> =
                self.images.values().filter(|i| i.nodes.contains(&id)).map(|i| i.digest.clone()).collect();
            for d in holding {
                if let Some(mut img) = self.images.get(&d).cloned() {
                    img.nodes.remove(&id);
                    self.write_image(img, at);
                }
            }
            self.emit_delete(node_key(id));
        }
        self.settle(at);
        std::mem::take(&mut self.events)
    }

    /// Marks the active instances of `node` lost; with `forget`, lost ones are removed at once.
    fn lose_instances_of(&mut self, node: u64, reason: &str, at: Millis, forget: bool) {
        let keys: Vec<InstanceKey> =
            self.index.node_instances.get(&node).cloned().unwrap_or_default().into_iter().collect();
        for key in keys {
            let Some(inst) = self.instances.get(&key).cloned() else { continue };
            if inst.desired == Desired::Stopped || (forget && (inst.state == InstanceState::Lost || !inst.is_active()))
            {
                self.delete_instance(&key);
            } else if inst.is_active() {
                let lost =
                    Instance { state: InstanceState::Lost, reason: reason.to_string(), finished_at: Some(at), ..inst };
                self.write_instance(lost, at);
            }
        }
    }

    // ---- commands --------------------------------------------------------------------------

    pub(super) fn apply_workload(&mut self, command: &Command, at: Millis) -> ApplyOutcome {
        match command {
            Command::NodeUpdate { node, api_addr, raft_addr, labels, capacity } => {
                let Some(old) = self.nodes.get(node).cloned() else {
                    return reject(RejectKind::NotFound, format!("node {node:016x} is not a member"));
                };
                let new = Node {
                    api_addr: api_addr.clone(),
                    raft_addr: raft_addr.clone(),
                    labels: labels.clone(),
                    capacity: *capacity,
                    ..old.clone()
                };
                if new != old {
                    self.write_node(new, at);
                }
                applied(self)
            }
            Command::Cordon { node, cordoned } => {
                let Some(old) = self.nodes.get(node).cloned() else {
                    return reject(RejectKind::NotFound, format!("node {node:016x} is not a member"));
                };
                if old.cordoned != *cordoned {
                    self.write_node(Node { cordoned: *cordoned, ..old }, at);
                }
                applied(self)
            }
            Command::SetNodeSpec { node, spec } => {
                if let Err(e) = spec.validate() {
                    return reject(RejectKind::Invalid, e.0);
                }
                let Some(old) = self.nodes.get(node).cloned() else {
                    return reject(RejectKind::NotFound, format!("node {node:016x} is not a member"));
                };
                if old.api_labels != spec.labels || old.taints != spec.taints {
                    self.write_node(Node { api_labels: spec.labels.clone(), taints: spec.taints.clone(), ..old }, at);
                }
                applied(self)
            }
            Command::Drain { node, drain } => {
                let Some(old) = self.nodes.get(node).cloned() else {
                    return reject(RejectKind::NotFound, format!("node {node:016x} is not a member"));
                };
                let new = if *drain {
                    let started = old.drain.clone().unwrap_or(Drain { started_at: at, finished_at: None, moved: 0 });
                    Node { cordoned: true, drain: Some(started), ..old.clone() }
                } else {
                    Node { drain: None, ..old.clone() }
                };
                if new != old {
                    self.write_node(new, at);
                    self.settle_drain(*node, at);
                }
                applied(self)
            }
            Command::Evict { tenant, id, node, reason, budget, term } => {
                if *term < self.max_term {
                    return reject(
                        RejectKind::Stale,
                        format!("decided in term {term}; the cluster is in term {}", self.max_term),
                    );
                }
                let key = (tenant.clone(), id.clone());
                let Some(inst) = self.instances.get(&key).cloned() else { return ApplyOutcome::NotFound };
                if inst.node != Some(*node) || inst.desired != Desired::Running || !inst.is_active() {
                    return reject(RejectKind::Conflict, format!("instance {id} is not running on node {node:016x}"));
                }
                if *budget && !self.budget_allows(&(tenant.clone(), inst.deployment.clone()), 1) {
                    return reject(
                        RejectKind::Conflict,
                        format!("the disruption budget of {} allows no more now", inst.deployment),
                    );
                }
                self.write_instance(Instance { desired: Desired::Stopped, reason: reason.clone(), ..inst }, at);
                if let Some(mut n) = self.nodes.get(node).cloned() {
                    if let Some(d) = n.drain.as_mut() {
                        d.moved += 1;
                        self.write_node(n, at);
                    }
                }
                applied(self)
            }
            Command::PutTenant { name, spec, prev_revision } => self.put_tenant(name, spec, *prev_revision, at),
            Command::DeleteTenant { name } => self.delete_tenant(name),
            Command::AddTenantToken { tenant, id, sha256 } => {
                let Some(mut t) = self.tenants.get(tenant).cloned() else {
                    return reject(RejectKind::NotFound, format!("tenant {tenant:?} does not exist"));
                };
                if t.tokens.len() >= MAX_TOKENS {
                    return reject(RejectKind::Conflict, format!("tenant {tenant:?} already has {MAX_TOKENS} tokens"));
                }
                if self.index.tokens.contains_key(sha256) || t.tokens.iter().any(|k| &k.id == id) {
                    return reject(RejectKind::Conflict, "that token already exists");
                }
                t.tokens.push(TokenRecord { id: id.clone(), sha256: sha256.clone(), created_at: at });
                self.index.tokens.insert(sha256.clone(), tenant.clone());
                self.write_tenant(t, at);
                applied(self)
            }
            Command::ImageStored { digest, size, node, tenant } => {
                if let Err(e) = check_digest("digest", digest) {
                    return reject(RejectKind::Invalid, e.0);
                }
                if !self.nodes.contains_key(node) {
                    return reject(RejectKind::NotFound, format!("node {node:016x} is not a member"));
                }
                let mut img = match self.images.get(digest).cloned() {
                    Some(img) if img.size != *size => {
                        return reject(
                            RejectKind::Conflict,
                            format!("image {digest} is {} bytes, not {size}: the copy is damaged", img.size),
                        )
                    }
                    Some(img) => img,
                    None => Image {
                        digest: digest.clone(),
                        size: *size,
                        nodes: BTreeSet::new(),
                        tenants: BTreeSet::new(),
                        unreferenced_since: (!self.index.image_refs.contains_key(digest)).then_some(at),
                        meta: Meta::default(),
                    },
                };
                let before = self.images.get(digest).cloned();
                img.nodes.insert(*node);
                if let Some(t) = tenant {
                    img.tenants.insert(t.clone());
                }
                if before.as_ref() != Some(&img) {
                    self.write_image(img, at);
                }
                applied(self)
            }
            Command::ImageDropped { digest, node } => {
                let Some(mut img) = self.images.get(digest).cloned() else { return ApplyOutcome::NotFound };
                if img.nodes.remove(node) {
                    self.write_image(img, at);
                }
                applied(self)
            }
            Command::DeleteImage { digest } => {
                if !self.images.contains_key(digest) {
                    return ApplyOutcome::NotFound;
                }
                if let Some(n) = self.index.image_refs.get(digest) {
                    return reject(
                        RejectKind::Conflict,
                        format!("image {digest} is used by {n} deployments or instances"),
                    );
                }
                self.images.remove(digest);
                self.emit_delete(format!("{IMAGES_PREFIX}{digest}"));
                applied(self)
            }
            Command::PutDeployment { tenant, name, spec, prev_revision } => {
                self.put_deployment(tenant, name, spec, *prev_revision, at)
            }
            Command::DeleteDeployment { tenant, name } => {
                let key = (tenant.clone(), name.clone());
                let Some(dep) = self.deployments.get(&key).cloned() else { return ApplyOutcome::NotFound };
                if !dep.deleting {
                    self.write_deployment(Deployment { deleting: true, ..dep }, at);
                }
                applied(self)
            }
            Command::Schedule(s) => self.apply_schedule(s, at),
            Command::InstanceReport(r) => self.apply_report(r, at),
            Command::InstanceStopped { node, tenant, id } => {
                let key = (tenant.clone(), id.clone());
                let Some(inst) = self.instances.get(&key) else { return ApplyOutcome::NotFound };
                if inst.node != Some(*node) {
                    return reject(RejectKind::Conflict, format!("instance {id} is not on node {node:016x}"));
                }
                if inst.desired == Desired::Running && inst.state != InstanceState::Lost {
                    return reject(RejectKind::Conflict, format!("instance {id} is wanted running"));
                }
                self.delete_instance(&key);
                self.settle_drain(*node, at);
                applied(self)
            }
            Command::NodeLost { node, term, reason } => {
                if *term < self.max_term {
                    return reject(
                        RejectKind::Stale,
                        format!("decided in term {term}; the cluster is in term {}", self.max_term),
                    );
                }
                if !self.nodes.contains_key(node) {
                    return ApplyOutcome::NotFound;
                }
                self.lose_instances_of(*node, reason, at, false);
                applied(self)
            }
            Command::Kv(_)
            | Command::SetFormat { .. }
            | Command::RegisterIdentity { .. }
            | Command::RevokeNode { .. } => reject(RejectKind::Invalid, "not a workload command"),
        }
    }

    fn put_tenant(
        &mut self,
        name: &str,
        spec: &super::objects::TenantSpec,
        prev: Option<u64>,
        at: Millis,
    ) -> ApplyOutcome {
        if let Err(e) = check_tenant_name(name).and_then(|_| spec.validate()) {
            return reject(RejectKind::Invalid, e.0);
        }
        let existing = self.tenants.get(name).cloned();
        if let Some(p) = prev {
            let current = existing.as_ref().map(|t| t.meta.mod_revision);
            if current.unwrap_or(0) != p {
                return ApplyOutcome::Conflict { current_revision: current };
            }
        }
        let tenant = match existing {
            Some(t) if t.quota == spec.quota => return applied(self),
            Some(t) => Tenant { quota: spec.quota, ..t },
            None => Tenant {
                name: name.to_string(),
                quota: spec.quota,
                tokens: Vec::new(),
                vni: None,
                meta: Meta::default(),
            },
        };
        self.write_tenant(tenant, at);
        applied(self)
    }

    fn delete_tenant(&mut self, name: &str) -> ApplyOutcome {
        let Some(t) = self.tenants.get(name).cloned() else { return ApplyOutcome::NotFound };
        let deployments = self.deployments.keys().filter(|(tn, _)| tn == name).count();
        if deployments > 0 {
            return reject(
                RejectKind::Conflict,
                format!("tenant {name:?} has {deployments} deployments: delete them first"),
            );
        }
        let instances = self.instances.keys().filter(|(tn, _)| tn == name).count();
        if instances > 0 {
            return reject(RejectKind::Conflict, format!("tenant {name:?} still has {instances} instances stopping"));
        }
        for tok in &t.tokens {
            self.index.tokens.remove(&tok.sha256);
        }
        self.tenants.remove(name);
        self.emit_delete(format!("{TENANTS_PREFIX}{name}"));
        applied(self)
    }

    fn put_deployment(
        &mut self,
        tenant: &str,
        name: &str,
        spec: &DeploymentSpec,
        prev: Option<u64>,
        at: Millis,
    ) -> ApplyOutcome {
        if let Err(e) =
            check_tenant_name(tenant).and_then(|_| check_deployment_name(name)).and_then(|_| spec.validate())
        {
            return reject(RejectKind::Invalid, e.0);
        }
        if !self.tenants.contains_key(tenant) {
            return reject(RejectKind::NotFound, format!("tenant {tenant:?} does not exist"));
        }
        for d in spec.template.images() {
            if !self.images.contains_key(d) {
                return reject(
                    RejectKind::Unprocessable,
                    format!("image {d} is unknown: push it first (POST /v1/images)"),
                );
            }
        }
        let need = spec.template.resources();
        if !self.nodes.values().any(|n| n.capacity.vcpus >= need.vcpus && n.capacity.mem_mib >= need.mem_mib) {
            let largest = self.nodes.values().map(|n| (n.capacity.mem_mib, n.capacity.vcpus)).max().unwrap_or((0, 0));
            return reject(
                RejectKind::Unprocessable,
                format!(
                    "no node could ever fit it: it asks for {} vCPUs and {} MiB; the largest node has {} vCPUs and {} MiB",
                    need.vcpus, need.mem_mib, largest.1, largest.0
                ),
            );
        }
        let key = (tenant.to_string(), name.to_string());
        let existing = self.deployments.get(&key).cloned();
        if let Some(p) = prev {
            let current = existing.as_ref().map(|d| d.meta.mod_revision);
            if current.unwrap_or(0) != p {
                return ApplyOutcome::Conflict { current_revision: current };
            }
        }
        if existing.as_ref().is_some_and(|d| d.deleting) {
            return reject(RejectKind::Conflict, format!("deployment {name:?} is being deleted"));
        }
        // A node port is the cluster's: one deployment at a time.
        for p in &spec.ports {
            let taken = self.deployments.iter().find(|(k, d)| {
                **k != key && d.spec.ports.iter().any(|q| (q.node_port, q.protocol) == (p.node_port, p.protocol))
            });
            if let Some(((t, n), _)) = taken {
                return reject(RejectKind::Conflict, format!("node_port {} is published by {t}/{n}", p.node_port));
            }
        }
        // Steady-state quota: this deployment's replicas plus what the tenant's others hold.
        let mut others = self.index.tenant_usage.get(tenant).copied().unwrap_or_default();
        for id in self.index.deployment_instances.get(&key).into_iter().flatten() {
            if let Some(i) = self.instances.get(&(tenant.to_string(), id.clone())) {
                if i.is_active() {
                    others.sub(i.template.resources());
                }
            }
        }
        if let Some(t) = self.tenants.get(tenant) {
            if let Some(why) = t.quota.exceeded_by(others, u64::from(spec.replicas), need) {
                return reject(RejectKind::Unprocessable, why);
            }
        }
        let dep = match existing {
            Some(d) if &d.spec == spec => return applied(self),
            Some(d) => {
                let generation = if d.spec.template != spec.template { d.generation + 1 } else { d.generation };
                Deployment { spec: spec.clone(), generation, ..d }
            }
            None => Deployment {
                tenant: tenant.to_string(),
                name: name.to_string(),
                spec: spec.clone(),
                generation: 1,
                deleting: false,
                status: DeploymentStatus::default(),
                meta: Meta::default(),
            },
        };
        self.write_deployment(dep, at);
        applied(self)
    }

    fn apply_schedule(&mut self, s: &Schedule, at: Millis) -> ApplyOutcome {
        if s.term < self.max_term {
            return reject(
                RejectKind::Stale,
                format!(
                    "decided in term {} by a leader since deposed; the cluster is in term {}",
                    s.term, self.max_term
                ),
            );
        }
        for a in &s.assignments {
            let key = (a.tenant.clone(), a.id.clone());
            let Some(inst) = self.instances.get(&key).cloned() else { continue };
            if inst.node.is_some()
                || inst.desired != Desired::Running
                || inst.state != InstanceState::Pending
                || inst.meta.mod_revision > s.revision
            {
                continue;
            }
            let Some(node) = self.nodes.get(&a.node) else { continue };
            let Some(dep) = self.deployments.get(&(inst.tenant.clone(), inst.deployment.clone())) else { continue };
            let p = &dep.spec.placement;
            let labels = node.effective_labels();
            let labels_match = p.node_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
                && p.constraints.iter().all(|c| c.holds(&labels));
            let used = self.index.node_allocated.get(&a.node).copied().unwrap_or_default();
            if node.cordoned
                || !labels_match
                || tolerated(&node.taints, &p.tolerations).is_err()
                || !node.capacity.fits(used, inst.template.resources())
            {
                continue;
            }
            let mut placed = Instance {
                node: Some(a.node),
                nominated_node: None,
                scheduled_at: Some(at),
                reason: String::new(),
                ..inst.clone()
            };
            if let Err(why) = self.wire(&mut placed, a.node, at) {
                let why = format!("cannot be given an address on node {:016x}: {why}", a.node);
                if inst.reason != why {
                    self.write_instance(Instance { reason: why, ..inst }, at);
                }
                continue;
            }
            self.write_instance(placed, at);
        }
        for p in &s.preemptions {
            self.apply_preemption(p, at);
        }
        for p in &s.pending {
            let key = (p.tenant.clone(), p.id.clone());
            let Some(inst) = self.instances.get(&key).cloned() else { continue };
            if inst.node.is_none() && inst.state == InstanceState::Pending && inst.reason != p.reason {
                self.write_instance(Instance { reason: p.reason.clone(), ..inst }, at);
            }
        }
        applied(self)
    }

    fn apply_report(&mut self, r: &InstanceReport, at: Millis) -> ApplyOutcome {
        let key = (r.tenant.clone(), r.id.clone());
        let Some(inst) = self.instances.get(&key).cloned() else { return ApplyOutcome::NotFound };
        if inst.node != Some(r.node) {
            return reject(RejectKind::Conflict, format!("instance {} is not assigned to node {:016x}", r.id, r.node));
        }
        if inst.state == InstanceState::Lost {
            return reject(RejectKind::Conflict, format!("instance {} was declared lost", r.id));
        }
        if r.state == InstanceState::Lost {
            return reject(RejectKind::Invalid, "a node cannot report its own instance lost");
        }
        let new = Instance {
            state: r.state,
            restarts: r.restarts,
            last_exit_code: r.last_exit_code,
            reason: r.reason.clone(),
            started_at: r.started_at.or(inst.started_at),
            finished_at: r.finished_at.or(inst.finished_at),
            ..inst.clone()
        };
        if new != inst {
            self.write_instance(new, at);
        }
        applied(self)
    }

    /// Stops a lower-priority instance so a pending one gets its room, within the victim's
    /// disruption budget; the pending one is nominated to that node until the room is free.
    fn apply_preemption(&mut self, p: &Preemption, at: Millis) {
        let (vkey, pkey) = ((p.tenant.clone(), p.id.clone()), (p.for_tenant.clone(), p.for_id.clone()));
        let (Some(victim), Some(pre)) = (self.instances.get(&vkey).cloned(), self.instances.get(&pkey).cloned()) else {
            return;
        };
        let valid = victim.node == Some(p.node)
            && victim.desired == Desired::Running
            && victim.is_active()
            && victim.priority < pre.priority
            && pre.node.is_none()
            && pre.desired == Desired::Running
            && self.budget_allows_preemption(&(victim.tenant.clone(), victim.deployment.clone()));
        if !valid {
            return;
        }
        let reason =
            format!("preempted by {}/{} (priority {} over {})", pre.tenant, pre.id, pre.priority, victim.priority);
        self.write_instance(Instance { desired: Desired::Stopped, reason, ..victim }, at);
        if pre.nominated_node != Some(p.node) {
            let why = format!("waiting on node {:016x} for lower-priority instances to stop", p.node);
            self.write_instance(Instance { nominated_node: Some(p.node), reason: why, ..pre }, at);
        }
    }

    /// Instances of a deployment that are not running now (of the replicas it wants).
    pub fn unavailable(&self, key: &InstanceKey) -> usize {
        let Some(dep) = self.deployments.get(key) else { return 0 };
        let running = self
            .index
            .deployment_instances
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|id| self.instances.get(&(key.0.clone(), id.clone())))
            .filter(|i| i.desired == Desired::Running && i.state == InstanceState::Running)
            .count();
        (dep.spec.replicas as usize).saturating_sub(running)
    }

    /// Whether `more` instances of the deployment may go down now (a drain's budget defaults
    /// to one at a time).
    pub fn budget_allows(&self, key: &InstanceKey, more: usize) -> bool {
        let Some(dep) = self.deployments.get(key) else { return true };
        let budget = dep.spec.placement.disruption_budget.map(|b| b.max_unavailable).unwrap_or(1) as usize;
        self.unavailable(key) + more <= budget
    }

    /// A preemption is limited only by a budget the deployment set.
    fn budget_allows_preemption(&self, key: &InstanceKey) -> bool {
        let Some(dep) = self.deployments.get(key) else { return true };
        match dep.spec.placement.disruption_budget {
            Some(b) => self.unavailable(key) < b.max_unavailable as usize,
            None => true,
        }
    }

    /// A drained node with no active instance left is done.
    fn settle_drain(&mut self, node: u64, at: Millis) {
        let Some(n) = self.nodes.get(&node).cloned() else { return };
        let Some(d) = n.drain.clone() else { return };
        let busy = self.instances_on(node).any(|i| i.is_active() || i.desired == Desired::Stopped);
        if d.finished_at.is_none() && !busy {
            self.write_node(Node { drain: Some(Drain { finished_at: Some(at), ..d }), ..n }, at);
        }
    }

    // ---- derived changes at the end of each command ------------------------------------------

    /// Runs the deployment controller for every deployment the command touched, then updates
    /// images whose references changed.
    pub(super) fn settle(&mut self, at: Millis) {
        let mut rounds = 0;
        while let Some(key) = self.dirty_deployments.pop_first() {
            self.reconcile(&key, at);
            self.dirty_deployments.remove(&key);
            rounds += 1;
            if rounds > 10_000 {
                break;
            }
        }
        let dirty = std::mem::take(&mut self.dirty_images);
        for d in dirty {
            let Some(img) = self.images.get(&d).cloned() else { continue };
            let referenced = self.index.image_refs.contains_key(&d);
            let since = if referenced { None } else { img.unreferenced_since.or(Some(at)) };
            if since != img.unreferenced_since {
                self.write_image(Image { unreferenced_since: since, ..img }, at);
            }
        }
    }

    fn instances_of(&self, key: &InstanceKey) -> Vec<Instance> {
        self.index
            .deployment_instances
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|id| self.instances.get(&(key.0.clone(), id.clone())).cloned())
            .collect()
    }

    /// Stops an instance through its node, or removes it at once when no node runs it.
    fn retire(&mut self, inst: Instance, at: Millis) {
        let key = (inst.tenant.clone(), inst.id.clone());
        let unrun = inst.node.is_none_or(|n| !self.nodes.contains_key(&n)) || inst.state == InstanceState::Lost;
        if unrun {
            self.delete_instance(&key);
        } else if inst.desired != Desired::Stopped {
            self.write_instance(Instance { desired: Desired::Stopped, ..inst }, at);
        }
    }

    /// The deployment controller for one deployment (see the module comment).
    fn reconcile(&mut self, key: &InstanceKey, at: Millis) {
        let Some(dep) = self.deployments.get(key).cloned() else { return };
        let all = self.instances_of(key);
        if dep.deleting {
            for i in all {
                self.retire(i, at);
            }
            if self.index.deployment_instances.get(key).is_none_or(|s| s.is_empty()) {
                self.deployments.remove(key);
                self.emit_delete(format!("{DEPLOYMENTS_PREFIX}{}/{}", key.0, key.1));
            }
            return;
        }
        // A priority change reaches every instance (it orders pending ones and decides preemption).
        for i in all.iter().filter(|i| i.priority != dep.spec.placement.priority) {
            self.write_instance(Instance { priority: dep.spec.placement.priority, ..i.clone() }, at);
        }
        let all = self.instances_of(key);
        let replicas = dep.spec.replicas as usize;
        let (max_unavailable, max_surge) = dep.spec.placement.rollout();
        let wanted: Vec<&Instance> = all.iter().filter(|i| i.desired == Desired::Running).collect();
        let is_new = |i: &&&Instance| i.generation == dep.generation;
        let new_active: Vec<Instance> =
            wanted.iter().filter(is_new).filter(|i| i.is_active()).map(|i| (*i).clone()).collect();
        let new_final: Vec<Instance> =
            wanted.iter().filter(is_new).filter(|i| i.is_final()).map(|i| (*i).clone()).collect();
        let old_active: Vec<Instance> =
            wanted.iter().filter(|i| !is_new(i)).filter(|i| i.is_active()).map(|i| (*i).clone()).collect();
        let old_final: Vec<Instance> =
            wanted.iter().filter(|i| !is_new(i)).filter(|i| i.is_final()).map(|i| (*i).clone()).collect();
        for i in old_final {
            self.retire(i, at);
        }
        let mut message = None;
        let have = new_active.len() + new_final.len();
        let mut created = 0;
        if have > replicas {
            let candidates: Vec<Instance> = new_final.iter().chain(new_active.iter()).cloned().collect();
            for v in self.victims(candidates, have - replicas) {
                self.retire(v, at);
            }
        } else if have < replicas {
            let missing = replicas - have;
            let room = if old_active.is_empty() {
                missing
            } else {
                (replicas + max_surge).saturating_sub(new_active.len() + old_active.len()).min(missing)
            };
            for _ in 0..room {
                let usage = self.index.tenant_usage.get(&dep.tenant).copied().unwrap_or_default();
                let quota = self.tenants.get(&dep.tenant).map(|t| t.quota).unwrap_or_default();
                if let Some(why) = quota.exceeded_by(usage, 1, dep.spec.template.resources()) {
                    message = Some(why);
                    break;
                }
                self.create_instance(&dep, at);
                created += 1;
            }
        }
        // Old instances stay until enough new ones run (no replica lost to a template change);
        // if the quota leaves no room for an extra one, one old instance makes way.
        let new_running = self
            .instances_of(key)
            .iter()
            .filter(|i| i.desired == Desired::Running && i.generation == dep.generation)
            .filter(|i| i.state == InstanceState::Running || i.is_final())
            .count();
        let mut keep_old = replicas.saturating_sub(new_running).saturating_sub(max_unavailable);
        if message.is_some() && created == 0 && have < replicas && keep_old > 0 && keep_old >= old_active.len() {
            keep_old = old_active.len().saturating_sub(1);
        }
        if old_active.len() > keep_old {
            for v in self.victims(old_active.clone(), old_active.len() - keep_old) {
                self.retire(v, at);
            }
        }
        self.update_status(key, message, at);
    }

    /// The `n` instances to stop first: those doing the least (not running yet, finished),
    /// then from the node holding most of the deployment, then the newest.
    fn victims(&self, mut candidates: Vec<Instance>, n: usize) -> Vec<Instance> {
        let class = |i: &Instance| match (i.state, i.node) {
            _ if i.is_final() => 0,
            (InstanceState::Pending, None) => 1,
            (InstanceState::Pending, Some(_)) => 2,
            (InstanceState::Starting, _) => 3,
            (InstanceState::Failed, _) => 4,
            (InstanceState::Exited, _) => 5,
            _ => 6,
        };
        let per_node = |node: Option<u64>| candidates.iter().filter(|c| c.node.is_some() && c.node == node).count();
        let mut ranked: Vec<(usize, std::cmp::Reverse<usize>, std::cmp::Reverse<u64>, String)> = candidates
            .iter()
            .map(|i| {
                (class(i), std::cmp::Reverse(per_node(i.node)), std::cmp::Reverse(i.meta.create_revision), i.id.clone())
            })
            .collect();
        ranked.sort();
        let chosen: BTreeSet<String> = ranked.into_iter().take(n).map(|r| r.3).collect();
        candidates.retain(|c| chosen.contains(&c.id));
        candidates
    }

    fn create_instance(&mut self, dep: &Deployment, at: Millis) {
        let revision = (self.revision + 1).to_string();
        let mut attempt = 0u32;
        let id = loop {
            let suffix = hashed(&[&self.cluster_id, &dep.tenant, &dep.name, &revision, &attempt.to_string()], 5, true);
            let id = format!("{}-{suffix}", dep.name);
            if !self.instances.contains_key(&(dep.tenant.clone(), id.clone())) {
                break id;
            }
            attempt += 1;
        };
        let uid = hashed(&[&self.cluster_id, &dep.tenant, &id, &revision], 16, false);
        let inst = Instance {
            id,
            uid,
            tenant: dep.tenant.clone(),
            deployment: dep.name.clone(),
            generation: dep.generation,
            template: dep.spec.template.clone(),
            node: None,
            priority: dep.spec.placement.priority,
            nominated_node: None,
            state: InstanceState::Pending,
            desired: Desired::Running,
            restarts: 0,
            last_exit_code: None,
            reason: "waiting for the scheduler".into(),
            scheduled_at: None,
            started_at: None,
            finished_at: None,
            address: None,
            mac: None,
            meta: Meta::default(),
        };
        self.write_instance(inst, at);
    }

    fn update_status(&mut self, key: &InstanceKey, message: Option<String>, at: Millis) {
        let Some(dep) = self.deployments.get(key).cloned() else { return };
        let all = self.instances_of(key);
        let current = all.iter().filter(|i| i.desired == Desired::Running && i.generation == dep.generation);
        let status = DeploymentStatus {
            running: current.clone().filter(|i| i.state == InstanceState::Running).count() as u32,
            updated: current.filter(|i| i.state != InstanceState::Lost).count() as u32,
            pending: all
                .iter()
                .filter(|i| {
                    i.desired == Desired::Running && matches!(i.state, InstanceState::Pending | InstanceState::Starting)
                })
                .count() as u32,
            message,
        };
        if status != dep.status {
            // Status changes leave the generation and template alone: no index change.
            let mut d = Deployment { status, ..dep };
            self.stamp(&mut d, at);
            self.deployments.insert(key.clone(), d);
        }
    }

    // ---- queries ------------------------------------------------------------------------------

    /// Instances assigned to `node`, whatever their state.
    pub fn instances_on(&self, node: u64) -> impl Iterator<Item = &Instance> + '_ {
        self.index.node_instances.get(&node).into_iter().flatten().filter_map(|k| self.instances.get(k))
    }

    pub fn allocated(&self, node: u64) -> Resources {
        self.index.node_allocated.get(&node).copied().unwrap_or_default()
    }

    pub fn usage(&self, tenant: &str) -> Usage {
        self.index.tenant_usage.get(tenant).copied().unwrap_or_default()
    }

    /// The tenant a token (by its SHA-256) belongs to.
    pub fn tenant_of_token(&self, sha256: &str) -> Option<&str> {
        self.index.tokens.get(sha256).map(String::as_str)
    }

    /// Images a tenant may see: those it pushed and those its deployments and instances use.
    pub fn images_of_tenant(&self, tenant: &str) -> BTreeSet<String> {
        let mut out: BTreeSet<String> =
            self.images.values().filter(|i| i.tenants.contains(tenant)).map(|i| i.digest.clone()).collect();
        for ((t, _), d) in &self.deployments {
            if t == tenant {
                out.extend(d.spec.template.images().map(str::to_string));
            }
        }
        for ((t, _), i) in &self.instances {
            if t == tenant {
                out.extend(i.template.images().map(str::to_string));
            }
        }
        out
    }

    /// Active instances waiting for a node, oldest first.
    pub fn unassigned(&self) -> impl Iterator<Item = &Instance> + '_ {
        self.index.unassigned.iter().filter_map(|(_, _, key)| self.instances.get(key))
    }
}
