//! KVM state: the VM file descriptor with its memory, and the vCPUs that run on it.

pub mod memory;
pub mod vcpu;
pub mod vm;
