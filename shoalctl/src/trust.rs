//! First contact with a cluster from its secret alone (`config set-context --secret-file`):
//! the node's API token is derived from the secret as nodes derive it, and the cluster CA is
//! fetched from `GET /v1/cluster/ca` over a connection not yet verified, then kept only if its
//! proof (an HMAC of the CA under a key of the secret) checks out. Whoever can make the proof
//! holds the secret, so is the cluster; from then on the CA verifies every connection.
//!
//! A node in maintenance mode (no secret yet) is met the same way with its one-time token
//! (`node configure`): it proves the token for the certificate it shows, and that certificate is
//! pinned for the request that carries the secret.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::DigitallySignedStruct;
use serde_json::Value;

type HmacSha256 = Hmac<sha2::Sha256>;

/// How long to wait for a node that is still forming its cluster.
const WAIT: Duration = Duration::from_secs(300);

fn mac(secret: &str, purpose: &str) -> HmacSha256 {
    // The node's derivation (cluster::secret): HMAC-SHA256(secret, "shoal/PURPOSE") is the key.
    let mut m = HmacSha256::new_from_slice(secret.trim().as_bytes()).unwrap_or_else(|_| unreachable!());
    m.update(format!("shoal/{purpose}").as_bytes());
    let key = m.finalize().into_bytes();
    HmacSha256::new_from_slice(&key).unwrap_or_else(|_| unreachable!())
}

/// The API token a node accepts when it was given no other: derived from the secret.
pub fn api_token(secret: &str) -> String {
    let mut m = HmacSha256::new_from_slice(secret.trim().as_bytes()).unwrap_or_else(|_| unreachable!());
    m.update(b"shoal/api-token");
    hex::encode(m.finalize().into_bytes())
}

/// Whether `proof` (hex) is the secret's proof of `ca`.
pub fn proves(secret: &str, ca: &str, proof: &str) -> bool {
    let Ok(tag) = hex::decode(proof) else { return false };
    let mut m = mac(secret, "ca-proof");
    m.update(ca.as_bytes());
    m.verify_slice(&tag).is_ok()
}

