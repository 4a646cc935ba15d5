//! The shared webhook outbox. Replicas claim deliveries with `FOR UPDATE SKIP
//! LOCKED`, so each is out with one replica at a time; a claim expires after
//! `CLAIM_FOR`, so a delivery whose replica died mid-attempt is made by another.
//! Per prediction, only the oldest delivery can be claimed: `completed` stays last.
//! Hosts take turns, each with `PER_HOST_IN_FLIGHT` deliveries out at most (counted
//! across replicas).

use deadpool_postgres::GenericClient;

use super::PgStore;
use crate::store::{
    outbox_host, OutboxItem, OutboxRow, StoreError, CLAIM_FOR, PER_HOST_IN_FLIGHT, SUPERSEDED_AFTER,
};

impl PgStore {
    pub(super) async fn outbox_push(
        &self,
        item: &OutboxItem<'_>,
        coalesce: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let c = self.writer().await?;
        push_on(&c, item, coalesce, now_ms).await
    }

    pub(super) async fn outbox_claim(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let per_host = PER_HOST_IN_FLIGHT;
        let c = self.writer().await?;
        // As SQLite's: intermediate deliveries with `SUPERSEDED_AFTER` newer ones of
        // their prediction queued are dropped (the receiver gets the latest state).
        let drop = c
            .prepare_cached(
                "DELETE FROM webhook_outbox WHERE seq IN (
                    SELECT seq FROM (
                        SELECT seq, event, claimed_until_ms,
                               ROW_NUMBER() OVER (PARTITION BY prediction_id ORDER BY seq DESC) AS rn
                        FROM webhook_outbox
                        WHERE prediction_id IN (SELECT prediction_id FROM webhook_outbox
                                                GROUP BY prediction_id HAVING COUNT(*) > $2)) x
                    WHERE rn > $2 AND claimed_until_ms <= $1
                      AND event IN ('output', 'logs', 'cog.output', 'cog.logs'))",
            )
            .await?;
        c.execute(&drop, &[&now_ms, &(SUPERSEDED_AFTER as i64)])
            .await?;
        let st = c
            .prepare_cached(
                "WITH heads AS (
                    SELECT o.seq, o.host FROM webhook_outbox o
                    WHERE o.claimed_until_ms <= $1 AND o.due_unix_ms <= $1
                      AND o.seq = (SELECT MIN(i.seq) FROM webhook_outbox i
                                   WHERE i.prediction_id = o.prediction_id)
                 ), busy AS (
                    SELECT host, COUNT(*) AS n FROM webhook_outbox
                    WHERE claimed_until_ms > $1 GROUP BY host
                 ), ranked AS (
                    SELECT h.seq, ROW_NUMBER() OVER (PARTITION BY h.host ORDER BY h.seq)
                                  + COALESCE(b.n, 0) AS load
                    FROM heads h LEFT JOIN busy b ON b.host = h.host
                 ), picked AS (
                    SELECT w.seq FROM webhook_outbox w JOIN ranked r ON r.seq = w.seq
                    -- Repeated at the locking level: only here does PostgreSQL
                    -- recheck a row another replica claimed since our snapshot.
                    WHERE r.load <= $5
                      AND w.claimed_until_ms <= $1 AND w.due_unix_ms <= $1
                    ORDER BY r.load, w.seq LIMIT $2
                    FOR UPDATE OF w SKIP LOCKED
                 )
                 UPDATE webhook_outbox w
                 SET claimed_until_ms = $3, claimed_by = $4, attempts = w.attempts + 1
                 FROM picked WHERE w.seq = picked.seq
                 RETURNING w.seq, w.prediction_id, w.msg_id, w.url, w.event, w.body,
                           w.attempts, w.max_attempts",
            )
            .await?;
        let until = now_ms + CLAIM_FOR.as_millis() as i64;
        let rows = c
            .query(
                &st,
                &[
                    &now_ms,
                    &(limit as i64),
                    &until,
                    &self.replica,
                    &(per_host as i64),
                ],
            )
            .await?;
        let mut out: Vec<OutboxRow> = rows
            .iter()
            .map(|r| OutboxRow {
                seq: r.get(0),
                prediction_id: r.get(1),
                msg_id: r.get(2),
                url: r.get(3),
                event: r.get(4),
                body: r.get(5),
                attempts: r.get::<_, i32>(6).max(0) as u32,
                max_attempts: r.get::<_, i32>(7).max(0) as u32,
            })
            .collect();
        out.sort_by_key(|r| r.seq);
        Ok(out)
    }

    pub(super) async fn outbox_remove(&self, seq: i64) -> Result<(), StoreError> {
        self.writer()
            .await?
            .execute("DELETE FROM webhook_outbox WHERE seq = $1", &[&seq])
            .await?;
        Ok(())
    }

    pub(super) async fn outbox_retry_at(&self, seq: i64, due_ms: i64) -> Result<(), StoreError> {
        self.writer()
            .await?
            .execute(
                "UPDATE webhook_outbox SET claimed_until_ms = 0, claimed_by = NULL, due_unix_ms = $2
                 WHERE seq = $1",
                &[&seq, &due_ms],
            )
            .await?;
        Ok(())
    }

    /// Other replicas may have deliveries out: only this one's claims are released.
    pub(super) async fn outbox_release_claims(&self) -> Result<usize, StoreError> {
        Ok(self
            .writer()
            .await?
            .execute(
                "UPDATE webhook_outbox SET claimed_until_ms = 0, claimed_by = NULL
                 WHERE claimed_by = $1",
                &[&self.replica],
            )
            .await? as usize)
    }

    pub(super) async fn outbox_len(&self) -> Result<usize, StoreError> {
        let n: i64 = self
            .client()
            .await?
            .query_one("SELECT COUNT(*) FROM webhook_outbox", &[])
            .await?
            .get(0);
        Ok(n as usize)
    }

    pub(super) async fn outbox_due(&self, now_ms: i64) -> Result<usize, StoreError> {
        let n: i64 = self
            .client()
            .await?
            .query_one(
                "SELECT COUNT(*) FROM webhook_outbox
                 WHERE claimed_until_ms <= $1 AND due_unix_ms <= $1",
                &[&now_ms],
            )
            .await?
            .get(0);
        Ok(n as usize)
    }

    pub(super) async fn webhook_secret(&self, fresh: &str) -> Result<String, StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO settings (key, value) VALUES ('webhook_secret', $1)
             ON CONFLICT (key) DO NOTHING",
            &[&fresh],
        )
        .await?;
        Ok(c.query_one(
            "SELECT value FROM settings WHERE key = 'webhook_secret'",
            &[],
        )
        .await?
        .get(0))
    }
}

