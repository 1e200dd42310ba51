//! Power cuts, not kill -9 (which keeps the page cache): three `shoal-node`s run in an emulated
//! server, each with its data on its own virtio-blk disk, while a client writes keys one at a
//! time and prints each acknowledgement on the console. At a random acknowledgement the server's
//! power is cut (QEMU killed: everything the server had not written to its disks is gone, the
//! three nodes' page cache at once); it boots again from the same disks, the nodes restart from
//! them, and every write acknowledged before any cut must be there. The server's kernel is told
//! to keep unsynced data in memory (no periodic writeback, ext4 commits every 5 minutes), so only
//! what the nodes synced survives a cut. The same run with `--unsafe-no-fsync` must lose
//! acknowledged writes (some keys, or the whole cluster: a node that lost its whole log
//! bootstraps anew): that shows the cuts are real and the check can fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use shoal_hardware_tests::{repo_root, Job, PowerCutServer};

/// Runs at every boot of the server. `shoal.boot=N` names the boot (its writes go under
/// `pl/N/`), `shoal.final=1` verifies and powers off, `shoal.nofsync=1` runs the nodes unsynced.
const JOB: &str = r#"set -u
cmdline=$(cat /proc/cmdline)
boot=$(echo "$cmdline" | sed -n 's/.*shoal\.boot=\([0-9]*\).*/\1/p')
extra=; case "$cmdline" in *shoal.nofsync=1*) extra=--unsafe-no-fsync;; esac
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do insmod /lib/modules/$m.ko 2>/dev/null; done
ip link set lo up
# Unsynced data stays in memory until something syncs it (or the power goes).
echo 0 > /proc/sys/vm/dirty_writeback_centisecs
echo 3600000 > /proc/sys/vm/dirty_expire_centisecs
echo 60 > /proc/sys/vm/dirty_background_ratio
echo 80 > /proc/sys/vm/dirty_ratio
n=0
for d in vda vdb vdc; do
  n=$((n+1)); mkdir -p /data/$n
  i=0; while [ ! -b /dev/$d ] && [ $i -lt 40 ]; do sleep 0.25; i=$((i+1)); done
  mount -t ext4 -o commit=300 /dev/$d /data/$n || { echo "SHOAL-PL cannot mount /dev/$d"; exit 1; }
done
echo "SHOAL-PL boot=$boot mounted"
for n in 1 2 3; do
  ./shoal-node agent --data-dir /data/$n/node --listen 127.0.0.$n:7400 --seed 127.0.0.1:7400 \
    --secret-file secret --min-voters 3 --raft-tick-ms 100 --dead-voter-timeout 3600 --vmm /bin/true $extra \
    >> /data/$n/node.log 2>&1 &
done
logs() { for n in 1 2 3; do echo "--- node $n"; tail -15 /data/$n/node.log | cut -c1-400; done; }
i=0; while [ ! -s /data/1/node/tls/ca.crt ] && [ $i -lt 180 ]; do sleep 0.5; i=$((i+1)); done
[ -s /data/1/node/tls/ca.crt ] || { echo "SHOAL-PL not-ready: node 1 has no CA"; logs; exit 1; }
load="./shoal-kv-load /data/1/node/tls/ca.crt /data/1/node/api-token https://127.0.0.1:7400,https://127.0.0.2:7400,https://127.0.0.3:7400"
$load wait 90 || { logs; exit 1; }
[ "$boot" -gt 0 ] && $load verify
case "$cmdline" in *shoal.final=1*) exit 0;; esac
$load write pl/$boot/
"#;

fn binary(name: &str) -> PathBuf {
    let p = repo_root().join("target/x86_64-unknown-linux-gnu/release").join(name);
    assert!(p.exists(), "{} is missing: run `make test` (it builds the workspace first)", p.display());
    p
}

/// Parses "0-3,5" into its numbers.
fn numbers(ranges: &str) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for part in ranges.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
            out.extend(a..=b);
        }
    }
    out
}

struct Outcome {
    acknowledged: usize,
    /// (boot, key number) acknowledged before a cut and missing after one.
    lost: BTreeSet<(u32, u64)>,
}

