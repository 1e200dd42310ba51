//! Names of what netstack creates. Each says what it is and for whom, so the agent finds its
//! own after a crash or restart (and only its own: nothing else on the host starts with `sh`
//! followed by one of these letters and hex digits) and removes what is no longer wanted.

/// Linux allows 15 bytes in an interface name.
pub const IFNAMSIZ_MAX: usize = 15;

/// Something netstack created, recognised by its name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owned {
    /// A tenant's bridge on this node, by the tenant's VNI.
    Bridge(u32),
    /// A tenant's VXLAN device on this node, by VNI.
    Vxlan(u32),
    /// An instance's tap, by the start of the instance's uid.
    Tap(String),
}

pub fn bridge(vni: u32) -> String {
    format!("shb{:06x}", vni & 0xff_ffff)
}

pub fn vxlan(vni: u32) -> String {
    format!("shx{:06x}", vni & 0xff_ffff)
}

/// The tap of the instance with `uid` (hex, as the state makes them): `sht` and the uid's
/// first 12 characters.
pub fn tap(uid: &str) -> Option<String> {
    let key: String = uid.chars().take(IFNAMSIZ_MAX - 3).collect();
    (key.len() >= 8 && key.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| format!("sht{key}"))
}

/// What `name` is, if netstack made it.
pub fn parse(name: &str) -> Option<Owned> {
    let hex = |s: &str| s.len() == 6 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(v) = name.strip_prefix("shb").filter(|s| hex(s)) {
        return u32::from_str_radix(v, 16).ok().map(Owned::Bridge);
    }
    if let Some(v) = name.strip_prefix("shx").filter(|s| hex(s)) {
        return u32::from_str_radix(v, 16).ok().map(Owned::Vxlan);
    }
    let key = name.strip_prefix("sht")?;
    (tap(key).as_deref() == Some(name)).then(|| Owned::Tap(key.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn names_fit_linux_and_parse_back_and_foreign_names_are_not_ours() {
        assert_eq!(bridge(4096), "shb001000");
        assert_eq!(vxlan(0xff_ffff), "shxffffff");
        let t = tap("0123456789abcdef").unwrap();
        assert_eq!(t, "sht0123456789ab");
        assert!(t.len() <= IFNAMSIZ_MAX);
        assert_eq!(parse(&t), Some(Owned::Tap("0123456789ab".into())));
        assert_eq!(parse("shb001000"), Some(Owned::Bridge(4096)));
        assert_eq!(parse("shx00100a"), Some(Owned::Vxlan(4106)));
        for foreign in ["eth0", "shb1000", "shbzzzzzz", "sht0123", "shtABCDEF012345", "br0", "sht../x", "shx0010000"] {
            assert_eq!(parse(foreign), None, "{foreign}");
        }
        assert_eq!(tap("short"), None);
        assert_eq!(tap("../../etc"), None);
    }
}
