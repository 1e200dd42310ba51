//! The cluster's certificate authority and node identities.
//!
//! The node that bootstraps a cluster creates its CA (ECDSA P-256); the CA key travels in the
//! replicated state sealed with a key derived from the cluster secret, so any member can issue.
//! A node gets its certificate by presenting the secret (the join request's proof) and a CSR
//! for a key it made itself; the certificate names it (`node-<id>.shoal`) and its addresses, and
//! the state registers the key's hash for that id once, so a holder of the secret can obtain a
//! certificate for a new id but never speak as an existing node. A removed node's id is revoked.
//!
//! On disk, in `DATA_DIR/tls/`: `node.key` (0600), `node.crt`, `ca.crt` (the cluster CA: what
//! clients and peers verify against).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use ring::aead;
use sha2::{Digest, Sha256};

use super::secret::ClusterSecret;

/// The DNS name a node's certificate carries, which peers verify when they connect to it.
pub fn node_name(id: u64) -> String {
    format!("node-{id:016x}.shoal")
}

/// The node id a certificate names (its `node-<id>.shoal` DNS name).
pub fn cert_node_id(cert_der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => {
            d.strip_prefix("node-")?.strip_suffix(".shoal").and_then(|h| u64::from_str_radix(h, 16).ok())
        }
        _ => None,
    })
}

/// SHA-256 (hex) of a raw public key: the identity the state registers for a node.
pub fn key_hash(raw_public_key: &[u8]) -> String {
    hex::encode(Sha256::digest(raw_public_key))
}

/// The key hash of a certificate's public key.
pub fn cert_key_hash(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(key_hash(&cert.public_key().subject_public_key.data))
}

/// A freshly made CA.
#[derive(Debug, Clone)]
pub struct NewCa {
    pub cert_pem: String,
    pub key_pem: String,
}

fn ca_params(cluster_id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "shoal");
    dn.push(DnType::CommonName, format!("shoal cluster {cluster_id} CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    params
}

pub fn new_ca(cluster_id: &str) -> anyhow::Result<NewCa> {
    let key = KeyPair::generate().context("generating the CA key")?;
    let cert = ca_params(cluster_id).self_signed(&key).context("signing the CA certificate")?;
    Ok(NewCa { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn seal_key(secret: &ClusterSecret, cluster_id: &str) -> aead::LessSafeKey {
    let k = secret.key(&format!("ca-seal/{cluster_id}"));
    // CHACHA20_POLY1305 takes any 32-byte key.
    aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::CHACHA20_POLY1305, k.bytes()).unwrap_or_else(|_| unreachable!()),
    )
}

/// Seals the CA key for the replicated state: `hex(nonce || ciphertext || tag)`.
pub fn seal_ca_key(secret: &ClusterSecret, cluster_id: &str, key_pem: &str) -> String {
    let nonce_bytes: [u8; 12] = rand::random();
    let mut buf = key_pem.as_bytes().to_vec();
    let nonce = aead::Nonce::assume_unique_for_key(nonce_bytes);
    // Sealing fails only for inputs over 256 GiB.
    seal_key(secret, cluster_id)
        .seal_in_place_append_tag(nonce, aead::Aad::from(cluster_id.as_bytes()), &mut buf)
        .unwrap_or_else(|_| unreachable!());
    hex::encode([&nonce_bytes[..], &buf].concat())
}

pub fn unseal_ca_key(secret: &ClusterSecret, cluster_id: &str, sealed: &str) -> anyhow::Result<String> {
    let bytes = hex::decode(sealed).context("the sealed CA key is not hex")?;
    if bytes.len() < 12 + aead::CHACHA20_POLY1305.tag_len() {
        bail!("the sealed CA key is truncated");
    }
    let (nonce, rest) = bytes.split_at(12);
    let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| anyhow::anyhow!("bad nonce"))?;
    let mut buf = rest.to_vec();
    let plain = seal_key(secret, cluster_id)
        .open_in_place(nonce, aead::Aad::from(cluster_id.as_bytes()), &mut buf)
        .map_err(|_| anyhow::anyhow!("the CA key does not open with this node's cluster secret"))?;
    String::from_utf8(plain.to_vec()).context("the CA key is not PEM")
}

/// A node's key and the CSR that asks for its certificate.
pub fn new_node_key() -> anyhow::Result<KeyPair> {
    KeyPair::generate().context("generating the node key")
}

pub fn csr_der(node: u64, key: &KeyPair) -> anyhow::Result<Vec<u8>> {
    let mut params = CertificateParams::new(vec![node_name(node)]).context("CSR names")?;
    params.distinguished_name.push(DnType::CommonName, node_name(node));
    Ok(params.serialize_request(key).context("signing the CSR")?.der().to_vec())
}

/// The hash of the key a CSR asks a certificate for (after checking the CSR's signature).
pub fn csr_key_hash(csr: &[u8]) -> anyhow::Result<String> {
    let parsed = CertificateSigningRequestParams::from_der(&csr.to_vec().into()).context("the CSR does not parse")?;
    Ok(key_hash(parsed.public_key.der_bytes()))
}

/// Issues the certificate of node `node` for the key in `csr`, valid for its name and `ips`.
/// Whatever else the CSR asks for is ignored: the CA decides what a node certificate says.
pub fn issue(ca_cert_pem: &str, ca_key_pem: &str, node: u64, csr: &[u8], ips: &[IpAddr]) -> anyhow::Result<String> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("the CA key does not parse")?;
    let ca_cert = CertificateParams::from_ca_cert_pem(ca_cert_pem)
        .context("the CA certificate does not parse")?
        .self_signed(&ca_key)
        .context("rebuilding the CA")?;
    let csr = CertificateSigningRequestParams::from_der(&csr.to_vec().into()).context("the CSR does not parse")?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, node_name(node));
    params.subject_alt_names = vec![SanType::DnsName(node_name(node).try_into().context("node name")?)];
    params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    let cert = params.signed_by(&csr.public_key, &ca_cert, &ca_key).context("signing the node certificate")?;
    Ok(cert.pem())
}

