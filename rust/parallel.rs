//! Deterministic parallel scheduling over many arrays at once.
//!
//! Every array of a call contributes one item (a tuple of equally long slices, one per
//! stream). The items are laid end to end and cut into tasks, so a task may span several
//! small arrays or cover part of a large one. For reductions the cut is into tasks of
//! `CHUNK_LEN` elements, which depends only on the array sizes and their (sorted) order,
//! never on the thread count: per-task partial sums are combined in task order, so the
//! result is reproducible. Element-wise work is cut evenly among the threads instead.

use std::cell::UnsafeCell;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Elements per task: large enough to amortise scheduling, small enough that a 2-core
/// machine stays balanced on a few hundred thousand elements.
pub const CHUNK_LEN: usize = 1 << 15;

/// A value that can be cut in two at an element index, like a slice.
pub trait Split: Sized {
    fn split_at(self, mid: usize) -> (Self, Self);
}

/// A set of parallel streams of equal length; the first stream gives the length.
pub trait Lanes: Split + Send {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Split for &mut [T] {
    fn split_at(self, mid: usize) -> (Self, Self) {
        self.split_at_mut(mid)
    }
}

impl<T> Split for &[T] {
    fn split_at(self, mid: usize) -> (Self, Self) {
        <[T]>::split_at(self, mid)
    }
}

impl<A: Split> Split for Option<A> {
    fn split_at(self, mid: usize) -> (Self, Self) {
        match self {
            Some(a) => {
                let (head, tail) = a.split_at(mid);
                (Some(head), Some(tail))
            }
            None => (None, None),
        }
    }
}

/// A per-array constant (a group's index, a weight) travels whole with every piece.
macro_rules! constant_lanes {
    ($($t:ty),*) => {$(
        impl Split for $t {
            fn split_at(self, _: usize) -> (Self, Self) {
                (self, self)
            }
        }
    )*};
}
constant_lanes!(u32, f64);

impl<A: Split, const N: usize> Split for [A; N] {
    fn split_at(self, mid: usize) -> (Self, Self) {
        let mut tails: [Option<A>; N] = std::array::from_fn(|_| None);
        let mut next = 0;
        let heads = self.map(|a| {
            let (head, tail) = a.split_at(mid);
            tails[next] = Some(tail);
            next += 1;
            head
        });
        (heads, tails.map(|tail| tail.expect("one tail per head")))
    }
}

impl<T: Send> Lanes for &mut [T] {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
}

impl<T: Sync> Lanes for &[T] {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
}

macro_rules! tuple_lanes {
    ($first:ident $(, $rest:ident)*) => {
        #[allow(non_snake_case)]
        impl<$first: Split $(, $rest: Split)*> Split for ($first, $($rest,)*) {
            fn split_at(self, mid: usize) -> (Self, Self) {
                let ($first, $($rest,)*) = self;
                let $first = $first.split_at(mid);
                $(let $rest = $rest.split_at(mid);)*
                (($first.0, $($rest.0,)*), ($first.1, $($rest.1,)*))
            }
        }
        impl<$first: Lanes $(, $rest: Split + Send)*> Lanes for ($first, $($rest,)*) {
            fn len(&self) -> usize {
                self.0.len()
            }
        }
    };
}
tuple_lanes!(A, B);
tuple_lanes!(A, B, C);
tuple_lanes!(A, B, C, D);
tuple_lanes!(A, B, C, D, E);
tuple_lanes!(A, B, C, D, E, F);

/// The same streams for a float32 or a float64 parameter: one call may mix both.
#[derive(Clone, Copy, Debug)]
pub enum ByDtype<S, D> {
    Single(S),
    Double(D),
}

impl<S: Split, D: Split> Split for ByDtype<S, D> {
    fn split_at(self, mid: usize) -> (Self, Self) {
        match self {
            ByDtype::Single(s) => {
                let (head, tail) = s.split_at(mid);
                (ByDtype::Single(head), ByDtype::Single(tail))
            }
            ByDtype::Double(d) => {
                let (head, tail) = d.split_at(mid);
                (ByDtype::Double(head), ByDtype::Double(tail))
            }
        }
    }
}

impl<S: Lanes, D: Lanes> Lanes for ByDtype<S, D> {
    fn len(&self) -> usize {
        match self {
            ByDtype::Single(s) => s.len(),
            ByDtype::Double(d) => d.len(),
        }
    }
}

/// Items cut into tasks, all held in one buffer of the caller's: task `k` is
/// `pieces[bounds[k]..bounds[k + 1]]`. The thread that claims a task reads its pieces out
/// without writing to the buffer or freeing anything of the caller's, so that a helper on
/// another die takes no cache line away from the caller.
struct Tasks<L> {
    pieces: Vec<UnsafeCell<ManuallyDrop<L>>>,
    bounds: Vec<usize>,
}

// SAFETY: each task's pieces are read out once, by the one thread that claimed the task.
unsafe impl<L: Send> Sync for Tasks<L> {}

impl<L: Lanes> Tasks<L> {
    /// Cuts the items, laid end to end in the given order, into tasks of `chunk_len`
    /// elements (the last one shorter). Empty items are dropped.
    fn cut(items: impl IntoIterator<Item = L>, chunk_len: usize) -> Tasks<L> {
        let mut pieces = Vec::new();
        let mut bounds = vec![0];
        let mut room = chunk_len;
        for mut item in items {
            while !item.is_empty() {
                let len = item.len();
                if len < room {
                    // An item that fits is not split (most of many small arrays).
                    pieces.push(UnsafeCell::new(ManuallyDrop::new(item)));
                    room -= len;
                    break;
                }
                let (piece, tail) = item.split_at(room);
                item = tail;
                pieces.push(UnsafeCell::new(ManuallyDrop::new(piece)));
                bounds.push(pieces.len());
                room = chunk_len;
            }
        }
        if bounds.last() != Some(&pieces.len()) {
            bounds.push(pieces.len());
        }
        Tasks { pieces, bounds }
    }

    fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Task `index`'s pieces, moved out of the buffer.
    ///
    /// # Safety
    /// Each task may be taken once only.
    unsafe fn take(&self, index: usize) -> impl Iterator<Item = L> + '_ {
        let pieces = &self.pieces[self.bounds[index]..self.bounds[index + 1]];
        // SAFETY: the caller takes each task once, so each piece is moved out once; the
        // buffer never drops its pieces (`ManuallyDrop`).
        pieces
            .iter()
            .map(|piece| unsafe { ManuallyDrop::into_inner(std::ptr::read(piece.get())) })
    }
}

/// The task length that cuts `total` elements into a multiple of `threads` tasks of at most
/// `CHUNK_LEN` elements, as equal as can be: every thread then gets the same amount of work
/// without taking any from another (see `Shared`). Work that fits one task stays one task,
/// run by the caller alone: handing a few microseconds of work to another core costs more.
fn even_chunk_len(total: usize, threads: usize) -> usize {
    let tasks = total.div_ceil(CHUNK_LEN);
    if tasks <= 1 {
        return CHUNK_LEN;
    }
    total.div_ceil(tasks.next_multiple_of(threads))
}

/// A value on cache lines of its own (128 bytes: the prefetcher fetches lines in pairs), so
/// that writing it never takes a line another thread is using, nor the other way round.
#[repr(align(128))]
struct OwnLine<T>(T);

impl<T> std::ops::Deref for OwnLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// One thread's share of a pass's tasks, held in an `OwnLine` so that claiming and counting
/// its own tasks never moves a line between cores.
struct Share {
    /// The share's unclaimed tasks `[front, back)`, packed as `back << 32 | front`: its
    /// owner claims from the front, a thread out of work steals from the back.
    unclaimed: AtomicU64,
    /// Tasks this share's thread has run, its own or stolen.
    done: AtomicUsize,
    /// Whether the owner has started on its share.
    arrived: AtomicBool,
}

