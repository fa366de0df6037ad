//! Stage 1 of a call, for the caller's arrays: keys and their order, the checks of every
//! parameter and gradient, the layout the kernels see them in (staged copies where the
//! array's own does not fit, allocated fallibly), and the memory claims.

use ndarray::{ArrayView, ArrayViewD, ArrayViewMutD, IxDyn, ShapeBuilder};
use numpy::npyffi::{NPY_ARRAY_ALIGNED, NPY_ARRAY_WRITEABLE, NPY_TYPES};
use numpy::{Element, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray};
use numpy::{PyUntypedArrayMethods, PY_ARRAY_API};
use pyo3::exceptions::PyUnicodeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyFloat, PyString, PyType};
use std::borrow::Cow;
use std::os::raw::c_int;
use std::sync::Arc;

use super::{optimizer_error, out_of_memory, OptimizerError};
use crate::claims::{self, CallClaims, Claim, Conflict, Holder, Registration};
use crate::float::Real;
use crate::state::{self, OutOfMemory, Stored};

/// The memory order in which every stream of one parameter is laid out for the kernels.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Order {
    C,
    F,
}

impl Order {
    /// The array's own order when it is contiguous; otherwise it is staged in C order.
    pub fn of(array: &Bound<'_, PyUntypedArray>) -> Order {
        if !array.is_c_contiguous() && array.is_fortran_contiguous() {
            Order::F
        } else {
            Order::C
        }
    }

    pub fn fortran(self) -> bool {
        self == Order::F
    }

    pub fn holds(self, array: &Bound<'_, PyUntypedArray>) -> bool {
        match self {
            Order::C => array.is_c_contiguous(),
            Order::F => array.is_fortran_contiguous(),
        }
    }

    /// The view's elements in this order, each passed through `convert`, in a buffer of
    /// their own (allocated fallibly).
    pub fn gather<S: Copy, T>(
        self,
        view: ArrayViewD<'_, S>,
        convert: impl Fn(S) -> T,
    ) -> Result<Box<[T]>, OutOfMemory> {
        match self {
            Order::C => state::collect(view.iter().map(|&x| convert(x))),
            Order::F => state::collect(view.t().iter().map(|&x| convert(x))),
        }
    }

    pub fn view<'a, T>(self, shape: &[usize], flat: &'a [T]) -> ArrayViewD<'a, T> {
        let shape = IxDyn(shape);
        let view = match self {
            Order::C => ArrayView::from_shape(shape, flat),
            Order::F => ArrayView::from_shape(shape.f(), flat),
        };
        view.expect("a buffer has exactly the array's size")
    }
}

/// A parameter dtype, identified by NumPy's type number (cheaper than comparing dtype
/// objects, which matters with hundreds of small arrays per call).
pub trait Float: Element + Stored {
    const TYPE_NUM: NPY_TYPES;
}

impl Float for f32 {
    const TYPE_NUM: NPY_TYPES = NPY_TYPES::NPY_FLOAT;
}

impl Float for f64 {
    const TYPE_NUM: NPY_TYPES = NPY_TYPES::NPY_DOUBLE;
}

/// The array's dtype fields, read in place: `dtype()` would create a new reference, and
/// these checks run several times per array and call.
fn descr<'a>(array: &'a Bound<'_, PyUntypedArray>) -> &'a numpy::npyffi::PyArray_Descr_fields {
    // SAFETY: a live array holds a reference to its descr; these leading fields are laid
    // out alike in NumPy 1 and 2.
    unsafe { &(*(*array.as_array_ptr()).fields.descr).fields }
}

/// Whether the array holds `T` in native byte order.
pub fn is_float_dtype<T: Float>(array: &Bound<'_, PyUntypedArray>) -> bool {
    let dtype = descr(array);
    // NumPy's PyArray_ISNBO: '=' native, '|' not applicable, else the machine's own order.
    let native = matches!(dtype.byteorder as u8, b'=' | b'|')
        || dtype.byteorder as u8 == numpy::npyffi::NPY_BYTEORDER_CHAR::NPY_NATBYTE as u8;
    dtype.type_num == T::TYPE_NUM as c_int && native
}

