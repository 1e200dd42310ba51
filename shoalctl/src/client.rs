//! The cluster API over HTTP: JSON in and out, `{"error": ...}` answers turned into one clear
//! error, 503 (an election, no quorum yet) retried for a while.

use std::io::Read;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a request is retried while the cluster answers 503.
const RETRY_FOR: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{endpoint}: {message}")]
    Transport { endpoint: String, message: String },
    /// The API refused: its status and its `error` message.
    #[error("{message} ({status})")]
    Api { status: u16, message: String },
    #[error("the answer from {endpoint} is not JSON: {source}")]
    Garbled { endpoint: String, source: std::io::Error },
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    endpoint: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    /// `endpoint` may omit its scheme (`127.0.0.1:7400`: HTTPS, as nodes serve their API).
    /// `ca_pem` holds the certificates to verify the node with: the cluster CA a node writes to
    /// `DATA_DIR/tls/ca.crt` (without one, only publicly trusted certificates verify).
    pub fn new(endpoint: &str, token: &str, ca_pem: Option<&str>) -> Result<Client, ClientError> {
        let endpoint = if endpoint.contains("://") { endpoint.to_string() } else { format!("https://{endpoint}") };
        let mut builder = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5));
        if let Some(pem) = ca_pem {
            let tls =
                trusting(pem).map_err(|message| ClientError::Transport { endpoint: endpoint.clone(), message })?;
            builder = builder.tls_config(std::sync::Arc::new(tls));
        }
        Ok(Client {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: token.to_string(),
            agent: builder.build(),
        })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.endpoint))
            .set("Authorization", &format!("Bearer {}", self.token))
    }

    fn transport(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Transport { endpoint: self.endpoint.clone(), message: e.to_string() }
    }

    /// Sends a request (retried on 503) and returns the response.
    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<ureq::Response, ClientError> {
        let started = Instant::now();
        loop {
            let req = self.request(method, path).timeout(Duration::from_secs(30));
            let res = match body {
                Some(b) => req.set("Content-Type", "application/json").send_string(&b.to_string()),
                None => req.call(),
            };
            match res {
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(503, _)) if started.elapsed() < RETRY_FOR => {
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(ureq::Error::Status(status, r)) => return Err(api_error(status, r)),
                // A node that is just starting may not listen yet.
                Err(ureq::Error::Transport(t))
                    if t.kind() == ureq::ErrorKind::ConnectionFailed && started.elapsed() < RETRY_FOR =>
                {
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(e) => return Err(self.transport(e)),
            }
        }
    }

    /// The JSON answer and its status.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), ClientError> {
        let r = self.send(method, path, body)?;
        let status = r.status();
        let text =
            r.into_string().map_err(|source| ClientError::Garbled { endpoint: self.endpoint.clone(), source })?;
        let v = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, v))
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        Ok(self.call("GET", path, None)?.1)
    }

    /// A streamed answer (a followed console).
    pub fn stream(&self, path: &str) -> Result<Box<dyn Read + Send + Sync>, ClientError> {
        let r = self.request("GET", path).call().map_err(|e| match e {
            ureq::Error::Status(status, r) => api_error(status, r),
            e => self.transport(e),
        })?;
        Ok(r.into_reader())
    }

    /// POSTs a few bytes (console input); the answer's status is all that matters.
    pub fn post_bytes(&self, path: &str, bytes: &[u8]) -> Result<(), ClientError> {
        self.request("POST", path)
            .timeout(Duration::from_secs(10))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(bytes)
            .map(|_| ())
            .map_err(|e| match e {
                ureq::Error::Status(status, r) => api_error(status, r),
                e => self.transport(e),
            })
    }

    /// POSTs `len` bytes read from `body`; returns the JSON answer.
    pub fn upload(&self, path: &str, body: impl Read, len: u64) -> Result<Value, ClientError> {
        let r = self
            .request("POST", path)
            .set("Content-Type", "application/octet-stream")
            .set("Content-Length", &len.to_string())
            .send(body)
            .map_err(|e| match e {
                ureq::Error::Status(status, r) => api_error(status, r),
                e => self.transport(e),
            })?;
        r.into_json().map_err(|source| ClientError::Garbled { endpoint: self.endpoint.clone(), source })
    }
}

/// A TLS 1.3 client configuration trusting the certificates in `pem`.
fn trusting(pem: &str) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("the CA file does not parse: {e}"))?;
        roots.add(cert).map_err(|e| format!("the CA certificate is unusable: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the CA file holds no certificate".into());
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn api_error(status: u16, r: ureq::Response) -> ClientError {
    let text = r.into_string().unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| if text.trim().is_empty() { format!("HTTP {status}") } else { text.trim().to_string() });
    ClientError::Api { status, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_that_holds_no_usable_certificate_is_a_clear_error() {
        for (pem, says) in [
            ("", "holds no certificate"),
            ("not a certificate at all\n", "holds no certificate"),
            ("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", "does not parse"),
        ] {
            let e = Client::new("127.0.0.1:1", "t", Some(pem)).unwrap_err().to_string();
            assert!(e.contains(says), "{pem:?}: {e}");
        }
        // No scheme: HTTPS.
        assert!(Client::new("127.0.0.1:7400", "t", None).unwrap().endpoint.starts_with("https://"));
    }
}
