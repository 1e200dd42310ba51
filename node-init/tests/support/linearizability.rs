//! A linearizability checker for histories of single-register operations (one register per key),
//! after Wing & Gong with Lowe's memoisation: search for an order of the operations that respects
//! real time (an operation that completed before another began comes first) and in which every
//! read returns the latest write. Writes whose outcome is unknown (timeouts) may take effect at
//! any point after they began, or never. Reads that failed are left out: they observed nothing.

use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Write(String),
    /// What the read returned (None: the key was absent).
    Read(Option<String>),
}

#[derive(Debug, Clone)]
pub struct Operation {
    pub client: usize,
    pub kind: Kind,
    /// Nanoseconds since the history began.
    pub invoked: u128,
    /// None: the outcome is unknown (only for writes).
    pub completed: Option<u128>,
}

/// Checks one register's history. Err carries a description of the longest linearizable prefix.
pub fn check(history: &[Operation]) -> Result<(), String> {
    // An unknown write nobody read can be dropped: in any valid order that includes it, no read
    // sits between it and the next write, so the order stays valid without it. One somebody read
    // did happen, at an unknown time: it must be placed, and it bounds nothing.
    let observed: HashSet<&String> = history
        .iter()
        .filter_map(|o| match &o.kind {
            Kind::Read(Some(v)) => Some(v),
            _ => None,
        })
        .collect();
    let history: Vec<Operation> = history
        .iter()
        .filter_map(|o| match (&o.kind, o.completed) {
            (Kind::Write(v), None) if !observed.contains(v) => None,
            (Kind::Write(_), None) => Some(Operation { completed: Some(u128::MAX), ..o.clone() }),
            _ => Some(o.clone()),
        })
        .collect();
    let n = history.len();
    let words = n.div_ceil(64).max(1);
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut stack: Vec<(Vec<u64>, Option<String>)> = vec![(vec![0; words], None)];
    let must = history.iter().filter(|o| o.completed.is_some()).count();
    let mut best = 0usize;
    while let Some((done, value)) = stack.pop() {
        let linearized_completed =
            (0..n).filter(|&i| done[i / 64] >> (i % 64) & 1 == 1 && history[i].completed.is_some()).count();
        if linearized_completed == must {
            return Ok(());
        }
        best = best.max(linearized_completed);
        if !seen.insert((done.clone(), value.clone())) {
            continue;
        }
        // The earliest completion among operations not yet placed bounds what may go next.
        let horizon = (0..n)
            .filter(|&i| done[i / 64] >> (i % 64) & 1 == 0)
            .filter_map(|i| history[i].completed)
            .min()
            .unwrap_or(u128::MAX);
        for i in 0..n {
            if done[i / 64] >> (i % 64) & 1 == 1 || history[i].invoked > horizon {
                continue;
            }
            let next_value = match &history[i].kind {
                Kind::Write(v) => Some(v.clone()),
                Kind::Read(r) if *r == value => value.clone(),
                Kind::Read(_) => continue,
            };
            let mut next = done.clone();
            next[i / 64] |= 1 << (i % 64);
            stack.push((next, next_value));
        }
    }
    Err(format!("not linearizable: at most {best} of {must} completed operations could be ordered"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, kind: Kind, invoked: u128, completed: Option<u128>) -> Operation {
        Operation { client, kind, invoked, completed }
    }
    fn w(v: &str) -> Kind {
        Kind::Write(v.into())
    }
    fn r(v: Option<&str>) -> Kind {
        Kind::Read(v.map(str::to_string))
    }

    #[test]
    fn sequential_histories_check_as_expected() {
        let ok = [op(0, w("a"), 0, Some(1)), op(0, r(Some("a")), 2, Some(3))];
        assert!(check(&ok).is_ok());
        let stale = [op(0, w("a"), 0, Some(1)), op(0, w("b"), 2, Some(3)), op(1, r(Some("a")), 4, Some(5))];
        assert!(check(&stale).is_err(), "a read after b completed cannot return a");
        let from_nowhere = [op(0, r(Some("x")), 0, Some(1))];
        assert!(check(&from_nowhere).is_err());
        assert!(check(&[op(0, r(None), 0, Some(1))]).is_ok());
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // The read overlaps the write: it may see the old or the new value.
        for seen in [None, Some("a")] {
            let h = [op(0, w("a"), 0, Some(10)), op(1, r(seen), 5, Some(6))];
            assert!(check(&h).is_ok());
        }
        // Two reads in real-time order cannot see new then old.
        let flip = [op(0, w("a"), 0, Some(100)), op(1, r(Some("a")), 5, Some(6)), op(2, r(None), 7, Some(8))];
        assert!(check(&flip).is_err());
    }

    #[test]
    fn unknown_writes_may_apply_late_or_never() {
        let never = [op(0, w("a"), 0, None), op(1, r(None), 50, Some(60))];
        assert!(check(&never).is_ok());
        let late = [op(0, w("a"), 0, None), op(1, r(None), 50, Some(60)), op(1, r(Some("a")), 70, Some(80))];
        assert!(check(&late).is_ok());
        // But not before it began.
        let early = [op(1, r(Some("a")), 0, Some(5)), op(0, w("a"), 10, None)];
        assert!(check(&early).is_err());
        // And once seen, it cannot un-happen.
        let undone = [op(0, w("a"), 0, None), op(1, r(Some("a")), 50, Some(60)), op(1, r(None), 70, Some(80))];
        assert!(check(&undone).is_err());
    }
}
