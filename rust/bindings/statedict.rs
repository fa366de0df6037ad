//! State dicts read in bulk: one native pass over a state dict's keys sorts out whose they
//! are, groups the per-parameter arrays by name, checks and copies them. With a million
//! parameters a Python loop over their keys cost more than everything else a load does.

use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use super::arrays::{self, describe_shape, dtype_name, is_float_dtype, key_text, Float};
use super::optimizer_error;
use crate::state::{Buffer, Data, Table};

/// A state dict's per-parameter arrays, checked and copied, not yet in force (see
/// `Engine.load` and `SamEngine.stage`, which take the table out).
#[pyclass(module = "samopt._core")]
pub struct StagedTable(pub Option<Table>);

impl StagedTable {
    fn table(&self) -> PyResult<&Table> {
        self.0
            .as_ref()
            .ok_or_else(|| optimizer_error("state", "this state was installed already".into()))
    }

    /// The table, taken out to be put in force.
    pub fn take(&mut self) -> PyResult<Table> {
        self.table()?;
        Ok(self.0.take().expect("checked above"))
    }
}

/// Keys to match against, as str objects: a call compares each key of a state dict with
/// them without extracting its text (which, under the limited API, is a copy).
struct KeySet<'py> {
    exact: Vec<Bound<'py, PyString>>,
    prefixes: Vec<Bound<'py, PyString>>,
}

impl<'py> KeySet<'py> {
    fn new(py: Python<'py>, exact: &[String], prefixes: &[String]) -> KeySet<'py> {
        let strs = |texts: &[String]| texts.iter().map(|t| PyString::new(py, t)).collect();
        KeySet {
            exact: strs(exact),
            prefixes: strs(prefixes),
        }
    }

    fn is_exact(&self, key: &Bound<'_, PyString>) -> bool {
        // SAFETY: two live str objects; comparing them cannot fail.
        let equal = |other: &Bound<'_, PyString>| unsafe {
            ffi::PyUnicode_Compare(key.as_ptr(), other.as_ptr()) == 0
        };
        self.exact.iter().any(equal)
    }

    /// The first prefix `key` starts with.
    fn prefix_of(&self, key: &Bound<'_, PyString>) -> Option<usize> {
        self.prefixes.iter().position(|prefix| {
            // SAFETY: two live str objects; PyUnicode_Tailmatch returns 1 or 0 for them.
            let found = unsafe {
                ffi::PyUnicode_Tailmatch(key.as_ptr(), prefix.as_ptr(), 0, isize::MAX, -1)
            };
            found == 1
        })
    }

    fn owns(&self, key: &Bound<'_, PyAny>) -> bool {
        key.cast::<PyString>()
            .is_ok_and(|key| self.is_exact(key) || self.prefix_of(key).is_some())
    }
}

/// Splits a state dict into the entries one optimizer owns (str keys equal to one of
/// `exact` or starting with one of `prefixes`) and the rest, both new dicts holding the
/// same objects.
#[pyfunction]
fn partition_state<'py>(
    state: &Bound<'py, PyDict>,
    exact: Vec<String>,
    prefixes: Vec<String>,
) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyDict>)> {
    let py = state.py();
    let keys = KeySet::new(py, &exact, &prefixes);
    let (own, rest) = (PyDict::new(py), PyDict::new(py));
    for (key, value) in state.iter() {
        match keys.owns(&key) {
            true => own.set_item(key, value)?,
            false => rest.set_item(key, value)?,
        }
    }
    Ok((own, rest))
}

