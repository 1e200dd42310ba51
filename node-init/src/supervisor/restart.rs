//! What happens when a microVM ends by itself: the restart policy and the back-off between
//! restarts of a crash loop (Kubernetes' CrashLoopBackOff, shorter). Pure: the caller passes
//! the time.

use std::time::Duration;

use crate::state::objects::{InstanceState, Millis, RestartPolicy};

use super::layout::Meta;

/// The first delay before a restart; it doubles with every failure in a row.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// The longest delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A run this long resets the back-off.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// The delay before restart number `failures` in a row (1 → the base).
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    (BACKOFF_BASE * 2u32.saturating_pow(exp)).min(BACKOFF_MAX)
}

/// Records a run that ended with `code` at `at` (or a start that failed: `code` None) in `meta`,
/// and decides whether and when it starts again. Returns the state to report.
pub fn on_exit(meta: &mut Meta, policy: RestartPolicy, code: Option<i32>, why: &str, at: Millis) -> InstanceState {
    let ran_for = meta.started_at.filter(|_| code.is_some()).map(|s| at.saturating_sub(s)).unwrap_or(0);
    if Duration::from_millis(ran_for) >= HEALTHY_RUN {
        meta.consecutive_failures = 0;
    }
    meta.last_exit_code = code;
    meta.finished_at = Some(at);
    let clean = code == Some(0);
    let state = if clean { InstanceState::Exited } else { InstanceState::Failed };
    let restart = match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !clean,
        RestartPolicy::Never => false,
    };
    if !restart {
        meta.done = true;
        meta.next_start_at = None;
        meta.reason = why.to_string();
        return state;
    }
    meta.consecutive_failures = meta.consecutive_failures.saturating_add(1);
    let delay = backoff(meta.consecutive_failures);
    meta.next_start_at = Some(at.saturating_add(delay.as_millis() as u64));
    meta.reason = format!("{why}; restarting in {} s (back-off)", delay.as_secs());
    state
}

/// Why a run ended, in words, from shoal-vmm's exit status.
pub fn describe_exit(code: i32) -> String {
    match code {
        0 => "the guest shut down".to_string(),
        1 => "shoal-vmm could not start the microVM".to_string(),
        2 => "the guest crashed (exit status 2)".to_string(),
        c if c > 128 => format!("shoal-vmm was killed by signal {}", c - 128),
        c => format!("shoal-vmm exited with status {c}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            tenant: "t".into(),
            id: "i".into(),
            uid: "u".into(),
            jail_uid: 1,
            restarts: 0,
            consecutive_failures: 0,
            last_exit_code: None,
            started_at: Some(0),
            finished_at: None,
            next_start_at: None,
            reason: String::new(),
            done: false,
        }
    }

    #[test]
    fn a_crash_loop_waits_longer_each_time_up_to_a_minute() {
        let delays: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        let mut m = meta();
        let mut at = 100;
        let mut waits = Vec::new();
        for _ in 0..4 {
            m.started_at = Some(at);
            at += 50;
            assert_eq!(on_exit(&mut m, RestartPolicy::Always, Some(2), "crashed", at), InstanceState::Failed);
            waits.push(m.next_start_at.unwrap() - at);
            at = m.next_start_at.unwrap();
        }
        assert_eq!(waits, [1000, 2000, 4000, 8000]);
        assert!(m.reason.contains("restarting in 8 s"), "{}", m.reason);
        // A run that lasted resets the back-off.
        m.started_at = Some(at);
        on_exit(&mut m, RestartPolicy::Always, Some(2), "crashed", at + 61_000);
        assert_eq!(m.consecutive_failures, 1);
    }

    #[test]
    fn policies_decide_what_ends_for_good() {
        let mut m = meta();
        assert_eq!(on_exit(&mut m, RestartPolicy::OnFailure, Some(0), "done", 10), InstanceState::Exited);
        assert!(m.done && m.next_start_at.is_none());
        let mut m = meta();
        on_exit(&mut m, RestartPolicy::OnFailure, Some(2), "crashed", 10);
        assert!(!m.done && m.next_start_at.is_some());
        let mut m = meta();
        assert_eq!(on_exit(&mut m, RestartPolicy::Never, Some(2), "crashed", 10), InstanceState::Failed);
        assert!(m.done);
        let mut m = meta();
        assert_eq!(on_exit(&mut m, RestartPolicy::Always, None, "no kernel", 10), InstanceState::Failed);
        assert_eq!(m.last_exit_code, None);
    }
}
