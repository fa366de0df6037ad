//! `flat_params`' arena on the native side: the buffer, the views handed to the caller,
//! the check that a call's dict is still exactly those views (so the call can be made over
//! the one buffer instead), and state dicts cut along or gathered into the layout's
//! ranges. The layout itself is `crate::flat`; `python/samopt/_flat.py` routes the calls.

use std::os::raw::{c_int, c_void};
use std::sync::Arc;

use ndarray::{ArrayViewD, IxDyn, ShapeBuilder};

use numpy::npyffi::{
    get_type_object, npy_intp, NpyTypes, NPY_ARRAY_ALIGNED, NPY_ARRAY_CARRAY,
    NPY_ARRAY_C_CONTIGUOUS, NPY_ARRAY_WRITEABLE,
};
use numpy::{
    Element, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods, PY_ARRAY_API,
};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::arrays::{self, key_text, Float};
use super::optimizer_error;
use crate::flat::{FlatLayout, LayoutError};
use crate::state::{Buffer, Stored, Table};

/// A state-dict key and its array.
pub type KeyedArray<'py> = (String, Bound<'py, PyAny>);

/// One buffer of float32 or float64 and its views, one per name, in the order the names
/// were given.
#[pyclass(module = "samopt._core", frozen)]
pub struct FlatArena {
    layout: Arc<FlatLayout>,
    double: bool,
    buffer: Py<PyUntypedArray>,
    /// The caller's key objects, in the order given: a dict made from them holds these.
    keys: Box<[Py<PyString>]>,
    views: Box<[Py<PyUntypedArray>]>,
}

fn layout_error(names: &[Bound<'_, PyString>], error: LayoutError) -> PyErr {
    let text = |i: usize| names[i].to_string_lossy().into_owned();
    match error {
        LayoutError::Duplicate(first, _) => {
            let name = text(first);
            optimizer_error(&name, format!("'{name}' is given twice"))
        }
        LayoutError::TooLarge(at) => {
            let name = text(at);
            optimizer_error(
                &name,
                format!("the sizes add up past what memory can hold at '{name}'"),
            )
        }
    }
}

/// A C-contiguous view of `len` elements of `buffer` from `offset`, shaped `shape`.
fn view_of<'py, T: Element>(
    buffer: &Bound<'py, PyArrayDyn<T>>,
    offset: usize,
    shape: &[usize],
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let py = buffer.py();
    let mut dims: Vec<npy_intp> = shape.iter().map(|&n| n as npy_intp).collect();
    // SAFETY: `offset` lies within the buffer (or at its end, for an empty view); the view
    // keeps the buffer alive through its base, whose reference SetBaseObject steals (taken
    // here first); NewFromDescr steals the descr's reference and returns a new array or
    // null with an exception set.
    unsafe {
        let data = (*buffer.as_array_ptr()).fields.data.cast::<T>().add(offset);
        let raw = PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            get_type_object(py, NpyTypes::PyArray_Type),
            T::get_dtype(py).into_dtype_ptr(),
            dims.len() as c_int,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            data.cast::<c_void>(),
            NPY_ARRAY_CARRAY,
            std::ptr::null_mut(),
        );
        let view = Bound::from_owned_ptr_or_err(py, raw)?;
        ffi::Py_INCREF(buffer.as_ptr());
        if PY_ARRAY_API.PyArray_SetBaseObject(py, raw.cast(), buffer.as_ptr()) < 0 {
            return Err(PyErr::fetch(py));
        }
        Ok(view.cast_into_unchecked())
    }
}