/// The str keys of `state` that one optimizer owns (see `partition_state`), sorted.
#[pyfunction]
fn owned_keys(
    state: &Bound<'_, PyDict>,
    exact: Vec<String>,
    prefixes: Vec<String>,
) -> PyResult<Vec<String>> {
    let keys = KeySet::new(state.py(), &exact, &prefixes);
    let mut found = Vec::new();
    for key in state.keys().iter() {
        if keys.owns(&key) {
            found.push(key.cast::<PyString>()?.to_string_lossy().into_owned());
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// A private copy of a state array, checked: native float32 or float64, every value
/// finite (and not negative, for `non_negative` slots).
fn checked_copy(object: Bound<'_, PyAny>, key: &str, non_negative: bool) -> PyResult<Buffer> {
    let refused = |got: String| {
        optimizer_error(
            key,
            format!("state '{key}' must be a float32 or float64 ndarray, got {got}"),
        )
    };
    let array = match object.cast_into::<PyUntypedArray>() {
        Ok(array) => array,
        Err(error) => {
            let object = error.into_inner();
            let name = object.get_type().name().map(|n| n.to_string());
            return Err(refused(name.unwrap_or_else(|_| "?".into())));
        }
    };
    if !(is_float_dtype::<f32>(&array) || is_float_dtype::<f64>(&array)) {
        return Err(refused(dtype_name(&array)));
    }
    // An unaligned array cannot be viewed as Rust floats: NumPy copies it first.
    let array = match arrays::state_array(array.clone().into_any(), key) {
        Ok(aligned) => aligned,
        Err(_) => array.call_method0("copy")?.cast_into::<PyUntypedArray>()?,
    };
    let buffer = match is_float_dtype::<f32>(&array) {
        true => copy_of::<f32>(&array, key)?,
        false => copy_of::<f64>(&array, key)?,
    };
    let (finite, negative) = match &buffer.data {
        Data::Single(values) => scan(values),
        Data::Double(values) => scan(values),
    };
    if !finite {
        return Err(optimizer_error(
            key,
            format!("state '{key}' contains NaN or infinity"),
        ));
    }
    if non_negative && negative {
        return Err(optimizer_error(
            key,
            format!("state '{key}' has negative entries"),
        ));
    }
    Ok(buffer)
}

/// A table made of a state dict's arrays already grouped by name (Lookahead's and the
/// layer-wise optimizers' state): `entries` maps each name to a tuple with one array (or
/// None) per slot, each checked and copied as `parse_table` does and sharing one dtype
/// and shape.
pub fn import_table(entries: &Bound<'_, PyDict>, prefixes: &[&str]) -> PyResult<Table> {
    let mut table = Table::new(prefixes.len());
    for (name, arrays) in entries.iter() {
        let name = name.cast_into::<PyString>()?;
        let text = key_text(&name)?;
        let arrays = arrays.cast_into::<PyTuple>()?;
        if arrays.len() != prefixes.len() {
            return Err(optimizer_error(
                &text,
                format!("state of '{text}' needs {} arrays", prefixes.len()),
            ));
        }
        let mut buffers: Vec<Option<Buffer>> = Vec::with_capacity(prefixes.len());
        for (object, prefix) in arrays.iter().zip(prefixes) {
            if object.is_none() {
                buffers.push(None);
                continue;
            }
            let key = format!("{prefix}{text}");
            let buffer = checked_copy(object, &key, false)?;
            let first = buffers.iter().flatten().next();
            if let Some(first) = first {
                let single = |b: &Buffer| matches!(b.data, Data::Single(_));
                if (single(first), &first.shape) != (single(&buffer), &buffer.shape) {
                    let dtype = |b: &Buffer| if single(b) { "float32" } else { "float64" };
                    return Err(optimizer_error(
                        &key,
                        format!(
                            "state '{key}' has dtype {} and shape {}, unlike the other state of \
                             '{text}' ({} and shape {})",
                            dtype(&buffer),
                            describe_shape(&buffer.shape),
                            dtype(first),
                            describe_shape(&first.shape)
                        ),
                    ));
                }
            }
            buffers.push(Some(buffer));
        }
        let index = table.entry_for(&text);
        table.entry_mut(index).buffers = buffers.into_boxed_slice();
    }
    Ok(table)
}

fn copy_of<T: Float>(array: &Bound<'_, PyUntypedArray>, key: &str) -> PyResult<Buffer> {
    let (values, order) = arrays::buffer_of::<T>(array, key)?;
    Ok(Buffer {
        data: T::wrap(values),
        shape: array.shape().into(),
        fortran: order.fortran(),
    })
}

/// Whether every value is finite, and whether any is below zero.
fn scan<T: crate::float::Real>(values: &[T]) -> (bool, bool) {
    let finite = values.iter().all(|x| x.to_f64().is_finite());
    let negative = values.iter().any(|x| x.to_f64() < 0.0);
    (finite, negative)
}

fn layout(buffer: &Buffer) -> String {
    format!(
        "dtype {} and shape {}",
        buffer.data.dtype(),
        describe_shape(&buffer.shape)
    )
}

fn same_layout(a: &Buffer, b: &Buffer) -> bool {
    a.data.dtype() == b.data.dtype() && arrays::same_shape(&a.shape, &b.shape)
}

/// A state dict's per-parameter entries as a table with one slot per prefix: each key is
/// one of `scalars` or starts with one of `skip_prefixes` (skipped: another part of the
/// state), or is a prefix and a parameter name; any other key is an error when `strict`.
/// Every array is checked (`checked_copy`; `non_negative` lists the slots whose values
/// cannot be negative) and copied, and every name needs an array in each slot, all of one
/// dtype and shape (unless `same_layouts` is false: then `StagedTable.check_layouts` tells).
#[pyfunction]
#[pyo3(signature = (
    state, prefixes, non_negative, scalars, skip_prefixes = Vec::new(), strict = true,
    same_layouts = true
))]
fn parse_table(
    state: &Bound<'_, PyDict>,
    prefixes: Vec<String>,
    non_negative: Vec<String>,
    scalars: Vec<String>,
    skip_prefixes: Vec<String>,
    strict: bool,
    same_layouts: bool,
) -> PyResult<StagedTable> {
    let py = state.py();
    let skipped = KeySet::new(py, &scalars, &skip_prefixes);
    let slots = KeySet::new(py, &[], &prefixes);
    let mut table = Table::new(prefixes.len());
    for (key, value) in state.iter() {
        let Ok(key) = key.cast::<PyString>() else {
            let shown = key.repr()?.to_string();
            return Err(optimizer_error(
                &shown,
                format!("state dict keys must be str, got {shown}"),
            ));
        };
        if skipped.is_exact(key) || skipped.prefix_of(key).is_some() {
            continue;
        }
        let Some(slot) = slots.prefix_of(key) else {
            if strict {
                let text = key.to_string_lossy();
                return Err(optimizer_error(
                    &text,
                    format!("unknown state dict key '{text}'"),
                ));
            }
            continue;
        };
        let text = key_text(key)?;
        let buffer = checked_copy(value, &text, non_negative.contains(&prefixes[slot]))?;
        let index = table.entry_for(&text[prefixes[slot].len()..]);
        table.entry_mut(index).buffers[slot] = Some(buffer);
    }
    check_entries(&table, &prefixes, same_layouts)?;
    Ok(StagedTable(Some(table)))
}

