//! How a node gets its certificate: `POST /v1/cluster/join` to any member with a CSR for its own
//! key and a proof that it holds the cluster secret (an HMAC over the request). The member
//! registers the key for that node id through Raft (refused if the id has another key or was
//! removed), issues the certificate from the cluster CA and answers with it, the CA and a proof
//! of its own over the answer, so the joiner, which cannot verify the member's TLS certificate
//! yet, knows the answer comes from a holder of the secret and belongs to its request.

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::pki::{self, Identity};
use super::secret::ClusterSecret;
use crate::state::{ApplyOutcome, Command, RejectKind};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The joining node's id (hex).
    pub node: String,
    /// Its CSR (DER, base64).
    pub csr: String,
    /// The addresses its certificate should name.
    pub ips: Vec<IpAddr>,
    /// HMAC-SHA256 under the secret's join key over the fields above (hex).
    pub proof: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinAnswer {
    /// The cluster CA certificate (PEM).
    pub ca: String,
    /// The node's certificate (PEM).
    pub cert: String,
    /// HMAC-SHA256 under the join key over the request's proof, `ca` and `cert` (hex).
    pub proof: String,
}

/// What a request's proof covers.
fn request_text(node: &str, csr: &str, ips: &[IpAddr]) -> String {
    let ips: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
    format!("request\n{node}\n{csr}\n{}", ips.join(","))
}

/// What an answer's proof covers: the request's proof binds it to that request.
fn answer_text(request_proof: &str, ca: &str, cert: &str) -> String {
    format!("answer\n{request_proof}\n{ca}\n{cert}")
}

/// Why a join was refused, with the HTTP status the API answers.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

fn refused(status: u16, message: impl Into<String>) -> Refused {
    Refused { status, message: message.into() }
}

/// The member's side. `propose` puts the registration through Raft.
pub async fn answer<F, Fut>(
    secret: &ClusterSecret,
    pki_state: (String, String, String),
    req: &JoinRequest,
    propose: F,
) -> Result<JoinAnswer, Refused>
where
    F: FnOnce(Command) -> Fut,
    Fut: std::future::Future<Output = Result<ApplyOutcome, String>>,
{
    let (cluster_id, ca_cert, sealed) = pki_state;
    let proof = hex::decode(&req.proof).map_err(|_| refused(400, "the proof is not hex"))?;
    if !secret.key("join").verify(request_text(&req.node, &req.csr, &req.ips).as_bytes(), &proof) {
        return Err(refused(401, "the join request does not prove the cluster secret"));
    }
    let node =
        u64::from_str_radix(&req.node, 16).ok().filter(|n| *n != 0).ok_or_else(|| refused(400, "bad node id"))?;
    if ca_cert.is_empty() {
        return Err(refused(503, "this node has no cluster CA yet"));
    }
    let csr = base64::engine::general_purpose::STANDARD
        .decode(&req.csr)
        .map_err(|_| refused(400, "the CSR is not base64"))?;
    let key = pki::csr_key_hash(&csr).map_err(|e| refused(400, format!("{e:#}")))?;
    match propose(Command::RegisterIdentity { node, key }).await {
        Ok(ApplyOutcome::Applied { .. }) => {}
        Ok(ApplyOutcome::Rejected { kind: RejectKind::Conflict, reason }) => return Err(refused(409, reason)),
        Ok(other) => return Err(refused(422, format!("{other:?}"))),
        Err(e) => return Err(refused(503, e)),
    }
    let ca_key = pki::unseal_ca_key(secret, &cluster_id, &sealed).map_err(|e| refused(500, format!("{e:#}")))?;
    let cert = pki::issue(&ca_cert, &ca_key, node, &csr, &req.ips).map_err(|e| refused(500, format!("{e:#}")))?;
    let proof = hex::encode(secret.key("join").tag(answer_text(&req.proof, &ca_cert, &cert).as_bytes()));
    Ok(JoinAnswer { ca: ca_cert, cert, proof })
}

/// The joiner's side: the request for `node`'s key.
pub fn request(secret: &ClusterSecret, node: u64, key: &rcgen::KeyPair, ips: &[IpAddr]) -> anyhow::Result<JoinRequest> {
    let node_hex = format!("{node:016x}");
    let csr = base64::engine::general_purpose::STANDARD.encode(pki::csr_der(node, key)?);
    let proof = hex::encode(secret.key("join").tag(request_text(&node_hex, &csr, ips).as_bytes()));
    Ok(JoinRequest { node: node_hex, csr, ips: ips.to_vec(), proof })
}

