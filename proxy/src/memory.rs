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
//! A [`release`] also lets go of the pages of files mapped read-only that hold nothing of the
//! process's: the executable's code and read-only data, the libraries', mapped from their
//! files and never written ([`release_file_pages`]). Starting up and a registry rebuild run
//! code that a request never does (the registry's parsers, serde's visitors for every kind,
//! the eBPF loader), and the kernel maps 64 KiB around each page touched: 18 MB of a node's
//! 31 MB resident set under HTTP load was the binary, of which 2 MB was read in five seconds
//! of it, and 2 MB more libc, libm and the loader. The pages stay in the page cache; what runs
//! next faults its own back in. The data path does the same once all its workers are quiet
//! ([`Workers`]): the code of the traffic before (TCP relays, HBONE) does not stay resident
//! beside that of the traffic after (HTTP).
//!
//! Transparent huge pages are off: mimalloc asked for them on its arenas (`MADV_HUGEPAGE`), so
//! every partly used 2 MiB region counted whole, 30 of a node's 31 MB of anonymous memory at
//! rest; without them 25 MB (the data path's CPU per connection and per request did not move
//! beyond the run-to-run noise). The allocator is built not to ask (mimalloc's `no_thp`, which
//! also covers what it maps before `main`), and [`no_huge_pages`] turns them off for the
//! process where the system hands them out unasked (`always`).
//!
//! May import: nothing.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

/// The `weft` binary's global allocator: mimalloc, asked the way C asks it.
///
/// The `mimalloc` crate's allocator calls mimalloc's aligned entry points for every
/// allocation. Those serve a size whose class is not a power of two from the class's page
/// only while that page's free list has a block: once it runs dry they over-allocate (the size
/// plus the alignment) from the next class up, and never come back to collect what was freed
/// into the first page. A 384-byte flow took a 448-byte block, and most classes grew by one
/// step the same way. Every block mimalloc hands out is aligned to a word (its classes are
/// whole words), so an allocation that asks for no more takes the plain entry points; a larger
/// alignment still takes the aligned ones.
pub struct Allocator;

/// What every block mimalloc hands out is aligned to.
const WORD: usize = std::mem::size_of::<usize>();

