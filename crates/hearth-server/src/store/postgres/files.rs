//! Uploaded files in the database, so every replica serves every file: the
//! description in `files`, the bytes in 1 MiB rows of `file_chunks`, written in one
//! transaction and read back a row at a time.

use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

use super::PgStore;
use crate::store::{file_id, FileMeta, FilePage, FileStream, StoreError};

const CHUNK: usize = 1 << 20;

impl PgStore {
    pub(super) async fn file_put(
        &self,
        meta: &FileMeta,
        path: &std::path::Path,
    ) -> Result<(), StoreError> {
        let id = file_id(meta)?;
        let created_at = meta["created_at"].as_str().unwrap_or("").to_string();
        let mut file = tokio::fs::File::open(path).await?;
        let mut c = self.writer().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "INSERT INTO files (id, created_at, meta) VALUES ($1, $2, $3)",
            &[&id, &created_at, &meta.to_string()],
        )
        .await?;
        let st = tx
            .prepare("INSERT INTO file_chunks (file_id, n, data) VALUES ($1, $2, $3)")
            .await?;
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0i32;
        loop {
            let mut filled = 0;
            while filled < CHUNK {
                let k = file.read(&mut buf[filled..]).await?;
                if k == 0 {
                    break;
                }
                filled += k;
            }
            if filled == 0 {
                break;
            }
            tx.execute(&st, &[&id, &n, &&buf[..filled]]).await?;
            n += 1;
            if filled < CHUNK {
                break;
            }
        }
        tx.commit().await?;
        let _ = tokio::fs::remove_file(path).await;
        Ok(())
    }

    pub(super) async fn file_meta(&self, id: &str) -> Result<Option<FileMeta>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT meta FROM files WHERE id = $1", &[&id])
            .await?;
        match row {
            Some(r) => Ok(Some(serde_json::from_str(r.get::<_, &str>(0))?)),
            None => Ok(None),
        }
    }

    pub(super) async fn file_list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<FilePage, StoreError> {
        let (c_at, c_id) = crate::store::split_cursor(cursor);
        let rows = self
            .client()
            .await?
            .query(
                "SELECT created_at, id, meta FROM files
                 WHERE created_at < $1 OR (created_at = $1 AND id < $2 AND $2 != '')
                 ORDER BY created_at DESC, id DESC LIMIT $3",
                &[&c_at, &c_id, &((limit + 1) as i64)],
            )
            .await?;
        let rows = rows.iter().map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                serde_json::from_str(r.get::<_, &str>(2)).ok(),
            )
        });
        Ok(FilePage::from_rows(rows, limit))
    }

    pub(super) async fn file_read(&self, id: &str) -> Result<Option<FileStream>, StoreError> {
        if self.file_meta(id).await?.is_none() {
            return Ok(None);
        }
        let pool = self.pool.clone();
        let id = id.to_string();
        // One chunk per query, so a large download holds no connection between reads.
        let stream = futures_util::stream::unfold(Some(0i32), move |n| {
            let (pool, id) = (pool.clone(), id.clone());
            async move {
                let n = n?;
                let chunk = async {
                    let c = pool.get().await?;
                    let row = c
                        .query_opt(
                            "SELECT data FROM file_chunks WHERE file_id = $1 AND n = $2",
                            &[&id, &n],
                        )
                        .await?;
                    Ok::<_, StoreError>(row.map(|r| r.get::<_, Vec<u8>>(0)))
                }
                .await;
                match chunk {
                    Ok(Some(data)) => Some((Ok(axum::body::Bytes::from(data)), Some(n + 1))),
                    Ok(None) => None,
                    Err(e) => Some((Err(e), None)),
                }
            }
        });
        Ok(Some(stream.boxed()))
    }

    pub(super) async fn file_delete(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .writer()
            .await?
            .execute("DELETE FROM files WHERE id = $1", &[&id])
            .await?
            > 0)
    }
}