impl FlatArena {
    /// The buffers of `table`'s entries `chosen` whose names are the arena's, joined per
    /// slot into one array in the buffer's order, keyed `<prefix><flat_key>`, for each
    /// slot any of them holds: per-name state moved into the arena's layout without an
    /// array per name. `chosen` keeps the other entries. None when a slot holds some of
    /// the names but not all, or a buffer of another dtype or shape (the state then stays
    /// per name).
    pub fn join_slots<'py>(
        &self,
        py: Python<'py>,
        table: &Table,
        chosen: &mut Vec<usize>,
        prefixes: &[&str],
        flat_key: &str,
    ) -> PyResult<Option<Vec<KeyedArray<'py>>>> {
        let layout = &self.layout;
        let mut found: Vec<Vec<Option<&Buffer>>> = vec![vec![None; layout.len()]; table.slots()];
        chosen.retain(|&index| {
            let entry = table.entry(index);
            let Some(at) = layout.find(&entry.name) else {
                return true;
            };
            for (slot, buffer) in entry.buffers.iter().enumerate() {
                found[slot][at] = buffer.as_ref();
            }
            false
        });
        let mut joined = Vec::new();
        for (slot, buffers) in found.into_iter().enumerate() {
            if buffers.iter().all(Option::is_none) {
                continue;
            }
            let Some(buffers) = buffers.into_iter().collect::<Option<Vec<_>>>() else {
                return Ok(None);
            };
            let dtype = if self.double { f64::DTYPE } else { f32::DTYPE };
            let fits = buffers.iter().enumerate().all(|(at, buffer)| {
                *buffer.shape == *layout.shape(at) && buffer.data.dtype() == dtype
            });
            if !fits {
                return Ok(None);
            }
            let key = format!("{}{flat_key}", prefixes[slot]);
            let array = match self.double {
                true => joined_buffers::<f64>(py, &buffers, layout.total(), &key)?.into_any(),
                false => joined_buffers::<f32>(py, &buffers, layout.total(), &key)?.into_any(),
            };
            joined.push((key, array));
        }
        Ok(Some(joined))
    }

    fn make<T: Float>(
        py: Python<'_>,
        keys: Box<[Py<PyString>]>,
        layout: Arc<FlatLayout>,
    ) -> PyResult<FlatArena> {
        let buffer = arrays::new_array::<T>(py, &[layout.total()], false, "flat_params")?;
        // SAFETY: a new contiguous array of ours, not yet shared.
        unsafe { buffer.as_slice_mut() }
            .expect("a new contiguous array")
            .fill(T::from_f64(0.0));
        let views = (0..keys.len())
            .map(|given| {
                let index = layout.position(given);
                view_of(&buffer, layout.range(index).start, layout.shape(index)).map(Bound::unbind)
            })
            .collect::<PyResult<_>>()?;
        Ok(FlatArena {
            layout,
            double: T::TYPE_NUM as c_int == f64::TYPE_NUM as c_int,
            buffer: buffer.into_any().cast_into::<PyUntypedArray>()?.unbind(),
            keys,
            views,
        })
    }

    /// Whether `array` is still what the arena made at `offset` with `shape`: the same
    /// memory, C-contiguous, writeable, of the arena's dtype.
    fn holds(&self, array: &Bound<'_, PyUntypedArray>, offset: usize, shape: &[usize]) -> bool {
        let buffer = self.buffer.bind(array.py());
        let item = if self.double { 8 } else { 4 };
        // SAFETY: reads the data pointers and flags of two live arrays.
        let (data, start, flags) = unsafe {
            let raw = array.as_array_ptr();
            (
                (*raw).fields.data as usize,
                (*buffer.as_array_ptr()).fields.data as usize,
                (*raw).fields.flags,
            )
        };
        let wanted = NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_WRITEABLE | NPY_ARRAY_ALIGNED;
        let typed = match self.double {
            true => arrays::is_float_dtype::<f64>(array),
            false => arrays::is_float_dtype::<f32>(array),
        };
        data == start + offset * item && flags & wanted == wanted && typed && array.shape() == shape
    }
}

#[pymethods]
impl FlatArena {
    /// The arena of `names` (str keys) with these shapes, zero-filled, of `dtype`
    /// ("float32" or "float64").
    #[new]
    fn new(
        py: Python<'_>,
        names: Vec<Bound<'_, PyString>>,
        shapes: Vec<Vec<usize>>,
        double: bool,
    ) -> PyResult<FlatArena> {
        let entries = names
            .iter()
            .zip(shapes)
            .map(|(name, shape)| Ok((key_text(name)?.into(), shape.into_boxed_slice())))
            .collect::<PyResult<Vec<_>>>()?;
        let layout = FlatLayout::new(entries).map_err(|error| layout_error(&names, error))?;
        let keys = names.into_iter().map(Bound::unbind).collect();
        match double {
            true => FlatArena::make::<f64>(py, keys, Arc::new(layout)),
            false => FlatArena::make::<f32>(py, keys, Arc::new(layout)),
        }
    }