/// Tasks shared between the calling thread and the helper threads. Each thread owns an
/// equal, contiguous share of the tasks, the same from one pass to the next, so that it
/// works on the same part of the arrays whose data its own caches still hold: on a machine
/// whose cores sit on different dies, data that changes threads between passes moves
/// between caches at a fraction of their bandwidth. A thread that has run its share steals
/// from another only while that leaves the owner more than one task, or from one that has
/// not come at all: a call never waits for a sleeping thread to wake up (tens of
/// microseconds on a virtual machine), only for tasks already under way.
struct Shared {
    shares: Box<[OwnLine<Share>]>,
    total: usize,
    /// The caller's work, its lifetime erased: only called with a claimed index, and the
    /// caller does not return before every claimed task is done (see `WaitForClaimed`).
    work: *const (dyn Fn(usize) + Sync),
}

// SAFETY: `work` points to a `Sync` closure, called only while the caller waits for it.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

fn pack(front: usize, back: usize) -> u64 {
    (back as u64) << 32 | front as u64
}

fn unpack(unclaimed: u64) -> (usize, usize) {
    (
        (unclaimed & u64::from(u32::MAX)) as usize,
        (unclaimed >> 32) as usize,
    )
}

/// How long the caller, out of tasks, leaves a helper's last unclaimed task to that helper
/// before it runs the task itself: about as long as a cache-resident task takes, so a
/// helper between two tasks gets to its own data, and one the system stopped does not hold
/// the call up for long.
const LAST_TASK_GRACE: Duration = Duration::from_micros(50);

impl Shared {
    /// `total` tasks cut into `threads` shares: share 0 is the caller's, share `k` helper
    /// `k`'s.
    fn new(total: usize, threads: usize, work: *const (dyn Fn(usize) + Sync)) -> Shared {
        assert!(total <= u32::MAX as usize, "too many tasks for one call");
        let bound = |k: usize| k * total / threads;
        Shared {
            shares: (0..threads)
                .map(|k| {
                    OwnLine(Share {
                        unclaimed: AtomicU64::new(pack(bound(k), bound(k + 1))),
                        done: AtomicUsize::new(0),
                        arrived: AtomicBool::new(k == 0),
                    })
                })
                .collect(),
            total,
            work,
        }
    }

    /// Takes a task off `share`: its front for the owner, its back for a thief. A thief
    /// takes one only from an owner that has not arrived or has at least `leave + 1` left.
    fn take(&self, share: &Share, owner: bool, leave: usize) -> Option<usize> {
        let mut current = share.unclaimed.load(Ordering::Acquire);
        loop {
            let (front, back) = unpack(current);
            let left = back.saturating_sub(front);
            if left == 0 || (left <= leave && share.arrived.load(Ordering::Acquire)) {
                return None;
            }
            let (index, next) = match owner {
                true => (front, pack(front + 1, back)),
                false => (back - 1, pack(front, back - 1)),
            };
            match share.unclaimed.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(index),
                Err(actual) => current = actual,
            }
        }
    }

    /// A task stolen from another thread's share, leaving an arrived owner `leave` tasks.
    fn steal(&self, me: usize, leave: usize) -> Option<usize> {
        let n = self.shares.len();
        (1..n).find_map(|k| self.take(&self.shares[(me + k) % n], false, leave))
    }

    fn run(&self, me: usize, index: usize) {
        let _counted = CountDone(&self.shares[me].done);
        // SAFETY: `index` was claimed, so the caller is still waiting (see `work`).
        unsafe { (*self.work)(index) };
    }

    /// Runs thread `me`'s share, then whatever it may steal.
    fn help(&self, me: usize) {
        let own = &self.shares[me];
        own.arrived.store(true, Ordering::Release);
        while let Some(index) = self.take(own, true, 0) {
            self.run(me, index);
        }
        while let Some(index) = self.steal(me, 1) {
            self.run(me, index);
        }
    }

    /// The caller after its `help`: leaves each arrived helper its last task for
    /// `LAST_TASK_GRACE`, then runs any still unclaimed itself.
    fn claim_the_rest(&self) {
        let waiting_since = Instant::now();
        let mut spins = 0u32;
        while self.unclaimed() > 0 {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && waiting_since.elapsed() >= LAST_TASK_GRACE {
                while let Some(index) = self.steal(0, 0) {
                    self.run(0, index);
                }
            }
        }
    }

    fn unclaimed(&self) -> usize {
        let left = |share: &Share| {
            let (front, back) = unpack(share.unclaimed.load(Ordering::Acquire));
            back.saturating_sub(front)
        };
        self.shares.iter().map(|share| left(share)).sum()
    }
}

