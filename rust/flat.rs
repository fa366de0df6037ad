//! The flat-parameter arena's layout: many arrays as consecutive ranges of one buffer.
//!
//! The ranges follow name order, the order every call walks its arrays in, so one call
//! over the whole buffer visits the elements in the order a call over the separate arrays
//! would; and a per-name state dict is the buffer's state cut along the same ranges.

use std::ops::Range;

use crate::state::name_order;

/// One array of a layout: its name and shape.
pub type Entry = (Box<str>, Box<[usize]>);

/// Names and shapes, each array's range of the buffer in name order.
#[derive(Debug, PartialEq, Eq)]
pub struct FlatLayout {
    /// The names in name order.
    names: Box<[Box<str>]>,
    shapes: Box<[Box<[usize]>]>,
    /// `offsets[i]..offsets[i + 1]` is the range of the i-th name; one more than names.
    offsets: Box<[usize]>,
    /// For each name in the order given, its index in name order.
    positions: Box<[usize]>,
}

/// Why a layout cannot be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The same name twice (at these two positions of the order given).
    Duplicate(usize, usize),
    /// The sizes add up past what an address can count; the position of the name that
    /// overflowed.
    TooLarge(usize),
}

impl FlatLayout {
    /// The layout of `entries` (name, shape), in the order given.
    pub fn new(entries: Vec<Entry>) -> Result<FlatLayout, LayoutError> {
        let order = name_order(entries.iter().map(|(name, _)| &**name));
        let mut positions = vec![0; entries.len()];
        for (sorted, &given) in order.iter().enumerate() {
            positions[given] = sorted;
        }
        for pair in order.windows(2) {
            if entries[pair[0]].0 == entries[pair[1]].0 {
                return Err(LayoutError::Duplicate(
                    pair[0].min(pair[1]),
                    pair[0].max(pair[1]),
                ));
            }
        }
        let mut offsets = Vec::with_capacity(entries.len() + 1);
        let mut end = 0usize;
        offsets.push(end);
        for &given in &order {
            let size = entries[given]
                .1
                .iter()
                .try_fold(1usize, |size, &n| size.checked_mul(n))
                .ok_or(LayoutError::TooLarge(given))?;
            end = end.checked_add(size).ok_or(LayoutError::TooLarge(given))?;
            offsets.push(end);
        }
        let mut slots: Vec<Option<Entry>> = entries.into_iter().map(Some).collect();
        let (names, shapes) = order
            .iter()
            .map(|&given| slots[given].take().expect("each position once"))
            .unzip::<_, _, Vec<_>, Vec<_>>();
        Ok(FlatLayout {
            names: names.into_boxed_slice(),
            shapes: shapes.into_boxed_slice(),
            offsets: offsets.into_boxed_slice(),
            positions: positions.into_boxed_slice(),
        })
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Elements in the buffer.
    pub fn total(&self) -> usize {
        self.offsets[self.names.len()]
    }

    /// The i-th name in name order.
    pub fn name(&self, index: usize) -> &str {
        &self.names[index]
    }

    pub fn shape(&self, index: usize) -> &[usize] {
        &self.shapes[index]
    }

    /// The range of the buffer that the i-th name (in name order) holds.
    pub fn range(&self, index: usize) -> Range<usize> {
        self.offsets[index]..self.offsets[index + 1]
    }

    /// The index in name order of the array given at `position`.
    pub fn position(&self, position: usize) -> usize {
        self.positions[position]
    }

    /// The index in name order of `name`, if the layout has it.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.names
            .binary_search_by(|probe| (**probe).cmp(name))
            .ok()
    }

    /// The index (in name order) of the array that holds the buffer's `element`-th
    /// element, if any does.
    pub fn owner(&self, element: usize) -> Option<usize> {
        if element >= self.total() {
            return None;
        }
        // The last array that starts at or before the element: empty arrays share their
        // start with the next one, and hold nothing.
        let starts = &self.offsets[..self.names.len()];
        Some(starts.partition_point(|&start| start <= element) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(entries: &[(&str, &[usize])]) -> Result<FlatLayout, LayoutError> {
        FlatLayout::new(
            entries
                .iter()
                .map(|(name, shape)| (Box::from(*name), Box::from(*shape)))
                .collect(),
        )
    }

    #[test]
    fn ranges_follow_name_order_whatever_the_order_given() {
        let flat = layout(&[("w", &[2, 3]), ("b", &[3]), ("", &[]), ("e", &[0, 4])]).unwrap();
        let names: Vec<&str> = (0..flat.len()).map(|i| flat.name(i)).collect();
        assert_eq!(names, ["", "b", "e", "w"]);
        assert_eq!(flat.range(0), 0..1);
        assert_eq!(flat.range(1), 1..4);
        assert_eq!(flat.range(2), 4..4);
        assert_eq!(flat.range(3), 4..10);
        assert_eq!(flat.total(), 10);
        assert_eq!(
            (0..4).map(|p| flat.position(p)).collect::<Vec<_>>(),
            [3, 1, 0, 2]
        );
        assert_eq!(flat.find("e"), Some(2));
        assert_eq!(flat.find("x"), None);
    }

    #[test]
    fn every_element_has_its_owner_and_empty_arrays_own_none() {
        let flat = layout(&[("a", &[2]), ("b", &[0]), ("c", &[3]), ("d", &[0])]).unwrap();
        let owners: Vec<Option<usize>> = (0..6).map(|e| flat.owner(e)).collect();
        assert_eq!(owners, [Some(0), Some(0), Some(2), Some(2), Some(2), None]);
        assert_eq!(layout(&[]).unwrap().owner(0), None);
    }

    #[test]
    fn duplicates_and_oversized_layouts_are_refused() {
        assert_eq!(
            layout(&[("a", &[1]), ("b", &[1]), ("a", &[2])]),
            Err(LayoutError::Duplicate(0, 2))
        );
        assert_eq!(
            layout(&[("a", &[usize::MAX, 2])]),
            Err(LayoutError::TooLarge(0))
        );
        assert_eq!(
            layout(&[("a", &[usize::MAX]), ("b", &[1])]),
            Err(LayoutError::TooLarge(1))
        );
    }
}
