//! TLS 1.3 for everything a node serves and dials: Raft (mutual: both sides present node
//! certificates of the cluster CA), the HTTP API (server certificate only; clients verify it
//! against `DATA_DIR/tls/ca.crt`) and node-to-node HTTP (mutual).
//!
//! A node that has no identity yet (it has not bootstrapped or joined) serves its API with a
//! provisional certificate from a CA of its own, written to `DATA_DIR/tls/provisional-ca.crt`
//! so that an operator can reach it before it joins; its Raft listener refuses every connection
//! until it has a real identity. The configurations change in place when the identity arrives.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::pki::{self, Identity};
use super::secret::ClusterSecret;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn chain_and_key(
    cert_pem: &str,
    key_pem: &str,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let cert = CertificateDer::from(pki::cert_der(cert_pem)?);
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| anyhow::anyhow!("not a PEM key: {e}"))?;
    Ok((vec![cert], key))
}

/// Trust roots from every certificate in `pem`.
pub fn roots(pem: &str) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        store.add(cert.map_err(|e| anyhow::anyhow!("a certificate does not parse: {e}"))?)?;
    }
    anyhow::ensure!(!store.is_empty(), "no certificate to trust");
    Ok(store)
}

fn server_builder() -> rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier> {
    // TLS 1.3 is in the ring provider: this cannot fail.
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap_or_else(|_| unreachable!())
}

pub fn client_builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap_or_else(|_| unreachable!())
}

/// A client configuration that trusts the CA certificates in `pem` (shoalctl's and the tests').
pub fn client_trusting(pem: &str) -> anyhow::Result<ClientConfig> {
    Ok(client_builder().with_root_certificates(roots(pem)?).with_no_client_auth())
}

/// The configurations of a node with its cluster identity.
#[derive(Debug)]
pub struct Configs {
    pub identity: Identity,
    /// The Raft listener: client certificates of the cluster CA required.
    pub raft_server: Arc<ServerConfig>,
    /// The HTTP API.
    pub api_server: Arc<ServerConfig>,
    /// Dialing peers (Raft, node-to-node HTTP): verifies their certificates, presents ours.
    pub client: Arc<ClientConfig>,
}

impl Configs {
    pub fn new(identity: Identity) -> anyhow::Result<Configs> {
        let roots = Arc::new(roots(&identity.ca_pem).context("the cluster CA")?);
        let (chain, key) = chain_and_key(&identity.cert_pem, &identity.key_pem)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .context("client verifier")?;
        let raft_server = server_builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("raft server certificate")?;
        let api_server = server_builder()
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .context("API certificate")?;
        let client = client_builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("client certificate")?;
        Ok(Configs {
            identity,
            raft_server: Arc::new(raft_server),
            api_server: Arc::new(api_server),
            client: Arc::new(client),
        })
    }
}

/// A TLS 1.3 server configuration presenting `cert_pem` (no client certificates asked for).
pub fn server_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<ServerConfig>> {
    let (chain, key) = chain_and_key(cert_pem, key_pem)?;
    Ok(Arc::new(server_builder().with_no_client_auth().with_single_cert(chain, key)?))
}

/// This node's TLS: the identity once it has one, a provisional API certificate before.
#[derive(Debug)]
pub struct Tls {
    pub node: u64,
    pub dir: PathBuf,
    /// The addresses this node's certificates name.
    pub ips: Vec<IpAddr>,
    current: RwLock<Option<Arc<Configs>>>,
    /// What the API serves until the identity arrives.
    provisional: Arc<ServerConfig>,
    /// The node's own key, made once and kept in `node.key`: a join retried after a lost answer
    /// asks for the same key the state registered.
    key: rcgen::KeyPair,
}

