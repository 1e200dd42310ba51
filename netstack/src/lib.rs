//! Host networking for Shoal nodes, done from Rust (the node image has no `ip`, no `dhclient`):
//! the uplink by DHCP or `ip=` (`dhcp`),
//! the cluster network's addressing (`ipam`), names that mark what netstack owns (`names`),
//! rtnetlink operations (`netlink`), egress through nf_tables (`nft`), taps (`tap`) and the reconciler that wires a node's
//! microVMs into their tenants' overlays (`node`).

pub mod dhcp;
pub mod ipam;
pub mod names;
pub mod netlink;
pub mod nft;
pub mod node;
pub mod tap;
