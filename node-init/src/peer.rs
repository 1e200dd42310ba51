//! Node-to-node HTTP over TLS: one node asking another's API for what only that node has (an
//! image blob, an instance's console). The peer's certificate is verified against the cluster CA
//! for the address dialed; requests carry the peer token derived from the cluster secret, which
//! every node accepts as the cluster's own. Bodies stream; nothing is buffered whole.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// How long connecting and receiving the response head may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot reach {addr}")]
    Connect { addr: String, source: std::io::Error },
    #[error("{addr} did not answer in time")]
    Timeout { addr: String },
    #[error("HTTP to {addr} failed")]
    Http { addr: String, source: hyper::Error },
    #[error("bad request to {addr}")]
    Request { addr: String, source: hyper::http::Error },
    #[error("{addr} is not an IP address and port")]
    Address { addr: String },
    #[error("TLS with {addr} failed")]
    Tls { addr: String, source: std::io::Error },
    #[error("this node has no certificate of the cluster CA yet")]
    NoIdentity,
}

/// GET `path` (with its query) from the node whose API is at `addr`; the response's body streams.
pub async fn get(
    addr: &str,
    path: &str,
    token: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<hyper::Response<Incoming>, PeerError> {
    request(addr, hyper::Method::GET, path, token, Bytes::new(), tls).await
}

/// POST a small body to `path` on the node whose API is at `addr`.
pub async fn post(
    addr: &str,
    path: &str,
    token: &str,
    body: Bytes,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<hyper::Response<Incoming>, PeerError> {
    request(addr, hyper::Method::POST, path, token, body, tls).await
}

async fn request(
    addr: &str,
    method: hyper::Method,
    path: &str,
    token: &str,
    body: Bytes,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<hyper::Response<Incoming>, PeerError> {
    let owned = addr.to_string();
    let sock: std::net::SocketAddr = addr.parse().map_err(|_| PeerError::Address { addr: owned.clone() })?;
    let connector = tokio_rustls::TlsConnector::from(tls.clone());
    let work = async move {
        let tcp = tokio::net::TcpStream::connect(sock)
            .await
            .map_err(|source| PeerError::Connect { addr: owned.clone(), source })?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::IpAddress(sock.ip().into());
        let stream =
            connector.connect(name, tcp).await.map_err(|source| PeerError::Tls { addr: owned.clone(), source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| PeerError::Http { addr: owned.clone(), source })?;
        // The connection task ends when the body has been read or dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder().method(method).uri(path).header(hyper::header::HOST, owned.as_str());
        if !token.is_empty() {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Full::new(body)).map_err(|source| PeerError::Request { addr: owned.clone(), source })?;
        sender.send_request(req).await.map_err(|source| PeerError::Http { addr: owned.clone(), source })
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(PeerError::Timeout { addr: addr.to_string() }),
    }
}
