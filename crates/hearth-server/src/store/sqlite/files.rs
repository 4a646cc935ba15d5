//! Uploaded files beside the embedded database: `files/{id}` holds the bytes and
//! `files/{id}.json` the description; the database's `files` table indexes them by
//! creation, so a listing reads one page of descriptions.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection};

use super::SqliteDb;
use crate::store::{file_id, FileMeta, FilePage, StoreError};

impl SqliteDb {
    pub(super) fn files_dir(&self) -> PathBuf {
        self.data_dir.join("files")
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.files_dir().join(format!("{id}.json"))
    }

    pub(super) fn file_put(
        &self,
        meta: &FileMeta,
        path: &std::path::Path,
    ) -> Result<(), StoreError> {
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Injected);
        }
        let id = file_id(meta)?;
        std::fs::rename(path, self.files_dir().join(&id))?;
        crate::store::write_private(&self.meta_path(&id), &meta.to_string())?;
        self.writer()?.execute(
            "INSERT OR REPLACE INTO files (id, created_at) VALUES (?1, ?2)",
            params![id, meta["created_at"].as_str().unwrap_or("")],
        )?;
        Ok(())
    }

    pub(super) fn file_meta(&self, id: &str) -> Result<Option<FileMeta>, StoreError> {
        match std::fs::read_to_string(self.meta_path(id)) {
            Ok(text) => Ok(Some(serde_json::from_str(&text)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn file_list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<FilePage, StoreError> {
        let (c_at, c_id) = crate::store::split_cursor(cursor);
        let keys: Vec<(String, String)> = {
            let conn = self.conn()?;
            let mut stmt = conn.prepare(
                "SELECT created_at, id FROM files
                 WHERE created_at < ?1 OR (created_at = ?1 AND id < ?2 AND ?2 != '')
                 ORDER BY created_at DESC, id DESC LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![c_at, c_id, (limit + 1) as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let rows = keys.into_iter().map(|(created_at, id): (String, String)| {
            let meta = self.file_meta(&id).ok().flatten();
            (created_at, id, meta)
        });
        Ok(FilePage::from_rows(rows, limit))
    }

    pub(super) fn file_delete(&self, id: &str) -> Result<bool, StoreError> {
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Injected);
        }
        let existed = self.meta_path(id).exists();
        self.writer()?
            .execute("DELETE FROM files WHERE id = ?1", params![id])?;
        let _ = std::fs::remove_file(self.files_dir().join(id));
        let _ = std::fs::remove_file(self.meta_path(id));
        Ok(existed)
    }
}

/// At the upgrade that added the index: every description already in `dir`, indexed.
pub(super) fn index_existing(conn: &Connection, dir: &Path) -> Result<(), StoreError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let tx = conn.unchecked_transaction()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        let meta: Option<FileMeta> = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        if let Some(meta) = meta {
            tx.execute(
                "INSERT OR REPLACE INTO files (id, created_at) VALUES (?1, ?2)",
                params![id, meta["created_at"].as_str().unwrap_or("")],
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}
