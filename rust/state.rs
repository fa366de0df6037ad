//! Optimizer state owned by the native side: per-parameter buffers that no caller can
//! reach, alias or free, so a call checks nothing about them but their dtype and shape.
//! Buffers are allocated fallibly: running out of memory is an error, never an abort.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::float::Real;

/// Bytes a failed allocation asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfMemory {
    pub bytes: usize,
}

/// `len` zeros, or the bytes that could not be had. Zeroed pages come lazily from the
/// system, so a large buffer costs nothing until it is written.
pub fn zeroed<T: Real>(len: usize) -> Result<Box<[T]>, OutOfMemory> {
    let layout =
        std::alloc::Layout::array::<T>(len).map_err(|_| OutOfMemory { bytes: usize::MAX })?;
    if layout.size() == 0 {
        return Ok(Box::default());
    }
    // SAFETY: the layout has a non-zero size; all-zero bits are 0.0 for f32 and f64, so
    // the memory holds `len` initialised values, owned by the box from here on.
    unsafe {
        let data = std::alloc::alloc_zeroed(layout).cast::<T>();
        if data.is_null() {
            return Err(OutOfMemory {
                bytes: layout.size(),
            });
        }
        Ok(Box::from_raw(std::ptr::slice_from_raw_parts_mut(data, len)))
    }
}

/// The values of an exact-size iterator collected into a new buffer, fallibly.
pub fn collect<T>(values: impl ExactSizeIterator<Item = T>) -> Result<Box<[T]>, OutOfMemory> {
    let mut buffer = Vec::new();
    buffer
        .try_reserve_exact(values.len())
        .map_err(|_| OutOfMemory {
            bytes: values.len().saturating_mul(std::mem::size_of::<T>()),
        })?;
    buffer.extend(values);
    Ok(buffer.into_boxed_slice())
}

/// The order that sorts `names` (byte-wise, as `str` compares), as indices. Names are
/// sorted by their first 16 bytes held in one contiguous array, and only names that tie
/// on those by their whole text: with a million names a comparison that follows a pointer
/// into the heap per name misses the cache each time.
pub fn name_order<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> Vec<usize> {
    let texts: Vec<&str> = names.collect();
    let head = |text: &str| {
        let mut bytes = [0u8; 16];
        let n = text.len().min(16);
        bytes[..n].copy_from_slice(&text.as_bytes()[..n]);
        u128::from_be_bytes(bytes)
    };
    let mut keyed: Vec<(u128, usize)> = texts
        .iter()
        .enumerate()
        .map(|(i, text)| (head(text), i))
        .collect();
    keyed.sort_unstable();
    // Equal heads: names of 16 bytes or more with a common start, or shorter ones that
    // differ only by trailing NULs. Those runs are put in text order.
    let mut start = 0;
    while start < keyed.len() {
        let mut end = start + 1;
        while end < keyed.len() && keyed[end].0 == keyed[start].0 {
            end += 1;
        }
        if end - start > 1 {
            keyed[start..end].sort_unstable_by(|a, b| texts[a.1].cmp(texts[b.1]));
        }
        start = end;
    }
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// FxHash (rustc's): a multiply and a rotate per word. A table's index hashes parameter
/// names, which are the caller's own (no flooding to fear), a million times per load.
#[derive(Default, Clone, Copy)]
pub struct NameHasher(u64);

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
        }
        for &byte in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(byte)).wrapping_mul(SEED);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// One state stream of one parameter, laid out as the parameter was when it was made: its
/// shape, and C or Fortran order of the flat values.
#[derive(Debug)]
pub struct Buffer {
    pub data: Data,
    pub shape: Box<[usize]>,
    pub fortran: bool,
}

/// The values of a buffer, in the parameter's dtype.
#[derive(Debug)]
pub enum Data {
    Single(Box<[f32]>),
    Double(Box<[f64]>),
}

/// The storage types a buffer holds, to move values in and out of `Data` generically.
pub trait Stored: Real {
    const DTYPE: &'static str;
    fn wrap(values: Box<[Self]>) -> Data;
    fn unwrap(data: Data) -> Result<Box<[Self]>, Data>;
    fn view(data: &Data) -> Option<&[Self]>;
    fn view_mut(data: &mut Data) -> Option<&mut [Self]>;
}

impl Stored for f32 {
    const DTYPE: &'static str = "float32";
    fn wrap(values: Box<[f32]>) -> Data {
        Data::Single(values)
    }
    fn unwrap(data: Data) -> Result<Box<[f32]>, Data> {
        match data {
            Data::Single(values) => Ok(values),
            other => Err(other),
        }
    }
    fn view(data: &Data) -> Option<&[f32]> {
        match data {
            Data::Single(values) => Some(values),
            Data::Double(_) => None,
        }
    }
    fn view_mut(data: &mut Data) -> Option<&mut [f32]> {
        match data {
            Data::Single(values) => Some(values),
            Data::Double(_) => None,
        }
    }
}

