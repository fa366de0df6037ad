//! Deterministic parallel scheduling over many arrays at once.
//!
//! Every array of a call contributes one item (a tuple of equally long slices, one per
//! stream). The items are laid end to end and cut into tasks of `CHUNK_LEN` elements, so a
//! task may span several small arrays or cover part of a large one. The cut depends only on
//! the array sizes and their (sorted) order, never on the thread count, which is what makes
//! reductions reproducible: per-task partial sums are combined in task order.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// Cuts the items, laid end to end in the given order, into tasks of `CHUNK_LEN` elements
/// (the last one shorter). Empty items are dropped.
pub fn into_tasks<L: Lanes>(items: impl IntoIterator<Item = L>) -> Vec<Vec<L>> {
    let mut tasks = Vec::new();
    let mut current = Vec::new();
    let mut room = CHUNK_LEN;
    for mut item in items {
        while item.len() > room {
            let (head, tail) = item.split_at(room);
            current.push(head);
            tasks.push(std::mem::take(&mut current));
            room = CHUNK_LEN;
            item = tail;
        }
        if item.is_empty() {
            continue;
        }
        room -= item.len();
        current.push(item);
        if room == 0 {
            tasks.push(std::mem::take(&mut current));
            room = CHUNK_LEN;
        }
    }
    if !current.is_empty() {
        tasks.push(current);
    }
    tasks
}

/// Tasks shared between the calling thread and the helper threads. The caller works
/// through them itself and the helpers join in, each claiming the next unclaimed task: a
/// call never waits for a sleeping thread to wake up (tens of microseconds on a virtual
/// machine), only for tasks already under way.
struct Shared {
    /// The unclaimed tasks `[front, back)`, packed as `back << 32 | front`: the caller
    /// claims from the front and helpers from the back, so that each thread keeps working
    /// on the same part of the arrays from one pass to the next (and from one step to the
    /// next), whose data its own caches then still hold.
    unclaimed: AtomicU64,
    done: AtomicUsize,
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

impl Shared {
    fn new(total: usize, work: *const (dyn Fn(usize) + Sync)) -> Shared {
        assert!(total <= u32::MAX as usize, "too many tasks for one call");
        Shared {
            unclaimed: AtomicU64::new(pack(0, total)),
            done: AtomicUsize::new(0),
            total,
            work,
        }
    }

