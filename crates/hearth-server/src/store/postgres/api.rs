//! `Store` for PostgreSQL.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;

use super::PgStore;
use crate::record::Record;
use crate::store::{
    valid_file_id, Delivery, FileMeta, FilePage, FileStream, ListFilter, OutboxItem, OutboxRow,
    Page, Store, StoreError, UpstreamLink,
};

#[async_trait]
impl Store for PgStore {
    fn describe(&self) -> String {
        self.target.clone()
    }
    fn is_shared(&self) -> bool {
        true
    }
    fn replica_id(&self) -> &str {
        &self.replica
    }
    fn inject_write_failures(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }
    async fn schema_version(&self) -> Result<i64, StoreError> {
        PgStore::schema_version(self).await
    }

    async fn insert(&self, r: &Record) -> Result<(), StoreError> {
        PgStore::insert(self, r).await
    }
    async fn put(&self, r: &Record) -> Result<(), StoreError> {
        PgStore::put(self, r).await
    }
    async fn finish(
        &self,
        r: &Record,
        deliveries: &[Delivery],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        PgStore::finish(self, r, deliveries, now_ms).await
    }
    async fn exists(&self, id: &str) -> Result<bool, StoreError> {
        PgStore::exists(self, id).await
    }
    async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        PgStore::get(self, id).await
    }
    async fn list(
        &self,
        cursor: Option<&str>,
        filter: &ListFilter,
        limit: usize,
    ) -> Result<Page, StoreError> {
        PgStore::list(self, cursor, filter, limit).await
    }

    async fn heartbeat(&self, lease: Duration) -> Result<(), StoreError> {
        PgStore::heartbeat(self, lease).await
    }
    async fn retire(&self) -> Result<(), StoreError> {
        PgStore::retire(self).await
    }
    async fn claim_orphans(&self, limit: usize) -> Result<Vec<Record>, StoreError> {
        PgStore::claim_orphans(self, limit).await
    }
    async fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        PgStore::request_cancel(self, id).await
    }
    async fn cancel_requests(&self) -> Result<Vec<String>, StoreError> {
        PgStore::cancel_requests(self).await
    }

    async fn outbox_push(
        &self,
        item: &OutboxItem<'_>,
        coalesce: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        PgStore::outbox_push(self, item, coalesce, now_ms).await
    }
    async fn outbox_claim(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        PgStore::outbox_claim(self, now_ms, limit).await
    }
    async fn outbox_remove(&self, seq: i64) -> Result<(), StoreError> {
        PgStore::outbox_remove(self, seq).await
    }
    async fn outbox_retry_at(&self, seq: i64, due_ms: i64) -> Result<(), StoreError> {
        PgStore::outbox_retry_at(self, seq, due_ms).await
    }
    async fn outbox_release_claims(&self) -> Result<usize, StoreError> {
        PgStore::outbox_release_claims(self).await
    }
    async fn outbox_len(&self) -> Result<usize, StoreError> {
        PgStore::outbox_len(self).await
    }
    async fn outbox_due(&self, now_ms: i64) -> Result<usize, StoreError> {
        PgStore::outbox_due(self, now_ms).await
    }

    async fn webhook_secret(&self, fresh: &str) -> Result<String, StoreError> {
        PgStore::webhook_secret(self, fresh).await
    }

    async fn upstream_link_put(&self, link: &UpstreamLink) -> Result<(), StoreError> {
        PgStore::upstream_link_put(self, link).await
    }
    async fn upstream_link(&self, prediction_id: &str) -> Result<Option<UpstreamLink>, StoreError> {
        PgStore::upstream_link(self, prediction_id).await
    }

    async fn file_put(&self, meta: &FileMeta, path: &std::path::Path) -> Result<(), StoreError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Injected);
        }
        PgStore::file_put(self, meta, path).await
    }
    async fn file_meta(&self, id: &str) -> Result<Option<FileMeta>, StoreError> {
        if !valid_file_id(id) {
            return Ok(None);
        }
        PgStore::file_meta(self, id).await
    }
    async fn file_list(&self, cursor: Option<&str>, limit: usize) -> Result<FilePage, StoreError> {
        PgStore::file_list(self, cursor, limit).await
    }
    async fn file_read(&self, id: &str) -> Result<Option<FileStream>, StoreError> {
        if !valid_file_id(id) {
            return Ok(None);
        }
        PgStore::file_read(self, id).await
    }
    async fn file_delete(&self, id: &str) -> Result<bool, StoreError> {
        if !valid_file_id(id) {
            return Ok(false);
        }
        PgStore::file_delete(self, id).await
    }
}