// SAFETY: mimalloc's functions honour the contract of each method: `mi_malloc` and
// `mi_zalloc` return a block of at least `size` bytes aligned to a word (enough for a layout
// that asks for no more), or null; `mi_realloc` keeps the contents up to the smaller size;
// the aligned variants honour the alignment asked; `mi_free` takes any of their blocks.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if layout.align() <= WORD {
                libmimalloc_sys::mi_malloc(layout.size()).cast()
            } else {
                libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if layout.align() <= WORD {
                libmimalloc_sys::mi_zalloc(layout.size()).cast()
            } else {
                libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: see the impl; `ptr` is a block of this allocator's.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl; `ptr` is a block of this allocator's.
        unsafe {
            if layout.align() <= WORD {
                libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_e`, mimalloc 3: checked by a
/// test against the option's default).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The purge delay [`starting`] replaced, for [`serving`] to put back (`i64::MIN`: none).
/// mimalloc keeps its options in plain words, read anew at each use: setting one while other
/// threads allocate is a race on an aligned machine word, which they read whole, old or new.
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
    // Files first: reading the mappings allocates (`smaps` is hundreds of kB), and what that
    // freed goes back with the rest.
    let_go_of_file_pages();
    collect();
}

/// [`release_file_pages`], its outcome logged.
fn let_go_of_file_pages() {
    match release_file_pages() {
        Ok(bytes) => tracing::debug!(bytes, "mapped files' pages let go of"),
        Err(e) => tracing::debug!(error = %e, "mapped files' pages kept"),
    }
}

/// Drops from the resident set the pages of files mapped read-only that hold nothing of the
/// process's own: every private mapping of a file that is not writable and holds no anonymous
/// page (the executable's code and read-only data, the libraries', the locale files; not the
/// relocated data made read-only after start, which is the process's own copy).
/// `madvise(MADV_DONTNEED)` on them unmaps what was mapped; the next access maps the page
/// cache's page again (a minor fault). Returns the bytes that were resident.
/// One release at a time: two at once would read the same mappings and count them twice.
pub fn release_file_pages() -> std::io::Result<usize> {
    let _one = releasing_file_pages();
    drop_clean_file_pages()
}

/// Held by whoever drops the file pages (a panic while holding it left nothing half done).
fn releasing_file_pages() -> std::sync::MutexGuard<'static, ()> {
    static RELEASING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RELEASING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// [`release_file_pages`]'s work, with [`releasing_file_pages`] held.
fn drop_clean_file_pages() -> std::io::Result<usize> {
    let smaps = std::fs::read("/proc/self/smaps")?;
    let smaps = String::from_utf8_lossy(&smaps);
    let mut dropped = 0;
    for (range, resident) in clean_file_ranges(&smaps) {
        // SAFETY: the range is a whole private mapping of a file that is not writable and
        // held no anonymous page when `smaps` was read just above: dropping its pages loses
        // nothing, and the next access reads the same bytes from the page cache, as after
        // the kernel reclaimed them (which it may do to these pages at any time). What could
        // give such a mapping a page of its own in between (a debugger's breakpoint, a
        // uprobe, a write through `/proc/self/mem`) would be dropped with it: the probe stops
        // firing in this process; nothing the program itself wrote is lost, as it writes to
        // none of these mappings.
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
        dropped += resident;
    }
    Ok(dropped)
}

/// The private mappings of files in `smaps` (`/proc/<pid>/smaps`) that are not writable and
/// are seen to hold no anonymous page, resident or swapped out (a private mapping's written
/// page is anonymous; `Private_Dirty` also counts the page cache's own dirty pages of a file
/// just written, which are the file's): each with the bytes it has resident. Not shared
/// mappings (an eBPF ring's pages), nor the kernel's own (`[vdso]`, inode 0). A mapping whose
/// `Anonymous:` line is missing or unreadable is kept.
fn clean_file_ranges(smaps: &str) -> Vec<(std::ops::Range<usize>, usize)> {
    let mut ranges = Vec::new();
    /// The mapping being read.
    struct Reading {
        range: std::ops::Range<usize>,
        candidate: bool,
        no_anonymous: bool,
        resident: usize,
    }
    let mut current: Option<Reading> = None;
    let mut finish = |current: Option<Reading>| {
        if let Some(m) = current.filter(|m| m.candidate && m.no_anonymous) {
            ranges.push((m.range, m.resident));
        }
    };
    for line in smaps.lines() {
        if let Some(m) = mapping_header(line) {
            finish(current.take());
            current = Some(Reading {
                candidate: m.inode != "0" && !m.perms.contains('w') && m.perms.ends_with('p'),
                range: m.range,
                no_anonymous: false,
                resident: 0,
            });
            continue;
        }
        let (Some(m), Some((field, value))) = (current.as_mut(), line.split_once(':')) else {
            continue;
        };
        let kb = value
            .trim()
            .strip_suffix(" kB")
            .and_then(|v| v.parse::<usize>().ok());
        match (field, kb) {
            ("Anonymous", Some(0)) => m.no_anonymous = true,
            ("Anonymous" | "Swap", _) if kb != Some(0) => m.candidate = false,
            ("Rss", Some(kb)) => m.resident = kb * 1024,
            _ => {}
        }
    }
    finish(current);
    ranges
}

/// A mapping's first line in `smaps`: `start-end perms offset dev inode [path]`.
struct Mapping<'a> {
    range: std::ops::Range<usize>,
    perms: &'a str,
    inode: &'a str,
}

fn mapping_header(line: &str) -> Option<Mapping<'_>> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    let _offset = fields.next()?;
    let dev = fields.next()?;
    let inode = fields.next()?;
    if perms.len() != 4 || start >= end || !dev.contains(':') || inode.parse::<u64>().is_err() {
        return None;
    }
    Some(Mapping {
        range: start..end,
        perms,
        inode,
    })
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

/// The most time a thread may spend running tasks in one beat and still count as quiet. A
/// runtime whose tasks are always ready never parks, so its wake-up count stands still while
/// it works flat out: its busy time (a second a beat) tells it apart. A quiet beat's own work
/// counts too: handing memory back (a millisecond or two) stays well below it, so a release
/// never ends the spell it began.
pub const QUIET_BUSY: std::time::Duration = std::time::Duration::from_millis(50);

/// The busiest beat since memory was last handed back must have run at least this long for a
/// fall of the load to hand it back again ([`Spell::Fell`]): below it, the pages a thread keeps
/// for its next requests are few.
pub const FALL_PEAK: std::time::Duration = std::time::Duration::from_millis(200);

/// A beat at most this part of the busiest one since memory was last handed back is a fall of
/// the load ([`Spell::Fell`]).
pub const FALL_RATIO: u32 = 4;

/// Tells, beat by beat, when a thread that worked has gone quiet: the first beat with at most
/// [`QUIET_WAKES`] wake-ups and [`QUIET_BUSY`] of work since the one before (its runtime's
/// `worker_park_count` and `worker_total_busy_duration`) begins a quiet spell, the first beat
/// with more ends it. A thread never seen working begins one at its first quiet beat (what
/// starting up freed).
///
/// It also tells when the load fell without stopping: a beat busy for at most a
/// [`FALL_RATIO`]th of the busiest beat since memory last went back, that one busy for at least
/// [`FALL_PEAK`]. A node that served a burst flat out and goes on serving a trickle would
/// otherwise keep, as long as the trickle lasts, the free pages the burst's requests left in
/// its heap (about 0.3 MiB of the 2 MiB a node serving 1 000 requests/s holds more after
/// saturation than before it; the rest is live, the upstream connections kept for reuse among
/// it: docs/benchmarks.md).
#[derive(Debug, Default)]
pub struct Quiet {
    /// The wake-up count and the busy time at the last beat (none before the first).
    last: Option<(u64, std::time::Duration)>,
    /// In a quiet spell.
    quiet: bool,
    /// The busiest beat since memory last went back (a fall or a quiet spell).
    peak: std::time::Duration,
}

/// What a beat of [`Quiet`] saw change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spell {
    /// The thread went quiet: hand back what it freed.
    Began,
    /// It works again.
    Ended,
    /// It works, at a fraction of its load before: hand back what the load before freed.
    Fell,
}

impl Quiet {
    /// A beat with the thread's wake-up count and busy time so far: whether a quiet spell
    /// began or ended.
    pub fn beat(&mut self, wakes: u64, busy: std::time::Duration) -> Option<Spell> {
        let (last_wakes, last_busy) = self.last.replace((wakes, busy))?;
        let worked = busy.saturating_sub(last_busy);
        let quiet = wakes.saturating_sub(last_wakes) <= QUIET_WAKES && worked <= QUIET_BUSY;
        let fell = self.peak >= FALL_PEAK && worked * FALL_RATIO <= self.peak;
        self.peak = self.peak.max(worked);
        let spell = match (std::mem::replace(&mut self.quiet, quiet), quiet) {
            (false, true) => Some(Spell::Began),
            (true, false) => Some(Spell::Ended),
            (false, false) if fell => Some(Spell::Fell),
            _ => None,
        };
        if matches!(spell, Some(Spell::Began | Spell::Fell)) {
            // Handed back: the next fall is measured from here.
            self.peak = worked;
        }
        spell
    }
}

/// The data-path workers' quiet spells, counted together. Once the last of them goes quiet the
/// node serves nothing, and the pages of its mapped files go too ([`release_file_pages`]): the
/// code and read-only data the traffic before ran (a TCP relay's, the HBONE path's) do not stay
/// resident through what comes next, which maps its own again (a minor fault per 64 KiB). A
/// node under load never drops them: a worker with work is not quiet.
#[derive(Debug)]
pub struct Workers {
    count: usize,
    quiet: AtomicUsize,
}

impl Workers {
    /// `count` workers, none quiet yet.
    pub fn new(count: usize) -> Workers {
        Workers {
            count,
            quiet: AtomicUsize::new(0),
        }
    }

    /// A worker's beat saw `spell`: hands back what this thread freed when it went quiet or its
    /// load fell, and the mapped files' pages when it was the last to go quiet. Returns whether
    /// it let go of those.
    pub fn beat(&self, spell: Option<Spell>) -> bool {
        match spell {
            Some(Spell::Began) => {
                let last = self.went_quiet();
                if last {
                    // Before the heap's pages: reading the mappings allocates.
                    let_go_of_file_pages();
                }
                release_here();
                last
            }
            Some(Spell::Ended) => {
                self.quiet.fetch_sub(1, Ordering::AcqRel);
                false
            }
            Some(Spell::Fell) => {
                // The node still serves: its code stays; the heap's free pages go.
                release_here();
                false
            }
            None => false,
        }
    }

    /// Counts a worker gone quiet: whether it was the last.
    fn went_quiet(&self) -> bool {
        self.quiet.fetch_add(1, Ordering::AcqRel) + 1 == self.count
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

    /// Blocks of a size whose class is not a power of two stay in that class however many are
    /// taken and given back (with the aligned entry points, all but the first page's went to
    /// the next class up); a larger alignment is honoured.
    #[test]
    fn blocks_are_of_their_own_size_class() {
        let usable = |p: *mut u8| unsafe { libmimalloc_sys::mi_usable_size(p.cast()) };
        let flow = Layout::from_size_align(384, 8).unwrap();
        for round in 0..3 {
            let blocks: Vec<*mut u8> = (0..1_000)
                .map(|_| unsafe { Allocator.alloc(flow) })
                .collect();
            for &p in &blocks {
                assert!(!p.is_null());
                assert_eq!(usable(p), 384, "round {round}");
                assert!((p as usize).is_multiple_of(8));
            }
            for p in blocks {
                unsafe { Allocator.dealloc(p, flow) };
            }
        }
        for align in [16, 64, 4096] {
            let layout = Layout::from_size_align(200, align).unwrap();
            let p = unsafe { Allocator.alloc_zeroed(layout) };
            assert!(
                !p.is_null() && (p as usize).is_multiple_of(align),
                "aligned to {align}"
            );
            assert!(unsafe { std::slice::from_raw_parts(p, 200) }
                .iter()
                .all(|&b| b == 0));
            let q = unsafe { Allocator.realloc(p, layout, 5_000) };
            assert!(
                !q.is_null() && (q as usize).is_multiple_of(align),
                "still aligned to {align}"
            );
            unsafe { Allocator.dealloc(q, Layout::from_size_align(5_000, align).unwrap()) };
        }
    }

    /// A beat `ms` milliseconds busy in all.
    fn busy(ms: u64) -> std::time::Duration {
        std::time::Duration::from_millis(ms)
    }

    #[test]
    fn a_worker_hands_memory_back_once_per_quiet_spell() {
        let mut q = Quiet::default();
        // The first beat only sets the counts.
        assert_eq!(q.beat(100, busy(50)), None);
        // Busy: many wake-ups a beat.
        assert_eq!(q.beat(900, busy(300)), None);
        assert_eq!(q.beat(5_000, busy(600)), None);
        // Quiet: once, then not again while it stays quiet.
        assert_eq!(q.beat(5_000 + QUIET_WAKES, busy(601)), Some(Spell::Began));
        assert_eq!(q.beat(5_000 + QUIET_WAKES + 1, busy(601)), None);
        assert_eq!(q.beat(5_000 + QUIET_WAKES + 1, busy(602)), None);
        // Busy again, then quiet again: once more.
        assert_eq!(q.beat(9_000, busy(900)), Some(Spell::Ended));
        assert_eq!(q.beat(12_000, busy(1_200)), None);
        assert_eq!(q.beat(12_001, busy(1_200)), Some(Spell::Began));
        assert_eq!(q.beat(12_002, busy(1_201)), None);
    }

    /// A worker that served flat out and goes on serving a trickle hands back once, when the
    /// load fell; again only after another peak and fall.
    #[test]
    fn a_worker_hands_memory_back_when_its_load_falls() {
        let mut q = Quiet::default();
        assert_eq!(q.beat(0, busy(0)), None);
        // A light load: no peak to fall from.
        assert_eq!(q.beat(500, busy(100)), None);
        assert_eq!(q.beat(1_000, busy(110)), None);
        // Flat out, then a trickle: a fall.
        assert_eq!(q.beat(1_100, busy(1_000)), None);
        assert_eq!(q.beat(1_200, busy(1_900)), None);
        assert_eq!(q.beat(1_700, busy(2_000)), Some(Spell::Fell));
        // The trickle goes on: nothing more to hand back.
        assert_eq!(q.beat(2_200, busy(2_040)), None);
        assert_eq!(q.beat(2_700, busy(2_080)), None);
        // Half the load of the peak is not a fall.
        assert_eq!(q.beat(2_800, busy(2_980)), None);
        assert_eq!(q.beat(3_300, busy(3_430)), None);
        // A quarter of it is.
        assert_eq!(q.beat(3_800, busy(3_655)), Some(Spell::Fell));
        // A fall to nothing is a quiet spell (which hands back more).
        assert_eq!(q.beat(4_000, busy(4_555)), None);
        assert_eq!(q.beat(4_001, busy(4_556)), Some(Spell::Began));
        assert_eq!(q.beat(5_000, busy(4_800)), Some(Spell::Ended));
    }

    /// A worker whose tasks are always ready never parks: its wake-up count stands still while
    /// it works flat out, and its busy time tells.
    #[test]
    fn a_worker_that_never_parks_is_not_quiet() {
        let mut q = Quiet::default();
        assert_eq!(q.beat(10, busy(0)), None);
        assert_eq!(q.beat(10, busy(990)), None);
        assert_eq!(q.beat(10, busy(1_980)), None);
        assert_eq!(q.beat(10, busy(1_980 + 50)), Some(Spell::Began));
        assert_eq!(q.beat(10, busy(2_900)), Some(Spell::Ended));
    }

    /// What the previous test assumes of tokio: a current-thread runtime kept busy by tasks
    /// that are always ready counts no park, and counts the time it works (a beat's worth here).
    #[test]
    fn a_saturated_runtime_counts_busy_time_and_no_park() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let metrics = rt.metrics();
        let (parks, busy) = rt.block_on(async {
            // Let the runtime settle (its first park), then work without a pause.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let before = (
                metrics.worker_park_count(0),
                metrics.worker_total_busy_duration(0),
            );
            let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
            let spin = tokio::spawn(async move {
                while std::time::Instant::now() < until {
                    tokio::task::yield_now().await;
                }
            });
            while !spin.is_finished() {
                tokio::task::yield_now().await;
            }
            (
                metrics.worker_park_count(0) - before.0,
                metrics.worker_total_busy_duration(0) - before.1,
            )
        });
        assert!(parks <= QUIET_WAKES, "{parks} parks while always ready");
        // Not all of it: each yield parks to poll the driver (not counted busy); a worker whose
        // tasks are ready from I/O does so once every 61 tasks.
        assert!(
            busy > QUIET_BUSY * 2,
            "{busy:?} counted busy in a second of work"
        );
    }

    #[test]
    fn a_worker_that_never_worked_hands_back_what_starting_freed() {
        let mut q = Quiet::default();
        assert_eq!(q.beat(0, busy(0)), None);
        assert_eq!(q.beat(1, busy(0)), Some(Spell::Began));
        assert_eq!(q.beat(2, busy(1)), None);
    }

    /// The mapped files' pages go when the last worker goes quiet, not while another works,
    /// and again each time all of them are quiet after some worked.
    #[test]
    fn the_last_worker_to_go_quiet_lets_go_of_the_files() {
        let workers = Workers::new(2);
        assert!(!workers.beat(Some(Spell::Began)), "one of two is quiet");
        assert!(!workers.beat(None));
        assert!(workers.beat(Some(Spell::Began)), "the last one went quiet");
        assert!(!workers.beat(None), "once per spell of them all");
        assert!(!workers.beat(Some(Spell::Ended)));
        assert!(workers.beat(Some(Spell::Began)), "all quiet again");
        assert!(!workers.beat(Some(Spell::Ended)));
        assert!(!workers.beat(Some(Spell::Ended)));
        assert!(!workers.beat(Some(Spell::Began)));
        assert!(workers.beat(Some(Spell::Began)));
        let one = Workers::new(1);
        assert!(one.beat(Some(Spell::Began)));
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
VmFlags: rd ex mr mw me sd
55d0a1900000-55d0a1a00000 r--p 01900000 fd:01 1234                       /opt/weft/weft
Rss:                1024 kB
Anonymous:          1024 kB
Private_Dirty:      1024 kB
55d0a1a00000-55d0a1a09000 rw-p 01a00000 fd:01 1234                       /opt/weft/weft
Anonymous:            36 kB
55d0a1a09000-55d0a1a0a000 r--p 01a09000 fd:01 1234                       /opt/weft/weft
Rss:                   4 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0 
Anonymous:          1024 kB
7f0000400000-7f0000500000 r--p 00000000 fd:02 1234                       /opt/other disk/weft
Anonymous:             0 kB
7f0000600000-7f0000700000 r-xp 00000000 fd:01 1235                       /opt/weft/weft (deleted)
Rss:                  64 kB
Anonymous:             0 kB
7f0000800000-7f0000810000 r--s 00000000 00:0e 4321                       anon_inode:bpf-map
Rss:                  64 kB
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Anonymous:             0 kB
";

    #[test]
    fn only_clean_private_read_only_file_mappings_are_dropped() {
        assert_eq!(
            clean_file_ranges(SMAPS),
            vec![
                (0x55d0a0000000..0x55d0a02b3000, 2716 * 1024),
                (0x55d0a02b3000..0x55d0a1900000, 15680 * 1024),
                (0x7f0000000000..0x7f0000100000, 0),
                (0x7f0000400000..0x7f0000500000, 0),
                (0x7f0000600000..0x7f0000700000, 64 * 1024),
            ],
            "the executable's code and constants, a library's, another file's, a replaced \
             binary's (still run from its deleted file); not the relocated read-only data, \
             writable data, a mapping not seen to hold no anonymous page, anonymous memory, a \
             shared mapping or the kernel's"
        );
        // A page of its own anywhere in a mapping keeps all of it.
        let swapped = SMAPS.replacen(
            "Swap:                  0 kB",
            "Swap:                  4 kB",
            1,
        );
        assert!(!clean_file_ranges(&swapped)
            .iter()
            .any(|(range, _)| range.start == 0x55d0a02b3000));
        // Nothing readable: nothing.
        assert!(clean_file_ranges("").is_empty());
        assert!(clean_file_ranges("garbage\nAnonymous: 0 kB\n").is_empty());
    }

    /// The resident kB of the mappings `release_file_pages` drops, from `/proc/self/smaps`.
    fn clean_file_rss_kb() -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        clean_file_ranges(&smaps)
            .iter()
            .map(|(_, resident)| resident / 1024)
            .sum()
    }

    /// Constants of this test binary's own, read by the test below only: 256 KiB of read-only
    /// data, in which the pages of the (aligned, 64 KiB) fault-around windows wholly inside it,
    /// at least three, hold nothing else.
    static CONSTANTS: [u8; 256 * 1024] = {
        let mut a = [0; 256 * 1024];
        let mut i = 0;
        while i < a.len() {
            a[i] = (i % 251) as u8;
            i += 1;
        }
        a
    };

    /// The sum of [`CONSTANTS`], every page of it read.
    fn read_constants() -> u64 {
        std::hint::black_box(&CONSTANTS)
            .iter()
            .map(|&b| u64::from(b))
            .sum()
    }

    /// How many of the pages of [`CONSTANTS`] away from its ends this process has mapped
    /// (`/proc/self/pagemap`'s present bit), of how many.
    fn constants_mapped() -> (usize, usize) {
        use std::os::unix::fs::FileExt;
        let page = 4096;
        let start = (CONSTANTS.as_ptr() as usize).next_multiple_of(64 * 1024);
        let end = (CONSTANTS.as_ptr() as usize + CONSTANTS.len()) / (64 * 1024) * (64 * 1024);
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let pages = (start..end).step_by(page);
        let total = pages.len();
        let mapped = pages
            .filter(|addr| {
                let mut entry = [0; 8];
                pagemap
                    .read_exact_at(&mut entry, (addr / page * 8) as u64)
                    .unwrap();
                u64::from_ne_bytes(entry) >> 63 == 1
            })
            .count();
        (mapped, total)
    }

    #[test]
    fn mapped_files_pages_are_let_go_of_and_run_again() {
        // Other tests release too (the registry's rebuilds): none while this one counts.
        let _one = releasing_file_pages();
        let sum = read_constants();
        let (mapped, total) = constants_mapped();
        assert!(total >= 8, "{total} pages");
        assert_eq!(mapped, total, "constants read are mapped");
        // This test binary's code and constants, its libraries': found, and resident.
        let before = clean_file_rss_kb();
        assert!(before > 0);
        let dropped = drop_clean_file_pages().unwrap();
        assert!(dropped >= before * 1024 / 2, "{dropped} bytes let go of");
        // Let go of, and read again from the page cache: the same bytes.
        assert_eq!(constants_mapped(), (0, total));
        assert_eq!(read_constants(), sum);
        assert_eq!(constants_mapped(), (total, total));
    }

    #[test]
    fn freed_memory_goes_back_at_once_only_while_starting() {
        // SAFETY: reading options by their index.
        let option = |i| unsafe { libmimalloc_sys::mi_option_get(i) };
        let delay = || option(PURGE_DELAY);
        // The index is the purge delay's: mimalloc 3's defaults around it (the deprecated
        // eager commit delay 1, the purge delay 1000, `use_numa_nodes` 0,
        // `disallow_os_alloc` 0, `os_tag` 100, `max_errors` 32).
        let configured = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse().ok());
        assert_eq!(
            (14..=19).map(option).collect::<Vec<_>>(),
            [1, configured.unwrap_or(1000), 0, 0, 100, 32]
        );
        let serving_delay = delay();
        starting();
        // At once (0), unless it was never (-1).
        assert_eq!(delay(), serving_delay.min(0));
        serving();
        assert_eq!(delay(), serving_delay);
        // Serving again, or without having started, changes nothing.
        serving();
        assert_eq!(delay(), serving_delay);
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
