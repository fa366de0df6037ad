//! Which memory each call reads and writes, checked before anything is written: within a
//! call (the same array under two names, a parameter passed as a gradient) and against the
//! other calls in flight in the process (two threads updating the same arrays at once) and
//! the parameters a SAM first_step holds until its second phase (whose restore would wipe
//! any other write to them).
//!
//! At most one sort per call and a registry entry per call, instead of a borrow per array:
//! with hundreds of small arrays per call the per-array bookkeeping costs more than the work.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::state::OutOfMemory;

/// The memory one array of a call spans, and how the call uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    /// Lowest byte address of any element.
    pub start: usize,
    /// One past the highest byte of any element; equal to `start` for an empty array.
    pub end: usize,
    /// Address of the array's first element, the origin of its stride lattice.
    pub data: usize,
    /// Greatest common divisor of the byte strides (0 when every stride is 0).
    pub stride_gcd: usize,
    /// Bytes per element.
    pub itemsize: usize,
    /// Whether the call writes the array.
    pub write: bool,
    /// The array's position in the call (which name to report).
    pub item: usize,
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Claim {
    /// The claim of an array with these geometry fields (`strides` in bytes).
    pub fn of(
        data: usize,
        shape: &[usize],
        strides: &[isize],
        itemsize: usize,
        write: bool,
        item: usize,
    ) -> Claim {
        let (mut low, mut high) = (data as isize, data as isize);
        let mut stride_gcd = 0;
        let empty = shape.contains(&0);
        for (&dim, &stride) in shape.iter().zip(strides) {
            let reach = (dim as isize - 1) * stride;
            if reach < 0 {
                low += reach;
            } else {
                high += reach;
            }
            if dim > 1 {
                stride_gcd = gcd(stride_gcd, stride.unsigned_abs());
            }
        }
        let (start, end) = match empty {
            true => (data, data),
            false => (low as usize, high as usize + itemsize),
        };
        Claim {
            start,
            end,
            data,
            stride_gcd,
            itemsize,
            write,
            item,
        }
    }

    /// Whether the byte ranges meet, or the two are the same (possibly empty) view.
    fn meets(&self, other: &Claim) -> bool {
        let same_view = (self.start, self.end, self.data) == (other.start, other.end, other.data);
        same_view || (self.start < other.end && other.start < self.end)
    }

    /// Whether `self`, starting no later than `later`, may still meet it or any claim after.
    fn open_at(&self, later: &Claim) -> bool {
        self.end > later.start || self.start == later.start
    }

    /// Whether the two arrays may share an element that at least one of them writes. Their
    /// byte ranges must meet (or they are the same view: an array passed twice is refused
    /// even when empty); then they are told apart only when both have one element size
    /// and their elements sit on disjoint lattices (like `a[::2]` and `a[1::2]`): element
    /// addresses are `data + k·gcd`, and element-aligned lattices that differ by a
    /// non-multiple of the gcd never meet.
    pub fn conflicts(&self, other: &Claim) -> bool {
        if !(self.write || other.write) || !self.meets(other) {
            return false;
        }
        let apart = self.data.abs_diff(other.data);
        let size = self.itemsize;
        let same_grid = other.itemsize == size && size > 0 && apart.is_multiple_of(size);
        let step = gcd(self.stride_gcd, other.stride_gcd);
        let disjoint = same_grid
            && match step {
                0 => apart != 0,
                _ => !apart.is_multiple_of(step) && step.is_multiple_of(size),
            };
        !disjoint
    }
}