/// The array as `PyArrayDyn<T>` if it holds `T`. rust-numpy's own cast compares dtype
/// objects through NumPy's API, which with hundreds of small arrays costs more than the
/// work; the type number says the same.
fn typed<'a, 'py, T: Float>(
    array: &'a Bound<'py, PyUntypedArray>,
) -> Option<&'a Bound<'py, PyArrayDyn<T>>> {
    // SAFETY: an ndarray whose elements are `T` in native byte order, of any rank.
    is_float_dtype::<T>(array).then(|| unsafe { array.cast_unchecked() })
}

/// `typed` for an array the caller hands over: no new reference (each reference count
/// change is a call into the interpreter, several per array and call).
pub fn typed_into<'py, T: Float>(
    array: Bound<'py, PyUntypedArray>,
) -> Option<Bound<'py, PyArrayDyn<T>>> {
    // SAFETY: as for `typed`.
    is_float_dtype::<T>(&array).then(|| unsafe { array.cast_into_unchecked() })
}

/// Whether the array's flags have all of `flags` set.
fn has_flags(array: &Bound<'_, PyUntypedArray>, flags: c_int) -> bool {
    // SAFETY: reads the flags field of a live NumPy array object.
    let set = unsafe { (*array.as_array_ptr()).fields.flags };
    set & flags == flags
}

/// Whether Rust may view the array's memory as `&[T]`: native byte order (which
/// `is_float_dtype` checks) and aligned elements.
fn is_aligned(array: &Bound<'_, PyUntypedArray>) -> bool {
    has_flags(array, NPY_ARRAY_ALIGNED)
}

/// The address of the array's first element.
fn data_address(array: &Bound<'_, PyUntypedArray>) -> usize {
    // SAFETY: reads the data pointer of a live NumPy array object.
    unsafe { (*array.as_array_ptr()).fields.data as usize }
}

fn itemsize(array: &Bound<'_, PyUntypedArray>) -> usize {
    match descr(array).type_num {
        n if n == f64::TYPE_NUM as c_int => 8,
        n if n == f32::TYPE_NUM as c_int => 4,
        _ => array.dtype().itemsize(),
    }
}

/// What an array of the call claims: its bytes, its stride lattice, and whether it is
/// written. `item` is its position in the call.
pub fn claim_of(array: &Bound<'_, PyUntypedArray>, write: bool, item: usize) -> Claim {
    let data = data_address(array);
    Claim::of(
        data,
        array.shape(),
        array.strides(),
        itemsize(array),
        write,
        item,
    )
}

/// A typed array as an untyped one, without asking NumPy again whether it is an array
/// (a call into NumPy's API, several times per array and call).
fn untyped<'a, 'py, T: Element>(
    array: &'a Bound<'py, PyArrayDyn<T>>,
) -> &'a Bound<'py, PyUntypedArray> {
    // SAFETY: a `PyArrayDyn<T>` is a NumPy array.
    unsafe { array.cast_unchecked::<PyUntypedArray>() }
}

/// An array a call writes. No per-array borrow is taken: the call's claims rule out the
/// same memory under two names and another call in flight writing or reading it.
pub struct Access<'py, T: Element>(Bound<'py, PyArrayDyn<T>>);

impl<'py, T: Element> Access<'py, T> {
    pub fn untyped(&self) -> &Bound<'py, PyUntypedArray> {
        untyped(&self.0)
    }

    fn view(&self) -> ArrayViewD<'_, T> {
        // SAFETY: nothing else reads or writes the array during the call (claims).
        unsafe { self.0.as_array() }
    }

    fn view_mut(&mut self) -> ArrayViewMutD<'_, T> {
        // SAFETY: as for `view`.
        unsafe { self.0.as_array_mut() }
    }

    fn slice_mut(&mut self) -> &mut [T] {
        // SAFETY: as for `view`.
        let slice = unsafe { self.0.as_slice_mut() };
        slice.expect("layout checked when staged")
    }
}

/// A parameter as the kernels write it: the array itself when its layout fits, else a
/// staged copy that is written back after the kernels.
pub struct Target<'py, T: Element> {
    access: Access<'py, T>,
    staged: Option<Box<[T]>>,
    order: Order,
}

