//! Predictions, replicas and their leases, cancel requests, orphans.

use std::time::Duration;

use deadpool_postgres::GenericClient;

use super::PgStore;
use crate::record::Record;
use crate::store::{Delivery, IdPrefix, ListFilter, Page, StoreError};

/// Writes a prediction this replica owns, on a connection or inside a transaction.
async fn put_on(c: &impl GenericClient, replica: &str, r: &Record) -> Result<(), StoreError> {
    let json = serde_json::to_string(r)?;
    let st = c
        .prepare_cached(
            "INSERT INTO predictions (id, created_at, status, record, owner, model)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, record = excluded.record
             WHERE predictions.owner IS NOT DISTINCT FROM excluded.owner",
        )
        .await?;
    let p = &r.prediction;
    let n = c
        .execute(
            &st,
            &[
                &p.id,
                &p.created_at,
                &p.status.as_str(),
                &json,
                &replica,
                &p.model,
            ],
        )
        .await?;
    if n == 0 {
        return Err(StoreError::NotOwner(p.id.clone()));
    }
    Ok(())
}

impl PgStore {
    pub(super) async fn insert(&self, r: &Record) -> Result<(), StoreError> {
        let json = serde_json::to_string(r)?;
        let c = self.writer().await?;
        let st = c
            .prepare_cached(
                "INSERT INTO predictions (id, created_at, status, record, owner, model)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        let p = &r.prediction;
        let n = c
            .execute(
                &st,
                &[
                    &p.id,
                    &p.created_at,
                    &p.status.as_str(),
                    &json,
                    &self.replica,
                    &p.model,
                ],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::Exists(p.id.clone()));
        }
        Ok(())
    }

    pub(super) async fn put(&self, r: &Record) -> Result<(), StoreError> {
        let c = self.writer().await?;
        put_on(&c, &self.replica, r).await
    }

    pub(super) async fn finish(
        &self,
        r: &Record,
        deliveries: &[Delivery],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut c = self.writer().await?;
        let tx = c.transaction().await?;
        put_on(&tx, &self.replica, r).await?;
        for d in deliveries {
            super::outbox::push_on(&tx, &d.item(), d.coalesce, now_ms).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn exists(&self, id: &str) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT 1 FROM predictions WHERE id = $1")
            .await?;
        Ok(c.query_opt(&st, &[&id]).await?.is_some())
    }

    pub(super) async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT record FROM predictions WHERE id = $1")
            .await?;
        match c.query_opt(&st, &[&id]).await? {
            Some(row) => Ok(Some(serde_json::from_str(row.get::<_, &str>(0))?)),
            None => Ok(None),
        }
    }

    pub(super) async fn list(
        &self,
        cursor: Option<&str>,
        filter: &ListFilter,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let (c_at, c_id) = match cursor.and_then(|c| c.split_once('|')) {
            Some((a, b)) => (Some(a), Some(b)),
            None => (None, None),
        };
        let statuses: Option<Vec<&str>> = (!filter.statuses.is_empty())
            .then(|| filter.statuses.iter().map(|s| s.as_str()).collect());
        let prefix = filter.id_prefix.as_deref().map(IdPrefix::new);
        let (low, high, pattern) = match &prefix {
            Some(p) => (Some(&p.low), Some(&p.high), Some(&p.pattern)),
            None => (None, None, None),
        };
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT created_at, id, record FROM predictions
                 WHERE ($1::text IS NULL OR created_at < $1 OR (created_at = $1 AND id < $2))
                   AND ($3::text IS NULL OR created_at > $3)
                   AND ($4::text IS NULL OR created_at < $4)
                   AND ($6::text[] IS NULL OR status = ANY($6))
                   AND ($7::text IS NULL OR (id >= $7 AND id < $8 AND id LIKE $9 ESCAPE '\\'))
                   AND ($10::text IS NULL OR model = $10)
                 ORDER BY created_at DESC, id DESC LIMIT $5",
            )
            .await?;
        let rows = c
            .query(
                &st,
                &[
                    &c_at,
                    &c_id,
                    &filter.created_after,
                    &filter.created_before,
                    &((limit + 1) as i64),
                    &statuses,
                    &low,
                    &high,
                    &pattern,
                    &filter.model,
                ],
            )
            .await?;
        let rows = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        Ok(crate::store::page_from_rows(rows, limit))
    }

    pub(super) async fn heartbeat(&self, lease: Duration) -> Result<(), StoreError> {
        let c = self.writer().await?;
        let st = c
            .prepare_cached(
                "INSERT INTO replicas (id, lease_until)
                 VALUES ($1, now() + make_interval(secs => $2))
                 ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until",
            )
            .await?;
        c.execute(&st, &[&self.replica, &lease.as_secs_f64()])
            .await?;
        Ok(())
    }

    pub(super) async fn retire(&self) -> Result<(), StoreError> {
        self.writer()
            .await?
            .execute("DELETE FROM replicas WHERE id = $1", &[&self.replica])
            .await?;
        Ok(())
    }

    pub(super) async fn claim_orphans(&self, limit: usize) -> Result<Vec<Record>, StoreError> {
        let c = self.writer().await?;
        // A compare-and-set on the owner each candidate had when we looked: of two
        // survivors sweeping at once, the second's update finds another owner (the
        // row's newest version, which an UPDATE rechecks) and skips the row. (A
        // `FOR UPDATE SKIP LOCKED` alone is not enough here: its recheck of a row
        // just taken over does not look again at whether the new owner is alive.)
        let st = c
            .prepare_cached(
                "WITH orphans AS (
                    SELECT p.id, p.owner FROM predictions p
                    WHERE p.status IN ('starting', 'processing')
                      AND p.owner IS DISTINCT FROM $1
                      AND NOT EXISTS (SELECT 1 FROM replicas r
                                      WHERE r.id = p.owner AND r.lease_until > now())
                    LIMIT $2
                 )
                 UPDATE predictions p SET owner = $1 FROM orphans
                 WHERE p.id = orphans.id
                   AND p.owner IS NOT DISTINCT FROM orphans.owner
                   AND p.status IN ('starting', 'processing')
                 RETURNING p.id, p.record",
            )
            .await?;
        let rows = c.query(&st, &[&self.replica, &(limit as i64)]).await?;
        let mut out = Vec::new();
        for row in rows {
            let id: &str = row.get(0);
            match serde_json::from_str::<Record>(row.get(1)) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(prediction = %id, error = %e, "an orphaned prediction cannot be decoded; marking its row failed");
                    c.execute(
                        "UPDATE predictions SET status = 'failed' WHERE id = $1",
                        &[&id],
                    )
                    .await?;
                }
            }
        }
        Ok(out)
    }

    pub(super) async fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .writer()
            .await?
            .execute(
                "UPDATE predictions SET cancel_requested = TRUE
                 WHERE id = $1 AND status IN ('starting', 'processing')",
                &[&id],
            )
            .await?
            > 0)
    }

    pub(super) async fn cancel_requests(&self) -> Result<Vec<String>, StoreError> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT id FROM predictions
                 WHERE owner = $1 AND cancel_requested AND status IN ('starting', 'processing')",
            )
            .await?;
        Ok(c.query(&st, &[&self.replica])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}
