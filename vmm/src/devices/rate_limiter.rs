//! Token-bucket rate limiting for devices (bytes and operations, each with an optional
//! one-time burst), in the shape Firecracker's users know: a bucket of `size` tokens refilled
//! completely every `refill_time_ms`, plus `one_time_burst` extra tokens used first.
//!
//! A device asks `has_room` before taking a request and `consume`s what the request moved.
//! A request is never split: one that costs more than is left drives the bucket negative, and
//! the device then waits (`blocked_for`) until it has refilled back above zero. Over time the
//! rate converges on the configured one.

use std::time::{Duration, Instant};

pub use shoal_vmm_config::{BucketConfig, RateLimitConfig, MAX_REFILL_MS, MAX_TOKENS};

/// The longest a device is told to wait at once; it asks again afterwards, so a bucket whose
/// debt would take longer to repay still converges on its rate.
const MAX_WAIT: Duration = Duration::from_secs(60 * 60);

#[derive(Debug)]
struct Bucket {
    size: u64,
    refill: Duration,
    /// Tokens available; negative after a request larger than what was left.
    tokens: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    fn new(c: &BucketConfig, now: Instant) -> Bucket {
        Bucket {
            // Clamped as well as validated: a bucket never divides by zero or by a refill
            // time whose arithmetic overflows, whatever configuration reached it.
            size: c.size.clamp(1, MAX_TOKENS),
            refill: Duration::from_millis(c.refill_time.clamp(1, MAX_REFILL_MS)),
            tokens: c.size.clamp(1, MAX_TOKENS) as f64,
            burst: c.one_time_burst.min(MAX_TOKENS) as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let add = self.size as f64 * elapsed / self.refill.as_secs_f64();
        self.tokens = (self.tokens + add).min(self.size as f64);
    }

    fn consume(&mut self, n: u64) {
        let mut n = n as f64;
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        n -= from_burst;
        self.tokens -= n;
    }

    /// Time until tokens are back above zero, at most `MAX_WAIT`.
    fn blocked_for(&self) -> Option<Duration> {
        (self.tokens <= 0.0 && self.burst <= 0.0).then(|| {
            let secs = (-self.tokens + 1.0) * self.refill.as_secs_f64() / self.size as f64;
            Duration::try_from_secs_f64(secs).map_or(MAX_WAIT, |d| d.min(MAX_WAIT))
        })
    }
}

/// Limits for one device.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<Bucket>,
    ops: Option<Bucket>,
}

impl RateLimiter {
    pub fn new(c: &RateLimitConfig) -> RateLimiter {
        let now = Instant::now();
        RateLimiter {
            bandwidth: c.bandwidth.as_ref().map(|b| Bucket::new(b, now)),
            ops: c.ops.as_ref().map(|b| Bucket::new(b, now)),
        }
    }

    fn refill(&mut self, now: Instant) {
        self.bandwidth.iter_mut().chain(self.ops.iter_mut()).for_each(|b| b.refill(now));
    }

    /// True when another request may start now.
    pub fn has_room(&mut self) -> bool {
        self.refill(Instant::now());
        self.blocked_for_now().is_none()
    }

    fn blocked_for_now(&self) -> Option<Duration> {
        self.bandwidth.iter().chain(self.ops.iter()).filter_map(Bucket::blocked_for).max()
    }

    /// Records a request of `ops` operations and `bytes` bytes.
    pub fn consume(&mut self, ops: u64, bytes: u64) {
        if let Some(b) = self.bandwidth.as_mut() {
            b.consume(bytes);
        }
        if let Some(b) = self.ops.as_mut() {
            b.consume(ops);
        }
    }

    /// How long until `has_room` can be true, if it is not now.
    pub fn blocked_for(&self) -> Option<Duration> {
        let mut copy = RateLimiter {
            bandwidth: self.bandwidth.as_ref().map(clone_bucket),
            ops: self.ops.as_ref().map(clone_bucket),
        };
        copy.refill(Instant::now());
        copy.blocked_for_now()
    }
}

fn clone_bucket(b: &Bucket) -> Bucket {
    Bucket { size: b.size, refill: b.refill, tokens: b.tokens, burst: b.burst, last: b.last }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drained_bucket_blocks_until_it_refills() {
        let c = RateLimitConfig {
            bandwidth: Some(BucketConfig { size: 1000, one_time_burst: 500, refill_time: 100 }),
            ops: None,
        };
        let mut l = RateLimiter::new(&c);
        assert!(l.has_room());
        l.consume(1, 1500); // burst, then the whole bucket
        assert!(l.has_room() || l.blocked_for().is_some());
        l.consume(1, 1000);
        assert!(!l.has_room());
        let wait = l.blocked_for().unwrap();
        assert!(wait > Duration::from_millis(50) && wait <= Duration::from_millis(101), "{wait:?}");
        std::thread::sleep(wait + Duration::from_millis(5));
        assert!(l.has_room());
    }

    #[test]
    fn extreme_settings_are_refused_and_never_panic_a_device() {
        // Accepted before bounds existed: one token per u64::MAX milliseconds. The first
        // request left a debt whose wait overflowed `Duration::from_secs_f64` and panicked.
        let extreme = BucketConfig { size: 1, one_time_burst: 0, refill_time: u64::MAX };
        assert!(extreme.validate().is_err());
        for bucket in [
            extreme,
            BucketConfig { size: u64::MAX, one_time_burst: u64::MAX, refill_time: 1 },
            BucketConfig { size: 0, one_time_burst: 0, refill_time: 0 },
        ] {
            let c = RateLimitConfig { bandwidth: Some(bucket), ops: Some(bucket) };
            let mut l = RateLimiter::new(&c);
            for _ in 0..3 {
                if l.has_room() {
                    l.consume(u64::MAX, u64::MAX);
                }
                let wait = l.blocked_for();
                assert!(wait.is_none_or(|w| w <= MAX_WAIT), "{bucket:?}: {wait:?}");
            }
        }
        let most = BucketConfig { size: MAX_TOKENS, one_time_burst: MAX_TOKENS, refill_time: MAX_REFILL_MS };
        assert!(most.validate().is_ok());
    }
}
