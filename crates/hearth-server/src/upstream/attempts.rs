//! What both runners (`runner` for Replicate-compatible upstreams, `cog_runner` for
//! Cog containers) do alike with a create's answer: a refusal goes to the caller
//! unchanged when the create is still waiting for it (else the prediction fails
//! saying why), and a create that could not connect is tried again a bounded number
//! of times with a growing pause.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::runner::{End, First, Job};

/// Creates that could not connect are tried this many times.
const CONNECT_ATTEMPTS: u32 = 3;
/// Most of an upstream's refusal kept in the prediction's error.
const REFUSAL_DETAIL_CHARS: usize = 2000;

/// How a refused create ends: the caller's create hears the refusal as it came (and
/// the prediction ends without a webhook), or, with nobody waiting (after a throttle,
/// a restart), the prediction fails with `who`'s answer in its error.
pub(super) fn refused(
    first: &mut Option<oneshot::Sender<First>>,
    who: &str,
    status: u16,
    body: Vec<u8>,
    content_type: String,
) -> End {
    let detail: String = String::from_utf8_lossy(&body)
        .chars()
        .take(REFUSAL_DETAIL_CHARS)
        .collect();
    let error = format!("{who} refused the input ({status}): {detail}");
    match first.take() {
        Some(tx) => {
            let _ = tx.send(First::Rejected {
                status,
                body,
                content_type,
            });
            End::Refused(error)
        }
        None => End::Failed(error),
    }
}

/// Counts creates that could not connect to one upstream.
#[derive(Default)]
pub(super) struct ConnectRetry {
    failures: u32,
}

impl ConnectRetry {
    /// After a create that could not connect (`e`): counts it against the upstream's
    /// breaker, then waits before the next try (noted in the logs), or ends the
    /// prediction when the tries are spent or the pause would pass `deadline`.
    pub(super) async fn after(
        &mut self,
        job: &Job,
        who: &str,
        e: &str,
        deadline: Option<Instant>,
    ) -> Result<(), End> {
        job.client.breaker.failure();
        self.failures += 1;
        let backoff = Duration::from_millis(500 << self.failures.min(4));
        if self.failures >= CONNECT_ATTEMPTS
            || deadline.is_some_and(|d| Instant::now() + backoff > d)
        {
            return Err(End::Failed(format!("{who} is unreachable: {e}")));
        }
        let mut note = who.to_string();
        if let Some(c) = note.get_mut(..1) {
            c.make_ascii_uppercase();
        }
        job.note(format!("{note} could not be reached ({e}): trying again."));
        tokio::time::sleep(backoff).await;
        Ok(())
    }
}
