//! One process-wide bound on the bytes of upstream answers held in memory while they
//! are read (`--upstream-memory-budget`). Each answer is capped (`intake`), but N
//! polls, creates and event streams at once could each hold a cap's worth: a read
//! takes bytes from this budget before it buffers them (a known length at once,
//! otherwise as its buffer grows) and gives them back when its buffer goes. When the
//! budget is spent a read waits, at most `WAIT`, then fails with an error naming the
//! flag: that read fails (a poll is tried again later, a stream is reattached or
//! polled), never the process.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget without `--upstream-memory-budget`.
pub const DEFAULT_BUDGET_BYTES: usize = 512 << 20;
/// How long a read waits for bytes others hold before it fails.
const WAIT: Duration = Duration::from_secs(10);
/// Bytes are taken in steps of at least this many (fewer wake-ups per body).
const STEP: usize = 64 << 10;

/// The budget, shared by every upstream client of the process.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    sem: Arc<Semaphore>,
    total: usize,
    wait: Duration,
}

/// Bytes one read holds; given back when dropped.
#[derive(Debug, Default)]
pub struct Held(Option<OwnedSemaphorePermit>);

impl Held {
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Gives back what is held beyond `keep` bytes.
    pub fn shrink_to(&mut self, keep: usize) {
        if let Some(p) = &mut self.0 {
            let extra = p.num_permits().saturating_sub(keep);
            if extra > 0 {
                drop(p.split(extra));
            }
        }
    }
}

impl Default for ByteBudget {
    fn default() -> Self {
        Self::new(DEFAULT_BUDGET_BYTES)
    }
}

impl ByteBudget {
    /// A budget of `total` bytes (at most 4 GiB - 1: one wait takes a `u32` of them).
    pub fn new(total: usize) -> Self {
        let total = total.clamp(1, u32::MAX as usize);
        ByteBudget {
            sem: Arc::new(Semaphore::new(total)),
            total,
            wait: WAIT,
        }
    }

    /// The same budget with another bound on a wait (tests).
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes no read holds now.
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }

    /// Makes `held` cover at least `need` bytes, waiting at most the bound for them.
    pub async fn reserve(&self, held: &mut Held, need: usize) -> Result<(), String> {
        let have = held.bytes();
        if need <= have {
            return Ok(());
        }
        if need > self.total {
            return Err(format!(
                "an upstream answer needs over {need} bytes in memory, more than all upstream answers together may hold (--upstream-memory-budget {}, HEARTH_UPSTREAM_MEMORY_BUDGET)",
                self.total
            ));
        }
        let want = need.max(have + STEP).min(self.total) - have;
        // `total` fits a u32, so does any part of it.
        let n = u32::try_from(want).unwrap_or(u32::MAX);
        match tokio::time::timeout(self.wait, self.sem.clone().acquire_many_owned(n)).await {
            Ok(Ok(p)) => {
                match &mut held.0 {
                    Some(h) => h.merge(p),
                    None => held.0 = Some(p),
                }
                Ok(())
            }
            Ok(Err(_)) => Err("the upstream memory budget is closed".into()),
            Err(_) => Err(format!(
                "upstream answers being read hold all of --upstream-memory-budget ({} bytes, HEARTH_UPSTREAM_MEMORY_BUDGET) and {want} more bytes did not free up within {}s",
                self.total,
                self.wait.as_secs_f64()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_wait_for_the_budget_then_fail_and_give_bytes_back() {
        let b = ByteBudget::new(1 << 20).with_wait(Duration::from_millis(100));
        let mut a = Held::default();
        b.reserve(&mut a, 700 << 10).await.unwrap();
        assert_eq!(a.bytes(), 700 << 10);
        assert_eq!(b.available(), 324 << 10);
        // More than is left: waits, then fails naming the flag; nothing taken.
        let mut c = Held::default();
        let e = b.reserve(&mut c, 500 << 10).await.unwrap_err();
        assert!(e.contains("--upstream-memory-budget"), "{e}");
        assert_eq!(c.bytes(), 0);
        // Growing takes a step at least; shrinking gives back.
        b.reserve(&mut a, (700 << 10) + 1).await.unwrap();
        assert_eq!(a.bytes(), (700 << 10) + STEP);
        a.shrink_to(100 << 10);
        assert_eq!(b.available(), (1 << 20) - (100 << 10));
        b.reserve(&mut c, 500 << 10).await.unwrap();
        drop((a, c));
        assert_eq!(b.available(), 1 << 20);
        // Larger than the whole budget: refused at once (no wait could help).
        let e = b
            .reserve(&mut Held::default(), (1 << 20) + 1)
            .await
            .unwrap_err();
        assert!(e.contains("more than all upstream answers together"), "{e}");
    }
}