impl<'py, T: Element + Copy> Target<'py, T> {
    pub fn new(access: Access<'py, T>, order: Order) -> Result<Self, OutOfMemory> {
        let fits = order.holds(access.untyped());
        let staged = match fits {
            true => None,
            false => Some(order.gather(access.view(), |x| x)?),
        };
        Ok(Target {
            access,
            staged,
            order,
        })
    }

    pub fn shape(&self) -> &[usize] {
        self.access.untyped().shape()
    }

    pub fn order(&self) -> Order {
        self.order
    }

    pub fn slice(&mut self) -> &mut [T] {
        match &mut self.staged {
            Some(buffer) => buffer,
            None => self.access.slice_mut(),
        }
    }

    /// The parameter's memory, for claiming it again.
    pub fn array(&self) -> &Bound<'py, PyUntypedArray> {
        self.access.untyped()
    }

    pub fn write_back(&mut self) {
        if let Some(buffer) = &self.staged {
            let shape = self.shape().to_vec();
            self.access
                .view_mut()
                .assign(&self.order.view(&shape, buffer));
        }
    }
}

/// A stream the kernels only read: the caller's array when its layout fits, else a copy
/// (also where a gradient of another dtype is converted).
pub enum Source<'py, T: Element> {
    /// The caller's array, read in place (no call in flight writes it: claims).
    Array(Bound<'py, PyArrayDyn<T>>),
    Staged(Box<[T]>),
}

/// The array's elements, read without a borrow: the caller checked the claims.
fn read_view<'a, T: Element>(array: &'a Bound<'_, PyArrayDyn<T>>) -> ArrayViewD<'a, T> {
    // SAFETY: no call in flight writes the array (claims), and this call does not.
    unsafe { array.as_array() }
}

impl<'py, T: Element + Copy> Source<'py, T> {
    fn new(array: Bound<'py, PyArrayDyn<T>>, order: Order) -> Result<Self, OutOfMemory> {
        if order.holds(untyped(&array)) {
            Ok(Source::Array(array))
        } else {
            Ok(Source::Staged(order.gather(read_view(&array), |x| x)?))
        }
    }

    pub fn slice(&self) -> &[T] {
        match self {
            Source::Staged(buffer) => buffer,
            // SAFETY: as for `read_view`.
            Source::Array(array) => unsafe { array.as_slice() }.expect("layout checked"),
        }
    }
}

pub fn describe_shape(shape: &[usize]) -> String {
    match shape {
        [single] => format!("({single},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn type_name(object: &Bound<'_, PyAny>) -> String {
    object
        .get_type()
        .name()
        .map(|name| name.to_string())
        .unwrap_or_else(|_| "?".to_owned())
}

pub fn dtype_name(array: &Bound<'_, PyUntypedArray>) -> String {
    array.dtype().to_string()
}

/// A parameter name: the caller's key object itself, so that lookups in the other dicts
/// reuse its cached hash. Its text is only extracted where it is needed (the limited API
/// of CPython 3.9, which the wheel targets, has no borrowed UTF-8 view of a str:
/// extracting it costs a copy).
pub struct Key<'py>(pub Bound<'py, PyString>);

impl Key<'_> {
    /// The name for messages (a name that sorted is valid UTF-8; see `sorted_entries`).
    pub fn text(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }

    /// An `OptimizerError` naming this parameter, its message made from the name.
    pub fn error(&self, message: impl FnOnce(&str) -> String) -> PyErr {
        let name = self.text();
        optimizer_error(&name, message(&name))
    }

    pub fn out_of_memory(&self, what: &str, error: OutOfMemory) -> PyErr {
        let name = self.text();
        out_of_memory(&name, &format!("{what} '{name}'"), error.bytes)
    }
}

/// The name order of the last dict a call saw: a call with the same key objects, in the
/// same dict order (an optimizer's parameters, step after step), skips extracting and
/// sorting the names. One per optimizer, used under its lock.
#[derive(Default)]
pub struct NameOrder {
    /// The key objects in the dict's iteration order, held so that no other object can
    /// take one's address.
    keys: Vec<Py<PyString>>,
    /// Name order: each key's index in `keys`.
    order: Vec<usize>,
}