impl Stored for f64 {
    const DTYPE: &'static str = "float64";
    fn wrap(values: Box<[f64]>) -> Data {
        Data::Double(values)
    }
    fn unwrap(data: Data) -> Result<Box<[f64]>, Data> {
        match data {
            Data::Double(values) => Ok(values),
            other => Err(other),
        }
    }
    fn view(data: &Data) -> Option<&[f64]> {
        match data {
            Data::Double(values) => Some(values),
            Data::Single(_) => None,
        }
    }
    fn view_mut(data: &mut Data) -> Option<&mut [f64]> {
        match data {
            Data::Double(values) => Some(values),
            Data::Single(_) => None,
        }
    }
}

impl Data {
    pub fn dtype(&self) -> &'static str {
        match self {
            Data::Single(_) => f32::DTYPE,
            Data::Double(_) => f64::DTYPE,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Data::Single(values) => values.len(),
            Data::Double(values) => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The state of one parameter name: one optional buffer per slot of its table.
#[derive(Debug)]
pub struct Entry {
    pub name: Box<str>,
    pub buffers: Box<[Option<Buffer>]>,
}

/// Per-parameter state by name: an optimizer's slots (SGD's velocity, Adam's m and v) or
/// SAM's saved values. Entries are never removed, so an index stays valid until the table
/// is replaced whole (by a load), which `generation` tells apart.
#[derive(Debug)]
pub struct Table {
    slots: usize,
    entries: Vec<Entry>,
    index: HashMap<Box<str>, usize, BuildHasherDefault<NameHasher>>,
    generation: u64,
}

/// Tables made in one process never share a generation, so a cache of entry indices
/// made for one never matches another.
fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Table {
    pub fn new(slots: usize) -> Table {
        Table {
            slots,
            entries: Vec::new(),
            index: HashMap::default(),
            generation: next_generation(),
        }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn find(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entry(&self, index: usize) -> &Entry {
        &self.entries[index]
    }

    pub fn entry_mut(&mut self, index: usize) -> &mut Entry {
        &mut self.entries[index]
    }

    /// The entries' indices in name order, as a state dict lists them.
    pub fn sorted(&self) -> Vec<usize> {
        name_order(self.entries.iter().map(|e| &*e.name))
    }

    /// The same entries with `slots` slots each, the ones added empty.
    pub fn widened(mut self, slots: usize) -> Table {
        for entry in &mut self.entries {
            let mut buffers = std::mem::take(&mut entry.buffers).into_vec();
            buffers.resize_with(slots.max(buffers.len()), || None);
            entry.buffers = buffers.into_boxed_slice();
        }
        self.slots = self.slots.max(slots);
        self
    }

    /// The index of `name`'s entry, made empty if there is none.
    pub fn entry_for(&mut self, name: &str) -> usize {
        if let Some(index) = self.find(name) {
            return index;
        }
        let index = self.entries.len();
        self.entries.push(Entry {
            name: name.into(),
            buffers: (0..self.slots).map(|_| None).collect(),
        });
        self.index.insert(name.into(), index);
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_as_str_compares_them() {
        let names = [
            "layer10.weight",
            "layer1.weight",
            "layer1.weigh",
            "",
            "a\0",
            "a",
            "b",
            "layer1.weight.extra.long.name",
            "layer1.weight.extra.long.nam",
            "é",
            "z\u{10000}",
            "layer1.weight\0",
            "layer1.weigh\u{7f}",
        ];
        let order = name_order(names.iter().copied());
        let sorted: Vec<&str> = order.iter().map(|&i| names[i]).collect();
        let mut expected = names.to_vec();
        expected.sort();
        assert_eq!(sorted, expected);
        let mut hasher = NameHasher::default();
        hasher.write(b"layer1.weight");
        let mut other = NameHasher::default();
        other.write(b"layer2.weight");
        assert_ne!(hasher.finish(), other.finish());
    }

    #[test]
    fn zeroed_buffers_are_zero_and_oversized_requests_fail_cleanly() {
        let zeros = zeroed::<f64>(1000).unwrap();
        assert!(zeros.iter().all(|&x| x.to_bits() == 0));
        assert!(zeroed::<f32>(0).unwrap().is_empty());
        // More than any machine has: an error naming the bytes, not an abort.
        let error = zeroed::<f64>(usize::MAX / 16).unwrap_err();
        assert_eq!(error.bytes, usize::MAX / 16 * 8);
        assert!(collect((0..3).map(f64::from)).unwrap().len() == 3);
    }

    #[test]
    fn entries_keep_their_index_and_list_sorted() {
        let mut table = Table::new(2);
        let b = table.entry_for("b");
        let a = table.entry_for("a");
        assert_eq!((table.entry_for("b"), table.find("a")), (b, Some(a)));
        assert_eq!(table.find("c"), None);
        let names: Vec<&str> = table
            .sorted()
            .iter()
            .map(|&e| &*table.entry(e).name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(table.entry(a).buffers.len(), 2);
        assert_ne!(Table::new(1).generation(), table.generation());
    }
}
