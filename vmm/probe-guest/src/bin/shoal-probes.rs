//! `shoal-probes DIR`: copies the built probe guests to DIR/<name>.elf (used by `make probes`).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: shoal-probes DIR");
        return ExitCode::from(2);
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("shoal-probes: cannot create {}: {e}", dir.display());
        return ExitCode::from(1);
    }
    for (name, path) in shoal_probe_guest::ALL {
        let dest = dir.join(format!("{name}.elf"));
        if let Err(e) = std::fs::copy(path, &dest) {
            eprintln!("shoal-probes: cannot copy {path} to {}: {e}", dest.display());
            return ExitCode::from(1);
        }
        println!("{}", dest.display());
    }
    ExitCode::SUCCESS
}
