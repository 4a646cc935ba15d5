//! A circuit breaker per upstream: after `failures` consecutive failed calls it opens
//! for `cooldown` (new creates are not sent; `fallback` routes stay local), then lets
//! one probe through (half-open); the probe's success closes it, its failure opens it
//! again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `--upstream-failures` and `--upstream-cooldown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failures: u32,
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 5,
            cooldown: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    consecutive: u32,
    open_until: Option<Instant>,
    probe_out: bool,
    opened_total: u64,
}

pub struct Breaker {
    cfg: BreakerConfig,
    state: Mutex<State>,
}

/// What the breaker says now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

impl Circuit {
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half-open",
        }
    }
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: Mutex::new(State::default()),
        }
    }

    /// May a create be sent now? Past the cool-down the first caller is the probe
    /// (the others wait for its answer). Err: how long until the next probe.
    pub fn allow(&self) -> Result<(), Duration> {
        let Ok(mut s) = self.state.lock() else {
            return Ok(());
        };
        match s.open_until {
            None => Ok(()),
            Some(until) => {
                let now = Instant::now();
                if now < until {
                    Err(until - now)
                } else if s.probe_out {
                    Err(Duration::from_secs(1))
                } else {
                    s.probe_out = true;
                    Ok(())
                }
            }
        }
    }

    /// Would `allow` let a create through (without taking the probe)?
    pub fn is_closed(&self) -> bool {
        self.circuit() == Circuit::Closed
    }

    pub fn success(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.consecutive = 0;
            s.open_until = None;
            s.probe_out = false;
        }
    }

    pub fn failure(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.consecutive = s.consecutive.saturating_add(1);
            let probing = s.open_until.is_some();
            if probing || s.consecutive >= self.cfg.failures {
                if !probing {
                    s.opened_total += 1;
                }
                s.open_until = Some(Instant::now() + self.cfg.cooldown);
                s.probe_out = false;
            }
        }
    }

    pub fn circuit(&self) -> Circuit {
        let Ok(s) = self.state.lock() else {
            return Circuit::Closed;
        };
        match s.open_until {
            None => Circuit::Closed,
            Some(until) if Instant::now() < until => Circuit::Open,
            Some(_) => Circuit::HalfOpen,
        }
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.state.lock().map(|s| s.consecutive).unwrap_or(0)
    }

    pub fn opened_total(&self) -> u64 {
        self.state.lock().map(|s| s.opened_total).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cool-down over, as if `cooldown` had passed. A real wait would need a
    /// short cool-down, which a loaded machine can pass between two lines that
    /// expect the circuit still open.
    fn cool_down(b: &Breaker) {
        b.state.lock().unwrap().open_until = Some(Instant::now());
    }

    #[test]
    fn opens_after_consecutive_failures_and_a_probe_closes_it() {
        let cooldown = Duration::from_secs(3600);
        let b = Breaker::new(BreakerConfig {
            failures: 3,
            cooldown,
        });
        b.failure();
        b.failure();
        b.success();
        b.failure();
        b.failure();
        assert_eq!(b.circuit(), Circuit::Closed);
        assert!(b.allow().is_ok());
        b.failure();
        assert_eq!(b.circuit(), Circuit::Open);
        let wait = b.allow().unwrap_err();
        assert!(
            wait <= cooldown && wait > cooldown - Duration::from_secs(60),
            "{wait:?}"
        );
        cool_down(&b);
        assert_eq!(b.circuit(), Circuit::HalfOpen);
        assert!(b.allow().is_ok(), "the probe");
        assert!(b.allow().is_err(), "one probe at a time");
        b.failure();
        assert_eq!(b.circuit(), Circuit::Open, "a failed probe opens it again");
        assert!(b.allow().unwrap_err() > cooldown - Duration::from_secs(60));
        cool_down(&b);
        assert!(b.allow().is_ok());
        b.success();
        assert_eq!(b.circuit(), Circuit::Closed);
        assert_eq!(b.opened_total(), 1);
    }
}
