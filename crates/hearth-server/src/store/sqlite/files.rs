//! Uploaded files beside the embedded database: `files/{id}` holds the bytes and
//! `files/{id}.json` the description.

use std::path::PathBuf;

use super::SqliteDb;
use crate::store::{file_id, FileMeta, StoreError};

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
        Ok(())
    }

    pub(super) fn file_meta(&self, id: &str) -> Result<Option<FileMeta>, StoreError> {
        match std::fs::read_to_string(self.meta_path(id)) {
            Ok(text) => Ok(Some(serde_json::from_str(&text)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn file_list(&self) -> Result<Vec<FileMeta>, StoreError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.files_dir())?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                if let Ok(Some(v)) = self.file_meta(id) {
                    out.push(v);
                }
            }
        }
        out.sort_by(|a: &FileMeta, b: &FileMeta| {
            b["created_at"].as_str().cmp(&a["created_at"].as_str())
        });
        Ok(out)
    }

    pub(super) fn file_delete(&self, id: &str) -> Result<bool, StoreError> {
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Injected);
        }
        let existed = self.meta_path(id).exists();
        let _ = std::fs::remove_file(self.files_dir().join(id));
        let _ = std::fs::remove_file(self.meta_path(id));
        Ok(existed)
    }
}
