//! Maintenance mode: a node that boots with no cluster secret (none on the command line, none
//! stored on its data disk) and no cluster identity waits to be told what to join. It serves a
//! small API on its API port, over TLS with a certificate made for this boot, and shows a
//! one-time token on its console; `shoalctl node configure` brings the token and the node's
//! configuration (the secret, seeds, labels ...), which PID 1 stores and boots the agent with.
//!
//! Only whoever can read the console has the token. The client never sends it (or the secret)
//! before the node has proved it holds the token too: `GET /v1/maintenance` answers a proof, an
//! HMAC of the node's certificate under the token, which the client checks against the
//! certificate its connection saw, then pins that certificate for the configuring request. A
//! relay in between shows another certificate, so it cannot make the proof.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/maintenance` (no token) | `{"maintenance": true, "hostname", "version", "proof"}` |
//! | `POST /v1/maintenance/configure` (the token) | `{"configured": true}`; the body: `{"secret", "seeds", "labels", "min_voters", "hostname"}` |
//! | anything else | 503, saying the node is in maintenance mode |

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;

use super::cmdline::{seed_with_port, BootConfig};

type HmacSha256 = Hmac<sha2::Sha256>;

/// RFC 4648 base32, lower case: easy to read off a console and type.
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A new one-time token: 130 random bits as 26 base32 characters.
pub fn new_token() -> String {
    let bytes: [u8; 17] = rand::random();
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0);
    for b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 && out.len() < 26 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    out
}

/// The token as the console shows it: groups of five, dashes between.
pub fn shown(token: &str) -> String {
    token.as_bytes().chunks(5).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join("-")
}

/// A token as typed: dashes and blanks dropped, case folded.
pub fn normalise(token: &str) -> String {
    token.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect()
}

/// The node's proof that it holds `token`: HMAC-SHA256 of its certificate (DER) under it.
pub fn proof(token: &str, cert_der: &[u8]) -> String {
    let mut m = HmacSha256::new_from_slice(normalise(token).as_bytes()).unwrap_or_else(|_| unreachable!());
    m.update(b"shoal/maintenance-proof\0");
    m.update(cert_der);
    hex::encode(m.finalize().into_bytes())
}

/// What `shoalctl node configure` sends.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Configure {
    pub secret: String,
    #[serde(default)]
    pub seeds: Vec<String>,
    #[serde(default)]
    pub labels: Option<String>,
    #[serde(default)]
    pub min_voters: Option<usize>,
    #[serde(default)]
    pub hostname: Option<String>,
}

impl Configure {
    /// Checks the request; every problem is named.
    pub fn check(&self) -> Result<(), String> {
        crate::cluster::secret::check_strength(&self.secret)?;
        if self.min_voters == Some(0) {
            return Err("min_voters must be at least 1".into());
        }
        for s in &self.seeds {
            if s.trim().is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("the seed {s:?} is not HOST[:PORT]"));
            }
        }
        if let Some(l) = &self.labels {
            if l.split(',').any(|kv| !kv.contains('=') || kv.starts_with('=')) {
                return Err(format!("the labels {l:?} are not k=v,..."));
            }
        }
        if let Some(h) = &self.hostname {
            let ok = !h.is_empty()
                && h.len() <= 63
                && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !h.starts_with('-')
                && !h.ends_with('-');
            if !ok {
                return Err(format!("the hostname {h:?} is not a DNS label"));
            }
        }
        Ok(())
    }

    /// The boot configuration with this request's settings over `config`.
    pub fn over(&self, config: &BootConfig) -> BootConfig {
        let mut c = config.clone();
        c.secret = Some(self.secret.trim().to_string());
        if !self.seeds.is_empty() {
            c.seeds = self.seeds.iter().map(|s| seed_with_port(s.trim())).collect();
        }
        c.labels = self.labels.clone().or(c.labels);
        c.min_voters = self.min_voters.or(c.min_voters);
        c.hostname = self.hostname.clone().or(c.hostname);
        c
    }
}

struct Shared {
    token: String,
    proof: String,
    hostname: String,
    /// Taken by the one request that configures the node.
    done: Mutex<Option<tokio::sync::oneshot::Sender<Configure>>>,
}

fn error(code: StatusCode, msg: &str) -> Response {
    (code, Json(json!({ "error": msg }))).into_response()
}

async fn hello(State(s): State<Arc<Shared>>) -> Response {
    Json(json!({
        "maintenance": true,
        "hostname": s.hostname,
        "version": env!("CARGO_PKG_VERSION"),
        "proof": s.proof,
    }))
    .into_response()
}

