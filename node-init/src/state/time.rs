//! Timestamps in the state are milliseconds since the epoch taken from the log entry that made
//! the change (never from the applying node's clock, so every node applies the same values);
//! the API shows them as RFC 3339 (`2026-12-01T14:54:31.123Z`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::objects::Millis;

pub fn now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn format(ms: Millis) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub fn parse(s: &str) -> Option<Millis> {
    let t = humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
}

/// serde for `Millis` fields written as RFC 3339.
pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        super::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not an RFC 3339 time")))
    }

    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(ms: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match ms {
                Some(ms) => s.serialize_str(&super::super::format(*ms)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            let s: Option<String> = Option::deserialize(d)?;
            s.map(|s| {
                super::super::parse(&s)
                    .ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not an RFC 3339 time")))
            })
            .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_round_trip_through_rfc3339() {
        let ms = 1_796_136_871_123;
        let s = super::format(ms);
        assert_eq!(s, "2026-12-01T14:54:31.123Z");
        assert_eq!(super::parse(&s), Some(ms));
        assert_eq!(super::parse("yesterday"), None);
    }
}