/// Whether two elements of one array share a byte: a zero stride over a dimension longer
/// than one, or strides that run into each other. Written through, such an array would
/// update one element several times per step.
///
/// Strides that nest (each at least the span of the smaller ones, as every array NumPy
/// makes) prove the elements apart at once; other layouts are decided by listing every
/// element's offset.
pub fn overlaps_itself(
    shape: &[usize],
    strides: &[isize],
    itemsize: usize,
) -> Result<bool, OutOfMemory> {
    if shape.contains(&0) {
        return Ok(false);
    }
    // A negative stride mirrors its dimension, which moves no element onto another.
    let mut dims: Vec<(usize, usize)> = shape
        .iter()
        .zip(strides)
        .filter(|(&len, _)| len > 1)
        .map(|(&len, &stride)| (stride.unsigned_abs(), len))
        .collect();
    dims.sort_unstable();
    let mut span = itemsize;
    let nested = dims.iter().all(|&(stride, len)| {
        let apart = stride >= span;
        span = span.saturating_add(stride.saturating_mul(len - 1));
        apart
    });
    if nested {
        return Ok(false);
    }
    let count = dims.iter().map(|&(_, len)| len).product::<usize>();
    let mut offsets: Vec<usize> = Vec::new();
    offsets.try_reserve_exact(count).map_err(|_| OutOfMemory {
        bytes: count.saturating_mul(std::mem::size_of::<usize>()),
    })?;
    offsets.push(0);
    for &(stride, len) in &dims {
        let inner = offsets.len();
        for k in 1..len {
            for j in 0..inner {
                offsets.push(offsets[j] + k * stride);
            }
        }
    }
    offsets.sort_unstable();
    Ok(offsets.windows(2).any(|pair| pair[1] - pair[0] < itemsize))
}