/// Queues a delivery (see `Store::outbox_push`), on a connection or inside a transaction.
pub(super) async fn push_on(
    c: &impl GenericClient,
    item: &OutboxItem<'_>,
    coalesce: bool,
    now_ms: i64,
) -> Result<(), StoreError> {
    if coalesce {
        let st = c
            .prepare_cached(
                "UPDATE webhook_outbox SET event = $2, body = $3, due_unix_ms = $4
                 WHERE seq = (SELECT MAX(seq) FROM webhook_outbox WHERE prediction_id = $1)
                   AND attempts = 0 AND claimed_until_ms = 0 AND event IN ('output', 'logs')",
            )
            .await?;
        let n = c
            .execute(
                &st,
                &[&item.prediction_id, &item.event, &item.body, &now_ms],
            )
            .await?;
        if n > 0 {
            return Ok(());
        }
    }
    let st = c
        .prepare_cached(
            "INSERT INTO webhook_outbox
                (prediction_id, msg_id, url, event, body, max_attempts, due_unix_ms, host)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .await?;
    c.execute(
        &st,
        &[
            &item.prediction_id,
            &item.msg_id,
            &item.url,
            &item.event,
            &item.body,
            &(item.max_attempts as i32),
            &now_ms,
            &outbox_host(item.url),
        ],
    )
    .await?;
    Ok(())
}
