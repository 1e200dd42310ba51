//! The node's boot configuration: what the kernel command line says (`shoal.*=` and `ip=`),
//! merged with what an earlier boot stored on the data disk, so that a reboot needs none of it.

use serde::{Deserialize, Serialize};

/// The agent's default ports: API (TCP) and gossip (UDP) on 7400, Raft on the next.
pub const API_PORT: u16 = 7400;

/// What the node was told at boot. Every field is optional: a missing one falls back to the
/// stored configuration, then to the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootConfig {
    /// Gossip addresses of nodes to join through (`shoal.seed=a,b`; the port defaults to 7400).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<String>,
    /// `k=v,...` published with the node (`shoal.labels=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<String>,
    /// The cluster secret (`shoal.secret=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Where to fetch the secret from (`shoal.secret_url=`, plain HTTP on the boot network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_url: Option<String>,
    /// The data disk (`shoal.data=/dev/vdb`, `shoal.data=ram`); default: the GPT partition
    /// labelled `shoal-data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The kernel's `ip=` (default: DHCP on the first link with carrier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Nodes that must see each other before a fresh cluster bootstraps (`shoal.min_voters=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_voters: Option<usize>,
    /// `shoal.hostname=` (default: `shoal-` and the uplink's MAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `shoal.*` keys this binary does not know (reported on the console, otherwise ignored).
    #[serde(skip)]
    pub unknown: Vec<String>,
    /// Problems with known keys (a bad number): reported, the key ignored.
    #[serde(skip)]
    pub errors: Vec<String>,
}

/// Splits a command line into words as the kernel does: on spaces, double quotes grouping
/// (`shoal.labels="zone=a, rack=1"`).
pub fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// A seed with the default port added where it has none (`10.0.0.5` → `10.0.0.5:7400`).
pub fn seed_with_port(seed: &str) -> String {
    let has_port = match seed.rsplit_once(':') {
        // `[v6]:port`, or `host:port` with one colon.
        Some((host, port)) => !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':'),
        None => false,
    };
    if has_port || seed.is_empty() {
        seed.to_string()
    } else {
        format!("{seed}:{API_PORT}")
    }
}

/// The boot configuration the command line gives. Bare words (iPXE puts the image's name first)
/// and other programs' keys are ignored; the last of a repeated key wins, except `shoal.seed`,
/// which adds.
pub fn parse(cmdline: &str) -> BootConfig {
    let mut c = BootConfig::default();
    for w in words(cmdline) {
        let Some((key, value)) = w.split_once('=') else { continue };
        let some = || (!value.is_empty()).then(|| value.to_string());
        match key {
            "ip" => c.ip = some(),
            "shoal.seed" | "shoal.seeds" => {
                c.seeds.extend(value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(seed_with_port))
            }
            "shoal.labels" => c.labels = some(),
            "shoal.secret" => c.secret = some(),
            "shoal.secret_url" => c.secret_url = some(),
            "shoal.data" => c.data = some(),
            "shoal.hostname" => c.hostname = some(),
            "shoal.min_voters" => match value.parse::<usize>() {
                Ok(n) if n >= 1 => c.min_voters = Some(n),
                _ => c.errors.push(format!("shoal.min_voters={value:?} is not a number of at least 1 (ignored)")),
            },
            k if k.starts_with("shoal.") => c.unknown.push(k.to_string()),
            _ => {}
        }
    }
    c
}

impl BootConfig {
    /// `self` (this boot's command line) over `stored` (an earlier boot's): what is given now
    /// wins; what is not given is taken from before.
    pub fn over(&self, stored: &BootConfig) -> BootConfig {
        BootConfig {
            seeds: if self.seeds.is_empty() { stored.seeds.clone() } else { self.seeds.clone() },
            labels: self.labels.clone().or_else(|| stored.labels.clone()),
            secret: self.secret.clone().or_else(|| stored.secret.clone()),
            secret_url: self.secret_url.clone().or_else(|| stored.secret_url.clone()),
            data: self.data.clone().or_else(|| stored.data.clone()),
            ip: self.ip.clone().or_else(|| stored.ip.clone()),
            min_voters: self.min_voters.or(stored.min_voters),
            hostname: self.hostname.clone().or_else(|| stored.hostname.clone()),
            unknown: self.unknown.clone(),
            errors: self.errors.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shoal_keys_are_read_and_bare_words_and_other_keys_ignored() {
        let c = parse(
            "vmlinuz initrd=initramfs.img console=ttyS0 quiet shoal.seed=10.0.0.5,10.0.0.6:7500 \
             shoal.labels=\"zone=a,rack=r1\" shoal.secret=s3cret-words ip=dhcp shoal.min_voters=1 shoal.frob=1",
        );
        assert_eq!(c.seeds, vec!["10.0.0.5:7400", "10.0.0.6:7500"]);
        assert_eq!(c.labels.as_deref(), Some("zone=a,rack=r1"));
        assert_eq!(c.secret.as_deref(), Some("s3cret-words"));
        assert_eq!(c.ip.as_deref(), Some("dhcp"));
        assert_eq!(c.min_voters, Some(1));
        assert_eq!(c.unknown, vec!["shoal.frob"]);
        assert!(c.errors.is_empty());
    }

    #[test]
    fn a_bad_number_is_reported_not_taken() {
        let c = parse("shoal.min_voters=zero shoal.min_voters=0");
        assert_eq!(c.min_voters, None);
        assert_eq!(c.errors.len(), 2);
    }

    #[test]
    fn the_command_line_wins_over_what_was_stored_and_the_rest_is_kept() {
        let stored = parse("shoal.seed=10.0.0.5 shoal.secret=old-secret shoal.labels=zone=a");
        let now = parse("shoal.labels=zone=b");
        let c = now.over(&stored);
        assert_eq!(c.seeds, vec!["10.0.0.5:7400"]);
        assert_eq!(c.secret.as_deref(), Some("old-secret"));
        assert_eq!(c.labels.as_deref(), Some("zone=b"));
        // What is stored round-trips through its file.
        let back: BootConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn seeds_get_the_default_port_unless_they_name_one() {
        assert_eq!(seed_with_port("node1"), "node1:7400");
        assert_eq!(seed_with_port("node1:9000"), "node1:9000");
        assert_eq!(seed_with_port("[fd00::1]:9000"), "[fd00::1]:9000");
        assert_eq!(words("a  \"b c\" d"), vec!["a", "b c", "d"]);
    }
}