thread_local! {
    /// The order the thread's last call's claims sorted into: a training loop passes the
    /// same arrays call after call, so checking that order costs less than sorting anew.
    static LAST_ORDER: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Whether `order` (indices into `claims`) lists every claim by ascending start, ties by
/// item: the order a sort gives, item numbers being unique within a call.
fn sorts(order: &[u32], claims: &[Claim]) -> bool {
    let key = |&i: &u32| (claims[i as usize].start, claims[i as usize].item);
    order.len() == claims.len() && order.windows(2).all(|w| key(&w[0]) < key(&w[1]))
}

/// The claims of one call, sorted by start address.
#[derive(Debug)]
pub struct CallClaims {
    claims: Vec<Claim>,
    /// `starts[i]` and `reach[i]`: the start of `claims[i]` and the largest `end` among
    /// `claims[..=i]`, kept apart so that `touches` searches a compact array.
    starts: Vec<usize>,
    reach: Vec<usize>,
    /// `starts` cut in blocks of `block` (about the square root of their number), and the
    /// first start of each block: `touches` counts in both instead of a binary search,
    /// whose chain of dependent loads costs more with a few hundred claims.
    block: usize,
    block_starts: Vec<usize>,
}

impl CallClaims {
    /// Sorts the claims of a call.
    pub fn new(claims: Vec<Claim>) -> CallClaims {
        let claims = LAST_ORDER.with_borrow_mut(|order| {
            if !sorts(order, &claims) {
                // Sorting small keys and moving each claim once beats sorting the claims.
                let mut keys: Vec<(usize, usize, u32)> = (0..claims.len())
                    .map(|i| (claims[i].start, claims[i].item, i as u32))
                    .collect();
                keys.sort_unstable();
                *order = keys.iter().map(|&(_, _, i)| i).collect();
            }
            order
                .iter()
                .map(|&i| claims[i as usize])
                .collect::<Vec<_>>()
        });
        CallClaims::indexed(claims)
    }

    /// Indexes claims already sorted by start address.
    fn indexed(claims: Vec<Claim>) -> CallClaims {
        let mut furthest = 0;
        let reach = claims
            .iter()
            .map(|c| {
                furthest = furthest.max(c.end);
                furthest
            })
            .collect();
        let starts: Vec<usize> = claims.iter().map(|c| c.start).collect();
        let block = starts.len().isqrt().max(8);
        let block_starts = starts.iter().step_by(block).copied().collect();
        CallClaims {
            claims,
            starts,
            reach,
            block,
            block_starts,
        }
    }

    /// Read claims of the items `keep` accepts, in the same order (no sort: a subsequence
    /// of a sorted list is sorted).
    pub fn reads_of(&self, keep: impl Fn(usize) -> bool) -> CallClaims {
        let kept = self.claims.iter().filter(|c| keep(c.item));
        CallClaims::indexed(kept.map(|&c| Claim { write: false, ..c }).collect())
    }

    /// The item to blame for a conflict within the call: of every conflicting pair, the
    /// later item (in the call's order), the earliest such.
    pub fn first_conflict(&self) -> Option<usize> {
        let mut blamed: Option<usize> = None;
        sweep(&self.claims, &self.claims, true, |a, b| {
            let later = a.item.max(b.item);
            blamed = Some(blamed.map_or(later, |x| x.min(later)));
        });
        blamed
    }

    /// The earliest item of `self` that conflicts with a claim of `other`.
    fn first_conflict_with(&self, other: &CallClaims) -> Option<usize> {
        let mut blamed: Option<usize> = None;
        sweep(&self.claims, &other.claims, false, |mine, _| {
            blamed = Some(blamed.map_or(mine.item, |x| x.min(mine.item)));
        });
        blamed
    }

    /// Whether any claimed array has a byte in `[start, end)`.
    pub fn touches(&self, start: usize, end: usize) -> bool {
        // Claims that start before `end`: every block whose first start is, save the last
        // such block, where they are counted one by one (`starts` is sorted).
        let blocks = self.block_starts.iter().filter(|&&s| s < end).count();
        let before = match blocks.checked_sub(1) {
            None => 0,
            Some(last) => {
                let first = last * self.block;
                let block = &self.starts[first..self.starts.len().min(first + self.block)];
                first + block.iter().filter(|&&s| s < end).count()
            }
        };
        start < end && before > 0 && self.reach[before - 1] > start
    }
}

/// Calls `found(a, b)` for every conflicting pair with `a` from `mine` and `b` from
/// `theirs`; with `same`, both lists are one and each pair is reported once. Both lists are
/// sorted by start; only claims whose ranges are still open are compared, so disjoint
/// arrays cost one comparison each.
fn sweep(mine: &[Claim], theirs: &[Claim], same: bool, mut found: impl FnMut(&Claim, &Claim)) {
    let mut open_mine: Vec<&Claim> = Vec::new();
    let mut open_theirs: Vec<&Claim> = Vec::new();
    let (mut i, mut j) = (0, 0);
    loop {
        let take_mine = match (mine.get(i), (!same).then(|| theirs.get(j)).flatten()) {
            (Some(a), Some(b)) => a.start <= b.start,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return,
        };
        if take_mine {
            let a = &mine[i];
            i += 1;
            open_theirs.retain(|b| b.open_at(a));
            open_mine.retain(|b| b.open_at(a));
            let others = if same { &open_mine } else { &open_theirs };
            for b in others {
                if a.conflicts(b) {
                    found(a, b);
                }
            }
            open_mine.push(a);
        } else {
            let b = &theirs[j];
            j += 1;
            open_mine.retain(|a| a.open_at(b));
            for a in &open_mine {
                if a.conflicts(b) {
                    found(a, b);
                }
            }
            open_theirs.push(b);
        }
    }
}

/// What holds a registration's claims: said when a call that meets them is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// A call in flight.
    Call,
    /// A SAM first_step awaiting its second phase, which restores the parameters: a write
    /// to them in between would be wiped, so it is refused instead.
    PendingStep,
}

/// Why a registration was refused: the earliest item of the call that meets claims in
/// force, and what holds those.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub item: usize,
    pub holder: Holder,
}

/// Claims in force: a call's, or a pending step's between its calls.
struct InForce {
    id: u64,
    holder: Holder,
    claims: Arc<CallClaims>,
}

/// Every registration in force in this process.
static IN_FORCE: Mutex<Vec<InForce>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn in_force() -> std::sync::MutexGuard<'static, Vec<InForce>> {
    IN_FORCE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The conflict of `claims` with the registrations in force other than `except`.
fn conflict(in_force: &[InForce], claims: &CallClaims, except: Option<u64>) -> Option<Conflict> {
    in_force
        .iter()
        .filter(|other| Some(other.id) != except)
        .filter_map(|other| {
            let item = claims.first_conflict_with(&other.claims)?;
            Some(Conflict {
                item,
                holder: other.holder,
            })
        })
        .min_by_key(|conflict| conflict.item)
}