impl NameOrder {
    fn matches(&self, keys: &[Bound<'_, PyAny>]) -> bool {
        self.keys.len() == keys.len()
            && self
                .keys
                .iter()
                .zip(keys)
                .all(|(a, b)| a.as_ptr() == b.as_ptr())
    }
}

fn non_str_key(key: &Bound<'_, PyAny>) -> PyErr {
    let shown = key.repr().map(|r| r.to_string()).unwrap_or_default();
    optimizer_error(
        &shown,
        format!(
            "parameter names must be str, got {shown} ({})",
            type_name(key)
        ),
    )
}

/// A name that is a str but no Unicode text (a lone surrogate): it could never be a
/// state-dict key of a checkpoint, so it names no parameter.
fn unencodable_key(key: &Bound<'_, PyString>) -> PyErr {
    let shown = key.repr().map(|r| r.to_string()).unwrap_or_default();
    OptimizerError::new_err((
        format!(
            "parameter name {shown} is not valid Unicode text (it holds a lone surrogate); \
             names must encode to UTF-8"
        ),
        key.clone().unbind(),
    ))
}

/// The name's text, or the error that it has none.
pub fn key_text<'a>(key: &'a Bound<'_, PyString>) -> PyResult<Cow<'a, str>> {
    key.to_cow().map_err(|error| {
        if error.is_instance_of::<PyUnicodeError>(key.py()) {
            unencodable_key(key)
        } else {
            error
        }
    })
}

/// The dict's keys and values sorted by name, so that results never depend on insertion
/// order.
pub fn sorted_entries<'py>(
    dict: &Bound<'py, PyDict>,
    cache: Option<&mut NameOrder>,
) -> PyResult<Vec<(Key<'py>, Bound<'py, PyAny>)>> {
    let (mut keys, mut values) = (
        Vec::with_capacity(dict.len()),
        Vec::with_capacity(dict.len()),
    );
    for (key, value) in dict.iter() {
        keys.push(key);
        values.push(value);
    }
    let mut sorted = Vec::new();
    let known = cache.as_deref().is_some_and(|known| known.matches(&keys));
    let mut cache = cache;
    if !known {
        let mut texts = Vec::with_capacity(keys.len());
        for key in &keys {
            let key = key.cast::<PyString>().map_err(|_| non_str_key(key))?;
            texts.push(key_text(key)?);
        }
        sorted = state::name_order(texts.iter().map(|text| &**text));
        if let Some(cache) = cache.as_deref_mut() {
            cache.keys = keys
                .iter()
                .map(|key| {
                    key.cast::<PyString>()
                        .expect("checked above")
                        .clone()
                        .unbind()
                })
                .collect();
            cache.order = std::mem::take(&mut sorted);
        }
    }
    let order = cache.as_deref().map_or(&sorted, |cache| &cache.order);
    // Moved out, not cloned: each reference count change is a call into the interpreter.
    let mut entries: Vec<Option<_>> = keys.into_iter().zip(values).map(Some).collect();
    Ok(order
        .iter()
        .map(|&index| {
            let (key, value) = entries[index].take().expect("each index once");
            let key = key.cast_into::<PyString>().expect("a str key");
            (Key(key), value)
        })
        .collect())
}

/// `name` is only formatted on the error path: it may be built per call.
fn as_array<'py, N: AsRef<str>>(
    object: Bound<'py, PyAny>,
    what: &str,
    name: impl FnOnce() -> N,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    object.cast_into::<PyUntypedArray>().map_err(|error| {
        let object = error.into_inner();
        let name = name();
        let name = name.as_ref();
        optimizer_error(
            name,
            format!(
                "{what} '{name}' must be a numpy.ndarray, got {}",
                type_name(&object)
            ),
        )
    })
}

pub fn shared_memory_error(what: &str, key: &str) -> PyErr {
    optimizer_error(
        key,
        format!(
            "{what} '{key}' shares memory with a parameter of this call (the same array \
             under two names, or a parameter passed as a gradient), or is being updated \
             by another thread"
        ),
    )
}