async fn configure(State(s): State<Arc<Shared>>, headers: HeaderMap, body: bytes::Bytes) -> Response {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(normalise)
        .unwrap_or_default();
    let want = s.token.as_bytes();
    // Compared in constant time: the token is the only thing that guards this route.
    let same = given.len() == want.len() && given.bytes().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if !same {
        return error(StatusCode::UNAUTHORIZED, "wrong maintenance token (it is on the node's console)");
    }
    let req: Configure = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the configuration does not parse: {e}")),
    };
    if let Err(e) = req.check() {
        return error(StatusCode::BAD_REQUEST, &e);
    }
    let Some(tx) = s.done.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return error(StatusCode::CONFLICT, "this node is already configured");
    };
    let _ = tx.send(req);
    Json(json!({ "configured": true })).into_response()
}

async fn elsewhere() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "this node is in maintenance mode (it has no cluster secret): configure it with \
         `shoalctl node configure` and the token on its console",
    )
}

/// Serves maintenance mode on `listen` until a request configures the node; returns it.
pub async fn serve(listen: SocketAddr, token: &str, hostname: &str) -> Result<Configure, String> {
    let params = rcgen::CertificateParams::new(vec![hostname.to_string(), "shoal-maintenance".into()])
        .map_err(|e| e.to_string())?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let config = crate::cluster::tls::server_config(&cert.pem(), &key.serialize_pem()).map_err(|e| format!("{e:#}"))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let shared = Arc::new(Shared {
        token: normalise(token),
        proof: proof(token, cert.der().as_ref()),
        hostname: hostname.to_string(),
        done: Mutex::new(Some(tx)),
    });
    let app = Router::new()
        .route("/v1/maintenance", get(hello))
        .route("/v1/maintenance/configure", post(configure))
        .fallback(elsewhere)
        .layer(axum::extract::DefaultBodyLimit::max(64 << 10))
        .with_state(shared);
    let tcp = tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("binding {listen}: {e}"))?;
    let tls =
        crate::api::tls_listener::TlsListener::spawn_with(tcp, move || config.clone()).map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(async move {
        axum::serve(tls, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await
    });
    let req = tokio::select! {
        r = rx => r.map_err(|_| "the maintenance API ended unconfigured".to_string())?,
        r = &mut server => return Err(format!("the maintenance API stopped: {r:?}")),
    };
    let _ = stop_tx.send(());
    // Open connections get a moment (the configuring request's answer), then the port is the
    // agent's: an idle client cannot hold the node in maintenance.
    if tokio::time::timeout(std::time::Duration::from_secs(3), &mut server).await.is_err() {
        server.abort();
        let _ = server.await;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_read_back_however_they_are_typed() {
        let t = new_token();
        assert_eq!(t.len(), 26);
        assert!(t.bytes().all(|b| ALPHABET.contains(&b)));
        assert_ne!(t, new_token());
        let s = shown(&t);
        assert_eq!(s.len(), 26 + 5);
        assert_eq!(normalise(&s.to_uppercase()), t);
        assert_eq!(proof(&s, b"cert"), proof(&t, b"cert"));
        assert_ne!(proof(&t, b"cert"), proof(&t, b"another cert"));
        assert_ne!(proof(&t, b"cert"), proof(&new_token(), b"cert"));
    }

    #[test]
    fn a_configuration_is_checked_and_lands_over_the_boot_config() {
        let ok = Configure {
            secret: " a-long-enough-cluster-secret\n".into(),
            seeds: vec!["10.0.0.5".into(), "10.0.0.6:7500".into()],
            labels: Some("zone=a".into()),
            min_voters: Some(1),
            hostname: Some("rack1-node3".into()),
        };
        assert_eq!(ok.check(), Ok(()));
        let c = ok.over(&BootConfig { labels: Some("zone=b".into()), ip: Some("dhcp".into()), ..Default::default() });
        assert_eq!(c.secret.as_deref(), Some("a-long-enough-cluster-secret"));
        assert_eq!(c.seeds, ["10.0.0.5:7400", "10.0.0.6:7500"]);
        assert_eq!(c.labels.as_deref(), Some("zone=a"));
        assert_eq!(c.ip.as_deref(), Some("dhcp"), "what the request does not set is kept");
        for (bad, why) in [
            (Configure { secret: "short".into(), ..ok.clone() }, "fewer than 16"),
            (Configure { min_voters: Some(0), ..ok.clone() }, "min_voters"),
            (Configure { seeds: vec!["a b".into()], ..ok.clone() }, "seed"),
            (Configure { labels: Some("zone".into()), ..ok.clone() }, "labels"),
            (Configure { hostname: Some("-x".into()), ..ok.clone() }, "hostname"),
        ] {
            let e = bad.check().unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let unknown = serde_json::from_str::<Configure>(r#"{"secret": "x", "sekrit": "y"}"#).unwrap_err();
        assert!(unknown.to_string().contains("sekrit"), "{unknown}");
    }
}
