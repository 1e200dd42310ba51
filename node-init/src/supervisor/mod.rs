//! The node supervisor: runs on every node and makes what runs here match what the replicated
//! state assigns here, level-triggered (every pass compares the two afresh, so it converges from
//! any state: after its own restart, after a crash, after the node was cut off).
//!
//! One worker per instance (Kubernetes' pod workers): it fetches the images, lays out the
//! instance directory, starts `shoal-vmm` jailed through a detached shim (so the microVM
//! outlives the agent), configures and boots it through its API socket, watches it, applies the
//! restart policy with back-off, stops it (Ctrl+Alt+Del through the VMM API, then kill after
//! the template's timeout) and reports each change of state through Raft (changes only).
//!
//! When the agent starts it first waits until its state has caught up with the cluster, then
//! stops every local microVM it no longer owns (lost while it was away, or deleted) before it
//! starts anything, so no duplicate keeps running past that point. MicroVMs it still owns are
//! re-adopted as they run: their processes are found through the pid files and API sockets of
//! their directories.
//!
//! It must not touch another node's instances or write anything but its own reports.

pub mod layout;
pub mod network;
pub mod restart;
pub mod shim;
pub mod vmm_api;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::local::{LocalNode, Metrics};
use crate::state::command::{Command, InstanceReport};
use crate::state::objects::{Desired, Instance, InstanceState};
use crate::state::time::now_ms;
use crate::state::ApplyOutcome;
use layout::{InstanceDir, Meta};

/// How often every worker looks at its microVM (and the supervisor at the state).
const PASS: Duration = Duration::from_millis(500);
/// How long a booting VMM may take to open its API socket.
const SOCKET_WAIT: Duration = Duration::from_secs(10);
/// After SIGTERM, how long before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// The first uid (and gid) of the jails; each instance on the node gets its own.
pub const JAIL_UID_BASE: u32 = 10_000_000;
const JAIL_UIDS: u32 = 1 << 20;
/// Memory a VMM takes beyond its guest's (its own code, device buffers): added to the cgroup limit.
const VMM_OVERHEAD_MIB: u64 = 64;

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The shoal-vmm binary.
    pub vmm: PathBuf,
    /// This program (it runs the shim).
    pub shim_exe: PathBuf,
    /// Whether it wires its microVMs' networks (`--no-instance-network` says no).
    pub network: bool,
}

/// What the supervisor wants of one local instance.
#[derive(Debug, Clone, PartialEq)]
enum Want {
    /// Keep it running as the state describes it.
    Run(Box<Instance>),
    /// Stop it and remove it; with the instance when the state still lists it here (the node
    /// then reports it stopped).
    Stop(Option<Box<Instance>>),
}

struct Ctx {
    node: Arc<LocalNode>,
    cfg: SupervisorConfig,
    /// Jail uids taken by this node's instances.
    uids: Mutex<BTreeSet<u32>>,
    /// The last report sent per instance, and when: the state may not show it yet.
    sent: Mutex<HashMap<String, (InstanceReport, tokio::time::Instant)>>,
    /// One fetch at a time per image: instances starting together share it.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The host's microVM networking (one reconcile at a time).
    net: tokio::sync::Mutex<network::NetState>,
}

/// A report the state does not reflect yet is sent again after this long.
const REPORT_RETRY: Duration = Duration::from_secs(3);

