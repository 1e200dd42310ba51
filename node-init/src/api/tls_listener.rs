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
                let (stream, peer) = match tcp.accept().await {
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
