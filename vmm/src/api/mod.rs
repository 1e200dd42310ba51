//! Configuration and API types (serde). These describe a microVM; `builder` turns them into
//! live objects. Nothing here touches KVM.

pub mod config;

pub use config::{ConfigError, VmConfig};
