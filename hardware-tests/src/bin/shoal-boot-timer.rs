//! `shoal-boot-timer MARKER -- CMD ARGS...`: runs CMD with its stdout piped, echoes every line,
//! and prints `boot_timer marker_ms=<ms from spawn to the first line containing MARKER>` and
//! `boot_timer exit=<code> total_ms=<ms>`. Runs inside the emulated server, where busybox has
//! no sub-second clock.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(marker), Some(sep)) = (args.first(), args.iter().position(|a| a == "--")) else {
        eprintln!("usage: shoal-boot-timer MARKER -- CMD ARGS...");
        return ExitCode::from(2);
    };
    let Some(cmd) = args.get(sep + 1) else {
        eprintln!("usage: shoal-boot-timer MARKER -- CMD ARGS...");
        return ExitCode::from(2);
    };
    let start = Instant::now();
    let mut child = match Command::new(cmd).args(&args[sep + 2..]).stdout(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shoal-boot-timer: cannot run {cmd}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut marker_ms = None;
    if let Some(out) = child.stdout.take() {
        let stdout = std::io::stdout();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if marker_ms.is_none() && line.contains(marker.as_str()) {
                marker_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
            }
            let _ = writeln!(stdout.lock(), "{line}");
        }
    }
    let status = child.wait().map(|s| s.code().unwrap_or(-1)).unwrap_or(-1);
    let total = start.elapsed().as_secs_f64() * 1000.0;
    match marker_ms {
        Some(ms) => println!("boot_timer marker_ms={ms:.1}"),
        None => println!("boot_timer marker_ms=none"),
    }
    println!("boot_timer exit={status} total_ms={total:.1}");
    ExitCode::SUCCESS
}