    /// The one buffer, its arrays in name order.
    #[getter]
    fn buffer(&self, py: Python<'_>) -> Py<PyUntypedArray> {
        self.buffer.clone_ref(py)
    }

    /// The names, in the order given.
    #[getter]
    fn keys(&self, py: Python<'_>) -> Vec<Py<PyString>> {
        self.keys.iter().map(|key| key.clone_ref(py)).collect()
    }

    /// The views, in the order the names were given.
    #[getter]
    fn views(&self, py: Python<'_>) -> Vec<Py<PyUntypedArray>> {
        self.views.iter().map(|view| view.clone_ref(py)).collect()
    }

    /// Whether `mapping` holds exactly the arena's views under its keys, in the order
    /// given, each still the view it was made as (a view whose shape, flags or dtype was
    /// changed in place no longer counts), and the buffer too. A pointer comparison and a
    /// few field reads per view.
    fn intact(&self, mapping: &Bound<'_, PyDict>) -> bool {
        let py = mapping.py();
        let layout = &self.layout;
        if mapping.len() != self.keys.len()
            || !self.holds(self.buffer.bind(py), 0, &[layout.total()])
        {
            return false;
        }
        let mut position: ffi::Py_ssize_t = 0;
        let mut key: *mut ffi::PyObject = std::ptr::null_mut();
        let mut value: *mut ffi::PyObject = std::ptr::null_mut();
        for (given, (own_key, own_view)) in self.keys.iter().zip(self.views.iter()).enumerate() {
            // SAFETY: iterates a live dict, borrowing its keys and values; the GIL is held
            // and nothing here can change the dict.
            let next =
                unsafe { ffi::PyDict_Next(mapping.as_ptr(), &mut position, &mut key, &mut value) };
            if next == 0 || key != own_key.as_ptr() || value != own_view.as_ptr() {
                return false;
            }
            let index = layout.position(given);
            if !self.holds(
                own_view.bind(py),
                layout.range(index).start,
                layout.shape(index),
            ) {
                return false;
            }
        }
        true
    }

    /// Whether `other` has the same names and shapes (its views then line up with ours).
    fn same_layout(&self, other: &FlatArena) -> bool {
        Arc::ptr_eq(&self.layout, &other.layout) || *self.layout == *other.layout
    }

    /// A new, zero-filled arena of the same layout and names, of float64 or float32.
    fn like(&self, py: Python<'_>, double: bool) -> PyResult<FlatArena> {
        let keys = self.keys.iter().map(|key| key.clone_ref(py)).collect();
        match double {
            true => FlatArena::make::<f64>(py, keys, Arc::clone(&self.layout)),
            false => FlatArena::make::<f32>(py, keys, Arc::clone(&self.layout)),
        }
    }

    /// The name of the array that holds the buffer's `element`-th element, if any does.
    fn owner(&self, element: usize) -> Option<String> {
        let index = self.layout.owner(element)?;
        Some(self.layout.name(index).to_owned())
    }

