//! Temporary files and folders to remove if the process is interrupted (SIGINT/SIGTERM) before they are
//! renamed into place.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Remembers a temporary file.
pub fn register(path: &Path) {
    PENDING.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_path_buf());
}

/// Forgets a temporary file (renamed or removed).
pub fn unregister(path: &Path) {
    PENDING.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != path);
}

/// Removes every registered temporary file or folder (called from the signal handler's thread).
pub fn remove_all() {
    for p in PENDING.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        if p.is_dir() {
            let _ = std::fs::remove_dir_all(p);
        } else {
            let _ = std::fs::remove_file(p);
        }
    }
}