/// Runs the supervisor until the process ends.
pub async fn run(node: Arc<LocalNode>, cfg: SupervisorConfig) {
    if let Err(e) = std::fs::create_dir_all(&node.instances_dir) {
        warn!(error = %e, dir = %node.instances_dir.display(), "cannot create the instances directory; no microVMs will run");
        return;
    }
    let ctx = Arc::new(Ctx {
        node,
        cfg,
        uids: Mutex::new(BTreeSet::new()),
        sent: Mutex::new(HashMap::new()),
        fetching: Mutex::new(HashMap::new()),
        net: tokio::sync::Mutex::new(network::NetState::default()),
    });
    catch_up(&ctx).await;
    remove_unstarted(&ctx.node.instances_dir);
    let local = scan(&ctx.node.instances_dir);
    ctx.uids.lock().unwrap_or_else(|e| e.into_inner()).extend(local.values().map(|m| m.jail_uid));
    // Before anything starts: stop what this node no longer owns.
    let first = wants(&ctx, &local);
    let mut stops = Vec::new();
    for (uid, want) in &first {
        if let Want::Stop(inst) = want {
            info!(uid, "stopping a microVM this node no longer owns");
            stops.push(tokio::spawn(stop_instance(
                ctx.clone(),
                InstanceDir::new(&ctx.node.instances_dir, uid),
                inst.clone(),
            )));
        }
    }
    for s in stops {
        let _ = s.await;
    }
    let adopted = local
        .keys()
        .filter(|uid| matches!(first.get(*uid), Some(Want::Run(_))))
        .filter(|uid| InstanceDir::new(&ctx.node.instances_dir, uid).vmm().is_some_and(|p| p.is_alive()))
        .count();
    if adopted > 0 {
        info!(adopted, "re-adopting the microVMs that kept running");
        ctx.node.metrics.instance_adoptions.fetch_add(adopted as u64, std::sync::atomic::Ordering::Relaxed);
    }
    let mut workers: HashMap<String, (watch::Sender<Want>, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut events = ctx.node.agent.shared.events.subscribe();
    let mut gc_at = tokio::time::Instant::now();
    let mut record_at = tokio::time::Instant::now() - Duration::from_secs(60);
    loop {
        let local = scan(&ctx.node.instances_dir);
        for (uid, want) in wants(&ctx, &local) {
            match workers.get(&uid) {
                Some((tx, handle)) if !handle.is_finished() => {
                    if *tx.borrow() != want {
                        let _ = tx.send(want);
                    }
                }
                _ => {
                    let (tx, rx) = watch::channel(want);
                    let dir = InstanceDir::new(&ctx.node.instances_dir, &uid);
                    let handle = tokio::spawn(worker(ctx.clone(), dir, rx));
                    workers.insert(uid, (tx, handle));
                }
            }
        }
        workers.retain(|_, (_, h)| !h.is_finished());
        // Wires what was placed here and unwires what stopped (a failure is said once and
        // retried next pass; an instance that needs it fails its start with the reason).
        let _ = network::sync(&ctx).await;
        if record_at.elapsed() > Duration::from_secs(5) {
            refresh_record(&ctx).await;
            record_at = tokio::time::Instant::now();
        }
        let running = running_vms(&ctx.node.instances_dir);
        ctx.node.metrics.instances_running.store(running as u64, std::sync::atomic::Ordering::Relaxed);
        if gc_at.elapsed() > Duration::from_secs(30) {
            gc_images(&ctx);
            gc_at = tokio::time::Instant::now();
        }
        tokio::select! {
            _ = tokio::time::sleep(PASS) => {}
            r = events.recv() => {
                if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    return;
                }
            }
        }
    }
}

/// How many microVMs run on this node (live VMM processes of its instance directories).
pub fn running_vms(dir: &Path) -> usize {
    scan(dir).keys().filter(|uid| InstanceDir::new(dir, uid).vmm().is_some_and(|p| p.is_alive())).count()
}