    /// `state` (an optimizer's state dict, made in this call) with every array keyed
    /// `<prefix><flat_key>` — a state stream of the whole buffer — cut into one copy per
    /// name, `<prefix><name>`, shaped as the name's view, listed name by name where the
    /// first of them was (as a state dict made array by array lists them); every other
    /// entry as it is.
    fn split_state<'py>(
        &self,
        state: &Bound<'py, PyDict>,
        flat_key: &Bound<'py, PyString>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let py = state.py();
        let out = PyDict::new(py);
        let mut streams = Vec::new();
        let mut after = Vec::new();
        for (key, value) in state.iter() {
            match flat_prefix(&key, flat_key)? {
                Some(prefix) => {
                    let key = key_text(key.cast::<PyString>()?)?.into_owned();
                    streams.push((prefix, arrays::state_array(value, &key)?, key));
                }
                None if streams.is_empty() => out.set_item(key, value)?,
                None => after.push((key, value)),
            }
        }
        let arrays: Vec<_> = streams.iter().map(|(_, array, _)| array.clone()).collect();
        let claims = read_claims(&arrays, "state")?;
        let views = streams
            .iter()
            .map(|(prefix, array, key)| {
                let values = match arrays::is_float_dtype::<f64>(array) {
                    true => Stream::Double(contiguous_values(array, self.layout.total(), key)?),
                    false => Stream::Single(contiguous_values(array, self.layout.total(), key)?),
                };
                Ok((prefix.as_str(), values))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let layout = &self.layout;
        for index in 0..layout.len() {
            for (prefix, values) in &views {
                let name = format!("{prefix}{}", layout.name(index));
                let (range, shape) = (layout.range(index), layout.shape(index));
                let copy = match values {
                    Stream::Double(all) => {
                        arrays::array_from(py, &all[range], shape, false, &name)?.into_any()
                    }
                    Stream::Single(all) => {
                        arrays::array_from(py, &all[range], shape, false, &name)?.into_any()
                    }
                };
                out.set_item(name, copy)?;
            }
        }
        drop(claims);
        for (key, value) in after {
            out.set_item(key, value)?;
        }
        Ok(out)
    }

    /// `state` (an optimizer's per-name state dict, made in this call) with the arrays of
    /// this layout's names under each of `prefixes` gathered into one array per prefix,
    /// `<prefix><flat_key>`, in the buffer's order; every other entry as it is. With the
    /// count of arrays gathered; None when a prefix has arrays for some of the names but
    /// not all, or of another dtype or shape (the state then stays per name).
    fn gather_state<'py>(
        &self,
        state: &Bound<'py, PyDict>,
        prefixes: Vec<String>,
        flat_key: &str,
    ) -> PyResult<Option<(Bound<'py, PyDict>, usize)>> {
        let py = state.py();
        let layout = &self.layout;
        let out = PyDict::new(py);
        // Per prefix, each name's array (indexed in name order).
        let mut found: Vec<Vec<Option<Bound<'py, PyUntypedArray>>>> =
            prefixes.iter().map(|_| vec![None; layout.len()]).collect();
        let mut gathered = 0;
        for (key, value) in state.iter() {
            let owner = key
                .cast::<PyString>()
                .ok()
                .map(|key| key_text(key).map(|text| owned_by(&prefixes, layout, &text)))
                .transpose()?
                .flatten();
            let Some((prefix, index)) = owner else {
                out.set_item(key, value)?;
                continue;
            };
            let Ok(array) = value.cast_into::<PyUntypedArray>() else {
                return Ok(None);
            };
            let fits = array.shape() == layout.shape(index)
                && match self.double {
                    true => arrays::is_float_dtype::<f64>(&array),
                    false => arrays::is_float_dtype::<f32>(&array),
                };
            if !fits {
                return Ok(None);
            }
            found[prefix][index] = Some(array);
            gathered += 1;
        }
        for (prefix, arrays) in prefixes.iter().zip(found) {
            if arrays.iter().all(Option::is_none) {
                continue;
            }
            let Some(arrays) = arrays.into_iter().collect::<Option<Vec<_>>>() else {
                return Ok(None);
            };
            let key = format!("{prefix}{flat_key}");
            let claims = read_claims(&arrays, &key)?;
            let joined = match self.double {
                true => joined_arrays::<f64>(py, &arrays, layout.total(), &key)?.into_any(),
                false => joined_arrays::<f32>(py, &arrays, layout.total(), &key)?.into_any(),
            };
            drop(claims);
            out.set_item(key, joined)?;
        }
        Ok(Some((out, gathered)))
    }
}

