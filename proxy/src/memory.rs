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
//! While the node starts ([`starting`] to [`serving`]) the allocator returns what is freed at
//! once instead of after its delay: starting up allocates and frees tens of megabytes in a few
//! seconds (the kernel's BTF to load the eBPF object, the registry's first build), and pages
//! reused after a delayed purge stay resident however little of them is used again. With the
//! delay through start, 8 to 12 MB of a node at rest was that; returned at once, 4 MB. Once it
//! serves, the delay is back: returning every freed page at once costs the data path a
//! quarter more CPU per request.
//!
//! A [`release`] also lets go of the executable's own pages that hold nothing of the process's:
//! its code and read-only data, mapped from the file and never written ([`release_code`]).
//! Starting up and a registry rebuild run code that a request never does (the registry's
//! parsers, serde's visitors for every kind, the eBPF loader), and the kernel maps 64 KiB
//! around each page touched: 18 MB of a node's 31 MB resident set under HTTP load was the
//! binary, of which 2 MB was read in five seconds of it. The pages stay in the page cache; what
//! runs next faults its own back in.
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
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_e`, mimalloc 3: checked by a
/// test against the option's default).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The purge delay [`starting`] replaced, for [`serving`] to put back (`i64::MIN`: none).
static SERVING_PURGE_DELAY: AtomicI64 = AtomicI64::new(i64::MIN);

/// Bumped by every [`release`]; each thread remembers the last one it acted on.
static RELEASES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static SEEN: Cell<u64> = const { Cell::new(0) };
}

/// Call first thing in a process that is going to serve: until [`serving`], memory freed is
/// returned to the system at once (mimalloc's purge delay 0). A delay of its own
/// (`MIMALLOC_PURGE_DELAY`) is kept if it says never (-1) or already at once (0).
pub fn starting() {
    // SAFETY: reading and setting an option of the allocator by its index; `PURGE_DELAY` is
    // in range (checked by a test), and the allocator reads the option anew at each use.
    let delay = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
    if delay > 0 {
        SERVING_PURGE_DELAY.store(delay, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
    }
}

/// The node serves: the purge delay [`starting`] replaced is back.
pub fn serving() {
    let delay = SERVING_PURGE_DELAY.swap(i64::MIN, Ordering::Relaxed);
    if delay != i64::MIN {
        // SAFETY: as in `starting`.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, delay) };
    }
}

/// Returns this thread's freed memory to the system now, and asks every thread that calls
/// [`on_park`] to do the same the next time it parks.
pub fn release() {
    let n = RELEASES.fetch_add(1, Ordering::Relaxed) + 1;
    SEEN.with(|s| s.set(n));
    collect();
    match release_code() {
        Ok(bytes) => tracing::debug!(bytes, "executable pages let go of"),
        Err(e) => tracing::debug!(error = %e, "executable pages kept"),
    }
}

/// Drops from the resident set the pages of the running executable that hold nothing of the
/// process's own: mappings of the file that are not writable and hold no private page (code,
/// read-only data; not the relocated data made read-only after start, which is the process's
/// own copy).
/// `madvise(MADV_DONTNEED)` on them unmaps what was mapped; the next access maps the page
/// cache's page again (a minor fault). Returns the bytes of the ranges dropped.
pub fn release_code() -> std::io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut dropped = 0;
    for range in clean_file_ranges(&smaps, &exe.to_string_lossy()) {
        // SAFETY: the range is a whole mapping of the executable's file that is not writable
        // and holds no private page (checked just above in `smaps`; a read-only mapping cannot
        // gain one without an `mprotect`, which weft does not do): dropping its pages loses
        // nothing, and the next access reads the same bytes from the page cache.
        let r = unsafe {
            libc::madvise(
                range.start as *mut libc::c_void,
                range.len(),
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        dropped += range.len();
    }
    Ok(dropped)
}

/// The address ranges in `smaps` (`/proc/<pid>/smaps`) mapped from the file `path`, not
/// writable, with no anonymous page resident or swapped out (a private mapping's written page
/// is anonymous; `Private_Dirty` also counts the page cache's own dirty pages of a file just
/// written, which are the file's).
fn clean_file_ranges(smaps: &str, path: &str) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    // The mapping being read: its range and whether it may be dropped so far.
    let mut current: Option<(std::ops::Range<usize>, bool)> = None;
    let mut finish = |current: Option<(std::ops::Range<usize>, bool)>| {
        if let Some((range, true)) = current {
            ranges.push(range);
        }
    };
    for line in smaps.lines() {
        if let Some(mapping) = mapping_header(line) {
            finish(current.take());
            let (range, perms, file) = mapping;
            current = Some((range, file == path && !perms.contains('w')));
            continue;
        }
        let Some((_, ok)) = current.as_mut() else {
            continue;
        };
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        if matches!(field, "Anonymous" | "Swap") && value.trim() != "0 kB" {
            *ok = false;
        }
    }
    finish(current);
    ranges
}

/// A mapping's first line in `smaps`: `start-end perms offset dev inode [path]`.
fn mapping_header(line: &str) -> Option<(std::ops::Range<usize>, &str, &str)> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    let (_offset, _dev, _inode) = (fields.next()?, fields.next()?, fields.next()?);
    if perms.len() != 4 || start >= end {
        return None;
    }
    Some((start..end, perms, fields.next().unwrap_or("").trim_start()))
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

    const SMAPS: &str = "\
55d0a0000000-55d0a02b3000 r--p 00000000 fd:01 1234                       /opt/weft/weft
Size:               2764 kB
Rss:                2716 kB
Private_Dirty:      2716 kB
Anonymous:             0 kB
55d0a02b3000-55d0a1900000 r-xp 002b3000 fd:01 1234                       /opt/weft/weft
Size:              22836 kB
Rss:               15680 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
Swap:                  0 kB
55d0a1900000-55d0a1a00000 r--p 01900000 fd:01 1234                       /opt/weft/weft
Rss:                1024 kB
Anonymous:          1024 kB
Private_Dirty:      1024 kB
55d0a1a00000-55d0a1a09000 rw-p 01a00000 fd:01 1234                       /opt/weft/weft
Anonymous:            36 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0 
Anonymous:          1024 kB
7f0000400000-7f0000500000 r--p 00000000 fd:01 1234                       /opt/weft/weft-old
Anonymous:             0 kB
7f0000600000-7f0000700000 r-xp 00000000 fd:01 1235                       /opt/weft/weft (deleted)
Anonymous:             0 kB
";

    #[test]
    fn only_the_executables_clean_read_only_mappings_are_dropped() {
        assert_eq!(
            clean_file_ranges(SMAPS, "/opt/weft/weft"),
            vec![
                0x55d0a0000000..0x55d0a02b3000,
                0x55d0a02b3000..0x55d0a1900000
            ],
            "not the relocated read-only data, the writable data, other files or anonymous memory"
        );
        // A replaced binary still runs from its deleted file: `/proc/self/exe` says so too.
        assert_eq!(
            clean_file_ranges(SMAPS, "/opt/weft/weft (deleted)"),
            vec![0x7f0000600000..0x7f0000700000]
        );
        // A page of its own anywhere in a mapping keeps all of it.
        let dirty = SMAPS.replacen(
            "Swap:                  0 kB",
            "Swap:                  4 kB",
            1,
        );
        assert_eq!(
            clean_file_ranges(&dirty, "/opt/weft/weft"),
            vec![0x55d0a0000000..0x55d0a02b3000]
        );
        assert!(clean_file_ranges("garbage\nAnonymous: 0 kB\n", "/opt/weft/weft").is_empty());
    }

    /// The executable's resident pages, from `/proc/self/smaps`.
    fn executable_rss_kb() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_string_lossy();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut ours = false;
        let mut kb = 0;
        for line in smaps.lines() {
            if let Some((_, perms, file)) = mapping_header(line) {
                ours = file == exe && !perms.contains('w');
            } else if let Some(v) = line.strip_prefix("Rss:") {
                if ours {
                    kb += v.trim().trim_end_matches(" kB").parse::<u64>().unwrap();
                }
            }
        }
        kb
    }

    #[test]
    fn the_executables_pages_are_let_go_of_and_run_again() {
        let before = executable_rss_kb();
        let dropped = release_code().unwrap();
        let after = executable_rss_kb();
        assert!(dropped > 0);
        // What ran since (reading smaps, this test) came back; most did not.
        assert!(
            after < before,
            "{after} kB of the executable resident, {before} kB before"
        );
        // Code and constants read again from the page cache work as before.
        assert_eq!(format!("{:?}", clean_file_ranges("", "")), "[]");
    }

    #[test]
    fn freed_memory_goes_back_at_once_only_while_starting() {
        // SAFETY: reading an option by its index.
        let delay = || unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        // mimalloc 3's default delay (tests do not set `MIMALLOC_PURGE_DELAY`): the index is
        // the purge delay's.
        assert_eq!(delay(), 1000);
        starting();
        assert_eq!(delay(), 0);
        serving();
        assert_eq!(delay(), 1000);
        // Serving again, or without having started, changes nothing.
        serving();
        assert_eq!(delay(), 1000);
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
