//! Loss, delay, reordering and duplication over real processes (`tc netem`, which this machine's
//! kernel lacks and the emulated server's Debian kernel has): three `shoal-node`s in the
//! emulated server talk over its loopback, which netem degrades in phases — delay with jitter
//! (so reordering), loss, bursts of heavy loss, duplication — while four clients write,
//! compare-and-swap and read three keys through the nodes in turn (`shoal-kv-load history`).
//! Every key's history must be linearizable.

#[path = "../../node-init/tests/support/linearizability.rs"]
mod linearizability;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use linearizability::{Kind, Operation};
use shoal_hardware_tests::{repo_root, Job, PowerCutServer};

/// The netem phases, five seconds each (the loopback carries the API, gossip and Raft alike).
const PHASES: &[&str] = &[
    "delay 10ms 10ms reorder 25% 50%",
    "delay 5ms 5ms loss 10%",
    "delay 30ms 30ms reorder 10% duplicate 2%",
    "loss 30%",
    "delay 2ms 2ms loss 3% duplicate 5% reorder 25%",
    "delay 50ms 50ms loss 5%",
];

fn job() -> String {
    let mut script = String::from(
        r#"set -u
ip link set lo up
insmod /lib/modules/sch_netem.ko || { echo "SHOAL-H no netem"; exit 1; }
tc() { ./ld-linux-x86-64.so.2 --library-path /shoal ./tc "$@"; }
for n in 1 2 3; do
  mkdir -p /tmp/data/$n
  ./shoal-node agent --data-dir /tmp/data/$n --listen 127.0.0.$n:7400 --seed 127.0.0.1:7400 \
    --secret-file secret --min-voters 3 --raft-tick-ms 100 --dead-voter-timeout 3600 --vmm /bin/true \
    >> /tmp/data/$n.log 2>&1 &
done
i=0; while [ ! -s /tmp/data/1/tls/ca.crt ] && [ $i -lt 180 ]; do sleep 0.5; i=$((i+1)); done
load="./shoal-kv-load /tmp/data/1/tls/ca.crt /tmp/data/1/api-token https://127.0.0.1:7400,https://127.0.0.2:7400,https://127.0.0.3:7400"
$load wait 120 || { for n in 1 2 3; do tail -10 /tmp/data/$n.log; done; exit 1; }
tc qdisc add dev lo root netem delay 1ms || { echo "SHOAL-H no netem"; exit 1; }
(
"#,
    );
    for p in PHASES {
        script.push_str(&format!("  tc qdisc change dev lo root netem {p} && echo 'SHOAL-H phase {p}'; sleep 5\n"));
    }
    script.push_str(&format!(
        "  tc qdisc change dev lo root netem delay 1ms; echo 'SHOAL-H phase healed'\n) &\n$load history {} 4\n",
        PHASES.len() * 5 + 5
    ));
    script
}

/// `tc` and the shared libraries it loads, for the server's initramfs (which has none).
fn tc_files() -> Vec<(PathBuf, String)> {
    let tc = ["/usr/sbin/tc", "/sbin/tc"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("tc (iproute2) is installed by `make test`");
    let ldd = Command::new("ldd").arg(&tc).output().expect("ldd");
    let mut files = vec![(tc, "tc".to_string())];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line.split("=>").nth(1).unwrap_or(line).split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            let name = Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            files.push((PathBuf::from(path), name));
        }
    }
    files
}

fn binary(name: &str) -> PathBuf {
    let p = repo_root().join("target/x86_64-unknown-linux-gnu/release").join(name);
    assert!(p.exists(), "{} is missing: run `make test` (it builds the workspace first)", p.display());
    p
}

/// One `SHOAL-H` history line: its key and operation.
fn parse(line: &str) -> Option<(String, Operation)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let [_, client, kind, key, value, expect, invoked, completed] = f.as_slice() else { return None };
    let opt = |s: &str| (s != "-").then(|| s.to_string());
    let kind = match *kind {
        "W" => Kind::Write(value.to_string()),
        "R" => Kind::Read(opt(value)),
        "C" => Kind::Cas { expect: opt(expect), new: value.to_string(), swapped: true },
        "F" => Kind::Cas { expect: opt(expect), new: value.to_string(), swapped: false },
        _ => return None,
    };
    let completed = if *completed == "?" { None } else { Some(completed.parse::<u128>().ok()? * 1000) };
    let op = Operation { client: client.parse().ok()?, kind, invoked: invoked.parse::<u128>().ok()? * 1000, completed };
    Some((key.to_string(), op))
}

#[test]
fn histories_over_a_lossy_delaying_reordering_network_are_linearizable() {
    if Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        eprintln!("qemu-system-x86_64 is missing: `make test` installs it");
        return;
    }
    let secret = std::env::temp_dir().join(format!("shoal-netem-secret-{}", std::process::id()));
    std::fs::write(&secret, "netem-test-cluster-secret-0123456789abcdef").expect("write the cluster secret");
    let mut files = vec![
        (binary("shoal-node"), "shoal-node".to_string()),
        (binary("shoal-kv-load"), "shoal-kv-load".to_string()),
        (secret, "secret".to_string()),
    ];
    files.extend(tc_files());
    let job = Job { script: job(), files, limit: Duration::from_secs(900), interactive: false };
    let server = PowerCutServer::new(&job, 0, 0).expect("prepare the emulated server");
    let mut boot = server.boot("").expect("boot the emulated server");
    let mut history: BTreeMap<String, Vec<Operation>> = BTreeMap::new();
    let mut phases = 0;
    let mut done = false;
    while let Some(line) = boot.next_line(Duration::from_secs(240)) {
        if line.contains("SHOAL-H done") {
            done = true;
            break;
        }
        if line.contains("SHOAL-H phase") {
            phases += 1;
        } else if line.contains("SHOAL-H no netem") {
            panic!("netem is not available in the server\n{}", boot.text());
        } else if let Some((key, op)) = line.split_once("SHOAL-H ").and_then(|(_, l)| parse(&format!("H {l}"))) {
            history.entry(key).or_default().push(op);
        }
    }
    assert!(done, "the history did not finish\n{}", boot.text());
    assert_eq!(phases, PHASES.len() + 1, "not every netem phase ran\n{}", boot.text());
    let count = |f: &dyn Fn(&Operation) -> bool| history.values().flatten().filter(|o| f(o)).count();
    let writes = count(&|o| o.completed.is_some() && matches!(o.kind, Kind::Write(_)));
    let reads = count(&|o| matches!(o.kind, Kind::Read(_)));
    let swaps = count(&|o| o.completed.is_some() && matches!(o.kind, Kind::Cas { swapped: true, .. }));
    let unknown = count(&|o| o.completed.is_none());
    assert!(
        writes > 20 && reads > 20 && swaps > 5,
        "too little traffic: {writes} writes, {reads} reads, {swaps} swaps\n{}",
        boot.text()
    );
    for (key, ops) in &history {
        if let Err(e) = linearizability::check(ops) {
            let ops: Vec<String> = ops
                .iter()
                .map(|o| format!("client {} {:?} {} → {:?}", o.client, o.kind, o.invoked, o.completed))
                .collect();
            panic!("key {key}: {e}\n{}", ops.join("\n"));
        }
    }
    eprintln!(
        "linearizable under netem ({} phases): {writes} writes, {swaps} swaps, {reads} reads acknowledged, {unknown} unknown",
        PHASES.len()
    );
}