/// The node is shutting down (PID 1 asks with SIGUSR1; Kubernetes' graceful node shutdown):
/// gossip says so, so the leader declares this node's instances lost at once and starts their
/// replacements on other nodes, and places nothing new here; a leader hands leadership to
/// another voter; the supervisor stops the microVMs (Ctrl+Alt+Del, then kill after their
/// timeout) as their instances stop being this node's. Returns once nothing runs here and
/// another node leads (or there is no other voter), or after `limit`, saying what was left.
pub async fn hand_over(node: &LocalNode, limit: Duration) {
    node.agent.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    let me = node.id();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let status = node.agent.shared.status();
        let assigned = node
            .agent
            .shared
            .state()
            .instances_on(me)
            .filter(|i| i.state != InstanceState::Lost && i.is_active() && i.desired == Desired::Running)
            .count();
        let running = running_vms(&node.instances_dir);
        // A directory goes once its microVM is stopped; one still starting has no VMM yet.
        let left = scan(&node.instances_dir).len();
        let others = status.voters.iter().any(|v| *v != me);
        let leading = status.role == "leader" && others;
        if assigned == 0 && running == 0 && left == 0 && !leading {
            info!("shutting down: this node runs no microVM and does not lead");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(assigned, running, left, leading, "shutting down before everything was handed over");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until this node is a member and its state is as current as the cluster's (a
/// linearizable read succeeds): deciding what it owns on an old state could stop or start the
/// wrong microVMs.
async fn catch_up(ctx: &Ctx) {
    let mut said = false;
    loop {
        let member = {
            let st = ctx.node.agent.shared.status();
            st.voters.contains(&ctx.node.id()) || st.learners.contains(&ctx.node.id())
        };
        if member && ctx.node.read_barrier().await.is_ok() {
            return;
        }
        if !said {
            info!("supervisor waiting for the cluster before it touches any microVM");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Removes directories without metadata: a start never got that far, nothing runs there.
/// (Only before any worker exists: a worker creates its directory just before its metadata.)
fn remove_unstarted(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.filter_map(|e| e.ok()) {
        let Ok(uid) = e.file_name().into_string() else { continue };
        let inst = InstanceDir::new(dir, &uid);
        if inst.read_meta().is_none() {
            let _ = inst.remove();
        }
    }
}

/// The local instance directories and their metadata.
fn scan(dir: &Path) -> BTreeMap<String, Meta> {
    let Ok(rd) = std::fs::read_dir(dir) else { return BTreeMap::new() };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let uid = e.file_name().into_string().ok()?;
            let meta = InstanceDir::new(dir, &uid).read_meta();
            Some((uid, meta))
        })
        .filter_map(|(uid, meta)| meta.map(|m| (uid, m)))
        .collect()
}

/// What should happen to every instance the state assigns here and every local directory.
fn wants(ctx: &Ctx, local: &BTreeMap<String, Meta>) -> BTreeMap<String, Want> {
    let me = ctx.node.id();
    let state = ctx.node.agent.shared.state();
    let mut out = BTreeMap::new();
    for inst in state.instances_on(me) {
        let run = inst.desired == Desired::Running && inst.state != InstanceState::Lost;
        let want = if run { Want::Run(Box::new(inst.clone())) } else { Want::Stop(Some(Box::new(inst.clone()))) };
        out.insert(inst.uid.clone(), want);
    }
    for uid in local.keys() {
        out.entry(uid.clone()).or_insert(Want::Stop(None));
    }
    out
}

async fn worker(ctx: Arc<Ctx>, dir: InstanceDir, mut want: watch::Receiver<Want>) {
    loop {
        let current = want.borrow_and_update().clone();
        match current {
            Want::Stop(inst) => {
                stop_instance(ctx.clone(), dir, inst).await;
                return;
            }
            Want::Run(inst) => {
                if let Err(e) = step(&ctx, &dir, &inst).await {
                    warn!(instance = %inst.id, error = %format!("{e:#}"), "supervisor step failed");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(PASS) => {}
            r = want.changed() => if r.is_err() { return },
        }
    }
}

/// One look at a microVM that should run: notice how it ended, start it when its back-off
/// allows, report what changed.
async fn step(ctx: &Ctx, dir: &InstanceDir, inst: &Instance) -> anyhow::Result<()> {
    let mut meta = match dir.read_meta() {
        Some(m) if m.uid == inst.uid => m,
        _ => new_meta(ctx, dir, inst)?,
    };
    let vmm = dir.vmm();
    let alive = vmm.is_some_and(|p| p.is_alive());
    let mut state = if alive && meta.started_at.is_some() && meta.next_start_at.is_none() {
        InstanceState::Running
    } else {
        InstanceState::Starting
    };
    if let Some(exit) = dir.exit() {
        let why =
            dir.last_vmm_message().filter(|_| exit.code != 0).unwrap_or_else(|| restart::describe_exit(exit.code));
        state = restart::on_exit(&mut meta, inst.template.restart, Some(exit.code), &why, exit.at);
        if exit.code != 0 {
            Metrics::inc(&ctx.node.metrics.instance_failures);
        }
        info!(instance = %inst.id, code = exit.code, reason = %meta.reason, "microVM ended");
        dir.clear_run();
        dir.write_meta(&meta)?;
    } else if alive && meta.started_at.is_none() {
        // A VMM that was never booted (the agent stopped half-way through a start): start over.
        kill(dir).await;
        return Ok(());
    } else if !alive && vmm.is_some() {
        // Its processes are gone without a word: the node went down under it.
        let vanished = "the microVM's processes were gone (the node restarted)";
        state = restart::on_exit(&mut meta, inst.template.restart, None, vanished, now_ms());
        dir.clear_run();
        dir.write_meta(&meta)?;
    } else if !alive && dir.shim().is_some_and(|p| p.is_alive()) {
        // The shim is still starting shoal-vmm.
    } else if !alive {
        if meta.done || meta.next_start_at.is_some_and(|t| now_ms() < t) {
            // Ended for good, or waiting out its back-off.
            state = if meta.last_exit_code == Some(0) { InstanceState::Exited } else { InstanceState::Failed };
        } else {
            report(ctx, inst, &meta, InstanceState::Starting).await;
            state = start(ctx, dir, inst, &mut meta).await;
            dir.write_meta(&meta)?;
        }
    }
    report(ctx, inst, &meta, state).await;
    Ok(())
}

fn new_meta(ctx: &Ctx, dir: &InstanceDir, inst: &Instance) -> anyhow::Result<Meta> {
    let jail_uid = {
        let mut taken = ctx.uids.lock().unwrap_or_else(|e| e.into_inner());
        let uid = (JAIL_UID_BASE..JAIL_UID_BASE + JAIL_UIDS)
            .find(|u| !taken.contains(u))
            .ok_or_else(|| anyhow::anyhow!("no jail uid left"))?;
        taken.insert(uid);
        uid
    };
    std::fs::create_dir_all(&dir.path)?;
    let meta = Meta {
        tenant: inst.tenant.clone(),
        id: inst.id.clone(),
        uid: inst.uid.clone(),
        jail_uid,
        restarts: inst.restarts,
        consecutive_failures: 0,
        last_exit_code: inst.last_exit_code,
        started_at: None,
        finished_at: None,
        next_start_at: None,
        reason: String::new(),
        done: false,
    };
    dir.write_meta(&meta)?;
    Ok(meta)
}

/// Tells the cluster what this node sees, when that differs from what the state says.
async fn report(ctx: &Ctx, inst: &Instance, meta: &Meta, state: InstanceState) {
    let r = InstanceReport {
        node: ctx.node.id(),
        tenant: inst.tenant.clone(),
        id: inst.id.clone(),
        state,
        restarts: meta.restarts,
        last_exit_code: meta.last_exit_code,
        reason: meta.reason.clone(),
        started_at: meta.started_at,
        finished_at: meta.finished_at,
    };
    let same = inst.state == r.state
        && inst.restarts == r.restarts
        && inst.last_exit_code == r.last_exit_code
        && inst.reason == r.reason
        && (r.started_at.is_none() || inst.started_at == r.started_at)
        && (r.finished_at.is_none() || inst.finished_at == r.finished_at);
    if same {
        return;
    }
    {
        let mut sent = ctx.sent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((last, at)) = sent.get(&inst.uid) {
            if *last == r && at.elapsed() < REPORT_RETRY {
                return;
            }
        }
        sent.insert(inst.uid.clone(), (r.clone(), tokio::time::Instant::now()));
    }
    match ctx.node.propose(Command::InstanceReport(r)).await {
        Ok(ApplyOutcome::Applied { .. }) => {}
        // Retried on the next pass (the state decides again whether it is needed).
        other => tracing::debug!(instance = %inst.id, outcome = ?other, "instance report not applied"),
    }
}

/// Starts the microVM; returns the state it is in afterwards (meta records why if it failed).
async fn start(ctx: &Ctx, dir: &InstanceDir, inst: &Instance, meta: &mut Meta) -> InstanceState {
    let failed = |meta: &mut Meta, why: String| {
        Metrics::inc(&ctx.node.metrics.instance_failures);
        warn!(instance = %inst.id, reason = %why, "microVM did not start");
        restart::on_exit(meta, inst.template.restart, None, &why, now_ms())
    };
    for digest in inst.template.images() {
        if let Err(e) = ensure_image(ctx, digest).await {
            return failed(meta, format!("cannot fetch image {digest}: {e:#}"));
        }
    }
    if let Err(e) = prepare_root(ctx, dir, inst, meta.jail_uid) {
        return failed(meta, format!("cannot prepare the instance directory: {e:#}"));
    }
    dir.clear_run();
    if meta.started_at.is_some() || meta.finished_at.is_some() {
        meta.restarts = meta.restarts.saturating_add(1);
        Metrics::inc(&ctx.node.metrics.instance_restarts);
    }
    meta.started_at = None;
    meta.next_start_at = None;
    meta.done = false;
    let iface = match inst.address {
        None => None,
        // (an address given before this node said it has no networking: not wired)
        Some(_) if !ctx.cfg.network => None,
        Some(ip) => match network::sync(ctx).await {
            Ok(Some(want)) if want.tenants.values().any(|t| t.instances.contains_key(&inst.uid)) => {
                network::iface(&want, inst)
            }
            Ok(_) => return failed(meta, format!("its network ({ip}) is not wired on this node yet")),
            Err(e) => return failed(meta, format!("cannot wire its network ({ip}): {e}")),
        },
    };
    if let Err(e) = spawn_shim(ctx, dir, inst, meta.jail_uid).await {
        return failed(meta, format!("cannot start shoal-vmm: {e:#}"));
    }
    let socket = dir.api_socket();
    let deadline = tokio::time::Instant::now() + SOCKET_WAIT;
    while !socket.exists() {
        if dir.exit().is_some() || tokio::time::Instant::now() > deadline {
            let why = dir.last_vmm_message().unwrap_or_else(|| "shoal-vmm never opened its API socket".into());
            kill(dir).await;
            dir.clear_run();
            return failed(meta, why);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Err(e) = vmm_api::boot(&socket, &inst.template, iface.as_ref()).await {
        kill(dir).await;
        dir.clear_run();
        return failed(meta, format!("shoal-vmm refused the configuration: {e}"));
    }
    meta.started_at = Some(now_ms());
    meta.reason.clear();
    Metrics::inc(&ctx.node.metrics.instance_starts);
    info!(instance = %inst.id, restarts = meta.restarts, "microVM running");
    InstanceState::Running
}

/// The jail directory: the images linked in (they are read-only blobs), the root disk copied
/// (the guest writes it), all owned so the jailed VMM can use them and nothing else.
fn prepare_root(ctx: &Ctx, dir: &InstanceDir, inst: &Instance, jail_uid: u32) -> anyhow::Result<()> {
    let root = dir.root();
    std::fs::create_dir_all(&root)?;
    chown(&root, jail_uid)?;
    let place = |digest: &str, name: &str, writable: bool| -> anyhow::Result<()> {
        let src = ctx.node.images.path(digest).ok_or_else(|| anyhow::anyhow!("bad digest {digest}"))?;
        let dest = root.join(name.trim_start_matches('/'));
        if dest.exists() && !writable {
            return Ok(());
        }
        let _ = std::fs::remove_file(&dest);
        if writable {
            // A fresh copy for every boot would lose the guest's writes: keep an existing one.
            std::fs::copy(&src, &dest)?;
            let mut perms = std::fs::metadata(&dest)?.permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
            std::fs::set_permissions(&dest, perms)?;
            chown(&dest, jail_uid)?;
        } else if std::fs::hard_link(&src, &dest).is_err() {
            std::fs::copy(&src, &dest)?;
        }
        Ok(())
    };
    place(&inst.template.kernel, vmm_api::KERNEL, false)?;
    if let Some(d) = &inst.template.initrd {
        place(d, vmm_api::INITRD, false)?;
    }
    if let Some(d) = &inst.template.rootfs {
        if !root.join(vmm_api::ROOTFS.trim_start_matches('/')).exists() {
            place(d, vmm_api::ROOTFS, true)?;
        }
    }
    Ok(())
}

fn chown(path: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
}

async fn spawn_shim(ctx: &Ctx, dir: &InstanceDir, inst: &Instance, jail_uid: u32) -> anyhow::Result<()> {
    let t = &inst.template;
    let cgroup = format!("cpus={},mem-mib={},pids=64", t.vcpus, t.mem_mib.saturating_add(VMM_OVERHEAD_MIB));
    let uid = jail_uid.to_string();
    let mut cmd = tokio::process::Command::new(&ctx.cfg.shim_exe);
    cmd.arg("shim").arg("--dir").arg(&dir.path).arg("--vmm").arg(&ctx.cfg.vmm).arg("--");
    cmd.arg("--jail").arg(dir.root()).args(["--uid", &uid, "--gid", &uid]);
    cmd.args(["--jail-id", &format!("shoal-{}", inst.uid), "--cgroup", &cgroup, "--api-sock", "/api.sock"]);
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let out = cmd.output().await?;
    if !out.status.success() {
        anyhow::bail!("the shim failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Ends shoal-vmm (the jail's outer process passes SIGTERM on as SIGKILL to the VM) and waits
/// for the shim to record it.
async fn kill(dir: &InstanceDir) {
    let Some(vmm) = dir.vmm().filter(|p| p.is_alive()) else { return };
    // SAFETY: signalling a process this node started, identified by pid and start time.
    unsafe { libc::kill(vmm.pid, libc::SIGTERM) };
    let deadline = tokio::time::Instant::now() + KILL_GRACE;
    while vmm.is_alive() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if vmm.is_alive() {
        // SAFETY: as above.
        unsafe { libc::kill(vmm.pid, libc::SIGKILL) };
    }
    // The shim writes exit.json once its pipes close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while dir.shim().is_some_and(|p| p.is_alive()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops a microVM (Ctrl+Alt+Del, then kill after its timeout), removes its directory and, if
/// the state still lists it here, reports it stopped.
async fn stop_instance(ctx: Arc<Ctx>, dir: InstanceDir, inst: Option<Box<Instance>>) {
    if let Some(vmm) = dir.vmm().filter(|p| p.is_alive()) {
        let timeout = Duration::from_secs(inst.as_ref().map_or(10, |i| u64::from(i.template.stop_timeout_s)));
        let pressed = vmm_api::ctrl_alt_del(&dir.api_socket()).await.is_ok();
        let deadline = tokio::time::Instant::now() + timeout;
        while pressed && vmm.is_alive() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        kill(&dir).await;
        Metrics::inc(&ctx.node.metrics.instance_stops);
    }
    if let Some(meta) = dir.read_meta() {
        ctx.uids.lock().unwrap_or_else(|e| e.into_inner()).remove(&meta.jail_uid);
        ctx.sent.lock().unwrap_or_else(|e| e.into_inner()).remove(&meta.uid);
    }
    if let Err(e) = dir.remove() {
        warn!(dir = %dir.path.display(), error = %e, "cannot remove an instance directory");
    }
    if let Some(inst) = inst {
        let cmd = Command::InstanceStopped { node: ctx.node.id(), tenant: inst.tenant.clone(), id: inst.id.clone() };
        match ctx.node.propose(cmd).await {
            Ok(ApplyOutcome::Applied { .. } | ApplyOutcome::NotFound) => {
                info!(instance = %inst.id, "microVM stopped and removed")
            }
            other => tracing::debug!(instance = %inst.id, outcome = ?other, "stop report not applied; retried"),
        }
    }
}

/// Keeps this node's record (labels, capacity, addresses) as its configuration says: a node
/// restarted with other labels or capacity updates it; the scheduler places by the record.
async fn refresh_record(ctx: &Ctx) {
    let want = ctx.node.agent.record();
    let differs = {
        let state = ctx.node.agent.shared.state();
        state.nodes.get(&want.id).is_some_and(|n| {
            n.labels != want.labels
                || n.capacity != want.capacity
                || n.api_addr != want.api_addr
                || n.raft_addr != want.raft_addr
        })
    };
    if differs {
        let cmd = Command::NodeUpdate {
            node: want.id,
            api_addr: want.api_addr,
            raft_addr: want.raft_addr,
            labels: want.labels,
            capacity: want.capacity,
        };
        match ctx.node.propose(cmd).await {
            Ok(ApplyOutcome::Applied { .. }) => info!("updated this node's record (labels, capacity, addresses)"),
            other => tracing::debug!(outcome = ?other, "node record update not applied; retried"),
        }
    }
}

/// Makes sure the image is here: fetched from a live peer that holds it, verified, recorded.
async fn ensure_image(ctx: &Ctx, digest: &str) -> anyhow::Result<()> {
    if ctx.node.images.has(digest) {
        return Ok(());
    }
    let lock = ctx.fetching.lock().unwrap_or_else(|e| e.into_inner()).entry(digest.to_string()).or_default().clone();
    let _one_at_a_time = lock.lock().await;
    if ctx.node.images.has(digest) {
        return Ok(()); // Another worker fetched it meanwhile.
    }
    let holders: Vec<u64> = {
        let state = ctx.node.agent.shared.state();
        state.images.get(digest).map(|i| i.nodes.iter().copied().collect()).unwrap_or_default()
    };
    let alive = ctx.node.alive_peers();
    let sources: Vec<&String> = holders.iter().filter(|n| **n != ctx.node.id()).filter_map(|n| alive.get(n)).collect();
    if sources.is_empty() {
        anyhow::bail!("no live node holds it ({} nodes did)", holders.len());
    }
    let mut last = anyhow::anyhow!("no copy came");
    let tls = ctx.node.peer_tls()?;
    for addr in sources {
        match crate::images::fetch(&ctx.node.images, addr, &ctx.node.peer_token, digest, &tls).await {
            Ok(size) => {
                Metrics::inc(&ctx.node.metrics.image_fetches);
                ctx.node.metrics.image_fetch_bytes.fetch_add(size, std::sync::atomic::Ordering::Relaxed);
                let cmd = Command::ImageStored { digest: digest.to_string(), size, node: ctx.node.id(), tenant: None };
                let _ = ctx.node.propose(cmd).await;
                info!(digest, from = %addr, size, "image fetched");
                return Ok(());
            }
            Err(e) => {
                Metrics::inc(&ctx.node.metrics.image_fetch_failures);
                warn!(digest, from = %addr, error = %format!("{e:#}"), "image fetch failed");
                last = e.into();
            }
        }
    }
    Err(last)
}

/// Removes local blobs the cluster deleted (and that no local instance uses); new blobs are
/// left alone for a while, their record may still be on its way through Raft.
fn gc_images(ctx: &Ctx) {
    let (known, used): (BTreeSet<String>, BTreeSet<String>) = {
        let state = ctx.node.agent.shared.state();
        let used = state.instances_on(ctx.node.id()).flat_map(|i| i.template.images().map(str::to_string)).collect();
        (state.images.keys().cloned().collect(), used)
    };
    for (digest, _) in ctx.node.images.list() {
        if known.contains(&digest) || used.contains(&digest) {
            continue;
        }
        let old = ctx
            .node
            .images
            .path(&digest)
            .and_then(|p| p.metadata().ok())
            .and_then(|m| m.modified().ok())
            .is_some_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600));
        if old {
            info!(digest, "removing an image the cluster no longer has");
            ctx.node.images.remove(&digest);
        }
    }
}
