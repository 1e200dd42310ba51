//! `shoal-kv-load CA TOKEN_FILE ENDPOINTS MODE [PREFIX]`: the client of the power-cut test, run
//! inside the emulated server against the `shoal-node`s there (ENDPOINTS: comma-separated
//! `https://` URLs, CA: the cluster CA file). Modes:
//! - `wait SECONDS`: until a write is acknowledged (the cluster formed and has a leader); prints
//!   `SHOAL-PL ready`, or after SECONDS `SHOAL-PL not-ready` and the last error.
//! - `write PREFIX`: writes `PREFIX000000`, `PREFIX000001`, ... one at a time, through the
//!   endpoints in turn, forever; prints `SHOAL-PL ack N` once key N's write was answered 200
//!   (acknowledged), nothing for a write that failed (its outcome is unknown).
//! - `verify`: reads every key under `pl/` (linearizably) and prints, per prefix, the numbers
//!   present as ranges: `SHOAL-PL have pl/3/ 0-117,119-240`, then `SHOAL-PL verified COUNT`.
//! - `history SECONDS CLIENTS`: CLIENTS at once write, compare-and-swap and read three keys for
//!   SECONDS and print every operation with its times, for a linearizability check (the netem
//!   test).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Client {
    agent: ureq::Agent,
    token: String,
    endpoints: Vec<String>,
    next: usize,
}

impl Client {
    fn endpoint(&mut self) -> String {
        self.next = (self.next + 1) % self.endpoints.len();
        self.endpoints[self.next].clone()
    }