/// Puts `claims`, held by `holder`, in force for registration `id`, in place of any it had.
fn put(in_force: &mut Vec<InForce>, id: u64, holder: Holder, claims: Arc<CallClaims>) {
    in_force.retain(|entry| entry.id != id);
    in_force.push(InForce { id, holder, claims });
}

/// A registration: its claims stay in force until this is dropped.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    claims: Arc<CallClaims>,
}

/// Registers a call's claims, or says which item of the call meets claims in force.
pub fn register(claims: Arc<CallClaims>) -> Result<Registration, Conflict> {
    let mut in_force = in_force();
    if let Some(found) = conflict(&in_force, &claims, None) {
        return Err(found);
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    put(&mut in_force, id, Holder::Call, Arc::clone(&claims));
    Ok(Registration { id, claims })
}

impl Registration {
    /// Swaps the claims in force for `claims`, held by `holder`, under the registry's one
    /// lock, so that no other call registers in between. They are checked against every
    /// other registration (not against the ones they replace); on a conflict nothing
    /// changes.
    pub fn replace(&mut self, claims: Arc<CallClaims>, holder: Holder) -> Result<(), Conflict> {
        let mut in_force = in_force();
        if let Some(found) = conflict(&in_force, &claims, Some(self.id)) {
            return Err(found);
        }
        put(&mut in_force, self.id, holder, Arc::clone(&claims));
        self.claims = claims;
        Ok(())
    }

    /// Keeps only read claims of the items `keep` accepts, now held by `holder`. Reading
    /// part of what was claimed meets nothing the claims did not, so nothing is checked.
    pub fn narrow_to_reads(&mut self, keep: impl Fn(usize) -> bool, holder: Holder) {
        let claims = Arc::new(self.claims.reads_of(keep));
        put(&mut in_force(), self.id, holder, Arc::clone(&claims));
        self.claims = claims;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        in_force().retain(|entry| entry.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F64: usize = 8;

    /// A contiguous 1-d float64 array of `len` elements at `data`.
    fn vector(data: usize, len: usize, write: bool, item: usize) -> Claim {
        Claim::of(data, &[len], &[F64 as isize], F64, write, item)
    }

    #[test]
    fn claims_are_sorted_whether_the_last_order_still_holds_or_not() {
        let starts =
            |claims: &CallClaims| claims.claims.iter().map(|c| c.start).collect::<Vec<_>>();
        let forward: Vec<Claim> = (0..50)
            .map(|i| vector(1000 + 100 * i, 10, true, i))
            .collect();
        let expected: Vec<usize> = (0..50).map(|i| 1000 + 100 * i).collect();
        assert_eq!(starts(&CallClaims::new(forward.clone())), expected);
        // The same arrays again (the last order holds), then at other addresses (it does not).
        assert_eq!(starts(&CallClaims::new(forward)), expected);
        let backward: Vec<Claim> = (0..50)
            .map(|i| vector(5900 - 100 * i, 10, true, i))
            .collect();
        assert_eq!(starts(&CallClaims::new(backward)), expected);
        let items: Vec<usize> = {
            let ties: Vec<Claim> = (0..50).map(|i| vector(1000, 0, false, 49 - i)).collect();
            CallClaims::new(ties)
                .claims
                .iter()
                .map(|c| c.item)
                .collect()
        };
        assert_eq!(items, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn arrays_that_overlap_themselves_are_told_from_exotic_ones_that_do_not() {
        let overlaps = |shape: &[usize], strides: &[isize]| overlaps_itself(shape, strides, 8);
        // Every layout NumPy makes: contiguous, transposed, reversed, strided, broadcast 1s.
        assert!(!overlaps(&[3, 4], &[32, 8]).unwrap());
        assert!(!overlaps(&[3, 4], &[8, 24]).unwrap());
        assert!(!overlaps(&[5], &[-16]).unwrap());
        assert!(!overlaps(&[1, 6], &[0, 8]).unwrap());
        assert!(!overlaps(&[], &[]).unwrap());
        assert!(!overlaps(&[0, 3], &[0, 0]).unwrap());
        // Zero strides, colliding strides, elements that share bytes.
        assert!(overlaps(&[4], &[0]).unwrap());
        assert!(overlaps(&[3, 3], &[8, 8]).unwrap());
        assert!(overlaps(&[2], &[4]).unwrap());
        // Interleaved but apart: offsets 0, 16, 24, 32, 40, 56 (the nesting test fails).
        assert!(!overlaps(&[3, 2], &[16, 24]).unwrap());
        assert!(!overlaps(&[3, 3], &[16, 24]).unwrap());
        assert!(overlaps(&[4, 3], &[16, 24]).unwrap());
    }

    #[test]
    fn geometry_of_reversed_and_strided_views() {
        let reversed = Claim::of(1000 + 9 * 8, &[10], &[-8], 8, false, 0);
        assert_eq!((reversed.start, reversed.end), (1000, 1080));
        let columns = Claim::of(1000, &[3, 4], &[8, 24], 8, false, 0);
        assert_eq!(
            (columns.start, columns.end, columns.stride_gcd),
            (1000, 1096, 8)
        );
        let empty = Claim::of(1000, &[0, 5], &[40, 8], 8, true, 0);
        assert_eq!(empty.start, empty.end);
    }

    #[test]
    fn writes_conflict_with_anything_overlapping_reads_do_not() {
        let a = vector(1000, 10, true, 0);
        let same = vector(1000, 10, true, 1);
        let tail_read = vector(1040, 10, false, 1);
        let after = vector(1080, 10, true, 1);
        assert!(a.conflicts(&same));
        assert!(a.conflicts(&tail_read) && tail_read.conflicts(&a));
        assert!(!a.conflicts(&after));
        let (r1, r2) = (vector(1000, 10, false, 0), vector(1000, 10, false, 1));
        assert!(!r1.conflicts(&r2));
    }

    #[test]
    fn interleaved_views_share_no_element() {
        let even = Claim::of(1000, &[10], &[16], 8, true, 0);
        let odd = Claim::of(1008, &[10], &[16], 8, true, 1);
        assert!(!even.conflicts(&odd));
        let every = Claim::of(1000, &[20], &[8], 8, false, 2);
        assert!(even.conflicts(&every) && odd.conflicts(&every));
        // float32 elements on a float64 lattice: different sizes are never told apart.
        let halves = Claim::of(1004, &[10], &[16], 4, false, 3);
        assert!(even.conflicts(&halves));
    }

    #[test]
    fn an_empty_array_passed_twice_conflicts_but_not_with_its_neighbours() {
        let empty = Claim::of(1000, &[0], &[8], 8, true, 0);
        let again = Claim::of(1000, &[0], &[8], 8, false, 1);
        assert!(empty.conflicts(&again));
        let claims = CallClaims::new(vec![empty, vector(1000, 2, false, 2), again]);
        assert_eq!(claims.first_conflict(), Some(1));
        assert!(!empty.conflicts(&vector(992, 1, true, 3)));
    }

    #[test]
    fn first_conflict_blames_the_later_item_of_the_earliest_pair() {
        let claims = vec![
            vector(3000, 4, true, 0),
            vector(1000, 4, true, 1),
            vector(2000, 4, true, 2),
            vector(1000, 4, false, 3),
            vector(3000, 4, true, 4),
        ];
        assert_eq!(CallClaims::new(claims).first_conflict(), Some(3));
        let fine = vec![vector(1000, 4, true, 0), vector(1032, 4, true, 1)];
        assert_eq!(CallClaims::new(fine).first_conflict(), None);
    }

    #[test]
    fn touches_finds_any_overlap() {
        let claims = CallClaims::new(vec![vector(1000, 100, true, 0), vector(1100, 1, false, 1)]);
        assert!(claims.touches(1799, 1800));
        assert!(claims.touches(1100, 1101));
        assert!(!claims.touches(1800, 1900));
        assert!(!claims.touches(900, 1000));
        assert!(!claims.touches(1500, 1500));
    }

    #[test]
    fn touches_agrees_with_a_scan_over_many_claims() {
        // Claims of varied sizes and gaps, with equal starts: blocks of the index split them.
        let claims: Vec<Claim> = (0..300)
            .map(|i| vector(1000 + 8 * (i / 2) * (i % 7), 8 * (i % 5), true, i))
            .collect();
        let called = CallClaims::new(claims.clone());
        for start in (900..20_000).step_by(13) {
            for len in [0, 1, 8, 100] {
                let end = start + len;
                let expected = start < end && claims.iter().any(|c| c.start < end && start < c.end);
                assert_eq!(called.touches(start, end), expected, "[{start}, {end})");
            }
        }
    }

    #[test]
    fn calls_in_flight_exclude_each_other_until_dropped() {
        // Addresses no other test uses: the registry is process-wide.
        let base = 1 << 40;
        let first = register(Arc::new(CallClaims::new(vec![vector(base, 10, true, 0)]))).unwrap();
        let reader = || {
            Arc::new(CallClaims::new(vec![
                vector(base + 800, 1, false, 0),
                vector(base + 64, 2, false, 1),
            ]))
        };
        assert_eq!(register(reader()).unwrap_err().item, 1);
        let elsewhere = register(Arc::new(CallClaims::new(vec![vector(
            base + 80,
            10,
            true,
            0,
        )])))
        .unwrap();
        drop(first);
        let after = register(reader());
        assert!(after.is_ok());
        drop((after, elsewhere));
    }

    /// One float64 vector of `len` elements at `data`, as one call's claims.
    fn call_of(data: usize, len: usize, write: bool) -> Arc<CallClaims> {
        Arc::new(CallClaims::new(vec![vector(data, len, write, 0)]))
    }

    #[test]
    fn a_pending_step_lets_readers_in_and_refuses_writers_until_it_ends() {
        // Addresses no other test uses: the registry is process-wide.
        let base = 3 << 40;
        let mut step = register(Arc::new(CallClaims::new(vec![
            vector(base, 10, true, 0),
            vector(base + 4096, 10, false, 1),
        ])))
        .unwrap();
        step.narrow_to_reads(|item| item == 0, Holder::PendingStep);
        let reader = register(call_of(base + 8, 2, false));
        assert!(reader.is_ok());
        let refused = Conflict {
            item: 0,
            holder: Holder::PendingStep,
        };
        assert_eq!(register(call_of(base + 8, 2, true)).unwrap_err(), refused);
        // The second item was dropped: its memory is free for writing.
        drop(register(call_of(base + 4096, 10, true)).unwrap());
        // Widening while another call reads is refused and leaves the pending claims.
        let widened = call_of(base, 10, true);
        let busy = Conflict {
            item: 0,
            holder: Holder::Call,
        };
        assert_eq!(step.replace(Arc::clone(&widened), Holder::Call), Err(busy));
        assert_eq!(register(call_of(base, 1, true)).unwrap_err(), refused);
        drop(reader);
        step.replace(widened, Holder::Call).unwrap();
        assert_eq!(register(call_of(base, 1, false)).unwrap_err(), busy);
        drop(step);
        drop(register(call_of(base, 10, true)).unwrap());
    }

    #[test]
    fn no_write_slips_in_while_claims_are_swapped() {
        let base = 4 << 40;
        let mut step = register(call_of(base, 100, true)).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                let mut admitted = 0;
                while !done.load(Ordering::Relaxed) {
                    admitted += usize::from(register(call_of(base + 80, 1, true)).is_ok());
                }
                admitted
            });
            let swapped = (0..20_000).all(|_| {
                step.narrow_to_reads(|_| true, Holder::PendingStep);
                step.replace(call_of(base, 100, true), Holder::Call).is_ok()
            });
            done.store(true, Ordering::Relaxed);
            assert_eq!(writer.join().unwrap(), 0);
            assert!(swapped);
        });
    }
}
