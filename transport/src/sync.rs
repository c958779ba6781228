//! Poison-tolerant locking shared by every crate of the workspace.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the data over from a thread that panicked while holding it: every state
/// kept behind these mutexes stays consistent between statements, and one panicked request
/// must not take the whole daemon down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_still_locks() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
