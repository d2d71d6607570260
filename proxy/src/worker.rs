//! Which data-path worker the current thread is (`node` starts them): connection pools keep
//! each worker's upstream connections apart, so a request and the connection carrying it are
//! served by the same thread. Threads that are not workers (the control plane, tests) are
//! worker 0.
//!
//! May import: nothing.

use std::cell::Cell;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks this thread as data-path worker `i`.
pub fn enter(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// The worker this thread is.
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_thread_is_the_worker_it_entered() {
        assert_eq!(super::current(), 0);
        std::thread::spawn(|| {
            super::enter(3);
            assert_eq!(super::current(), 3);
        })
        .join()
        .unwrap();
        assert_eq!(super::current(), 0, "other threads are not affected");
    }
}