    /// The next task from the front (the caller) or the back (helpers), if any is left.
    fn claim(&self, from_back: bool) -> Option<usize> {
        let mut current = self.unclaimed.load(Ordering::Acquire);
        loop {
            let (front, back) = unpack(current);
            if front >= back {
                return None;
            }
            let (index, next) = match from_back {
                true => (back - 1, pack(front, back - 1)),
                false => (front, pack(front + 1, back)),
            };
            match self.unclaimed.compare_exchange_weak(
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

    /// Runs tasks until none are left to claim.
    fn help(&self, from_back: bool) {
        while let Some(index) = self.claim(from_back) {
            let _counted = CountDone(&self.done);
            // SAFETY: `index` was claimed, so the caller is still waiting (see `work`).
            unsafe { (*self.work)(index) };
        }
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
        let (front, back) = unpack(self.0.unclaimed.swap(0, Ordering::AcqRel));
        let claimed = self.0.total - back.saturating_sub(front);
        let mut spins = 0u32;
        while self.0.done.load(Ordering::Acquire) < claimed {
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
    /// `offer.generation`, readable without the lock while spinning.
    generation: AtomicU64,
    wake: Condvar,
}

impl Helpers {
    fn get() -> Option<&'static Helpers> {
        static HELPERS: OnceLock<Option<&'static Helpers>> = OnceLock::new();
        *HELPERS.get_or_init(|| {
            let count = rayon::current_num_threads().saturating_sub(1);
            if count == 0 {
                return None;
            }
            let helpers: &'static Helpers = Box::leak(Box::new(Helpers {
                offer: Mutex::new(Offer {
                    shared: None,
                    generation: 0,
                    sleeping: 0,
                }),
                generation: AtomicU64::new(0),
                wake: Condvar::new(),
            }));
            let mut spawned = 0;
            for i in 0..count {
                let thread = std::thread::Builder::new().name(format!("samopt-{i}"));
                spawned += usize::from(thread.spawn(move || helpers.serve()).is_ok());
            }
            (spawned > 0).then_some(helpers)
        })
    }

    /// A helper thread: runs each offer's tasks, spins a while for the next, then sleeps.
    fn serve(&self) {
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
                shared.help(true);
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
/// the helper threads wake up in time.
fn run_shared(total: usize, work: &(dyn Fn(usize) + Sync)) {
    let helpers = Helpers::get().filter(|_| total > 1 && rayon::current_num_threads() > 1);
    let Some(helpers) = helpers else {
        (0..total).for_each(work);
        return;
    };
    // SAFETY: only the lifetime is erased; see `Shared::work`.
    let work: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(work) };
    let shared = Arc::new(Shared::new(total, work));
    let _wait = WaitForClaimed(&shared);
    helpers.offer(&shared);
    shared.help(false);
}

/// `per_task` applied to every task (the items cut by `into_tasks`), in parallel; the
/// results come back in task order, whichever thread produced them.
fn map_tasks<L, R, F>(items: impl IntoIterator<Item = L>, per_task: F) -> Vec<R>
where
    L: Lanes,
    R: Send,
    F: Fn(Vec<L>) -> R + Sync,
{
    // Each task is taken out of its slot by the one thread that claimed it.
    let tasks: Vec<Mutex<Option<Vec<L>>>> = into_tasks(items)
        .into_iter()
        .map(|task| Mutex::new(Some(task)))
        .collect();
    let results: Vec<Mutex<Option<R>>> = tasks.iter().map(|_| Mutex::new(None)).collect();
    run_shared(tasks.len(), &|index| {
        let task = tasks[index].lock().ok().and_then(|mut slot| slot.take());
        let result = per_task(task.expect("each task is claimed once"));
        if let Ok(mut slot) = results[index].lock() {
            *slot = Some(result);
        }
    });
    results
        .into_iter()
        .map(|slot| {
            let result = slot.into_inner().ok().flatten();
            result.expect("run_shared runs every task")
        })
        .collect()
}

/// Applies `kernel` to every piece of every item, in parallel over tasks.
pub fn for_each<L, F>(items: impl IntoIterator<Item = L>, kernel: F)
where
    L: Lanes,
    F: Fn(L) + Sync + Send,
{
    map_tasks(items, |task| task.into_iter().for_each(&kernel));
}

/// Sums `partial(piece)` over every piece, reproducibly: pieces are summed in order within a
/// task and task totals in task order, whatever thread ran them.
pub fn ordered_sum<L, F>(items: impl IntoIterator<Item = L>, partial: F) -> f64
where
    L: Lanes,
    F: Fn(L) -> f64 + Sync + Send,
{
    let task_total = |task: Vec<L>| task.into_iter().map(&partial).fold(0.0, |acc, x| acc + x);
    map_tasks(items, task_total)
        .into_iter()
        .fold(0.0, |acc, x| acc + x)
}

/// The largest `measure(piece)` over every piece (order-free, hence reproducible).
pub fn max_of<L, F>(items: impl IntoIterator<Item = L>, measure: F) -> f64
where
    L: Lanes,
    F: Fn(L) -> f64 + Sync + Send,
{
    let task_max = |task: Vec<L>| task.into_iter().map(&measure).fold(0.0, f64::max);
    map_tasks(items, task_max).into_iter().fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let tasks = into_tasks(data.iter().map(|v| v.as_slice()));
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
    fn for_each_covers_every_task_in_a_one_thread_pool() {
        let mut a = vec![0u32; 5 * CHUNK_LEN + 3];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        pool.install(|| for_each([a.as_mut_slice()], |piece: &mut [u32]| piece.fill(7)));
        assert!(a.iter().all(|&x| x == 7));
    }

    #[test]
    fn ordered_sum_matches_task_order_sum_and_is_stable() {
        let v: Vec<f64> = (0..5 * CHUNK_LEN + 3)
            .map(|i| 1.0 / (1.0 + i as f64))
            .collect();
        let sum = |s: &[f64]| s.iter().sum::<f64>();
        let expected = into_tasks([v.as_slice()])
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
