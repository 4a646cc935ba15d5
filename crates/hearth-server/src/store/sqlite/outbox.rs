//! The webhook outbox: deliveries written before they are attempted, so a restart
//! loses none. Each prediction's deliveries go out one at a time in order (so
//! `completed` is always last); an intermediate event not yet tried is replaced by a
//! newer one rather than queued behind it (Replicate's style), or dropped once enough
//! newer ones wait behind it (Cog's), so a slow receiver never grows the queue.

use rusqlite::{params, Connection};

use super::SqliteDb;
use crate::store::{
    outbox_host, OutboxItem, OutboxRow, StoreError, CLAIM_FOR, PER_HOST_IN_FLIGHT, SUPERSEDED_AFTER,
};

impl SqliteDb {
    pub(super) fn outbox_push(
        &self,
        item: &OutboxItem,
        coalesce: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        push_on(&*self.writer()?, item, coalesce, now_ms)
    }

    pub(super) fn outbox_claim(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let per_host = PER_HOST_IN_FLIGHT;
        let conn = self.writer()?;
        let tx = conn.unchecked_transaction()?;
        // A receiver far behind gets the latest state, not every state in between:
        // intermediate deliveries with `SUPERSEDED_AFTER` newer ones of their prediction
        // queued are dropped (each carries the whole output so far).
        tx.execute(
            "DELETE FROM webhook_outbox WHERE seq IN (
                SELECT seq FROM (
                    SELECT seq, event, claimed, claimed_until_ms,
                           ROW_NUMBER() OVER (PARTITION BY prediction_id ORDER BY seq DESC) AS rn
                    FROM webhook_outbox
                    WHERE prediction_id IN (SELECT prediction_id FROM webhook_outbox
                                            GROUP BY prediction_id HAVING COUNT(*) > ?2))
                WHERE rn > ?2 AND (claimed = 0 OR claimed_until_ms <= ?1)
                  AND event IN ('output', 'logs', 'cog.output', 'cog.logs'))",
            params![now_ms, SUPERSEDED_AFTER as i64],
        )?;
        let rows: Vec<OutboxRow> = {
            // The oldest due delivery of each prediction; hosts take turns, and none
            // has more than `per_host` out at once (counting what is out already).
            let mut stmt = tx.prepare(
                "WITH heads AS (
                    SELECT o.seq, o.host FROM webhook_outbox o
                    WHERE (o.claimed = 0 OR o.claimed_until_ms <= ?1) AND o.due_unix_ms <= ?1
                      AND o.seq = (SELECT MIN(seq) FROM webhook_outbox WHERE prediction_id = o.prediction_id)
                 ), busy AS (
                    SELECT host, COUNT(*) AS n FROM webhook_outbox
                    WHERE claimed = 1 AND claimed_until_ms > ?1 GROUP BY host
                 ), ranked AS (
                    SELECT h.seq, ROW_NUMBER() OVER (PARTITION BY h.host ORDER BY h.seq)
                                  + COALESCE(b.n, 0) AS load
                    FROM heads h LEFT JOIN busy b ON b.host = h.host
                 )
                 SELECT w.seq, w.prediction_id, w.msg_id, w.url, w.event, w.body, w.attempts,
                        w.max_attempts
                 FROM webhook_outbox w JOIN ranked r ON r.seq = w.seq
                 WHERE r.load <= ?3
                 ORDER BY r.load, w.seq LIMIT ?2",
            )?;
            let it = stmt.query_map(params![now_ms, limit as i64, per_host as i64], |r| {
                Ok(OutboxRow {
                    seq: r.get(0)?,
                    prediction_id: r.get(1)?,
                    msg_id: r.get(2)?,
                    url: r.get(3)?,
                    event: r.get(4)?,
                    body: r.get(5)?,
                    attempts: r.get::<_, u32>(6)? + 1,
                    max_attempts: r.get(7)?,
                })
            })?;
            it.collect::<Result<_, _>>()?
        };
        let until = now_ms + CLAIM_FOR.as_millis() as i64;
        for r in &rows {
            tx.execute(
                "UPDATE webhook_outbox SET claimed = 1, claimed_until_ms = ?2, attempts = attempts + 1
                 WHERE seq = ?1",
                params![r.seq, until],
            )?;
        }
        tx.commit()?;
        let mut rows = rows;
        rows.sort_by_key(|r| r.seq);
        Ok(rows)
    }

    pub(super) fn outbox_remove(&self, seq: i64) -> Result<(), StoreError> {
        self.writer()?
            .execute("DELETE FROM webhook_outbox WHERE seq = ?1", params![seq])?;
        Ok(())
    }

    pub(super) fn outbox_retry_at(&self, seq: i64, due_ms: i64) -> Result<(), StoreError> {
        self.writer()?.execute(
            "UPDATE webhook_outbox SET claimed = 0, claimed_until_ms = 0, due_unix_ms = ?2
             WHERE seq = ?1",
            params![seq, due_ms],
        )?;
        Ok(())
    }

    pub(super) fn outbox_release_claims(&self) -> Result<usize, StoreError> {
        Ok(self.writer()?.execute(
            "UPDATE webhook_outbox SET claimed = 0, claimed_until_ms = 0 WHERE claimed = 1",
            [],
        )?)
    }

    pub(super) fn outbox_len(&self) -> Result<usize, StoreError> {
        Ok(self
            .conn()?
            .query_row("SELECT COUNT(*) FROM webhook_outbox", [], |r| {
                r.get::<_, i64>(0)
            })? as usize)
    }

    pub(super) fn outbox_due(&self, now_ms: i64) -> Result<usize, StoreError> {
        Ok(self.conn()?.query_row(
            "SELECT COUNT(*) FROM webhook_outbox
             WHERE (claimed = 0 OR claimed_until_ms <= ?1) AND due_unix_ms <= ?1",
            params![now_ms],
            |r| r.get::<_, i64>(0),
        )? as usize)
    }

    /// The secret is a file in the data dir (where it was before stores had
    /// replicas to share it with): read it, or write `fresh` there when there is none.
    /// One that is there but cannot be read or is not a secret is an error naming the
    /// file: replacing it would make receivers reject every signature from now on.
    pub(super) fn webhook_secret(&self, fresh: &str) -> Result<String, StoreError> {
        let path = self.data_dir.join("webhook_secret");
        let bad = |reason: String| StoreError::Secret {
            path: path.clone(),
            reason,
        };
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let s = s.trim();
                crate::store::check_secret(s).map_err(|why| bad(why.into()))?;
                Ok(s.to_string())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::store::write_private_atomic(&path, fresh)
                    .map_err(|e| bad(format!("cannot write it: {e}")))?;
                Ok(fresh.to_string())
            }
            Err(e) => Err(bad(format!("cannot read it: {e}"))),
        }
    }
}

/// Queues a delivery (see `Store::outbox_push`), on the connection or inside a
/// transaction.
pub(super) fn push_on(
    conn: &Connection,
    item: &OutboxItem,
    coalesce: bool,
    now_ms: i64,
) -> Result<(), StoreError> {
    if coalesce {
        let n = conn.execute(
            "UPDATE webhook_outbox SET event = ?2, body = ?3, due_unix_ms = ?4
             WHERE seq = (SELECT MAX(seq) FROM webhook_outbox WHERE prediction_id = ?1)
               AND attempts = 0 AND claimed = 0 AND event IN ('output', 'logs')",
            params![item.prediction_id, item.event, item.body, now_ms],
        )?;
        if n > 0 {
            return Ok(());
        }
    }
    conn.execute(
        "INSERT INTO webhook_outbox (prediction_id, msg_id, url, event, body, max_attempts, due_unix_ms, host)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            item.prediction_id,
            item.msg_id,
            item.url,
            item.event,
            item.body,
            item.max_attempts,
            now_ms,
            outbox_host(item.url)
        ],
    )?;
    Ok(())
}