/// A node's identity as kept in its data directory.
#[derive(Debug, Clone)]
pub struct Identity {
    pub node: u64,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// The file in the TLS directory that ties the node's identity to the secret it was issued
/// under: an HMAC of the cluster CA under a key of that secret.
const SECRET_CHECK: &str = "secret-check";

fn secret_check(secret: &ClusterSecret, ca_pem: &str) -> String {
    hex::encode(secret.key("secret-check").tag(ca_pem.as_bytes()))
}

/// Records that the identity in `dir` (its CA `ca_pem`) belongs to the cluster of `secret`.
pub fn remember_secret(dir: &Path, secret: &ClusterSecret, ca_pem: &str) -> anyhow::Result<()> {
    let path = dir.join(SECRET_CHECK);
    crate::durable::write(&path, secret_check(secret, ca_pem).as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Refuses to run a node whose cluster identity was issued under another secret (a server
/// booted with the wrong `shoal.secret=`): it could reach none of its peers, and it would serve
/// its cluster's data under the wrong token. A node with no identity yet takes any secret; one
/// whose data predates this check is tied to the secret it has now.
pub fn check_secret(data_dir: &Path, secret: &ClusterSecret) -> anyhow::Result<()> {
    let dir = tls_dir(data_dir);
    let Ok(ca_pem) = std::fs::read_to_string(dir.join("ca.crt")) else { return Ok(()) };
    match std::fs::read_to_string(dir.join(SECRET_CHECK)) {
        Ok(have) if have.trim() == secret_check(secret, &ca_pem) => Ok(()),
        Ok(_) => bail!(
            "wrong cluster secret: this node's data ({}) belongs to a cluster formed with another secret; \
             start it with that cluster's secret, or clear its data to join a cluster as a new node",
            data_dir.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => remember_secret(&dir, secret, &ca_pem),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.join(SECRET_CHECK).display())),
    }
}

impl Identity {
    /// The identity in `dir`, if this node has been issued one.
    pub fn load(dir: &Path, node: u64) -> anyhow::Result<Option<Identity>> {
        let read = |f: &str| std::fs::read_to_string(dir.join(f));
        let (Ok(ca_pem), Ok(cert_pem), Ok(key_pem)) = (read("ca.crt"), read("node.crt"), read("node.key")) else {
            return Ok(None);
        };
        let id = Identity { node, ca_pem, cert_pem, key_pem };
        let der = id.cert_der()?;
        if cert_node_id(&der) != Some(node) {
            bail!("{} is not this node's certificate (node {node:016x})", dir.join("node.crt").display());
        }
        Ok(Some(id))
    }

    /// Writes the identity durably: the key first, the CA last (its presence means complete).
    pub fn store(&self, dir: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        for (name, text) in [("node.key", &self.key_pem), ("node.crt", &self.cert_pem), ("ca.crt", &self.ca_pem)] {
            let path = dir.join(name);
            crate::durable::write(&path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    pub fn cert_der(&self) -> anyhow::Result<Vec<u8>> {
        cert_der(&self.cert_pem).context("node.crt")
    }

    pub fn key_hash(&self) -> anyhow::Result<String> {
        cert_key_hash(&self.cert_der()?).context("node.crt has no public key")
    }
}

/// The DER of the first certificate in `pem`.
pub fn cert_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject as _;
    let cert = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    Ok(cert.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_issued_for_a_csr_names_the_node_and_carries_the_csr_key() {
        let ca = new_ca("c1").unwrap();
        let key = new_node_key().unwrap();
        let csr = csr_der(0xabc, &key).unwrap();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let pem = issue(&ca.cert_pem, &ca.key_pem, 0xabc, &csr, &[ip]).unwrap();
        let der = cert_der(&pem).unwrap();
        assert_eq!(cert_node_id(&der), Some(0xabc));
        assert_eq!(cert_key_hash(&der).unwrap(), key_hash(key.public_key_raw()));
        assert_eq!(csr_key_hash(&csr).unwrap(), key_hash(key.public_key_raw()));
        // A CSR that asks for another node's name still gets only the id it is issued for.
        let sneaky = csr_der(0xdef, &key).unwrap();
        let der = cert_der(&issue(&ca.cert_pem, &ca.key_pem, 0xabc, &sneaky, &[]).unwrap()).unwrap();
        assert_eq!(cert_node_id(&der), Some(0xabc));
        // A tampered CSR is refused.
        let mut bad = csr.clone();
        let n = bad.len();
        bad[n - 5] ^= 0xff;
        assert!(csr_key_hash(&bad).is_err());
    }

    #[test]
    fn the_sealed_ca_key_opens_only_with_the_same_secret_and_cluster() {
        let s = ClusterSecret::new("secret-one");
        let sealed = seal_ca_key(&s, "c1", "KEY PEM");
        assert_eq!(unseal_ca_key(&s, "c1", &sealed).unwrap(), "KEY PEM");
        assert!(unseal_ca_key(&ClusterSecret::new("secret-two"), "c1", &sealed).is_err());
        assert!(unseal_ca_key(&s, "c2", &sealed).is_err());
        assert!(unseal_ca_key(&s, "c1", &sealed[..20]).is_err());
        assert!(unseal_ca_key(&s, "c1", "zz").is_err());
    }
}