/// Counts a task done when it ends, also if it unwinds.
struct CountDone<'a>(&'a AtomicUsize);

impl Drop for CountDone<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Closes the tasks to new claims and waits for the claimed ones, also if the caller
/// unwinds: the helper threads may be using the caller's data until then.
struct WaitForClaimed<'a>(&'a Shared);

impl Drop for WaitForClaimed<'_> {
    fn drop(&mut self) {
        let shares = &self.0.shares;
        let never_claimed: usize = shares
            .iter()
            .map(|share| {
                let (front, back) = unpack(share.unclaimed.swap(0, Ordering::AcqRel));
                back.saturating_sub(front)
            })
            .sum();
        let claimed = self.0.total - never_claimed;
        let done = || {
            let count = |share: &Share| share.done.load(Ordering::Acquire);
            shares.iter().map(|share| count(share)).sum::<usize>()
        };
        let mut spins = 0u32;
        while done() < claimed {
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// How long a helper thread keeps looking for new tasks after its last ones before it
/// sleeps: long enough to bridge the Python side of a call and the gap between SAM's two
/// phases, so that the helper is still running on its own core when tasks come. Woken from
/// sleep, the scheduler may queue it on the caller's busy core instead.
const HELPER_SPIN: Duration = Duration::from_micros(200);

/// The latest tasks offered to the helper threads.
struct Offer {
    shared: Option<Arc<Shared>>,
    generation: u64,
    sleeping: usize,
}

/// Threads that help the calling thread: one fewer than rayon's thread count
/// (`RAYON_NUM_THREADS`, else one per core), since the caller works too.
struct Helpers {
    offer: Mutex<Offer>,
    /// `offer.generation`, readable without the lock while spinning (on a line of its
    /// own: the spinning helpers would otherwise keep taking the lock's line from the
    /// caller).
    generation: OwnLine<AtomicU64>,
    wake: Condvar,
}

/// The helper threads and how many threads share a call's tasks: the caller (share 0) and
/// helpers `1..threads`.
#[derive(Clone, Copy)]
struct Team {
    helpers: &'static Helpers,
    threads: usize,
}

impl Team {
    /// The team for calls made now: none with a single thread (also inside a one-thread
    /// rayon pool).
    fn get() -> Option<Team> {
        static TEAM: OnceLock<Option<Team>> = OnceLock::new();
        let team = *TEAM.get_or_init(|| {
            let wanted = rayon::current_num_threads().saturating_sub(1);
            if wanted == 0 {
                return None;
            }
            let helpers: &'static Helpers = Box::leak(Box::new(Helpers {
                offer: Mutex::new(Offer {
                    shared: None,
                    generation: 0,
                    sleeping: 0,
                }),
                generation: OwnLine(AtomicU64::new(0)),
                wake: Condvar::new(),
            }));
            let mut spawned = 0;
            for _ in 0..wanted {
                let share = spawned + 1;
                let thread = std::thread::Builder::new().name(format!("samopt-{share}"));
                spawned += usize::from(thread.spawn(move || helpers.serve(share)).is_ok());
            }
            (spawned > 0).then_some(Team {
                helpers,
                threads: spawned + 1,
            })
        });
        team.filter(|_| rayon::current_num_threads() > 1)
    }
}

impl Helpers {
    /// A helper thread running share `share` of each offer: spins a while for the next
    /// offer after its last tasks, then sleeps.
    fn serve(&self, share: usize) {
        let mut seen = 0;
        loop {
            let spin_start = Instant::now();
            let mut spins = 0u32;
            while self.generation.load(Ordering::Acquire) == seen {
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                // Reading the clock costs more than a spin: look at it now and then.
                if spins.is_multiple_of(256) && spin_start.elapsed() >= HELPER_SPIN {
                    break;
                }
            }
            let shared = {
                let mut offer = self.offer.lock().unwrap_or_else(|e| e.into_inner());
                while offer.generation == seen {
                    offer.sleeping += 1;
                    offer = self.wake.wait(offer).unwrap_or_else(|e| e.into_inner());
                    offer.sleeping -= 1;
                }
                seen = offer.generation;
                offer.shared.clone()
            };
            if let Some(shared) = shared {
                shared.help(share);
            }
        }
    }