/// Checks that every name has an array in each slot (and, with `layouts`, all of one dtype
/// and shape); should any fail, the first in name order is reported.
fn check_entries(table: &Table, prefixes: &[String], layouts: bool) -> PyResult<()> {
    let fails = |entry| incomplete(table, entry, prefixes, layouts);
    if (0..table.len()).any(|entry| fails(entry).is_some()) {
        let first = table.sorted().into_iter().find_map(fails);
        return Err(first.expect("a name failed"));
    }
    Ok(())
}

/// The error that entry `index` lacks a slot's array, or (with `layouts`) that its arrays
/// differ in dtype or shape.
fn incomplete(table: &Table, index: usize, prefixes: &[String], layouts: bool) -> Option<PyErr> {
    let entry = table.entry(index);
    let name = &entry.name;
    let key = |slot: usize| format!("{}{name}", prefixes[slot]);
    let buffers = &entry.buffers;
    if buffers.iter().any(Option::is_none) {
        let present = buffers.iter().position(Option::is_some)?;
        let missing: Vec<&str> = (0..prefixes.len())
            .filter(|&slot| buffers[slot].is_none())
            .map(|slot| prefixes[slot].as_str())
            .collect();
        let key = key(present);
        let message = format!(
            "state '{key}' has no matching {} partner",
            missing.join("/")
        );
        return Some(optimizer_error(&key, message));
    }
    if !layouts {
        return None;
    }
    let first = buffers.first()?.as_ref()?;
    let slot = (1..buffers.len()).find(|&slot| {
        let other = buffers[slot].as_ref().expect("every slot present");
        !same_layout(first, other)
    })?;
    let other = buffers[slot].as_ref().expect("every slot present");
    let (other_key, first_key) = (key(slot), key(0));
    let message = format!(
        "state '{other_key}' has {} but '{first_key}' has {}",
        layout(other),
        layout(first)
    );
    Some(optimizer_error(&other_key, message))
}

#[pymethods]
impl StagedTable {
    fn __len__(&self) -> PyResult<usize> {
        Ok(self.table()?.len())
    }

    /// Checks that each name's arrays (keys `prefixes[slot]` + name) share a dtype and a
    /// shape.
    fn check_layouts(&self, prefixes: Vec<String>) -> PyResult<()> {
        check_entries(self.table()?, &prefixes, true)
    }

    /// Checks that every entry of this table (a pending first_step's saved values, keys
    /// `prefix` + name) fits `base`'s (a base optimizer's state, keys `base_prefix` +
    /// name): a name the base has state for, of that state's dtype and shape. A base with
    /// no state at all fits anything (its state is made at its first step).
    fn check_fits(&self, base: &StagedTable, prefix: &str, base_prefix: &str) -> PyResult<()> {
        let (mine, base) = (self.table()?, base.table()?);
        if base.is_empty() {
            return Ok(());
        }
        for index in mine.sorted() {
            let entry = mine.entry(index);
            let name = &entry.name;
            let key = format!("{prefix}{name}");
            let Some(found) = base.find(name) else {
                return Err(optimizer_error(
                    &key,
                    format!("state '{key}' names a parameter the base optimizer has no state for"),
                ));
            };
            let theirs = base.entry(found).buffers[0].as_ref();
            let ours = entry.buffers[0].as_ref();
            if let (Some(ours), Some(theirs)) = (ours, theirs) {
                if !same_layout(ours, theirs) {
                    return Err(optimizer_error(
                        &key,
                        format!(
                            "state '{key}' has {} but '{base_prefix}{name}' has {}",
                            layout(ours),
                            layout(theirs)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(partition_state, module)?)?;
    module.add_function(wrap_pyfunction!(owned_keys, module)?)?;
    module.add_function(wrap_pyfunction!(parse_table, module)?)?;
    module.add_class::<StagedTable>()?;
    Ok(())
}
