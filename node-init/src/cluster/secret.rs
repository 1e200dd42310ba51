//! The cluster secret and what is derived from it: one key per purpose (gossip packets, Raft
//! frames, the default API token), so a key leaked from one channel does not open the others.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of the tag prefixed to every gossip packet and Raft frame.
pub const TAG_LEN: usize = 32;

/// A key for one purpose, derived from the cluster secret.
#[derive(Clone)]
pub struct PurposeKey([u8; 32]);

impl std::fmt::Debug for PurposeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PurposeKey(..)")
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac.finalize().into_bytes().into()
}

impl PurposeKey {
    pub fn tag(&self, data: &[u8]) -> [u8; TAG_LEN] {
        hmac(&self.0, data)
    }

    /// The key itself (to key a cipher).
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time check of a tag.
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.0) else { return false };
        mac.update(data);
        mac.verify_slice(tag).is_ok()
    }
}

/// The fewest characters a cluster secret may have. Everything a node publishes under the
/// secret (gossip tags, discovery announcements, the CA's proof) lets whoever captures it test
/// guesses offline: the secret must be too long to guess, as a random one is (`openssl rand
/// -hex 16` gives 32 characters).
pub const MIN_SECRET_CHARS: usize = 16;

/// Refuses a secret too short to resist guessing.
pub fn check_strength(secret: &str) -> Result<(), String> {
    let n = secret.trim().chars().count();
    if n < MIN_SECRET_CHARS {
        return Err(format!(
            "the cluster secret has {n} characters, fewer than {MIN_SECRET_CHARS}: use a long random one \
             (openssl rand -hex 16)"
        ));
    }
    Ok(())
}

/// The shared secret every node of a cluster holds.
#[derive(Clone)]
pub struct ClusterSecret(Vec<u8>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    pub fn new(secret: &str) -> Self {
        ClusterSecret(secret.trim().as_bytes().to_vec())
    }

    pub fn key(&self, purpose: &str) -> PurposeKey {
        PurposeKey(hmac(&self.0, format!("shoal/{purpose}").as_bytes()))
    }

    /// The API bearer token a node accepts when none is configured.
    pub fn default_api_token(&self) -> String {
        hex::encode(self.key("api-token").0)
    }

    /// The token nodes present to one another's APIs (image copies, consoles).
    pub fn peer_token(&self) -> String {
        hex::encode(self.key("peer-token").0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_secret_is_refused_and_blanks_do_not_count() {
        assert!(check_strength("0123456789abcdef").is_ok());
        let e = check_strength("  0123456789abcde \n").unwrap_err();
        assert!(e.contains("has 15 characters, fewer than 16"), "{e}");
        assert!(check_strength("").is_err());
    }

    #[test]
    fn tags_verify_only_with_the_same_secret_and_purpose() {
        let a = ClusterSecret::new("s3cret");
        let tag = a.key("raft").tag(b"frame");
        assert!(a.key("raft").verify(b"frame", &tag));
        assert!(!a.key("gossip").verify(b"frame", &tag));
        assert!(!ClusterSecret::new("other").key("raft").verify(b"frame", &tag));
        assert!(!a.key("raft").verify(b"framE", &tag));
        assert!(!a.key("raft").verify(b"frame", &tag[..31]));
        assert_ne!(a.default_api_token(), ClusterSecret::new("other").default_api_token());
    }
}