/// Fetches the cluster CA from `endpoint` and checks its proof with `secret`; waits while the
/// node is unreachable or has no cluster yet.
pub fn fetch_ca(endpoint: &str, secret: &str) -> Result<String, String> {
    // Any certificate: the CA's proof is checked instead.
    let (agent, _) = pinned_agent(None)?;
    let base = if endpoint.contains("://") { endpoint.to_string() } else { format!("https://{endpoint}") };
    let url = format!("{}/v1/cluster/ca", base.trim_end_matches('/'));
    let started = Instant::now();
    let answer: Value = loop {
        let why = match agent.get(&url).call() {
            Ok(r) => break r.into_json().map_err(|e| format!("{url}: the answer is not JSON: {e}"))?,
            Err(ureq::Error::Status(503, _)) => "the node has no cluster yet".to_string(),
            Err(ureq::Error::Status(code, _)) => return Err(format!("{url} answered {code}")),
            Err(e) => e.to_string(),
        };
        if started.elapsed() > WAIT {
            return Err(format!("{url}: {why} (waited {} s)", WAIT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let ca = answer["ca"].as_str().unwrap_or("");
    let proof = answer["proof"].as_str().unwrap_or("");
    if ca.is_empty() || !proves(secret, ca, proof) {
        return Err(format!(
            "{base} could not prove that it holds the cluster secret: a wrong secret, or not a node of this cluster"
        ));
    }
    Ok(ca.to_string())
}

/// Accepts any certificate (for first contact, where a proof is checked instead) and remembers
/// the last one shown; or, pinned, only that one.
#[derive(Debug)]
struct Pin {
    provider: Arc<rustls::crypto::CryptoProvider>,
    seen: std::sync::Mutex<Option<Vec<u8>>>,
    pinned: Option<Vec<u8>>,
}

impl ServerCertVerifier for Pin {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(p) = &self.pinned {
            if end_entity.as_ref() != p.as_slice() {
                return Err(rustls::Error::General("the node's certificate is not the one it proved".into()));
            }
        }
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn pinned_agent(pinned: Option<Vec<u8>>) -> Result<(ureq::Agent, Arc<Pin>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pin = Arc::new(Pin { provider: provider.clone(), seen: Default::default(), pinned });
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(pin.clone())
        .with_no_client_auth();
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .tls_config(Arc::new(tls))
        .build();
    Ok((agent, pin))
}

/// A maintenance token as typed: dashes and blanks dropped, case folded (as the node reads it).
fn normalise_token(token: &str) -> String {
    token.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect()
}

/// Whether `proof` (hex) is the maintenance token's proof of the certificate `cert_der`
/// (the node's derivation: pid1::maintenance::proof).
pub fn proves_token(token: &str, cert_der: &[u8], proof: &str) -> bool {
    let Ok(tag) = hex::decode(proof) else { return false };
    let mut m = HmacSha256::new_from_slice(normalise_token(token).as_bytes()).unwrap_or_else(|_| unreachable!());
    m.update(b"shoal/maintenance-proof\0");
    m.update(cert_der);
    m.verify_slice(&tag).is_ok()
}

/// Configures a node in maintenance mode (`shoalctl node configure`): the node proves it holds
/// `token` (shown on its console) for the certificate this connection sees, then gets `config`
/// (the secret among it) over a connection pinned to that certificate. Returns the node's
/// hostname.
pub fn configure(endpoint: &str, token: &str, config: &Value) -> Result<String, String> {
    let base = if endpoint.contains("://") { endpoint.to_string() } else { format!("https://{endpoint}") };
    let base = base.trim_end_matches('/');
    let (agent, pin) = pinned_agent(None)?;
    let url = format!("{base}/v1/maintenance");
    let started = Instant::now();
    let hello: Value = loop {
        let why = match agent.get(&url).call() {
            Ok(r) => break r.into_json().map_err(|e| format!("{url}: the answer is not JSON: {e}"))?,
            Err(ureq::Error::Status(code, _)) => {
                return Err(format!(
                    "{base} is not in maintenance mode (it answered {code}): it already has a cluster secret"
                ))
            }
            Err(e) => e.to_string(),
        };
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!("{url}: {why}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let cert = pin.seen.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
    if !proves_token(token, &cert, hello["proof"].as_str().unwrap_or("")) {
        return Err(format!(
            "{base} could not prove that it holds this token: a mistyped token, or not the node whose console shows it"
        ));
    }
    let (pinned, _) = pinned_agent(Some(cert))?;
    let url = format!("{base}/v1/maintenance/configure");
    let answer =
        pinned.post(&url).set("Authorization", &format!("Bearer {}", normalise_token(token))).send_json(config.clone());
    match answer {
        Ok(_) => Ok(hello["hostname"].as_str().unwrap_or("the node").to_string()),
        Err(ureq::Error::Status(code, r)) => {
            let v: Value = r.into_json().unwrap_or_default();
            Err(format!("{url} answered {code}: {}", v["error"].as_str().unwrap_or("")))
        }
        Err(e) => Err(format!("{url}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_checks_only_with_the_secret_and_the_ca_it_was_made_for() {
        let secret = "s3cret";
        let mut m = mac(secret, "ca-proof");
        m.update(b"CA PEM");
        let proof = hex::encode(m.finalize().into_bytes());
        assert!(proves(secret, "CA PEM", &proof));
        assert!(proves(" s3cret\n", "CA PEM", &proof), "the secret is trimmed, as nodes trim it");
        assert!(!proves("other", "CA PEM", &proof));
        assert!(!proves(secret, "ANOTHER CA", &proof));
        assert!(!proves(secret, "CA PEM", "not hex"));
        assert!(!proves(secret, "CA PEM", ""));
    }

    #[test]
    fn a_token_proof_checks_only_for_its_token_and_certificate() {
        let mut m = HmacSha256::new_from_slice(b"abcdefghij234567abcdefghij").unwrap();
        m.update(b"shoal/maintenance-proof\0CERT");
        let proof = hex::encode(m.finalize().into_bytes());
        assert!(proves_token("abcde-fghij-23456-7abcd-efghi-j", b"CERT", &proof), "typed with dashes");
        assert!(proves_token("ABCDEFGHIJ234567ABCDEFGHIJ", b"CERT", &proof), "in capitals");
        assert!(!proves_token("abcdefghij234567abcdefghik", b"CERT", &proof));
        assert!(!proves_token("abcdefghij234567abcdefghij", b"ANOTHER", &proof));
        assert!(!proves_token("abcdefghij234567abcdefghij", b"CERT", "zz"));
    }
}