/// Boots the server `cuts + 1` times; in every boot but the last the power is cut after a
/// random number of acknowledged writes (at least `min_acks`).
fn run_cuts(cuts: u32, min_acks: u64, nofsync: bool, seed: u64) -> Outcome {
    let job = Job {
        script: JOB.to_string(),
        files: vec![
            (binary("shoal-node"), "shoal-node".into()),
            (binary("shoal-kv-load"), "shoal-kv-load".into()),
            (write_secret(), "secret".into()),
        ],
        limit: Duration::from_secs(1800),
        interactive: false,
    };
    let server = PowerCutServer::new(&job, 3, 256).expect("prepare the emulated server");
    let mut acked: Vec<BTreeSet<u64>> = Vec::new();
    let mut lost = BTreeSet::new();
    let mut rng = seed;
    let (mut boot, mut cuts_done, mut stalls) = (0u32, 0u32, 0u32);
    loop {
        let last = cuts_done == cuts;
        let cmdline = format!(
            "shoal.boot={boot}{}{}",
            if last { " shoal.final=1" } else { "" },
            if nofsync { " shoal.nofsync=1" } else { "" }
        );
        let mut b = server.boot(&cmdline).expect("boot the emulated server");
        let started = Instant::now();
        let mut ready = false;
        let mut verified = boot == 0;
        let mut mine = BTreeSet::new();
        let mut have: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let cut_after = min_acks + (rng >> 33) % (min_acks * 2);
        while let Some(line) = b.next_line(Duration::from_secs(300)) {
            if line.contains("SHOAL-PL ready") {
                ready = true;
            } else if let Some(rest) = line.split("SHOAL-PL have pl/").nth(1) {
                let (prefix, ranges) = rest.split_once(' ').unwrap_or((rest, ""));
                if let Ok(i) = prefix.trim_end_matches('/').parse::<u32>() {
                    have.insert(i, numbers(ranges));
                }
            } else if line.contains("SHOAL-PL verified") {
                // Every write acknowledged in any earlier boot, checked again after each cut.
                for (i, earlier) in acked.iter().enumerate() {
                    let present = have.get(&(i as u32)).cloned().unwrap_or_default();
                    lost.extend(earlier.difference(&present).map(|n| (i as u32, *n)));
                }
                verified = true;
                if last {
                    break;
                }
            } else if let Some(n) = line.split("SHOAL-PL ack ").nth(1).and_then(|n| n.trim().parse::<u64>().ok()) {
                mine.insert(n);
                if mine.len() as u64 >= cut_after {
                    break;
                }
            } else if line.contains("SHOAL-PL not-ready")
                || line.contains("SHOAL-PL unreadable")
                || line.contains("cannot mount")
            {
                // The job prints the nodes' logs next, then ends.
                while b.next_line(Duration::from_secs(10)).is_some() {}
                break;
            }
        }
        if b.stalled() && !(last && verified) && stalls < MAX_STALLS {
            // QEMU TCG now and then stalls the whole server: that is one more power cut, at a
            // moment nobody chose; what was acknowledged before it must survive it too.
            stalls += 1;
            let tail = b.lines.len().saturating_sub(5);
            eprintln!(
                "boot {boot}: the emulated server stalled after {:.0} s ({} writes acknowledged); cut there, booted again. Its last lines:\n{}",
                started.elapsed().as_secs_f64(),
                mine.len(),
                b.lines[tail..].iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join("\n")
            );
            b.cut_power();
            acked.push(mine);
            boot += 1;
            continue;
        }
        if !(ready && verified) && nofsync {
            // Unsynced, a cut may take the whole cluster: every acknowledged write is gone.
            eprintln!("boot {boot}: the unsynced cluster did not come back:\n{}", b.text());
            lost.extend(acked.iter().enumerate().flat_map(|(i, a)| a.iter().map(move |n| (i as u32, *n))));
            break;
        }
        assert!(
            ready && verified,
            "boot {boot} ({:.0} s): the cluster did not come back (ready {ready}, verified {verified})\n{}",
            started.elapsed().as_secs_f64(),
            b.text()
        );
        eprintln!(
            "boot {boot}: ready and verified after {:.0} s; {} writes acknowledged{}",
            started.elapsed().as_secs_f64(),
            mine.len(),
            if last { "" } else { "; power cut" }
        );
        if !last {
            assert!(mine.len() as u64 >= cut_after, "boot {boot}: too few acknowledged writes\n{}", b.text());
        }
        b.cut_power();
        acked.push(mine);
        if last {
            break;
        }
        cuts_done += 1;
        boot += 1;
    }
    Outcome { acknowledged: acked.iter().map(BTreeSet::len).sum(), lost }
}

/// How many stalls of the emulated server a run takes as extra power cuts before it fails.
const MAX_STALLS: u32 = 3;

fn write_secret() -> PathBuf {
    let p = std::env::temp_dir().join(format!("shoal-power-cut-secret-{}", std::process::id()));
    std::fs::write(&p, "power-cut-test-cluster-secret-0123456789abcdef").expect("write the cluster secret");
    p
}

#[test]
fn acknowledged_writes_survive_repeated_power_cuts_and_do_not_without_fsync() {
    if std::process::Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        eprintln!("qemu-system-x86_64 is missing: `make test` installs it");
        return;
    }
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1);
    eprintln!("power cuts seeded with {seed}");
    let synced = run_cuts(4, 40, false, seed);
    assert!(synced.lost.is_empty(), "acknowledged writes lost over power cuts (boot, key): {:?}", synced.lost);
    eprintln!("power cuts: 4 cuts, {} acknowledged writes, none lost", synced.acknowledged);
    // Unsynced, a cut must lose what the nodes acknowledged but only held in memory.
    let unsynced = run_cuts(1, 40, true, seed ^ 0x5555);
    assert!(!unsynced.lost.is_empty(), "with --unsafe-no-fsync a power cut lost nothing: the cut is not real");
    eprintln!(
        "without fsync, one power cut lost {} of {} acknowledged writes",
        unsynced.lost.len(),
        unsynced.acknowledged
    );
}