/// A float gradient as a native, aligned float32 or float64 array: the array itself when it
/// already is one, else a NumPy copy (float16 widens to float32 exactly; byte-swapped or
/// unaligned arrays are copied at their own precision).
fn native_float<'py>(
    array: Bound<'py, PyUntypedArray>,
    key: &Key<'py>,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let single = is_float_dtype::<f32>(&array);
    if (single || is_float_dtype::<f64>(&array)) && is_aligned(&array) {
        return Ok(array);
    }
    let py = array.py();
    let target = match array.dtype().itemsize() {
        8 => numpy::dtype::<f64>(py),
        _ => numpy::dtype::<f32>(py),
    };
    let bytes = array.len().saturating_mul(target.itemsize());
    let copy = array.call_method1("astype", (target,)).map_err(|error| {
        match error.is_instance_of::<pyo3::exceptions::PyMemoryError>(py) {
            true => key.out_of_memory("a converted copy of gradient", OutOfMemory { bytes }),
            false => error,
        }
    })?;
    Ok(copy
        .cast_into::<PyUntypedArray>()
        .expect("astype returns an ndarray"))
}

/// Shape equality without a call to `memcmp` (which `==` on slices makes): shapes are a
/// few numbers, compared several times per array and call.
pub fn same_shape(a: &[usize], b: &[usize]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// Gradients may be float16, float32 or float64 (anything else is refused, not cast).
fn check_gradient_dtype(array: &Bound<'_, PyUntypedArray>, key: &Key<'_>) -> PyResult<()> {
    if is_float_dtype::<f64>(array) || is_float_dtype::<f32>(array) {
        return Ok(());
    }
    let dtype = array.dtype();
    if dtype.kind() == b'f' && matches!(dtype.itemsize(), 2 | 4 | 8) {
        return Ok(());
    }
    Err(key.error(|name| {
        format!(
            "gradient '{name}' has unsupported dtype {} (expected float16, float32 or float64)",
            dtype_name(array)
        )
    }))
}

/// `numpy.floating`, looked up once.
fn numpy_floating(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static FLOATING: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    FLOATING.import(py, "numpy", "floating")
}

/// A gradient as an array: the array itself, or a NumPy floating scalar or Python float
/// as a 0-d array (arithmetic on 0-d arrays returns scalars). Anything else is refused.
pub fn gradient_array<'py>(
    object: Bound<'py, PyAny>,
    key: &Key<'py>,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let object = match object.cast_into::<PyUntypedArray>() {
        Ok(array) => return Ok(array),
        Err(error) => error.into_inner(),
    };
    let py = object.py();
    if object.is_instance_of::<PyFloat>() || object.is_instance(numpy_floating(py)?)? {
        // SAFETY: PyArray_FromAny with a null dtype and no requirements returns a new
        // reference to an array of the scalar's own dtype, or null with an exception set.
        let array = unsafe {
            let raw = PY_ARRAY_API.PyArray_FromAny(
                py,
                object.as_ptr(),
                std::ptr::null_mut(),
                0,
                0,
                0,
                std::ptr::null_mut(),
            );
            Bound::from_owned_ptr_or_err(py, raw)?
        };
        return Ok(array.cast_into::<PyUntypedArray>()?);
    }
    as_array(object, "gradient", || {
        format!("{} (or a float for a 0-d parameter)", key.text())
    })
    .map_err(|_| {
        key.error(|name| {
            format!("gradient '{name}' must be a numpy.ndarray (or a float for a 0-d parameter)")
        })
    })
}

/// Looks up and checks the gradient of one parameter (the caller's array, not yet read).
pub fn checked_grad<'py>(
    grads: &Bound<'py, PyDict>,
    key: &Key<'py>,
    param_shape: &[usize],
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let Some(object) = grads.get_item(&key.0)? else {
        return Err(key.error(|name| format!("missing gradient for parameter '{name}'")));
    };
    let array = gradient_array(object, key)?;
    check_gradient_dtype(&array, key)?;
    if !same_shape(array.shape(), param_shape) {
        return Err(key.error(|name| {
            format!(
                "gradient '{name}' has shape {} but the parameter has shape {}",
                describe_shape(array.shape()),
                describe_shape(param_shape)
            )
        }));
    }
    Ok(array)
}

/// A gradient checked for a norm: its array, native and aligned.
pub fn norm_gradient<'py>(
    object: Bound<'py, PyAny>,
    key: &Key<'py>,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let array = gradient_array(object, key)?;
    check_gradient_dtype(&array, key)?;
    Ok(array)
}

