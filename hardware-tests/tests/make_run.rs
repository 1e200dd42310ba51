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

/// One tmux server of this test's own (its own socket), so neither a user's tmux nor another
/// run's is touched, and its `$SHELL` (which CI may set to a login-refusing shell) is never used:
/// the session's command is given as a program and its arguments.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out =
            Command::new("tmux").args(["-L", &self.0]).args(args).output().expect("tmux is installed by `make test`");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }

    fn screen(&self, limit: Duration, what: &str, done: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let (ok, screen, err) = self.run(&["capture-pane", "-p", "-S", "-200", "-t", &self.0]);
            assert!(ok, "the terminal is gone before {what}: tmux says {err}");
            if done(&screen) {
                return screen;
            }
            assert!(start.elapsed() < limit, "no {what} within {limit:?}; the terminal shows:\n{screen}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.0];
        args.extend_from_slice(keys);
        let (ok, _, err) = self.run(&args);
        assert!(ok, "cannot type into the terminal: {err}");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
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
    let term = Tmux(name.clone());
    let (ok, _, err) = term.run(&["new-session", "-d", "-s", &name, "-x", "160", "-y", "50", "/bin/sh", "-c", &cmd]);
    assert!(ok, "tmux cannot start the terminal: {err}");

    let limit = Duration::from_secs(15 * 60);
    let screen = term.screen(limit, "guest shell prompt", |s| {
        s.contains("Shoal microVM shell") && s.lines().any(|l| l.trim_end() == "#")
    });
    assert!(screen.contains("make run: booting the Shoal host image in QEMU"), "{screen}");
    assert!(screen.contains("shoalctl: attached to linux-"), "the console is the node's: {screen}");
    term.keys(&["echo guest-says-$((6*7)) && uname -s", "Enter"]);
    term.screen(limit, "command output from the guest", |s| s.contains("guest-says-42") && s.contains("Linux"));
    term.keys(&["poweroff", "Enter"]);
    let screen = term.screen(limit, "the offer to power the server off", |s| s.contains("press Enter to power"));
    assert!(screen.contains("is \"exited\""), "the node saw the guest power off: {screen}");
    assert!(screen.contains("get nodes"), "make run says how to try shoalctl: {screen}");
    term.keys(&["Enter"]);
    let screen = term.screen(limit, "return to the host shell", |s| s.contains("MAKE-RUN-EXITED-"));
    assert!(screen.contains("MAKE-RUN-EXITED-0"), "make run did not exit cleanly:\n{screen}");
    let _ = std::fs::remove_dir_all(&image);
}