/// Checks an answer against its request and makes the identity.
pub fn accept(
    secret: &ClusterSecret,
    node: u64,
    key: &rcgen::KeyPair,
    req: &JoinRequest,
    ans: JoinAnswer,
) -> anyhow::Result<Identity> {
    let proof = hex::decode(&ans.proof).context("the answer's proof is not hex")?;
    if !secret.key("join").verify(answer_text(&req.proof, &ans.ca, &ans.cert).as_bytes(), &proof) {
        bail!("the join answer does not prove the cluster secret");
    }
    let der = pki::cert_der(&ans.cert)?;
    if pki::cert_node_id(&der) != Some(node) || pki::cert_key_hash(&der) != Some(pki::key_hash(key.public_key_raw())) {
        bail!("the issued certificate is not for this node's key");
    }
    Ok(Identity { node, ca_pem: ans.ca, cert_pem: ans.cert, key_pem: key.serialize_pem() })
}

/// A verifier that accepts any server certificate (with a valid handshake signature): used only
/// for the join request, whose answer is authenticated by its proof instead.
#[derive(Debug)]
pub struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl AnyServer {
    pub fn client_config() -> rustls::ClientConfig {
        super::tls::client_builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(super::tls::provider())))
            .with_no_client_auth()
    }
}

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pki_of(secret: &ClusterSecret) -> (String, String, String) {
        let ca = pki::new_ca("c1").unwrap();
        ("c1".into(), ca.cert_pem.clone(), pki::seal_ca_key(secret, "c1", &ca.key_pem))
    }

    #[tokio::test]
    async fn a_join_needs_the_secret_and_its_answer_is_bound_to_the_request() {
        let secret = ClusterSecret::new("the-secret");
        let pki = pki_of(&secret);
        let key = pki::new_node_key().unwrap();
        let ips: Vec<IpAddr> = vec!["10.0.0.2".parse().unwrap()];
        let req = request(&secret, 0x42, &key, &ips).unwrap();
        let registered = std::sync::Mutex::new(Vec::new());
        let ok = |c: Command| {
            registered.lock().unwrap().push(c);
            async { Ok(ApplyOutcome::Applied { revision: 1 }) }
        };
        let ans = answer(&secret, pki.clone(), &req, ok).await.unwrap();
        assert!(
            matches!(&registered.lock().unwrap()[0], Command::RegisterIdentity { node: 0x42, key: k } if *k == pki::key_hash(key.public_key_raw()))
        );
        let id = accept(&secret, 0x42, &key, &req, ans.clone()).unwrap();
        assert_eq!(id.ca_pem, pki.1);

        // Another secret: the member refuses, and the joiner refuses a forged answer.
        let wrong = ClusterSecret::new("not-the-secret");
        let forged_req = request(&wrong, 0x42, &key, &ips).unwrap();
        let never = |_c: Command| async { Ok(ApplyOutcome::Applied { revision: 1 }) };
        assert_eq!(answer(&secret, pki.clone(), &forged_req, never).await.unwrap_err().status, 401);
        assert!(accept(&wrong, 0x42, &key, &req, ans.clone()).is_err());
        // The request altered after signing (another id, other addresses): refused.
        let mut altered = req.clone();
        altered.node = "43".into();
        assert_eq!(answer(&secret, pki.clone(), &altered, never).await.unwrap_err().status, 401);
        // An answer meant for another request (another key) is refused.
        let other_key = pki::new_node_key().unwrap();
        let other_req = request(&secret, 0x42, &other_key, &ips).unwrap();
        assert!(accept(&secret, 0x42, &other_key, &other_req, ans).is_err());
        // The state refuses the id (taken by another key, or removed): 409, nothing issued.
        let taken = |_c: Command| async {
            Ok(crate::state::reject(RejectKind::Conflict, "node 42 already has a certificate for another key"))
        };
        let e = answer(&secret, pki, &other_req, taken).await.unwrap_err();
        assert_eq!((e.status, e.message.contains("another key")), (409, true));
    }
}