/// A checked gradient as the kernels read it: in place, or converted into a staged copy.
pub fn gradient_source<'py, T: Float>(
    array: Bound<'py, PyUntypedArray>,
    key: &Key<'py>,
    order: Order,
) -> PyResult<Source<'py, T>> {
    let array = native_float(array, key)?;
    let staging = |error| key.out_of_memory("a staged copy of gradient", error);
    if is_float_dtype::<T>(&array) {
        let typed = typed_into::<T>(array).expect("dtype checked");
        return Source::new(typed, order).map_err(staging);
    }
    // float32 <-> float64 is rounded here, in Rust, so an overflow to infinity is reported
    // as a non-finite gradient, not warned about by NumPy.
    let values = if is_float_dtype::<f32>(&array) {
        convert::<f32, T>(&array, order)
    } else {
        convert::<f64, T>(&array, order)
    };
    let values =
        values.map_err(|error| key.out_of_memory("a converted copy of gradient", error))?;
    Ok(Source::Staged(values))
}

fn convert<S: Float, T: Real>(
    array: &Bound<'_, PyUntypedArray>,
    order: Order,
) -> Result<Box<[T]>, OutOfMemory> {
    let typed = typed::<S>(array).expect("dtype checked");
    order.gather(read_view(typed), |x: S| T::from_f64(x.to_f64()))
}

/// A read-only gradient of any real float dtype, as f32 or f64 lanes for a norm.
pub enum NormSource<'py> {
    Single(Source<'py, f32>),
    Double(Source<'py, f64>),
}

pub fn norm_source<'py>(
    array: Bound<'py, PyUntypedArray>,
    key: &Key<'py>,
) -> PyResult<NormSource<'py>> {
    let array = native_float(array, key)?;
    // Any contiguous layout will do for a norm; anything else is gathered in C order.
    let order = Order::of(&array);
    let staging = |error| key.out_of_memory("a staged copy of gradient", error);
    Ok(if is_float_dtype::<f32>(&array) {
        NormSource::Single(
            Source::new(typed_into(array).expect("dtype checked"), order).map_err(staging)?,
        )
    } else {
        NormSource::Double(
            Source::new(typed_into(array).expect("dtype checked"), order).map_err(staging)?,
        )
    })
}

/// A parameter after its checks: a writable, aligned float32 or float64 array whose
/// elements are each stored once.
pub fn checked_param<'py>(
    key: &Key<'py>,
    object: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let array = as_array(object, "parameter", || key.text())?;
    if !is_aligned(&array) {
        return Err(key.error(|name| {
            format!("parameter '{name}' is not aligned in memory (copy it to update it)")
        }));
    }
    if !(is_float_dtype::<f32>(&array) || is_float_dtype::<f64>(&array)) {
        return Err(key.error(|name| {
            format!(
                "parameter '{name}' has dtype {} (expected float32 or float64)",
                dtype_name(&array)
            )
        }));
    }
    if !has_flags(&array, NPY_ARRAY_WRITEABLE) {
        return Err(key.error(|name| format!("parameter '{name}' is read-only (not writeable)")));
    }
    // Contiguous arrays (nearly all) cannot overlap themselves.
    if !array.is_contiguous() {
        let overlaps = claims::overlaps_itself(array.shape(), array.strides(), itemsize(&array))
            .map_err(|error| key.out_of_memory("the layout check of parameter", error))?;
        if overlaps {
            return Err(key.error(|name| {
                format!(
                    "parameter '{name}' has elements that share memory (zero or colliding \
                     strides): updating it in place would write them several times"
                )
            }));
        }
    }
    Ok(array)
}