impl Tls {
    /// Loads the identity kept in `data_dir` (if any) and makes the provisional API certificate.
    pub fn open(data_dir: &Path, node: u64, ips: Vec<IpAddr>) -> anyhow::Result<Tls> {
        let dir = pki::tls_dir(data_dir);
        let key_path = dir.join("node.key");
        let key = match std::fs::read_to_string(&key_path) {
            Ok(pem) => {
                rcgen::KeyPair::from_pem(&pem).with_context(|| format!("{} is not a key", key_path.display()))?
            }
            Err(_) => {
                use std::os::unix::fs::PermissionsExt;
                let key = pki::new_node_key()?;
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
                crate::durable::write(&key_path, key.serialize_pem().as_bytes())
                    .with_context(|| format!("writing {}", key_path.display()))?;
                key
            }
        };
        let current = match Identity::load(&dir, node)? {
            Some(id) => Some(Arc::new(Configs::new(id)?)),
            None => None,
        };
        // Made on every start (milliseconds); its CA is written only while it is what the API
        // serves.
        let ca = pki::new_ca(&format!("provisional {}", pki::node_name(node)))?;
        let cert = pki::issue(&ca.cert_pem, &ca.key_pem, node, &pki::csr_der(node, &key)?, &with_loopback(&ips))?;
        let (chain, der_key) = chain_and_key(&cert, &key.serialize_pem())?;
        let provisional = Arc::new(server_builder().with_no_client_auth().with_single_cert(chain, der_key)?);
        if current.is_none() {
            crate::durable::write(&dir.join("provisional-ca.crt"), ca.cert_pem.as_bytes())?;
        }
        Ok(Tls { node, dir, ips, current: RwLock::new(current), provisional, key })
    }

    pub fn node_key(&self) -> &rcgen::KeyPair {
        &self.key
    }

    pub fn configs(&self) -> Option<Arc<Configs>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes a newly issued identity: stored (tied to the cluster's secret) first, then served.
    pub fn install(&self, identity: Identity, secret: &ClusterSecret) -> anyhow::Result<()> {
        let configs = Arc::new(Configs::new(identity)?);
        configs.identity.store(&self.dir)?;
        pki::remember_secret(&self.dir, secret, &configs.identity.ca_pem)?;
        let _ = std::fs::remove_file(self.dir.join("provisional-ca.crt"));
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(configs);
        Ok(())
    }

    /// What the API serves now.
    pub fn api_server(&self) -> Arc<ServerConfig> {
        self.configs().map(|c| c.api_server.clone()).unwrap_or_else(|| self.provisional.clone())
    }

    /// The addresses a certificate for this node names (loopback too, for local clients).
    pub fn cert_ips(&self) -> Vec<IpAddr> {
        with_loopback(&self.ips)
    }
}

fn with_loopback(ips: &[IpAddr]) -> Vec<IpAddr> {
    let lo = IpAddr::from([127, 0, 0, 1]);
    let mut out = ips.to_vec();
    if !out.contains(&lo) {
        out.push(lo);
    }
    out
}

/// The name a client verifies when it dials node `id` over Raft.
pub fn peer_name(id: u64) -> ServerName<'static> {
    // node_name is always a valid DNS name.
    ServerName::try_from(pki::node_name(id)).unwrap_or_else(|_| unreachable!())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provisional_and_issued_certificates_verify_against_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let tls = Tls::open(dir.path(), 5, vec!["10.1.0.1".parse().unwrap()]).unwrap();
        assert!(tls.configs().is_none());
        let prov = std::fs::read_to_string(dir.path().join("tls/provisional-ca.crt")).unwrap();
        assert!(client_trusting(&prov).is_ok());
        let ca = pki::new_ca("c").unwrap();
        let key = tls.node_key();
        let cert = pki::issue(&ca.cert_pem, &ca.key_pem, 5, &pki::csr_der(5, key).unwrap(), &[]).unwrap();
        tls.install(
            Identity { node: 5, ca_pem: ca.cert_pem.clone(), cert_pem: cert, key_pem: key.serialize_pem() },
            &ClusterSecret::new("tls-test-secret"),
        )
        .unwrap();
        assert!(tls.configs().is_some());
        // A restart finds it; the provisional CA is gone.
        let again = Tls::open(dir.path(), 5, vec![]).unwrap();
        assert_eq!(again.configs().unwrap().identity.ca_pem, ca.cert_pem);
        // The identity is tied to the secret it was issued under.
        assert!(pki::check_secret(dir.path(), &ClusterSecret::new("tls-test-secret")).is_ok());
        let wrong = pki::check_secret(dir.path(), &ClusterSecret::new("another-secret")).unwrap_err();
        assert!(format!("{wrong:#}").contains("wrong cluster secret"), "{wrong:#}");
        // Another node's certificate in the directory is refused.
        assert!(Tls::open(dir.path(), 6, vec![]).is_err());
    }
}
