//! Handing freed memory back to the system.
//!
//! mimalloc (the `weft` binary's allocator) keeps the pages it frees for reuse and returns them
//! to the system only after a delay, and only when a later allocation or free on the same
//! thread passes by to do it. A node proxy at rest allocates little, so what a big list or a
//! registry rebuild freed stayed resident for good (~50 MB after a 10 000-pod list). Returning
//! pages at once on every free (`MIMALLOC_PURGE_DELAY=0`) costs the data path a quarter more CPU
//! per request. Instead the registry calls [`release`] once its changes have been quiet for a
//! moment, and every control-plane thread returns what it holds the next time it goes idle
//! ([`on_park`], the main runtime's park hook). A data-path worker returns what it freed the
//! first time a second passes with nothing to do ([`Quiet`], checked by its heartbeat): what a
//! burst of connections or requests left behind goes back once the burst is over, while a
//! worker under load keeps its pages to reuse (mimalloc returns a busy thread's free pages on
//! its own, after `purge_delay`, as later frees pass by).
//!
//! With another global allocator (tests) mimalloc's heaps are empty and this does nothing.
//!
//! Transparent huge pages are off: mimalloc asked for them on its arenas (`MADV_HUGEPAGE`), so
//! every partly used 2 MiB region counted whole, 30 of a node's 31 MB of anonymous memory at
//! rest; without them 25 MB (the data path's CPU per connection and per request did not move
//! beyond the run-to-run noise). The allocator is built not to ask (mimalloc's `no_thp`, which
//! also covers what it maps before `main`), and [`no_huge_pages`] turns them off for the
//! process where the system hands them out unasked (`always`).
//!
//! May import: nothing.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bumped by every [`release`]; each thread remembers the last one it acted on.
static RELEASES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static SEEN: Cell<u64> = const { Cell::new(0) };
}

/// Returns this thread's freed memory to the system now, and asks every thread that calls
/// [`on_park`] to do the same the next time it parks.
pub fn release() {
    let n = RELEASES.fetch_add(1, Ordering::Relaxed) + 1;
    SEEN.with(|s| s.set(n));
    collect();
}

/// For a runtime's `on_thread_park`: acts on a [`release`] this thread has not acted on yet.
/// Otherwise one relaxed load.
pub fn on_park() {
    let n = RELEASES.load(Ordering::Relaxed);
    if SEEN.with(|s| s.replace(n)) != n {
        collect();
    }
}

/// Turns transparent huge pages off for this process and what it starts (`prctl(2)`
/// `PR_SET_THP_DISABLE`; what mimalloc's `MIMALLOC_ALLOW_THP=0` does). Call it first thing:
/// memory already in huge pages stays there.
pub fn no_huge_pages() -> std::io::Result<()> {
    nix::sys::prctl::set_thp_disable(true).map_err(std::io::Error::from)
}

/// Returns what this thread has freed to the system now (a worker gone [`Quiet`]).
pub fn release_here() {
    collect();
}

/// The most wake-ups of a thread in one beat that still count as nothing to do: the beat's own
/// timer, and a stray timer or two (an idle connection's watch coming due).
pub const QUIET_WAKES: u64 = 3;

/// Tells, beat by beat, when a thread that worked has gone quiet: the first beat with at most
/// [`QUIET_WAKES`] wake-ups since the one before (its runtime's `worker_park_count`), once per
/// quiet spell. A thread never seen working is quiet once, at its first quiet beat (what
/// starting up freed).
#[derive(Debug, Default)]
pub struct Quiet {
    /// The wake-up count at the last beat (none before the first).
    last: Option<u64>,
    /// This quiet spell was acted on.
    acted: bool,
}

impl Quiet {
    /// A beat with the thread's wake-up count so far: whether to hand memory back now.
    pub fn beat(&mut self, wakes: u64) -> bool {
        let Some(last) = self.last.replace(wakes) else {
            return false;
        };
        if wakes.saturating_sub(last) > QUIET_WAKES {
            self.acted = false;
            return false;
        }
        !std::mem::replace(&mut self.acted, true)
    }
}

/// How many [`release`]s were asked for.
pub fn releases() -> u64 {
    RELEASES.load(Ordering::Relaxed)
}

fn collect() {
    // SAFETY: `mi_collect` takes no pointers: it walks the allocator's own structures (this
    // thread's heap, then the process-wide arenas) under the allocator's own locks.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_hands_memory_back_once_per_quiet_spell() {
        let mut q = Quiet::default();
        // The first beat only sets the count.
        assert!(!q.beat(100));
        // Busy: many wake-ups a beat.
        assert!(!q.beat(900));
        assert!(!q.beat(5_000));
        // Quiet: once, then not again while it stays quiet.
        assert!(q.beat(5_000 + QUIET_WAKES));
        assert!(!q.beat(5_000 + QUIET_WAKES + 1));
        assert!(!q.beat(5_000 + QUIET_WAKES + 1));
        // Busy again, then quiet again: once more.
        assert!(!q.beat(9_000));
        assert!(q.beat(9_001));
        assert!(!q.beat(9_002));
    }

    #[test]
    fn a_worker_that_never_worked_hands_back_what_starting_freed() {
        let mut q = Quiet::default();
        assert!(!q.beat(0));
        assert!(q.beat(1));
        assert!(!q.beat(2));
    }

    #[test]
    fn huge_pages_are_off_once_asked() {
        no_huge_pages().unwrap();
        assert!(nix::sys::prctl::get_thp_disable().unwrap());
    }

    // Other tests may release too (the registry does after its rebuilds): only lower bounds.
    #[test]
    fn a_parking_thread_acts_on_each_release_once() {
        release();
        let asked = releases();
        assert!(SEEN.with(Cell::get) >= asked.min(1));
        std::thread::spawn(move || {
            // A new thread has acted on no release yet; parking acts on the latest.
            assert_eq!(SEEN.with(Cell::get), 0);
            on_park();
            let seen = SEEN.with(Cell::get);
            assert!(seen >= asked, "{seen} < {asked}");
        })
        .join()
        .unwrap();
        release();
        assert!(releases() > asked);
    }
}
