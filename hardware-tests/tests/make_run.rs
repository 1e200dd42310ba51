//! `make run` as a person uses it: in a terminal (tmux here), the host image boots in QEMU, its
//! node forms a one-node cluster, runs the Linux guest as a deployment and the terminal is
//! attached to the guest's console; the guest's `#` prompt appears, a command typed there runs
//! in the guest (through `shoalctl attach`, the node and the shim), `poweroff` ends the microVM,
//! and Enter powers the server off and returns to the host shell with status 0.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_hardware_tests::repo_root;
use shoal_hardware_tests::server::build_image;

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux is installed by `make test`");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        tmux(&["kill-session", "-t", &self.0]);
    }
}

fn wait_for(session: &str, limit: Duration, what: &str, done: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let screen = tmux(&["capture-pane", "-p", "-S", "-200", "-t", session]);
        if done(&screen) {
            return screen;
        }
        assert!(start.elapsed() < limit, "no {what} within {limit:?}; the terminal shows:\n{screen}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn make_run_gives_a_guest_shell_and_poweroff_returns() {
    let guest =
        std::env::var_os("SHOAL_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/guest"));
    assert!(guest.join("vmlinux").exists(), "build first: `make test` does");
    let image = std::env::temp_dir().join(format!("shoal-make-run-image-{}", std::process::id()));
    build_image(&image, "");
    let name = format!("shoal-make-run-{}", std::process::id());
    let cmd = format!(
        "{} {} {}; echo MAKE-RUN-EXITED-$?; sleep 600",
        env!("CARGO_BIN_EXE_shoal-run-image"),
        image.display(),
        guest.display()
    );
    tmux(&["new-session", "-d", "-s", &name, "-x", "160", "-y", "50", &cmd]);
    let _session = Session(name.clone());

    let limit = Duration::from_secs(15 * 60);
    let screen = wait_for(&name, limit, "guest shell prompt", |s| {
        s.contains("Shoal microVM shell") && s.lines().any(|l| l.trim_end() == "#")
    });
    assert!(screen.contains("make run: booting the Shoal host image in QEMU"), "{screen}");
    assert!(screen.contains("shoalctl: attached to linux-"), "the console is the node's: {screen}");
    tmux(&["send-keys", "-t", &name, "echo guest-says-$((6*7)) && uname -s", "Enter"]);
    wait_for(&name, limit, "command output from the guest", |s| s.contains("guest-says-42") && s.contains("Linux"));
    tmux(&["send-keys", "-t", &name, "poweroff", "Enter"]);
    let screen = wait_for(&name, limit, "the offer to power the server off", |s| s.contains("press Enter to power"));
    assert!(screen.contains("is \"exited\""), "the node saw the guest power off: {screen}");
    assert!(screen.contains("get nodes"), "make run says how to try shoalctl: {screen}");
    tmux(&["send-keys", "-t", &name, "Enter"]);
    let screen = wait_for(&name, limit, "return to the host shell", |s| s.contains("MAKE-RUN-EXITED-"));
    assert!(screen.contains("MAKE-RUN-EXITED-0"), "make run did not exit cleanly:\n{screen}");
    let _ = std::fs::remove_dir_all(&image);
}
