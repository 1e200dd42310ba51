//! Per-thread seccomp filters. The allowed system calls of each thread kind are data in
//! vmm/seccomp/x86_64.json (see the README there), compiled to BPF by the build script; a
//! thread installs its filter just before its loop starts, after everything that needs more
//! (opening files, creating the VM). A call outside the list kills the process (SIGSYS).

use seccompiler::sock_filter;

static FILTERS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_filters.bin"));

/// The kinds of threads, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The VMM thread's event loop.
    Vmm,
    /// The API thread and its connection threads.
    Api,
    /// A vCPU thread.
    Vcpu,
}

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
        }
    }
}

/// Whether threads install their filters (`--no-seccomp` turns it off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seccomp {
    On,
    Off,
}

/// Errors installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("no seccomp filter named {0} was built in")]
    Missing(&'static str),
    #[error("cannot install the {0} seccomp filter")]
    Install(&'static str, #[source] seccompiler::Error),
}

/// The compiled filter for `kind`.
pub fn filter(kind: ThreadKind) -> Result<Vec<sock_filter>, SeccompError> {
    let mut rest = FILTERS;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        let (name, tail) = tail.split_at_checked(len).ok_or(SeccompError::Missing(kind.name()))?;
        let (count, tail) = tail.split_at_checked(4).ok_or(SeccompError::Missing(kind.name()))?;
        let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
        let (prog, tail) = tail.split_at_checked(count * 8).ok_or(SeccompError::Missing(kind.name()))?;
        if name == kind.name().as_bytes() {
            return Ok(prog
                .chunks_exact(8)
                .map(|c| sock_filter {
                    code: u16::from_le_bytes([c[0], c[1]]),
                    jt: c[2],
                    jf: c[3],
                    k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                })
                .collect());
        }
        rest = tail;
    }
    Err(SeccompError::Missing(kind.name()))
}

/// Installs `kind`'s filter on the calling thread (threads it starts later inherit it).
pub fn install(kind: ThreadKind, mode: Seccomp) -> Result<(), SeccompError> {
    if mode == Seccomp::Off {
        return Ok(());
    }
    let prog = filter(kind)?;
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install(kind.name(), e))?;
    test_hook(kind);
    Ok(())
}

/// Test-only: with SHOAL_VMM_SECCOMP_SELFTEST naming this thread kind, the thread makes a
/// system call no filter allows (getppid) right after installing its filter, which must kill
/// the process with SIGSYS. The tests use it to prove each filter is in force.
fn test_hook(kind: ThreadKind) {
    if std::env::var("SHOAL_VMM_SECCOMP_SELFTEST").is_ok_and(|v| v == kind.name()) {
        // SAFETY: getppid takes no arguments and touches no memory.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_kind_has_a_filter() {
        for kind in [ThreadKind::Vmm, ThreadKind::Api, ThreadKind::Vcpu] {
            let prog = filter(kind).unwrap();
            assert!(prog.len() > 20, "{kind:?}: {} instructions", prog.len());
        }
    }
}