/// Checks that the call's arrays do not alias each other and registers their claims
/// against the other calls in flight and the pending steps: afresh, or, for the second
/// phase of a pending first_step, in place of the claims that step holds (`pending`; they
/// stay in force if the call is refused). Items are numbered parameters first, then
/// gradients, each in name order.
pub fn claim_memory(
    names: &[Key<'_>],
    claims: Vec<Claim>,
    mut pending: Option<&mut Option<Registration>>,
) -> PyResult<Registration> {
    let blame = |conflict: Conflict| {
        let key = names[conflict.item % names.len()].text();
        match (conflict.item < names.len(), conflict.holder) {
            (true, Holder::PendingStep) => pending_step_error(&key),
            (true, Holder::Call) => shared_memory_error("parameter", &key),
            (false, _) => shared_memory_error("gradient", &key),
        }
    };
    let claims = Arc::new(CallClaims::new(claims));
    if let Some(item) = claims.first_conflict() {
        return Err(blame(Conflict {
            item,
            holder: Holder::Call,
        }));
    }
    let Some(mut held) = pending.as_mut().and_then(|slot| slot.take()) else {
        return claims::register(claims).map_err(blame);
    };
    match held.replace(claims, Holder::Call) {
        Ok(()) => Ok(held),
        Err(conflict) => {
            if let Some(slot) = pending {
                *slot = Some(held);
            }
            Err(blame(conflict))
        }
    }
}

/// A write to a parameter of a SAM first_step that awaits its second phase.
fn pending_step_error(key: &str) -> PyErr {
    optimizer_error(
        key,
        format!(
            "parameter '{key}' belongs to a SAM first_step that awaits its second_step, \
             whose restore would wipe this write: finish that step (second_step or \
             restore) first"
        ),
    )
}

/// The typed parameter a call writes, laid out for the kernels (staged if it must be).
pub fn target<'py, T: Float>(
    key: &Key<'py>,
    param: Bound<'py, PyUntypedArray>,
    order: Order,
) -> PyResult<Target<'py, T>> {
    let typed = typed_into::<T>(param).expect("dtype checked");
    Target::new(Access(typed), order)
        .map_err(|error| key.out_of_memory("a staged copy of parameter", error))
}

/// A new NumPy array of `T` with this shape and order, or the error (never a panic).
pub fn new_array<'py, T: Element>(
    py: Python<'py>,
    shape: &[usize],
    fortran: bool,
    key: &str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let mut dims: Vec<numpy::npyffi::npy_intp> = shape.iter().map(|&n| n as _).collect();
    // SAFETY: PyArray_Empty takes a reference to the descr, and returns a new array or
    // null with an exception set.
    let array = unsafe {
        let descr = T::get_dtype(py).into_dtype_ptr();
        let raw = PY_ARRAY_API.PyArray_Empty(
            py,
            dims.len() as c_int,
            dims.as_mut_ptr(),
            descr,
            c_int::from(fortran),
        );
        Bound::from_owned_ptr_or_err(py, raw)
    };
    let array = array.map_err(|error| {
        match error.is_instance_of::<pyo3::exceptions::PyMemoryError>(py) {
            true => {
                let bytes = shape.iter().product::<usize>() * std::mem::size_of::<T>();
                out_of_memory(key, &format!("'{key}'"), bytes)
            }
            false => error,
        }
    })?;
    // SAFETY: an ndarray of `T` just made.
    Ok(unsafe { array.cast_into_unchecked() })
}

/// A flat buffer laid out in `order`, written into a new array of that shape.
pub fn array_from<'py, T: Element + Copy>(
    py: Python<'py>,
    values: &[T],
    shape: &[usize],
    fortran: bool,
    key: &str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let array = new_array::<T>(py, shape, fortran, key)?;
    // SAFETY: a new array of ours, contiguous in the order it was made in.
    let slice = unsafe { array.as_slice_mut() }.expect("a new contiguous array");
    slice.copy_from_slice(values);
    Ok(array)
}

/// A state array's values as a new flat buffer in its own contiguous order (C when it
/// has none), and that order.
pub fn buffer_of<T: Float>(
    array: &Bound<'_, PyUntypedArray>,
    key: &str,
) -> PyResult<(Box<[T]>, Order)> {
    let typed = typed::<T>(array).expect("dtype checked by the caller");
    let order = Order::of(array);
    order
        .gather(read_view(typed), |x| x)
        .map(|values| (values, order))
        .map_err(|error| out_of_memory(key, &format!("'{key}'"), error.bytes))
}

/// An array a state dict holds, checked to be float32 or float64 in native byte order.
pub fn state_array<'py>(
    object: Bound<'py, PyAny>,
    key: &str,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let array = as_array(object, "state", || key)?;
    if !is_aligned(&array) || !(is_float_dtype::<f32>(&array) || is_float_dtype::<f64>(&array)) {
        return Err(optimizer_error(
            key,
            format!(
                "state '{key}' must be a native float32 or float64 array, got {}",
                dtype_name(&array)
            ),
        ));
    }
    Ok(array)
}
