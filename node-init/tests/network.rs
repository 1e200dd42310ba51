//! Instances' networks with real `shoal-node` processes in network namespaces running probe
//! guests: a deployment's instances get addresses from their nodes' subnets with no manual
//! step, each a tap owned by its jail on its tenant's bridge, the tenant's VXLAN FDB pointing
//! at the other node, the guest told its address on its command line; an agent restarted
//! under its microVMs changes nothing; what stops is unwired; the cluster network's settings
//! refuse what cannot work. Needs root (namespaces, jails) and /dev/kvm.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::{agreed_status, logs, wait_for, Net, Node};

const FORM: Duration = Duration::from_secs(40);

fn cluster(net: &mut Net, n: usize) -> Vec<Node> {
    // Both nodes wait for each other before one bootstraps (with one voter enough, each may
    // bootstrap a cluster of its own).
    let voters = n.to_string();
    let args = ["--capacity", "vcpus=4,mem-mib=1024", "--min-voters", &voters];
    let nodes: Vec<Node> = (0..n).map(|i| net.node(i, &args)).collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(FORM, "the cluster to form", || {
        let members = |s: &Value, k: &str| s[k].as_array().map_or(0, |v| v.len());
        agreed_status(&refs).filter(|s| members(s, "voters") + members(s, "learners") == n)
    });
    wait_for(FORM, "every node's record", || {
        let v = nodes[0].get_ok("/v1/nodes");
        (v["nodes"].as_array().map(|a| a.len()) == Some(n)).then_some(())
    });
    nodes
}

/// A command's JSON output (`ip -j ...`, `bridge -j ...`) in a node's namespace.
fn json_of(tool: &str, ns: &str, args: &[&str]) -> Vec<Value> {
    json_of_device(tool, ns, args).unwrap_or_else(|| panic!("{tool} {args:?} in {ns}: no such device"))
}

/// As `json_of`, `None` when the device asked about is gone (the agent may remove it between
/// two listings while it unwires).
fn json_of_device(tool: &str, ns: &str, args: &[&str]) -> Option<Vec<Value>> {
    let out = Command::new(tool).args(["-n", ns, "-j"]).args(args).output().unwrap();
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Cannot find device") {
        return None;
    }
    if !out.status.success() {
        let links = Command::new("ip").args(["-n", ns, "-d", "link"]).output().unwrap();
        panic!(
            "{tool} {args:?} in {ns}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&links.stdout)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Some(Vec::new());
    }
    Some(serde_json::from_str::<Value>(&text).unwrap().as_array().cloned().unwrap_or_default())
}

/// Every link of netstack's (taps, bridges, VXLAN devices) in the namespace, by name.
fn our_links(ns: &str) -> Vec<Value> {
    json_of("ip", ns, &["-d", "link", "show"])
        .into_iter()
        .filter(|l| ["sht", "shb", "shx"].iter().any(|p| l["ifname"].as_str().unwrap_or("").starts_with(p)))
        .collect()
}

/// What netstack wired in a namespace, as text that can be compared before and after.
fn wiring(ns: &str) -> BTreeSet<String> {
    let mut out: BTreeSet<String> =
        our_links(ns).iter().map(|l| format!("link {} master={} mtu={}", l["ifname"], l["master"], l["mtu"])).collect();
    for r in json_of("ip", ns, &["route", "show", "proto", "83"]) {
        out.insert(format!("route {} dev {}", r["dst"], r["dev"]));
    }
    for r in json_of("ip", ns, &["rule", "show"]).into_iter().filter(|r| r["priority"] == 20000) {
        out.insert(format!("rule iif {} to {}/{}", r["iif"], r["dst"], r["dstlen"]));
    }
    for l in our_links(ns).iter().filter(|l| l["ifname"].as_str().unwrap().starts_with("shx")) {
        let dev = l["ifname"].as_str().unwrap();
        // The VXLAN device's own entries (with a remote); not what the bridge learns locally.
        let fdb = json_of_device("bridge", ns, &["fdb", "show", "dev", dev]).unwrap_or_default();
        for e in fdb.into_iter().filter(|e| e["dst"].is_string()) {
            out.insert(format!("fdb {dev} {} dst {}", e["mac"], e["dst"]));
        }
    }
    out
}

fn instances(node: &Node, tenant: &str) -> Vec<Value> {
    node.get_ok(&format!("/v1/tenants/{tenant}/instances"))["instances"].as_array().unwrap().clone()
}