    /// Offers tasks to the helper threads (replacing any earlier offer, whose tasks are all
    /// claimed or will be done by their caller). Never waits for the lock: when a helper
    /// holds it (or held it when the process forked, and is gone), the caller works alone.
    fn offer(&self, shared: &Arc<Shared>) {
        let sleeping = {
            let Ok(mut offer) = self.offer.try_lock() else {
                return;
            };
            offer.shared = Some(Arc::clone(shared));
            offer.generation += 1;
            self.generation.store(offer.generation, Ordering::Release);
            offer.sleeping
        };
        if sleeping > 0 {
            self.wake.notify_all();
        }
    }
}

/// Calls `work(i)` once for every `i < total`, on the calling thread and on whichever of
/// the helper threads come in time.
fn run_shared(total: usize, team: Option<Team>, work: &(dyn Fn(usize) + Sync)) {
    let team = team.filter(|_| total > 1);
    let Some(team) = team else {
        (0..total).for_each(work);
        return;
    };
    // SAFETY: only the lifetime is erased; see `Shared::work`.
    let work: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(work) };
    let shared = Arc::new(Shared::new(total, team.threads, work));
    let _wait = WaitForClaimed(&shared);
    team.helpers.offer(&shared);
    shared.help(0);
    shared.claim_the_rest();
}

/// A task's result, set without a lock by the one thread that claimed the task.
struct ResultSlot<R>(UnsafeCell<Option<R>>);

// SAFETY: a slot is written by the thread that claimed its index (each index is claimed
// once) and read by the caller after every task is done.
unsafe impl<R: Send> Sync for ResultSlot<R> {}

/// `per_task` applied to every task, in parallel; the results come back in task order,
/// whichever thread produced them.
fn map_tasks<L, R, F>(tasks: Tasks<L>, team: Option<Team>, per_task: F) -> Vec<R>
where
    L: Lanes,
    R: Send,
    F: Fn(&mut dyn Iterator<Item = L>) -> R + Sync,
{
    let results: Vec<ResultSlot<R>> = (0..tasks.len())
        .map(|_| ResultSlot(UnsafeCell::new(None)))
        .collect();
    run_shared(tasks.len(), team, &|index| {
        // SAFETY: this thread claimed `index`, and each index is claimed once.
        let result = per_task(&mut unsafe { tasks.take(index) });
        unsafe { *results[index].0.get() = Some(result) };
    });
    results
        .into_iter()
        .map(|slot| slot.0.into_inner().expect("run_shared runs every task"))
        .collect()
}

/// Applies `kernel` to every piece of every item, in parallel over tasks cut evenly among
/// the threads: element-wise work comes out the same however it is cut.
pub fn for_each<L, F>(items: Vec<L>, kernel: F)
where
    L: Lanes,
    F: Fn(L) + Sync + Send,
{
    let total = items.iter().map(Lanes::len).sum();
    let team = Team::get();
    let threads = team.map_or(1, |team| team.threads);
    let tasks = Tasks::cut(items, even_chunk_len(total, threads));
    map_tasks(tasks, team, |task| task.for_each(&kernel));
}

/// `per_task` over the items cut into tasks of `CHUNK_LEN` elements, as `ordered_sum`
/// cuts them (whatever the thread count); the results come back in task order.
pub fn map_chunks<L, R, F>(items: impl IntoIterator<Item = L>, per_task: F) -> Vec<R>
where
    L: Lanes,
    R: Send,
    F: Fn(&mut dyn Iterator<Item = L>) -> R + Sync,
{
    map_tasks(Tasks::cut(items, CHUNK_LEN), Team::get(), per_task)
}

/// Sums `partial(piece)` over every piece, reproducibly: the items are cut into tasks of
/// `CHUNK_LEN` elements whatever the thread count, pieces are summed in order within a
/// task and task totals in task order, whatever thread ran them.
pub fn ordered_sum<L, F>(items: impl IntoIterator<Item = L>, partial: F) -> f64
where
    L: Lanes,
    F: Fn(L) -> f64 + Sync + Send,
{
    let task_total =
        |task: &mut dyn Iterator<Item = L>| task.map(&partial).fold(0.0, |acc, x| acc + x);
    map_tasks(Tasks::cut(items, CHUNK_LEN), Team::get(), task_total)
        .into_iter()
        .fold(0.0, |acc, x| acc + x)
}

