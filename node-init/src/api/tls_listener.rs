//! The API's TLS listener for `axum::serve`: TCP connections are accepted in a task of their own
//! and their handshakes run concurrently (bounded, with a deadline), so one slow or silent
//! client never holds up another. Each handshake uses the certificate the node serves at that
//! moment (provisional before it joins, its cluster certificate after).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use crate::cluster::tls::Tls;

/// Handshakes in progress at most; more connections wait in the kernel's accept queue.
const HANDSHAKES: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn spawn(tcp: TcpListener, tls: Arc<Tls>) -> std::io::Result<TlsListener> {
        TlsListener::spawn_with(tcp, move || tls.api_server())
    }

    /// As [`TlsListener::spawn`], each handshake with the configuration `config` gives then.
    pub fn spawn_with(
        tcp: TcpListener,
        config: impl Fn() -> Arc<rustls::ServerConfig> + Send + 'static,
    ) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(HANDSHAKES);
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                // The server dropped its end: let the port go now, not at the next connection.
                let accepted = tokio::select! {
                    a = tcp.accept() => a,
                    _ = tx.closed() => return,
                };
                let (stream, peer) = match accepted {
                    Ok(s) => s,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(config());
                if tx.is_closed() {
                    return;
                }
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "API TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended (its listener failed): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropping_the_listener_frees_its_port_without_waiting_for_a_connection() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let ca = crate::cluster::pki::new_ca("t").unwrap();
        let config = crate::cluster::tls::server_config(&ca.cert_pem, &ca.key_pem).unwrap();
        let listener = TlsListener::spawn_with(tcp, move || config.clone()).unwrap();
        drop(listener);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            match TcpListener::bind(addr).await {
                Ok(_) => break,
                Err(e) => assert!(std::time::Instant::now() < deadline, "the port is still held: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