fn wait_running(node: &Node, tenant: &str, n: usize) -> Vec<Value> {
    wait_for(Duration::from_secs(60), &format!("{n} running instances of {tenant}"), || {
        let list = instances(node, tenant);
        (list.len() == n && list.iter().all(|i| i["state"] == "running")).then_some(list)
    })
}

/// Prints the agents' logs if the test fails while it lives.
struct LogsOnPanic(Vec<std::path::PathBuf>);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, d) in self.0.iter().enumerate() {
                let log = std::fs::read_to_string(d.join("agent.log")).unwrap_or_default();
                eprintln!("--- node {i}:\n{log}");
            }
        }
    }
}

fn tap_name(uid: &str) -> String {
    format!("sht{}", &uid[..12])
}

#[test]
fn instances_get_addresses_taps_on_their_tenant_s_bridge_and_fdb_entries_with_no_manual_step() {
    if !support::can_run_vms() {
        return;
    }
    let mut net = Net::new("n");
    let mut nodes = cluster(&mut net, 2);
    let _logs = LogsOnPanic(nodes.iter().map(|n| n.data_dir.clone()).collect());
    // Bad cluster networks are refused before anything uses them.
    for (value, why) in [
        ("10.88.0.0/16", "holds node"),
        ("10.0.0.0/30", "too small"),
        ("127.0.0.0/16", "loopback"),
        ("10.1.2.3/16", "host bits"),
        ("ten/8", "not an IPv4 network"),
    ] {
        let (code, body) = nodes[0].call("PUT", "/v1/cluster/settings/cluster_cidr", Some(value)).unwrap();
        assert_eq!(code, 400, "{value}: {body}");
        assert!(body["error"].as_str().unwrap().contains(why), "{value}: {body}");
    }
    let (code, body) = nodes[0].call("PUT", "/v1/cluster/settings/cluster_cidr", Some("10.240.0.0/16")).unwrap();
    assert!((200..300).contains(&code), "{body}");

    for t in ["acme", "other"] {
        assert_eq!(nodes[0].send("PUT", &format!("/v1/tenants/{t}"), &json!({})).0, 201);
    }
    let kernel = nodes[0].upload(shoal_probe_guest::path("workload").unwrap());
    let dep = |replicas: u32| json!({"replicas": replicas, "template": {"kernel": kernel, "cmdline": "app=web", "vcpus": 1, "mem_mib": 64}});
    assert_eq!(nodes[1].send("PUT", "/v1/tenants/acme/deployments/web", &dep(2)).0, 201);
    assert_eq!(nodes[1].send("PUT", "/v1/tenants/other/deployments/db", &dep(1)).0, 201);
    let acme = wait_running(&nodes[0], "acme", 2);
    let other = wait_running(&nodes[0], "other", 1);

    let node_list = nodes[0].get_ok("/v1/nodes")["nodes"].as_array().unwrap().clone();
    let subnet_of = |id: &str| -> String {
        node_list.iter().find(|n| n["id"] == id).unwrap()["subnet"].as_str().unwrap().to_string()
    };
    let placed: BTreeSet<&str> = acme.iter().map(|i| i["node"].as_str().unwrap()).collect();
    assert_eq!(placed.len(), 2, "one acme instance per node: {acme:#?}");
    let mut addrs = BTreeSet::new();
    for i in acme.iter().chain(&other) {
        let addr = i["address"].as_str().unwrap();
        let subnet = subnet_of(i["node"].as_str().unwrap());
        assert!(subnet.starts_with("10.240.") && subnet.ends_with("/24"), "{subnet}");
        let (net3, _) = subnet.rsplit_once('.').unwrap();
        assert!(addr.starts_with(&format!("{net3}.")), "{addr} in {subnet}");
        assert!(addrs.insert(addr.to_string()), "{addr} given twice");
        assert!(i["mac"].as_str().unwrap().starts_with("02:53:"), "{i}");
    }
    let gateway = |i: &Value| {
        let subnet = subnet_of(i["node"].as_str().unwrap());
        format!("{}.1", subnet.rsplit_once('.').unwrap().0)
    };
    let tenants = nodes[0].get_ok("/v1/tenants");
    let vni = |t: &str| {
        tenants["tenants"].as_array().unwrap().iter().find(|x| x["name"] == t).unwrap()["vni"].as_u64().unwrap()
    };
    assert_ne!(vni("acme"), vni("other"));

    for i in acme.iter().chain(&other) {
        let node = nodes.iter().find(|n| n.id() == i["node"].as_str().unwrap()).unwrap();
        let uid = i["uid"].as_str().unwrap();
        let tenant = i["tenant"].as_str().unwrap();
        // The guest was told its address, gateway and the cluster netmask.
        let id = i["id"].as_str().unwrap();
        let console = wait_for(Duration::from_secs(20), "the guest's console", || {
            let (code, text) = node.get_text(&format!("/v1/tenants/{tenant}/instances/{id}/console")).ok()?;
            (code == 200 && text.contains("start cmdline=")).then_some(text)
        });
        let ip_arg = format!("ip={}::{}:255.255.0.0::eth0:off", i["address"].as_str().unwrap(), gateway(i));
        assert!(console.contains(&format!("cmdline=app=web {ip_arg}")), "{console}");
        // Its tap: owned by its jail, on its tenant's bridge, carrying its traffic.
        let links = our_links(&node.ns);
        let tap = links.iter().find(|l| l["ifname"] == tap_name(uid).as_str()).unwrap_or_else(|| panic!("{links:#?}"));
        let bridge = format!("shb{:06x}", vni(tenant));
        assert_eq!(tap["master"], bridge.as_str(), "{tap}");
        let jail_uid = tap["linkinfo"]["info_data"]["user"].as_u64().unwrap();
        assert!(jail_uid >= 10_000_000, "owned by the jail's uid: {tap}");
        assert_eq!(tap["mtu"], 1450, "the overlay's MTU: {tap}");
        // The VMM has it open (a tap with a reader is up with a carrier).
        assert!(!tap["flags"].as_array().unwrap().iter().any(|f| f == "NO-CARRIER"), "{tap}");
    }
    // The acme instance on node 0 is reachable from node 1's acme VXLAN device, and the other
    // tenant's VXLAN device on node 1 (if any) knows nothing of it.
    for (a, b) in [(0usize, 1usize), (1, 0)] {
        let here = acme.iter().find(|i| i["node"] == nodes[a].id().as_str()).unwrap();
        let dev = format!("shx{:06x}", vni("acme"));
        let refs: Vec<&Node> = nodes.iter().collect();
        assert!(
            our_links(&nodes[b].ns).iter().any(|l| l["ifname"] == dev.as_str()),
            "{dev} on node {b}\n{}",
            logs(&refs)
        );
        let fdb = json_of("bridge", &nodes[b].ns, &["fdb", "show", "dev", &format!("shx{:06x}", vni("acme"))]);
        let ip_a = format!("10.88.0.{}", a + 1);
        assert!(
            fdb.iter().any(|e| e["mac"] == here["mac"] && e["dst"] == ip_a.as_str()),
            "node {b}'s acme FDB points {} at node {a}: {fdb:#?}",
            here["mac"]
        );
        assert!(fdb.iter().any(|e| e["mac"] == "00:00:00:00:00:00" && e["dst"] == ip_a.as_str()), "{fdb:#?}");
        let other_dev = format!("shx{:06x}", vni("other"));
        if our_links(&nodes[b].ns).iter().any(|l| l["ifname"] == other_dev.as_str()) {
            let fdb = json_of("bridge", &nodes[b].ns, &["fdb", "show", "dev", &other_dev]);
            assert!(!fdb.iter().any(|e| e["mac"] == here["mac"]), "another tenant's FDB: {fdb:#?}");
        }
    }
    // Through real VMMs: acme's instances on both nodes ping the acme instance on node 1 by its
    // address (across the overlay from node 0); an instance of the other tenant pinging the
    // same address gets nothing.
    let target = acme.iter().find(|i| i["node"] == nodes[1].id().as_str()).unwrap();
    let target_ip = target["address"].as_str().unwrap();
    let pinger = |replicas: u32, app: &str| {
        let mut d = dep(replicas);
        d["template"]["cmdline"] = json!(format!("app={app} ping={target_ip}"));
        d
    };
    assert_eq!(nodes[0].send("PUT", "/v1/tenants/acme/deployments/ping", &pinger(2, "ping")).0, 201);
    assert_eq!(nodes[0].send("PUT", "/v1/tenants/other/deployments/snoop", &pinger(1, "snoop")).0, 201);
    let console = |i: &Value| {
        let node = nodes.iter().find(|n| n.id() == i["node"].as_str().unwrap()).unwrap();
        let path =
            format!("/v1/tenants/{}/instances/{}/console", i["tenant"].as_str().unwrap(), i["id"].as_str().unwrap());
        node.get_text(&path).ok().filter(|(code, _)| *code == 200).map(|(_, t)| t).unwrap_or_default()
    };
    // The running instances of a tenant whose guests started as `app`.
    let of = |tenant: &str, app: &str, n: usize| -> Vec<Value> {
        wait_for(Duration::from_secs(60), &format!("{n} {app} guests of {tenant}"), || {
            let list: Vec<Value> = instances(&nodes[0], tenant)
                .into_iter()
                .filter(|i| i["state"] == "running" && console(i).contains(&format!("cmdline=app={app} ")))
                .collect();
            (list.len() == n).then_some(list)
        })
    };
    let pingers = of("acme", "ping", 2);
    let placed: BTreeSet<&str> = pingers.iter().map(|i| i["node"].as_str().unwrap()).collect();
    assert_eq!(placed.len(), 2, "one pinger per node: {pingers:#?}");
    let reply = format!("net: reply from={target_ip} ");
    for p in &pingers {
        wait_for(Duration::from_secs(60), &format!("{} to answer {}", target_ip, p["id"]), || {
            console(p).contains(&reply).then_some(())
        });
    }
    let snoop = of("other", "snoop", 1);
    // Ten seconds of its pings (twenty ticks) after its interface came up.
    let text = wait_for(Duration::from_secs(60), "the other tenant's pinger to try for ten seconds", || {
        let t = console(&snoop[0]);
        let up = t.find("net: up ip=")?;
        t[up..].contains("tick=20\n").then_some(t)
    });
    assert!(!text.contains("net: reply"), "another tenant's instance reached acme's:\n{text}");
    for (t, d) in [("acme", "ping"), ("other", "snoop")] {
        assert_eq!(nodes[0].send("DELETE", &format!("/v1/tenants/{t}/deployments/{d}"), &json!(null)).0, 200);
    }
    wait_running(&nodes[0], "acme", 2);
    wait_running(&nodes[0], "other", 1);

    // The cluster network cannot change under the addresses it gave.
    let (code, body) = nodes[0].call("PUT", "/v1/cluster/settings/cluster_cidr", Some("10.250.0.0/16")).unwrap();
    assert_eq!(code, 409, "{body}");

    // An agent restarted under its microVMs wires nothing twice and removes nothing.
    let before: Vec<BTreeSet<String>> = nodes.iter().map(|n| wiring(&n.ns)).collect();
    let log_before = nodes[0].log().len();
    nodes[0].stop();
    nodes[0].start();
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(Duration::from_secs(30), "the agent to re-adopt its microVMs", || {
        let (_, m) = nodes[0].get_text("/metrics").ok()?;
        m.contains("shoal_instance_adoptions_total").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(wiring(&nodes[0].ns), before[0], "the same wiring after the restart\n{}", logs(&refs));
    let since = nodes[0].log()[log_before..].to_string();
    assert!(!since.contains("created sh"), "nothing created again:\n{since}");

    // Scaled to one: the stopped instance's tap and FDB entries go on both nodes.
    assert_eq!(nodes[1].send("PUT", "/v1/tenants/acme/deployments/web", &dep(1)).0, 200);
    let left = wait_running(&nodes[0], "acme", 1);
    let gone = acme.iter().find(|i| i["id"] != left[0]["id"]).unwrap();
    wait_for(Duration::from_secs(30), "the stopped instance to be unwired", || {
        let all: BTreeSet<String> = nodes.iter().flat_map(|n| wiring(&n.ns)).collect();
        let mac = gone["mac"].as_str().unwrap();
        let tap = tap_name(gone["uid"].as_str().unwrap());
        (!all.iter().any(|l| l.contains(mac) || l.contains(&tap))).then_some(())
    });
    // Deleted: nothing of netstack's is left on either node.
    for (t, d) in [("acme", "web"), ("other", "db")] {
        assert_eq!(nodes[0].send("DELETE", &format!("/v1/tenants/{t}/deployments/{d}"), &json!(null)).0, 200);
    }
    wait_for(Duration::from_secs(30), "every node to be unwired", || {
        nodes.iter().all(|n| wiring(&n.ns).is_empty()).then_some(())
    });
}
