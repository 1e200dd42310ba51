//! The snapshot state file's envelope: a magic, an explicit format version, two reserved
//! bytes (zero), the payload's length, the payload (postcard-encoded `SnapshotState`), and a
//! CRC-32 of the payload. Every way a file can be wrong (another file type, another version,
//! cut short, flipped bits, a payload that does not decode) is its own error; nothing here
//! panics on bad input.
//!
//! The CRC catches damage, not intent: anyone who can write a state file can seal any payload.
//! `decode_payload` is therefore the boundary that must hold against hostile bytes, and the
//! fuzz target and tests drive it directly and through re-sealed envelopes.

use serde::{de::DeserializeOwned, Serialize};

/// First bytes of every state file.
pub const MAGIC: &[u8; 8] = b"SHOALSNP";
/// The format this build writes and reads. Bump it whenever `SnapshotState` changes shape.
pub const FORMAT_VERSION: u16 = 5;
/// magic + version + reserved + payload length.
const HEADER_LEN: usize = 8 + 2 + 2 + 8;
/// State files are small (registers, device state); anything larger is not ours.
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a shoal snapshot state file (bad magic)")]
    BadMagic,
    #[error("snapshot format version {found} is not supported (this shoal-vmm reads version {supported})")]
    Version { found: u16, supported: u16 },
    #[error("snapshot state file is truncated ({have} of {need} bytes)")]
    Truncated { have: usize, need: usize },
    #[error("snapshot state is {0} bytes, over the limit of {MAX_PAYLOAD}")]
    TooLarge(u64),
    #[error("snapshot state checksum mismatch (file corrupted): stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("snapshot state does not decode: {0}")]
    Decode(String),
    #[error("snapshot state does not encode: {0}")]
    Encode(String),
    #[error("snapshot state file has {0} bytes of trailing data")]
    Trailing(usize),
    #[error("snapshot state file has reserved header bytes set ({0:#06x}): written by a newer or foreign tool")]
    Reserved(u16),
}

/// Encodes `state` into a complete state file.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FormatError> {
    let payload = postcard::to_stdvec(state).map_err(|e| FormatError::Encode(e.to_string()))?;
    Ok(seal(&payload))
}

/// The envelope around an encoded payload (tests and fuzzing re-seal altered payloads).
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out
}

/// Decodes a payload whose envelope was checked.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FormatError> {
    postcard::from_bytes(payload).map_err(|e| FormatError::Decode(e.to_string()))
}

/// Checks the envelope of `bytes` and decodes its payload.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated { have: bytes.len(), need: HEADER_LEN });
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version, supported: FORMAT_VERSION });
    }
    let reserved = u16::from_le_bytes([bytes[10], bytes[11]]);
    if reserved != 0 {
        return Err(FormatError::Reserved(reserved));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(FormatError::TooLarge(len));
    }
    // len <= 64 MiB, so these sums cannot overflow.
    let need = HEADER_LEN + len as usize + 4;
    if bytes.len() < need {
        return Err(FormatError::Truncated { have: bytes.len(), need });
    }
    if bytes.len() > need {
        return Err(FormatError::Trailing(bytes.len() - need));
    }
    let payload = &bytes[HEADER_LEN..need - 4];
    let mut stored = [0u8; 4];
    stored.copy_from_slice(&bytes[need - 4..]);
    let stored = u32::from_le_bytes(stored);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    decode_payload(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u64,
        b: Vec<u8>,
        c: String,
    }

    fn sample() -> Sample {
        Sample { a: 42, b: vec![1, 2, 3], c: "vcpu".into() }
    }

    #[test]
    fn a_state_round_trips() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(decode::<Sample>(&bytes).unwrap(), sample());
    }

    #[test]
    fn every_kind_of_damage_is_its_own_error() {
        let good = encode(&sample()).unwrap();
        assert_eq!(decode::<Sample>(b"ELF\x7f not a snapshot").unwrap_err(), FormatError::BadMagic);
        assert_eq!(decode::<Sample>(&[]).unwrap_err(), FormatError::BadMagic);
        let mut v = good.clone();
        v[8] = 9;
        assert_eq!(decode::<Sample>(&v).unwrap_err(), FormatError::Version { found: 9, supported: FORMAT_VERSION });
        for cut in [10, HEADER_LEN, good.len() - 1] {
            assert!(
                matches!(decode::<Sample>(&good[..cut]).unwrap_err(), FormatError::Truncated { .. }),
                "cut at {cut}"
            );
        }
        let mut reserved = good.clone();
        reserved[11] = 1;
        assert_eq!(decode::<Sample>(&reserved).unwrap_err(), FormatError::Reserved(0x100));
        let mut flipped = good.clone();
        flipped[HEADER_LEN] ^= 0x40;
        assert!(matches!(decode::<Sample>(&flipped).unwrap_err(), FormatError::Checksum { .. }));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode::<Sample>(&long).unwrap_err(), FormatError::Trailing(1));
        let mut huge = good.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode::<Sample>(&huge).unwrap_err(), FormatError::TooLarge(_)));
        // A well-formed envelope around a payload of another shape.
        let other = encode(&(1u8,)).unwrap();
        assert!(matches!(decode::<Sample>(&other).unwrap_err(), FormatError::Decode(_)));
    }

    #[test]
    fn random_bytes_never_panic() {
        let good = encode(&sample()).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut v = good.clone();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = (seed as usize) % v.len();
            v[at] = (seed >> 32) as u8;
            let _ = decode::<Sample>(&v);
        }
    }
}
