//! `Store` for the embedded database: each call on tokio's blocking pool.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;

use super::SqliteStore;
use crate::record::Record;
use crate::store::{
    valid_file_id, Delivery, FileMeta, FilePage, FileStream, ListFilter, OutboxItem, OutboxRow,
    Page, Store, StoreError, UpstreamLink,
};

#[async_trait]
impl Store for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite:{}", self.db.path.display())
    }
    fn is_shared(&self) -> bool {
        false
    }
    fn replica_id(&self) -> &str {
        &self.replica
    }
    fn inject_write_failures(&self, on: bool) {
        self.db.fail_writes.store(on, Ordering::SeqCst);
    }
    async fn schema_version(&self) -> Result<i64, StoreError> {
        self.run(|db| db.schema_version()).await
    }

    async fn insert(&self, r: &Record) -> Result<(), StoreError> {
        let r = r.clone();
        self.run(move |db| db.insert(&r)).await
    }
    async fn put(&self, r: &Record) -> Result<(), StoreError> {
        let r = r.clone();
        self.run(move |db| db.put(&r)).await
    }
    async fn finish(
        &self,
        r: &Record,
        deliveries: &[Delivery],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (r, deliveries) = (r.clone(), deliveries.to_vec());
        self.run(move |db| db.finish(&r, &deliveries, now_ms)).await
    }
    async fn exists(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.run(move |db| db.exists(&id)).await
    }
    async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let id = id.to_string();
        self.run(move |db| db.get(&id)).await
    }
    async fn list(
        &self,
        cursor: Option<&str>,
        filter: &ListFilter,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let (c, f) = (cursor.map(str::to_string), filter.clone());
        self.run(move |db| db.list(c.as_deref(), &f, limit)).await
    }

    async fn heartbeat(&self, lease: Duration) -> Result<(), StoreError> {
        let ms = lease.as_millis() as i64;
        self.run(move |db| db.heartbeat(ms)).await
    }
    async fn retire(&self) -> Result<(), StoreError> {
        self.run(|db| db.retire()).await
    }
    async fn claim_orphans(&self, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.run(move |db| db.claim_orphans(limit)).await
    }
    async fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.run(move |db| db.request_cancel(&id)).await
    }
    async fn cancel_requests(&self) -> Result<Vec<String>, StoreError> {
        self.run(|db| db.cancel_requests()).await
    }

    async fn outbox_push(
        &self,
        item: &OutboxItem<'_>,
        coalesce: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (p, m, u, e, b, max) = (
            item.prediction_id.to_string(),
            item.msg_id.to_string(),
            item.url.to_string(),
            item.event.to_string(),
            item.body.to_string(),
            item.max_attempts,
        );
        self.run(move |db| {
            let item = OutboxItem {
                prediction_id: &p,
                msg_id: &m,
                url: &u,
                event: &e,
                body: &b,
                max_attempts: max,
            };
            db.outbox_push(&item, coalesce, now_ms)
        })
        .await
    }
    async fn outbox_claim(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        self.run(move |db| db.outbox_claim(now_ms, limit)).await
    }
    async fn outbox_remove(&self, seq: i64) -> Result<(), StoreError> {
        self.run(move |db| db.outbox_remove(seq)).await
    }
    async fn outbox_retry_at(&self, seq: i64, due_ms: i64) -> Result<(), StoreError> {
        self.run(move |db| db.outbox_retry_at(seq, due_ms)).await
    }
    async fn outbox_release_claims(&self) -> Result<usize, StoreError> {
        self.run(|db| db.outbox_release_claims()).await
    }
    async fn outbox_len(&self) -> Result<usize, StoreError> {
        self.run(|db| db.outbox_len()).await
    }
    async fn outbox_due(&self, now_ms: i64) -> Result<usize, StoreError> {
        self.run(move |db| db.outbox_due(now_ms)).await
    }

    async fn webhook_secret(&self, fresh: &str) -> Result<String, StoreError> {
        let fresh = fresh.to_string();
        self.run(move |db| db.webhook_secret(&fresh)).await
    }

    async fn upstream_link_put(&self, link: &UpstreamLink) -> Result<(), StoreError> {
        let link = link.clone();
        self.run(move |db| db.upstream_link_put(&link)).await
    }
    async fn upstream_link(&self, prediction_id: &str) -> Result<Option<UpstreamLink>, StoreError> {
        let id = prediction_id.to_string();
        self.run(move |db| db.upstream_link(&id)).await
    }

    async fn file_put(&self, meta: &FileMeta, path: &std::path::Path) -> Result<(), StoreError> {
        let (meta, path) = (meta.clone(), path.to_path_buf());
        self.run(move |db| db.file_put(&meta, &path)).await
    }
    async fn file_meta(&self, id: &str) -> Result<Option<FileMeta>, StoreError> {
        if !valid_file_id(id) {
            return Ok(None);
        }
        let id = id.to_string();
        self.run(move |db| db.file_meta(&id)).await
    }
    async fn file_list(&self, cursor: Option<&str>, limit: usize) -> Result<FilePage, StoreError> {
        let cursor = cursor.map(str::to_string);
        self.run(move |db| db.file_list(cursor.as_deref(), limit))
            .await
    }
    async fn file_read(&self, id: &str) -> Result<Option<FileStream>, StoreError> {
        if !valid_file_id(id) || self.file_meta(id).await?.is_none() {
            return Ok(None);
        }
        let file = match tokio::fs::File::open(self.db.files_dir().join(id)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(
            tokio_util::io::ReaderStream::new(file)
                .map(|r| r.map_err(StoreError::from))
                .boxed(),
        ))
    }
    async fn file_delete(&self, id: &str) -> Result<bool, StoreError> {
        if !valid_file_id(id) {
            return Ok(false);
        }
        let id = id.to_string();
        self.run(move |db| db.file_delete(&id)).await
    }
}
