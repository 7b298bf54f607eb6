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

/// Ends the process at once with `code`, after [`remove_all`], from the signal handler's thread.
///
/// `std::process::exit` would run the C and C++ exit handlers, among them ONNX Runtime's static
/// destructors, while a session may still be running on another thread; that crashed the process
/// (SIGSEGV) instead of exiting with `code`. `_exit` ends every thread without running them.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` takes no pointers and never returns; it only skips exit handlers and
    // destructors, and nothing of nibble's needs them: its temporary files are already removed
    // and stderr is unbuffered.
    unsafe { libc::_exit(code) }
}
