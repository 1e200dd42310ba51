//! Configuration and API types (serde). These describe a microVM; `builder` turns them into
//! live objects. Nothing here touches KVM.

pub mod config;
pub mod http;
pub mod routes;
pub mod server;

pub use config::{ConfigError, VmConfig};

/// An error and its causes on one line (each cause once).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}
