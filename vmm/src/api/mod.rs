//! The control API: the configuration file's forms (`config`; the types themselves are the
//! `shoal_vmm_config` crate's), HTTP parsing (`http`), the resources (`routes`), the server
//! thread (`server`), and the requests it hands the VMM thread (`request`). Nothing here
//! touches KVM, builds a machine or reads a snapshot: the dependencies point one way,
//! api -> config <- builder <- snapshot, and `controller` (on the VMM thread) decides what
//! the API asks.

pub mod config;
pub mod http;
pub mod request;
pub mod routes;
pub mod server;

pub use config::{ConfigError, VmConfig};

pub use crate::error_chain;