/// The largest `measure(piece)` over every piece (order-free, hence reproducible).
pub fn max_of<L, F>(items: impl IntoIterator<Item = L>, measure: F) -> f64
where
    L: Lanes,
    F: Fn(L) -> f64 + Sync + Send,
{
    let task_max = |task: &mut dyn Iterator<Item = L>| task.map(&measure).fold(0.0, f64::max);
    map_tasks(Tasks::cut(items, CHUNK_LEN), Team::get(), task_max)
        .into_iter()
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every task's pieces, in task order.
    fn cut_all<L: Lanes>(items: impl IntoIterator<Item = L>, chunk_len: usize) -> Vec<Vec<L>> {
        let tasks = Tasks::cut(items, chunk_len);
        // SAFETY: each task is taken once.
        (0..tasks.len())
            .map(|k| unsafe { tasks.take(k) }.collect())
            .collect()
    }

    #[test]
    fn tasks_cover_every_element_once_in_order() {
        let sizes = [0, 5, CHUNK_LEN - 3, 2 * CHUNK_LEN + 7, 1, 0, 3];
        let data: Vec<Vec<u32>> = sizes
            .iter()
            .scan(0u32, |next, &n| {
                let v: Vec<u32> = (*next..*next + n as u32).collect();
                *next += n as u32;
                Some(v)
            })
            .collect();
        let tasks = cut_all(data.iter().map(|v| v.as_slice()), CHUNK_LEN);
        let flat: Vec<u32> = tasks
            .iter()
            .flatten()
            .flat_map(|s| s.iter().copied())
            .collect();
        let total: usize = sizes.iter().sum();
        assert_eq!(flat, (0..total as u32).collect::<Vec<_>>());
        for (i, task) in tasks.iter().enumerate() {
            let len: usize = task.iter().map(|s| s.len()).sum();
            if i + 1 < tasks.len() {
                assert_eq!(len, CHUNK_LEN);
            } else {
                assert!(len <= CHUNK_LEN && len > 0);
            }
        }
    }

    #[test]
    fn for_each_writes_all_streams_of_all_items() {
        let mut a = vec![0.0f64; 3 * CHUNK_LEN + 11];
        let mut b = vec![0.0f64; 17];
        let src_a: Vec<f64> = (0..a.len()).map(|i| i as f64).collect();
        let src_b: Vec<f64> = (0..b.len()).map(|i| -(i as f64)).collect();
        let items = vec![
            (a.as_mut_slice(), src_a.as_slice()),
            (b.as_mut_slice(), src_b.as_slice()),
        ];
        for_each(items, |(dst, src): (&mut [f64], &[f64])| {
            dst.copy_from_slice(src)
        });
        assert_eq!(a, src_a);
        assert_eq!(b, src_b);
    }

    #[test]
    fn every_element_is_run_once_per_pass_over_many_passes() {
        // Sizes that give odd and even task counts, one task, and pieces across tasks.
        let mut arrays: Vec<Vec<u32>> = [7 * CHUNK_LEN + 5, 3, 2 * CHUNK_LEN, CHUNK_LEN - 1]
            .iter()
            .map(|&n| vec![0; n])
            .collect();
        let passes = 300;
        for _ in 0..passes {
            let items: Vec<&mut [u32]> = arrays.iter_mut().map(Vec::as_mut_slice).collect();
            for_each(items, |piece: &mut [u32]| {
                piece.iter_mut().for_each(|x| *x += 1)
            });
        }
        assert!(arrays.iter().flatten().all(|&x| x == passes));
    }

    #[test]
    fn for_each_covers_every_task_in_a_one_thread_pool() {
        let mut a = vec![0u32; 5 * CHUNK_LEN + 3];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        pool.install(|| for_each(vec![a.as_mut_slice()], |piece: &mut [u32]| piece.fill(7)));
        assert!(a.iter().all(|&x| x == 7));
    }

    #[test]
    fn ordered_sum_matches_task_order_sum_and_is_stable() {
        let v: Vec<f64> = (0..5 * CHUNK_LEN + 3)
            .map(|i| 1.0 / (1.0 + i as f64))
            .collect();
        let sum = |s: &[f64]| s.iter().sum::<f64>();
        let expected = cut_all([v.as_slice()], CHUNK_LEN)
            .into_iter()
            .map(|task| task.into_iter().map(sum).fold(0.0, |a, x| a + x))
            .fold(0.0, |a, x| a + x);
        for _ in 0..5 {
            assert_eq!(
                ordered_sum([v.as_slice()], sum).to_bits(),
                expected.to_bits()
            );
        }
    }

    #[test]
    fn even_cuts_give_every_thread_the_same_number_of_tasks_unless_one_task_does() {
        for total in [1, 7, CHUNK_LEN, 200_000, 10_000_000] {
            for threads in [1, 2, 3] {
                let data = vec![0u8; total];
                let tasks = cut_all([data.as_slice()], even_chunk_len(total, threads));
                let sizes: Vec<usize> = tasks.iter().map(|t| t[0].len()).collect();
                assert_eq!(sizes.iter().sum::<usize>(), total);
                assert!(sizes.iter().all(|&n| n <= CHUNK_LEN));
                match total <= CHUNK_LEN {
                    true => assert_eq!(sizes.len(), 1, "{total} elements: one task"),
                    false => assert_eq!(sizes.len() % threads, 0, "{total}, {threads} threads"),
                }
                let (min, max) = (sizes.iter().min(), sizes.iter().max());
                assert!(max.unwrap() - min.unwrap() <= sizes.len(), "{sizes:?}");
            }
        }
    }

    /// Runs a two-share pass with the caller alone (no helper ever comes), counting how
    /// often each task ran.
    fn caller_alone(total: usize) -> Vec<usize> {
        let runs: Vec<AtomicUsize> = (0..total).map(|_| AtomicUsize::new(0)).collect();
        let work = |i: usize| {
            runs[i].fetch_add(1, Ordering::Relaxed);
        };
        let work: &(dyn Fn(usize) + Sync) = &work;
        // SAFETY: only the lifetime is erased; the pass ends before `runs` goes.
        let work: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(work) };
        let shared = Shared::new(total, 2, work);
        {
            let _wait = WaitForClaimed(&shared);
            shared.help(0);
            shared.claim_the_rest();
        }
        runs.iter().map(|r| r.load(Ordering::Relaxed)).collect()
    }

    #[test]
    fn the_caller_runs_the_share_of_a_helper_that_never_comes() {
        for total in [2, 3, 8, 101] {
            assert_eq!(caller_alone(total), vec![1; total]);
        }
    }

    #[test]
    fn a_thief_leaves_an_arrived_owner_its_last_task() {
        let work: &(dyn Fn(usize) + Sync) = &|_| {};
        // SAFETY: only the lifetime is erased; no task is run.
        let work: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(work) };
        let shared = Shared::new(4, 2, work);
        let helper = &shared.shares[1];
        // The helper's share is tasks 2 and 3: before it arrives both may be stolen...
        assert_eq!(shared.take(helper, false, 1), Some(3));
        // ...once it has arrived, its last one is left to it.
        helper.arrived.store(true, Ordering::Release);
        assert_eq!(shared.take(helper, false, 1), None);
        assert_eq!(shared.take(helper, true, 0), Some(2));
    }

    #[test]
    fn mixed_dtypes_split_within_their_variant() {
        let x32 = vec![1.0f32; CHUNK_LEN + 1];
        let x64 = vec![2.0f64; 3];
        let items: Vec<ByDtype<&[f32], &[f64]>> =
            vec![ByDtype::Single(&x32), ByDtype::Double(&x64)];
        let total = ordered_sum(items, |piece| match piece {
            ByDtype::Single(s) => s.iter().map(|&x| f64::from(x)).sum(),
            ByDtype::Double(d) => d.iter().sum(),
        });
        assert_eq!(total, (CHUNK_LEN + 1) as f64 + 6.0);
    }
}