    fn put(&mut self, key: &str, value: &str) -> Result<(), String> {
        let url = format!("{}/v1/kv/{key}", self.endpoint());
        self.agent
            .put(&url)
            .set("Authorization", &format!("Bearer {}", self.token))
            .send_string(value)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn list(&mut self, prefix: &str) -> Result<serde_json::Value, String> {
        let url = format!("{}/v1/kv?prefix={prefix}", self.endpoint());
        let res = self.agent.get(&url).set("Authorization", &format!("Bearer {}", self.token)).call();
        res.map_err(|e| e.to_string())?.into_json().map_err(|e| e.to_string())
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// "0-3,5,7-9" for {0,1,2,3,5,7,8,9}.
fn ranges(numbers: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < numbers.len() {
        let start = numbers[i];
        while i + 1 < numbers.len() && numbers[i + 1] == numbers[i] + 1 {
            i += 1;
        }
        out.push(if numbers[i] == start { start.to_string() } else { format!("{start}-{}", numbers[i]) });
        i += 1;
    }
    out.join(",")
}

/// One client of the `history` mode (see there).
fn history_client(client: &mut Client, c: usize, origin: Instant, stop: Instant) {
    let us = || origin.elapsed().as_micros();
    let mut last: BTreeMap<&str, (Option<String>, u64)> = BTreeMap::new();
    let mut seq = 0u64;
    while Instant::now() < stop {
        seq += 1;
        let key = ["x", "y", "z"][((seq / 3) as usize * 7 + c) % 3];
        let url = format!("{}/v1/kv/{key}", client.endpoint());
        let auth = format!("Bearer {}", client.token);
        let invoked = us();
        let line = match seq % 3 {
            1 => {
                let res = client.agent.get(&url).set("Authorization", &auth).call();
                let done = us();
                match res {
                    Ok(r) => {
                        let v: serde_json::Value = r.into_json().unwrap_or_default();
                        let value = v["kv"]["value"].as_str().map(str::to_string);
                        last.insert(key, (value.clone(), v["kv"]["mod_revision"].as_u64().unwrap_or(0)));
                        Some(format!("R {key} {} - {invoked} {done}", value.as_deref().unwrap_or("-")))
                    }
                    Err(ureq::Error::Status(404, _)) => {
                        last.insert(key, (None, 0));
                        Some(format!("R {key} - - {invoked} {done}"))
                    }
                    // A failed read observed nothing.
                    Err(_) => None,
                }
            }
            _ if key != "z" => {
                let value = format!("c{c}-{seq}");
                let res = client.agent.put(&url).set("Authorization", &auth).send_string(&value);
                let done = if res.is_ok() { us().to_string() } else { "?".to_string() };
                Some(format!("W {key} {value} - {invoked} {done}"))
            }
            _ => {
                let (expect, rev) = last.get(key).cloned().unwrap_or((None, 0));
                let value = format!("c{c}-{seq}");
                let res = client
                    .agent
                    .put(&format!("{url}?prev_revision={rev}"))
                    .set("Authorization", &auth)
                    .send_string(&value);
                let expect = expect.unwrap_or_else(|| "-".to_string());
                Some(match res {
                    Ok(_) => format!("C {key} {value} {expect} {invoked} {}", us()),
                    Err(ureq::Error::Status(409, _)) => format!("F {key} {value} {expect} {invoked} {}", us()),
                    Err(_) => format!("C {key} {value} {expect} {invoked} ?"),
                })
            }
        };
        if let Some(line) = line {
            say(&format!("SHOAL-H {c} {line}"));
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [ca, token_file, endpoints, mode, rest @ ..] = args.as_slice() else {
        eprintln!(
            "usage: shoal-kv-load CA TOKEN_FILE ENDPOINTS wait SECONDS|write PREFIX|verify|history SECONDS CLIENTS"
        );
        return ExitCode::from(2);
    };
    let ca_pem = std::fs::read_to_string(ca).unwrap_or_default();
    let tls = match shoal_node::cluster::tls::client_trusting(&ca_pem) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shoal-kv-load: {ca}: {e:#}");
            return ExitCode::from(2);
        }
    };
    let agent = ureq::AgentBuilder::new().tls_config(Arc::new(tls)).timeout(Duration::from_secs(20)).build();
    let token = std::fs::read_to_string(token_file).unwrap_or_default().trim().to_string();
    let endpoints: Vec<String> = endpoints.split(',').map(str::to_string).collect();
    let mut client = Client { agent, token, endpoints, next: 0 };
    match (mode.as_str(), rest) {
        ("wait", [seconds]) => {
            let deadline = Instant::now() + Duration::from_secs(seconds.parse().unwrap_or(180));
            let mut last = String::new();
            while Instant::now() < deadline {
                match client.put("pl-probe", "up") {
                    Ok(()) => {
                        say("SHOAL-PL ready");
                        return ExitCode::SUCCESS;
                    }
                    Err(e) => last = e,
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            say(&format!("SHOAL-PL not-ready {last}"));
            ExitCode::FAILURE
        }
        ("write", [prefix]) => {
            for n in 0u64.. {
                if client.put(&format!("{prefix}{n:06}"), "v").is_ok() {
                    say(&format!("SHOAL-PL ack {n}"));
                }
            }
            ExitCode::SUCCESS
        }
        ("history", [seconds, clients]) => {
            // Clients at once, each one operation at a time: blind writes and reads on x and y,
            // swaps (on what it last read) and reads on z. Each finished operation is a line
            // `SHOAL-H CLIENT KIND KEY VALUE EXPECT INVOKED_US COMPLETED_US` (`?`: outcome
            // unknown; `-`: none), KIND W write, R read, C swap done, F swap refused.
            let seconds: u64 = seconds.parse().unwrap_or(30);
            let clients: usize = clients.parse().unwrap_or(4);
            let origin = Instant::now();
            let stop = origin + Duration::from_secs(seconds);
            let threads: Vec<_> = (0..clients)
                .map(|c| {
                    let mut client = Client {
                        agent: client.agent.clone(),
                        token: client.token.clone(),
                        endpoints: client.endpoints.clone(),
                        next: c,
                    };
                    std::thread::spawn(move || history_client(&mut client, c, origin, stop))
                })
                .collect();
            for t in threads {
                let _ = t.join();
            }
            say("SHOAL-H done");
            ExitCode::SUCCESS
        }
        ("verify", []) => {
            let mut last = String::new();
            for _ in 0..120 {
                match client.list("pl/") {
                    Ok(v) => {
                        let mut have: BTreeMap<String, Vec<u64>> = BTreeMap::new();
                        let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
                        for kv in &kvs {
                            let key = kv["key"].as_str().unwrap_or_default();
                            if let Some((prefix, n)) = key.rsplit_once('/') {
                                if let Ok(n) = n.parse() {
                                    have.entry(format!("{prefix}/")).or_default().push(n);
                                }
                            }
                        }
                        for (prefix, numbers) in &mut have {
                            numbers.sort_unstable();
                            say(&format!("SHOAL-PL have {prefix} {}", ranges(numbers)));
                        }
                        say(&format!("SHOAL-PL verified {}", kvs.len()));
                        return ExitCode::SUCCESS;
                    }
                    Err(e) => last = e,
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            say(&format!("SHOAL-PL unreadable {last}"));
            ExitCode::FAILURE
        }
        _ => {
            eprintln!(
                "usage: shoal-kv-load CA TOKEN_FILE ENDPOINTS wait SECONDS|write PREFIX|verify|history SECONDS CLIENTS"
            );
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_print_as_ranges() {
        assert_eq!(super::ranges(&[0, 1, 2, 3, 5, 7, 8, 9]), "0-3,5,7-9");
        assert_eq!(super::ranges(&[4]), "4");
        assert_eq!(super::ranges(&[]), "");
    }
}
