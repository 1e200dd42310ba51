//! An independent check of a state's placements against every hard rule, for the property tests
//! and the benchmark (`hard_rule_violations=`): no node over its capacity, every placed instance
//! on a node its static rules allow, and per deployment its hard spread (own instances), its
//! max_per_domain caps and its hard affinities and anti-affinities. It recomputes everything
//! from the state, sharing no code with the engine's incremental counts.

use std::collections::{BTreeMap, BTreeSet};

use crate::state::objects::{tolerated, AffinityRule, Deployment, Instance, Node, NODE_DOMAIN};
use crate::state::State;

fn domain(node: &Node, key: &str) -> Option<String> {
    if key == NODE_DOMAIN {
        return Some(format!("{:016x}", node.id));
    }
    node.effective_labels().get(key).cloned()
}

fn matches(rule: &AffinityRule, owner: &Deployment, other: &Deployment) -> bool {
    let tenant_ok = match &rule.tenants {
        None => other.tenant == owner.tenant,
        Some(t) if t.iter().any(|x| x == "*") => true,
        Some(t) => t.contains(&other.tenant),
    };
    tenant_ok && rule.selector.iter().all(|(k, v)| other.spec.labels.get(k) == Some(v))
}

/// Every hard rule broken by the placements in `state`, with `alive` the nodes the scheduler
/// saw alive (the domains a spread rule is evened over are those of eligible nodes).
pub fn violations(state: &State, alive: &BTreeSet<u64>) -> Vec<String> {
    let mut out = Vec::new();
    for n in state.nodes.values() {
        let a = state.allocated(n.id);
        if a.vcpus > n.capacity.vcpus || a.mem_mib > n.capacity.mem_mib {
            out.push(format!("node {:016x} over capacity: {a:?} of {:?}", n.id, n.capacity));
        }
    }
    let placed: Vec<(&Instance, &Node, &Deployment)> = state
        .instances
        .values()
        .filter_map(|i| {
            let node = state.nodes.get(&i.holds_node()?)?;
            let dep = state.deployments.get(&(i.tenant.clone(), i.deployment.clone()))?;
            Some((i, node, dep))
        })
        .collect();
    for (i, n, d) in &placed {
        let p = &d.spec.placement;
        let labels = n.effective_labels();
        if !p.node_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            || !p.constraints.iter().all(|c| c.holds(&labels))
        {
            out.push(format!("{} on {:016x}: labels or constraints do not hold", i.id, n.id));
        }
        if let Err(t) = tolerated(&n.taints, &p.tolerations) {
            out.push(format!("{} on {:016x}: taint {} not tolerated", i.id, n.id, t.describe()));
        }
    }
    // Per deployment: where its instances are, by node.
    let mut by_dep: BTreeMap<(String, String), Vec<&Node>> = BTreeMap::new();
    for (i, n, _) in &placed {
        by_dep.entry((i.tenant.clone(), i.deployment.clone())).or_default().push(n);
    }
    let node_labels: Vec<(&Node, BTreeMap<String, String>)> =
        state.nodes.values().map(|n| (n, n.effective_labels())).collect();
    let mut eligible_domains: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Deployments by label, to find what a selector matches without scanning every instance.
    let mut by_label: BTreeMap<(String, String), Vec<(String, String)>> = BTreeMap::new();
    for (k, d) in &state.deployments {
        for (lk, lv) in &d.spec.labels {
            by_label.entry((lk.clone(), lv.clone())).or_default().push(k.clone());
        }
    }
    for (key, nodes) in &by_dep {
        let Some(d) = state.deployments.get(key) else { continue };
        let p = &d.spec.placement;
        for s in p.spread.iter().filter(|s| s.hard && s.selector.is_none()) {
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            let sig =
                serde_json::to_string(&(&p.node_labels, &p.constraints, &p.tolerations, &s.key)).unwrap_or_default();
            let domains = eligible_domains.entry(sig).or_insert_with(|| {
                let mut doms = BTreeSet::new();
                for (n, labels) in &node_labels {
                    let eligible = alive.contains(&n.id)
                        && !n.cordoned
                        && p.node_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
                        && p.constraints.iter().all(|c| c.holds(labels))
                        && tolerated(&n.taints, &p.tolerations).is_ok();
                    if let (true, Some(dom)) = (eligible, domain(n, &s.key)) {
                        doms.insert(dom);
                    }
                }
                doms
            });
            for dom in domains.iter() {
                counts.entry(dom.clone()).or_default();
            }
            for n in nodes {
                match domain(n, &s.key) {
                    Some(dom) => *counts.entry(dom).or_default() += 1,
                    None => out.push(format!("{}/{}: an instance on a node without {}", key.0, key.1, s.key)),
                }
            }
            let (min, max) = (counts.values().min().copied().unwrap_or(0), counts.values().max().copied().unwrap_or(0));
            if max - min > u64::from(s.max_skew) {
                out.push(format!("{}/{}: {} skew {} over max_skew {}", key.0, key.1, s.key, max - min, s.max_skew));
            }
        }
        for c in &p.max_per_domain {
            let mut counts: BTreeMap<String, u32> = BTreeMap::new();
            for n in nodes {
                match domain(n, &c.key) {
                    Some(dom) => *counts.entry(dom).or_default() += 1,
                    None => out.push(format!("{}/{}: an instance on a node without {}", key.0, key.1, c.key)),
                }
            }
            if let Some((dom, n)) = counts.iter().find(|(_, n)| **n > c.max) {
                out.push(format!("{}/{}: {n} instances in {}={dom}, over max {}", key.0, key.1, c.key, c.max));
            }
        }
        for (rule, anti) in p.affinity.iter().map(|r| (r, false)).chain(p.anti_affinity.iter().map(|r| (r, true))) {
            if !rule.hard {
                continue;
            }
            if !anti && matches(rule, d, d) {
                continue; // A group attracting itself: its first instance may go anywhere.
            }
            // Instances of the deployments the selector matches, per domain (each instance once).
            let mut others: BTreeMap<String, u64> = BTreeMap::new();
            let first = rule.selector.iter().next().map(|(k, v)| (k.clone(), v.clone()));
            let candidates = first.and_then(|f| by_label.get(&f)).cloned().unwrap_or_default();
            for other_key in candidates {
                let Some(od) = state.deployments.get(&other_key) else { continue };
                if !matches(rule, d, od) {
                    continue;
                }
                let own = other_key == *key;
                for on in by_dep.get(&other_key).into_iter().flatten() {
                    if let Some(dom) = domain(on, &rule.key) {
                        *others.entry(dom).or_default() += u64::from(!own || anti);
                    }
                }
            }
            for n in nodes {
                let Some(dom) = domain(n, &rule.key) else {
                    if !anti {
                        out.push(format!("{}/{}: affinity on {} from a node without it", key.0, key.1, rule.key));
                    }
                    continue;
                };
                let here = others.get(&dom).copied().unwrap_or(0);
                // With anti-affinity to itself, the instance itself is in `here` once.
                let self_count = u64::from(anti && matches(rule, d, d));
                if anti && here > self_count {
                    out.push(format!(
                        "{}/{}: anti-affinity to {:?} broken in {}={dom}",
                        key.0, key.1, rule.selector, rule.key
                    ));
                } else if !anti && here == 0 {
                    out.push(format!(
                        "{}/{}: affinity to {:?} broken in {}={dom}",
                        key.0, key.1, rule.selector, rule.key
                    ));
                }
            }
        }
    }
    out
}
