//! `make bench-scheduler`: the placement engine at fleet scale, on one core, printed as
//! `<scenario>_<name>=<value>` lines.
//!
//! The fleet: 5,000 nodes in 3 zones x 50 racks (labels zone, rack, disk ssd/hdd, gen 1-4), 5%
//! of them tainted gpu=true:no_schedule. The work: deployments of mixed shapes (1 vCPU/512 MiB
//! to 8 vCPUs/8 GiB), every one with a hard zone spread (max_skew 1) and at most 2 per rack,
//! pairs of deployments with hard anti-affinity to each other on `node`, some with constraints
//! (disk=ssd, gen>2) and a few tolerating the gpu taint. Instances are placed in rounds of
//! 10,000 and each round's decision applied to the state, as the leader does.
//!
//! Scenarios: `c1m` places 1,000,000 instances of 10,000 deployments with the default sampling;
//! `c100k_sampled` and `c100k_all` place 100,000 instances of 1,000 deployments with the default
//! sampling and with every feasible node scored, to show what sampling costs in quality. Each
//! prints placements_per_s (scheduler decisions only), decision_p99_us, state_mib (the state and
//! its indexes, from a counting allocator), hard_rule_violations (an independent checker),
//! final_zone_skew_max, node_load_stddev_pct (memory use over nodes) and pending.
#![allow(clippy::unwrap_used)] // a bench fails loudly by design

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shoal_node::scheduler::{self, check, Options};
use shoal_node::state::command::{Command, LogEntry, BINARY_FORMAT};
use shoal_node::state::objects::{
    AffinityRule, Constraint, ConstraintOp, DeploymentSpec, DomainCap, NodeSpec, Placement, Resources, SpreadRule,
    Taint, TaintEffect, Template, TenantSpec, Toleration, TolerationOp,
};
use shoal_node::state::{ApplyOutcome, NodeRecord, State};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; the counter is only
// arithmetic on an atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout is passed on as it came.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as for dealloc and alloc.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const NODES: u64 = 5000;
const ZONES: u64 = 3;
const RACKS_PER_ZONE: u64 = 50;

/// A small deterministic generator (splitmix64), so every run builds the same fleet.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Sim {
    state: State,
    now: u64,
}

impl Sim {
    fn apply(&mut self, command: Command) -> ApplyOutcome {
        self.now += 1;
        let entry = LogEntry { format: BINARY_FORMAT, origin: 1, boot: 1, seq: 1, at_ms: self.now, command };
        self.state.apply(&entry, 1).0
    }
}