/// One state stream of an arena's buffer, as its dtype.
enum Stream<'a> {
    Single(&'a [f32]),
    Double(&'a [f64]),
}

/// The prefix of `key` when it is `<prefix><flat_key>`.
fn flat_prefix(key: &Bound<'_, PyAny>, flat_key: &Bound<'_, PyString>) -> PyResult<Option<String>> {
    let Ok(key) = key.cast::<PyString>() else {
        return Ok(None);
    };
    // SAFETY: two live str objects; PyUnicode_Tailmatch returns 1 or 0 for them.
    let ends =
        unsafe { ffi::PyUnicode_Tailmatch(key.as_ptr(), flat_key.as_ptr(), 0, isize::MAX, 1) };
    if ends != 1 {
        return Ok(None);
    }
    let text = key_text(key)?;
    let cut = text.len() - key_text(flat_key)?.len();
    Ok(Some(text[..cut].to_owned()))
}

/// Which of `prefixes` (the longest that fits) and which name of `layout` the state key
/// `key` is made of.
fn owned_by(prefixes: &[String], layout: &FlatLayout, key: &str) -> Option<(usize, usize)> {
    prefixes
        .iter()
        .enumerate()
        .filter_map(|(p, prefix)| {
            let name = key.strip_prefix(prefix.as_str())?;
            layout.find(name).map(|index| (p, index, prefix.len()))
        })
        .max_by_key(|&(_, _, len)| len)
        .map(|(p, index, _)| (p, index))
}

/// Read claims on `arrays` for as long as the result lives: no call in flight writes them
/// while they are copied.
fn read_claims(
    arrays: &[Bound<'_, PyUntypedArray>],
    key: &str,
) -> PyResult<crate::claims::Registration> {
    let claims = arrays
        .iter()
        .enumerate()
        .map(|(item, array)| arrays::claim_of(array, false, item))
        .collect();
    crate::claims::register(Arc::new(crate::claims::CallClaims::new(claims)))
        .map_err(|_| arrays::shared_memory_error("state", key))
}

/// The values of a C-contiguous array of `len` elements of `T`.
fn contiguous_values<'a, T: Float>(
    array: &'a Bound<'_, PyUntypedArray>,
    len: usize,
    key: &str,
) -> PyResult<&'a [T]> {
    let contiguous = array.is_c_contiguous() && array.len() == len && array.ndim() == 1;
    if !contiguous || !arrays::is_float_dtype::<T>(array) {
        let message = format!("state '{key}' is not a buffer of the flat parameters' state");
        return Err(optimizer_error(key, message));
    }
    // SAFETY: a C-contiguous array of `len` elements of `T` (checked above), read-claimed
    // by the caller, so that no call writes it while it is read; the GIL is held.
    Ok(unsafe { std::slice::from_raw_parts((*array.as_array_ptr()).fields.data.cast::<T>(), len) })
}

/// The views' values, each in C order, one after the other, in a new 1-D array of
/// `total` elements (the views' sizes add up to it).
fn joined<'a, 'py, T: Float>(
    py: Python<'py>,
    views: impl Iterator<Item = ArrayViewD<'a, T>>,
    total: usize,
    key: &str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let out = arrays::new_array::<T>(py, &[total], false, key)?;
    // SAFETY: a new contiguous array of ours, not yet shared.
    let slice = unsafe { out.as_slice_mut() }.expect("a new contiguous array");
    let mut at = 0;
    for view in views {
        let len = view.len();
        for (target, &value) in slice[at..at + len].iter_mut().zip(view.iter()) {
            *target = value;
        }
        at += len;
    }
    Ok(out)
}

/// `arrays` (of `T`, checked by the caller and read-claimed by it) joined as `joined`.
fn joined_arrays<'py, T: Float>(
    py: Python<'py>,
    arrays: &[Bound<'py, PyUntypedArray>],
    total: usize,
    key: &str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let views = arrays.iter().map(|part| {
        // SAFETY: an array of `T`, read-claimed by the caller for as long as it is read.
        let typed: &Bound<'py, PyArrayDyn<T>> = unsafe { part.cast_unchecked() };
        unsafe { typed.as_array() }
    });
    joined(py, views, total, key)
}

/// State buffers (of `T`: checked by the caller) joined as `joined`.
fn joined_buffers<'py, T: Float>(
    py: Python<'py>,
    buffers: &[&Buffer],
    total: usize,
    key: &str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let views = buffers.iter().map(|buffer| {
        let values = T::view(&buffer.data).expect("a buffer of the arena's dtype");
        let shape = IxDyn(&buffer.shape);
        match buffer.fortran {
            true => ArrayViewD::from_shape(shape.f(), values),
            false => ArrayViewD::from_shape(shape, values),
        }
        .expect("a buffer holds its shape's elements")
    });
    joined(py, views, total, key)
}

/// The `FlatArena` class.
pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<FlatArena>()
}