fn fleet(rng: &mut Rng) -> Sim {
    let mut sim = Sim { state: State::new("bench"), now: 1_000 };
    for id in 1..=NODES {
        let zone = (id - 1) % ZONES;
        let rack = (id - 1) / ZONES % RACKS_PER_ZONE;
        let labels: BTreeMap<String, String> = [
            ("zone", format!("z{zone}")),
            ("rack", format!("z{zone}-r{rack}")),
            ("disk", if rng.below(10) < 7 { "ssd".into() } else { "hdd".into() }),
            ("gen", (1 + rng.below(4)).to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let rec = NodeRecord {
            id,
            raft_addr: format!("10.1.{}.{}:7401", id / 250, id % 250),
            api_addr: format!("10.1.{}.{}:7400", id / 250, id % 250),
            labels,
            capacity: Resources { vcpus: 512, mem_mib: 512 * 1024 },
        };
        sim.state.admit_node(&rec, sim.now);
        if rng.below(100) < 5 {
            let taint = Taint { key: "gpu".into(), value: "true".into(), effect: TaintEffect::NoSchedule };
            sim.apply(Command::SetNodeSpec {
                node: id,
                spec: NodeSpec { labels: BTreeMap::new(), taints: vec![taint] },
            });
        }
    }
    sim.apply(Command::PutTenant { name: "bench".into(), spec: TenantSpec::default(), prev_revision: None });
    let digest = format!("sha256:{}", "b".repeat(64));
    sim.apply(Command::ImageStored { digest, size: 1, node: 1, tenant: None });
    sim
}

fn deployments(sim: &mut Sim, rng: &mut Rng, count: usize, instances: u64) {
    let digest = format!("sha256:{}", "b".repeat(64));
    let shapes = [(1u32, 512u64), (2, 2048), (4, 4096), (8, 8192)];
    let mut left = instances;
    for d in 0..count {
        let replicas = if d + 1 == count {
            left
        } else {
            let avg = instances / count as u64;
            (avg / 10 + rng.below(avg * 19 / 10)).min(left)
        };
        left -= replicas;
        let pick = rng.below(100);
        let (vcpus, mem_mib) = shapes[if pick < 50 {
            0
        } else if pick < 80 {
            1
        } else if pick < 95 {
            2
        } else {
            3
        }];
        let mut template: Template = serde_json::from_str(&format!(r#"{{"kernel": "{digest}"}}"#)).unwrap();
        template.vcpus = vcpus;
        template.mem_mib = mem_mib;
        let partner = d ^ 1;
        let mut placement = Placement {
            spread: vec![SpreadRule { key: "zone".into(), max_skew: 1, hard: true, selector: None }],
            max_per_domain: vec![DomainCap { key: "rack".into(), max: 2 }],
            anti_affinity: vec![AffinityRule {
                selector: [("app".to_string(), format!("d{partner}"))].into_iter().collect(),
                key: "node".into(),
                hard: true,
                weight: 50,
                tenants: None,
            }],
            ..Placement::default()
        };
        match rng.below(10) {
            0..=2 => placement.constraints.push(Constraint {
                key: "disk".into(),
                op: ConstraintOp::In,
                values: vec!["ssd".into()],
            }),
            3 => placement.constraints.push(Constraint {
                key: "gen".into(),
                op: ConstraintOp::Gt,
                values: vec!["2".into()],
            }),
            _ => {}
        }
        if rng.below(20) == 0 {
            placement.tolerations.push(Toleration {
                key: "gpu".into(),
                operator: TolerationOp::Exists,
                value: String::new(),
                effect: None,
            });
        }
        let spec = DeploymentSpec {
            replicas: replicas as u32,
            labels: [("app".to_string(), format!("d{d}"))].into_iter().collect(),
            template,
            placement,
            egress: true,
            ports: Vec::new(),
        };
        let out = sim.apply(Command::PutDeployment {
            tenant: "bench".into(),
            name: format!("d{d}"),
            spec,
            prev_revision: None,
        });
        assert!(matches!(out, ApplyOutcome::Applied { .. }), "{out:?}");
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn scenario(name: &str, deployments_n: usize, instances: u64, sample: Option<usize>) {
    let before = LIVE.load(Ordering::Relaxed);
    let mut rng = Rng(42);
    let built = Instant::now();
    let mut sim = fleet(&mut rng);
    deployments(&mut sim, &mut rng, deployments_n, instances);
    eprintln!(
        "{name}: state built ({} instances) in {:.1} s",
        sim.state.instances.len(),
        built.elapsed().as_secs_f64()
    );
    let alive: BTreeSet<u64> = sim.state.nodes.keys().copied().collect();
    let options = Options { max_per_round: 10_000, sample, ..Options::default() };
    let mut decisions: Vec<Duration> = Vec::new();
    let mut scheduling = Duration::ZERO;
    let mut applying = Duration::ZERO;
    let mut placed = 0usize;
    loop {
        let t0 = Instant::now();
        let (schedule, timings) = scheduler::schedule_timed(&sim.state, &alive, 1, &options);
        scheduling += t0.elapsed();
        decisions.extend(timings);
        let n = schedule.assignments.len();
        if n == 0 && schedule.pending.is_empty() {
            break;
        }
        placed += n;
        let t1 = Instant::now();
        sim.apply(Command::Schedule(schedule));
        applying += t1.elapsed();
        if n == 0 {
            break;
        }
    }
    let state_bytes = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    let violations = check::violations(&sim.state, &alive);
    for v in violations.iter().take(5) {
        eprintln!("{name}: violation: {v}");
    }
    // How even the zones ended up, and how evenly memory is used over nodes.
    let mut skew_max = 0u64;
    for key in sim.state.deployments.keys() {
        let mut per_zone: BTreeMap<String, u64> = (0..ZONES).map(|z| (format!("z{z}"), 0)).collect();
        for (node, n) in sim.state.index.deployment_nodes.get(key).into_iter().flatten() {
            let zone = sim.state.nodes[node].labels["zone"].clone();
            *per_zone.entry(zone).or_default() += u64::from(*n);
        }
        let (lo, hi) = (per_zone.values().min().copied().unwrap_or(0), per_zone.values().max().copied().unwrap_or(0));
        skew_max = skew_max.max(hi - lo);
    }
    let loads: Vec<f64> = sim
        .state
        .nodes
        .values()
        .map(|n| sim.state.allocated(n.id).mem_mib as f64 / n.capacity.mem_mib as f64 * 100.0)
        .collect();
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    let stddev = (loads.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / loads.len() as f64).sqrt();
    let pending = sim.state.unassigned().count();
    println!("{name}_nodes={NODES}");
    println!("{name}_deployments={deployments_n}");
    println!("{name}_instances={instances}");
    println!(
        "{name}_sample={}",
        match sample {
            Some(usize::MAX) => "all".to_string(),
            Some(n) => n.to_string(),
            None => "default".into(),
        }
    );
    println!("{name}_placed={placed}");
    println!("{name}_pending={pending}");
    println!("{name}_placements_per_s={:.0}", decisions.len() as f64 / scheduling.as_secs_f64());
    println!("{name}_decision_p50_us={:.1}", percentile(&mut decisions, 0.5).as_secs_f64() * 1e6);
    println!("{name}_decision_p99_us={:.1}", percentile(&mut decisions, 0.99).as_secs_f64() * 1e6);
    println!("{name}_apply_per_s={:.0}", placed as f64 / applying.as_secs_f64());
    println!("{name}_state_mib={:.0}", state_bytes as f64 / (1 << 20) as f64);
    println!("{name}_hard_rule_violations={}", violations.len());
    println!("{name}_final_zone_skew_max={skew_max}");
    println!("{name}_node_mem_load_mean_pct={mean:.1}");
    println!("{name}_node_mem_load_stddev_pct={stddev:.2}");
}

fn main() {
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let run = |n: &str| only.as_deref().is_none_or(|o| n.contains(o));
    if run("c100k_sampled") {
        scenario("c100k_sampled", 1_000, 100_000, None);
    }
    if run("c100k_all") {
        scenario("c100k_all", 1_000, 100_000, Some(usize::MAX));
    }
    if run("c1m") {
        scenario("c1m", 10_000, 1_000_000, None);
    }
}
